# -*- test-case-name: tests.test_jwt -*-
"""
Tests for L{imserver.jwtauth}: JWT client tokens, their keys (PEM, JWKS
file, JWKS URL) and their options, through L{imserver.auth.TokenAuthenticator}
and the real gate.

Tokens are minted with PyJWT directly, or by hand where PyJWT refuses to
(C{alg: none}, an HMAC keyed with a public key): never with the code under
test, except where that code is what is tested (C{mintJWT}).
"""

import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import signal
import time
from io import StringIO

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imserver import __main__ as imserverMain, tap, tls
from imserver.auth import (
    DEFAULT_MAX_TOKEN_LENGTH,
    TokenAuthenticator,
    loadSecret,
    makeAuthenticator,
    mintToken,
)
from imserver.client import connect
from imserver.datadir import CERT_FILE_NAME
from imserver.errors import AuthFailed, RemoteError
from imserver.interfaces import IJWTKeys
from imserver.jwtauth import (
    ASYMMETRIC_ALGORITHMS,
    FAILURE_REASONS,
    HMAC_ALGORITHMS,
    JWKSURL,
    MAX_JWKS_BYTES,
    MAX_JWKS_KEYS,
    JWKSFile,
    JWTKeyService,
    JWTVerifier,
    NoKeys,
    PEMFile,
    VerificationKey,
    checkJWKSURL,
    loadJWKS,
    loadPEMKeys,
    looksLikeJWT,
    mintJWT,
    parseAlgorithms,
    parseJWTOptions,
)
from imserver.metrics import AUTH_FAILURE_REASONS
from imserver.pb import im_pb2 as pb
from imserver.settings import Settings

from tests.support import startServer, withoutSecretEnvironment
from tests.support.frames import connectRawTLS, written
from tests.support.gate import GateHarness
from tests.support.live import ConnectionWatch, waitFor
from tests.support.websocket import JSON, PROTO
from tests.test_api import LiveApiTestCase
from tests.test_docs import protocolText, section
from tests.test_websocket import WebGate

#: 64 bytes: long enough for HS512 (PyJWT warns below the digest size).
SECRET = b"0123456789abcdef" * 4
NOW = 1_700_000_000
UID = "alice"


def b64(data):
    """
    Unpadded base64url, as JWS writes it.
    """
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text):
    """
    Decode unpadded base64url.
    """
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def handmade(header, payload, signature=b""):
    """
    A compact JWS assembled by hand: C{header} and C{payload} are objects
    (sent as JSON) or raw bytes.
    """
    parts = [
        b64(part if isinstance(part, bytes) else json.dumps(part).encode())
        for part in (header, payload)
    ]
    return ".".join(parts + [b64(signature)])


def hmacToken(key, payload, alg="HS256", header=None):
    """
    An HMAC-signed JWS made with the standard library: any bytes as the key
    (PyJWT refuses a PEM key as an HMAC secret), any payload (an object, or
    raw bytes), any header.
    """
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    if not isinstance(payload, bytes):
        payload = json.dumps(payload).encode()
    header = json.dumps(header or {"alg": alg, "typ": "JWT"}).encode()
    signingInput = b64(header) + "." + b64(payload)
    signature = hmac.new(key, signingInput.encode("ascii"), digest).digest()
    return signingInput + "." + b64(signature)


def claims(**changes):
    """
    Claims valid for L{UID} at L{NOW} for a minute, with C{changes} (a
    value of L{None} removes the claim).
    """
    result = {"sub": UID, "exp": NOW + 60}
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


_PRIVATE = {}


def privateKey(kind, name="a"):
    """
    A private key of C{kind} (C{rsa}, C{p256}, C{p384}, C{ed25519}),
    generated once per C{name} for the whole run.
    """
    if (kind, name) not in _PRIVATE:
        if kind == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "p256":
            key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "p384":
            key = ec.generate_private_key(ec.SECP384R1())
        else:
            key = ed25519.Ed25519PrivateKey.generate()
        _PRIVATE[kind, name] = key
    return _PRIVATE[kind, name]


def publicPEM(private):
    """
    The PEM SubjectPublicKeyInfo of C{private}'s public key.
    """
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(private, kid=None, alg=None):
    """
    The public JWK of C{private}, as a dict.
    """
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        result = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        result = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        result = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        result["kid"] = kid
    if alg is not None:
        result["alg"] = alg
    return result


def jwks(*keys):
    """
    A JWKS document of C{keys} (JWK dicts), as bytes.
    """
    return json.dumps({"keys": list(keys)}).encode("utf-8")


def signed(private, alg, payload=None, kid=None):
    """
    A JWT signed by PyJWT with C{private}.
    """
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload or claims(), private, algorithm=alg, headers=headers)


@implementer(IJWTKeys)
class StaticKeys:
    """
    Fixed keys; counts the refreshes asked for.
    """

    def __init__(self, *keys):
        self.keys = tuple(keys)
        self.asked = 0

    def unknownKey(self):
        self.asked += 1
        return succeed(None)


