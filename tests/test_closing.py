# -*- test-case-name: tests.test_closing -*-
"""
Closes the gate starts end within C{close_timeout}, whatever the peer does.

Twisted's TLS transport waits for the peer's C{close_notify} before it
closes TCP; a client that never answers (nothing in docs/protocol.md asks it
to) used to keep every connection the gate closed open for ever: the
session registered, the gauges and the per-address slot taken.  These tests
close connections on every path the gate closes them (framing error,
C{AUTH_FAILED}, C{AUTH_TIMEOUT}, C{IDLE_TIMEOUT}, kicks C{REPLACED} and
C{ADMIN}) over TCP, TLS and a C{haproxy:} listener, with a raw client that
never sends C{close_notify} (the standard library's C{ssl.MemoryBIO}, not
Twisted's TLS), and check the socket, the gauge, presence and the address's
slot afterwards.

The unit tests at the end drive L{imserver.transport.closeBounded} and the
factory's accounting with fake transports and a L{Clock}.
"""

import socket
import ssl
import time
from dataclasses import replace

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from imserver import tap
from imserver.auth import loadSecret, mintToken
from imserver.datadir import CERT_FILE_NAME
from imserver.framing import decodeLength, encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.transport import closeBounded, socketTransport

from tests.support import serverEnvironment, startServer, withoutSecretEnvironment

#: Seconds a test waits for something that should take a fraction of it.
DEADLINE = 10.0


@implementer(IHalfCloseableProtocol)
class RawClient(Protocol):
    """
    A client written from docs/protocol.md alone, with bad manners: over
    TLS (the standard library's C{ssl.MemoryBIO}) it never sends
    C{close_notify}; with C{keepOpen} it does not even close its socket
    when the server's FIN arrives.

    @ivar frames: the frames received, in order.
    @ivar closeNotify: whether the server's C{close_notify} arrived.
    @ivar eof: whether the server's FIN arrived.
    @ivar reason: why the connection ended, once it has.
    """

    def __init__(self, context=None, keepOpen=False, prefix=b""):
        self.context = context
        self.keepOpen = keepOpen
        self.prefix = prefix
        self.frames = []
        self.closeNotify = False
        self.eof = False
        self.reason = None
        self.handshaken = context is None
        self._bytes = b""
        self._waiters = []

    def connectionMade(self):
        if self.prefix:
            self.transport.write(self.prefix)
        if self.context is not None:
            self._incoming = ssl.MemoryBIO()
            self._outgoing = ssl.MemoryBIO()
            self._tls = self.context.wrap_bio(
                self._incoming, self._outgoing, server_hostname="localhost"
            )
            self._handshake()

    def _flush(self):
        data = self._outgoing.read()
        if data:
            self.transport.write(data)

    def _handshake(self):
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            self.handshaken = True
        self._flush()
        self._wake()

    def dataReceived(self, data):
        if self.context is None:
            self._received(data)
            return
        self._incoming.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return
        while True:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:
                # The server's close_notify: deliberately never answered.
                self.closeNotify = True
                break
            self._received(chunk)
        self._flush()
        self._wake()

    def _received(self, data):
        self._bytes += data
        while len(self._bytes) >= 4:
            length = decodeLength(self._bytes)
            if len(self._bytes) < 4 + length:
                break
            frame = pb.Frame()
            frame.ParseFromString(self._bytes[4 : 4 + length])
            self._bytes = self._bytes[4 + length :]
            self.frames.append(frame)
        self._wake()

    def send(self, frame):
        """
        Write one frame (an encoded one, if C{frame} is L{bytes}).
        """
        data = frame if isinstance(frame, bytes) else encodeFrame(frame)
        if self.context is None:
            self.transport.write(data)
        else:
            self._tls.write(data)
            self._flush()

    def readConnectionLost(self):
        self.eof = True
        if not self.keepOpen:
            self.transport.loseConnection()
        self._wake()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self._wake()

    def _wake(self):
        waiters, self._waiters = self._waiters, []
        for condition, d in waiters:
            if d.called:
                continue  # given up on (the deadline)
            if condition():
                d.callback(None)
            else:
                self._waiters.append((condition, d))

    def until(self, condition, what):
        """
        @return: a L{Deferred} firing once C{condition()} is true; failing
            if that takes more than L{DEADLINE}.
        """
        if condition():
            return succeed(None)
        d = Deferred()
        self._waiters.append((condition, d))
        return _withDeadline(d, "client: " + what)


