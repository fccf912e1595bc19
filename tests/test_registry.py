# -*- test-case-name: tests.test_registry -*-
"""
Tests for session registries: one suite, run against every implementation
of L{ISessionRegistry} (the Redis one against a real C{redis-server}, and
against a real Redis Cluster), then what only the cluster registry does:
generations, kicks across gates, leases, re-registration; on one Redis,
then on a Redis Cluster (L{tests.support.rediscluster.RedisCluster}, one
per test: a few seconds each).
"""

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from imserver.errors import TooManyDevices, Unavailable
from imserver.interfaces import ISession, ISessionRegistry
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisUnavailable, userTag
from imserver.rediscluster import (
    SLOTS,
    ClusterConnection,
    keySlot,
    parseRedisURL,
)
from imserver.registry import redis as registryModule
from imserver.registry.memory import MemorySessionRegistry
from imserver.registry.redis import (
    CLOCK_MARGIN_US,
    CLUSTER_LEASES_KEY,
    GENERATION_KEY,
    RedisSessionRegistry,
    clusterGenerationKey,
    parseEntry,
    sessionsKey,
    slotTag,
)
from imserver.registry.redisdirectory import CLUSTER_GATES_KEY, RedisGateDirectory
from imserver.registry.remote import RemoteSession
from imserver.wire import EncodedMessage

from tests.support.cluster import FakeGate, FakeSession, RedisTestMixin
from tests.support.live import waitFor
from tests.support.redis import whenConnected
from tests.support.rediscluster import RedisCluster


class RegistryTestsMixin:
    """
    The behaviour every L{ISessionRegistry} shares.  Subclasses provide
    C{makeRegistry(maxDevices)} (which may return a L{Deferred}).
    """

    @inlineCallbacks
    def setUp(self):
        self.registry = yield self.makeRegistry(maxDevices=3)

    def test_interface(self):
        """
        The registry provides L{ISessionRegistry}.
        """
        verifyObject(ISessionRegistry, self.registry)

    @inlineCallbacks
    def test_registerAndLookup(self):
        """
        Registered sessions are found by uid and counted.
        """
        a, b = FakeSession("alice", "phone"), FakeSession("alice", "laptop")
        self.assertIsNone((yield self.registry.register(a)))
        self.assertIsNone((yield self.registry.register(b)))
        yield self.registry.register(FakeSession("bob", "phone"))
        self.assertEqual(set((yield self.registry.sessionsFor("alice"))), {a, b})
        self.assertEqual((yield self.registry.sessionsFor("carol")), [])
        self.assertEqual((yield self.registry.count()), 3)

    @inlineCallbacks
    def test_sessionsForMany(self):
        """
        One lookup for many uids returns the sessions of those that have
        any.
        """
        a, b = FakeSession("alice", "phone"), FakeSession("alice", "laptop")
        c = FakeSession("bob", "phone")
        for session in (a, b, c, FakeSession("dave", "phone")):
            yield self.registry.register(session)
        found = yield self.registry.sessionsForMany(["alice", "bob", "carol"])
        self.assertEqual({uid: set(s) for uid, s in found.items()}, {"alice": {a, b}, "bob": {c}})
        self.assertEqual((yield self.registry.sessionsForMany([])), {})

    @inlineCallbacks
    def test_displace(self):
        """
        Registering the same uid and device again returns the displaced
        session; the count stays.
        """
        old, new = FakeSession("alice", "phone"), FakeSession("alice", "phone")
        yield self.registry.register(old)
        self.assertIs((yield self.registry.register(new)), old)
        self.assertEqual((yield self.registry.sessionsFor("alice")), [new])
        self.assertEqual((yield self.registry.count()), 1)

    @inlineCallbacks
    def test_staleUnregister(self):
        """
        Unregistering a displaced session never removes the newer one.
        """
        old, new = FakeSession("alice", "phone"), FakeSession("alice", "phone")
        yield self.registry.register(old)
        yield self.registry.register(new)
        self.assertFalse((yield self.registry.unregister(old)))
        self.assertEqual((yield self.registry.sessionsFor("alice")), [new])
        self.assertTrue((yield self.registry.unregister(new)))
        self.assertEqual((yield self.registry.sessionsFor("alice")), [])
        self.assertEqual((yield self.registry.count()), 0)

    @inlineCallbacks
    def test_unregisterUnknown(self):
        """
        Unregistering a session never registered is a no-op.
        """
        self.assertFalse((yield self.registry.unregister(FakeSession("x", "y"))))

    @inlineCallbacks
    def test_maxDevices(self):
        """
        A new device beyond the limit fails with L{TooManyDevices}; an
        existing device may still re-register.
        """
        for device in "abc":
            yield self.registry.register(FakeSession("alice", device))
        yield self.assertFailure(self.registry.register(FakeSession("alice", "d")), TooManyDevices)
        self.assertIsNotNone((yield self.registry.register(FakeSession("alice", "a"))))
        self.assertEqual((yield self.registry.count()), 3)
        self.assertEqual(len((yield self.registry.sessionsFor("alice"))), 3)

    @inlineCallbacks
    def test_oddUids(self):
        """
        Uids and device ids with characters that mean something in key
        names or entries are kept apart.
        """
        sessions = [
            FakeSession(uid, device)
            for uid, device in [
                ("a}b", "x|y"),
                ("a", "}b|"),
                ("{u:61}", "d"),
                ("élan", "d"),
                ("a:b", "d"),
            ]
        ]
        for session in sessions:
            yield self.registry.register(session)
        for session in sessions:
            self.assertEqual((yield self.registry.sessionsFor(session.uid)), [session])


