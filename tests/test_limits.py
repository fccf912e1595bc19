# -*- test-case-name: tests.test_limits -*-
"""
Tests for the limits against abuse (L{imserver.limits} and their use by the
gate): connections per process and per address and the accept rate (closed
at accept, before TLS), the request rate, failed-auth throttling, and slow
consumers paused without loss and closed after the grace period.
"""

import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import tap
from imserver.auth import loadSecret, mintToken
from imserver.client import connect
from imserver.limits import AdmissionFactory, FailedAuthThrottle, TokenBucket
from imserver.pb import im_pb2 as pb

from tests.support import startServer, withoutSecretEnvironment
from tests.support.frames import written
from tests.support.gate import DeliveryHarness, pushes, responses


def address(host):
    return IPv4Address("TCP", host, 40000)


class TokenBucketTests(SynchronousTestCase):
    """
    L{TokenBucket}.
    """

    def test_burstThenRate(self):
        """
        A full bucket gives C{burst} at once, then C{rate} per second.
        """
        clock = Clock()
        bucket = TokenBucket(2.0, 3, clock)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([bucket.take(), bucket.take()], [True, False])
        clock.advance(100)
        self.assertEqual(bucket.level(), 3)


class AdmissionTests(SynchronousTestCase):
    """
    L{AdmissionFactory} with the gate's limits.
    """

    def setUp(self):
        self.gate = DeliveryHarness(
            self, max_connections=3, max_connections_per_ip=2, accept_rate=1000
        )
        self.factory = self.gate.factory
        self.admission = AdmissionFactory(self.factory, self.factory)

    def accept(self, host):
        protocol = self.admission.buildProtocol(address(host))
        if protocol is not None:
            protocol.makeConnection(StringTransport())
        return protocol

    def refused(self, reason):
        return self.factory.metrics.connectionsRefused[reason]

    def test_perAddress(self):
        """
        A third connection from one address is refused; another address is
        still welcome, and a closed connection frees its place.
        """
        first = self.accept("10.0.0.1")
        self.assertIsNotNone(self.accept("10.0.0.1"))
        self.assertIsNone(self.accept("10.0.0.1"))
        self.assertEqual(self.refused("max_connections_per_ip"), 1)
        self.assertIsNotNone(self.accept("10.0.0.2"))
        first.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.accept("10.0.0.1"))
        self.assertIsNone(self.accept("10.0.0.3"))  # the process is full
        self.assertEqual(self.refused("max_connections"), 1)

    def test_perProcess(self):
        """
        Beyond C{max_connections} every address is refused, until one
        closes.
        """
        opened = [self.accept("10.0.0.{}".format(i)) for i in range(3)]
        self.assertIsNone(self.accept("10.0.0.9"))
        opened[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(self.accept("10.0.0.9"))

    def test_notPerAddressBehindProxy(self):
        """
        Behind a PROXY-protocol wrapper every connection comes from the
        proxy: the per-address limit does not apply there.
        """
        admission = AdmissionFactory(self.factory, self.factory, perPeer=False)
        for _ in range(3):
            self.assertIsNotNone(admission.buildProtocol(address("10.0.0.1")))

    def test_acceptRate(self):
        """
        Accepts beyond C{accept_rate} per second are refused until tokens
        come back.
        """
        gate = DeliveryHarness(self, accept_rate=2)
        admission = AdmissionFactory(gate.factory, gate.factory)
        results = [admission.buildProtocol(address("10.0.0.{}".format(i))) for i in range(3)]
        self.assertIsNone(results[2])
        self.assertEqual(gate.factory.metrics.connectionsRefused["accept_rate"], 1)
        gate.clock.advance(1)
        self.assertIsNotNone(admission.buildProtocol(address("10.0.0.5")))


class RequestRateTests(SynchronousTestCase):
    """
    The per-connection request rate.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, request_rate=1, request_burst=2, rate_limit_close=3)
        self.protocol, self.transport, _, _ = self.gate.login("alice")  # 1 request

    def ping(self, seq):
        self.gate.request(self.protocol, "ping", pb.PingRequest(), seq=seq)
        return responses(written(self.transport))

    def test_rateLimited(self):
        """
        Beyond the burst a request is answered C{RATE_LIMITED}; the
        connection stays, and works again once tokens come back.
        """
        self.assertFalse(self.ping(2)[0].HasField("error"))
        [refused] = self.ping(3)
        self.assertEqual((refused.seq, refused.error.code), (3, pb.RATE_LIMITED))
        self.assertFalse(self.transport.disconnecting)
        self.gate.clock.advance(1)
        self.assertFalse(self.ping(4)[0].HasField("error"))
        self.assertEqual(self.gate.factory.metrics.rateLimited, 1)

    def test_seqCheckedFirst(self):
        """
        A bad seq is a C{DUPLICATE_SEQ} error even when the connection is
        out of requests: the seq is checked before the rate.
        """
        self.ping(2)
        self.ping(3)  # refused: no tokens left
        self.gate.request(self.protocol, "ping", pb.PingRequest(), seq=0)
        [error] = written(self.transport)
        self.assertEqual((error.kind, error.error.code), (pb.ERROR, pb.DUPLICATE_SEQ))

    def test_acksAreNotCounted(self):
        """
        Acks (notifies) do not use up requests.
        """
        for _ in range(10):
            self.gate.ack(self.protocol, 0)
        self.assertFalse(self.ping(2)[0].HasField("error"))

    def test_sustainedAbuseCloses(self):
        """
        After C{rate_limit_close} refusals in a row the connection is
        closed with an C{RATE_LIMITED} error frame.
        """
        self.ping(2)
        self.ping(3)
        self.ping(4)
        self.gate.request(self.protocol, "ping", pb.PingRequest(), seq=5)
        [error] = written(self.transport)
        self.assertEqual((error.kind, error.error.code), (pb.ERROR, pb.RATE_LIMITED))
        self.assertTrue(self.transport.disconnecting)


class FailedAuthTests(SynchronousTestCase):
    """
    Failed-auth throttling per address and per uid.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, auth_failure_rate=0.5, auth_failure_burst=2)

    def auth(self, uid, token=None):
        protocol, transport = self.gate.connect()
        self.gate.request(
            protocol,
            "auth",
            pb.AuthRequest(
                uid=uid,
                device_id="phone",
                token=token if token is not None else self.gate.token(uid),
            ),
        )
        [response] = responses(written(transport))
        return response

    def test_throttled(self):
        """
        After C{auth_failure_burst} bad tokens from one address, even a good
        token is refused C{RATE_LIMITED} (and the connection closed) until
        the bucket refills.
        """
        for _ in range(2):
            self.assertEqual(self.auth("alice", "v1.1.bad").error.code, pb.AUTH_FAILED)
        self.assertEqual(self.auth("bob").error.code, pb.RATE_LIMITED)
        self.assertEqual(self.gate.factory.metrics.authFailures["throttled"], 1)
        self.gate.clock.advance(2)
        self.assertFalse(self.auth("bob").HasField("error"))

    def test_perUid(self):
        """
        Bad tokens for one uid throttle that uid from any address.
        """
        throttle = FailedAuthThrottle(0.5, 2, Clock())
        throttle.failed("10.0.0.1", "alice")
        throttle.failed("10.0.0.2", "alice")
        self.assertFalse(throttle.allowed("10.0.0.3", "alice"))
        self.assertTrue(throttle.allowed("10.0.0.3", "bob"))

    def test_bounded(self):
        """
        The throttle forgets what it must to stay bounded.
        """
        throttle = FailedAuthThrottle(0.5, 2, Clock())
        throttle.MAX_TRACKED = 10
        for i in range(100):
            throttle.failed("10.0.{}.1".format(i), "u{}".format(i))
        self.assertLessEqual(len(throttle._buckets), 10)


