# -*- test-case-name: tests.test_websocket -*-
"""
The gate over WebSocket: one L{GateWebSocketProtocol} per upgraded
connection (autobahn's RFC 6455 implementation), the transport of its
L{imserver.session.GateSession} exactly as L{imserver.protocol.GateProtocol}
is over TCP.  A binary message carries one serialized frame
(C{imserver.v1.proto}), a text message one frame in the JSON form
(C{imserver.v1.json}, L{imserver.web.jsonframes}).

Everything above the frames (auth, limits, delivery, acks, kicks, the idle
sweep, shutdown) is the session's, shared with TCP; this module only moves
frames, relays flow control and closes within C{close_timeout}.
"""

import ipaddress
from collections import deque
from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from google.protobuf.message import DecodeError
from twisted.logger import Logger

from imserver.pb import im_pb2 as pb
from imserver.session import SocketChannel
from imserver.transport import closeBounded
from imserver.web.jsonframes import (
    JSON,
    JSON_EXPANSION,
    PROTO,
    SUBPROTOCOLS,
    JSONFrameEncoder,
    JSONFrameError,
    decodeFrame,
)

#: WebSocket close code of a normal close (after C{kicked}, a refused auth).
CLOSE_NORMAL = 1000
#: A connection closed after an ERROR frame is closed with this plus the
#: error's code (4005: IDLE_TIMEOUT), so a browser sees it in C{CloseEvent}.
CLOSE_ERROR_BASE = 4000

_log = Logger()
#: What autobahn keeps of the opening handshake after it.
_HANDSHAKE_LEFTOVERS = (
    "http_request_data",
    "http_headers",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "http_status_line",
    "http_response_data",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
)
_LOOPBACK_HOSTS = frozenset(["localhost", "127.0.0.1", "::1", "[::1]"])


def isLoopbackHost(host):
    """
    Whether C{host} (of an origin or a C{Host} header, no port) names this
    machine's loopback interface.
    """
    host = host.lower().strip("[]")
    if host in _LOOPBACK_HOSTS or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    """
    Which web pages may open a WebSocket to the gate (against cross-site
    WebSocket hijacking: a browser sends the page's origin, and a page of
    another site must not use the user's connection).

    Allowed: a request without an C{Origin} header (not a browser: native
    and command-line clients, which could send any origin anyway); the
    page's own origin (C{Origin} names the host and port the
    request was sent to); any loopback origin unless C{allowLoopback} is
    false; and each origin of C{allowed} (C{https://app.example.com}, or
    C{*} for any).

    @ivar allowed: origins allowed beside the same origin, normalised.
    """

    def __init__(self, allowed=(), allowLoopback=True):
        self.any = "*" in allowed
        self.allowed = frozenset(self.normalise(o) for o in allowed if o != "*")
        self.allowLoopback = allowLoopback

    @staticmethod
    def normalise(origin):
        """
        C{scheme://host[:port]} in lower case, default ports removed.

        @raise ValueError: if C{origin} is not such an origin.
        """
        parts = urlsplit(origin.strip().lower())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) origin: {!r}".format(origin))
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("an origin has no path: {!r}".format(origin))
        port = parts.port
        if port is None or port == {"http": 80, "https": 443}[parts.scheme]:
            netloc = parts.hostname
        else:
            netloc = "{}:{}".format(parts.hostname, port)
        if ":" in parts.hostname:
            netloc = netloc.replace(parts.hostname, "[{}]".format(parts.hostname), 1)
        return "{}://{}".format(parts.scheme, netloc)

    def allows(self, origin, host):
        """
        Whether a WebSocket request with header C{Origin: origin} sent to
        C{Host: host} is taken.

        @param origin: the header's value, or L{None} without one.
        """
        if origin is None or self.any:
            return True
        try:
            origin = self.normalise(origin)
        except ValueError:
            return False  # "null" (a sandboxed page, a file:), garbage
        if origin in self.allowed:
            return True
        if host is not None and urlsplit(origin).netloc == host.strip().lower():
            # The page's own host and port, whatever the scheme (as
            # Gorilla's checkSameOrigin): behind a TLS terminator the gate
            # sees http for an https page.
            return True
        if self.allowLoopback:
            return isLoopbackHost(urlsplit(origin).hostname or "")
        return False