class MemoryRegistryTests(RegistryTestsMixin, TestCase):
    """
    L{MemorySessionRegistry}.
    """

    def makeRegistry(self, maxDevices):
        return MemorySessionRegistry(maxDevices=maxDevices)


# -- the cluster registry ----------------------------------------------------------


class RedisRegistryTests(RedisTestMixin, RegistryTestsMixin, TestCase):
    """
    L{RedisSessionRegistry} passes the shared suite.
    """

    @inlineCallbacks
    def makeRegistry(self, maxDevices):
        yield self.startRedis()
        gate = yield self.gate("g", maxDevices=maxDevices)
        return gate.registry


class ClusterRegistryTests(RedisTestMixin, TestCase):
    """
    What only the cluster registry does, with two or three "gates" in this
    process sharing one C{redis-server}, each with its own connections and
    bus.
    """

    @inlineCallbacks
    def setUp(self):
        # With an AOF: a test that stops Redis gets its data back.
        yield self.startRedis(appendfsync="always")
        self.a = yield self.gate("gate-a")
        self.b = yield self.gate("gate-b")

    @inlineCallbacks
    def restart(self, stop, down=False):
        """
        Stop Redis with C{stop} (if given) and wait until both gates'
        connections saw it; unless C{down}, start it again and wait until
        both are connected again.
        """
        if stop is not None:
            gates = [self.a, self.b]
            lost = [Deferred() for gate in gates]
            for gate, d in zip(gates, lost):
                gate.connection.onDisconnect.append(lambda d=d: d.callback(None))
            yield stop()
            for d in lost:
                yield d
        if not down:
            yield self.server.start()
            yield whenConnected(self.a.connection)
            yield whenConnected(self.b.connection)

    def test_userTag(self):
        """
        A user's keys share a hash tag made of the hex of the uid's UTF-8,
        so no uid can close the tag early.
        """
        self.assertEqual(userTag("a}b"), "u:617d62")
        self.assertEqual(sessionsKey("é"), "im:{u:c3a9}:sessions")

    @inlineCallbacks
    def test_generations(self):
        """
        Every registration gets a larger generation than any before it,
        and at least Redis's clock in microseconds, so generations keep
        growing even when Redis lost its counter.
        """
        generations = []
        for i, gate in enumerate([self.a, self.b, self.a]):
            yield gate.registry.register(gate.session("alice", "d{}".format(i)))
            entries = yield self.entries("alice")
            generations.append(entries["d{}".format(i)][2])
        self.assertEqual(sorted(generations), generations)
        self.assertEqual(len(set(generations)), 3)
        seconds, micros = yield self.a.connection.execute("TIME")
        self.assertLessEqual(generations[-1], int(seconds) * 1000000 + int(micros))
        self.assertGreater(generations[0], (int(seconds) - 60) * 1000000)
        yield self.a.connection.execute("DEL", GENERATION_KEY)
        yield self.b.registry.register(self.b.session("bob", "d9"))
        entries = yield self.entries("bob")
        self.assertGreater(entries["d9"][2], generations[-1])

    @inlineCallbacks
    def test_fencing(self):
        """
        A stale unregister (of a session a newer login displaced) deletes
        nothing, on any gate.
        """
        old, new = self.a.session("alice", "phone"), self.b.session("alice", "phone")
        yield self.a.registry.register(old)
        displaced = yield self.b.registry.register(new)
        self.assertIsInstance(displaced, RemoteSession)
        self.assertFalse((yield self.a.registry.unregister(old)))
        entries = yield self.entries("alice")
        self.assertEqual(entries["phone"][4], new.sessionId)
        self.assertEqual(
            (yield self.a.registry.sessionsFor("alice")),
            [
                RemoteSession(
                    None, "alice", "phone", pb.DESKTOP, new.sessionId, "gate-b", entries["phone"][2]
                )
            ],
        )
        self.assertTrue((yield self.b.registry.unregister(new)))
        self.assertEqual((yield self.entries("alice")), {})

    @inlineCallbacks
    def test_kickAcrossGates(self):
        """
        A login on gate B for a uid+device held on gate A displaces A's
        session: register answers a L{RemoteSession} for it, and kicking
        that kicks the session on A (over the bus) with the reason given.
        """
        old, new = self.a.session("alice", "phone"), self.b.session("alice", "phone")
        yield self.a.registry.register(old)
        displaced = yield self.b.registry.register(new)
        self.assertEqual(
            (
                displaced.uid,
                displaced.deviceId,
                displaced.sessionId,
                displaced.gateId,
                displaced.platform,
            ),
            ("alice", "phone", old.sessionId, "gate-a", pb.DESKTOP),
        )
        verifyObject(ISession, displaced)
        displaced.kick(pb.REPLACED, "the same device signed in again")
        yield waitFor(lambda: old.kicks)
        self.assertEqual(old.kicks, [pb.REPLACED])
        self.assertEqual(new.kicks, [])

    @inlineCallbacks
    def test_staleKick(self):
        """
        A kick naming another generation of the session (an older lookup)
        is ignored; so is one for a session the gate no longer holds.
        """
        session = self.a.session("alice", "phone")
        yield self.a.registry.register(session)
        [remote] = yield self.b.registry.sessionsFor("alice")
        RemoteSession(
            self.b.bus,
            "alice",
            "phone",
            pb.DESKTOP,
            session.sessionId,
            "gate-a",
            remote.generation - 1,
        ).kick(pb.ADMIN, "old")
        RemoteSession(
            self.b.bus, "alice", "phone", pb.DESKTOP, "gate-a/nope", "gate-a", remote.generation
        ).kick(pb.ADMIN, "gone")
        remote.kick(pb.ADMIN, "now")
        yield waitFor(lambda: session.kicks)
        self.assertEqual(session.kicks, [pb.ADMIN])
        self.assertEqual(self.a.bus.received, 1)

    @inlineCallbacks
    def test_kickBeforeRegisterAnswer(self):
        """
        A kick that arrives for a session whose registration is still
        unanswered waits for the answer, and applies if it names that
        registration's generation.
        """
        yield self.a.connection.execute("SET", GENERATION_KEY, b"5000000000000000")
        first, second = self.a.session("alice", "a"), self.a.session("alice", "b")
        d1 = self.a.registry.register(first)
        self.a.registry.kickReceived(
            "alice", "a", first.sessionId, 5000000000000001, pb.REPLACED, "displaced"
        )
        yield d1
        self.assertEqual(first.kicks, [pb.REPLACED])
        d2 = self.a.registry.register(second)
        self.a.registry.kickReceived("alice", "b", second.sessionId, 4, pb.REPLACED, "old")
        yield d2
        self.assertEqual(second.kicks, [])

    @inlineCallbacks
    def test_deliveryAcrossGates(self):
        """
        A lookup on A gives L{RemoteSession}s for B's sessions; what is
        done to them reaches B's sessions over the bus: the message push
        (the same frame), typing and notices.
        """
        local = self.a.session("alice", "laptop")
        phone, tablet = self.b.session("alice", "phone"), self.b.session("alice", "tablet")
        bob = self.b.session("bob", "phone")
        for gate, session in [(self.a, local), (self.b, phone), (self.b, tablet), (self.b, bob)]:
            yield gate.registry.register(session)
        found = yield self.a.registry.sessionsForMany(["alice", "bob"])
        self.assertIn(local, found["alice"])
        remote = [s for s in found["alice"] + found["bob"] if s is not local]
        self.assertEqual(
            sorted(s.sessionId for s in remote),
            sorted([phone.sessionId, tablet.sessionId, bob.sessionId]),
        )
        push = EncodedMessage(pb.Message(id=7, sender="bob", recipient="alice", body=b"hi"))
        for session in found["alice"]:
            session.inboxAdvanced(3, False, push)
        for session in found["bob"]:
            session.inboxAdvanced(9, True, push)
            session.typing("alice", True, "")
            session.notice(b"frame")
        yield waitFor(lambda: phone.advanced and tablet.advanced and bob.advanced and bob.notices)
        self.assertEqual(self.a.bus.published, 1)
        for session, seq, outgoing in [(phone, 3, False), (tablet, 3, False), (bob, 9, True)]:
            [(gotSeq, gotOutgoing, gotPush)] = session.advanced
            self.assertEqual((gotSeq, gotOutgoing), (seq, outgoing))
            self.assertEqual(gotPush.frame(seq, outgoing), push.frame(seq, outgoing))
        self.assertEqual(local.advanced, [(3, False, push)])
        self.assertEqual(bob.typings, [("alice", True, "")])
        self.assertEqual(bob.notices, [b"frame"])

    @inlineCallbacks
    def test_leaseExpiry(self):
        """
        A gate that stops refreshing its lease loses its sessions when the
        lease expires: lookups ignore (and delete) them, registering the
        same device elsewhere displaces nothing, and they no longer count
        against the device limit.  When the gate finds its lease lapsed,
        it re-registers them, except where a newer login took the device:
        that session is kicked.
        """
        # Gates share one lease time in production, which bounds the
        # margin; here only C's lease is short.
        self.patch(registryModule, "CLOCK_MARGIN_US", 100000)
        c = yield self.gate("gate-c", leaseSeconds=0.3)
        phone, laptop = c.session("alice", "phone"), c.session("alice", "laptop")
        tablet = c.session("alice", "tablet")
        for session in (phone, laptop, tablet):
            yield c.registry.register(session)
        self.assertEqual(len((yield self.a.registry.sessionsFor("alice"))), 3)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual((yield self.a.registry.sessionsFor("alice")), [])
        self.assertEqual((yield self.entries("alice")), {})
        newPhone, watch = self.a.session("alice", "phone"), self.a.session("alice", "watch")
        self.assertIsNone((yield self.a.registry.register(newPhone)))
        self.assertIsNone((yield self.a.registry.register(watch)))

        self.assertTrue((yield c.registry.refreshLease()))
        self.assertFalse((yield c.registry.refreshLease()))
        self.assertEqual((yield c.registry.reconcile()), (2, 1))
        self.assertEqual(phone.kicks, [pb.REPLACED])
        self.assertEqual((laptop.kicks, tablet.kicks), ([], []))
        entries = yield self.entries("alice")
        self.assertEqual(
            {device: entry[4] for device, entry in entries.items()},
            {
                "phone": newPhone.sessionId,
                "watch": watch.sessionId,
                "laptop": laptop.sessionId,
                "tablet": tablet.sessionId,
            },
        )
        self.assertFalse((yield c.registry.unregister(phone)))
        self.assertEqual((yield c.registry.count()), 2)

    @inlineCallbacks
    def test_newIncarnation(self):
        """
        A gate restarted under the same id (a new incarnation) makes the
        entries of its previous run dead at once, without waiting for the
        lease to expire.
        """
        yield self.a.registry.register(self.a.session("alice", "phone"))
        again = yield self.gate("gate-a")
        self.assertNotEqual(again.registry.incarnation, self.a.registry.incarnation)
        self.assertEqual((yield self.b.registry.sessionsFor("alice")), [])

    @inlineCallbacks
    def test_withdrawLease(self):
        """
        Withdrawing a gate's lease (it stops) makes its sessions dead; a
        newer incarnation's lease is never withdrawn by an older one.
        """
        yield self.a.registry.register(self.a.session("alice", "phone"))
        yield self.a.registry.withdrawLease()
        self.assertEqual((yield self.b.registry.sessionsFor("alice")), [])
        again = yield self.gate("gate-b")
        yield self.b.registry.withdrawLease()
        yield again.registry.register(again.session("bob", "phone"))
        self.assertEqual(len((yield self.a.registry.sessionsFor("bob"))), 1)

    @inlineCallbacks
    def test_orphanedLocalEntry(self):
        """
        An entry naming this gate and a session it does not hold (its
        registration's answer was lost) is ignored and deleted by this
        gate's lookups.
        """
        session = self.a.session("alice", "phone")
        yield self.a.registry.register(session)
        self.a.registry._forget(self.a.registry._local[session.sessionId])
        self.assertEqual((yield self.a.registry.sessionsFor("alice")), [])
        yield waitFor(lambda: not self.a.registry._pending)
        self.assertEqual((yield self.entries("alice")), {})

    @inlineCallbacks
    def test_wipedRedis(self):
        """
        After Redis restarts empty, a gate's reconcile registers its
        sessions again with their generations, and raises the counter past
        them.
        """
        sessions = [self.a.session("alice", "phone"), self.a.session("bob", "phone")]
        for session in sessions:
            yield self.a.registry.register(session)
        before = yield self.entries("alice")
        yield self.restart(self.server.wipe)
        self.assertEqual((yield self.b.registry.sessionsFor("alice")), [])
        self.assertTrue((yield self.a.registry.refreshLease()))
        self.assertEqual((yield self.a.registry.reconcile()), (2, 0))
        self.assertEqual((yield self.entries("alice")), before)
        found = yield self.b.registry.sessionsForMany(["alice", "bob"])
        self.assertEqual(
            sorted(s.sessionId for ss in found.values() for s in ss),
            sorted(s.sessionId for s in sessions),
        )
        counter = yield self.a.connection.execute("GET", GENERATION_KEY)
        self.assertGreaterEqual(int(counter), before["phone"][2])
        self.assertEqual((yield self.a.registry.reconcile()), (0, 0))

    @inlineCallbacks
    def test_newestWinsAfterWipe(self):
        """
        Two gates that both still hold a session for one device (the kick
        of the older one never arrived) re-register after Redis restarted
        empty: whatever the order, the newer registration keeps the device
        and the older session is kicked, once each way, never back and
        forth.
        """
        for first, second in [(self.a, self.b), (self.b, self.a)]:
            old = self.a.session("alice", "phone")
            new = self.b.session("alice", "phone")
            yield self.a.registry.register(old)
            yield self.b.registry.register(new)  # the displaced one is not kicked
            yield self.a.connection.execute("FLUSHALL")
            for gate in (self.a, self.b):
                yield gate.registry.refreshLease()
            yield first.registry.reconcile()
            yield second.registry.reconcile()
            yield waitFor(lambda old=old: old.kicks)
            entries = yield self.entries("alice")
            self.assertEqual(entries["phone"][4], new.sessionId)
            self.assertEqual(new.kicks, [])
            yield self.a.registry.reconcile()
            yield self.b.registry.reconcile()
            self.assertEqual((yield self.entries("alice"))["phone"][4], new.sessionId)
            self.assertEqual(new.kicks, [])
            yield self.a.registry.unregister(old)
            yield self.b.registry.unregister(new)

    @inlineCallbacks
    def test_unavailable(self):
        """
        While Redis is down, register fails with L{Unavailable} (an
        C{UNAVAILABLE} answer, retryable) and lookups fail the same way;
        unregistering succeeds locally and the entry is deleted by the
        reconcile once Redis is back.
        """
        gone, stays = self.a.session("alice", "phone"), self.a.session("alice", "laptop")
        yield self.a.registry.register(gone)
        yield self.a.registry.register(stays)
        yield self.restart(self.server.stop, down=True)
        failure = yield self.assertFailure(
            self.a.registry.register(self.a.session("bob", "phone")), Unavailable
        )
        self.assertEqual(failure.code, pb.UNAVAILABLE)
        yield self.assertFailure(self.a.registry.sessionsFor("alice"), Unavailable)
        self.assertFalse((yield self.a.registry.unregister(gone)))
        self.assertEqual((yield self.a.registry.count()), 1)
        yield self.restart(None)
        yield self.a.registry.refreshLease()
        self.assertEqual((yield self.a.registry.reconcile()), (0, 0))
        self.assertEqual(list((yield self.entries("alice"))), ["laptop"])
        self.assertEqual(self.a.registry._orphans, set())