class AuthenticatorMixin:
    """
    A L{TokenAuthenticator} on a L{Clock} at L{NOW}, and assertions.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def authenticator(self, algorithms=HMAC_ALGORITHMS, keys=None, **kwargs):
        verifier = JWTVerifier(SECRET, self.clock, algorithms, keys, **kwargs)
        return TokenAuthenticator(SECRET, self.clock, verifier)

    def assertAccepted(self, authenticator, token, uid=UID):
        self.assertEqual(self.successResultOf(authenticator.authenticate(uid, token)), uid)

    def refusal(self, authenticator, token, uid=UID):
        """
        @return: the L{AuthFailed} the token gets.
        """
        return self.failureResultOf(authenticator.authenticate(uid, token), AuthFailed).value

    def assertRefused(self, authenticator, token, reason, uid=UID):
        error = self.refusal(authenticator, token, uid)
        self.assertEqual(error.reason, reason, token)
        self.assertEqual(str(error), str(AuthFailed()))
        return error


class ShapeTests(SynchronousTestCase):
    """
    L{looksLikeJWT} and L{parseAlgorithms}.
    """

    def test_looksLikeJWT(self):
        """
        A JWT starts with C{eyJ} and has three dot-separated parts; a v1
        token does not look like one.
        """
        self.assertTrue(looksLikeJWT(jwt.encode(claims(), SECRET, algorithm="HS256")))
        self.assertFalse(looksLikeJWT(mintToken(SECRET, UID, 60, NOW)))
        self.assertFalse(looksLikeJWT("eyJhbGciOiJIUzI1NiJ9.eyJ9"))
        self.assertFalse(looksLikeJWT("xyz.a.b"))

    def test_algorithms(self):
        """
        Names are comma-separated, spaces and repeats ignored.
        """
        self.assertEqual(parseAlgorithms("HS256, RS256,HS256"), ("HS256", "RS256"))
        self.assertEqual(parseAlgorithms(",".join(ASYMMETRIC_ALGORITHMS)), ASYMMETRIC_ALGORITHMS)

    def test_algorithmsRefused(self):
        """
        C{none} in any spelling, unknown names, lower-case spellings and an
        empty list are refused.
        """
        for text in ["none", "HS256,None", "NONE", "hs256", "HS1", "ES256K", "", " , "]:
            self.assertRaises(ValueError, parseAlgorithms, text)

    def test_reasonsCounted(self):
        """
        Every JWT failure reason, and C{token_too_long}, is a label of
        C{imserver_auth_failures_total}.
        """
        self.assertEqual(set(FAILURE_REASONS) - set(AUTH_FAILURE_REASONS), set())
        self.assertIn("token_too_long", AUTH_FAILURE_REASONS)

    def test_defaultLength(self):
        """
        The authenticator's default token limit is the setting's default,
        and a token that long fits in an auth frame with room to spare.
        """
        settings = Settings()
        self.assertEqual(settings.max_token_length, DEFAULT_MAX_TOKEN_LENGTH)
        self.assertLessEqual(settings.max_token_length + 1024, settings.preauth_max_frame_length)


class HMACTests(AuthenticatorMixin, SynchronousTestCase):
    """
    HS256, HS384 and HS512 tokens keyed with the secret, and every way a
    token is refused.
    """

    def test_accepted(self):
        """
        A JWT signed by PyJWT with the secret, in each HMAC algorithm, is
        accepted for its C{sub}; v1 tokens still are too.
        """
        authenticator = self.authenticator()
        for alg in HMAC_ALGORITHMS:
            self.assertAccepted(authenticator, jwt.encode(claims(), SECRET, algorithm=alg))
        self.assertAccepted(authenticator, mintToken(SECRET, UID, 60, NOW))

    def test_default(self):
        """
        A L{TokenAuthenticator} made with only a secret and a clock accepts
        HS256, HS384 and HS512 JWTs.
        """
        authenticator = TokenAuthenticator(SECRET, self.clock)
        self.assertEqual(authenticator.jwt.algorithms, HMAC_ALGORITHMS)
        self.assertAccepted(authenticator, jwt.encode(claims(), SECRET, algorithm="HS512"))

    def test_optionalClaims(self):
        """
        C{nbf} and C{iat} in the past, extra claims, a fractional C{exp}
        and a matching C{aud} list are accepted.
        """
        authenticator = self.authenticator(audience="chat", issuer="backend")
        token = jwt.encode(
            claims(
                nbf=NOW - 10,
                iat=NOW - 10,
                exp=NOW + 0.5,
                aud=["x", "chat"],
                iss="backend",
                role="u",
            ),
            SECRET,
            algorithm="HS256",
        )
        self.assertAccepted(authenticator, token)

    def test_expired(self):
        """
        A token is refused from C{exp} on (C{jwt_expired}), judged by the
        injected clock.
        """
        authenticator = self.authenticator()
        token = jwt.encode(claims(exp=NOW + 60), SECRET, algorithm="HS256")
        self.assertAccepted(authenticator, token)
        self.clock.advance(59.9)
        self.assertAccepted(authenticator, token)
        self.clock.advance(0.1)
        self.assertRefused(authenticator, token, "jwt_expired")

    def test_leeway(self):
        """
        The leeway extends C{exp} and advances C{nbf} and C{iat}, and no
        more.
        """
        authenticator = self.authenticator(leeway=30)
        late = jwt.encode(claims(exp=NOW - 29), SECRET, algorithm="HS256")
        early = jwt.encode(claims(nbf=NOW + 29, iat=NOW + 29), SECRET, algorithm="HS256")
        self.assertAccepted(authenticator, late)
        self.assertAccepted(authenticator, early)
        self.assertRefused(
            authenticator, jwt.encode(claims(exp=NOW - 30), SECRET, "HS256"), "jwt_expired"
        )
        self.assertRefused(
            authenticator, jwt.encode(claims(nbf=NOW + 31), SECRET, "HS256"), "jwt_not_yet_valid"
        )

    def test_notYetValid(self):
        """
        C{nbf} or C{iat} in the future (no leeway) is C{jwt_not_yet_valid};
        the token is accepted once the clock reaches C{nbf}.
        """
        authenticator = self.authenticator()
        token = jwt.encode(claims(nbf=NOW + 10, exp=NOW + 100), SECRET, algorithm="HS256")
        self.assertRefused(authenticator, token, "jwt_not_yet_valid")
        self.assertRefused(
            authenticator, jwt.encode(claims(iat=NOW + 10), SECRET, "HS256"), "jwt_not_yet_valid"
        )
        self.clock.advance(10)
        self.assertAccepted(authenticator, token)

    def test_badClaims(self):
        """
        Missing C{sub} or C{exp}, C{sub} not the uid or not a string, and
        time claims that are not finite numbers are C{jwt_bad_claims}.
        """
        authenticator = self.authenticator()
        for payload in [
            claims(sub=None),
            claims(exp=None),
            claims(sub="bob"),
            claims(sub="Alice"),
            claims(exp="2030-01-01"),
            claims(exp=True),
            claims(exp=float("inf")),
            claims(exp=float("nan")),
            claims(nbf="soon"),
            claims(jti=5),
        ]:
            token = jwt.encode(payload, SECRET, algorithm="HS256")
            self.assertRefused(authenticator, token, "jwt_bad_claims")
        for payload in [claims(sub=7), claims(sub=["alice"])]:
            self.assertRefused(authenticator, hmacToken(SECRET, payload), "jwt_bad_claims")

    def test_uidMismatch(self):
        """
        A token for alice does not authenticate bob.
        """
        authenticator = self.authenticator()
        token = jwt.encode(claims(), SECRET, algorithm="HS256")
        self.assertRefused(authenticator, token, "jwt_bad_claims", uid="bob")

    def test_audience(self):
        """
        With an audience configured, a token without C{aud} or with another
        is refused; without one, a token carrying C{aud} is refused.
        """
        withAudience = self.authenticator(audience="chat")
        for aud in [None, "other", ["other"], 5]:
            token = jwt.encode(claims(aud=aud), SECRET, algorithm="HS256")
            self.assertRefused(withAudience, token, "jwt_bad_claims")
        self.assertAccepted(withAudience, jwt.encode(claims(aud="chat"), SECRET, "HS256"))
        self.assertRefused(
            self.authenticator(), jwt.encode(claims(aud="chat"), SECRET, "HS256"), "jwt_bad_claims"
        )

    def test_issuer(self):
        """
        With an issuer configured, a token without C{iss} or with another is
        refused.
        """
        authenticator = self.authenticator(issuer="https://idp.example/")
        for iss in [None, "https://evil.example/", ["https://idp.example/"]]:
            token = hmacToken(SECRET, claims(iss=iss))
            self.assertRefused(authenticator, token, "jwt_bad_claims")
        self.assertAccepted(
            authenticator, jwt.encode(claims(iss="https://idp.example/"), SECRET, "HS256")
        )

    def test_wrongSecret(self):
        """
        A token signed with another secret, or tampered with, is
        C{jwt_bad_signature}.
        """
        authenticator = self.authenticator()
        other = jwt.encode(claims(), b"x" * 64, algorithm="HS256")
        self.assertRefused(authenticator, other, "jwt_bad_signature")
        header, payload, signature = jwt.encode(claims(), SECRET, algorithm="HS256").split(".")
        forged = b64(json.dumps(claims(exp=NOW + 10**6)).encode())
        self.assertRefused(
            authenticator, ".".join([header, forged, signature]), "jwt_bad_signature"
        )

    def test_algNone(self):
        """
        An unsigned token (C{alg: none}, any spelling, with or without a
        signature) is C{jwt_algorithm}.
        """
        authenticator = self.authenticator()
        for alg in ["none", "None", "NONE", ""]:
            for signature in [b"", b"x"]:
                token = handmade({"alg": alg, "typ": "JWT"}, claims(), signature)
                self.assertRefused(authenticator, token, "jwt_algorithm")
        self.assertRefused(authenticator, handmade({"typ": "JWT"}, claims()), "jwt_algorithm")

    def test_algorithmNotAllowed(self):
        """
        An algorithm outside the allow-list is C{jwt_algorithm}, even when
        correctly signed.
        """
        authenticator = self.authenticator(algorithms=("HS256",))
        token = jwt.encode(claims(), SECRET, algorithm="HS512")
        self.assertRefused(authenticator, token, "jwt_algorithm")
        rs256 = signed(privateKey("rsa"), "RS256")
        self.assertRefused(authenticator, rs256, "jwt_algorithm")

    def test_malformed(self):
        """
        Garbage after C{eyJ}, the wrong number of parts, bad base64, a header
        or payload that is not a JSON object, a C{kid} that is not a string
        and an unsupported critical header are C{jwt_malformed}.
        """
        authenticator = self.authenticator()
        good = jwt.encode(claims(), SECRET, algorithm="HS256")
        header, payload, signature = good.split(".")
        for token in [
            "eyJ",
            "eyJgarbage",
            header + "." + payload,
            good + ".x",
            header + ".!!!." + signature,
            header + "." + payload + "=====",
            "eyJ" + "A" * 10 + "." + payload + "." + signature,
            handmade(b'{"alg":"HS256"', claims()),
            hmacToken(SECRET, b"not json"),
            hmacToken(SECRET, b"[1, 2]"),
            hmacToken(SECRET, claims(), header={"alg": "HS256", "kid": 5}),
            hmacToken(SECRET, claims(), header={"alg": "HS256", "crit": ["exp"], "exp": 1}),
        ]:
            self.assertRefused(authenticator, token, "jwt_malformed")

    def test_otherForms(self):
        """
        A token neither v1 nor JWT, a bad v1 token and a non-ASCII one are
        C{bad_token}, as before JWTs.
        """
        authenticator = self.authenticator()
        for token in ["", "garbage", "v1.1.x", "v2." + "x" * 40, "eyJé.a.b"]:
            self.assertRefused(authenticator, token, "bad_token")

    def test_tooLong(self):
        """
        A token longer than the limit is C{token_too_long}, whatever it is;
        one at the limit is looked at.
        """
        verifier = JWTVerifier(SECRET, self.clock)
        token = jwt.encode(claims(pad="x" * 300), SECRET, algorithm="HS256")
        authenticator = TokenAuthenticator(SECRET, self.clock, verifier, len(token) - 1)
        self.assertRefused(authenticator, token, "token_too_long")
        self.assertRefused(authenticator, "v1." + "1" * len(token), "token_too_long")
        self.assertAccepted(TokenAuthenticator(SECRET, self.clock, verifier, len(token)), token)

    def test_sameMessage(self):
        """
        Every refusal gives the client the same error: code, message, and
        what is sent on the wire.
        """
        authenticator = self.authenticator(audience="chat")
        refusals = [
            self.refusal(authenticator, token)
            for token in [
                "eyJ.x",
                "x" * 3000,
                handmade({"alg": "none"}, claims()),
                jwt.encode(claims(exp=NOW - 100, aud="chat"), SECRET, "HS256"),
                jwt.encode(claims(aud="chat"), b"y" * 64, "HS256"),
                jwt.encode(claims(aud="other"), SECRET, "HS256"),
                mintToken(SECRET, "bob", 60, NOW),
            ]
        ]
        self.assertEqual(len({e.reason for e in refusals}), len(refusals))
        self.assertEqual(
            {(e.code, e.message, e.fatal, str(e)) for e in refusals},
            {(pb.AUTH_FAILED, "authentication failed", True, str(AuthFailed()))},
        )


class AlgorithmConfusionTests(AuthenticatorMixin, SynchronousTestCase):
    """
    Keys are typed: the secret verifies the HMAC algorithms only, a public
    key only the algorithms of its type.
    """

    def test_publicKeyAsHMACSecret(self):
        """
        A token HS256-signed with the RSA public key's PEM bytes as the
        secret (the algorithm-confusion attack) is refused, whether or not
        RS256 is allowed, and whether the PEM is the one configured.
        """
        private = privateKey("rsa")
        pem = publicPEM(private)
        keys = StaticKeys(*loadPEMKeys(pem, "test"))
        for algorithms in [("HS256", "RS256"), HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS]:
            authenticator = self.authenticator(algorithms, keys)
            self.assertAccepted(authenticator, signed(private, "RS256"))
            for key in [pem, pem.strip(), pem.decode("ascii").replace("\n", "").encode()]:
                token = hmacToken(key, claims(), "HS256")
                self.assertRefused(authenticator, token, "jwt_bad_signature")

    def test_secretNotForAsymmetric(self):
        """
        A token claiming RS256 but signed with HMAC under the secret is
        refused: the secret is not an RSA key.
        """
        authenticator = self.authenticator(("HS256", "RS256"), StaticKeys())
        token = hmacToken(SECRET, claims(), "HS256", header={"alg": "RS256"})
        self.assertRefused(authenticator, token, "jwt_unknown_key")
        keys = StaticKeys(*loadPEMKeys(publicPEM(privateKey("rsa")), "test"))
        authenticator = self.authenticator(("HS256", "RS256"), keys)
        self.assertRefused(authenticator, token, "jwt_bad_signature")

    def test_keyTypes(self):
        """
        Each asymmetric algorithm is verified only with a key of its type:
        an ES256 token is not checked with an RSA or P-384 key, an RS256
        one not with an EC key.
        """
        rsaKey, p256, p384 = privateKey("rsa"), privateKey("p256"), privateKey("p384")
        keys = StaticKeys(
            *loadPEMKeys(
                publicPEM(rsaKey) + publicPEM(p384) + publicPEM(privateKey("ed25519")), "t"
            )
        )
        authenticator = self.authenticator(ASYMMETRIC_ALGORITHMS, keys)
        self.assertRefused(authenticator, signed(p256, "ES256"), "jwt_unknown_key")
        self.assertAccepted(authenticator, signed(p384, "ES384"))
        es256 = handmade({"alg": "ES256"}, claims(), b"s" * 64)
        self.assertRefused(authenticator, es256, "jwt_unknown_key")
        self.assertRefused(
            authenticator, signed(privateKey("rsa", "b"), "RS256"), "jwt_bad_signature"
        )

    def test_fits(self):
        """
        L{VerificationKey.fits} never admits an HMAC algorithm, and
        respects the JWK's C{alg}.
        """
        key = VerificationKey(privateKey("rsa").public_key())
        self.assertEqual(
            [alg for alg in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS if key.fits(alg)],
            ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
        )
        pinned = VerificationKey(privateKey("rsa").public_key(), alg="PS256")
        self.assertEqual([alg for alg in ASYMMETRIC_ALGORITHMS if pinned.fits(alg)], ["PS256"])


class PEMKeyTests(AuthenticatorMixin, SynchronousTestCase):
    """
    RS256, ES256 and EdDSA (and the other asymmetric algorithms) with keys
    from a PEM file.
    """

    def keys(self, *privates):
        return StaticKeys(*loadPEMKeys(b"".join(publicPEM(p) for p in privates), "test"))

    def test_algorithms(self):
        """
        Tokens signed by PyJWT in each algorithm are accepted with the
        public key of their signer.
        """
        rsaKey, p256, p384 = privateKey("rsa"), privateKey("p256"), privateKey("p384")
        edKey = privateKey("ed25519")
        authenticator = self.authenticator(
            ASYMMETRIC_ALGORITHMS, self.keys(rsaKey, p256, p384, edKey)
        )
        for private, alg in [
            (rsaKey, "RS256"),
            (rsaKey, "RS384"),
            (rsaKey, "RS512"),
            (rsaKey, "PS256"),
            (rsaKey, "PS512"),
            (p256, "ES256"),
            (p384, "ES384"),
            (edKey, "EdDSA"),
        ]:
            self.assertAccepted(authenticator, signed(private, alg))

    def test_wrongKey(self):
        """
        A token signed by another key of the right type is
        C{jwt_bad_signature}; its claims are checked as for HS tokens.
        """
        authenticator = self.authenticator(ASYMMETRIC_ALGORITHMS, self.keys(privateKey("ed25519")))
        other = ed25519.Ed25519PrivateKey.generate()
        self.assertRefused(authenticator, signed(other, "EdDSA"), "jwt_bad_signature")
        expired = signed(privateKey("ed25519"), "EdDSA", claims(exp=NOW - 1))
        self.assertRefused(authenticator, expired, "jwt_expired")
        foreign = signed(privateKey("ed25519"), "EdDSA", claims(sub="bob"))
        self.assertRefused(authenticator, foreign, "jwt_bad_claims")

    def test_kidIgnoredForPEMKeys(self):
        """
        A PEM key has no kid: it is tried for tokens naming any kid.
        """
        authenticator = self.authenticator(("RS256",), self.keys(privateKey("rsa")))
        self.assertAccepted(authenticator, signed(privateKey("rsa"), "RS256", kid="k1"))

    def test_noKeys(self):
        """
        With an asymmetric algorithm allowed but no key, the token is
        C{jwt_unknown_key}, after asking the key source once.
        """
        keys = StaticKeys()
        authenticator = self.authenticator(("RS256",), keys)
        self.assertRefused(authenticator, signed(privateKey("rsa"), "RS256"), "jwt_unknown_key")
        self.assertEqual(keys.asked, 1)
        authenticator = self.authenticator(("RS256",), NoKeys())
        self.assertRefused(authenticator, signed(privateKey("rsa"), "RS256"), "jwt_unknown_key")

    def test_certificate(self):
        """
        A C{CERTIFICATE} block's public key is used.
        """
        private = privateKey("p256")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2021, 1, 1))
            .sign(private, hashes.SHA256())
        )
        [key] = loadPEMKeys(certificate.public_bytes(serialization.Encoding.PEM), "cert")
        authenticator = self.authenticator(("ES256",), StaticKeys(key))
        self.assertAccepted(authenticator, signed(private, "ES256"))

    def test_refusedFiles(self):
        """
        A file with no key, a private key, an RSA key under 2048 bits or a
        key of an unsupported curve is refused with a L{ValueError} naming
        the source.
        """
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        k1 = ec.generate_private_key(ec.SECP256K1())
        privatePEM = privateKey("p256").private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for data, why in [
            (b"", "no PEM"),
            (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "cannot be read"),
            (privatePEM, "private key"),
            (publicPEM(small), "1024-bit"),
            (publicPEM(k1), "secp256k1"),
        ]:
            error = self.assertRaises(ValueError, loadPEMKeys, data, "keys.pem")
            self.assertIn("keys.pem", str(error))
            self.assertIn(why, str(error))


class JWKSTests(AuthenticatorMixin, SynchronousTestCase):
    """
    Keys from a JWKS document: C{kid} selection and the keys left out.
    """

    def test_kidSelection(self):
        """
        A token naming a kid is verified with that key only; one without a
        kid is tried with every key of its type.
        """
        a, b = privateKey("rsa", "a"), privateKey("rsa", "b")
        keys = StaticKeys(*loadJWKS(jwks(jwk(a, "A"), jwk(b, "B")), "jwks"))
        authenticator = self.authenticator(("RS256",), keys)
        self.assertAccepted(authenticator, signed(a, "RS256", kid="A"))
        self.assertAccepted(authenticator, signed(b, "RS256", kid="B"))
        self.assertAccepted(authenticator, signed(b, "RS256"))
        self.assertRefused(authenticator, signed(a, "RS256", kid="B"), "jwt_bad_signature")
        self.assertEqual(keys.asked, 0)
        self.assertRefused(authenticator, signed(a, "RS256", kid="C"), "jwt_unknown_key")
        self.assertEqual(keys.asked, 1)

    def test_jwkAlgorithm(self):
        """
        A JWK's C{alg} pins the algorithm its key verifies.
        """
        a = privateKey("rsa")
        keys = StaticKeys(*loadJWKS(jwks(jwk(a, "A", "RS256")), "jwks"))
        authenticator = self.authenticator(("RS256", "PS256"), keys)
        self.assertAccepted(authenticator, signed(a, "RS256", kid="A"))
        self.assertRefused(authenticator, signed(a, "PS256", kid="A"), "jwt_unknown_key")

    def test_leftOut(self):
        """
        Symmetric keys, private keys, keys for encryption, keys of an
        unsupported algorithm or shape are left out; a token naming a
        left-out symmetric key is not verified with it.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        a = privateKey("p256")
        private = jwk(a, "priv")
        private["d"] = "AAAA"
        oct = {"kty": "oct", "kid": "sym", "k": b64(b"k" * 32)}
        document = jwks(
            oct,
            private,
            dict(jwk(a, "enc"), use="enc"),
            dict(jwk(a, "hs"), alg="HS256"),
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "not an object",
            jwk(a, "good"),
        )
        [key] = loadJWKS(document, "jwks")
        self.assertEqual(key.kid, "good")
        self.assertEqual(len([e for e in events if "left out" in e.get("log_format", "")]), 6)
        authenticator = self.authenticator(HMAC_ALGORITHMS + ("ES256",), StaticKeys(key))
        forged = hmacToken(b"k" * 32, claims(), header={"alg": "HS256", "kid": "sym"})
        self.assertRefused(authenticator, forged, "jwt_bad_signature")

    def test_refusedDocuments(self):
        """
        A document that is not JSON, not a JWKS, too large, with too many
        keys or no usable key is a L{ValueError}.
        """
        a = privateKey("ed25519")
        for document in [
            b"{",
            b"[]",
            b'{"keys": {}}',
            jwks(),
            jwks({"kty": "oct", "k": "AAAA"}),
            jwks(*[jwk(a, str(i)) for i in range(MAX_JWKS_KEYS + 1)]),
            b" " * (256 * 1024 + 1),
        ]:
            self.assertRaises(ValueError, loadJWKS, document, "jwks")


