# -*- test-case-name: tests.test_chat -*-
"""
C{python -m imserver chat}: talk to one user, or in a group, from a terminal.

    python -m imserver chat --uid alice --to bob
    python -m imserver chat --uid alice --group team

Each line typed is sent to the peer (or the group); what arrives is printed
as C{[HH:MM:SS] sender: text}, or C{[HH:MM:SS] sender in group: text} for a
group message, and system notices as C{[HH:MM:SS] notice: text}.  In a
group, the members are listed once connected.  The connection is an
L{IMClient}: it reconnects by itself, resumes where it left off and re-sends
unanswered messages.  Ctrl-D waits (briefly) for the server to confirm what
was sent, then quits.

While the user types a line the peer (or the group) gets C{typing}
signals: one when the line starts, again every L{TYPING_REFRESH} seconds
while it goes on, and a stop when it is sent, erased, or left alone for
L{TYPING_IDLE} seconds.  To see the line start, a terminal is read key by
key (L{RawTerminal}, L{TerminalEditor}: this module echoes and edits the
line); other input (a pipe) is read as it comes (L{TerminalInput}), and a
partial line counts as typing.  C{--no-typing} sends no signals and leaves
the terminal as it is.

A certificate the chat does not trust (or that does not name the host)
ends it with a hint (C{--ca}, C{--data-dir}, C{--host}) instead of retrying
forever, unless C{--keep-trying}.

By default it finds the server the way C{make run} starts it: TLS on
localhost:7443, trusting C{<data-dir>/tls-cert.pem}, with a token minted
from the server secret (C{--secret-file}, else C{$IMSERVER_SECRET}, else
C{<data-dir>/secret}).

The global reactor is only imported inside L{main}; L{ChatSession} takes
the reactor, the client and the output stream as arguments.
"""

import hashlib
import os
import signal
import socket
import sys
import time
import unicodedata
import uuid

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imserver import commandline
from imserver.auth import validateDeviceId, validateUid
from imserver.errors import RemoteError
from imserver.pb import im_pb2 as pb
from imserver.tap import DEFAULT_DATA_DIR

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 7443
#: Lifetime of a token minted here; a new one is minted for every connection.
MINTED_TOKEN_TTL = 3600
#: How long Ctrl-D waits for the server to confirm pending sends.
DRAIN_TIMEOUT = 5.0
#: "(bob is typing...)" is shown when bob starts typing, and again only
#: after a stop, a message from bob, or this many seconds without a signal.
TYPING_INTERVAL = 4.0
#: While the user types, "still typing" is sent again every this many
#: seconds (below L{TYPING_INTERVAL}, so the peer keeps one indicator).
TYPING_REFRESH = 2.5
#: A line left alone this many seconds sends "stopped typing".
TYPING_IDLE = 5.0
#: No two typing signals closer than this (1 / the server's default
#: C{--typing-rate}), except a stop right after a start, which the server
#: always lets through (docs/protocol.md, section 7.4).
TYPING_MIN_GAP = 0.5
#: The longest input line accepted, in bytes (the server's own limit on a
#: message body is lower by default and reported as a failed send).
MAX_LINE_LENGTH = 64 * 1024
#: Reconnect backoff ceiling, in seconds: short, since someone is waiting.
MAX_RECONNECT_DELAY = 10.0
#: How long to wait for the terminal to take the last lines at exit.
OUTPUT_FLUSH_TIMEOUT = 2.0
#: Shown as the sender of a message the app backend sent (empty sender).
SYSTEM_SENDER = "(system)"
#: How roles are shown in the member list (members have no mark).
ROLE_MARKS = {pb.ROLE_OWNER: " (owner)", pb.ROLE_ADMIN: " (admin)"}


def defaultDeviceId():
    """
    @return: C{"cli-" + hostname}: stable per machine.
    """
    return "cli-" + socket.gethostname()


