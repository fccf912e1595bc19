# -*- test-case-name: tests.test_bench -*-
"""
The bench's WebSocket transport (C{--transport ws} and C{wss}): a thin
RFC 6455 client layer under the bench's clients, as TLS is one.

L{WebSocketClientEndpoint} wraps the endpoint of a bench connection (TCP,
or TLS for C{wss}): once connected it sends the upgrade request for C{/ws}
offering C{imserver.v1.proto}, checks the C{101} answer, and only then
connects the client protocol, whose transport is the L{WebSocketFramer}.
The client protocol keeps speaking the TCP framing of docs/protocol.md
section 2 (a 4-byte length, then a serialized frame): the framer writes
each length-prefixed frame as one binary WebSocket message and hands each
message it reads back as one length-prefixed frame.  So every bench client
(the lean L{imserver.bench.scenario.RoundTripClient}, the client library's
L{imserver.client.ClientProtocol}) runs over WebSocket unchanged.

Only the bench's client side is hand-rolled, to keep the clients cheaper
than the server they load; the gate's side is autobahn's.  What it
leaves out, or does the cheap way:

  - B{Bench-only shortcut: the all-zero masking key.}  RFC 6455 (section
    5.3) requires every client frame to be masked, and it is; but always
    with the key C{00 00 00 00}, with which masking leaves the payload as
    it is, so it costs nothing.  The key is legal (any 32 bits are); the
    RFC asks for an unpredictable one so that a hostile script in a
    browser cannot choose the bytes an intermediary sees (cache poisoning
    of proxies), which does not arise between a bench and a gate on
    loopback.  Do not reuse this framer for a real client.
  - No extension is offered (no permessage-deflate), no C{Origin} is
    sent (not a browser).
  - The server's pings are answered with pongs and its close with a close;
    fragmented messages are reassembled (the gate sends none).  Anything
    else (a masked server frame, a text message, an unknown opcode, a
    message above L{MAX_MESSAGE}) aborts the connection.
"""

import base64
import hashlib
import os
import struct

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint, ITransport
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

#: The subprotocol asked for: one binary message is one serialized frame
#: (docs/protocol.md section 17.3; L{imserver.web.jsonframes.PROTO}, not
#: imported: that would load autobahn and twisted.web into every worker).
PROTO = "imserver.v1.proto"
#: The path of the gate's WebSocket endpoint.
PATH = "/ws"
#: The most bytes of the server's answer to the upgrade request.
MAX_HANDSHAKE = 8192
#: The largest message the framer buffers (the gate's frames are far
#: smaller: the client protocol above checks its own limit).
MAX_MESSAGE = 1 << 20
#: RFC 6455's key of C{Sec-WebSocket-Accept} (section 1.3).
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: The masking key of every frame the bench sends (see the module's
#: docstring: legal, and free).
_ZERO_MASK = b"\0\0\0\0"
_short = struct.Struct("!H")
_long = struct.Struct("!Q")
_prefix = struct.Struct("!I")
_unpackPrefix = _prefix.unpack_from
_packPrefix = _prefix.pack


def clientHeader(opcode, length):
    """
    The header of a final, masked (all-zero key) client frame.

    @param opcode: the frame's opcode.
    @param length: its payload's length.
    """
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, 0x80 | length)) + _ZERO_MASK
    if length < 1 << 16:
        return bytes((first, 0x80 | 126)) + _short.pack(length) + _ZERO_MASK
    return bytes((first, 0x80 | 127)) + _long.pack(length) + _ZERO_MASK


#: The header of a binary message, by payload length, for short ones.
_BINARY_HEADERS = [clientHeader(_BINARY, n) for n in range(126)]


def binaryHeader(length):
    """
    The header of one binary message of C{length} bytes from the client.
    """
    return _BINARY_HEADERS[length] if length < 126 else clientHeader(_BINARY, length)


def acceptValue(key):
    """
    The C{Sec-WebSocket-Accept} a server answers to C{Sec-WebSocket-Key:
    key} (RFC 6455, section 4.2.2).

    @type key: L{bytes}
    """
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def upgradeRequest(host, port, key, path=PATH, subprotocol=PROTO):
    """
    The bytes of the upgrade request of a bench client.

    @param host: the server's address (an IPv6 one is bracketed).
    @param key: the C{Sec-WebSocket-Key}, L{bytes}.
    """
    authority = "[{}]:{}".format(host, port) if ":" in host else "{}:{}".format(host, port)
    return (
        "GET {} HTTP/1.1\r\n"
        "Host: {}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        "Sec-WebSocket-Key: {}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: {}\r\n"
        "\r\n".format(path, authority, key.decode("ascii"), subprotocol)
    ).encode("ascii")