class KeyServiceTests(AuthenticatorMixin, SynchronousTestCase):
    """
    L{JWTKeyService} with key files, on a L{Clock}: refresh on an interval,
    on demand for an unknown kid (rate-limited), and on C{SIGHUP}.
    """

    def setUp(self):
        AuthenticatorMixin.setUp(self)
        self.path = FilePath(self.mktemp())
        self.a, self.b = privateKey("rsa", "a"), privateKey("rsa", "b")
        self.path.setContent(jwks(jwk(self.a, "A")))
        self.source = JWKSFile(self.path.path)
        self.source.keys = self.source.read()
        self.service = JWTKeyService([self.source], self.clock, 300, 30, handleSignals=False)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.auth = self.authenticator(("RS256",), self.service)

    def test_interface(self):
        """
        The service and L{NoKeys} provide L{IJWTKeys}.
        """
        verifyObject(IJWTKeys, self.service)
        verifyObject(IJWTKeys, NoKeys())

    def test_rotation(self):
        """
        Once the file lists key B instead of A, a token of B (unknown kid)
        makes the service read the file at once and is accepted; tokens of
        A are refused from then on.
        """
        tokenA = signed(self.a, "RS256", kid="A")
        self.assertAccepted(self.auth, tokenA)
        self.path.setContent(jwks(jwk(self.b, "B")))
        self.clock.advance(30)
        self.assertAccepted(self.auth, signed(self.b, "RS256", kid="B"))
        self.assertRefused(self.auth, tokenA, "jwt_unknown_key")

    def test_rateLimited(self):
        """
        An unknown kid less than the minimum interval after the last read
        reads nothing and is refused at once; after it, the file is read.
        """
        self.path.setContent(jwks(jwk(self.b, "B")))
        self.clock.advance(29)
        tokenB = signed(self.b, "RS256", kid="B")
        self.assertRefused(self.auth, tokenB, "jwt_unknown_key")
        self.assertEqual([k.kid for k in self.service.keys], ["A"])
        self.clock.advance(1)
        self.assertAccepted(self.auth, tokenB)

    def test_interval(self):
        """
        The sources are read again every refresh interval.
        """
        self.path.setContent(jwks(jwk(self.b, "B")))
        self.clock.advance(299)
        self.assertEqual([k.kid for k in self.service.keys], ["A"])
        self.clock.advance(1)
        self.assertEqual([k.kid for k in self.service.keys], ["B"])

    def test_brokenFileKeepsKeys(self):
        """
        A file that can no longer be used (broken, removed) keeps the keys
        of the last good read, with a warning.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tokenA = signed(self.a, "RS256", claims(exp=NOW + 3600), kid="A")
        self.path.setContent(b"{ broken")
        self.clock.advance(300)
        self.assertAccepted(self.auth, tokenA)
        self.path.remove()
        self.service.refresh()
        self.assertAccepted(self.auth, tokenA)
        self.assertEqual(len([e for e in events if "not refreshed" in e.get("log_format", "")]), 2)

    def test_sighup(self):
        """
        With signals handled, C{SIGHUP} reads the sources again (on the
        reactor) and the handler it replaced still runs; stopping the
        service puts that handler back.
        """
        called = []
        previous = signal.signal(signal.SIGHUP, lambda signum, frame: called.append(signum))
        self.addCleanup(signal.signal, signal.SIGHUP, previous)

        class ThreadedClock(Clock):
            def callFromThread(self, f, *args):
                self.callLater(0, f, *args)

        clock = ThreadedClock()
        service = JWTKeyService([self.source], clock, 300, 30)
        service.startService()
        self.path.setContent(jwks(jwk(self.b, "B")))
        os.kill(os.getpid(), signal.SIGHUP)
        clock.advance(0)
        self.assertEqual(called, [signal.SIGHUP])
        self.assertEqual([k.kid for k in service.keys], ["B"])
        self.successResultOf(service.stopService())
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(called, [signal.SIGHUP, signal.SIGHUP])

    def test_waitBounded(self):
        """
        A token whose key is unknown waits for the refresh at most the key
        timeout, then is refused; the refresh goes on.
        """
        pending = []

        class SlowSource:
            description = "slow"
            keys = ()

            def fetch(self):
                d = Deferred()
                pending.append(d)
                return d

        service = JWTKeyService([SlowSource()], self.clock, 300, 0, handleSignals=False)
        verifier = JWTVerifier(SECRET, self.clock, ("RS256",), service, keyTimeout=5)
        authenticator = TokenAuthenticator(SECRET, self.clock, verifier)
        d = authenticator.authenticate(UID, signed(self.a, "RS256", kid="A"))
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, AuthFailed).value.reason, "jwt_unknown_key")
        self.assertEqual(len(pending), 1)
        pending[0].callback(loadJWKS(jwks(jwk(self.a, "A")), "slow"))
        self.assertAccepted(authenticator, signed(self.a, "RS256", kid="A"))


class JWKSResource(Resource):
    """
    Serves a JWKS; counts requests; can answer an error or never.
    """

    isLeaf = True

    def __init__(self, document=b""):
        Resource.__init__(self)
        self.document = document
        self.code = 200
        self.hang = False
        self.chunked = False
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        if self.hang:
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/jwk-set+json")
        if self.chunked:
            # No Content-Length: the client learns the size as it reads.
            for start in range(0, len(self.document), 65536):
                request.write(self.document[start : start + 65536])
            request.finish()
            return NOT_DONE_YET
        return self.document


@implementer(IPolicyForHTTPS)
class TrustOne:
    """
    Trust one self-signed certificate, for the HTTPS JWKS server of a test.
    """

    def __init__(self, certificate):
        self.certificate = Certificate.loadPEM(certificate)

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.certificate)


class JWKSURLTests(TestCase):
    """
    A JWKS URL served by a real C{twisted.web} server on 127.0.0.1, fetched
    by L{JWKSURL} on the global reactor.
    """

    timeout = 30

    def setUp(self):
        self.a, self.b = privateKey("rsa", "a"), privateKey("rsa", "b")
        self.resource = JWKSResource(jwks(jwk(self.a, "A")))
        self.servers = WrappingFactory(Site(self.resource))
        self.port = reactor.listenTCP(0, self.servers, interface="127.0.0.1")
        self.url = "http://127.0.0.1:{}/jwks.json".format(self.port.getHost().port)
        self.addCleanup(self.stopServer)

    @inlineCallbacks
    def stopServer(self):
        """
        Stop listening and wait until the server side of every connection
        is closed.
        """
        if self.port.connected:
            yield self.port.stopListening()
        for protocol in list(self.servers.protocols):
            protocol.transport.loseConnection()
        yield waitFor(lambda: not self.servers.protocols)

    @inlineCallbacks
    def start(self, minRefreshInterval=0.0, timeout=5.0, url=None, contextFactory=None):
        """
        Start a key service for the URL (its first fetch done) and an
        authenticator using it.
        """
        self.source = JWKSURL(url or self.url, reactor, timeout, contextFactory)
        self.service = JWTKeyService(
            [self.source], reactor, 3600, minRefreshInterval, handleSignals=False
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        yield self.service.refresh()
        verifier = JWTVerifier(SECRET, reactor, ("RS256",), self.service, keyTimeout=timeout)
        self.authenticator = TokenAuthenticator(SECRET, reactor, verifier)

    def token(self, private, kid, **changes):
        now = int(time.time())
        return signed(private, "RS256", claims(exp=now + 60, **changes), kid=kid)

    @inlineCallbacks
    def assertAccepted(self, token):
        uid = yield self.authenticator.authenticate(UID, token)
        self.assertEqual(uid, UID)

    @inlineCallbacks
    def assertRefused(self, token, reason):
        error = yield self.assertFailure(self.authenticator.authenticate(UID, token), AuthFailed)
        self.assertEqual(error.reason, reason)

    @inlineCallbacks
    def test_rotation(self):
        """
        Key A, then key B with a new kid: a token of B triggers an
        immediate fetch and is accepted; tokens of A are refused after the
        rotation.
        """
        yield self.start()
        self.assertEqual(self.resource.requests, 1)
        yield self.assertAccepted(self.token(self.a, "A"))
        self.resource.document = jwks(jwk(self.b, "B"))
        yield self.assertAccepted(self.token(self.b, "B"))
        self.assertEqual(self.resource.requests, 2)
        yield self.assertRefused(self.token(self.a, "A"), "jwt_unknown_key")
        self.assertEqual([k.kid for k in self.service.keys], ["B"])

    @inlineCallbacks
    def test_unknownKidRateLimited(self):
        """
        Within the minimum interval, an unknown kid fetches nothing and is
        refused at once.
        """
        yield self.start(minRefreshInterval=3600)
        self.resource.document = jwks(jwk(self.b, "B"))
        for _ in range(5):
            yield self.assertRefused(self.token(self.b, "B"), "jwt_unknown_key")
        self.assertEqual(self.resource.requests, 1)

    @inlineCallbacks
    def test_serverDownKeepsKeys(self):
        """
        When the server answers an error, garbage, a JWKS too large (with
        or without a Content-Length), or not at all, the keys of the last
        good fetch stay in use, and a token of a key it never served is
        still refused.
        """
        yield self.start()
        tokenA = self.token(self.a, "A")
        attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        tooLarge = jwks(jwk(attacker, "X")) + b" " * MAX_JWKS_BYTES
        for code, document, chunked in [
            (500, jwks(jwk(attacker, "X")), False),
            (200, b"<html>", False),
            (200, jwks(), False),
            (200, tooLarge, False),
            (200, tooLarge, True),
        ]:
            self.resource.code, self.resource.document = code, document
            self.resource.chunked = chunked
            yield self.service.refresh()
            yield self.assertAccepted(tokenA)
            yield self.assertRefused(self.token(attacker, "X"), "jwt_unknown_key")
        yield self.stopServer()
        yield self.service.refresh()
        yield self.assertAccepted(tokenA)
        yield self.assertRefused(self.token(attacker, "A"), "jwt_bad_signature")

    @inlineCallbacks
    def test_neverReachable(self):
        """
        With no key ever fetched (the server does not answer), an RS256
        token is refused after the fetch timeout, never accepted.
        """
        self.resource.hang = True
        yield self.start(timeout=0.5)
        self.assertEqual(self.service.keys, ())
        start = reactor.seconds()
        yield self.assertRefused(self.token(self.a, "A"), "jwt_unknown_key")
        self.assertLess(reactor.seconds() - start, 5)

    @inlineCallbacks
    def test_https(self):
        """
        An https:// URL is fetched over verified TLS: with the server's
        certificate trusted it works; with the platform's trust store (the
        default), a self-signed certificate is refused and no key is
        loaded.
        """
        certificate, key = tls.makeSelfSigned()
        port = reactor.listenSSL(
            0, self.servers, tls.serverOptions(certificate, key), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        url = "https://localhost:{}/jwks.json".format(port.getHost().port)
        yield self.start(url=url, contextFactory=TrustOne(certificate))
        yield self.assertAccepted(self.token(self.a, "A"))
        untrusted = JWKSURL(url, reactor, 5.0)
        self.addCleanup(untrusted.close)
        error = yield self.assertFailure(untrusted.fetch(), ResponseNeverReceived)
        self.assertIn("certificate verify failed", str(error.reasons[0].value))

    def test_urls(self):
        """
        Only https:// URLs, and http:// to a loopback address, are taken.
        """
        for url in [
            "https://idp.example/jwks",
            "http://127.0.0.1:8080/jwks",
            "http://[::1]/jwks",
            "http://localhost/jwks",
        ]:
            checkJWKSURL(url)
        for url in [
            "http://idp.example/jwks",
            "http://10.0.0.1/jwks",
            "ftp://idp.example/jwks",
            "https:///jwks",
            "https://idp.example:99999/jwks",
        ]:
            self.assertRaises(ValueError, checkJWKSURL, url)


class OptionsTests(SynchronousTestCase):
    """
    The JWT options of C{twistd im}: checked at start, and the service tree
    they make.
    """

    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = self.mktemp()

    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(
            ["--data-dir", self.dataDir, "--listen", "tcp:0", "--store", "memory"] + list(args)
        )
        return options

    def pemFile(self, data=None):
        path = FilePath(self.mktemp())
        path.setContent(data if data is not None else publicPEM(privateKey("rsa")))
        return path.path

    def test_defaults(self):
        """
        Without options: the HMAC algorithms, no key source, the token
        limit of the settings.
        """
        options = self.parse()
        self.assertEqual(options.jwt.algorithms, HMAC_ALGORITHMS)
        root = tap.makeService(options, reactor=MemoryReactorClock())
        authenticator = root.getServiceNamed("gate").factory.authenticator
        self.assertEqual(authenticator.jwt.algorithms, HMAC_ALGORITHMS)
        self.assertEqual(authenticator.maxTokenLength, 2048)
        self.assertRaises(KeyError, root.getServiceNamed, "jwt-keys")

    def test_keySources(self):
        """
        A PEM file or a JWKS adds the asymmetric algorithms by default, and
        a key service to the tree, last.
        """
        options = self.parse(
            "--jwt-public-key",
            self.pemFile(),
            "--jwks",
            "https://idp.example/jwks.json",
            "--jwt-audience",
            "chat",
            "--jwt-issuer",
            "idp",
            "--max-token-length",
            "3000",
            "--preauth-max-frame-length",
            "8192",
        )
        self.assertEqual(options.jwt.algorithms, HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS)
        root = tap.makeService(options, reactor=MemoryReactorClock())
        service = root.getServiceNamed("jwt-keys")
        self.assertIs(list(root)[-1], service)
        self.assertEqual(
            [s.description for s in service.sources],
            [
                "--jwt-public-key " + options["jwt-public-key"],
                "--jwks https://idp.example/jwks.json",
            ],
        )
        authenticator = root.getServiceNamed("gate").factory.authenticator
        self.assertIs(authenticator.jwt.keys, service)
        self.assertEqual((authenticator.jwt.audience, authenticator.jwt.issuer), ("chat", "idp"))
        self.assertEqual(authenticator.maxTokenLength, 3000)

    def test_algorithmList(self):
        """
        C{--jwt-algorithms} replaces the default.
        """
        options = self.parse("--jwt-algorithms", "RS256", "--jwt-public-key", self.pemFile())
        self.assertEqual(options.jwt.algorithms, ("RS256",))

    def test_refused(self):
        """
        Bad algorithm lists, asymmetric algorithms without a key, bad key
        files and JWKS URLs stop the gate at start, naming the option.
        """
        jwksFile = FilePath(self.mktemp())
        jwksFile.setContent(b'{"keys": []}')
        for args, option in [
            (["--jwt-algorithms", "none"], "--jwt-algorithms"),
            (["--jwt-algorithms", "HS256,none"], "--jwt-algorithms"),
            (["--jwt-algorithms", "HS257"], "--jwt-algorithms"),
            (["--jwt-algorithms", "RS256"], "--jwt-algorithms"),
            (["--jwt-public-key", self.mktemp()], "--jwt-public-key"),
            (["--jwt-public-key", self.pemFile(b"not a key")], "--jwt-public-key"),
            (["--jwks", jwksFile.path], "--jwks"),
            (["--jwks", self.mktemp()], "--jwks"),
            (["--jwks", "http://idp.example/jwks"], "--jwks"),
            (["--jwt-audience", " "], "--jwt-audience"),
            (["--max-token-length", "10"], "--max-token-length"),
            (["--jwt-leeway", "-1"], "--jwt-leeway"),
        ]:
            error = self.assertRaises(UsageError, self.parse, *args)
            self.assertIn(option, str(error), args)

    def test_parseDirect(self):
        """
        L{parseJWTOptions} reads the key files once.
        """
        config = parseJWTOptions(self.pemFile(), None, None, None, None)
        [source] = config.sources
        self.assertIsInstance(source, PEMFile)
        self.assertEqual(len(source.keys), 1)

    def test_tokenLengthWarning(self):
        """
        A token limit that leaves under 1 KiB of the pre-auth frame for the
        rest of the auth request is logged at start.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        makeAuthenticator(SECRET, Clock(), Settings())
        self.assertEqual([e for e in events if "--max-token-length" in e.get("log_format", "")], [])
        makeAuthenticator(SECRET, Clock(), Settings(max_token_length=3500))
        self.assertEqual(
            len([e for e in events if "--max-token-length" in e.get("log_format", "")]), 1
        )


