# -*- test-case-name: tests.test_batchedwrites -*-
"""
Tests for L{imserver.transport.BatchedServer}: the writes of one reactor
pass leave in one C{send} at the end of the pass, without the reactor's
write registration when the socket takes them, over real loopback TCP.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from imserver.endpoints import listenEndpoint
from imserver.transport import BatchedListening, BatchedPort, BatchedServer, batchedListening


class Collector(Protocol):
    """
    A client that keeps what it reads; C{lost} fires when the connection
    ends (C{reason} says why), C{got(n)} once C{n} bytes have come.
    """

    def __init__(self):
        self.data = []
        self.size = 0
        self.lost = Deferred()
        self._waiting = []

    def dataReceived(self, data):
        self.data.append(data)
        self.size += len(data)
        for n, d in list(self._waiting):
            if self.size >= n:
                self._waiting.remove((n, d))
                d.callback(b"".join(self.data))

    def got(self, n):
        d = Deferred()
        self._waiting.append((n, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class Writer(Protocol):
    """
    A server protocol that runs C{onConnect(self)} when connected.
    """

    onConnect = None

    def connectionMade(self):
        self.factory.protocols.append(self)
        if self.onConnect is not None:
            self.onConnect(self)


class BatchedServerTests(TestCase):
    """
    L{BatchedServer} over real loopback TCP.
    """

    timeout = 30

    def setUp(self):
        self.sends = []
        self.registrations = []
        sends, registrations = self.sends, self.registrations
        original, register = BatchedServer.writeSomeData, BatchedServer.startWriting

        def writeSomeData(transport, data):
            sends.append(len(data))
            return original(transport, data)

        def startWriting(transport):
            registrations.append(transport)
            return register(transport)

        self.patch(BatchedServer, "writeSomeData", writeSomeData)
        self.patch(BatchedServer, "startWriting", startWriting)

    @inlineCallbacks
    def serve(self, onConnect):
        """
        Listen on a loopback port through L{listenEndpoint}, connect a
        L{Collector}; the server protocol runs C{onConnect}.

        @return: a L{Deferred} firing with C{(server protocol, client)}.
        """
        factory = Factory.forProtocol(Writer)
        factory.protocols = []
        Writer.onConnect = staticmethod(onConnect)
        self.addCleanup(setattr, Writer, "onConnect", None)
        port = yield listenEndpoint(reactor, "tcp:0:interface=127.0.0.1", None, 50).listen(factory)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, BatchedPort)
        client = Collector()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)
        self.addCleanup(lambda: client.transport.loseConnection() or client.lost)
        while not factory.protocols:
            yield client.got(0)
        return factory.protocols[0], client

    @inlineCallbacks
    def test_onePassOneSend(self):
        """
        A hundred frames written in one pass (and a sequence) leave in one
        C{send}, in order, and the connection never registers for writing.
        """
        frames = [b"frame %03d;" % i for i in range(100)]

        def write(protocol):
            for frame in frames[:50]:
                protocol.transport.write(frame)
            protocol.transport.writeSequence(frames[50:])

        server, client = yield self.serve(write)
        data = yield client.got(sum(map(len, frames)))
        self.assertEqual(data, b"".join(frames))
        self.assertEqual(self.sends, [sum(map(len, frames))])
        self.assertEqual(self.registrations, [])
        self.assertNotIn(server.transport, reactor.getWriters())

    @inlineCallbacks
    def test_socketFull(self):
        """
        What the socket does not take goes the reactor's way: 16 MiB written
        at once all arrive, after the connection registered for writing,
        and it unregisters once everything is out.
        """
        payload = bytes(range(256)) * (16 * 4096)
        server, client = yield self.serve(lambda p: p.transport.write(payload))
        data = yield client.got(len(payload))
        self.assertEqual(data, payload)
        self.assertEqual(self.registrations, [server.transport])
        self.assertNotIn(server.transport, reactor.getWriters())

    @inlineCallbacks
    def test_closeAfterWrites(self):
        """
        C{loseConnection} in the pass that wrote: everything written
        arrives, then the connection closes cleanly.
        """

        def writeAndClose(protocol):
            protocol.transport.write(b"last words")
            protocol.transport.loseConnection()

        server, client = yield self.serve(writeAndClose)
        yield client.lost
        self.assertEqual(b"".join(client.data), b"last words")
        self.assertTrue(client.reason.check(ConnectionDone))

    @inlineCallbacks
    def test_writeAfterClose(self):
        """
        As with Twisted's own connections, a write while the connection
        closes still goes out before the close, and writes once it is gone
        are dropped.
        """

        def writeLate(protocol):
            protocol.transport.write(b"a")
            protocol.transport.loseConnection()
            protocol.transport.write(b"b")

        server, client = yield self.serve(writeLate)
        yield client.lost
        self.assertEqual(b"".join(client.data), b"ab")
        server.transport.write(b"c")
        server.transport.writeSequence([b"d"])
        self.assertEqual(server.transport._tempDataBuffer, [])

    @inlineCallbacks
    def test_producerPausedAndResumed(self):
        """
        A streaming producer is paused when a pass writes more than the
        buffer size, and resumed once the socket took it all.
        """
        events = []

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self):
                events.append("pause")

            def resumeProducing(self):
                events.append("resume")

            def stopProducing(self):
                events.append("stop")

        payload = b"x" * (BatchedServer.bufferSize + 1)

        def produce(protocol):
            protocol.transport.registerProducer(Producer(), True)
            protocol.transport.write(payload)

        server, client = yield self.serve(produce)
        yield client.got(len(payload))
        self.assertEqual(events[:2], ["pause", "resume"])

    def test_str(self):
        """
        Text is refused as Twisted refuses it.
        """
        self.assertRaises(TypeError, BatchedServer.writeSequence, _Connected(), ["text"])


class _Connected:
    """
    Just enough of a connection for L{BatchedServer.writeSequence}'s checks.
    """

    TLS = False
    connected = True
    _writeDisconnected = False


class ListeningTests(TestCase):
    """
    Which reactor endpoints listen with.
    """

    def test_realReactor(self):
        """
        Over the real reactor, TCP listeners get L{BatchedPort}s; other
        attributes are the reactor's.
        """
        listening = batchedListening(reactor)
        self.assertIsInstance(listening, BatchedListening)
        self.assertEqual(listening.seconds, reactor.seconds)

    def test_memoryReactor(self):
        """
        A test's memory reactor is used as it is.
        """
        from twisted.internet.testing import MemoryReactorClock

        memory = MemoryReactorClock()
        self.assertIs(batchedListening(memory), memory)

    @inlineCallbacks
    def test_everyTCPEndpoint(self):
        """
        C{tcp:}, C{ssl:}, C{haproxy:tcp:} and C{reusePort=yes} listeners all
        accept L{BatchedServer} connections.
        """
        from imserver.tls import makeSelfSigned

        certPath, keyPath = self.mktemp(), self.mktemp()
        cert, key = makeSelfSigned()
        with open(certPath, "wb") as f:
            f.write(cert)
        with open(keyPath, "wb") as f:
            f.write(key)
        from twisted.python.filepath import FilePath

        certificate = (FilePath(certPath), FilePath(keyPath))
        for description in [
            "tcp:0:interface=127.0.0.1",
            "ssl:0:interface=127.0.0.1",
            "haproxy:tcp:0:interface=127.0.0.1",
            "tcp:0:interface=127.0.0.1:reusePort=yes",
        ]:
            endpoint = listenEndpoint(reactor, description, certificate, 50)
            port = yield endpoint.listen(Factory.forProtocol(Protocol))
            self.addCleanup(port.stopListening)
            self.assertIsInstance(port, BatchedPort, description)
