# -*- test-case-name: tests.test_auth -*-
"""
Client tokens: expiring, signed, bound to one uid.  Two forms are accepted,
told apart by their first characters: C{v1.} tokens (below) and JWTs
(C{eyJ...}, L{imserver.jwtauth}).

A v1 token is the ASCII text C{v1.<expiry>.<signature>} where C{expiry} is the
Unix time (whole seconds) after which it is no longer accepted and
C{signature} is the unpadded base64url HMAC-SHA256, under the server secret,
of C{b"imserver-token-v1\\n" + uid + b"\\n" + expiry}.  The uid is not in the
token: the client sends it beside the token, and a token minted for another
uid does not verify.

The app backend mints tokens through the HTTP API or with the shared secret
(C{python -m imserver token --uid alice}, C{--jwt} for a JWT); see
docs/protocol.md.
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
from imserver.jwtauth import JWT_PREFIX, JWTVerifier

log = Logger()

TOKEN_VERSION = "v1"
_CONTEXT = b"imserver-token-v1\n"
#: v1 tokens longer than this are refused without computing anything.
MAX_TOKEN_LENGTH = 256
#: Tokens of any form longer than this are refused unread (the default of
#: the C{max_token_length} setting; an RS256 JWT is some 600 to 900).
DEFAULT_MAX_TOKEN_LENGTH = 2048
#: The failure reason of a token longer than the limit.
TOO_LONG = "token_too_long"
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
    Accepts tokens made by L{mintToken} with the same secret, and JWTs its
    L{JWTVerifier} accepts (by default: HS256, HS384 and HS512 keyed with
    the same secret).  Every refusal is the same L{AuthFailed}; its
    C{reason} says why, for the metrics.

    @ivar clock: an L{IReactorTime} giving the current time.
    @ivar jwt: the L{JWTVerifier}.
    @ivar maxTokenLength: the longest token looked at, in characters.
    """

    def __init__(self, secret, clock, jwt=None, maxTokenLength=DEFAULT_MAX_TOKEN_LENGTH):
        self._secret = secret
        self.clock = clock
        self.jwt = jwt if jwt is not None else JWTVerifier(secret, clock)
        self.maxTokenLength = maxTokenLength

    def __repr__(self):
        return "<TokenAuthenticator>"

    def authenticate(self, uid, token):
        if len(token) > self.maxTokenLength:
            return fail(AuthFailed(reason=TOO_LONG))
        if not token.isascii():
            return fail(AuthFailed())
        if token.startswith(TOKEN_VERSION + "."):
            if verifyToken(self._secret, uid, token, self.clock.seconds()):
                return succeed(uid)
            return fail(AuthFailed())
        if token.startswith(JWT_PREFIX):
            return self.jwt.verify(uid, token)
        return fail(AuthFailed())


#: Bytes of an auth request besides its token, at most: protobuf needs
#: some 400 (uid and device id 128 bytes each, client version 64, the
#: frame's envelope), the JSON subprotocol about 1 KiB (escaped strings).
AUTH_REQUEST_MARGIN = 1024


def makeAuthenticator(secret, clock, settings, jwtConfig=None):
    """
    The gate's authenticator: v1 tokens and JWTs as C{jwtConfig} (an
    L{imserver.jwtauth.JWTConfig}, the C{twistd im} JWT options; L{None}:
    HS256/384/512 with C{secret} only) says, up to
    C{settings.max_token_length} characters.

    @return: C{(authenticator, service)}: the service keeps the JWT public
        keys current (add it to the service tree), or is L{None}.
    """
    from imserver.jwtauth import makeVerifier

    verifier, service = makeVerifier(jwtConfig, secret, clock, settings)
    if settings.max_token_length + AUTH_REQUEST_MARGIN > settings.preauth_max_frame_length:
        log.warn(
            "--max-token-length {tokens} leaves less than {margin} bytes of"
            " --preauth-max-frame-length {frame} for the rest of an auth request:"
            " a token that long may not fit in one (FRAME_TOO_LARGE)",
            tokens=settings.max_token_length,
            margin=AUTH_REQUEST_MARGIN,
            frame=settings.preauth_max_frame_length,
        )
    return TokenAuthenticator(secret, clock, verifier, settings.max_token_length), service


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
