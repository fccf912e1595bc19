"""
WebSocket clients for the tests of the web listener, written from
docs/protocol.md (section 17), not from the server's code: an autobahn
client speaking either subprotocol (L{WSClient}), and a raw HTTP client for
handshakes and requests the server must refuse (L{rawHTTP}).
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.filepath import FilePath

from imserver.pb import im_pb2 as pb

from tests.support.live import withDeadline

PROTO = "imserver.v1.proto"
JSON = "imserver.v1.json"


class WSClient(WebSocketClientProtocol):
    """
    A test client of the gate over WebSocket.  What it receives is kept in
    L{received} in order: L{pb.Frame}s on C{imserver.v1.proto}, decoded
    JSON objects on C{imserver.v1.json}.

    @ivar closeCode: the WebSocket close code, once closed.
    """

    closeCode = None
    closeReason = None

    def __init__(self):
        WebSocketClientProtocol.__init__(self)
        self.received = []
        self.opened = Deferred()
        self.closed = Deferred()
        self._waiting = []
        self._seq = 0

    @property
    def json(self):
        return self.websocket_protocol_in_use == JSON

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        if self.json:
            self.assertText(isBinary)
            item = json.loads(payload.decode("utf-8"))
        else:
            item = pb.Frame.FromString(payload) if isBinary else ("text", payload)
        self.received.append(item)
        self._check()

    def assertText(self, isBinary):
        if isBinary:
            raise AssertionError("a binary message on " + JSON)

    def onClose(self, wasClean, code, reason):
        self.closeCode = code
        self.closeReason = reason

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        if not self.opened.called:
            self.opened.errback(reason)
        self.closed.callback(self.closeCode)
        self._check()

    # -- waiting ---------------------------------------------------------------

    def next(self, predicate=lambda item: True, timeout=5.0, what="a frame"):
        """
        @return: a L{Deferred} firing with the first received item matching
            C{predicate} (taken out of L{received}), or failing after
            C{timeout} seconds or if the connection closes first.
        """
        d = Deferred()
        self._waiting.append((predicate, d))
        self._check()
        return withDeadline(d, timeout, what)

    def _check(self):
        for entry in list(self._waiting):
            predicate, d = entry
            if d.called:
                self._waiting.remove(entry)
                continue
            for item in self.received:
                if predicate(item):
                    self.received.remove(item)
                    self._waiting.remove(entry)
                    d.callback(item)
                    break
            else:
                if self.closed.called:
                    self._waiting.remove(entry)
                    d.errback(AssertionError("closed ({}) before {}".format(self.closeCode, d)))

    # -- sending -----------------------------------------------------------------

    def sendIMFrame(self, kind, method="", body=None, seq=0):
        """
        Send a frame: C{body} is a protobuf message on proto, a L{dict} on
        JSON.
        """
        if self.json:
            frame = {"kind": pb.Kind.Name(kind)}
            if seq:
                frame["seq"] = seq
            if method:
                frame["method"] = method
            if body is not None:
                frame["body"] = body
            self.sendMessage(json.dumps(frame).encode("utf-8"), False)
        else:
            frame = pb.Frame(kind=kind, seq=seq, method=method)
            if body is not None:
                frame.body = body.SerializeToString()
            self.sendMessage(frame.SerializeToString(), True)

    def call(self, method, body, timeout=5.0):
        """
        Send a request and wait for its response (an item as received).
        """
        self._seq += 1
        seq = self._seq
        self.sendIMFrame(pb.REQUEST, method, body, seq)
        return self.next(
            lambda item: self.kindOf(item) == pb.RESPONSE and self.seqOf(item) == seq,
            timeout,
            "the response to {} {}".format(method, seq),
        )

    def notify(self, method, body):
        self.sendIMFrame(pb.NOTIFY, method, body)

    def kindOf(self, item):
        if isinstance(item, tuple):
            return None
        if self.json:
            return pb.Kind.Value(item["kind"])
        return item.kind

    def seqOf(self, item):
        return item.get("seq", 0) if self.json else item.seq

    def methodOf(self, item):
        return item.get("method", "") if self.json else item.method

    def nextNotify(self, method, timeout=5.0):
        return self.next(
            lambda item: self.kindOf(item) == pb.NOTIFY and self.methodOf(item) == method,
            timeout,
            "a {} notify".format(method),
        )

    def nextError(self, timeout=5.0):
        return self.next(lambda item: self.kindOf(item) == pb.ERROR, timeout, "an ERROR frame")


def connectWS(port, protocols=(JSON,), origin=None, host="127.0.0.1", timeout=5.0, caFile=None):
    """
    Open a WebSocket to C{ws://host:port/ws} offering C{protocols}; with
    C{caFile} (the PEM certificate to trust), C{wss://}.

    @return: a L{Deferred} firing with the open L{WSClient}.
    """
    url = "{}://{}:{}/ws".format("ws" if caFile is None else "wss", host, port)
    factory = WebSocketClientFactory(url, protocols=list(protocols) or None, origin=origin)
    factory.protocol = WSClient
    # No autobahn timers (they outlive the test): withDeadline bounds it.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if caFile is not None:
        trustRoot = ssl.Certificate.loadPEM(FilePath(caFile).getContent())
        endpoint = wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trustRoot), endpoint)
    d = endpoint.connect(factory)
    d.addCallback(lambda client: client.opened)
    return withDeadline(d, timeout, "a WebSocket to " + url)


class Collect(Protocol):
    def __init__(self, request):
        self.request = request
        self.data = []
        self.done = Deferred()

    def connectionMade(self):
        if self.request:
            self.transport.write(self.request)

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.data))


def rawHTTP(port, request, host="127.0.0.1", timeout=5.0):
    """
    Send C{request} (bytes) and read until the server closes.

    @return: a L{Deferred} firing with C{(protocol, everything read)}.
    """
    protocol = Collect(request)
    d = connectProtocol(TCP4ClientEndpoint(reactor, host, port), protocol)
    d.addCallback(lambda p: p.done)
    d.addCallback(lambda data: (protocol, data))
    return withDeadline(d, timeout, "the server to close")


def upgradeRequest(path=b"/ws", protocols=(JSON,), origin=None, host=b"127.0.0.1", extra=b""):
    """
    The bytes of a WebSocket upgrade request (RFC 6455, section 4.1).
    """
    lines = [
        b"GET " + path + b" HTTP/1.1",
        b"Host: " + host,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(protocols).encode("ascii"))
    if origin is not None:
        lines.append(b"Origin: " + origin)
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"