def _withDeadline(d, what):
    def expired():
        if not d.called:
            d.errback(AssertionError("not within {} s: {}".format(DEADLINE, what)))

    timer = reactor.callLater(DEADLINE, expired)

    def done(result):
        if timer.active():
            timer.cancel()
        return result

    return d.addBoth(done)


def waitFor(condition, what, interval=0.01):
    """
    Poll C{condition} on the reactor until it is true (the server's side
    has no event to wait on from here); fail after L{DEADLINE}.
    """
    d = Deferred()
    start = reactor.seconds()

    def check():
        if condition():
            d.callback(None)
        elif reactor.seconds() - start > DEADLINE:
            d.errback(AssertionError("not within {} s: {}".format(DEADLINE, what)))
        else:
            reactor.callLater(interval, check)

    check()
    return d


class LiveGate:
    """
    The real service tree (C{twistd im}) with a C{tcp:}, an C{ssl:} and a
    C{haproxy:tcp:} listener on loopback and the memory store.
    """

    def __init__(self, testCase, *arguments):
        withoutSecretEnvironment(testCase)
        self.dataDir = FilePath(testCase.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--api",
                "none",
                "--store",
                "memory",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--listen",
                "haproxy:tcp:0:interface=127.0.0.1",
                "--auth-failure-burst",
                "1000000",
                "--sweep-interval",
                "0.05",
            ]
            + list(arguments)
        )
        self.root = startServer(testCase, options)
        self.gate = self.root.getServiceNamed("gate")
        self.factory = self.gate.factory
        self.secret = loadSecret(self.dataDir, environ=serverEnvironment())
        self.context = ssl.create_default_context(cafile=self.dataDir.child(CERT_FILE_NAME).path)

    @inlineCallbacks
    def start(self):
        tcp, tls, proxied = yield self.gate.addresses()
        self.ports = {"tcp": tcp.port, "ssl": tls.port, "haproxy": proxied.port}

    def settle(self, **changes):
        """
        Change settings of the running gate (for one test).
        """
        self.factory.settings = replace(self.factory.settings, **changes)

    @inlineCallbacks
    def connect(self, listener, keepOpen=False):
        """
        A raw client connected (and, over TLS, through the handshake).
        """
        prefix = b""
        if listener == "haproxy":
            prefix = b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 7443\r\n"
        client = RawClient(
            self.context if listener == "ssl" else None, keepOpen=keepOpen, prefix=prefix
        )
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports[listener], timeout=5)
        yield connectProtocol(endpoint, client)
        yield client.until(lambda: client.handshaken, "TLS handshake")
        return client

    def auth(self, client, uid, device="phone", token=None, seq=1):
        if token is None:
            token = mintToken(self.secret, uid, 3600, time.time())
        client.send(
            pb.Frame(
                kind=pb.REQUEST,
                seq=seq,
                method="auth",
                body=pb.AuthRequest(uid=uid, device_id=device, token=token).SerializeToString(),
            )
        )

    @inlineCallbacks
    def authed(self, listener, uid, device="phone", keepOpen=False):
        client = yield self.connect(listener, keepOpen)
        self.auth(client, uid, device)
        yield client.until(lambda: client.frames, "auth response")
        [frame] = client.frames
        assert not frame.HasField("error"), frame
        return client

    def sessions(self, uid):
        found = []
        self.factory.registry.sessionsFor(uid).addCallback(found.extend)
        return found

    def gauge(self):
        """
        The sum of C{imserver_connections} over its states.
        """
        for family in self.factory.metrics.collect():
            if family.name == "imserver_connections":
                return sum(sample.value for sample in family.samples)
        raise AssertionError("no imserver_connections gauge")