class SlowConsumerTests(SynchronousTestCase):
    """
    A connection whose write buffer is full is paused, not fed: its
    entries wait in the inbox.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, slow_consumer_grace=5)
        self.bob, self.bobT, _, _ = self.gate.login("bob")
        self.alice, self.aliceT, _, _ = self.gate.login("alice")

    def test_pausedThenResumed(self):
        """
        While paused nothing is pushed; on resume the waiting entries come
        in order, none lost.
        """
        self.bob.pauseProducing()
        self.gate.send(self.alice, "bob", "m1")
        self.gate.send(self.alice, "bob", "m2")
        self.assertEqual(pushes(written(self.bobT)), [])
        self.bob.resumeProducing()
        self.assertEqual([e.seq for e in pushes(written(self.bobT))], [1, 2])
        self.assertEqual(self.gate.factory.metrics.slowConsumerPauses, 1)

    def test_closedAfterGrace(self):
        """
        A connection paused for the grace period is closed with
        C{SLOW_CONSUMER} by the sweep; one paused for less is kept.
        """
        self.bob.pauseProducing()
        self.gate.clock.advance(4)
        self.gate.factory.sweep()
        self.assertFalse(self.bobT.disconnecting)
        self.gate.clock.advance(1)
        self.gate.factory.sweep()
        [error] = written(self.bobT)
        self.assertEqual((error.kind, error.error.code), (pb.ERROR, pb.SLOW_CONSUMER))
        self.assertTrue(self.bobT.disconnecting)
        self.assertEqual(self.gate.factory.metrics.slowConsumerCloses, 1)

    def test_registeredAsProducer(self):
        """
        The gate registers each connection as a streaming producer of its
        transport, and unregisters it when closing (or the transport would
        never close).
        """
        self.assertIs(self.bobT.producer, self.bob)
        self.assertTrue(self.bobT.streaming)
        self.bob.close()
        self.assertIsNone(self.bobT.producer)


class LiveLimitsTests(TestCase):
    """
    Limits on a real gate over loopback TLS.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        withoutSecretEnvironment(self)
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.mktemp(),
                "--store",
                "memory",
                "--api",
                "none",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--max-connections",
                "2",
            ]
        )
        self.root = startServer(self, options)
        self.gate = self.root.getServiceNamed("gate")
        [address] = yield self.gate.addresses()
        self.port = address.port
        self.dataDir = options["data-dir"]

    @inlineCallbacks
    def test_refusedBeforeTLS(self):
        """
        Beyond C{max_connections} a connection is closed at once, before
        any TLS handshake; the gate and its sessions carry on.
        """
        secret = loadSecret(FilePath(self.dataDir), environ={})
        caFile = FilePath(self.dataDir).child("tls-cert.pem").path
        clients = []
        for uid in ["alice", "bob"]:
            client = yield connect(
                reactor,
                "127.0.0.1",
                self.port,
                uid,
                mintToken(secret, uid, 60, time.time()),
                "phone",
                caFile=caFile,
                hostname="localhost",
            )
            clients.append(client)
            self.addCleanup(client.close)
        closed = Deferred()

        class Raw(Protocol):
            def connectionLost(self, reason):
                closed.callback(self.received)

            received = b""

            def dataReceived(self, data):
                Raw.received += data

        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), Raw())
        received = yield closed
        self.assertEqual(received, b"")  # not even a TLS alert: closed at accept
        self.assertEqual(self.gate.factory.metrics.connectionsRefused["max_connections"], 1)
        response = yield clients[0].ping()
        self.assertTrue(response.server_time_ms)