class GateTests(SynchronousTestCase):
    """
    JWTs through the gate's protocol (L{GateHarness}): what the client sees
    and what the metrics count.
    """

    def setUp(self):
        self.gate = GateHarness(self)
        from tests.support.gate import SECRET as gateSecret

        self.secret = gateSecret

    def authAnswer(self, token, uid=UID):
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol, uid=uid, token=token)
        return written(transport)

    def test_accepted(self):
        """
        A client authenticates with a JWT minted by PyJWT with the secret.
        """
        now = self.gate.clock.seconds()
        token = jwt.encode({"sub": UID, "exp": now + 60}, self.secret, algorithm="HS256")
        [frame] = self.authAnswer(token)
        self.assertEqual(frame.kind, pb.RESPONSE)
        self.assertFalse(frame.HasField("error"))

    def test_refusalsCounted(self):
        """
        Refused JWTs get the same AUTH_FAILED frame and close as a bad v1
        token; the metrics count each reason, and the failed-auth throttle
        counts them all.
        """
        now = self.gate.clock.seconds()
        tokens = {
            "bad_token": "v1.1.x",
            "token_too_long": "x" * 3000,
            "jwt_malformed": "eyJ.x.y",
            "jwt_algorithm": handmade({"alg": "none"}, {"sub": UID, "exp": now + 60}),
            "jwt_expired": jwt.encode({"sub": UID, "exp": now - 60}, self.secret, "HS256"),
            "jwt_not_yet_valid": jwt.encode(
                {"sub": UID, "exp": now + 600, "nbf": now + 300}, self.secret, "HS256"
            ),
            "jwt_bad_signature": jwt.encode({"sub": UID, "exp": now + 60}, b"z" * 32, "HS256"),
            "jwt_bad_claims": jwt.encode({"sub": "bob", "exp": now + 60}, self.secret, "HS256"),
        }
        answers = set()
        for token in tokens.values():
            frames = self.authAnswer(token)
            self.assertEqual(len(frames), 1)
            answers.add(frames[0].SerializeToString())
        self.assertEqual(len(answers), 1)
        [frame] = frames
        self.assertEqual(frame.error.code, pb.AUTH_FAILED)
        self.assertEqual(frame.error.message, "authentication failed")
        metrics = self.gate.factory.metrics
        for reason in tokens:
            self.assertEqual(metrics.authFailures[reason], 1, reason)
        # The throttle: 10 failures allowed at once for the uid; this is
        # the ninth, one more passes, then RATE_LIMITED without a check.
        for _ in range(2):
            self.authAnswer("v1.1.x")
        [frame] = self.authAnswer(jwt.encode({"sub": UID, "exp": now + 60}, self.secret, "HS256"))
        self.assertEqual(frame.error.code, pb.RATE_LIMITED)
        self.assertEqual(metrics.authFailures["throttled"], 1)