def clientMsgIdPrefix(deviceId):
    """
    The prefix of every C{client_msg_id} this command sends from
    C{deviceId}, so that a later run on the same device recognises its own
    earlier messages in the history.

    @rtype: L{str}
    """
    return "cli" + hashlib.sha256(deviceId.encode("utf-8")).hexdigest()[:8] + "-"


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
        ["no-typing", None,
         "Do not tell the peer when you type (and let the terminal edit"
         " lines as usual)."],
        ["keep-trying", None,
         "Keep trying to connect when the gate's certificate is not trusted"
         " or does not name --host (default: say what to do and exit)."],
    ]
    optParameters = [
        ["uid", "u", None, "Your user id."],
        ["to", "t", None, "The user id to chat with."],
        ["group", "g", None, "The group to chat in (instead of --to)."],
        ["host", None, DEFAULT_HOST, "The gate's host name."],
        ["port", "p", DEFAULT_PORT, "The gate's port.", int],
        ["ca", None, None,
         "PEM certificate to trust (default: <data-dir>/tls-cert.pem if it "
         "exists, else the system's trust store)."],
        ["token", None, None, "The token (from `python -m imserver token`)."],
        ["token-file", None, None, "A file holding the token."],
        ["data-dir", "d", DEFAULT_DATA_DIR,
         "The server's data directory (secret and self-signed certificate)."],
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
            try:
                validateUid(self[name])
            except ValueError as e:
                raise usage.UsageError("--{}: {}".format(name, e))
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
        except ValueError as e:
            raise usage.UsageError("--device: {}".format(e))


class ChatConfig:
    """
    Everything L{run} needs, checked before the reactor starts.

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
            raise ValueError("cannot read --token-file {}: {}".format(
                options["token-file"], e))
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
                os.path.join(options["data-dir"], CERT_FILE_NAME))
        path = default.path
    from twisted.internet import ssl

    try:
        return ssl.Certificate.loadPEM(FilePath(path).getContent()), path
    except Exception as e:
        raise ValueError("cannot use {} as the CA certificate: {}".format(path, e))


def describe(reason):
    """
    A short human-readable account of why something failed.

    @param reason: an exception (or a L{pb.Kicked}).
    @rtype: L{str}
    """
    if isinstance(reason, pb.Kicked):
        try:
            name = pb.KickReason.Name(reason.reason)
        except ValueError:
            name = str(reason.reason)
        return "{}: {}".format(name, reason.message) if reason.message else name
    code = getattr(reason, "code", None)
    message = getattr(reason, "message", None)
    if isinstance(code, int) and isinstance(message, str):
        try:
            name = pb.ErrorCode.Name(code)
        except ValueError:
            name = str(code)
        return "{}: {}".format(name, message) if message else name
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        SSL = None
    if SSL is not None and isinstance(reason, SSL.Error):
        details = [
            part[-1] for part in (reason.args[0] if reason.args else [])
            if isinstance(part, tuple) and part and part[-1]
        ]
        return "TLS failed: {}".format("; ".join(details) or "handshake error")
    return str(reason) or type(reason).__name__


#: L{certificateProblem}'s answers.
UNTRUSTED = "untrusted"
WRONG_NAME = "wrong name"


def certificateProblem(reason):
    """
    Did a connection fail because of the server's certificate?

    @param reason: why it failed (an exception).
    @return: L{UNTRUSTED} (it does not chain to a trusted certificate,
        or has expired), L{WRONG_NAME} (it does not name the host), or
        L{None} (something else).
    """
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        return None
    if isinstance(reason, SSL.Error) and "certificate verify failed" in describe(reason):
        return UNTRUSTED
    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(reason, VerificationError):
        return WRONG_NAME
    return None


def printable(text):
    """
    Make received text safe for a terminal: control characters (escape
    sequences, carriage returns, ...) become U+FFFD, and continuation lines
    are indented.
    """
    chars = []
    for ch in text:
        if ch == "\n":
            chars.append("\n    ")
        elif ch != "\t" and unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            chars.append("\ufffd")
        else:
            chars.append(ch)
    return "".join(chars)


def bodyText(message):
    """
    @param message: a L{pb.Message} (or a L{pb.Notice}).
    @return: its body as text to print: UTF-8 text for C{text/*} (or no
        content type), else a note of its size and type.
    """
    contentType = message.content_type
    if contentType and not contentType.lower().startswith("text/"):
        return "[{} bytes of {}]".format(len(message.body), printable(contentType))
    return printable(message.body.decode("utf-8", "replace"))


class ChatSession:
    """
    One chat: lines from the terminal go to C{peer} (or to C{group}),
    messages and notices from the client are printed to C{out}.

    Outgoing entries (the user's own messages, which the server also stores
    in the user's inbox) are printed only when another device sent them;
    this process remembers the C{client_msg_id}s it sent so it does not print
    them a second time.

    The terminal input tells it when the user types (L{typing}) and
    empties a line without sending it (L{typingStopped}); it turns that into
    C{typing} signals to the peer or the group, as rare as docs/protocol.md
    (section 7.4) asks: a start, a refresh every C{typingRefresh} seconds
    while typing goes on, a stop when the line is sent or emptied or after
    C{typingIdle} seconds without a key, and never two signals closer than
    L{TYPING_MIN_GAP} but for a stop after a start.

    @ivar done: a L{Deferred} firing with the exit status once the session
        is over (0 after Ctrl-D with every send confirmed).
    """

    log = Logger()

    def __init__(self, reactor, client, out, me, peer, where=None,
                 localtime=time.localtime, drainTimeout=DRAIN_TIMEOUT,
                 typingInterval=TYPING_INTERVAL, group=None, sendTyping=True,
                 typingRefresh=TYPING_REFRESH, typingIdle=TYPING_IDLE,
                 keepTrying=False, host=None, trusted=None):
        """
        @param reactor: an L{IReactorTime}.
        @param client: an L{imserver.client.IMClient} (or a fake of one);
            its C{onMessage} and C{onNotify} are set here.
        @param out: a text stream.
        @param me: this user's uid.
        @param peer: the uid to chat with, or L{None} with C{group}.
        @param group: the group to chat in, instead of C{peer}.
        @param where: C{"host:port"} for messages about connecting.
        @param localtime: turns Unix seconds into a C{struct_time}.
        @param sendTyping: whether to send typing signals.
        @param keepTrying: whether to keep trying when the server's
            certificate is refused (else the session ends, status 1).
        @param host: the host name the certificate must name, for messages.
        @param trusted: what is trusted, in words, for messages.
        """
        self.clock = reactor
        self.client = client
        self.out = out
        self.me = me
        self.peer = peer
        self.group = group
        self.where = where
        self.localtime = localtime
        self.drainTimeout = drainTimeout
        self.typingInterval = typingInterval
        self.sendTyping = sendTyping
        self.typingRefresh = typingRefresh
        self.typingIdle = typingIdle
        self.keepTrying = keepTrying
        self.host = host
        self.trusted = trusted
        self.done = Deferred()
        self._prefix = clientMsgIdPrefix(client.deviceId)
        self._sentIds = set()
        self._unanswered = 0
        self._inputEnded = False
        self._finished = False
        self._drainTimer = None
        # (uid, group id) -> when uid was last seen typing.
        self._typingSeenAt = {}
        # This user typing: whether the peer was told so, when a signal was
        # last sent (and a start), the timer of the stop after idling.
        self._typingActive = False
        self._typingSentAt = float("-inf")
        self._typingStartedAt = float("-inf")
        self._typingIdleTimer = None
        self._certificateHinted = False
        self._membersShown = False
        self._everConnected = False
        self._lastFailure = None
        client.onMessage = self.onMessage
        client.onNotify = self.onNotify

    def show(self, text):
        """
        Print one line.
        """
        self.out.write(text + "\n")
        self.out.flush()

    # -- life ---------------------------------------------------------------

    def start(self):
        """
        Start the client.

        @return: L{done}.
        """
        self.show("chat {} as {}{} (Enter sends a line, Ctrl-D quits)".format(
            "in group " + self.group if self.group else "with " + self.peer,
            self.me, " via " + self.where if self.where else ""))
        self.client.whenStopped().addCallback(self._stopped)
        self._awaitConnection()
        self.client.start()
        return self.done

    def _awaitConnection(self):
        self.client.whenConnected().addCallback(self._connected)

    def _connected(self, protocol):
        if self._finished:
            return
        self._lastFailure = None
        self.show("{} as {} (session {})".format(
            "reconnected" if self._everConnected else "connected",
            self.me, protocol.session.session_id))
        self._everConnected = True
        protocol.whenClosed().addCallback(self._disconnected)
        if self.group and not self._membersShown:
            protocol.members(self.group).addCallbacks(
                self._showMembers, self._membersFailed)

    def _showMembers(self, members):
        if self._finished or self._membersShown:
            return
        self._membersShown = True
        self.show("members of {}: {}".format(self.group, ", ".join(
            member.uid + ROLE_MARKS.get(member.role, "") for member in members)))

    def _membersFailed(self, failure):
        # An answer is shown once; without one (the connection closed
        # first, or no answer in time), the next connection asks again.
        if self._finished or self._membersShown or not failure.check(RemoteError):
            return
        self._membersShown = True
        if failure.value.code == pb.NOT_MEMBER:
            self.show("! you are not a member of group {} (or it does not exist):"
                      " lines sent to it will be refused".format(self.group))
        else:
            self.show("! cannot list the members of {}: {}".format(
                self.group, describe(failure.value)))

    def _disconnected(self, reason):
        if self._finished or self.client.stopReason is not None:
            return
        self.show("disconnected ({}); reconnecting".format(describe(reason)))
        self._awaitConnection()

    def connectFailed(self, reason):
        """
        A connection attempt failed, or a connection closed before it was
        signed in; the client tries again by itself.  Each distinct reason
        is printed once until a connection succeeds.
        """
        if self._finished or self.client.stopReason is not None:
            return
        text = describe(reason).rstrip(".")
        problem = certificateProblem(reason)
        if problem is not None and not self.keepTrying:
            self.show("! cannot connect{}: {}".format(
                " to " + self.where if self.where else "", text))
            self.show("! " + self._certificateHint(problem)
                      + "; or --keep-trying to try again and again")
            self._finish(1)
            return
        if text == self._lastFailure:
            return
        self._lastFailure = text
        self.show("! cannot connect{}: {} (still trying)".format(
            " to " + self.where if self.where else "", text))
        if problem is not None and not self._certificateHinted:
            self._certificateHinted = True
            self.show("! " + self._certificateHint(problem))

    def _certificateHint(self, problem):
        if problem == WRONG_NAME:
            return ("the gate's certificate does not name {}: give --host a name it"
                    " holds (the self-signed one names localhost, 127.0.0.1 and ::1)".format(
                        self.host or "this host"))
        return ("the gate's certificate is not trusted{}: pass --ca FILE with the"
                " gate's certificate (or its CA's), or --data-dir DIR naming the server's"
                " data directory (which holds tls-cert.pem)".format(
                    " (this chat trusts {})".format(self.trusted) if self.trusted else ""))

    def _stopped(self, reason):
        if self._finished:
            return
        if isinstance(reason, pb.Kicked):
            hint = ""
            if reason.reason == pb.REPLACED:
                hint = (" (another session of {} signed in as device {!r};"
                        " give each one its own --device)".format(
                            self.me, self.client.deviceId))
            self.show("kicked: {}{}".format(describe(reason), hint))
        elif getattr(reason, "code", None) == pb.AUTH_FAILED:
            self.show("kicked: the server refused the token for {} ({}); check"
                      " --token, or --data-dir / --secret-file".format(
                          self.me, describe(reason)))
        else:
            self.show("kicked: {}".format(describe(reason)))
        self._finish(1)

    def _finish(self, status):
        if self._finished:
            return
        self._stopTyping()
        self._finished = True
        if self._drainTimer is not None:
            if self._drainTimer.active():
                self._drainTimer.cancel()
            self._drainTimer = None
        d = self.client.stop()
        d.addErrback(lambda f: self.log.failure("stopping the client failed", f))
        d.addCallback(lambda _: self.done.callback(status))

    # -- terminal input -----------------------------------------------------

    def lineReceived(self, line):
        """
        Send one line (L{bytes}, without its newline) to the peer or the
        group, unless it is blank.
        """
        if self._finished or self._inputEnded:
            return
        self._stopTyping()
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            self.show("! not sent: the line is not valid UTF-8")
            return
        clientMsgId = self._prefix + uuid.uuid4().hex
        self._sentIds.add(clientMsgId)
        self._unanswered += 1
        d = self.client.send(self.peer or "", line, "text/plain",
                             clientMsgId=clientMsgId, groupId=self.group or "")
        d.addCallbacks(self._sent, self._sendFailed,
                       errbackArgs=(clientMsgId, line))

    def _sent(self, response):
        self._answered()

    def _sendFailed(self, failure, clientMsgId, line):
        self._sentIds.discard(clientMsgId)
        text = line.decode("utf-8", "replace")
        if len(text) > 40:
            text = text[:39] + "\u2026"
        self.show("! send failed: {}: {}".format(describe(failure.value), printable(text)))
        self._answered()

    def _answered(self):
        self._unanswered -= 1
        if self._inputEnded and self._unanswered == 0:
            self._finish(0)

    def inputEnded(self):
        """
        The terminal input is closed (Ctrl-D): quit once every send is
        confirmed, or after C{drainTimeout} seconds (exit status 1, since
        some message may not have been sent).
        """
        if self._inputEnded or self._finished:
            return
        self._stopTyping()
        self._inputEnded = True
        if self._unanswered == 0:
            self._finish(0)
            return
        self._drainTimer = self.clock.callLater(self.drainTimeout, self._drainTimedOut)

    def typing(self):
        """
        The user typed on a line not sent yet (that is not blank): tell the
        peer, unless it was told recently; stop after C{typingIdle} seconds
        without a call.
        """
        if not self.sendTyping or self._finished or self._inputEnded:
            return
        if self._typingIdleTimer is not None and self._typingIdleTimer.active():
            self._typingIdleTimer.reset(self.typingIdle)
        else:
            self._typingIdleTimer = self.clock.callLater(self.typingIdle, self._typingIdled)
        now = self.clock.seconds()
        if self._typingActive and now - self._typingStartedAt < self.typingRefresh:
            return
        if now - self._typingSentAt < TYPING_MIN_GAP:
            return
        if self._signalTyping(True):
            self._typingActive = True
            self._typingSentAt = self._typingStartedAt = now

    def typingStopped(self):
        """
        The user emptied the line without sending it.
        """
        self._stopTyping()

    def _typingIdled(self):
        self._typingIdleTimer = None
        self._stopTyping()

    def _stopTyping(self):
        if self._typingIdleTimer is not None:
            if self._typingIdleTimer.active():
                self._typingIdleTimer.cancel()
            self._typingIdleTimer = None
        if self._typingActive:
            self._typingActive = False
            if self._signalTyping(False):
                self._typingSentAt = self.clock.seconds()

    def _signalTyping(self, active):
        return self.client.sendTyping(self.peer or "", active, groupId=self.group or "")

    def _drainTimedOut(self):
        self._drainTimer = None
        self.show("! {} message(s) not confirmed by the server; they may not"
                  " have been sent".format(self._unanswered))
        self._finish(1)

    # -- from the server ----------------------------------------------------

    def onMessage(self, entry):
        """
        Print an inbox entry, unless it is the server's copy of a message
        this process sent.  A group message names its group; a message
        with no sender came from the app backend.

        @param entry: a L{pb.InboxEntry}.
        """
        message = entry.message
        if entry.outgoing:
            if message.client_msg_id in self._sentIds:
                self._sentIds.discard(message.client_msg_id)
                return
            who = "you"
            if not message.client_msg_id.startswith(self._prefix):
                who += " (other device)"
            if not message.group_id and message.recipient != self.peer:
                who += " to " + message.recipient
        else:
            who = message.sender or SYSTEM_SENDER
            self._typingSeenAt.pop((message.sender, message.group_id), None)
        if message.group_id:
            who += " in " + message.group_id
        self.show("[{}] {}: {}".format(self._time(message.created_ms), who,
                                       bodyText(message)))

    def onNotify(self, name, message):
        """
        Show a system notice; show the peer (or a member of the group)
        starting to type: once, and again only after a stop, a message from
        them, or C{typingInterval} seconds without a signal (the sender
        refreshes its signal more often while it types).
        """
        if name == "notice":
            self.show("[{}] notice: {}".format(self._time(message.server_time_ms),
                                               bodyText(message)))
            return
        if name != "typing":
            return
        if self.group:
            if message.group_id != self.group or message.uid == self.me:
                return
        elif message.group_id or message.uid != self.peer:
            return
        key = (message.uid, message.group_id)
        if not message.active:
            self._typingSeenAt.pop(key, None)
            return
        now = self.clock.seconds()
        seenAt = self._typingSeenAt.get(key)
        self._typingSeenAt[key] = now
        if seenAt is not None and now - seenAt < self.typingInterval:
            return
        self.show("({} is typing...)".format(message.uid))

    def _time(self, ms):
        return time.strftime("%H:%M:%S", self.localtime(ms / 1000.0))


@implementer(IHalfCloseableProtocol)
class TerminalInput(LineReceiver):
    """
    Lines from standard input, handed to a L{ChatSession}.  End of input
    hands over a last unterminated line, then calls C{inputEnded}.  A line
    longer than C{MAX_LENGTH} is dropped whole, with a note.  Data that
    ends in a line not blank and not complete yet calls C{typing}.

    Half-closeable, so that standard output stays open after end of input.

    @ivar closed: a L{Deferred} firing when standard input and output are
        both closed.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_LENGTH

    def __init__(self, session=None):
        self.session = session
        self.closed = Deferred()
        self._discarding = False
        self._leftover = b""

    def dataReceived(self, data):
        """
        Split C{data} into lines, skipping the rest of a too long line; a
        partial line (not blank) is the user typing.
        """
        partial = data.rpartition(self.delimiter)[2].strip()
        while data:
            if self._discarding:
                _, newline, data = data.partition(self.delimiter)
                if not newline:
                    return
                self._discarding = False
            LineReceiver.dataReceived(self, data)
            data, self._leftover = self._leftover, b""
        if partial and not self._discarding:
            self.session.typing()

    def lineReceived(self, line):
        self.session.lineReceived(line)

    def lineLengthExceeded(self, data):
        """
        Drop the too long line at the start of C{data}: the lines after it
        are handled once L{LineReceiver.dataReceived} returns, the rest of
        the line is skipped as it arrives.
        """
        self.session.show("! not sent: a line longer than {} bytes".format(self.MAX_LENGTH))
        _, newline, rest = data.partition(self.delimiter)
        if newline:
            self._leftover = rest
        else:
            self._discarding = True

    def readConnectionLost(self):
        """
        End of input: hand over an unterminated last line, then the end.
        """
        last = self.clearLineBuffer()
        if last and not self._discarding:
            self.session.lineReceived(last)
        self.session.inputEnded()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.closed.called:
            self.closed.callback(None)

    def finish(self):
        """
        The session is over; nothing to tidy on the terminal.
        """


def displayWidth(text):
    """
    The columns C{text} takes on a terminal: 2 for wide (East Asian)
    characters, 0 for combining ones, 1 for the others.
    """
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


class TerminalEditor(TerminalInput):
    """
    Keys from a terminal in non-canonical mode without echo
    (L{RawTerminal}), edited into lines here, so the session learns when the
    user starts typing a line, not only when it is sent.

    Characters are echoed and added to the line; Enter sends it (the
    session gets C{lineReceived}); the terminal's erase key (Backspace)
    removes the last character, its kill key (Ctrl-U) the line, its word
    erase key (Ctrl-W) the last word; its end-of-file key (Ctrl-D) on an
    empty line ends the input.  Other control characters and escape
    sequences (arrow keys...) are ignored; at C{MAX_LENGTH} bytes further
    characters are refused with a bell.  Ctrl-C, Ctrl-Z and Ctrl-\\ stay
    signals (the terminal keeps C{ISIG}).

    The session writes through L{write}, which prints above the line being
    edited, then redraws it.
    """

    ESCAPE = 0x1B

    def __init__(self, session=None, erase=(b"\x7f", b"\x08"), kill=(b"\x15",),
                 wordErase=(b"\x17",), endOfFile=(b"\x04",)):
        """
        @param erase: the keys (single bytes) erasing a character; likewise
            C{kill} (the line), C{wordErase} (a word) and C{endOfFile}.
        """
        TerminalInput.__init__(self, session)
        self._keys = {}
        for action, keys in (("erase", erase), ("kill", kill),
                             ("wordErase", wordErase), ("endOfFile", endOfFile)):
            for key in keys:
                self._keys.setdefault(key[0], action)
        self._line = bytearray()
        self._escape = None
        self._afterCR = False
        self._ended = False

    def dataReceived(self, data):
        """
        Edit the line with the keys in C{data}.
        """
        if self._ended:
            return
        echo = bytearray()
        typed = erased = False
        for byte in data:
            if self._escape is not None:
                self._escapeByte(byte)
                continue
            afterCR, self._afterCR = self._afterCR, byte == 0x0D
            if byte in (0x0A, 0x0D):
                if byte == 0x0A and afterCR:
                    continue
                self.transport.write(bytes(echo) + b"\n")
                del echo[:]
                line, self._line = bytes(self._line), bytearray()
                typed = erased = False
                self.session.lineReceived(line)
                if self._ended:
                    return
                continue
            action = self._keys.get(byte)
            if action == "endOfFile":
                if not self._line:
                    self.transport.write(bytes(echo))
                    self._ended = True
                    self.session.inputEnded()
                    return
            elif action is not None:
                if self._line:
                    echo += self._erase(action)
                    erased = True
            elif byte == self.ESCAPE:
                self._escape = b""
            elif byte < 0x20 and byte != 0x09:
                pass
            elif len(self._line) >= self.MAX_LENGTH:
                echo += b"\x07"
            else:
                self._line.append(byte)
                echo.append(byte)
                typed = True
        if echo:
            self.transport.write(bytes(echo))
        if self._line.strip():
            if typed:
                self.session.typing()
        elif erased:
            self.session.typingStopped()

    def _escapeByte(self, byte):
        # ESC [ ... final (CSI), ESC O x (SS3), ESC x (Alt+x): all ignored.
        sequence = self._escape + bytes([byte])
        if sequence in (b"[", b"O"):
            self._escape = sequence
        elif sequence[:1] == b"[" and len(sequence) > 1 and not 0x40 <= byte <= 0x7E:
            self._escape = sequence if len(sequence) < 32 else None
        else:
            self._escape = None

    def _erase(self, action):
        """
        Remove the last character, word or the whole line.

        @return: what erases it on the screen.
        """
        line = self._line
        end = len(line)
        if action == "kill":
            start = 0
        elif action == "wordErase":
            start = end
            while start > 0 and line[start - 1] in b" \t":
                start -= 1
            while start > 0 and line[start - 1] not in b" \t":
                start -= 1
        else:
            start = max(end - 1, 0)
            while start > 0 and line[start] & 0xC0 == 0x80:
                start -= 1
        gone = bytes(line[start:]).decode("utf-8", "replace")
        del line[start:]
        if "\t" in gone:
            return b"\r\x1b[K" + bytes(line)
        width = displayWidth(gone)
        return b"\b" * width + b" " * width + b"\b" * width

    def write(self, data):
        """
        Print C{data} (whole lines) above the line being edited.
        """
        if self._line:
            self.transport.write(b"\r\x1b[K" + data + bytes(self._line))
        else:
            self.transport.write(data)

    def redraw(self):
        """
        Draw the line being edited again (after the terminal was used by
        someone else: the shell, after Ctrl-Z).
        """
        self.transport.write(b"\r\x1b[K" + bytes(self._line))

    def readConnectionLost(self):
        """
        The terminal is gone: the line being edited was never sent.
        """
        if not self._ended:
            self._ended = True
            self.session.inputEnded()

    def finish(self):
        """
        The session is over: leave the line being edited on the screen, on
        its own line.
        """
        if self._line:
            self.transport.write(b"\n")
            del self._line[:]


class RawTerminal:
    """
    A terminal read key by key: non-canonical mode without echo (for
    L{TerminalEditor}), output processing and signals kept; and restored.
    """

    def __init__(self, fd):
        """
        @param fd: the terminal's file descriptor.
        """
        self.fd = fd
        self._saved = None

    @property
    def entered(self):
        """
        Whether the terminal is (to be) read key by key: L{enter} was
        called, L{restore} not yet.
        """
        return self._saved is not None

    def enter(self):
        """
        Save the terminal's mode and switch to key-by-key reading.

        @return: the keyword arguments of L{TerminalEditor} for the
            terminal's own erase, kill, word erase and end-of-file keys
            (added to the usual ones).
        @raise termios.error: if C{fd} is not a terminal.
        """
        import termios

        self._saved = termios.tcgetattr(self.fd)
        self.apply()
        keys = {}
        for name, index, usual in (("erase", termios.VERASE, (b"\x7f", b"\x08")),
                                   ("kill", termios.VKILL, (b"\x15",)),
                                   ("wordErase", termios.VWERASE, (b"\x17",)),
                                   ("endOfFile", termios.VEOF, (b"\x04",))):
            key = self._saved[6][index]
            own = (key,) if isinstance(key, bytes) and key not in (b"", b"\x00") else ()
            keys[name] = own + usual
        return keys

    def apply(self):
        """
        (Again) set key-by-key reading, from the mode saved by L{enter}.
        """
        import termios

        mode = self._saved[:6] + [list(self._saved[6])]
        mode[3] &= ~(termios.ICANON | termios.ECHO)
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)

    def restore(self):
        """
        Put the saved mode back (once).
        """
        import termios

        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass


class TransportText:
    """
    A text stream over a transport: what L{ChatSession} prints goes
    through the reactor, which owns (non-blocking) standard output.
    """

    def __init__(self, transport, encoding="utf-8"):
        self.transport = transport
        self.encoding = encoding

    def write(self, text):
        self.transport.write(text.encode(self.encoding, "replace"))

    def flush(self):
        pass


class _WatchedEndpoint:
    """
    A client endpoint that reports connection attempts that fail, and
    connections that close before they are signed in (a TLS failure, for
    one), to C{onFailure}.
    """

    def __init__(self, endpoint):
        self._endpoint = endpoint
        self.onFailure = None

    def connect(self, factory):
        d = self._endpoint.connect(factory)
        d.addCallbacks(self._connected, self._failed)
        return d

    def _failed(self, failure):
        if self.onFailure is not None:
            self.onFailure(failure.value)
        return failure

    def _connected(self, protocol):
        def closed(reason):
            if protocol.session is None and self.onFailure is not None:
                self.onFailure(reason)

        protocol.whenClosed().addCallback(closed)
        return protocol


def run(reactor, config, stdin=0, stdout=1):
    """
    Chat until Ctrl-D, a kick or a refused token (the function
    L{twisted.internet.task.react} runs).

    @type config: L{ChatConfig}
    @return: a L{Deferred} firing when done, failing with L{SystemExit}
        for a non-zero status.
    """
    from twisted.internet.stdio import StandardIO

    from imserver.client import IMClient, clientEndpoint, fullJitterBackoff

    if callable(config.token):
        def token():
            return config.token(reactor.seconds())
    else:
        token = config.token

    endpoint = _WatchedEndpoint(clientEndpoint(
        reactor, config.host, config.port, tls=config.tls, trustRoot=config.trustRoot
    ))
    client = IMClient(
        reactor, config.host, config.port, config.uid, token, config.deviceId,
        endpoint=endpoint, retryPolicy=fullJitterBackoff(0.5, MAX_RECONNECT_DELAY),
    )
    raw, terminal, restoreSignal = _terminal(reactor, config, stdin, stdout)
    stdio = StandardIO(terminal, stdin=stdin, stdout=stdout, reactor=reactor)
    session = ChatSession(
        reactor, client, TransportText(terminal if raw is not None else stdio,
                                       getattr(sys.stdout, "encoding", None) or "utf-8"),
        config.uid, config.peer, where="{}:{}".format(config.host, config.port),
        group=config.group, sendTyping=config.typing, keepTrying=config.keepTrying,
        host=config.host, trusted=config.trusted,
    )
    terminal.session = session
    endpoint.onFailure = session.connectFailed

    def flushed(status):
        # Give the terminal back (its mode is about input only), let
        # standard output drain (bounded), then report the status.
        terminal.finish()
        restoreSignal()
        if raw is not None:
            raw.restore()
        stdio.loseConnection()
        d = terminal.closed.addTimeout(OUTPUT_FLUSH_TIMEOUT, reactor)
        d.addErrback(lambda f: f.trap(TimeoutError))

        def over(_):
            if status:
                raise SystemExit(status)

        return d.addCallback(over)

    return session.start().addCallback(flushed)


def _terminal(reactor, config, stdin, stdout):
    """
    The input protocol: a L{TerminalEditor} on a L{RawTerminal} when
    typing signals are wanted and standard input and output are a terminal
    (restored at reactor shutdown at the latest, set again after Ctrl-Z and
    C{fg}), else a L{TerminalInput}.

    @return: C{(RawTerminal or None, protocol, function undoing the SIGCONT
        handler)}.
    """
    if not (config.typing and os.isatty(stdin) and os.isatty(stdout)):
        return None, TerminalInput(), lambda: None
    try:
        import termios
    except ImportError:  # pragma: no cover (not POSIX)
        return None, TerminalInput(), lambda: None
    raw = RawTerminal(stdin)
    try:
        keys = raw.enter()
    except termios.error:
        return None, TerminalInput(), lambda: None
    reactor.addSystemEventTrigger("after", "shutdown", raw.restore)
    editor = TerminalEditor(**keys)

    def continued():
        if raw.entered:
            raw.apply()
            editor.redraw()

    previous = signal.signal(
        signal.SIGCONT, lambda signum, frame: reactor.callFromThread(continued))

    def restoreSignal():
        signal.signal(signal.SIGCONT, previous)

    return raw, editor, restoreSignal


def main(config):
    """
    Run a chat on the global reactor.

    @type config: L{ChatConfig}
    @return: the exit status.
    """
    from twisted.internet import fdesc, task

    try:
        task.react(run, (config,))
    except SystemExit as e:
        return e.code
    finally:
        # StandardIO leaves the terminal non-blocking; the shell should not
        # inherit that.
        for fd in (0, 1):
            try:
                fdesc.setBlocking(fd)
            except OSError:
                pass
    return 0