# -- the cluster registry on a Redis Cluster ----------------------------------------


#: The SHA-1 of each script of one Redis, as they were before cluster mode:
#: single-Redis mode runs exactly the same scripts.
SINGLE_REDIS_SCRIPTS = {
    "registry.register": "dbdc4be4093217fe7d942c976cb5b73f3c713d7f",
    "registry.unregister": "6fc26b6e2468983ca8df364e4be967ead191e139",
    "registry.lookup": "eddf490b82cf83495a681839acba2da6355b4e36",
    "registry.restore": "ab5e2277af56682930dad7b25ad4106f3c23804b",
    "registry.withdraw": "55d885e5dc47cd61d043b8c310c65857aff0d8df",
    "directory.gates": "36148faee406d3fa3853d40a85bb75a2387857ff",
}


class _ScriptRecorder:
    """
    A connection that records the scripts made on it, and has no cluster.
    """

    def __init__(self):
        self.scripts = {}

    def script(self, source, name=None):
        self.scripts[name] = hashlib.sha1(source.encode("utf-8")).hexdigest()
        return lambda keys=(), args=(): None


class _Bus:
    receiver = None


class ModeTests(SynchronousTestCase):
    """
    Which mode the registry and the directory choose, and what each runs.
    """

    def test_singleRedisUnchanged(self):
        """
        With one Redis, the registry and the directory run the scripts they
        ran before cluster mode existed, on the same keys.
        """
        connection = _ScriptRecorder()
        registry = RedisSessionRegistry(connection, _Bus(), Clock(), "g")
        directory = RedisGateDirectory(connection)
        self.assertFalse(registry.cluster)
        self.assertEqual(connection.scripts, SINGLE_REDIS_SCRIPTS)
        self.assertEqual(registry.leaseKey, "im:gate:g")
        self.assertEqual(directory.key, "im:gates")
        self.assertEqual(registry._viewArgs(), [])
        self.assertEqual(registry._generationKey("alice"), GENERATION_KEY)

    def test_clusterMode(self):
        """
        A L{ClusterConnection} selects cluster mode (so does C{cluster=True}):
        the gates' keys share the hash tag C{{gates}}, the generation
        counters are per slot, and the scripts differ; nothing can register
        before the lease gave an incarnation.
        """
        connection = ClusterConnection(Clock(), None, None)
        registry = RedisSessionRegistry(connection, _Bus(), Clock(), "g")
        directory = RedisGateDirectory(connection)
        self.assertTrue(registry.cluster)
        self.assertTrue(
            RedisSessionRegistry(_ScriptRecorder(), _Bus(), Clock(), "g", cluster=True).cluster
        )
        self.assertEqual(
            {keySlot(registry.leaseKey), keySlot(CLUSTER_LEASES_KEY), keySlot(directory.key)},
            {keySlot("gates")},
        )
        self.assertIsNone(registry.incarnation)
        self.failureResultOf(registry.register(FakeSession("alice", "phone")), RedisUnavailable)
        for uid in ["alice", "bob", "élan"]:
            key = registry._generationKey(uid)
            self.assertEqual(keySlot(key), keySlot(sessionsKey(uid)))
        self.assertEqual(len({slotTag(slot) for slot in range(SLOTS)}), SLOTS)
        self.assertEqual(
            [keySlot(clusterGenerationKey(slot)) for slot in (0, 1, 16383)], [0, 1, 16383]
        )

    def test_viewArgs(self):
        """
        In cluster mode the scripts get the view of the leases, this gate's
        own incarnation always in it, then the freshness bound and the
        number of items.
        """
        registry = RedisSessionRegistry(_ScriptRecorder(), _Bus(), Clock(), "g", cluster=True)
        registry._leaseTaken([1, b"1000000000000000", b"1000000005000000", b"h", b"77"])
        self.assertEqual(registry.incarnation, "1000000000000000")
        self.assertEqual(
            registry._viewArgs(),
            ["h", "77", "g", "1000000000000000", 1000000005000000 - CLOCK_MARGIN_US, 4],
        )


