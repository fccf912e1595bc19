# -*- test-case-name: tests.test_auth -*-
"""
Tests for L{imserver.auth}: v1 tokens, the authenticator and the secret
(JWTs: tests/test_jwt.py).
"""

import base64
import hashlib
import hmac
import os
import stat

from twisted.internet.testing import Clock
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imserver.auth import (
    DEFAULT_MAX_TOKEN_LENGTH,
    TokenAuthenticator,
    loadSecret,
    mintToken,
    validateUid,
    verifyToken,
)
from imserver.errors import AuthFailed, BadRequest
from imserver.interfaces import IAuthenticator

SECRET = b"s" * 32
NOW = 1_700_000_000


class TokenTests(SynchronousTestCase):
    """
    L{mintToken} and L{verifyToken}.
    """

    def test_roundTrip(self):
        """
        A minted token verifies for its uid until its expiry, exclusive.
        """
        token = mintToken(SECRET, "alice", 60, NOW)
        self.assertTrue(verifyToken(SECRET, "alice", token, NOW))
        self.assertTrue(verifyToken(SECRET, "alice", token, NOW + 59.9))
        self.assertFalse(verifyToken(SECRET, "alice", token, NOW + 60))

    def test_format(self):
        """
        The token is C{v1.<expiry>.<base64url HMAC-SHA256>} as documented.
        """
        token = mintToken(SECRET, "alice", 60, NOW)
        mac = hmac.new(SECRET, b"imserver-token-v1\nalice\n1700000060", hashlib.sha256).digest()
        self.assertEqual(
            token, "v1.1700000060." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        )

    def test_otherUid(self):
        """
        A token does not verify for another uid.
        """
        self.assertFalse(verifyToken(SECRET, "bob", mintToken(SECRET, "alice", 60, NOW), NOW))

    def test_otherSecret(self):
        """
        A token signed with another secret does not verify.
        """
        self.assertFalse(verifyToken(SECRET, "alice", mintToken(b"t" * 32, "alice", 60, NOW), NOW))

    def test_tampered(self):
        """
        Changing the expiry or the signature invalidates the token.
        """
        version, expiry, sig = mintToken(SECRET, "alice", 60, NOW).split(".")
        self.assertFalse(
            verifyToken(SECRET, "alice", ".".join([version, str(int(expiry) + 1000), sig]), NOW)
        )
        self.assertFalse(
            verifyToken(SECRET, "alice", ".".join([version, expiry, sig[:-1] + "A"]), NOW)
        )

    def test_malformed(self):
        """
        Malformed tokens are refused without raising.
        """
        for token in [
            "",
            "v1",
            "v1..",
            "v2.1.x",
            "v1.-5.x",
            "v1.1e9.x",
            "v1.١٢٣.x",
            "v1.1.x.y",
            "v1.1." + "x" * 300,
            "v1.1.\u00e9",
        ]:
            self.assertFalse(verifyToken(SECRET, "alice", token, NOW), token)

    def test_ttl(self):
        """
        A TTL below one second is refused.
        """
        self.assertRaises(ValueError, mintToken, SECRET, "alice", 0, NOW)

    def test_uidShape(self):
        """
        Uids are 1 to 128 bytes of UTF-8 without control characters.
        """
        validateUid("a")
        validateUid("é" * 64)
        for bad in ["", "é" * 65, "a\tb", "\x7f"]:
            self.assertRaises(BadRequest, validateUid, bad)


