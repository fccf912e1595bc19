# -*- test-case-name: tests.test_rpc -*-
"""
A symmetric request/response/notify layer over L{imserver.framing}.

Modelled on AMP's C{BoxDispatcher}: both ends of a connection can call
methods on the other.  Outgoing requests map a seq to a L{Deferred} that
fires with the response, fails with L{RemoteError} on an error response,
with L{RequestTimeout} when no response arrives in time, and with the
connection's close reason when the connection goes away first.

Incoming requests are routed through a table of L{Method} -> responder built
from methods decorated with L{Method.responder}; incoming notifies through
L{Notification.handler}.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from google.protobuf.message import DecodeError, Message as _Message
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import (
    ConnectionClosedByPeer,
    MalformedResponse,
    RemoteError,
    RequestTimeout,
    RPCError,
    UnknownMethod,
)
from imserver.framing import FrameProtocol
from imserver.pb import im_pb2 as pb
from imserver.wire import (
    encodeErrorResponse,
    encodeNotify,
    encodeRequest,
    encodeResponse,
    notifyPrefix,
)

_SEQ_MODULUS = 1 << 32

_REQUEST = pb.REQUEST
_RESPONSE = pb.RESPONSE
_NOTIFY = pb.NOTIFY
_ERROR = pb.ERROR

#: A responder or notification handler: called as C{function(protocol,
#: message)}.
_Function = Callable[..., Any]
_F = TypeVar("_F", bound=_Function)


class Method:
    """
    Declares a request method: its name on the wire and its message types.

    @ivar name: the method name carried in the frame.
    @ivar requestType: the protobuf class of the request body.
    @ivar responseType: the protobuf class of the response body.
    """

    def __init__(
        self, name: str, requestType: type[_Message], responseType: type[_Message]
    ) -> None:
        self.name = name
        self.requestType = requestType
        self.responseType = responseType

    def responder(self, function: _F) -> _F:
        """
        Decorate a method of an L{RPCProtocol} subclass as the responder for
        this method.  It is called with the parsed request and returns the
        response message or a L{Deferred} firing with it; raising
        L{RPCError} answers with that error.
        """
        function._rpcMethod = self  # type: ignore[attr-defined]
        return function

    def __repr__(self) -> str:
        return "<Method {}>".format(self.name)


class Notification:
    """
    Declares a one-way notification: its name on the wire and message type.
    """

    def __init__(self, name: str, messageType: type[_Message]) -> None:
        self.name = name
        self.messageType = messageType
        #: The start of every frame of this notification (L{notifyPrefix}).
        self.prefix = notifyPrefix(name)

    def handler(self, function: _F) -> _F:
        """
        Decorate a method of an L{RPCProtocol} subclass as the handler for
        this notification.
        """
        function._rpcNotification = self  # type: ignore[attr-defined]
        return function

    def __repr__(self) -> str:
        return "<Notification {}>".format(self.name)


class RPCDispatcher:
    """
    Request/response/notify over frames, symmetric for client and server,
    and independent of any transport (AMP's C{BoxDispatcher}).

    Subclasses declare responders with L{Method.responder} and notification
    handlers with L{Notification.handler}; the tables are built once per
    class, not per connection.  What carries the frames is supplied by the
    class it is combined with: C{writeFrame(data)} (one serialized frame),
    C{closeWithError(code, message, seq)} and C{close()}; the transport
    hands over each decoded frame to L{frameReceived} and calls
    L{connectionLost} at the end.

    @ivar responders: C{{name: (Method, function)}} for this class.
    @ivar notificationHandlers: C{{name: (Notification, function)}}.
    @ivar requestTimeout: default seconds before an outgoing request fails
        with L{RequestTimeout}.
    """

    log = Logger()
    responders: dict[str, tuple[Method, _Function]] = {}
    notificationHandlers: dict[str, tuple[Notification, _Function]] = {}
    requestTimeout = 30.0
    #: Names the connection in log events.
    connectionId = "-"
    _closing = False
    _ignoredLogged = False

    if TYPE_CHECKING:
        # Supplied by the transport class combined with this one.
        def writeFrame(self, data: bytes) -> None: ...

        def closeWithError(self, code: pb.ErrorCode, message: str, seq: int = 0) -> None: ...

        def close(self) -> None: ...

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        responders = dict(cls.responders)
        handlers = dict(cls.notificationHandlers)
        for value in vars(cls).values():
            method = getattr(value, "_rpcMethod", None)
            if method is not None:
                responders[method.name] = (method, value)
            notification = getattr(value, "_rpcNotification", None)
            if notification is not None:
                handlers[notification.name] = (notification, value)
        cls.responders = responders
        cls.notificationHandlers = handlers

    def __init__(self, clock: IReactorTime) -> None:
        """
        @param clock: an L{IReactorTime} for request timeouts.
        """
        self.clock = clock
        self._outstanding: dict[int, tuple[Deferred[Any], IDelayedCall, Method]] = {}
        self._lastSeq = 0
        self._failAllReason: Failure | None = None
        self._incoming: set[int] | None = None
        self._peerError: ConnectionClosedByPeer | None = None

    # -- outgoing -------------------------------------------------------

    def callRemote(
        self, method: Method, request: _Message, timeout: float | None = None
    ) -> Deferred[Any]:
        """
        Send a request and return a L{Deferred} for its response.

        @param method: a L{Method}.
        @param request: an instance of C{method.requestType}.
        @param timeout: seconds, or L{None} for L{requestTimeout}.
        @return: a L{Deferred} firing with a C{method.responseType}, or
            failing with L{RemoteError}, L{RequestTimeout}, or the reason
            the connection was lost.
        """
        if self._failAllReason is not None:
            return fail(self._failAllReason)
        seq = self._nextSeq()
        d: Deferred[Any] = Deferred(lambda d: self._forget(seq))
        timer = self.clock.callLater(
            self.requestTimeout if timeout is None else timeout, self._timedOut, seq
        )
        self._outstanding[seq] = (d, timer, method)
        self.writeFrame(encodeRequest(seq, method.name, request.SerializeToString()))
        return d

    def sendNotify(self, notification: Notification, message: _Message) -> None:
        """
        Send a one-way notification.

        @param notification: a L{Notification}.
        @param message: an instance of C{notification.messageType}.
        """
        self.writeFrame(encodeNotify(notification.prefix, message.SerializeToString()))

    def _nextSeq(self) -> int:
        seq = self._lastSeq
        outstanding = self._outstanding
        while True:
            seq = (seq + 1) % _SEQ_MODULUS
            if seq and seq not in outstanding:
                self._lastSeq = seq
                return seq

    def _forget(self, seq: int) -> None:
        entry = self._outstanding.pop(seq, None)
        if entry is not None and entry[1].active():
            entry[1].cancel()

    def _timedOut(self, seq: int) -> None:
        entry = self._outstanding.pop(seq, None)
        if entry is not None:
            entry[0].errback(
                RequestTimeout("no response to {} (seq {})".format(entry[2].name, seq))
            )

    def failAllOutgoing(self, reason: Failure) -> None:
        """
        Fail every outstanding request with C{reason}, and every later call
        at once.  The table is swapped out before any errback runs, so
        errbacks may safely call L{callRemote}.

        @type reason: L{Failure}
        """
        self._failAllReason = reason
        outstanding, self._outstanding = self._outstanding, {}
        for d, timer, _method in outstanding.values():
            if timer.active():
                timer.cancel()
            d.errback(reason)

    # -- incoming -------------------------------------------------------

    def frameReceived(self, frame: pb.Frame) -> None:
        kind = frame.kind
        if kind == _REQUEST:
            self._requestReceived(frame)
        elif kind == _RESPONSE:
            self._responseReceived(frame)
        elif kind == _NOTIFY:
            self._notifyReceived(frame)
        elif kind == _ERROR:
            self._errorReceived(frame)
        else:
            self.closeWithError(pb.BAD_FRAME, "unknown frame kind {}".format(kind))

    def locateResponder(self, name: str) -> tuple[Method, _Function]:
        """
        Find the responder for method C{name}.  Subclasses override this to
        restrict what is allowed in a connection state.

        @return: C{(Method, function)}
        @raise RPCError: when there is none (L{UnknownMethod} here).
        """
        entry = self.responders.get(name)
        if entry is None:
            raise UnknownMethod("unknown method {!r}".format(name[:64]))
        return entry

    def _requestReceived(self, frame: pb.Frame) -> None:
        seq = frame.seq
        incoming = self._incoming
        if seq == 0 or (incoming is not None and seq in incoming):
            self.closeWithError(
                pb.DUPLICATE_SEQ,
                "request seq {} is zero or still outstanding".format(seq),
                seq,
            )
            return
        if not self.requestAdmitted(seq):
            return
        try:
            method, function = self.locateResponder(frame.method)
            request = method.requestType()
            try:
                request.ParseFromString(frame.body)
            except DecodeError:
                raise RPCError(
                    "body of {} does not parse".format(method.name),
                    code=pb.BAD_REQUEST,
                )
            result = function(self, request)
        except RPCError as e:
            self._sendError(seq, e)
            return
        except Exception:
            self._internalError(seq, Failure())
            return
        if isinstance(result, _Message):
            self._sendResult(seq, result)
            self.responseSent(method, result)
        else:
            if incoming is None:
                incoming = self._incoming = set()
            incoming.add(seq)
            result.addCallbacks(self._asyncResult, self._asyncFailure, (seq, method), None, (seq,))

    def requestAdmitted(self, seq: int) -> bool:
        """
        Called for each request with a valid seq, before it is dispatched.
        Subclasses override it to refuse requests (a rate limit): they
        answer the request themselves and return L{False}.

        @return: whether to dispatch it.
        """
        return True

    def responseSent(self, method: Method, response: _Message) -> None:
        """
        Called after a successful response to C{method} was written.
        Subclasses override it to act only once the peer has (in stream
        order) its answer, such as starting pushes after C{auth}.
        """

    def _asyncResult(self, result: _Message, seq: int, method: Method) -> None:
        self._incoming.discard(seq)  # type: ignore[union-attr]
        self._sendResult(seq, result)
        self.responseSent(method, result)

    def _asyncFailure(self, failure: Failure, seq: int) -> None:
        self._incoming.discard(seq)  # type: ignore[union-attr]
        if failure.check(RPCError):
            self._sendError(seq, cast(RPCError, failure.value))
        else:
            self._internalError(seq, failure)

    def _sendResult(self, seq: int, result: _Message) -> None:
        self.writeFrame(encodeResponse(seq, result.SerializeToString()))

    def _sendError(self, seq: int, error: RPCError) -> None:
        self.writeFrame(encodeErrorResponse(seq, error.code, error.message))
        if error.fatal:
            self.close()

    def _internalError(self, seq: int, failure: Failure) -> None:
        self.log.failure(
            "unexpected error answering seq {seq} on connection {conn}",
            failure,
            seq=seq,
            conn=self.connectionId,
        )
        self._sendError(seq, RPCError("internal error", code=pb.INTERNAL))

    def _responseReceived(self, frame: pb.Frame) -> None:
        entry = self._outstanding.pop(frame.seq, None)
        if entry is None:
            self._ignored(
                "response for unknown seq {seq} on connection {conn} dropped",
                seq=frame.seq,
            )
            return
        d, timer, method = entry
        timer.cancel()
        if frame.HasField("error"):
            d.errback(RemoteError(frame.error.code, frame.error.message))
            return
        response = method.responseType()
        try:
            response.ParseFromString(frame.body)
        except DecodeError:
            d.errback(MalformedResponse("response to {} does not parse".format(method.name)))
            return
        d.callback(response)

    def locateNotificationHandler(self, name: str) -> tuple[Notification, _Function] | None:
        """
        Find the handler for notification C{name}.  Subclasses override this
        to restrict what is accepted in a connection state.

        @return: C{(Notification, function)}, or L{None} to ignore it.
        """
        return self.notificationHandlers.get(name)

    def _notifyReceived(self, frame: pb.Frame) -> None:
        entry = self.locateNotificationHandler(frame.method)
        if entry is None:
            self._ignored(
                "ignoring notification {name!r} on connection {conn}",
                name=frame.method[:64],
            )
            return
        notification, function = entry
        message = notification.messageType()
        try:
            message.ParseFromString(frame.body)
        except DecodeError:
            self._ignored(
                "ignoring notification {name} with a body that does not parse on connection {conn}",
                name=notification.name,
            )
            return
        try:
            function(self, message)
        except Exception:
            self.log.failure(
                "handler for notification {name} failed on connection {conn}",
                name=notification.name,
                conn=self.connectionId,
            )

    def _ignored(self, format: str, **fields: Any) -> None:
        """
        Log a frame dropped as meaningless (the protocol ignores it, for
        compatibility), once per connection: a peer must not be able to
        write a log line per few bytes it sends.
        """
        if self._ignoredLogged:
            return
        self._ignoredLogged = True
        self.log.info(
            format + " (more such frames on it are dropped silently)",
            conn=self.connectionId,
            **fields,
        )

    def _errorReceived(self, frame: pb.Frame) -> None:
        self._peerError = ConnectionClosedByPeer(frame.error.code, frame.error.message)
        self.log.info(
            "peer closed connection {conn}: {code} {detail}",
            conn=self.connectionId,
            code=pb.ErrorCode.Name(frame.error.code)
            if frame.error.code in pb.ErrorCode.values()
            else frame.error.code,
            detail=frame.error.message[:200],
        )
        self.close()

    def connectionLost(self, reason: Failure) -> None:
        # Twisted's Protocol leaves `connected` at 1 forever; make it true
        # to its name for everything built on this class.
        self.connected = 0
        self._closing = True
        if self._peerError is not None:
            reason = Failure(self._peerError)
        self.failAllOutgoing(reason)


# misc: Protocol.connectionLost has a default reason, the dispatcher's
# does not (the transport always passes one).
class RPCProtocol(RPCDispatcher, FrameProtocol):  # type: ignore[misc]
    """
    An L{RPCDispatcher} over the length-prefixed TCP framing (the client
    library's connection).
    """
