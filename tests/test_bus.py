# -*- test-case-name: tests.test_bus -*-
"""
Tests for the gate bus (L{imserver.bus.redis}): batching with a fake
connection and a L{Clock}, then a real C{redis-server} for delivery and
resubscription.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imserver.bus import BROADCAST_CHANNEL, channelOf
from imserver.bus.redis import MAX_BATCH_BYTES, MAX_RETRY_BATCHES, RedisGateBus
from imserver.interfaces import IBusReceiver, IGateBus
from imserver.messaging import Messenger
from imserver.metrics import GateMetrics
from imserver.pb import bus_pb2, im_pb2 as pb
from imserver.redisclient import RedisUnavailable
from imserver.registry.remote import RemoteSession
from imserver.settings import Settings
from imserver.store import Delivery
from imserver.wire import EncodedMessage

from tests.support.cluster import FakeSession, RedisTestMixin
from tests.support.live import waitFor
from tests.support.redis import whenConnected


class FakeConnection:
    """
    A L{imserver.redisclient.RedisConnection} that records PUBLISHes.

    @ivar published: C{(channel, message)} in order.
    @ivar down: if true, PUBLISH fails with L{RedisUnavailable}.
    """

    def __init__(self):
        self.published = []
        self.onConnect = []
        self.down = False

    def publish(self, channel, message):
        if self.down:
            return fail(RedisUnavailable("Redis is unavailable"))
        self.published.append((channel, message))
        return succeed(1)

    def batches(self, gateId):
        """
        The batches published to C{gateId}, parsed.
        """
        return [
            bus_pb2.Batch.FromString(message)
            for channel, message in self.published
            if channel == channelOf(gateId)
        ]


class FakeSubscriber:
    subscribed = False

    def __init__(self, channels, onMessage):
        self.channels = channels
        self.onMessage = onMessage
        self.onSubscribe = []

    def start(self):
        self.subscribed = True

    def disconnect(self):
        self.subscribed = False
        return succeed(None)


@implementer(IBusReceiver)
class Receiver:
    """
    Records what the bus hands over.
    """

    def __init__(self):
        self.calls = []

    def forwardReceived(self, encoded, targets):
        self.calls.append(("push", encoded.data, targets))

    def kickReceived(self, uid, deviceId, sessionId, generation, reason, message):
        self.calls.append(("kick", uid, deviceId, sessionId, generation, reason, message))

    def typingReceived(self, toUid, fromUid, active, groupId):
        self.calls.append(("typing", toUid, fromUid, active, groupId))

    def noticeReceived(self, sessionId, frame):
        self.calls.append(("notice", sessionId, frame))

    def broadcastReceived(self, frame):
        self.calls.append(("broadcast", frame))


def message(i, size=10):
    return pb.Message(id=i, sender="bob", recipient="alice", body=b"x" * size)


class BatchingTests(SynchronousTestCase):
    """
    What a gate queues for other gates leaves in one PUBLISH per target
    gate per reactor pass.
    """

    def setUp(self):
        self.clock = Clock()
        self.connection = FakeConnection()
        self.bus = RedisGateBus(self.connection, FakeSubscriber, "gate-a", self.clock)

    def remote(self, uid, gateId, deviceId="phone"):
        return RemoteSession(self.bus, uid, deviceId, pb.IOS, gateId + "/1", gateId, 1)

    def test_interface(self):
        """
        L{RedisGateBus} provides L{IGateBus}; it subscribes to its own
        channel and to the broadcast channel.
        """
        verifyObject(IGateBus, self.bus)
        self.assertEqual(self.bus.subscriber.channels, [b"im:bus:gate-a", b"im:bus:|all"])

    def test_onePublishPerPass(self):
        """
        A hundred pushes to one gate in one reactor pass are one PUBLISH of
        one batch, in order; nothing is published before the pass ends.
        """
        pushes = [EncodedMessage(message(i)) for i in range(100)]
        for i, push in enumerate(pushes):
            self.bus.forward("gate-b", "alice", i + 1, False, push)
        self.assertEqual(self.connection.published, [])
        self.clock.advance(0)
        [batch] = self.connection.batches("gate-b")
        self.assertEqual(len(self.connection.published), 1)
        self.assertEqual(batch.source_gate, "gate-a")
        self.assertEqual(
            [item.push.message for item in batch.items], [push.data for push in pushes]
        )
        self.assertEqual(
            [[(t.uid, t.seq, t.outgoing) for t in item.push.targets] for item in batch.items],
            [[("alice", i + 1, False)] for i in range(100)],
        )
        self.clock.advance(0)
        self.assertEqual(len(self.connection.published), 1)
        self.assertEqual(self.bus.published, 1)

    def test_groupFanOut(self):
        """
        A group message whose members are on two other gates is published
        twice, once per gate, carrying the message once with one target
        per member there (a member with two devices there is one target);
        members on this gate get it directly.
        """
        local = FakeSession("carol", "laptop", "gate-a")
        found = {
            "bob": [self.remote("bob", "gate-b")],
            "dave": [
                self.remote("dave", "gate-b"),
                self.remote("dave", "gate-b", "pad"),
                self.remote("dave", "gate-c"),
            ],
            "erin": [self.remote("erin", "gate-c")],
            "carol": [local],
        }

        class Registry:
            def sessionsForMany(self, uids):
                return succeed({uid: found[uid] for uid in uids if uid in found})

        messenger = Messenger(None, Registry(), self.clock, Settings(), GateMetrics())
        stored = pb.Message(id=42, sender="bob", group_id="team", body=b"hello")
        seqs = {"bob": 5, "carol": 6, "dave": 7, "erin": 8, "frank": 9}
        messenger.publish(Delivery(stored, seqs))
        self.clock.advance(0)
        self.assertEqual(len(self.connection.published), 2)
        for gateId, targets in [
            ("gate-b", [("bob", 5, True), ("dave", 7, False)]),
            ("gate-c", [("dave", 7, False), ("erin", 8, False)]),
        ]:
            [batch] = self.connection.batches(gateId)
            [item] = batch.items
            self.assertEqual(item.push.message, stored.SerializeToString())
            self.assertEqual([(t.uid, t.seq, t.outgoing) for t in item.push.targets], targets)
        [(seq, outgoing, push)] = local.advanced
        self.assertEqual((seq, outgoing, push.message), (6, False, stored))

    def test_typingOncePerUserPerGate(self):
        """
        A typing signal to a user with two devices on another gate is sent
        once: that gate gives it to every session of the user it holds.
        """
        for deviceId in ["phone", "pad"]:
            self.remote("alice", "gate-b", deviceId).typing("bob", True, "")
        self.remote("carol", "gate-b").typing("bob", True, "")
        self.clock.advance(0)
        [batch] = self.connection.batches("gate-b")
        self.assertEqual(
            [(i.typing.to_uid, i.typing.from_uid) for i in batch.items],
            [("alice", "bob"), ("carol", "bob")],
        )

    def test_kinds(self):
        """
        Kicks, typing signals and notices travel in the same batch as
        pushes and reach the receiving gate's L{IBusReceiver} in order.
        """
        self.clock.advance(1000)
        push = EncodedMessage(message(1))
        remote = self.remote("alice", "gate-b")
        remote.kick(pb.REPLACED, "again")
        remote.inboxAdvanced(3, True, push)
        remote.typing("bob", True, "team")
        remote.notice(b"frame")
        self.clock.advance(0)
        [(channel, data)] = self.connection.published
        other = RedisGateBus(FakeConnection(), FakeSubscriber, "gate-b", self.clock)
        other.receiver = receiver = Receiver()
        other.subscriber.onMessage(channel, data)
        self.assertEqual(
            receiver.calls,
            [
                ("kick", "alice", "phone", "gate-b/1", 1, pb.REPLACED, "again"),
                ("push", push.data, [("alice", 3, True)]),
                ("typing", "alice", "bob", True, "team"),
                ("notice", "gate-b/1", b"frame"),
            ],
        )
        self.assertEqual(other.received, 1)
        # The batch carries its publication time: the lag is observed.
        self.assertEqual(bus_pb2.Batch.FromString(data).sent_ms, int(self.clock.seconds() * 1000))
        self.assertEqual(sum(other.lag.counts), 1)

    def test_broadcast(self):
        """
        A broadcast is published at once on the broadcast channel; it
        answers how many other gates got it (the publishing gate's own
        subscription is not counted), reaches every other gate's
        L{IBusReceiver}, and the publishing gate skips its own copy.
        """
        self.bus.start()
        self.connection.publish = lambda channel, data: (
            self.connection.published.append((channel, data)) or succeed(3)
        )
        self.assertEqual(self.successResultOf(self.bus.broadcast(b"frame")), 2)
        [(channel, data)] = self.connection.published
        self.assertEqual(channel, BROADCAST_CHANNEL)
        self.bus.receiver = own = Receiver()
        self.bus.subscriber.onMessage(channel, data)
        self.assertEqual(own.calls, [])
        other = RedisGateBus(FakeConnection(), FakeSubscriber, "gate-b", self.clock)
        other.receiver = receiver = Receiver()
        other.subscriber.onMessage(channel, data)
        self.assertEqual(receiver.calls, [("broadcast", b"frame")])

    def test_broadcastUnavailable(self):
        """
        A broadcast that cannot be published fails with
        L{RedisUnavailable} and is not kept for a retry (the caller
        answers the failure).
        """
        self.connection.down = True
        self.failureResultOf(self.bus.broadcast(b"frame"), RedisUnavailable)
        self.assertEqual(self.bus._retry, [])
        self.connection.down = False
        for hook in self.connection.onConnect:
            hook()
        self.assertEqual(self.connection.published, [])

    def test_garbage(self):
        """
        A message that is not a batch is dropped with a warning.
        """
        self.bus.receiver = receiver = Receiver()
        self.bus.subscriber.onMessage(b"im:bus:gate-a", b"\xff\xff not protobuf")
        self.assertEqual(receiver.calls, [])
        self.assertEqual(self.bus.received, 0)

    def test_receiverFailure(self):
        """
        An item the receiver fails on is logged; the rest of the batch is
        still handed over.
        """

        class Failing(Receiver):
            def kickReceived(self, *args):
                raise RuntimeError("boom")

        self.remote("alice", "gate-b").kick(pb.ADMIN, "x")
        self.remote("alice", "gate-b").typing("bob", False, "")
        self.clock.advance(0)
        [(channel, data)] = self.connection.published
        self.bus.receiver = receiver = Failing()
        self.bus.subscriber.onMessage(channel, data)
        self.assertEqual(receiver.calls, [("typing", "alice", "bob", False, "")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bigBatches(self):
        """
        A gate's batch is published as soon as the messages it carries
        exceed L{MAX_BATCH_BYTES}, so one pass of big fan-out is several
        PUBLISHes of bounded size.
        """
        size = MAX_BATCH_BYTES // 4  # a little more once serialized
        for i in range(10):
            self.bus.forward("gate-b", "alice", i + 1, False, EncodedMessage(message(i, size)))
        self.assertEqual(len(self.connection.published), 2)
        self.clock.advance(0)
        batches = self.connection.batches("gate-b")
        self.assertEqual([len(b.items) for b in batches], [4, 4, 2])
        self.assertTrue(all(len(b.SerializeToString()) < 2 * MAX_BATCH_BYTES for b in batches))

    def test_retryAfterReconnect(self):
        """
        A batch that cannot be published while Redis is unavailable is
        published once the connection is back (up to a bound).
        """
        self.connection.down = True
        self.bus.forward("gate-b", "alice", 1, False, EncodedMessage(message(1)))
        self.clock.advance(0)
        self.assertEqual(self.connection.published, [])
        self.connection.down = False
        for hook in self.connection.onConnect:
            hook()
        [batch] = self.connection.batches("gate-b")
        self.assertEqual(batch.items[0].push.targets[0].seq, 1)
        self.connection.down = True
        for i in range(MAX_RETRY_BATCHES + 5):
            self.bus.typing("gate-{}".format(i), "alice", "bob", True, "")
        self.clock.advance(0)
        self.assertEqual(len(self.bus._retry), MAX_RETRY_BATCHES)

    def test_stop(self):
        """
        Stopping publishes what is queued, then closes the subscriber.
        """
        self.bus.start()
        self.bus.typing("gate-b", "alice", "bob", True, "")
        self.successResultOf(self.bus.stop())
        self.assertEqual(len(self.connection.published), 1)
        self.assertFalse(self.bus.subscribed)


class RedisBusTests(RedisTestMixin, TestCase):
    """
    The bus over a real C{redis-server}.
    """

    @inlineCallbacks
    def setUp(self):
        yield self.startRedis()
        self.a = yield self.gate("gate-a")
        self.b = yield self.gate("gate-b")

    @inlineCallbacks
    def test_resubscribe(self):
        """
        After Redis restarts the subscriber connects and subscribes again
        by itself (C{onSubscribe} runs again), and what is published to
        the gate arrives again.
        """
        subscribed = []
        self.b.bus.subscriber.onSubscribe.append(lambda: subscribed.append(True))
        lost = [Deferred() for i in range(3)]
        for hooks, d in zip(
            [
                self.b.bus.subscriber.onUnsubscribe,
                self.a.connection.onDisconnect,
                self.b.connection.onDisconnect,
            ],
            lost,
        ):
            hooks.append(lambda d=d: d.callback(None))
        yield self.server.kill()
        for d in lost:
            yield d
        self.assertFalse(self.b.bus.subscribed)
        yield self.server.start()
        started = reactor.seconds()
        yield waitFor(lambda: subscribed)
        self.assertLess(reactor.seconds() - started, 5)
        yield whenConnected(self.a.connection)
        yield whenConnected(self.b.connection)
        session = self.b.session("alice", "phone")
        yield self.b.registry.refreshLease()
        yield self.b.registry.register(session)
        [remote] = yield self.a.registry.sessionsFor("alice")
        remote.inboxAdvanced(1, False, EncodedMessage(message(1)))
        yield waitFor(lambda: session.advanced)
        self.assertEqual(session.advanced[0][:2], (1, False))

    @inlineCallbacks
    def test_ping(self):
        """
        A ping over the subscribed connection is answered.
        """
        self.assertTrue((yield self.b.bus.ping()))