class RedisClusterMixin:
    """
    A fresh Redis Cluster (three primaries with a replica each) per test:
    trial has no per-class fixture that survives its reactor cleanup.
    """

    timeout = 60

    @inlineCallbacks
    def startCluster(self):
        self.cluster = RedisCluster(self, reactor)
        yield self.cluster.start()
        self.url = parseRedisURL(self.cluster.url)

    def gate(self, gateId, **kwargs):
        return FakeGate(self, self.url, gateId, **kwargs).start()

    @inlineCallbacks
    def entries(self, uid, via):
        """
        The raw entries of C{uid}: C{{device: parseEntry(...)}}.
        """
        reply = yield via.connection.execute("HGETALL", sessionsKey(uid))
        return {reply[i].decode(): parseEntry(reply[i + 1]) for i in range(0, len(reply), 2)}

    @inlineCallbacks
    def expired(self, key, tries=100):
        """
        Poll (Redis has no event for it) until C{key} expired.
        """
        for _ in range(tries):
            if not (yield self.a.connection.execute("EXISTS", key)):
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail("{} did not expire".format(key))

    def uidsOnEveryPrimary(self, connection, perPrimary=1):
        """
        C{perPrimary} uids whose keys are on each primary, by primary.
        """
        found, n = {}, 0
        while len(found) < 3 or any(len(uids) < perPrimary for uids in found.values()):
            uid = "user%d" % (n,)
            uids = found.setdefault(connection.addressOf(keySlot(sessionsKey(uid))), [])
            if len(uids) < perPrimary:
                uids.append(uid)
            n += 1
        return [found[address] for address in sorted(found)]