class AuthenticatorTests(SynchronousTestCase):
    """
    L{TokenAuthenticator}.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.authenticator = TokenAuthenticator(SECRET, self.clock)

    def test_interface(self):
        """
        It provides L{IAuthenticator}.
        """
        verifyObject(IAuthenticator, self.authenticator)

    def test_accepts(self):
        """
        A valid token fires with the uid.
        """
        token = mintToken(SECRET, "alice", 60, NOW)
        self.assertEqual(
            self.successResultOf(self.authenticator.authenticate("alice", token)), "alice"
        )

    def test_refusesUsingClock(self):
        """
        Expiry is judged by the injected clock; every failure is the same
        L{AuthFailed}.
        """
        token = mintToken(SECRET, "alice", 60, NOW)
        self.clock.advance(60)
        first = self.failureResultOf(self.authenticator.authenticate("alice", token), AuthFailed)
        second = self.failureResultOf(self.authenticator.authenticate("bob", "junk"), AuthFailed)
        self.assertEqual(str(first.value), str(second.value))

    def test_secretNotInRepr(self):
        """
        The secret does not appear in the authenticator's repr.
        """
        self.assertNotIn("sss", repr(self.authenticator))


class SecretTests(SynchronousTestCase):
    """
    L{loadSecret}.
    """

    def setUp(self):
        self.dataDir = FilePath(self.mktemp())

    def test_generated(self):
        """
        Without a file or environment variable, a secret is generated into
        the data dir with mode 0600 and reused afterwards.
        """
        secret = loadSecret(self.dataDir, environ={})
        self.assertEqual(len(secret), 64)
        path = self.dataDir.child("secret")
        self.assertEqual(stat.S_IMODE(os.stat(path.path).st_mode), 0o600)
        self.assertEqual(loadSecret(self.dataDir, environ={}), secret)

    def test_fileFirst(self):
        """
        A secret file wins over the environment and the data dir.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"from-the-file-0123456789\n")
        self.assertEqual(
            loadSecret(self.dataDir, path, environ={"IMSERVER_SECRET": "x" * 20}),
            b"from-the-file-0123456789",
        )
        self.assertFalse(self.dataDir.exists())

    def test_environment(self):
        """
        C{$IMSERVER_SECRET} wins over the data dir.
        """
        self.assertEqual(loadSecret(self.dataDir, environ={"IMSERVER_SECRET": "e" * 20}), b"e" * 20)

    def test_tooShort(self):
        """
        A secret under 16 bytes is refused.
        """
        self.assertRaises(
            ValueError, loadSecret, self.dataDir, environ={"IMSERVER_SECRET": "short"}
        )

    def test_unreadableSecretFile(self):
        """
        A secret file that cannot be read is a L{ValueError} naming it.
        """
        error = self.assertRaises(
            ValueError, loadSecret, self.dataDir, FilePath(self.mktemp()), environ={}
        )
        self.assertIn("cannot read the secret file", str(error))


class FormTests(SynchronousTestCase):
    """
    L{TokenAuthenticator} tells the token forms apart by their start and
    gives every refusal the same L{AuthFailed}, with a reason for the
    metrics.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def reason(self, authenticator, token, uid="alice"):
        """
        @return: the reason of the L{AuthFailed} C{token} gets.
        """
        failure = self.failureResultOf(authenticator.authenticate(uid, token), AuthFailed)
        self.assertEqual(str(failure.value), str(AuthFailed()))
        return failure.value.reason

    def test_reasons(self):
        """
        A refused v1 token or a token of no known form is C{bad_token}; a
        JWT is refused by the JWT verifier (C{jwt_*}); any token above the
        length limit is C{token_too_long} without being looked at.
        """
        authenticator = TokenAuthenticator(SECRET, self.clock, maxTokenLength=100)
        self.assertEqual(self.reason(authenticator, mintToken(SECRET, "bob", 60, NOW)), "bad_token")
        self.assertEqual(self.reason(authenticator, "junk"), "bad_token")
        self.assertEqual(self.reason(authenticator, "eyJhbGciOiJub25lIn0.e30."), "jwt_algorithm")
        self.assertEqual(self.reason(authenticator, "v1." + "1" * 98), "token_too_long")
        self.assertEqual(self.reason(authenticator, "é"), "bad_token")

    def test_lengthLimit(self):
        """
        The limit applies to the token as given: one at the limit is
        checked, and the default limit is 2048.
        """
        token = mintToken(SECRET, "alice", 60, NOW)
        self.assertEqual(DEFAULT_MAX_TOKEN_LENGTH, 2048)
        authenticator = TokenAuthenticator(SECRET, self.clock, maxTokenLength=len(token))
        self.assertEqual(self.successResultOf(authenticator.authenticate("alice", token)), "alice")
        authenticator = TokenAuthenticator(SECRET, self.clock, maxTokenLength=len(token) - 1)
        self.assertEqual(self.reason(authenticator, token), "token_too_long")

    def test_defaultReason(self):
        """
        An L{AuthFailed} made without a reason is C{bad_token}, and its
        reason is not in its text.
        """
        self.assertEqual(AuthFailed().reason, "bad_token")
        self.assertNotIn("jwt", str(AuthFailed(reason="jwt_expired")))