def errorCode(frames):
    """
    The code of the ERROR frame (or fatal error response) among C{frames}.
    """
    for frame in frames:
        if frame.HasField("error"):
            return frame.error.code
    return None


class CloseMixin:
    """
    Every close path, against a gate with short timeouts, over the
    listener C{self.listener}.
    """

    timeout = 60
    listener = None

    @inlineCallbacks
    def setUp(self):
        self.live = LiveGate(
            self,
            "--auth-timeout",
            "1",
            "--idle-timeout",
            "1.5",
            "--heartbeat-interval",
            "0.5",
            "--close-timeout",
            "30",
        )
        yield self.live.start()

    @inlineCallbacks
    def assertClosedByGate(self, client, code, uid=None):
        """
        C{client} got an error C{code} and, at that moment already, the
        session is gone from the registry, the gauge and the address's
        count; then its socket closes, though the client never answers
        C{close_notify}: the server's FIN reaches it and the gate sees its
        connection lost well within C{close_timeout} (30 s here), without
        an abort.
        """
        factory = self.live.factory
        yield client.until(lambda: errorCode(client.frames) is not None, "an error")
        self.assertEqual(pb.ErrorCode.Name(errorCode(client.frames)), pb.ErrorCode.Name(code))
        if uid is not None:
            self.assertEqual(self.live.sessions(uid), [])
        self.assertEqual(len(factory.connections), 0)
        self.assertEqual(self.live.gauge(), 0)
        self.assertIsNone(factory.refusal("127.0.0.1"))
        yield client.until(lambda: client.eof or client.reason is not None, "the server's FIN")
        if self.listener == "ssl":
            self.assertTrue(client.closeNotify)
        yield waitFor(lambda: not factory.closing, "the gate's side closed")
        yield client.until(lambda: client.reason is not None, "closed")

    def test_framingError(self):
        """
        A zero-length frame: C{EMPTY_FRAME}, then the socket closes.
        """

        def run(client):
            client.send(b"\x00\x00\x00\x00")
            return self.assertClosedByGate(client, pb.EMPTY_FRAME)

        return self.live.connect(self.listener).addCallback(run)

    def test_authFailed(self):
        """
        A bad token: C{AUTH_FAILED}, then the socket closes.
        """

        def run(client):
            self.live.auth(client, "alice", token="v1.1.bad")
            return self.assertClosedByGate(client, pb.AUTH_FAILED, "alice")

        return self.live.connect(self.listener).addCallback(run)

    def test_authTimeout(self):
        """
        No auth within the deadline: C{AUTH_TIMEOUT}, then the socket
        closes.
        """
        return self.live.connect(self.listener).addCallback(
            self.assertClosedByGate, pb.AUTH_TIMEOUT
        )

    @inlineCallbacks
    def test_idleTimeout(self):
        """
        Silence for the idle timeout: C{IDLE_TIMEOUT}, counted once however
        many sweeps run before the socket is closed.
        """
        before = self.live.factory.metrics.idleCloses
        client = yield self.live.authed(self.listener, "alice")
        yield self.assertClosedByGate(client, pb.IDLE_TIMEOUT, "alice")
        self.assertEqual(self.live.factory.metrics.idleCloses - before, 1)

    @inlineCallbacks
    def test_kickReplaced(self):
        """
        The same device signs in again: the old connection gets C{kicked}
        C{REPLACED} and is unregistered at once; presence lists the new one
        only.
        """
        old = yield self.live.authed(self.listener, "alice", "phone")
        new = yield self.live.authed("tcp", "alice", "phone")
        yield old.until(lambda: len(old.frames) > 1, "kicked")
        kicked = pb.Kicked()
        kicked.ParseFromString(old.frames[1].body)
        self.assertEqual((old.frames[1].method, kicked.reason), ("kicked", pb.REPLACED))
        [session] = self.live.sessions("alice")
        self.assertEqual(len(self.live.factory.connections), 1)
        self.assertIn(session, self.live.factory.connections)
        yield old.until(lambda: old.eof or old.reason is not None, "the server's FIN")
        yield waitFor(lambda: not self.live.factory.closing, "the gate's side closed")
        new.transport.loseConnection()
        yield new.until(lambda: new.reason is not None, "closed")

    @inlineCallbacks
    def test_kickAdmin(self):
        """
        A kick by the backend (what C{POST /v1/users/{uid}/kick} does):
        C{kicked} C{ADMIN}, presence empty at once, then the socket closes.
        """
        client = yield self.live.authed(self.listener, "alice")
        for session in self.live.sessions("alice"):
            session.kick(pb.ADMIN, "bye")
        self.assertEqual(self.live.sessions("alice"), [])
        self.assertEqual(self.live.gauge(), 0)
        yield client.until(lambda: len(client.frames) > 1, "kicked")
        self.assertEqual(client.frames[1].method, "kicked")
        yield client.until(lambda: client.eof or client.reason is not None, "the server's FIN")
        yield waitFor(lambda: not self.live.factory.closing, "the gate's side closed")

    @inlineCallbacks
    def test_writeBufferOnTheSocket(self):
        """
        C{write_buffer_high} is set on the socket's own transport, under
        the TLS or PROXY wrapper (a wrapper forwards attribute reads, so an
        assignment to it would silently miss).
        """
        client = yield self.live.authed(self.listener, "alice")
        [session] = self.live.factory.connections
        socket = socketTransport(session.channel.transport)
        self.assertIsInstance(socket, tcp.Server)
        self.assertEqual(socket.bufferSize, self.live.factory.settings.write_buffer_high)
        client.transport.loseConnection()
        yield waitFor(lambda: not self.live.factory.connections, "closed")

    @inlineCallbacks
    def test_noDelay(self):
        """
        Nagle's algorithm is off on the accepted socket (a push must not
        wait for the client's delayed ACK), whichever the listener.
        """
        client = yield self.live.authed(self.listener, "alice")
        [session] = self.live.factory.connections
        sock = socketTransport(session.channel.transport).socket
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        client.transport.loseConnection()
        yield waitFor(lambda: not self.live.factory.connections, "closed")