class MintingTests(SynchronousTestCase):
    """
    L{mintJWT} and C{python -m imserver token --jwt}, checked with PyJWT.
    """

    def setUp(self):
        self.secretFile = FilePath(self.mktemp())
        self.secretFile.setContent(b"  " + SECRET + b"\n")

    def test_mintJWT(self):
        """
        L{mintJWT} signs C{sub}, C{iat}, C{exp} (and C{aud}, C{iss}) with
        the secret in an HMAC algorithm only.
        """
        token = mintJWT(SECRET, UID, 60, NOW + 0.7, "HS384", "chat", "idp")
        decoded = jwt.decode(
            token,
            SECRET,
            algorithms=["HS384"],
            audience="chat",
            issuer="idp",
            options={"verify_exp": False, "verify_iat": False},
        )
        self.assertEqual(
            decoded, {"sub": UID, "iat": NOW, "exp": NOW + 60, "aud": "chat", "iss": "idp"}
        )
        self.assertRaises(ValueError, mintJWT, SECRET, UID, 60, NOW, "RS256")
        self.assertRaises(ValueError, mintJWT, SECRET, UID, 0, NOW)

    def command(self, *args):
        out = StringIO()
        status = imserverMain.main(
            ["token", "--uid", UID, "--secret-file", self.secretFile.path] + list(args), out
        )
        return status, out.getvalue()

    def test_command(self):
        """
        C{python -m imserver token --jwt} prints an HS256 JWT of the
        secret's bytes (stripped), valid C{--ttl} seconds; PyJWT verifies
        it.
        """
        before = int(time.time())
        status, out = self.command("--jwt", "--ttl", "120")
        self.assertEqual(status, 0)
        self.assertTrue(out.endswith("\n"))
        token = out.strip()
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")
        decoded = jwt.decode(token, SECRET, algorithms=["HS256"])
        self.assertEqual(decoded["sub"], UID)
        self.assertTrue(before + 120 <= decoded["exp"] <= int(time.time()) + 120)
        clock = Clock()
        clock.advance(time.time())
        self.assertEqual(
            self.successResultOf(TokenAuthenticator(SECRET, clock).authenticate(UID, token)), UID
        )

    def test_commandOptions(self):
        """
        C{--alg}, C{--aud} and C{--iss} go into the JWT.
        """
        status, out = self.command("--jwt", "--alg", "HS512", "--aud", "chat", "--iss", "idp")
        self.assertEqual(status, 0)
        decoded = jwt.decode(
            out.strip(), SECRET, algorithms=["HS512"], audience="chat", issuer="idp"
        )
        self.assertEqual((decoded["aud"], decoded["iss"]), ("chat", "idp"))

    def test_commandRefusals(self):
        """
        An asymmetric C{--alg}, and C{--alg}/C{--aud}/C{--iss} without
        C{--jwt}, are usage errors; without C{--jwt} the token is v1.
        """
        stderr = StringIO()
        self.patch(imserverMain.sys, "stderr", stderr)
        self.assertEqual(self.command("--jwt", "--alg", "RS256")[0], 2)
        self.assertEqual(self.command("--aud", "chat")[0], 2)
        self.assertEqual(self.command("--alg", "HS512")[0], 2)
        status, out = self.command()
        self.assertEqual(status, 0)
        self.assertTrue(out.startswith("v1."))


