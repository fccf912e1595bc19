# -*- test-case-name: tests.test_protocol,tests.test_delivery,tests.test_rpc,tests.test_client -*-
"""
Reading frames back: the tests' own reference parser of the wire format
(docs/protocol.md), independent of L{imserver.framing}; and
L{RawFrameClient}, a stranger's client written from docs/protocol.md alone.
"""

import struct

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS

from imserver.pb import im_pb2 as pb


def readFrames(data):
    """
    Split written bytes back into frames (the test's own reference parser).
    """
    frames = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        frames.append(pb.Frame.FromString(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def written(transport):
    """
    The frames written to C{transport} since the last call.
    """
    frames = readFrames(transport.value())
    transport.clear()
    return frames


class RawFrameClient(Protocol):
    """
    A stranger's client, written from docs/protocol.md alone: frames are
    a 4-byte big-endian length and a serialized C{Frame}; it collects what
    comes back and tells when the gate closes the connection.
    """

    #: Called (with no argument) after each read that parsed frames.
    onFrame = None

    def __init__(self):
        self.buffer = b""
        self.frames = []
        self.closed = Deferred()
        self._waiting = []

    def send(self, seq, method, message):
        self._write(
            pb.Frame(kind=pb.REQUEST, seq=seq, method=method, body=message.SerializeToString())
        )

    def notify(self, method, message):
        """
        Send the notification C{method} (C{ack}, C{typing}).
        """
        self._write(pb.Frame(kind=pb.NOTIFY, method=method, body=message.SerializeToString()))

    def _write(self, frame):
        data = frame.SerializeToString()
        self.transport.write(struct.pack("!I", len(data)) + data)

    def dataReceived(self, data):
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack("!I", self.buffer[:4])
            if len(self.buffer) < 4 + length:
                break
            self.frames.append(pb.Frame.FromString(self.buffer[4 : 4 + length]))
            self.buffer = self.buffer[4 + length :]
        if data and self.onFrame is not None:
            self.onFrame()
        answers = [f for f in self.frames if f.kind == pb.RESPONSE]
        for count, d in list(self._waiting):
            if len(answers) >= count:
                self._waiting.remove((count, d))
                d.callback(answers[:count])

    def responses(self, count):
        """
        @return: a L{Deferred} firing with the first C{count} RESPONSE
            frames (pushes may come between them).
        """
        d = Deferred()
        self._waiting.append((count, d))
        self.dataReceived(b"")
        return d

    def notifications(self, method):
        """
        @return: the bodies of the C{NOTIFY} frames named C{method} so far.
        """
        return [f.body for f in self.frames if f.kind == pb.NOTIFY and f.method == method]

    def connectionLost(self, reason):
        self.closed.callback(None)


def connectRawTLS(testCase, port, caFile):
    """
    Connect a L{RawFrameClient} to C{port} on 127.0.0.1 over TLS verified
    against C{caFile} (a L{FilePath}) for C{localhost}; aborted at cleanup.

    @return: a L{Deferred} firing with it.
    """
    trustRoot = Certificate.loadPEM(caFile.getContent())
    endpoint = wrapClientTLS(
        optionsForClientTLS("localhost", trustRoot),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
    )
    return _connectRaw(testCase, endpoint)


def connectRaw(testCase, port):
    """
    Connect a L{RawFrameClient} to C{port} on 127.0.0.1 over plain TCP;
    aborted at cleanup.

    @return: a L{Deferred} firing with it.
    """
    return _connectRaw(testCase, TCP4ClientEndpoint(reactor, "127.0.0.1", port))


def _connectRaw(testCase, endpoint):
    client = RawFrameClient()

    def connected(_):
        testCase.addCleanup(lambda: client.transport.abortConnection())
        return client

    return connectProtocol(endpoint, client).addCallback(connected)