#: autobahn's per-connection flags and timers in their idle state: class
#: attributes of L{GateWebSocketProtocol} (see L{GateWebSocketProtocol._compact}).
_IDLE_STATE = {
    "_perMessageCompress": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSent": None,
    "autoPingPendingSeq": 0,
    "autoPingTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "closedByMe": False,
    "current_frame": None,
    "droppedByMe": False,
    "failedByMe": False,
    "inside_message": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "trackedTimings": None,
    "triggered": False,
    "wasClean": False,
    "wasCloseHandshakeTimeout": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "wasNotCleanReason": None,
    "wasOpenHandshakeTimeout": False,
    "wasServerConnectionDropTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "send_queue": (),
}


class GateWebSocketProtocol(SocketChannel, WebSocketServerProtocol):  # type: ignore[misc]  # autobahn's own bases disagree on _transport_details
    """
    The WebSocket transport of one gate session: hands the session the
    frames of the client's messages, writes the session's frames as
    messages, relays the socket's flow control, and closes within
    C{close_timeout}.

    @ivar session: the L{GateSession}, from the upgrade on.
    @ivar subprotocol: L{PROTO} or L{JSON}, from the upgrade on.
    """

    # (Not a twisted.logger Logger as log: autobahn's own, whose debug
    # calls cost nothing below txaio's level, is self.log.)
    subprotocol = None
    _closing = False
    _encoder = None
    _maxFrameLength = 0

    locals().update(_IDLE_STATE)

    def __init__(self, gate, acceptedFrom):
        WebSocketServerProtocol.__init__(self)
        self.gate = gate
        self.acceptedFrom = acceptedFrom
        self._seconds = gate.clock.seconds
        self._metrics = gate.metrics

    def __repr__(self):
        return "<GateWebSocketProtocol {!r}>".format(self.session)

    @property
    def peer(self):
        """
        The client's address, as the transport gives it now (behind a
        C{haproxy:} listener, the PROXY header's source address).
        """
        if self.transport is None:
            return self.acceptedFrom
        return self.transport.getPeer()

    @peer.setter
    def peer(self, description):
        # autobahn's own description of the peer, for its log lines.
        pass

    # -- the session's view of the frame limit -------------------------------

    @property
    def maxFrameLength(self):
        return self._maxFrameLength

    @maxFrameLength.setter
    def maxFrameLength(self, length):
        self._maxFrameLength = length
        # Checked by autobahn as a message's frames arrive, before it is
        # buffered whole (_max_message_size_exceeded).
        self.maxMessagePayloadSize = length * JSON_EXPANSION if self._encoder else length

    # -- the upgrade ---------------------------------------------------------

    def onConnect(self, request):
        """
        Check the upgrade request: its origin, then the subprotocol.

        @raise ConnectionDeny: 403 for a page of a foreign origin, 400
            without a subprotocol of ours.
        """
        factory = self.factory
        origin = request.headers.get("origin")
        if not factory.origins.allows(origin, request.headers.get("host")):
            factory.refused("origin")
            _log.info(
                "refused a WebSocket from {peer}: origin {origin!r} not allowed",
                peer=self.peer,
                origin=origin,
            )
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        for offered in request.protocols:
            if offered in SUBPROTOCOLS:
                return offered
        factory.refused("subprotocol")
        raise ConnectionDeny(
            ConnectionDeny.BAD_REQUEST,
            "offer the subprotocol {} or {} in Sec-WebSocket-Protocol".format(PROTO, JSON),
        )

    def onOpen(self):
        """
        Upgraded: the gate session starts (auth deadline and all).
        """
        self.subprotocol = self.websocket_protocol_in_use
        self._compact()
        if self.subprotocol == JSON:
            self._encoder = JSONFrameEncoder()
        self.startSession(self.gate, self.acceptedFrom)

    def _compact(self):
        """
        Make an open connection's instance dictionary small (autobahn's
        holds about 90 entries, 3.3 KB, per connection): what autobahn keeps
        of the handshake is dropped (about 1.8 KB), and the entries equal to
        a class attribute (autobahn's copies of the factory's options, which
        L{GateWebSocketFactory} makes class attributes of its protocol, and
        the idle state of autobahn's flags and timers, L{_IDLE_STATE}) go,
        before the dictionary is rebuilt at its new size.  autobahn reads
        them through the class from then on, and sets them again on the
        instance when they change.
        """
        state = self.__dict__
        for name in _HANDSHAKE_LEFTOVERS:
            state.pop(name, None)
        cls = type(self)
        for name in list(state):
            if name in _IDLE_STATE or name in cls.__dict__:
                default = getattr(cls, name)
                value = state[name]
                if value is default or (type(value) is type(default) and value == default):
                    del state[name]
        if not self.send_queue:
            # Used only for sync and chopped sends, which the gate makes none
            # of (sendData makes one again if it ever does).
            del self.send_queue
        self.__dict__ = dict(state)

    # -- reading -------------------------------------------------------------

    def dataReceived(self, data):
        session = self.session
        if session is not None:
            # Any bytes (a message's part, a WebSocket ping) keep it alive.
            session.lastHeard = self._seconds()
            self._metrics.bytesReceived += len(data)
        self._dataReceived(data)

    def onMessageEnd(self):
        # autobahn's, without the "message" event it fires for observers
        # (a future per message; the gate has none).
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onMessage(self, payload, isBinary):
        session = self.session
        if session is None or self._closing:
            return
        self._metrics.framesReceived += 1
        encoder = self._encoder
        if encoder is None:
            if not isBinary:
                session.closeWithError(pb.BAD_FRAME, "a text message on " + PROTO)
                return
            if not payload:
                session.closeWithError(pb.EMPTY_FRAME, "an empty message")
                return
            frame = pb.Frame()
            try:
                frame.ParseFromString(payload)
            except DecodeError:
                session.closeWithError(pb.BAD_FRAME, "frame does not parse")
                return
        else:
            if isBinary:
                session.closeWithError(pb.BAD_FRAME, "a binary message on " + JSON)
                return
            try:
                frame = decodeFrame(payload)
            except JSONFrameError as e:
                session.closeWithError(pb.BAD_FRAME, str(e)[:200])
                return
            if frame.ByteSize() > self._maxFrameLength:
                session.closeWithError(
                    pb.FRAME_TOO_LARGE,
                    "frame of {} bytes exceeds the limit of {}".format(
                        frame.ByteSize(), self._maxFrameLength
                    ),
                )
                return
            if frame.kind == pb.REQUEST:
                encoder.requestReceived(frame)
        session.frameReceived(frame)

    def _max_message_size_exceeded(self, msg_size, max_msg_size, reason):
        # autobahn's hook for a message above maxMessagePayloadSize, called
        # as soon as its frame header says so: the ERROR frame of the
        # session instead of autobahn's bare close 1009.
        self.failedByMe = True  # autobahn keeps none of the rest
        if self.session is not None:
            self.session.closeWithError(
                pb.FRAME_TOO_LARGE,
                "message of {} bytes exceeds the limit of {}".format(msg_size, max_msg_size),
            )
        else:
            self._fail_connection(self.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG, reason)

    # -- writing -------------------------------------------------------------

    def sendData(self, data, sync=False, chopsize=None):
        # autobahn's common case (no sync or chopped sends, none queued)
        # without the arguments of a disabled debug log, evaluated on every
        # write, nor the traffic counters, which nothing reads here.
        if sync or chopsize or self.send_queue:
            if "send_queue" not in self.__dict__:
                self.send_queue = deque()
            WebSocketServerProtocol.sendData(self, data, sync, chopsize)
        else:
            self.transport.write(data)

    def writeFrame(self, data):
        if not self._closing and self.state == self.STATE_OPEN:
            metrics = self._metrics
            metrics.framesSent += 1
            encoder = self._encoder
            if encoder is None:
                metrics.bytesSent += len(data)
                self.sendMessage(data, True)
            else:
                text = encoder.encode(data).encode("utf-8")
                metrics.bytesSent += len(text)
                self.sendMessage(text, False)

    def writeMessage(self, encoded, seq, outgoing):
        """
        Write the C{message} push of inbox entry C{seq} of C{encoded} (an
        L{imserver.wire.EncodedMessage}).
        """
        if not self._closing and self.state == self.STATE_OPEN:
            encoder = self._encoder
            if encoder is None:
                data = encoded.frame(seq, outgoing)
                self.sendMessage(data, True)
            else:
                data = encoder.encodeMessage(encoded, seq, outgoing).encode("utf-8")
                self.sendMessage(data, False)
            metrics = self._metrics
            metrics.framesSent += 1
            metrics.bytesSent += len(data)

    # -- closing -------------------------------------------------------------

    def close(self):
        """
        Start the WebSocket closing handshake (code 4000 + the error code
        after an ERROR frame, else 1000) and abort the connection if it is
        still open C{close_timeout} later.
        """
        if self._closing:
            return
        self._closing = True
        code = self.session.errorCode if self.session is not None else None
        if self.state == self.STATE_OPEN:
            if code is None:
                self.sendClose(CLOSE_NORMAL)
            else:
                self.sendClose(CLOSE_ERROR_BASE + code, pb.ErrorCode.Name(code))
        self._boundClose()

    def _boundClose(self):
        if self._closeTimer is None and self.connected:
            self._closeTimer = self.gate.clock.callLater(
                self.gate.settings.close_timeout, self._closeTimedOut
            )

    def _fail_connection(self, code=1001, reason="going away"):
        # autobahn ends the connection by itself (a violation of RFC 6455,
        # invalid UTF-8): its close frame, then the session ends as for any
        # close the gate decides, within close_timeout.
        WebSocketServerProtocol._fail_connection(self, code, reason)
        self._closedByWebSocket()

    def onClose(self, wasClean, code, reason):
        # The closing handshake is under way or done (the client's close, or
        # autobahn's): the session ends now.
        self._closedByWebSocket()

    def _closedByWebSocket(self):
        if not self._closing:
            self._closing = True
            self._boundClose()
            if self.session is not None:
                self.session.close()

    def _closeTimedOut(self):
        self._closeTimer = None
        if self.connected:
            self.transport.abortConnection()

    def _closeConnection(self, abort=False):
        # autobahn's end of the connection (the closing handshake done, or a
        # violation): with none of autobahn's timers on, every abort it asks
        # for is "done, close now", so TCP is closed once the last frames
        # (its close frame) are written, without waiting for the peer's TLS
        # close_notify, and aborted at close_timeout (imserver.transport).
        self.unregisterProducer()
        timer = closeBounded(self, self.gate.clock, self.gate.settings.close_timeout)
        if timer is not None:
            self.cancelCloseTimer()
            self._closeTimer = timer

    def connectionLost(self, reason):
        self._closing = True
        WebSocketServerProtocol.connectionLost(self, reason)
        self.connected = 0
        self.cancelCloseTimer()
        if self.session is not None:
            self.session.connectionLost(reason)


