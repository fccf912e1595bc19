# -*- test-case-name: tests.test_rpc -*-
"""
Protocol errors as Python exceptions.

A responder raises L{RPCError} (or a subclass) to answer a request with an
error code; the RPC layer turns it into an error response.  On the calling
side an error response becomes a L{RemoteError} failure.
"""

from imserver.pb import im_pb2 as pb

ErrorCode = pb.ErrorCode


class RPCError(Exception):
    """
    An error with a protocol L{ErrorCode}, sent to the peer as is.

    @ivar code: an L{ErrorCode} value.
    @ivar message: human-readable detail; never put secrets in it.
    @ivar fatal: if true, the connection is closed after the error response.
    """

    code: "pb.ErrorCode" = pb.INTERNAL
    fatal: bool = False

    def __init__(
        self, message: str = "", code: "pb.ErrorCode | None" = None, fatal: bool | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if fatal is not None:
            self.fatal = fatal

    def __repr__(self) -> str:
        return "<{} {} {!r}>".format(type(self).__name__, ErrorCode.Name(self.code), self.message)

    __str__ = __repr__


class BadRequest(RPCError):
    code = pb.BAD_REQUEST


class UnknownMethod(RPCError):
    code = pb.UNKNOWN_METHOD


class NotAuthenticated(RPCError):
    code = pb.NOT_AUTHENTICATED


class AuthFailed(RPCError):
    """
    Authentication failed.  Every cause (bad signature, expired, foreign uid,
    malformed token) produces the same code and message, so a client learns
    nothing about which check failed.

    @ivar reason: which check failed, for the gate's metrics and logs only
        (a label of C{imserver_auth_failures_total}); never sent.
    """

    code = pb.AUTH_FAILED
    fatal = True

    def __init__(self, message: str = "authentication failed", reason: str = "bad_token") -> None:
        super().__init__(message)
        self.reason = reason


class AlreadyAuthenticated(RPCError):
    code = pb.ALREADY_AUTHENTICATED


class TooManyDevices(RPCError):
    code = pb.TOO_MANY_DEVICES
    fatal = True


class MessageTooLarge(RPCError):
    code = pb.MESSAGE_TOO_LARGE


class Unavailable(RPCError):
    """
    Storage is unavailable; the request may be retried later unchanged
    (a C{send} with the same C{client_msg_id}).
    """

    code = pb.UNAVAILABLE


class NotMember(RPCError):
    """
    The group does not exist, or the user is not a member of it (one answer
    for both, so a client learns nothing about groups it is not in).
    """

    code = pb.NOT_MEMBER


class RateLimited(RPCError):
    """
    Too many requests (or failed auths): slow down.
    """

    code = pb.RATE_LIMITED


class Rejected(RPCError):
    """
    The app backend's before-send check refused the message
    (L{imserver.beforesend}); the message is the backend's own text.
    """

    code = pb.REJECTED


class RemoteError(Exception):
    """
    The peer answered a request with an error response.

    @ivar code: the L{ErrorCode} the peer sent.
    @ivar message: the peer's detail text.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        try:
            name = ErrorCode.Name(self.code)
        except ValueError:
            name = str(self.code)
        return "{}: {}".format(name, self.message)


class RequestTimeout(Exception):
    """
    No response arrived within the request's timeout.  The request may or may
    not have been processed by the peer.
    """

    code = pb.TIMEOUT


class MalformedResponse(Exception):
    """
    The peer's response body does not parse as the method's response type
    (a peer speaking another version of the protocol, or a bug).
    """


class ConnectionClosedByPeer(Exception):
    """
    The peer sent an ERROR frame (and closed the connection).

    @ivar code: the L{ErrorCode} from the ERROR frame.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
