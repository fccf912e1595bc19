# -*- test-case-name: tests.test_api -*-
"""
The fields of the API's JSON request bodies, and its C{Idempotency-Key}
header: types, required and unknown fields, the message payload.

Like L{imserver.identifiers}, whose checks they apply to the identifier
fields, these raise L{BadRequest} naming the field (and L{MessageTooLarge}
for a payload over the limit); L{imserver.api.errors.toApiError} answers
them.
"""

import base64

from imserver.errors import BadRequest, MessageTooLarge
from imserver.identifiers import (
    validateContentType,
    validateDeviceId,
    validateGroupId,
    validateUid,
)


def checkFields(body, allowed):
    """
    Refuse fields not in C{allowed}; return C{body} without its C{null}
    values (a null field is an absent one).
    """
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequest("unknown field(s): {}".format(", ".join(unknown)))
    return {name: value for name, value in body.items() if value is not None}


def requiredField(body, name):
    """
    @return: the value of the field C{name}, which must be there.
    """
    if name not in body:
        raise BadRequest("{} is required".format(name))
    return body[name]


def stringValue(value, name):
    """
    @return: C{value}, a string that can be encoded as UTF-8.
    """
    if not isinstance(value, str):
        raise BadRequest("{} must be a string".format(name))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("{} is not valid Unicode".format(name))
    return value


def optionalString(body, name, default=""):
    """
    @return: the string field C{name}, or C{default} if absent.
    """
    if name not in body:
        return default
    return stringValue(body[name], name)


def uidValue(value, name="uid"):
    """
    @return: C{value}, a string and a valid uid.
    """
    validateUid(stringValue(value, name), name)
    return value


def groupIdValue(value, name="group_id"):
    """
    @return: C{value}, a string and a valid group id.
    """
    validateGroupId(stringValue(value, name), name)
    return value


def deviceIdValue(value, name="device_id"):
    """
    @return: C{value}, a string and a valid device id.
    """
    validateDeviceId(stringValue(value, name), name)
    return value


def integerField(body, name, default, minimum, maximum):
    """
    @return: the integer field C{name}, between C{minimum} and C{maximum},
        or C{default} if absent.
    """
    if name not in body:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("{} must be an integer".format(name))
    if not minimum <= value <= maximum:
        raise BadRequest("{} must be between {} and {}".format(name, minimum, maximum))
    return value


def messagePayload(body, maxBytes):
    """
    The message body: C{text} (sent as its UTF-8 bytes) or C{body_b64}
    (standard base64), exactly one.

    @raise MessageTooLarge: if it is longer than C{maxBytes}.
    """
    if ("text" in body) == ("body_b64" in body):
        raise BadRequest("give exactly one of text and body_b64")
    if "text" in body:
        payload = stringValue(body["text"], "text").encode("utf-8")
    else:
        encoded = stringValue(body["body_b64"], "body_b64")
        try:
            payload = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise BadRequest("body_b64 is not valid base64")
    if len(payload) > maxBytes:
        raise MessageTooLarge(
            "body of {} bytes exceeds the limit of {}".format(len(payload), maxBytes)
        )
    return payload


def contentTypeField(body):
    """
    @return: the field C{content_type}, C{""} if absent.
    """
    contentType = optionalString(body, "content_type")
    validateContentType(contentType)
    return contentType


def idempotencyKey(request):
    """
    @return: the one C{Idempotency-Key} header of C{request}, stripped.
    """
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values:
        raise BadRequest("the Idempotency-Key header is required")
    if len(values) > 1:
        raise BadRequest("give one Idempotency-Key header")
    try:
        key = values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadRequest("Idempotency-Key is not UTF-8")
    if not key:
        raise BadRequest("Idempotency-Key is empty")
    return key
