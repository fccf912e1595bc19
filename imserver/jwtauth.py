# -*- test-case-name: tests.test_jwt -*-
"""
JWT client tokens (RFC 7519), accepted beside the C{v1.<expiry>.<hmac>}
tokens of L{imserver.auth} wherever a token is.

PyJWT does the JOSE work (parsing, signatures); this module decides which
algorithm may be verified with which key, and judges the time claims by the
injected clock:

  - HS256, HS384 and HS512 are keyed with the gate's secret (the bytes
    L{imserver.auth.loadSecret} returns), and only with it.
  - RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA are verified with
    public keys (L{VerificationKey}) from a PEM file (C{--jwt-public-key},
    L{PEMFile}) or a JWKS (C{--jwks}: L{JWKSFile}, or L{JWKSURL} fetched
    with Twisted's HTTP client), kept current by L{JWTKeyService}; only
    with a key of the algorithm's type: an RSA key for RS*/PS*, an EC key
    on the algorithm's curve for ES*, an Ed25519 or Ed448 key for EdDSA.
    A public key is never an HMAC secret and the secret never verifies an
    asymmetric algorithm, so the algorithm-confusion attack has no key to
    use; C{none} is never accepted.
  - Claims (L{JWTVerifier}): C{sub} (required) must be the uid of the auth
    request; C{exp} (required), C{nbf} and C{iat} are judged with
    C{--jwt-leeway} seconds of slack; C{aud} and C{iss} are checked when
    C{--jwt-audience} and C{--jwt-issuer} are given (a token with an
    C{aud} is refused when no audience is configured).

Every refusal is the same L{AuthFailed} the v1 tokens give; its C{reason}
(a label of C{imserver_auth_failures_total}) tells the metrics which check
failed, never the client.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidKeyError,
    InvalidSignatureError,
    PyJWTError,
)
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imserver.errors import AuthFailed
from imserver.identifiers import validateUid
from imserver.interfaces import IJWTKeys

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from jwt.types import Options

log = Logger()

#: The HMAC algorithms: keyed with the gate's secret only.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
#: RSA algorithms: an RSA public key of at least L{MIN_RSA_BITS} bits.
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
#: ECDSA algorithms and the curve each takes (RFC 7518 section 3.4).
EC_ALGORITHMS = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
#: EdDSA (RFC 8037): an Ed25519 or Ed448 public key.
EDDSA = "EdDSA"
#: The algorithms verified with a public key.
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS + tuple(EC_ALGORITHMS) + (EDDSA,)
#: Every algorithm C{--jwt-algorithms} may name.
SUPPORTED_ALGORITHMS = HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS

#: The smallest RSA key accepted, in bits.
MIN_RSA_BITS = 2048
#: The largest JWKS document read, in bytes, and the most keys it may hold.
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64

# Why a JWT was refused: labels of imserver_auth_failures_total (every one
# is in imserver.metrics.AUTH_FAILURE_REASONS).
JWT_MALFORMED = "jwt_malformed"
JWT_ALGORITHM = "jwt_algorithm"
JWT_UNKNOWN_KEY = "jwt_unknown_key"
JWT_BAD_SIGNATURE = "jwt_bad_signature"
JWT_EXPIRED = "jwt_expired"
JWT_NOT_YET_VALID = "jwt_not_yet_valid"
JWT_BAD_CLAIMS = "jwt_bad_claims"
FAILURE_REASONS = (
    JWT_MALFORMED,
    JWT_ALGORITHM,
    JWT_UNKNOWN_KEY,
    JWT_BAD_SIGNATURE,
    JWT_EXPIRED,
    JWT_NOT_YET_VALID,
    JWT_BAD_CLAIMS,
)

# PyJWT checks the signature, sub (a string equal to the uid), aud, iss and
# that sub and exp are present; the times are judged here, by the injected
# clock (PyJWT reads the system clock).
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": True,
    "verify_iss": True,
    "verify_sub": True,
    "verify_jti": True,
    "require": ["sub", "exp"],
    "strict_aud": False,
}
_PYJWT = jwt.PyJWT()
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


#: How a JWT starts: the base64url encoding of C{{"}, the start of its
#: header (a v1 token starts with C{v1.}).
JWT_PREFIX = "eyJ"


def looksLikeJWT(token: str) -> bool:
    """
    Is C{token} shaped like a compact JWS: three dot-separated parts, the
    first the base64url of a JSON object?  A cheap test made before any
    decoding.
    """
    return token.startswith(JWT_PREFIX) and token.count(".") == 2


def parseAlgorithms(text: str) -> tuple[str, ...]:
    """
    Parse a C{--jwt-algorithms} value: comma-separated names from
    L{SUPPORTED_ALGORITHMS}, as spelled there.

    @raise ValueError: for an empty list, C{none}, or an unknown name.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("no algorithm named")
    for name in names:
        if name.lower() == "none":
            raise ValueError("'none' (unsigned tokens) is never accepted")
        if name not in SUPPORTED_ALGORITHMS:
            raise ValueError(
                "unknown algorithm {!r}; choose among {}".format(
                    name, ", ".join(SUPPORTED_ALGORITHMS)
                )
            )
    return tuple(dict.fromkeys(names))


