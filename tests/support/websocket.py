"""
WebSocket clients for the tests of the web listener, written from
docs/protocol.md (section 17), not from the server's code: an autobahn
client speaking either subprotocol (L{WSClient}), a raw HTTP client for
handshakes and requests the server must refuse (L{rawHTTP}), and the
pieces of a raw WebSocket client that sends what autobahn would not
(L{upgradeRequest}, L{parseResponseHead}, L{clientFrame},
L{readServerFrame}; the malformed-input suite's).
"""

import base64
import hashlib
import json
from dataclasses import dataclass

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.filepath import FilePath

from imserver.pb import im_pb2 as pb
from imserver.transport import noDelay

from tests.support.live import withDeadline

PROTO = "imserver.v1.proto"
JSON = "imserver.v1.json"
#: The C{Sec-WebSocket-Key} of every request built here (RFC 6455's example).
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class WSClient(WebSocketClientProtocol):
    """
    A test client of the gate over WebSocket.  What it receives is kept in
    L{received} in order: L{pb.Frame}s on C{imserver.v1.proto}, decoded
    JSON objects on C{imserver.v1.json}.

    @ivar closeCode: the WebSocket close code, once closed.
    @ivar onNotify: if set, called with each NOTIFY received instead of
        keeping it in L{received}.
    """

    closeCode = None
    closeReason = None
    onNotify = None

    def __init__(self):
        WebSocketClientProtocol.__init__(self)
        self.received = []
        self.opened = Deferred()
        self.closed = Deferred()
        self._waiting = []
        self._seq = 0

    def connectionMade(self):
        # autobahn turns Nagle's algorithm off from an option it copies only
        # later (and swallows the error): without this, a small message
        # waits behind an unacknowledged one for the peer's delayed ACK.
        noDelay(self.transport)
        WebSocketClientProtocol.connectionMade(self)

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
        if self.onNotify is not None and self.kindOf(item) == pb.NOTIFY:
            self.onNotify(item)
            return
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


def connectWS(
    port,
    protocols=(JSON,),
    origin=None,
    host="127.0.0.1",
    timeout=5.0,
    caFile=None,
    tlsHost=None,
    bindAddress=None,
):
    """
    Open a WebSocket to C{ws://host:port/ws} offering C{protocols}; with
    C{caFile} (the PEM certificate to trust), C{wss://}, verified for
    C{tlsHost} (default: C{host}).

    @param bindAddress: the C{(host, port)} to connect from.

    @return: a L{Deferred} firing with the open L{WSClient}.
    """
    url = "{}://{}:{}/ws".format("ws" if caFile is None else "wss", host, port)
    factory = WebSocketClientFactory(url, protocols=list(protocols) or None, origin=origin)
    factory.protocol = WSClient
    # No autobahn timers (they outlive the test): withDeadline bounds it.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout, bindAddress=bindAddress)
    if caFile is not None:
        trustRoot = ssl.Certificate.loadPEM(FilePath(caFile).getContent())
        options = ssl.optionsForClientTLS(tlsHost or host, trustRoot=trustRoot)
        endpoint = wrapClientTLS(options, endpoint)
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


def upgradeRequest(
    path=b"/ws",
    protocols=(JSON,),
    origin=None,
    host=b"127.0.0.1",
    extra=b"",
    headers=None,
    method=b"GET",
    version=b"HTTP/1.1",
):
    """
    The bytes of a WebSocket upgrade request (RFC 6455, section 4.1).

    @param headers: header name (L{bytes}) -> value (L{bytes}), or L{None}
        to leave that header out; each replaces the default of that name
        (compared case-insensitively) or is added after the defaults.
    @param method: the request line's method and C{version} its version,
        other than RFC 6455's if asked.
    """
    fields = [
        (b"Host", host),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    if protocols:
        fields.append((b"Sec-WebSocket-Protocol", ", ".join(protocols).encode("ascii")))
    if origin is not None:
        fields.append((b"Origin", origin))
    for name, value in (headers or {}).items():
        position = [i for i, (n, _) in enumerate(fields) if n.lower() == name.lower()]
        if position:
            del fields[position[0]]
        if value is not None:
            fields.insert(position[0] if position else len(fields), (name, value))
    lines = [b" ".join([method, path, version])] + [n + b": " + v for n, v in fields]
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def acceptValue(key=KEY):
    """
    The C{Sec-WebSocket-Accept} a server answers to C{Sec-WebSocket-Key:
    key} (RFC 6455, section 4.2.2).
    """
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def parseResponseHead(data):
    """
    The status line and headers of an HTTP response at the start of
    C{data}.

    @return: C{(status, headers, size)}: the status code, the headers
        (lower-case L{bytes} names to L{bytes} values, the last of each
        name) and the size of the head with its blank line; or L{None}
        while the head is incomplete.
    @raise ValueError: if the status line is not HTTP's.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/") or not rest[:3].isdigit():
        raise ValueError("not an HTTP response: {!r}".format(lines[0][:80]))
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(rest[:3]), headers, end + 4


# -- WebSocket frames built and read by hand (RFC 6455, section 5.2) -----------

#: Opcodes by name.
OPCODES = {"continuation": 0, "text": 1, "binary": 2, "close": 8, "ping": 9, "pong": 10}
#: The gate's close code right after an ERROR frame is this plus the error's
#: code (docs/protocol.md section 17.5).
CLOSE_ERROR_BASE = 4000
#: The close code of the gate's other closes (section 17.5).
CLOSE_NORMAL = 1000
#: The masking key of every frame built here: fixed, so the bytes of a test
#: are the same every run, and not all zeros, so masking is exercised.
MASK_KEY = b"\x5a\xc3\x0f\x96"


def clientFrame(opcode, payload, fin=True, rsv=0, mask=MASK_KEY, length=None, lengthSize=None):
    """
    One WebSocket frame as a client sends it, malformed if asked.

    @param opcode: an opcode number (L{OPCODES}).
    @param rsv: the three reserved bits, as a number from 0 to 7.
    @param mask: the masking key, or L{None} for an unmasked frame.
    @param length: the payload length the header announces (default: the
        payload's).
    @param lengthSize: the size of the extended length field, 0, 2 or 8
        (default: the smallest that holds C{length}, as RFC 6455 requires).
    """
    if length is None:
        length = len(payload)
    if lengthSize is None:
        lengthSize = 0 if length < 126 else 2 if length < 1 << 16 else 8
    header = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    marker = {0: length, 2: 126, 8: 127}[lengthSize]
    header.append((0x80 if mask is not None else 0) | marker)
    if lengthSize:
        header += length.to_bytes(lengthSize, "big")
    if mask is None:
        return bytes(header) + payload
    return bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass
class ServerFrame:
    """
    One WebSocket frame read from a server.
    """

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes


def readServerFrame(data, offset=0):
    """
    The frame at C{offset} of C{data}.

    @return: C{(frame, end)}, a L{ServerFrame} (a masked one unmasked) and
        the offset after it, or L{None} while the frame is incomplete.
    """
    if len(data) - offset < 2:
        return None
    first, second = data[offset], data[offset + 1]
    start, length = offset + 2, second & 0x7F
    if length >= 126:
        size = 2 if length == 126 else 8
        if len(data) - start < size:
            return None
        length = int.from_bytes(data[start : start + size], "big")
        start += size
    mask = None
    if second & 0x80:
        mask, start = data[start : start + 4], start + 4
    end = start + length
    if len(data) < end:
        return None
    payload = data[start:end]
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = ServerFrame(bool(first & 0x80), first >> 4 & 7, first & 0x0F, mask is not None, payload)
    return frame, end