class RedisClusterRegistryTests(RedisClusterMixin, RegistryTestsMixin, TestCase):
    """
    L{RedisSessionRegistry} in cluster mode passes the shared suite.
    """

    @inlineCallbacks
    def makeRegistry(self, maxDevices):
        yield self.startCluster()
        gate = yield self.gate("g", maxDevices=maxDevices)
        return gate.registry


class RedisClusterTests(RedisClusterMixin, TestCase):
    """
    What the cluster registry does on a Redis Cluster, with two or three
    "gates" in this process, each with its own cluster connection and bus.
    """

    @inlineCallbacks
    def setUp(self):
        yield self.startCluster()
        self.a = yield self.gate("gate-a")
        self.b = yield self.gate("gate-b")

    def recordLookups(self, registry):
        """
        Record the keys of each lookup script call of C{registry}: the
        declared one and those passed as arguments.
        """
        calls = []
        lookup = registry._lookup

        def recording(keys, args):
            calls.append(keys + args[1 : 1 + int(args[0])])
            return lookup(keys, args)

        registry._lookup = recording
        return calls

    @inlineCallbacks
    def test_lookupRefused(self):
        """
        A lookup script sent to a primary with keys of slots it does not
        serve (the gate's slot map is stale) answers those as refused, and
        each of them is looked up on its own, routed by its key: every
        user is found.
        """
        byPrimary = self.uidsOnEveryPrimary(self.a.connection, perPrimary=3)
        uids = [uid for uids in byPrimary for uid in uids]
        sessions = {}
        for uid in uids:
            sessions[uid] = self.b.session(uid, "phone")
            yield self.b.registry.register(sessions[uid])
        first = self.a.connection.addressOf(keySlot(sessionsKey(uids[0])))
        self.patch(self.a.connection, "addressOf", lambda slot: first)
        calls = self.recordLookups(self.a.registry)
        found = yield self.a.registry.sessionsForMany(uids)
        self.assertEqual(
            {uid: [s.sessionId for s in ss] for uid, ss in found.items()},
            {uid: [session.sessionId] for uid, session in sessions.items()},
        )
        self.assertEqual(len(calls[0]), 9)
        self.assertEqual(
            sorted(keys for keys in calls[1:]),
            sorted([sessionsKey(uid)] for uid in byPrimary[1] + byPrimary[2]),
        )

    @inlineCallbacks
    def test_everyPrimary(self):
        """
        Users on all three primaries register and are found; a lookup of
        many users runs one script per primary (one key declared, the
        others of that primary's slots as arguments), chunked as with one
        Redis, all at once, and finds them all; generations grow per user.
        """
        self.patch(registryModule, "LOOKUP_CHUNK", 2)
        byPrimary = self.uidsOnEveryPrimary(self.a.connection, perPrimary=20)
        uids = [uid for uids in byPrimary for uid in uids]
        sessions = {}
        for i, uid in enumerate(uids):
            gate = (self.a, self.b)[i % 2]
            sessions[uid] = gate.session(uid, "phone")
            yield gate.registry.register(sessions[uid])
        calls = self.recordLookups(self.a.registry)
        found = yield self.a.registry.sessionsForMany(uids + ["nobody"])
        self.assertEqual(
            {uid: [s.sessionId for s in ss] for uid, ss in found.items()},
            {uid: [session.sessionId] for uid, session in sessions.items()},
        )
        primaries = []
        for keys in calls:
            addresses = {self.a.connection.addressOf(keySlot(key)) for key in keys}
            self.assertEqual(len(addresses), 1)
            self.assertLessEqual(len(keys), 2)
            primaries.append(addresses.pop())
        nobody = self.a.connection.addressOf(keySlot(sessionsKey("nobody")))
        self.assertEqual(
            sorted(primaries.count(a) for a in set(primaries)),
            sorted(10 + (a == nobody) for a in set(primaries)),
        )
        generations = []
        for gate in (self.a, self.b, self.a):
            yield gate.registry.register(gate.session(uids[0], "phone"))
            generations.append((yield self.entries(uids[0], self.a))["phone"][2])
        self.assertEqual(sorted(set(generations)), generations)

    @inlineCallbacks
    def test_generations(self):
        """
        Each slot has its own generation counter; generations keep growing
        even when it is lost.
        """
        [[uid], _, _] = self.uidsOnEveryPrimary(self.a.connection)
        yield self.a.registry.register(self.a.session(uid, "a"))
        first = (yield self.entries(uid, self.a))["a"][2]
        key = clusterGenerationKey(keySlot(sessionsKey(uid)))
        self.assertEqual(int((yield self.a.connection.execute("GET", key))), first)
        yield self.a.connection.execute("DEL", key)
        yield self.b.registry.register(self.b.session(uid, "b"))
        self.assertGreater((yield self.entries(uid, self.a))["b"][2], first)

    @inlineCallbacks
    def test_deviceLimit(self):
        """
        Devices count across gates: beyond C{max_devices} a new device is
        refused, on either gate; a known device may still sign in again.
        """
        for uids in self.uidsOnEveryPrimary(self.a.connection):
            uid = uids[0]
            yield self.a.registry.register(self.a.session(uid, "a"))
            yield self.b.registry.register(self.b.session(uid, "b"))
            yield self.a.registry.register(self.a.session(uid, "c"))
            for gate in (self.a, self.b):
                failure = yield self.assertFailure(
                    gate.registry.register(gate.session(uid, "d")), TooManyDevices
                )
                self.assertIn("3 devices", str(failure))
            displaced = yield self.b.registry.register(self.b.session(uid, "a"))
            self.assertIsInstance(displaced, RemoteSession)
            self.assertEqual(len((yield self.a.registry.sessionsFor(uid))), 3)

    @inlineCallbacks
    def test_displacement(self):
        """
        A login on gate B for a device held on gate A displaces it: B's
        register answers A's session, kicking it reaches A over the bus; A's
        late unregister deletes nothing, and the newer generation holds.
        """
        for uids in self.uidsOnEveryPrimary(self.a.connection):
            uid = uids[0]
            old, new = self.a.session(uid, "phone"), self.b.session(uid, "phone")
            yield self.a.registry.register(old)
            displaced = yield self.b.registry.register(new)
            self.assertEqual((displaced.sessionId, displaced.gateId), (old.sessionId, "gate-a"))
            displaced.kick(pb.REPLACED, "the same device signed in again")
            yield waitFor(lambda old=old: old.kicks)
            self.assertEqual((old.kicks, new.kicks), ([pb.REPLACED], []))
            self.assertFalse((yield self.a.registry.unregister(old)))
            entries = yield self.entries(uid, self.a)
            self.assertEqual(entries["phone"][4], new.sessionId)
            self.assertGreater(entries["phone"][2], displaced.generation)
            [found] = yield self.a.registry.sessionsFor(uid)
            self.assertEqual(found.sessionId, new.sessionId)

    @inlineCallbacks
    def test_deadGate(self):
        """
        The sessions of a gate whose lease lapsed are ignored once the
        others refreshed their view of the leases (until then, for at most
        one interval, they still count), then deleted, and no longer count
        against the device limit; the gate, finding its lease lapsed, takes
        a new incarnation and registers its sessions again, except where a
        newer login took the device: that session is kicked.
        """
        # Gates share one lease time in production, which bounds the
        # margin; here only C's lease is short.
        self.patch(registryModule, "CLOCK_MARGIN_US", 100000)
        c = yield self.gate("gate-c", leaseSeconds=0.3)
        # A and B know of C.
        yield self.a.registry.refreshLease()
        yield self.b.registry.refreshLease()
        [[uid], _, _] = self.uidsOnEveryPrimary(self.a.connection)
        phone, laptop, tablet = (c.session(uid, d) for d in ("phone", "laptop", "tablet"))
        for session in (phone, laptop, tablet):
            yield c.registry.register(session)
        self.assertEqual(len((yield self.a.registry.sessionsFor(uid))), 3)
        before = c.registry.incarnation
        yield self.expired(c.registry.leaseKey)
        # A's view still has C: its sessions still count until A refreshes.
        self.assertEqual(len((yield self.a.registry.sessionsFor(uid))), 3)
        self.assertFalse((yield self.a.registry.refreshLease()))
        self.assertEqual((yield self.a.registry.sessionsFor(uid)), [])
        self.assertEqual((yield self.entries(uid, self.a)), {})
        newPhone, watch = self.a.session(uid, "phone"), self.a.session(uid, "watch")
        self.assertIsNone((yield self.a.registry.register(newPhone)))
        self.assertIsNone((yield self.a.registry.register(watch)))

        self.assertTrue((yield c.registry.refreshLease()))
        self.assertNotEqual(c.registry.incarnation, before)
        self.assertFalse((yield c.registry.refreshLease()))
        self.assertEqual((yield c.registry.reconcile()), (2, 1))
        self.assertEqual(phone.kicks, [pb.REPLACED])
        self.assertEqual((laptop.kicks, tablet.kicks), ([], []))
        entries = yield self.entries(uid, self.a)
        self.assertEqual(
            {device: (entry[1], entry[4]) for device, entry in entries.items()},
            {
                "phone": (self.a.registry.incarnation, newPhone.sessionId),
                "watch": (self.a.registry.incarnation, watch.sessionId),
                "laptop": (c.registry.incarnation, laptop.sessionId),
                "tablet": (c.registry.incarnation, tablet.sessionId),
            },
        )
        # B's view predates C's new incarnation: it counts as live (newer
        # than the view) without B refreshing.
        self.assertEqual(len((yield self.b.registry.sessionsFor(uid))), 4)
        self.assertTrue((yield c.registry.unregister(laptop)))
        self.assertEqual((yield c.registry.count()), 1)

    @inlineCallbacks
    def test_restoreAfterWipe(self):
        """
        After one primary lost its data (C{FLUSHALL} on it), the users on it
        have no sessions; the gates' reconcile registers them again per
        slot, with their generations, and raises that slot's counter.
        """
        byPrimary = self.uidsOnEveryPrimary(self.a.connection, perPrimary=3)
        gatesPrimary = self.a.connection.addressOf(keySlot(CLUSTER_LEASES_KEY))
        self.assertEqual(len(self.a.connection.primaries), 3)
        wiped = next(a for a in self.a.connection.primaries if a != gatesPrimary)
        sessions = []
        for i, uid in enumerate(uid for uids in byPrimary for uid in uids):
            gate = (self.a, self.b)[i % 2]
            session = gate.session(uid, "phone")
            yield gate.registry.register(session)
            sessions.append(session)
        lost = [
            s for s in sessions if self.a.connection.addressOf(keySlot(sessionsKey(s.uid))) == wiped
        ]
        self.assertEqual(len(lost), 3)
        before = {}
        for session in lost:
            before[session.uid] = yield self.entries(session.uid, self.a)
        yield self.cluster.call(self.cluster.nodeAt(wiped[1]), "FLUSHALL")
        uids = [s.uid for s in sessions]
        found = yield self.b.registry.sessionsForMany(uids)
        self.assertEqual(set(found), {s.uid for s in sessions} - {s.uid for s in lost})
        for gate in (self.a, self.b):
            self.assertFalse((yield gate.registry.refreshLease()))
        restored = 0
        for gate in (self.a, self.b):
            restored += (yield gate.registry.reconcile())[0]
        self.assertEqual(restored, 3)
        for s in lost:
            self.assertEqual((yield self.entries(s.uid, self.a)), before[s.uid])
            counter = yield self.a.connection.execute(
                "GET", clusterGenerationKey(keySlot(sessionsKey(s.uid)))
            )
            self.assertGreaterEqual(int(counter), before[s.uid]["phone"][2])
        found = yield self.a.registry.sessionsForMany(uids)
        self.assertEqual(
            sorted(s.sessionId for ss in found.values() for s in ss),
            sorted(s.sessionId for s in sessions),
        )
        self.assertEqual((yield self.a.registry.reconcile()), (0, 0))

    @inlineCallbacks
    def test_gatesSlotWiped(self):
        """
        When the primary of the gates' slot loses its data, every gate finds
        its lease lapsed, takes a new incarnation, and registers its
        sessions again under it, on every primary.
        """
        uids = [uids[0] for uids in self.uidsOnEveryPrimary(self.a.connection)]
        sessions = [self.a.session(uid, "phone") for uid in uids]
        for session in sessions:
            yield self.a.registry.register(session)
        before = self.a.registry.incarnation
        gatesPrimary = self.a.connection.addressOf(keySlot(CLUSTER_LEASES_KEY))
        yield self.cluster.call(self.cluster.nodeAt(gatesPrimary[1]), "FLUSHALL")
        self.assertTrue((yield self.a.registry.refreshLease()))
        self.assertTrue((yield self.b.registry.refreshLease()))
        self.assertNotEqual(self.a.registry.incarnation, before)
        self.assertEqual((yield self.a.registry.reconcile()), (3, 0))
        for session in sessions:
            entries = yield self.entries(session.uid, self.b)
            self.assertEqual(
                (entries["phone"][1], entries["phone"][4]),
                (self.a.registry.incarnation, session.sessionId),
            )
        found = yield self.b.registry.sessionsForMany(uids)
        self.assertEqual(
            sorted(s.sessionId for ss in found.values() for s in ss),
            sorted(s.sessionId for s in sessions),
        )
        self.assertTrue((yield self.a.registry.unregister(sessions[0])))
        self.assertEqual((yield self.a.registry.reconcile()), (0, 0))

    @inlineCallbacks
    def test_directory(self):
        """
        The directory, in the gates' slot, lists the gates with a lease;
        a gate that withdrew its lease is dropped.
        """
        directories = [RedisGateDirectory(gate.connection) for gate in (self.a, self.b)]
        yield directories[0].advertise("gate-a", [("tcp", 1)])
        yield directories[1].advertise("gate-b", [("tcp", 2)])
        self.assertEqual(
            (yield directories[0].gates()), {"gate-a": [("tcp", 1)], "gate-b": [("tcp", 2)]}
        )
        yield self.b.registry.withdrawLease()
        self.assertEqual((yield directories[1].gates()), {"gate-a": [("tcp", 1)]})
        self.assertEqual((yield self.a.connection.execute("HKEYS", CLUSTER_GATES_KEY)), [b"gate-a"])
