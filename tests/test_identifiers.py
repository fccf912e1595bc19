# -*- test-case-name: tests.test_identifiers -*-
"""
Tests for L{imserver.identifiers}: the shapes of identifiers and bounded
text fields, each refused with a L{BadRequest} that names the field.
"""

from twisted.trial.unittest import SynchronousTestCase

from imserver import auth, identifiers
from imserver.errors import BadRequest
from imserver.identifiers import (
    MAX_CLIENT_MSG_ID,
    MAX_CONTENT_TYPE,
    MAX_IDENTIFIER,
    validateClientMsgId,
    validateContentType,
    validateDeviceId,
    validateGroupId,
    validateLength,
    validateUid,
)
from imserver.pb import im_pb2 as pb

#: Values every identifier check refuses, and the end of the message.
BAD_IDENTIFIERS = [
    ("", "is empty"),
    ("é" * 65, "is longer than 128 bytes"),
    ("a\tb", "contains a control or line-separator character"),
    ("\x7f", "contains a control or line-separator character"),
    ("\x85", "contains a control or line-separator character"),
    ("a\u2028b", "contains a control or line-separator character"),
    ("a\u2029b", "contains a control or line-separator character"),
    ("a\ud800", "is not valid Unicode"),
]


class IdentifierTests(SynchronousTestCase):
    """
    L{validateUid}, L{validateDeviceId} and L{validateGroupId}.
    """

    def assertRefused(self, check, value, message):
        """
        C{check(value)} raises a L{BadRequest} with C{message}.
        """
        error = self.assertRaises(BadRequest, check, value)
        self.assertEqual((error.code, error.message), (pb.BAD_REQUEST, message))

    def test_accepted(self):
        """
        1 to 128 bytes of UTF-8 without control or separator characters,
        spaces and other scripts included.
        """
        for check in (validateUid, validateDeviceId, validateGroupId):
            for value in ("a", "é" * 64, "x" * MAX_IDENTIFIER, "alice smith", "用户"):
                self.assertIsNone(check(value))

    def test_refusedNamingTheField(self):
        """
        Every check refuses the same values, with a message naming its
        field.
        """
        for check, field in [
            (validateUid, "uid"),
            (validateDeviceId, "device_id"),
            (validateGroupId, "group_id"),
        ]:
            for value, why in BAD_IDENTIFIERS:
                self.assertRefused(check, value, "{} {}".format(field, why))

    def test_fieldGiven(self):
        """
        The caller may name the field that holds the identifier.
        """
        self.assertRefused(lambda v: validateUid(v, "owner"), "", "owner is empty")
        self.assertRefused(
            lambda v: validateGroupId(v, "--group"),
            "a\nb",
            "--group contains a control or line-separator character",
        )

    def test_authNames(self):
        """
        L{imserver.auth} still offers L{validateUid}, as the token checks
        use it.
        """
        self.assertIs(auth.validateUid, identifiers.validateUid)


class LengthTests(SynchronousTestCase):
    """
    L{validateLength}, L{validateClientMsgId} and L{validateContentType}.
    """

    def test_bytesNotCharacters(self):
        """
        The limit counts UTF-8 bytes.
        """
        validateLength("name", "é" * 5, 10)
        error = self.assertRaises(BadRequest, validateLength, "name", "é" * 5 + "a", 10)
        self.assertEqual(error.message, "name is longer than 10 bytes")

    def test_notUnicode(self):
        """
        A lone surrogate (what a command-line argument that is not UTF-8
        becomes) is refused, not an encoding error.
        """
        error = self.assertRaises(BadRequest, validateLength, "text", "\udcff", 10)
        self.assertEqual(error.message, "text is not valid Unicode")

    def test_clientMsgId(self):
        """
        A C{client_msg_id} is 1 to 64 bytes.
        """
        validateClientMsgId("x" * MAX_CLIENT_MSG_ID)
        for value, message in [
            ("", "client_msg_id is empty"),
            ("x" * 65, "client_msg_id is longer than 64 bytes"),
        ]:
            error = self.assertRaises(BadRequest, validateClientMsgId, value)
            self.assertEqual(error.message, message)

    def test_contentType(self):
        """
        A C{content_type} is at most 64 bytes, and may be empty.
        """
        validateContentType("")
        validateContentType("t" * MAX_CONTENT_TYPE)
        error = self.assertRaises(BadRequest, validateContentType, "t" * 65)
        self.assertEqual(error.message, "content_type is longer than 64 bytes")