class DocumentTests(SynchronousTestCase):
    """
    The JWT test vector of docs/protocol.md section 8 is what PyJWT makes,
    and what the gate accepts.
    """

    def setUp(self):
        text = section(protocolText(), "8")
        chunk = text[text.index("JWT test vector") :]
        self.secret = re.search(r"secret `([^`]+)`", chunk).group(1).encode("ascii")
        self.uid = re.search(r"uid `([^`]+)`", chunk).group(1)
        self.exp = int(re.search(r"`exp` (\d+)", chunk).group(1))
        self.lines = dict(re.findall(r"^(header|payload|jwt):\s+(\S.*?)\s*$", chunk, re.MULTILINE))

    def test_vector(self):
        """
        The documented token is PyJWT's for the documented secret, uid and
        exp; its parts are the documented header and payload, and its
        signature the HMAC-SHA256 of the first two parts under the secret's
        bytes.
        """
        token = self.lines["jwt"]
        self.assertEqual(
            jwt.encode({"sub": self.uid, "exp": self.exp}, self.secret, algorithm="HS256"), token
        )
        header, payload, signature = token.split(".")
        self.assertEqual(unb64(header).decode(), self.lines["header"])
        self.assertEqual(unb64(payload).decode(), self.lines["payload"])
        mac = hmac.new(self.secret, (header + "." + payload).encode(), hashlib.sha256).digest()
        self.assertEqual(b64(mac), signature)
        self.assertEqual(len(self.secret), 32)

    def test_accepted(self):
        """
        The gate accepts the documented token for the uid until its exp.
        """
        clock = Clock()
        clock.advance(self.exp - 1)
        authenticator = TokenAuthenticator(self.secret, clock)
        self.assertEqual(
            self.successResultOf(authenticator.authenticate(self.uid, self.lines["jwt"])), self.uid
        )
        clock.advance(1)
        self.failureResultOf(authenticator.authenticate(self.uid, self.lines["jwt"]), AuthFailed)