class HandshakeError(Exception):
    """
    The server did not upgrade the connection as asked.
    """


def checkUpgrade(head, key, subprotocol=PROTO):
    """
    Check the server's answer to an upgrade request.

    @param head: its status line and headers, without the blank line.
    @param key: the request's C{Sec-WebSocket-Key}.
    @raise HandshakeError: unless it is a C{101} with the right accept
        value, the subprotocol asked for, and no extension.
    """
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or status[1] != b"101":
        raise HandshakeError("upgrade refused: {!r}".format(lines[0][:200]))
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"upgrade", b"").lower() != b"websocket":
        raise HandshakeError("no Upgrade: websocket in the answer")
    if headers.get(b"sec-websocket-accept") != acceptValue(key):
        raise HandshakeError("wrong Sec-WebSocket-Accept")
    if headers.get(b"sec-websocket-protocol", b"").decode("latin-1") != subprotocol:
        raise HandshakeError("the server did not take the subprotocol {}".format(subprotocol))
    if b"sec-websocket-extensions" in headers:
        raise HandshakeError("the server chose an extension; none was offered")


@implementer(ITransport)
class WebSocketFramer(Protocol):
    """
    One WebSocket client connection: the protocol of the socket below (TCP,
    or TLS), and from the upgrade on the transport of L{wrapped}, the
    client protocol, which writes and reads length-prefixed frames.

    @ivar wrapped: the client protocol.
    @ivar opened: a L{Deferred} firing with L{wrapped} once the upgrade is
        answered and it is connected, or failing (L{HandshakeError}, the
        connection lost, no answer within the timeout).
    @ivar disconnecting: whether L{loseConnection} was called.
    """

    disconnecting = False
    _open = False
    _closed = False
    _timer = None

    def __init__(self, wrapped, request, key, clock, timeout, subprotocol=PROTO):
        """
        @param request: the upgrade request (L{upgradeRequest}).
        @param key: its C{Sec-WebSocket-Key}.
        @param clock: an L{IReactorTime} for the timeout.
        @param timeout: seconds the server has to answer the upgrade.
        """
        self.wrapped = wrapped
        self.opened = Deferred()
        self._request = request
        self._key = key
        self._subprotocol = subprotocol
        self._clock = clock
        self._timeout = timeout
        self._head = b""
        # What is left of the server's last read: part of a frame.
        self._in = b""
        # What is left of the client's last write: part of a frame.
        self._out = b""
        # The payloads of a fragmented message, while it is read.
        self._fragments = None

    # -- the socket's side ---------------------------------------------------

    def connectionMade(self):
        self.transport.write(self._request)
        self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def _timedOut(self):
        self._timer = None
        self._refuse(HandshakeError("no answer to the upgrade in {} s".format(self._timeout)))

    def _refuse(self, reason):
        if not self.opened.called:
            self.opened.errback(reason)
        self.transport.abortConnection()

    def dataReceived(self, data):
        if self._open:
            self._read(data)
            return
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self._head = head
            if len(head) > MAX_HANDSHAKE:
                self._refuse(HandshakeError("an answer of more than {} bytes".format(len(head))))
            return
        self._head = b""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            checkUpgrade(head[:end], self._key, self._subprotocol)
        except HandshakeError as e:
            self._refuse(e)
            return
        self._open = True
        self.wrapped.makeConnection(self)
        self.opened.callback(self.wrapped)
        rest = head[end + 4 :]
        if rest and not self._closed:
            self._read(rest)

    def _read(self, data):
        """
        Split what the server sent into WebSocket frames; hand the wrapped
        protocol every binary message of them, length-prefixed, in one
        call.
        """
        if self._closed:
            return
        if self._in:
            data = self._in + data
            self._in = b""
        size = len(data)
        offset = 0
        messages = []
        while size - offset >= 2:
            first = data[offset]
            length = data[offset + 1]
            start = offset + 2
            if length & 0x80:
                self._abort()  # a server never masks (RFC 6455, section 5.1)
                return
            if length == 126:
                if size - start < 2:
                    break
                (length,) = _short.unpack_from(data, start)
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                (length,) = _long.unpack_from(data, start)
                start += 8
            if length > MAX_MESSAGE:
                self._abort()
                return
            end = start + length
            if end > size:
                break
            offset = end
            opcode = first & 0x0F
            if opcode == _BINARY and first & 0x80 and self._fragments is None:
                messages.append(_packPrefix(length))
                messages.append(data[start:end])
            elif opcode in (_BINARY, _CONTINUATION):
                if self._message(opcode, first & 0x80, data[start:end], messages):
                    return
            elif opcode == _PING:
                self.transport.write(clientHeader(_PONG, length) + data[start:end])
            elif opcode == _CLOSE:
                self._closeReceived(data[start : start + 2], messages)
                return
            elif opcode != _PONG:
                self._abort()  # a text message, or a reserved opcode
                return
        if offset < size:
            self._in = data[offset:] if offset else data
        if messages:
            self.wrapped.dataReceived(b"".join(messages))

    def _message(self, opcode, final, payload, messages):
        """
        A fragment of a fragmented message: keep it, and append the message
        to C{messages} once complete.

        @return: whether the connection was aborted (a protocol error).
        """
        fragments = self._fragments
        if (opcode == _BINARY) != (fragments is None):
            self._abort()  # a continuation of nothing, or a new message in one
            return True
        fragments = self._fragments = (fragments or []) + [payload]
        if sum(len(f) for f in fragments) > MAX_MESSAGE:
            self._abort()
            return True
        if final:
            self._fragments = None
            message = b"".join(fragments)
            messages.append(_packPrefix(len(message)))
            messages.append(message)
        return False

    def _closeReceived(self, code, messages):
        """
        The server closes: the messages before its close go up, its close
        code goes back (the closing handshake), then TCP closes.
        """
        self._closed = True
        if messages:
            self.wrapped.dataReceived(b"".join(messages))
        if self.transport is not None and self.connected:
            self.transport.write(clientHeader(_CLOSE, len(code)) + code)
            self.transport.loseConnection()

    def _abort(self):
        self._closed = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.connected = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open:
            self.wrapped.connectionLost(reason)
        elif not self.opened.called:
            self.opened.errback(reason)

    # -- the wrapped protocol's transport -----------------------------------

    def write(self, data):
        """
        Write the length-prefixed frames in C{data}, each as one binary
        message.
        """
        if self._closed:
            return
        if self._out:
            data = self._out + data
            self._out = b""
        size = len(data)
        if size >= 4:
            (length,) = _unpackPrefix(data)
            if length + 4 == size:  # the usual: one whole frame
                self.transport.write(binaryHeader(length) + data[4:])
                return
        pieces = []
        offset = 0
        while size - offset >= 4:
            (length,) = _unpackPrefix(data, offset)
            end = offset + 4 + length
            if end > size:
                break
            pieces.append(binaryHeader(length))
            pieces.append(data[offset + 4 : end])
            offset = end
        if offset < size:
            self._out = data[offset:]
        if pieces:
            self.transport.write(b"".join(pieces))

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        """
        Close: a WebSocket close (code 1000), then TCP after it (the server's
        answer is not awaited).
        """
        if self.disconnecting:
            return
        self.disconnecting = True
        if not self._closed:
            self._closed = True
            self.transport.write(clientHeader(_CLOSE, 2) + _short.pack(1000))
        self.transport.loseConnection()

    def abortConnection(self):
        self._closed = True
        self.transport.abortConnection()

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()


