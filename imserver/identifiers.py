# -*- test-case-name: tests.test_identifiers -*-
"""
The shapes of the names and short strings a request carries: uids, device
ids, group ids, C{client_msg_id}, C{content_type} and the other bounded text
fields.

Every check raises L{BadRequest} with a message that names the field.  The
gate answers it as a C{BAD_REQUEST} response, the HTTP API as a 400
C{BAD_REQUEST} (L{imserver.api.errors.toApiError}), so no caller re-wraps it;
the command-line tools turn it into a usage error.
"""

import unicodedata

from imserver.errors import BadRequest

#: The longest uid, device id or group id, in UTF-8 bytes.
MAX_IDENTIFIER = 128
#: Longest client_msg_id, in UTF-8 bytes.
MAX_CLIENT_MSG_ID = 64
#: Longest content_type, in UTF-8 bytes.
MAX_CONTENT_TYPE = 64
#: Unicode categories refused in identifiers: control characters (C0, DEL,
#: C1), line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset(["Cc", "Zl", "Zp"])


def validateUid(uid: str, field: str = "uid") -> None:
    """
    Check the shape of a user id: 1 to 128 bytes of UTF-8 without control
    characters (Unicode category Cc) or line/paragraph separators (Zl, Zp).

    @param field: the name of the field that holds it, for the message.
    @raise BadRequest: if it is not.
    """
    _validateIdentifier(field, uid)


def validateDeviceId(deviceId: str, field: str = "device_id") -> None:
    """
    Check the shape of a device id (the rules of L{validateUid}).

    @raise BadRequest: if it is not.
    """
    _validateIdentifier(field, deviceId)


def validateGroupId(groupId: str, field: str = "group_id") -> None:
    """
    Check the shape of a group id (the rules of L{validateUid}, today).

    @raise BadRequest: if it is not.
    """
    _validateIdentifier(field, groupId)


def validateClientMsgId(clientMsgId: str) -> None:
    """
    Check a C{client_msg_id}: not empty, at most L{MAX_CLIENT_MSG_ID} bytes.

    @raise BadRequest: if it is not.
    """
    if not clientMsgId:
        raise BadRequest("client_msg_id is empty")
    validateLength("client_msg_id", clientMsgId, MAX_CLIENT_MSG_ID)


def validateContentType(contentType: str) -> None:
    """
    Check a C{content_type}: at most L{MAX_CONTENT_TYPE} bytes (empty is
    allowed).

    @raise BadRequest: if it is not.
    """
    validateLength("content_type", contentType, MAX_CONTENT_TYPE)


def validateLength(field: str, text: str, limit: int) -> None:
    """
    Check that C{text} is at most C{limit} bytes of UTF-8.

    @param field: the name of the field that holds it, for the message.
    @raise BadRequest: if it is longer, or not valid Unicode (a lone
        surrogate, as a command-line argument that is not UTF-8 becomes).
    """
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest("{} is not valid Unicode".format(field))
    if size > limit:
        raise BadRequest("{} is longer than {} bytes".format(field, limit))


def _validateIdentifier(field: str, value: str) -> None:
    if not value:
        raise BadRequest("{} is empty".format(field))
    validateLength(field, value, MAX_IDENTIFIER)
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise BadRequest("{} contains a control or line-separator character".format(field))