class LiveGateTestCase(TestCase):
    """
    The real gate (L{tap.makeService}) on loopback TLS, accepting RS256
    JWTs of C{self.rsaKey}'s public key and HS256 ones of its secret.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        self.rsaKey = privateKey("rsa")
        keyFile = FilePath(self.mktemp())
        keyFile.setContent(publicPEM(self.rsaKey))
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--api",
                "none",
                "--store",
                "memory",
                "--jwt-public-key",
                keyFile.path,
            ]
        )
        root = startServer(self, options)
        self.factory = root.getServiceNamed("gate").factory
        self.watch = ConnectionWatch(self, self.factory)
        [address] = yield root.getServiceNamed("gate").addresses()
        self.port = address.port
        self.secret = loadSecret(self.dataDir, environ={})


class EndToEndTests(LiveGateTestCase):
    """
    The real client signing in with JWTs minted by PyJWT.
    """

    @inlineCallbacks
    def signIn(self, token, uid=UID):
        client = yield connect(
            reactor,
            "localhost",
            self.port,
            uid=uid,
            token=token,
            deviceId="laptop",
            caFile=self.dataDir.child(CERT_FILE_NAME).path,
        )
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def test_hs256(self):
        """
        A JWT signed HS256 with the bytes of the gate's secret file signs
        in; the session is the token's uid.
        """
        token = jwt.encode({"sub": UID, "exp": int(time.time()) + 60}, self.secret, "HS256")
        client = yield self.signIn(token)
        self.assertTrue(client.session.session_id)
        yield client.ping()
        yield client.close()
        yield self.watch.whenAllClosed()

    @inlineCallbacks
    def test_rs256(self):
        """
        A JWT signed RS256 with the private key of C{--jwt-public-key}
        signs in; one signed by another key is refused with AUTH_FAILED.
        """
        payload = {"sub": UID, "exp": int(time.time()) + 60}
        client = yield self.signIn(jwt.encode(payload, self.rsaKey, "RS256"))
        yield client.ping()
        yield client.close()
        other = privateKey("rsa", "b")
        error = yield self.assertFailure(
            self.signIn(jwt.encode(payload, other, "RS256")), RemoteError
        )
        self.assertEqual(error.code, pb.AUTH_FAILED)
        yield self.watch.whenAllClosed()
        self.assertEqual(self.factory.metrics.authFailures["jwt_bad_signature"], 1)


class RawClientTests(LiveGateTestCase):
    """
    JWTs through a client that is not imserver's: frames made by hand from
    docs/protocol.md over verified TLS.
    """

    def connectRaw(self):
        return connectRawTLS(self, self.port, self.dataDir.child(CERT_FILE_NAME))

    @inlineCallbacks
    def test_rawPipelined(self):
        """
        A raw client signs in with an RS256 JWT and pipelines a ping and a
        send right behind its auth, without waiting: three responses come
        back, matched by seq, in order.
        """
        client = yield self.connectRaw()
        token = jwt.encode({"sub": UID, "exp": int(time.time()) + 60}, self.rsaKey, "RS256")
        client.send(7, "auth", pb.AuthRequest(uid=UID, token=token, device_id="raw"))
        client.send(8, "ping", pb.PingRequest())
        client.send(9, "send", pb.SendRequest(to="bob", client_msg_id="r1", body=b"hi"))
        auth, ping, send = yield client.responses(3)
        self.assertEqual([f.kind for f in (auth, ping, send)], [pb.RESPONSE] * 3)
        self.assertEqual([f.seq for f in (auth, ping, send)], [7, 8, 9])
        self.assertFalse(any(f.HasField("error") for f in (auth, ping, send)))
        self.assertGreater(pb.AuthResponse.FromString(auth.body).heartbeat_interval_ms, 0)
        self.assertTrue(pb.SendResponse.FromString(send.body).message_id)

    @inlineCallbacks
    def test_rawExpired(self):
        """
        An expired JWT (beyond the leeway) gets a RESPONSE with
        C{AUTH_FAILED} (23) to the raw client's auth, then the close, and
        the request it pipelined behind is never answered.
        """
        client = yield self.connectRaw()
        token = jwt.encode({"sub": UID, "exp": int(time.time()) - 3600}, self.rsaKey, "RS256")
        client.send(1, "auth", pb.AuthRequest(uid=UID, token=token, device_id="raw"))
        client.send(2, "ping", pb.PingRequest())
        yield client.closed
        [answer] = client.frames
        self.assertEqual((answer.kind, answer.seq), (pb.RESPONSE, 1))
        self.assertEqual(answer.error.code, pb.AUTH_FAILED)
        self.assertEqual(pb.AUTH_FAILED, 23)
        self.assertEqual(self.factory.metrics.authFailures["jwt_expired"], 1)


class WebSocketTests(TestCase):
    """
    The web listener authenticates with the same JWTs.
    """

    timeout = 30

    @inlineCallbacks
    def test_jwt(self):
        """
        An RS256 JWT (some 700 bytes, far above the v1 limit of 256) and an
        HS256 one sign in over both
        WebSocket subprotocols; a tampered one gets AUTH_FAILED.
        """
        rsaKey = privateKey("rsa")
        keyFile = FilePath(self.mktemp())
        keyFile.setContent(publicPEM(rsaKey))
        gate = WebGate(self, "--jwt-public-key", keyFile.path)
        yield gate.ports()
        payload = {"sub": UID, "exp": int(time.time()) + 60, "email": "a@example.com" * 15}
        rs256 = jwt.encode(payload, rsaKey, "RS256", headers={"kid": "key-2026-12"})
        self.assertGreater(len(rs256), 600)
        for protocol, token in [(JSON, rs256), (PROTO, jwt.encode(payload, gate.secret, "HS256"))]:
            client = yield gate.ws(protocol=protocol)
            response = yield gate.auth(client, UID, device=protocol, token=token)
            if client.json:
                self.assertNotIn("error", response)
            else:
                self.assertFalse(response.HasField("error"))
        client = yield gate.ws()
        response = yield gate.auth(client, UID, token=rs256[:-4] + "AAAA")
        self.assertEqual(response["error"]["code"], "AUTH_FAILED")


class ApiTokenTests(LiveApiTestCase):
    """
    C{POST /v1/tokens} with C{"format": "jwt"}, on a gate requiring an
    audience and an issuer.
    """

    extraArgs = ("--jwt-audience", "chat", "--jwt-issuer", "backend")

    @inlineCallbacks
    def test_mintJWT(self):
        """
        The minted JWT is HS256 under the secret, carries the gate's
        audience and issuer, expires at C{expires_at}, and a real client
        signs in with it.
        """
        answer = yield self.ok(b"POST", "/v1/tokens", {"uid": "dave", "ttl": 120, "format": "jwt"})
        self.assertEqual(sorted(answer), ["expires_at", "token", "uid"])
        token = answer["token"]
        self.assertEqual(jwt.get_unverified_header(token)["alg"], "HS256")
        decoded = jwt.decode(
            token, self.secret, algorithms=["HS256"], audience="chat", issuer="backend"
        )
        self.assertEqual((decoded["sub"], decoded["exp"]), ("dave", answer["expires_at"]))
        client, _ = yield self.connectClient("dave", token=token)
        self.assertTrue(client.session.session_id)

    @inlineCallbacks
    def test_formats(self):
        """
        C{v1} mints a v1 token; any other format is 400.
        """
        answer = yield self.ok(b"POST", "/v1/tokens", {"uid": "dave", "format": "v1"})
        self.assertTrue(answer["token"].startswith("v1."))
        for value in ["JWT", "paseto", 5, ""]:
            yield self.fails(b"POST", "/v1/tokens", {"uid": "dave", "format": value})
