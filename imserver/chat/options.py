# -*- test-case-name: tests.test_chat -*-
"""
The options of C{python -m imserver chat} (L{ChatOptions}), and what they
lead to before the reactor starts (L{prepare}): the token, or how to mint
one from the server secret, and the certificate to trust.
"""

import os
import socket

from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver import commandline
from imserver.datadir import DEFAULT_DATA_DIR
from imserver.errors import BadRequest
from imserver.identifiers import validateDeviceId, validateGroupId, validateUid

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 7443
#: Lifetime of a token minted here; a new one is minted for every connection.
MINTED_TOKEN_TTL = 3600


def defaultDeviceId():
    """
    @return: C{"cli-" + hostname}: stable per machine.
    """
    return "cli-" + socket.gethostname()


class ChatOptions(commandline.Options):
    """
    Options of C{python -m imserver chat}.
    """

    synopsis = (
        "--uid UID (--to PEER | --group GROUP_ID) [--host HOST] [--port PORT]"
        " [--ca FILE] [--no-tls] [--token TOKEN | --token-file FILE]"
        " [--data-dir DIR] [--secret-file FILE] [--device ID] [--no-typing]"
        " [--keep-trying]"
    )
    longdesc = (
        "Chat with PEER, or in the group GROUP_ID, as UID: every line read is"
        " sent, every message received is printed; Ctrl-D quits. While you"
        " type a line, the peer sees that you are typing. Without"
        " --token or --token-file, a token is minted from the server secret"
        " found as the server finds it (--secret-file, else $IMSERVER_SECRET,"
        " else <data-dir>/secret)."
    )
    optFlags = [
        ["no-tls", None, "Plain TCP, for a tcp: listener (loopback testing only)."],
        [
            "no-typing",
            None,
            "Do not tell the peer when you type (and let the terminal edit lines as usual).",
        ],
        [
            "keep-trying",
            None,
            "Keep trying to connect when the gate's certificate is not trusted"
            " or does not name --host (default: say what to do and exit).",
        ],
    ]
    optParameters = [
        ["uid", "u", None, "Your user id."],
        ["to", "t", None, "The user id to chat with."],
        ["group", "g", None, "The group to chat in (instead of --to)."],
        ["host", None, DEFAULT_HOST, "The gate's host name."],
        ["port", "p", DEFAULT_PORT, "The gate's port.", int],
        [
            "ca",
            None,
            None,
            "PEM certificate to trust (default: <data-dir>/tls-cert.pem if it "
            "exists, else the system's trust store).",
        ],
        ["token", None, None, "The token (from `python -m imserver token`)."],
        ["token-file", None, None, "A file holding the token."],
        [
            "data-dir",
            "d",
            DEFAULT_DATA_DIR,
            "The server's data directory (secret and self-signed certificate).",
        ],
        ["secret-file", None, None, "File holding the server secret."],
        ["device", None, None, "This device's id (default: cli-<hostname>)."],
    ]

    def postOptions(self):
        if not self["uid"]:
            raise usage.UsageError("--uid is required")
        if self["to"] and self["group"]:
            raise usage.UsageError("give --to or --group, not both")
        if not self["to"] and not self["group"]:
            raise usage.UsageError("--to or --group is required")
        for name in ("uid", "to", "group"):
            if not self[name]:
                self[name] = None
                continue
            validate = validateGroupId if name == "group" else validateUid
            try:
                validate(self[name])
            except BadRequest as e:
                raise usage.UsageError("--{}: {}".format(name, e.message))
        if self["token"] is not None and self["token-file"] is not None:
            raise usage.UsageError("give --token or --token-file, not both")
        if self["no-tls"] and self["ca"] is not None:
            raise usage.UsageError("--ca makes no sense with --no-tls")
        if not 0 < self["port"] < 65536:
            raise usage.UsageError("--port must be between 1 and 65535")
        if self["device"] is None:
            self["device"] = defaultDeviceId()
        try:
            validateDeviceId(self["device"])
        except BadRequest as e:
            raise usage.UsageError("--device: {}".format(e.message))


class ChatConfig:
    """
    Everything L{imserver.chat.app.run} needs, checked before the reactor
    starts.

    @ivar token: the token (L{str}), or a callable minting one from the
        current time.
    @ivar trustRoot: the certificate to trust, or L{None} for the system's
        trust store (or no TLS).
    @ivar trusted: what is trusted, in words, for messages.
    """

    def __init__(self, options, token, trustRoot, trusted=None):
        self.uid = options["uid"]
        self.peer = options["to"]
        self.group = options["group"]
        self.host = options["host"]
        self.port = options["port"]
        self.tls = not options["no-tls"]
        self.deviceId = options["device"]
        self.typing = not options["no-typing"]
        self.keepTrying = bool(options["keep-trying"])
        self.token = token
        self.trustRoot = trustRoot
        self.trusted = trusted


def prepare(options):
    """
    Find the token and the certificate to trust.

    @param options: parsed L{ChatOptions}.
    @rtype: L{ChatConfig}
    @raise ValueError: with a message for the user if either is missing.
    """
    trustRoot, trusted = _trustRoot(options)
    return ChatConfig(options, _token(options), trustRoot, trusted)


def _token(options):
    if options["token"] is not None:
        return options["token"].strip()
    if options["token-file"] is not None:
        try:
            token = FilePath(options["token-file"]).getContent().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError("cannot read --token-file {}: {}".format(options["token-file"], e))
        if not token:
            raise ValueError("--token-file {} is empty".format(options["token-file"]))
        return token

    from imserver.auth import loadSecret, mintToken

    uid = options["uid"]
    secretFile = options["secret-file"]
    try:
        secret = loadSecret(
            FilePath(options["data-dir"]),
            FilePath(secretFile) if secretFile else None,
            create=False,
        )
    except (OSError, ValueError) as e:
        raise ValueError(
            "cannot mint a token for {uid}: {why}\n"
            "Start the server first (`make run`, from this directory), or pass"
            " --data-dir, or --token made where the server runs"
            " (`python -m imserver token --uid {uid}`).".format(uid=uid, why=e)
        )
    return lambda now: mintToken(secret, uid, MINTED_TOKEN_TTL, now)


def _trustRoot(options):
    """
    @return: C{(trust root or None, what is trusted in words)}.
    """
    if options["no-tls"]:
        return None, None
    path = options["ca"]
    if path is None:
        from imserver.tls import CERT_FILE_NAME

        default = FilePath(options["data-dir"]).child(CERT_FILE_NAME)
        if not default.exists():
            return None, "the system's CAs, since there is no {}".format(
                os.path.join(options["data-dir"], CERT_FILE_NAME)
            )
        path = default.path
    from twisted.internet import ssl

    try:
        return ssl.Certificate.loadPEM(FilePath(path).getContent()), path
    except Exception as e:
        raise ValueError("cannot use {} as the CA certificate: {}".format(path, e))