class ClientNoDelayTests(TestCase):
    """
    The client library turns Nagle's algorithm off too.
    """

    timeout = 60

    @inlineCallbacks
    def test_clientSocket(self):
        """
        A client made by L{imserver.client.connect} over TLS has
        C{TCP_NODELAY} set on its socket.
        """
        from imserver.client import connect

        live = LiveGate(self)
        yield live.start()
        client = yield connect(
            reactor,
            "localhost",
            live.ports["ssl"],
            uid="alice",
            token=mintToken(live.secret, "alice", 3600, time.time()),
            deviceId="laptop",
            caFile=live.dataDir.child(CERT_FILE_NAME).path,
        )
        sock = socketTransport(client.transport).socket
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        yield client.close()


class TLSCloseTests(CloseMixin, TestCase):
    """
    Every close path over TLS, the client never answering C{close_notify}.
    """

    listener = "ssl"


class TCPCloseTests(CloseMixin, TestCase):
    """
    Every close path over plain TCP.
    """

    listener = "tcp"


class HAProxyCloseTests(CloseMixin, TestCase):
    """
    Every close path on a C{haproxy:} listener (the client sends the PROXY
    header itself).
    """

    listener = "haproxy"


class AbortTests(TestCase):
    """
    A client that does not read: the gate cannot write its last bytes, and
    aborts the connection at C{close_timeout}.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.live = LiveGate(self, "--close-timeout", "0.3")
        yield self.live.start()

    @inlineCallbacks
    def check(self, listener):
        factory = self.live.factory
        client = yield self.live.authed(listener, "alice")
        client.transport.pauseProducing()
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        [session] = factory.connections
        transport = session.channel.transport
        server = socketTransport(transport)
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        aborted = []
        original = transport.abortConnection
        transport.abortConnection = lambda: aborted.append(True) or original()
        # More queued for the client than every buffer on the way holds.
        transport.write(b"\0" * (8 << 20))
        session.kick(pb.ADMIN, "bye")
        self.assertEqual(len(factory.connections), 0)
        self.assertEqual(self.live.sessions("alice"), [])
        yield waitFor(lambda: not factory.closing, "the gate's side aborted")
        self.assertEqual(aborted, [True])
        client.transport.abortConnection()

    def test_tls(self):
        """
        Over TLS.
        """
        return self.check("ssl")

    def test_tcp(self):
        """
        Over TCP.
        """
        return self.check("tcp")


class FakeSocket(StringTransport):
    """
    The socket's transport: has a write buffer (C{bufferSize}).
    """

    bufferSize = 65536

    def __init__(self):
        StringTransport.__init__(self)
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class FakeTLS(StringTransport):
    """
    A wrapper over L{FakeSocket} that, like Twisted's TLS, waits for its
    peer before it closes the socket.
    """

    def __init__(self, socket):
        StringTransport.__init__(self)
        self.transport = socket
        self.aborted = False

    def abortConnection(self):
        self.aborted = True


class Closable:
    """
    The least of a protocol that L{closeBounded} needs.
    """

    connected = 1

    def __init__(self, transport):
        self.transport = transport


class CloseBoundedTests(SynchronousTestCase):
    """
    L{closeBounded}.
    """

    def test_closesTheSocketUnderAWrapper(self):
        """
        Under a wrapper (TLS) the socket is closed (after its buffer) at
        once: the peer gets FIN without having to answer the wrapper's
        close.
        """
        socket = FakeSocket()
        tls = FakeTLS(socket)
        protocol = Closable(tls)
        clock = Clock()
        timer = closeBounded(protocol, clock, 2.0)
        self.assertTrue(tls.disconnecting)
        self.assertTrue(socket.disconnecting)
        self.assertTrue(timer.active())

    def test_abortsAtTheBound(self):
        """
        Still connected C{timeout} seconds later: aborted.
        """
        tls = FakeTLS(FakeSocket())
        protocol = Closable(tls)
        clock = Clock()
        closeBounded(protocol, clock, 2.0)
        clock.advance(1.99)
        self.assertFalse(tls.aborted)
        clock.advance(0.01)
        self.assertTrue(tls.aborted)

    def test_noAbortOnceLost(self):
        """
        A connection lost before the bound is not aborted.
        """
        tls = FakeTLS(FakeSocket())
        protocol = Closable(tls)
        clock = Clock()
        closeBounded(protocol, clock, 2.0)
        protocol.connected = 0
        clock.advance(2)
        self.assertFalse(tls.aborted)

    def test_plainSocket(self):
        """
        The socket's own transport is closed as usual, after its buffer.
        """
        socket = FakeSocket()
        protocol = Closable(socket)
        closeBounded(protocol, Clock(), 2.0)
        self.assertTrue(socket.disconnecting)

    def test_lostAtOnce(self):
        """
        A transport that loses the connection at once: no timer.
        """
        socket = FakeSocket()
        protocol = Closable(socket)

        def lose():
            protocol.connected = 0

        socket.loseConnection = lose
        clock = Clock()
        self.assertIsNone(closeBounded(protocol, clock, 2.0))
        self.assertEqual(clock.getDelayedCalls(), [])
