# -*- test-case-name: tests.test_commandline -*-
"""
C{python -m imserver}: command-line tools.

  - C{token}: mint a client token (v1, or C{--jwt} a JWT) from the server
    secret.
  - C{chat}: talk to another user from this terminal.
  - C{web-url}: the chat page's address, signed in as a uid (development).
"""

import sys
import time

try:
    from twisted.python import usage
except ImportError as e:
    # In the repository's folder, the twistd plugin folder twisted/ (no
    # __init__.py) is importable as an empty namespace package when this
    # Python has no Twisted of its own: say so rather than fail on
    # "No module named 'twisted.python'".
    sys.exit(
        "error: this Python ({}) cannot import Twisted ({}). Run the"
        " virtualenv's Python, which has imserver and its dependencies:"
        " .venv/bin/python -m imserver (`make run` creates .venv)".format(sys.executable, e)
    )

from twisted.python.filepath import FilePath

from imserver import commandline
from imserver.chat import ChatOptions
from imserver.datadir import DEFAULT_DATA_DIR
from imserver.errors import BadRequest
from imserver.identifiers import validateUid

#: How the commands are run, for their usage lines.
COMMAND_NAME = "python -m imserver"


class TokenOptions(commandline.Options):
    synopsis = (
        "--uid UID [--ttl SECONDS] [--jwt [--alg HS256|HS384|HS512] [--aud AUD]"
        " [--iss ISS]] [--data-dir DIR | --secret-file FILE]"
    )
    longdesc = (
        "Print a client token for UID, signed with the server secret "
        "(--secret-file, else $IMSERVER_SECRET, else <data-dir>/secret, "
        "as the server finds it; it is never generated here): a v1 token, "
        "or with --jwt a JWT (claims sub, iat, exp, and aud, iss if given)."
    )
    optFlags = [
        ["jwt", None, "Mint a JWT, HMAC-signed with the secret, instead of a v1 token."],
    ]
    optParameters = [
        ["uid", "u", None, "The user id the token is for."],
        ["ttl", None, 86400, "Seconds the token stays valid.", int],
        ["data-dir", "d", DEFAULT_DATA_DIR, "The server's data directory."],
        ["secret-file", None, None, "File holding the secret."],
        ["alg", None, "HS256", "With --jwt: HS256, HS384 or HS512."],
        ["aud", None, None, "With --jwt: the aud claim (the gate's --jwt-audience)."],
        ["iss", None, None, "With --jwt: the iss claim (the gate's --jwt-issuer)."],
    ]

    def postOptions(self):
        from imserver.jwtauth import HMAC_ALGORITHMS

        if not self["uid"]:
            raise usage.UsageError("--uid is required")
        try:
            validateUid(self["uid"])
        except BadRequest as e:
            raise usage.UsageError("--uid: {}".format(e.message))
        if self["ttl"] < 1:
            raise usage.UsageError("--ttl must be at least 1")
        if not self["jwt"] and (
            self["alg"] != "HS256" or self["aud"] is not None or self["iss"] is not None
        ):
            raise usage.UsageError("--alg, --aud and --iss go with --jwt")
        if self["alg"] not in HMAC_ALGORITHMS:
            raise usage.UsageError(
                "--alg: {} (the secret signs HMAC algorithms only)".format(
                    ", ".join(HMAC_ALGORITHMS)
                )
            )


class WebURLOptions(TokenOptions):
    synopsis = "--uid UID [--url URL] [--ttl SECONDS] [--data-dir DIR | --secret-file FILE]"
    longdesc = (
        "Print the address of the chat page (the --web listener of make run by"
        " default) that opens it signed in as UID, for development: the token"
        " is in the URL's fragment, which the browser never sends to the"
        " server. Anyone with the URL can act as UID until the token expires."
    )
    optParameters = [
        ["url", None, "http://127.0.0.1:7481/", "The chat page's address (the --web listener)."],
    ]

    def postOptions(self):
        TokenOptions.postOptions(self)
        if not self["url"].startswith(("http://", "https://")) or "#" in self["url"]:
            raise usage.UsageError("--url: give an http:// or https:// address, no fragment")


class Options(commandline.Options):
    """
    C{python -m imserver}: a command and its options.
    """

    longdesc = (
        "imserver's command-line tools. '{} COMMAND --help' lists the options of"
        " COMMAND. The server itself runs under twistd: 'twistd -n im --help'"
        " lists its options.".format(COMMAND_NAME)
    )
    subCommands = [
        ["chat", None, ChatOptions, "Chat with another user from this terminal."],
        ["token", None, TokenOptions, "Mint a client token for a uid."],
        ["web-url", None, WebURLOptions, "Print the chat page's address, signed in as a uid."],
    ]

    def getSynopsis(self):
        """
        C{Usage: python -m imserver (chat | token) [options]}; just the
        command name once a subcommand is chosen (its usage line follows).
        """
        if getattr(self, "subCommand", None) is not None:
            return "Usage: " + COMMAND_NAME
        return "Usage: {} ({}) [options]".format(
            COMMAND_NAME, " | ".join(c[0] for c in self.subCommands)
        )

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("name a command: " + ", ".join(c[0] for c in self.subCommands))


def _mint(options):
    from imserver.auth import loadSecret, mintToken
    from imserver.jwtauth import mintJWT

    secretFile = options["secret-file"]
    secret = loadSecret(
        FilePath(options["data-dir"]),
        FilePath(secretFile) if secretFile else None,
        create=False,
    )
    try:
        if options["jwt"]:
            return mintJWT(
                secret,
                options["uid"],
                options["ttl"],
                time.time(),
                options["alg"],
                options["aud"],
                options["iss"],
            )
        return mintToken(secret, options["uid"], options["ttl"], time.time())
    except ValueError as e:
        raise usage.UsageError(str(e))


def token(options, out):
    out.write(_mint(options) + "\n")


def webURL(options, out):
    from urllib.parse import urlencode

    fragment = urlencode({"uid": options["uid"], "token": _mint(options)})
    out.write("{}#{}\n".format(options["url"], fragment))


def chat(options):
    from imserver.chat import main, prepare

    return main(prepare(options))


def main(argv=None, out=sys.stdout):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
        if options.subCommand == "token":
            token(options.subOptions, out)
        elif options.subCommand == "web-url":
            webURL(options.subOptions, out)
        elif options.subCommand == "chat":
            return chat(options.subOptions)
    except usage.UsageError as e:
        shown = getattr(options, "subOptions", options)
        sys.stderr.write("{}\n{}: {}\n".format(shown, COMMAND_NAME, e))
        return 2
    except ValueError as e:
        sys.stderr.write("error: {}\n".format(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