# -- keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """
    A public key, with what it may verify.

    @ivar key: the C{cryptography} public key.
    @ivar kid: its key id (the JWK's C{kid}), or L{None} (a PEM key).
    @ivar alg: the one algorithm its JWK allows (C{alg}), or L{None}: any of
        its type.
    @ivar source: where it comes from, for logs.
    """

    key: PublicKeyTypes
    kid: str | None = None
    alg: str | None = None
    source: str = ""

    def fits(self, alg: str) -> bool:
        """
        May this key verify a signature of C{alg}?  Never for an HMAC
        algorithm.
        """
        if self.alg is not None and self.alg != alg:
            return False
        key = self.key
        if alg in RSA_ALGORITHMS:
            return isinstance(key, rsa.RSAPublicKey)
        if alg in EC_ALGORITHMS:
            return (
                isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == EC_ALGORITHMS[alg]
            )
        if alg == EDDSA:
            return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
        return False


def _checkedKey(key: Any, what: str) -> PublicKeyTypes:
    """
    C{key} if it is a public key some algorithm of L{ASYMMETRIC_ALGORITHMS}
    can use.

    @raise ValueError: naming C{what}, if not.
    """
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                "{}: a {}-bit RSA key; at least {} bits are required".format(
                    what, key.key_size, MIN_RSA_BITS
                )
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_ALGORITHMS.values():
            raise ValueError(
                "{}: an EC key on {}, not P-256, P-384 or P-521".format(what, key.curve.name)
            )
        return key
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key
    raise ValueError("{}: not an RSA, EC (P-256/384/521), Ed25519 or Ed448 public key".format(what))


def loadPEMKeys(data: bytes, source: str) -> tuple[VerificationKey, ...]:
    """
    The public keys of a PEM file: C{PUBLIC KEY} and C{RSA PUBLIC KEY}
    blocks, and the public keys of C{CERTIFICATE} blocks (whose validity
    dates and issuer are not looked at: the file is trusted).  A file may
    hold several (during a rotation).

    @raise ValueError: if it holds none, a private key, or a key no
        algorithm here can use.
    """
    keys: list[VerificationKey] = []
    for match in _PEM_BLOCK.finditer(data):
        label = match.group(1).decode("ascii")
        what = "{} (block {} of {})".format(source, len(keys) + 1, label)
        if "PRIVATE" in label:
            raise ValueError(
                "{} holds a private key: give the public key only "
                "(openssl pkey -in key.pem -pubout)".format(source)
            )
        try:
            if label == "CERTIFICATE":
                key: Any = x509.load_pem_x509_certificate(match.group(0)).public_key()
            elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                key = load_pem_public_key(match.group(0))
            else:
                raise ValueError("{}: not a public key or certificate".format(what))
        except ValueError as e:
            raise ValueError("{}: cannot be read: {}".format(what, e)) from None
        keys.append(VerificationKey(_checkedKey(key, what), source=source))
    if not keys:
        raise ValueError("{}: no PEM public key or certificate in it".format(source))
    return tuple(keys)


def loadJWKS(data: bytes, source: str) -> tuple[VerificationKey, ...]:
    """
    The usable public keys of a JWKS document (RFC 7517 section 5).  Keys
    that cannot verify a signature here are left out, and logged:
    symmetric (C{"kty": "oct"}: HMAC is keyed with the gate's secret only)
    or private ones, keys for another use than C{sig}, and keys of an
    unsupported type, curve, algorithm or size.

    @raise ValueError: if it is not a JWKS, is larger than
        L{MAX_JWKS_BYTES}, has more than L{MAX_JWKS_KEYS} keys, or none
        usable.
    """
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError("{}: larger than {} bytes".format(source, MAX_JWKS_BYTES))
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ValueError("{}: not JSON: {}".format(source, e)) from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('{}: not a JWKS (a JSON object with a "keys" list)'.format(source))
    entries = document["keys"]
    if len(entries) > MAX_JWKS_KEYS:
        raise ValueError("{}: more than {} keys".format(source, MAX_JWKS_KEYS))
    keys = []
    for index, entry in enumerate(entries):
        try:
            keys.append(_jwk(entry, source))
        except ValueError as e:
            log.warn("{source}: key {index} left out: {why}", source=source, index=index, why=e)
    if not keys:
        raise ValueError("{}: no usable public key".format(source))
    return tuple(keys)


def _jwk(entry: Any, source: str) -> VerificationKey:
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("its kid is not a string")
    what = "kid {!r}".format(kid) if kid is not None else "a key without kid"
    kty = entry.get("kty")
    if kty == "oct":
        raise ValueError(
            "{}: a symmetric key (HS* tokens are verified with the secret only)".format(what)
        )
    if "d" in entry:
        raise ValueError("{}: a private key (publish public keys only)".format(what))
    if entry.get("use", "sig") != "sig":
        raise ValueError("{}: for use {!r}, not sig".format(what, entry.get("use")))
    alg = entry.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        raise ValueError("{}: algorithm {!r} not supported".format(what, alg))
    try:
        parsed = jwt.PyJWK(entry)
    except (PyJWTError, KeyError, TypeError, ValueError) as e:
        # Whatever a malformed JWK makes PyJWT raise: this key is unusable.
        raise ValueError("{}: {}".format(what, e)) from None
    key = _checkedKey(parsed.key, what)
    verificationKey = VerificationKey(key, kid=kid, alg=alg, source=source)
    if not any(verificationKey.fits(a) for a in ASYMMETRIC_ALGORITHMS):
        raise ValueError("{}: fits no supported algorithm".format(what))
    return verificationKey


class PEMFile:
    """
    C{--jwt-public-key}: the public keys of a PEM file, re-read on every
    refresh.

    @ivar keys: the last keys read successfully.
    """

    def __init__(self, path: str) -> None:
        self.path = FilePath(path)
        self.description = "--jwt-public-key " + path
        self.keys: tuple[VerificationKey, ...] = ()

    def read(self) -> tuple[VerificationKey, ...]:
        """
        Read the file now.

        @raise ValueError: if it cannot be read or holds no usable key.
        """
        try:
            data = self.path.getContent()
        except OSError as e:
            raise ValueError(
                "{}: cannot be read: {}".format(self.description, e.strerror)
            ) from None
        return self.parse(data)

    def parse(self, data: bytes) -> tuple[VerificationKey, ...]:
        return loadPEMKeys(data, self.description)

    def fetch(self) -> Deferred[tuple[VerificationKey, ...]]:
        """
        @return: a L{Deferred} firing with the keys of the file now.
        """
        return maybeDeferred(self.read)


class JWKSFile(PEMFile):
    """
    C{--jwks FILE}: the public keys of a JWKS file, re-read on every
    refresh.
    """

    def __init__(self, path: str) -> None:
        PEMFile.__init__(self, path)
        self.description = "--jwks " + path

    def parse(self, data: bytes) -> tuple[VerificationKey, ...]:
        return loadJWKS(data, self.description)


def checkJWKSURL(url: str) -> None:
    """
    A JWKS URL is C{https://}, or C{http://} to a loopback address (a key
    set fetched in the clear from elsewhere could be anyone's).

    @raise ValueError: if not.
    """
    if not url.isascii():
        raise ValueError("not an ASCII URL (write an international host name in IDNA)")
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("not an https:// URL")
    try:
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(str(e)) from None
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host.lower() == "localhost"
        if not loopback:
            raise ValueError("http:// only to a loopback address; use https://")


class _BoundedBody(Protocol):
    """
    Collects a response body of at most C{limit} bytes; a longer one is
    aborted.
    """

    def __init__(self, deferred: Deferred[bytes], limit: int) -> None:
        self.deferred = deferred
        self.limit = limit
        self.parts: list[bytes] = []
        self.length = 0

    def dataReceived(self, data: bytes) -> None:
        if self.deferred.called:
            return
        self.length += len(data)
        if self.length > self.limit:
            self.parts = []
            self.deferred.errback(ValueError("larger than {} bytes".format(self.limit)))
            self.abort()
            return
        self.parts.append(data)

    def abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web.client import ResponseDone

        if self.deferred.called:
            return
        if reason.check(ResponseDone):
            self.deferred.callback(b"".join(self.parts))
        else:
            self.deferred.errback(reason)


class JWKSURL:
    """
    C{--jwks URL}: a JWKS fetched with Twisted's HTTP client (an L{Agent} on
    the injected reactor, over persistent connections; TLS verified
    against the platform's trust store by default).  No redirect is
    followed; anything but a C{200} with a JWKS of at most
    L{MAX_JWKS_BYTES} within C{timeout} seconds is a failure.
    """

    def __init__(self, url: str, reactor: Any, timeout: float, contextFactory: Any = None) -> None:
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        checkJWKSURL(url)
        self.url = url
        self.description = "--jwks " + url
        self.reactor = reactor
        self.timeout = timeout
        self.keys: tuple[VerificationKey, ...] = ()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(
            reactor,
            contextFactory if contextFactory is not None else BrowserLikePolicyForHTTPS(),
            pool=self.pool,
        )

    def fetch(self) -> Deferred[tuple[VerificationKey, ...]]:
        """
        @return: a L{Deferred} firing with the keys served now, or failing.
        """
        from twisted.web.http_headers import Headers

        headers = Headers(
            {
                b"Accept": [b"application/jwk-set+json, application/json"],
                b"User-Agent": [b"imserver"],
            }
        )
        d: Any = self.agent.request(b"GET", self.url.encode("ascii"), headers)
        d.addCallback(self._response)
        # The client fails a cancelled request with ResponseNeverReceived,
        # which addTimeout would let through as is.
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=_timedOut)
        d.addCallback(lambda data: loadJWKS(data, self.description))
        return d  # type: ignore[no-any-return]

    def _response(self, response: Any) -> Deferred[bytes]:
        from twisted.web.iweb import UNKNOWN_LENGTH

        if response.code != 200:
            response.deliverBody(_Discard())
            raise ValueError("HTTP status {}".format(response.code))
        if response.length is not UNKNOWN_LENGTH and response.length > MAX_JWKS_BYTES:
            response.deliverBody(_Discard())
            raise ValueError("larger than {} bytes".format(MAX_JWKS_BYTES))

        def cancel(d: Deferred[bytes]) -> None:
            body.abort()

        d: Deferred[bytes] = Deferred(cancel)
        body = _BoundedBody(d, MAX_JWKS_BYTES)
        response.deliverBody(body)
        return d

    def close(self) -> Deferred[None]:
        """
        Close the idle connections of the pool.
        """
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]


def _timedOut(result: object, timeout: float) -> Failure:
    return Failure(TimeoutError("no answer within {:g} s".format(timeout)))


class _Discard(Protocol):
    """
    Reads a body that is not wanted, so the connection can be reused.
    """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


@implementer(IJWTKeys)
class JWTKeyService(Service):
    """
    Keeps the public keys of the key sources (L{PEMFile}, L{JWKSFile},
    L{JWKSURL}) current: each is read at start, then every
    C{refreshInterval} seconds, on C{SIGHUP}, and when a token names a key
    none has (L{unknownKey}; at most once every C{minRefreshInterval}
    seconds).  A source that fails keeps its previous keys (logged), so an
    unreachable JWKS URL leaves the last key set in use; with none yet,
    asymmetric tokens are refused.  Nothing here blocks: a fetch runs on the
    reactor and is abandoned after its timeout.

    @ivar keys: the current keys of every source (L{VerificationKey}s).
    """

    log = Logger()

    def __init__(
        self,
        sources: Sequence[Any],
        reactor: Any,
        refreshInterval: float,
        minRefreshInterval: float,
        handleSignals: bool = True,
    ) -> None:
        self.setName("jwt-keys")
        self.sources = list(sources)
        self.reactor = reactor
        self.refreshInterval = refreshInterval
        self.minRefreshInterval = minRefreshInterval
        self.handleSignals = handleSignals
        self.keys: tuple[VerificationKey, ...] = ()
        self._merge()
        self._refreshing: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._lastRefresh: float | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._previousHandler: Any = None
        self._handling = False

    def __repr__(self) -> str:
        return "<JWTKeyService {}>".format(", ".join(s.description for s in self.sources))

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(self.refreshInterval, now=True)
        if self.handleSignals:
            try:
                self._previousHandler = signal.signal(signal.SIGHUP, self._signalled)
                self._handling = True
            except ValueError:  # not the main thread: refresh() still works
                pass

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        if self._handling:
            # None: the handler before was not Python's; the default then.
            previous = self._previousHandler
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            self._handling = False
            self._previousHandler = None
        if self._refreshing is not None:
            self._refreshing.cancel()
        closing = [s.close() for s in self.sources if hasattr(s, "close")]
        return DeferredList(closing).addCallback(lambda _: None)

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler may run between any two bytecodes: leave the
        # work to the reactor.  The handler this one replaced (the TLS
        # certificates' reload) runs too.
        self.reactor.callFromThread(self.refresh)
        previous = self._previousHandler
        if callable(previous):
            previous(signum, frame)

    def _tick(self) -> Deferred[None]:
        return self.refresh()

    def refresh(self) -> Deferred[None]:
        """
        Read every source again now (or join the refresh under way).

        @return: a L{Deferred} firing with L{None} once done; it never
            fails.  Cancelling it only stops waiting.
        """
        waiter = self._whenRefreshed()
        if self._refreshing is None:
            self._lastRefresh = self.reactor.seconds()
            loads = [
                maybeDeferred(source.fetch).addCallbacks(
                    self._loaded, self._failed, callbackArgs=(source,), errbackArgs=(source,)
                )
                for source in self.sources
            ]
            d: Deferred[None] = DeferredList(loads, consumeErrors=True)  # type: ignore[assignment]
            self._refreshing = d
            # Last: with files only, it has fired already.
            d.addCallback(self._done)
        return waiter

    def _loaded(self, keys: tuple[VerificationKey, ...], source: Any) -> None:
        if keys != source.keys:
            self.log.info(
                "{source}: {n} key(s) in use, kid {kids}",
                source=source.description,
                n=len(keys),
                kids=", ".join(sorted(k.kid or "-" for k in keys)),
            )
        source.keys = keys

    def _failed(self, failure: Failure, source: Any) -> None:
        if failure.check(CancelledError):
            return
        why = failure.getErrorMessage()
        if why.startswith(source.description + ": "):
            why = why[len(source.description) + 2 :]
        self.log.warn(
            "{source}: keys not refreshed ({why}); {n} key(s) from before stay in use",
            source=source.description,
            why=why,
            n=len(source.keys),
        )

    def _done(self, _: object) -> None:
        self._refreshing = None
        self._merge()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _merge(self) -> None:
        self.keys = tuple(key for source in self.sources for key in source.keys)

    def _whenRefreshed(self) -> Deferred[None]:
        def cancel(d: Deferred[None]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter: Deferred[None] = Deferred(cancel)
        self._waiters.append(waiter)
        return waiter

    def unknownKey(self) -> Deferred[None]:
        """
        A token needs a key L{keys} lacks: refresh now, unless a refresh
        started less than C{minRefreshInterval} seconds ago (join one under
        way).

        @return: a L{Deferred} firing with L{None} once the refresh is done,
            at once if none is made; it never fails.
        """
        if self._refreshing is None and self._lastRefresh is not None:
            if self.reactor.seconds() - self._lastRefresh < self.minRefreshInterval:
                return succeed(None)
        return self.refresh()


@implementer(IJWTKeys)
class NoKeys:
    """
    No public key: only HMAC-signed JWTs can be verified.
    """

    keys: tuple[VerificationKey, ...] = ()

    def unknownKey(self) -> Deferred[None]:
        return succeed(None)


# -- verifying --------------------------------------------------------------------


class JWTVerifier:
    """
    Verifies JWT client tokens.

    @ivar algorithms: the accepted algorithms (C{--jwt-algorithms}).
    @ivar audience: the required C{aud} (C{--jwt-audience}), or L{None}.
    @ivar issuer: the required C{iss} (C{--jwt-issuer}), or L{None}.
    @ivar leeway: seconds of clock skew allowed on C{exp}, C{nbf}, C{iat}.
    @ivar keys: the L{IJWTKeys} of the asymmetric algorithms.
    @ivar keyTimeout: the most seconds a token whose key is unknown waits
        for a refresh of L{keys}.
    """

    def __init__(
        self,
        secret: bytes,
        clock: Any,
        algorithms: Iterable[str] = HMAC_ALGORITHMS,
        keys: Any = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        keyTimeout: float = 5.0,
    ) -> None:
        self._secret = secret
        self.clock = clock
        self.algorithms = tuple(algorithms)
        for alg in self.algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError("unsupported JWT algorithm {!r}".format(alg))
        self.keys = keys if keys is not None else NoKeys()
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.keyTimeout = keyTimeout

    def __repr__(self) -> str:
        return "<JWTVerifier {}>".format(",".join(self.algorithms))

    def verify(self, uid: str, token: str) -> Deferred[str]:
        """
        Check the JWT C{token} for C{uid}.

        @return: a L{Deferred} firing with C{uid}, or failing with
            L{AuthFailed} whose C{reason} is one of L{FAILURE_REASONS}.
        """
        if not looksLikeJWT(token):
            return fail(AuthFailed(reason=JWT_MALFORMED))
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if not isinstance(alg, str) or alg not in self.algorithms:
                raise AuthFailed(reason=JWT_ALGORITHM)
            kid = header.get("kid")
        except PyJWTError as e:
            return fail(AuthFailed(reason=_reason(e)))
        except AuthFailed:
            return fail()
        except Exception:
            log.failure("reading the header of a JWT for {uid} failed", uid=uid)
            return fail(AuthFailed(reason=JWT_MALFORMED))
        if alg in HMAC_ALGORITHMS:
            return self._attempt(uid, token, alg, [self._secret])
        candidates = self._candidates(alg, kid)
        if candidates:
            return self._attempt(uid, token, alg, candidates)
        # No key for it (yet): refresh the keys, wait a little, try again.
        d: Deferred[Any] = self.keys.unknownKey()
        d.addTimeout(self.keyTimeout, self.clock)
        d.addErrback(_stopWaiting)
        d.addCallback(lambda _: self._attempt(uid, token, alg, self._candidates(alg, kid)))
        return d

    def _attempt(self, uid: str, token: str, alg: str, keys: Sequence[Any]) -> Deferred[str]:
        """
        L{_decode}, as a L{Deferred} that fails with L{AuthFailed} only.
        """
        if not keys:
            return fail(AuthFailed(reason=JWT_UNKNOWN_KEY))
        try:
            return succeed(self._decode(uid, token, alg, keys))
        except AuthFailed:
            return fail()
        except Exception:
            # A bug here must refuse the token, not answer INTERNAL.
            log.failure("checking a JWT ({alg}) for {uid} failed", alg=alg, uid=uid)
            return fail(AuthFailed(reason=JWT_MALFORMED))

    def _candidates(self, alg: str, kid: str | None) -> list[PublicKeyTypes]:
        """
        The keys that may verify C{alg}: with the token's C{kid}, those of
        that kid, else the keys without one (a PEM file's); without, every
        key of the type.
        """
        fitting = [key for key in self.keys.keys if key.fits(alg)]
        if kid is not None:
            named = [key for key in fitting if key.kid == kid]
            if named:
                return [key.key for key in named]
            return [key.key for key in fitting if key.kid is None]
        return [key.key for key in fitting]

    def _decode(self, uid: str, token: str, alg: str, keys: Sequence[Any]) -> str:
        """
        Verify C{token} with the first of C{keys} its signature matches,
        then its claims.

        @raise AuthFailed: if no key matches or a claim is wrong.
        """
        for key in keys:
            try:
                claims = _PYJWT.decode(
                    token,
                    key,
                    algorithms=[alg],
                    options=_DECODE_OPTIONS,
                    audience=self.audience,
                    issuer=self.issuer,
                    subject=uid,
                )
            except InvalidSignatureError:
                continue
            except PyJWTError as e:
                raise AuthFailed(reason=_reason(e)) from None
            self._checkTimes(claims)
            return uid
        raise AuthFailed(reason=JWT_BAD_SIGNATURE)

    def _checkTimes(self, claims: dict[str, Any]) -> None:
        """
        C{exp} (required), C{nbf} and C{iat} against the clock: accepted
        while C{now < exp + leeway}, from C{nbf - leeway}, and with C{iat}
        no later than C{now + leeway}.
        """
        now = self.clock.seconds()
        exp = _numericDate(claims, "exp")
        if exp is None or now >= exp + self.leeway:
            raise AuthFailed(reason=JWT_EXPIRED if exp is not None else JWT_BAD_CLAIMS)
        for name in ("nbf", "iat"):
            value = _numericDate(claims, name)
            if value is not None and value > now + self.leeway:
                raise AuthFailed(reason=JWT_NOT_YET_VALID)


def _stopWaiting(failure: Failure) -> None:
    """
    A wait for new keys ended by its timeout: go on with the keys there are.
    """
    failure.trap(TimeoutError, CancelledError)


def _numericDate(claims: dict[str, Any], name: str) -> float | None:
    """
    The NumericDate claim C{name} (RFC 7519 section 2), or L{None} if
    absent.

    @raise AuthFailed: if it is not a finite number.
    """
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthFailed(reason=JWT_BAD_CLAIMS)
    return float(value)


def _reason(error: PyJWTError) -> str:
    """
    The failure reason of a PyJWT exception.
    """
    if isinstance(error, InvalidSignatureError):
        return JWT_BAD_SIGNATURE
    if isinstance(error, InvalidAlgorithmError):
        return JWT_ALGORITHM
    if isinstance(error, InvalidKeyError):
        return JWT_UNKNOWN_KEY
    if isinstance(error, DecodeError):
        return JWT_MALFORMED
    if isinstance(error, ExpiredSignatureError):
        return JWT_EXPIRED
    if isinstance(error, ImmatureSignatureError):
        return JWT_NOT_YET_VALID
    if isinstance(error, jwt.InvalidTokenError) and type(error) is not jwt.InvalidTokenError:
        # InvalidAudienceError, InvalidIssuerError, InvalidSubjectError,
        # MissingRequiredClaimError, InvalidIssuedAtError, InvalidJTIError.
        return JWT_BAD_CLAIMS
    # A header PyJWT refuses (a kid that is not a string, an unsupported
    # crit extension), and anything else.
    return JWT_MALFORMED


# -- minting ----------------------------------------------------------------------


def mintJWT(
    secret: bytes,
    uid: str,
    ttl: int,
    now: float,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """
    Make an HMAC-signed JWT for C{uid}, valid C{ttl} seconds from C{now}:
    claims C{sub}, C{iat}, C{exp}, and C{aud}, C{iss} if given.

    @raise ValueError: if C{ttl} is below 1 or C{algorithm} is not an HS
        algorithm.
    @raise imserver.errors.BadRequest: if C{uid} is not a valid uid.
    """
    if ttl < 1:
        raise ValueError("ttl must be at least 1 second")
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(
            "the secret signs {} only, not {}".format(", ".join(HMAC_ALGORITHMS), algorithm)
        )
    validateUid(uid)
    claims: dict[str, Any] = {"sub": uid, "iat": int(now), "exp": int(now + ttl)}
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class JWTConfig:
    """
    The JWT options of C{twistd im}, checked.

    @ivar sources: the key files, read once (L{PEMFile}, L{JWKSFile}).
    @ivar jwksURL: the C{--jwks} URL, or L{None}.
    """

    algorithms: tuple[str, ...]
    audience: str | None = None
    issuer: str | None = None
    sources: tuple[Any, ...] = ()
    jwksURL: str | None = None

    @property
    def hasKeySource(self) -> bool:
        return bool(self.sources) or self.jwksURL is not None


def parseJWTOptions(
    publicKey: str | None,
    jwks: str | None,
    algorithms: str | None,
    audience: str | None,
    issuer: str | None,
) -> JWTConfig:
    """
    Check the JWT options and read the key files they name.

    @raise ValueError: naming the option at fault.
    """
    sources: list[Any] = []
    jwksURL = None
    if publicKey is not None:
        source = PEMFile(publicKey)
        source.keys = source.read()
        sources.append(source)
    if jwks is not None:
        if jwks.startswith(("http://", "https://")):
            try:
                checkJWKSURL(jwks)
            except ValueError as e:
                raise ValueError("--jwks {}: {}".format(jwks, e)) from None
            jwksURL = jwks
        else:
            source = JWKSFile(jwks)
            source.keys = source.read()
            sources.append(source)
    hasKeys = bool(sources) or jwksURL is not None
    if algorithms is None:
        chosen = HMAC_ALGORITHMS + (ASYMMETRIC_ALGORITHMS if hasKeys else ())
    else:
        try:
            chosen = parseAlgorithms(algorithms)
        except ValueError as e:
            raise ValueError("--jwt-algorithms: {}".format(e)) from None
        keyless = [a for a in chosen if a in ASYMMETRIC_ALGORITHMS and not hasKeys]
        if keyless:
            raise ValueError(
                "--jwt-algorithms: {} need a public key: give --jwt-public-key or --jwks".format(
                    ", ".join(keyless)
                )
            )
    for name, value in (("--jwt-audience", audience), ("--jwt-issuer", issuer)):
        if value is not None and not value.strip():
            raise ValueError("{}: empty".format(name))
    return JWTConfig(chosen, audience, issuer, tuple(sources), jwksURL)


def makeVerifier(
    config: JWTConfig | None, secret: bytes, reactor: Any, settings: Any
) -> tuple[JWTVerifier, JWTKeyService | None]:
    """
    The verifier of C{config} (the HMAC algorithms only without one), and
    the service keeping its public keys current if it has key sources
    (add it to the service tree).
    """
    if config is None:
        config = JWTConfig(HMAC_ALGORITHMS)
    service = None
    keys: Any = None
    if config.hasKeySource:
        sources = list(config.sources)
        if config.jwksURL is not None:
            sources.append(JWKSURL(config.jwksURL, reactor, settings.jwks_fetch_timeout))
        service = keys = JWTKeyService(
            sources, reactor, settings.jwks_refresh_interval, settings.jwks_min_refresh_interval
        )
    verifier = JWTVerifier(
        secret,
        reactor,
        config.algorithms,
        keys,
        config.audience,
        config.issuer,
        settings.jwt_leeway,
        settings.jwks_fetch_timeout,
    )
    return verifier, service