def _classAttribute(value):
    """
    C{value} as a class attribute that reads back as C{value} from an
    instance: a function option (C{perMessageCompressionAccept}) must not
    become a method.
    """
    return staticmethod(value) if callable(value) else value


class GateWebSocketFactory(WebSocketServerFactory):
    """
    Builds the gate's WebSocket protocols (under L{imserver.web.WebSite}'s
    C{/ws}), with the gate's limits as autobahn's options.

    @ivar gate: the L{imserver.protocol.GateFactory}.
    @ivar origins: the L{OriginPolicy}.
    """

    protocol = GateWebSocketProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, gate, origins, refused=None):
        """
        @param refused: called with a reason when an upgrade is refused
            (origin, subprotocol), for the metrics.
        """
        settings = gate.settings
        WebSocketServerFactory.__init__(self, reactor=gate.clock)
        # autobahn's timers (none with these options) on the injected clock.
        self._batched_timer = txaio.with_config(loop=gate.clock).make_batched_timer(
            bucket_seconds=0.2, chunk_size=1000
        )
        self.gate = gate
        self.origins = origins
        self._refused = refused
        self.setProtocolOptions(
            # No timers of autobahn's: the request already came through
            # twisted.web (imserver.web.WebSite bounds it) and the handshake
            # is answered at once; a close is bounded by close_timeout
            # (GateWebSocketProtocol.close).
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            # Limits per message, set per connection (maxFrameLength).
            maxFramePayloadSize=0,
            maxMessagePayloadSize=settings.preauth_max_frame_length,
            autoFragmentSize=0,
            failByDrop=False,
            tcpNoDelay=True,
            perMessageCompressionAccept=None,
            utf8validateIncoming=True,
            requireMaskedClientFrames=True,
            webStatus=False,
            # RFC 6455 only, not the drafts autobahn also speaks.
            versions=[13],
        )
        # The protocol of this factory has its options as class attributes,
        # so that its connections need not hold copies (_compact); the
        # frame limit is per connection.
        self._protocol = type(
            self.protocol.__name__,
            (self.protocol,),
            {
                name: _classAttribute(getattr(self, name))
                for name in WebSocketServerProtocol.CONFIG_ATTRS
                if name != "maxMessagePayloadSize"
            },
        )

    def refused(self, reason):
        if self._refused is not None:
            self._refused(reason)

    def buildProtocol(self, addr):
        protocol = self._protocol(self.gate, addr)
        protocol.factory = self
        return protocol
