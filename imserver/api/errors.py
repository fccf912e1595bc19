# -*- test-case-name: tests.test_api -*-
"""
The error answers of the HTTP API: its codes (L{ERROR_CODES}), L{ApiError},
and L{toApiError}, the one place where an error of the logic layer becomes
an answer.

A malformed request raises L{imserver.errors.BadRequest} wherever it is
found (L{imserver.identifiers}, L{imserver.api.validation}, the request
body and path, the logic layer); L{toApiError} answers it 400
C{BAD_REQUEST} with its message.  L{ApiError} is for the answers only HTTP
has (401, 404, 405, 503 with C{Retry-After}, ...).
"""

from imserver.errors import RPCError
from imserver.pb import im_pb2 as pb
from imserver.store import GroupExists, GroupFull, GroupNotFound

#: Every error code of the API, with its HTTP status (docs/api.md lists
#: them; tests/test_api.py checks the list is the documented one).
ERROR_CODES = {
    "BAD_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "NOT_MEMBER": 403,
    "NOT_FOUND": 404,
    "GROUP_NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "GROUP_EXISTS": 409,
    "GROUP_FULL": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "MESSAGE_TOO_LARGE": 413,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}

#: The protocol errors (L{RPCError} codes) answered as themselves: protocol
#: code -> the API's code.  Any other L{RPCError} is an internal error.
_PROTOCOL_CODES = {
    pb.BAD_REQUEST: "BAD_REQUEST",
    pb.MESSAGE_TOO_LARGE: "MESSAGE_TOO_LARGE",
    pb.NOT_MEMBER: "NOT_MEMBER",
    pb.UNAVAILABLE: "UNAVAILABLE",
}


class ApiError(Exception):
    """
    An error answer: HTTP status, error code (a key of L{ERROR_CODES}) and
    message.  Never put a secret in the message.
    """

    def __init__(self, code, message, headers=()):
        Exception.__init__(self, code, message)
        self.code = code
        self.status = ERROR_CODES[code]
        self.message = message
        self.headers = list(headers)


def toApiError(failure, params):
    """
    Turn a handler's failure into an L{ApiError}: an L{ApiError} as it is,
    an error of the logic layer as its answer (L{imserver.errors.BadRequest}
    is C{BAD_REQUEST}, whoever raised it).

    @param params: the request's path parameters.
    @return: the L{ApiError}, or L{None} for anything else (an internal
        error).
    """
    error = failure.value
    groupId = params.get("group_id")
    if isinstance(error, ApiError):
        return error
    if isinstance(error, GroupNotFound):
        return ApiError(
            "GROUP_NOT_FOUND",
            "no group {!r}".format(groupId) if groupId is not None else "no such group",
        )
    if isinstance(error, GroupExists):
        return ApiError("GROUP_EXISTS", str(error) or "the group exists already")
    if isinstance(error, GroupFull):
        return ApiError("GROUP_FULL", str(error) or "the group would exceed its maximum size")
    if isinstance(error, RPCError):
        code = _PROTOCOL_CODES.get(error.code)
        if code is not None:
            headers = [(b"Retry-After", b"1")] if code == "UNAVAILABLE" else []
            return ApiError(code, error.message, headers)
    return None
