# -*- test-case-name: tests.test_auth -*-
"""
Client tokens: expiring, HMAC-SHA256 signed, bound to one uid.

A token is the ASCII text C{v1.<expiry>.<signature>} where C{expiry} is the
Unix time (whole seconds) after which it is no longer accepted and
C{signature} is the unpadded base64url HMAC-SHA256, under the server secret,
of C{b"imserver-token-v1\\n" + uid + b"\\n" + expiry}.  The uid is not in the
token: the client sends it beside the token, and a token minted for another
uid does not verify.

The app backend mints tokens through the HTTP API or with the shared secret
(C{python -m imserver token --uid alice}); see docs/protocol.md.
"""

import base64
import hashlib
import hmac
import os
import secrets

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from imserver.datadir import SECRET_FILE_NAME
from imserver.errors import AuthFailed
from imserver.identifiers import validateUid
from imserver.interfaces import IAuthenticator

log = Logger()

TOKEN_VERSION = "v1"
_CONTEXT = b"imserver-token-v1\n"
#: Tokens longer than this are refused without computing anything.
MAX_TOKEN_LENGTH = 256
#: The smallest secret accepted, in bytes.
MIN_SECRET_LENGTH = 16
#: Environment variable that may hold the secret itself.
SECRET_ENV = "IMSERVER_SECRET"


def _signature(secret, uid, expiry):
    mac = hmac.new(
        secret,
        _CONTEXT + uid.encode("utf-8") + b"\n" + expiry.encode("ascii"),
        hashlib.sha256,
    ).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def mintToken(secret, uid, ttl, now):
    """
    Make a token for C{uid}, valid for C{ttl} seconds from C{now}.

    @type secret: L{bytes}
    @type uid: L{str}
    @param ttl: seconds, at least 1.
    @param now: the current Unix time.
    @rtype: L{str}
    @raise ValueError: if C{ttl} is below 1.
    @raise imserver.errors.BadRequest: if C{uid} is not a valid uid.
    """
    if ttl < 1:
        raise ValueError("ttl must be at least 1 second")
    validateUid(uid)
    expiry = str(int(now + ttl))
    return "{}.{}.{}".format(TOKEN_VERSION, expiry, _signature(secret, uid, expiry))


def verifyToken(secret, uid, token, now):
    """
    Is C{token} valid for C{uid} at time C{now}?  The signature is compared in
    constant time.

    @rtype: L{bool}
    """
    if len(token) > MAX_TOKEN_LENGTH:
        return False
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        return False
    expiry = parts[1]
    if not (expiry.isascii() and expiry.isdigit()) or len(expiry) > 12:
        return False
    expected = _signature(secret, uid, expiry)
    if not hmac.compare_digest(expected.encode("ascii"), parts[2].encode("utf-8")):
        return False
    return int(expiry) > now


@implementer(IAuthenticator)
class TokenAuthenticator:
    """
    Accepts tokens made by L{mintToken} with the same secret.

    @ivar clock: an L{IReactorTime} giving the current time.
    """

    def __init__(self, secret, clock):
        self._secret = secret
        self.clock = clock

    def __repr__(self):
        return "<TokenAuthenticator>"

    def authenticate(self, uid, token):
        if verifyToken(self._secret, uid, token, self.clock.seconds()):
            return succeed(uid)
        return fail(AuthFailed())


def loadSecret(dataDir=None, secretFile=None, environ=os.environ, create=True):
    """
    Find the server secret: C{secretFile} if given, else the environment
    variable C{IMSERVER_SECRET}, else the file C{secret} in C{dataDir},
    generated (32 random bytes, hex, mode 0600) if absent and C{create}.

    @param dataDir: a L{twisted.python.filepath.FilePath} or L{None}.
    @param secretFile: a L{twisted.python.filepath.FilePath} or L{None}.
    @return: the secret, L{bytes}.
    @raise ValueError: if the secret is shorter than L{MIN_SECRET_LENGTH}.
    """
    if secretFile is not None:
        try:
            secret = secretFile.getContent().strip()
        except OSError as e:
            raise ValueError("cannot read the secret file: {}".format(e))
        source = secretFile.path
    elif environ.get(SECRET_ENV):
        secret = environ[SECRET_ENV].strip().encode("utf-8")
        source = "$" + SECRET_ENV
    elif dataDir is not None:
        path = dataDir.child(SECRET_FILE_NAME)
        if not path.exists():
            if not create:
                raise ValueError(
                    "no secret at {}: start the server once with this data dir,"
                    " or give --secret-file or ${}".format(path.path, SECRET_ENV)
                )
            createSecretFile(path)
            log.info("generated a new server secret in {path}", path=path.path)
        secret = path.getContent().strip()
        source = path.path
    else:
        raise ValueError("no secret: give a secret file, $IMSERVER_SECRET or a data dir")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            "the secret from {} is shorter than {} bytes".format(source, MIN_SECRET_LENGTH)
        )
    return secret


def createSecretFile(path):
    """
    Write 32 random bytes, hex-encoded, to a new file readable by its owner
    only (mode 0600); refuse to overwrite one.

    @type path: L{twisted.python.filepath.FilePath}
    """
    if not path.parent().exists():
        path.parent().makedirs()
    fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