class _FramerFactory(Factory):
    """
    Builds the framer around the protocol of the endpoint's caller, once
    the socket is connected.
    """

    def __init__(self, factory, endpoint):
        self._factory = factory
        self._endpoint = endpoint

    def buildProtocol(self, addr):
        wrapped = self._factory.buildProtocol(addr)
        if wrapped is None:
            return None
        e = self._endpoint
        key = base64.b64encode(os.urandom(16))
        request = upgradeRequest(e.host, e.port, key, e.path, e.subprotocol)
        return WebSocketFramer(wrapped, request, key, e.clock, e.timeout, e.subprotocol)


@implementer(IStreamClientEndpoint)
class WebSocketClientEndpoint:
    """
    A WebSocket over another endpoint (TCP, or TLS for C{wss}): C{connect}
    fires with the factory's protocol once the upgrade is done, connected
    to a L{WebSocketFramer}.

    @ivar host: the server's address, for C{Host}.
    @ivar port: its port, for C{Host}.
    """

    def __init__(self, clock, endpoint, host, port, timeout, path=PATH, subprotocol=PROTO):
        """
        @param clock: an L{IReactorTime} for the upgrade's timeout.
        @param endpoint: the L{IStreamClientEndpoint} under it.
        @param timeout: seconds the server has to answer the upgrade.
        """
        self.clock = clock
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self.timeout = timeout
        self.path = path
        self.subprotocol = subprotocol

    def connect(self, protocolFactory):
        d = self.endpoint.connect(_FramerFactory(protocolFactory, self))
        return d.addCallback(lambda framer: framer.opened)
