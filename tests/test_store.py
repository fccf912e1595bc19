"""
Tests for message stores: one suite, run against every implementation of
L{IMessageStore}, plus SQLite's durability and group commit.
"""

import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from imserver.errors import NotMember
from imserver.interfaces import IGroupStore, IMessageStore
from imserver.pb import im_pb2 as pb
from imserver.store import SYSTEM, GroupExists, GroupFull, GroupNotFound
from imserver.store.memory import MemoryMessageStore
from imserver.store.sqlite import SQLiteMessageStore, StoreClosed

HOUR = 3600 * 1000
T0 = 1_700_000_000_000


def text(body, to="bob"):
    """
    A message template.
    """
    return pb.Message(recipient=to, body=body.encode(), content_type="text/plain")


class StoreTestsMixin:
    """
    The behaviour every L{IMessageStore} shares.  Subclasses provide
    C{makeStore(dedupWindowMs)}, synchronous (results available at once).
    """

    def setUp(self):
        self.store = self.makeStore(dedupWindowMs=24 * HOUR)

    def r(self, d):
        return self.successResultOf(d)

    def send(self, sender, clientMsgId, body, to="bob", now=T0):
        return self.r(self.store.deliver(sender, clientMsgId, text(body, to), [to], now))

    def test_interface(self):
        """
        The store provides L{IMessageStore}.
        """
        verifyObject(IMessageStore, self.store)

    def test_deliver(self):
        """
        A message lands in the recipient's inbox and, marked outgoing, in
        the sender's; the store sets id, sender, client_msg_id and time.
        """
        delivery = self.send("alice", "m1", "hello")
        self.assertFalse(delivery.duplicate)
        self.assertEqual(delivery.seqs, {"bob": 1, "alice": 1})
        message = delivery.message
        self.assertTrue(message.id)
        self.assertEqual((message.sender, message.client_msg_id, message.created_ms),
                         ("alice", "m1", T0))
        [entry] = self.r(self.store.fetch("bob", 0, 10))
        self.assertEqual((entry.seq, entry.outgoing, entry.message), (1, False, message))
        [own] = self.r(self.store.fetch("alice", 0, 10))
        self.assertEqual((own.seq, own.outgoing, own.message.id), (1, True, message.id))

    def test_senderCannotBeForged(self):
        """
        The sender field of the template is overwritten with the sender.
        """
        template = text("x")
        template.sender = "mallory"
        delivery = self.r(self.store.deliver("alice", "m1", template, ["bob"], T0))
        self.assertEqual(delivery.message.sender, "alice")

    def test_seqsIncrease(self):
        """
        Each inbox's seqs increase by one per entry, independently.
        """
        self.send("alice", "a1", "1")
        self.send("carol", "c1", "2")
        delivery = self.send("alice", "a2", "3")
        self.assertEqual(delivery.seqs, {"bob": 3, "alice": 2})
        self.assertEqual([e.seq for e in self.r(self.store.fetch("bob", 0, 10))], [1, 2, 3])
        self.assertEqual(self.r(self.store.head("bob")), 3)
        self.assertEqual(self.r(self.store.head("nobody")), 0)

    def test_toSelf(self):
        """
        A message to oneself lands once.
        """
        delivery = self.send("alice", "m", "note", to="alice")
        self.assertEqual(delivery.seqs, {"alice": 1})
        self.assertEqual(len(self.r(self.store.fetch("alice", 0, 10))), 1)

    def test_manyRecipients(self):
        """
        One body can land in many inboxes, each once.
        """
        delivery = self.r(self.store.deliver("alice", "g", text("hi"), ["bob", "carol", "bob"], T0))
        self.assertEqual(delivery.seqs, {"bob": 1, "carol": 1, "alice": 1})
        ids = {self.r(self.store.fetch(u, 0, 1))[0].message.id for u in ["bob", "carol", "alice"]}
        self.assertEqual(ids, {delivery.message.id})

    def test_dedup(self):
        """
        A retry with the same client_msg_id from the same sender within the
        window returns the original outcome and stores nothing.
        """
        first = self.send("alice", "m1", "hello")
        again = self.send("alice", "m1", "hello again", now=T0 + HOUR)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.message.id, first.message.id)
        self.assertEqual(again.message.created_ms, T0)
        self.assertEqual(again.seqs, {"alice": 1})
        self.assertEqual(len(self.r(self.store.fetch("bob", 0, 10))), 1)
        self.assertEqual(self.r(self.store.head("alice")), 1)

    def test_dedupPerSender(self):
        """
        Another sender may use the same client_msg_id.
        """
        self.send("alice", "m1", "a")
        self.assertFalse(self.send("carol", "m1", "c").duplicate)

    def test_dedupWindowEnds(self):
        """
        After the window, the same client_msg_id stores a new message.
        """
        first = self.send("alice", "m1", "a")
        later = self.send("alice", "m1", "a", now=T0 + 24 * HOUR)
        self.assertFalse(later.duplicate)
        self.assertNotEqual(later.message.id, first.message.id)

    def test_fetchPaging(self):
        """
        C{fetch} pages by seq and limit.
        """
        for i in range(5):
            self.send("alice", str(i), str(i))
        self.assertEqual([e.seq for e in self.r(self.store.fetch("bob", 1, 2))], [2, 3])
        self.assertEqual([e.seq for e in self.r(self.store.fetch("bob", 3, 10))], [4, 5])
        self.assertEqual(self.r(self.store.fetch("bob", 5, 10)), [])

    def test_cursor(self):
        """
        Acks raise a device's cursor and never lower it.
        """
        self.assertEqual(self.r(self.store.cursor("bob", "phone")), 0)
        self.assertEqual(self.r(self.store.ack([("bob", "phone", 5), ("ann", "pc", 2)], T0)), 2)
        self.r(self.store.ack([("bob", "phone", 3)], T0))
        self.assertEqual(self.r(self.store.cursor("bob", "phone")), 5)
        self.assertEqual(self.r(self.store.cursor("ann", "pc")), 2)
        self.assertEqual(self.r(self.store.cursor("bob", "laptop")), 0)

    def test_trimByAge(self):
        """
        Entries older than the age limit go, acked or not; seqs are never
        reused afterwards.
        """
        self.send("alice", "old", "old", now=T0)
        self.send("alice", "new", "new", now=T0 + 10 * HOUR)
        removed = self.r(self.store.trim(T0 + 10 * HOUR, 5 * HOUR, 1000))
        self.assertEqual(removed, 2)
        self.assertEqual([e.message.client_msg_id for e in self.r(self.store.fetch("bob", 0, 10))],
                         ["new"])
        self.assertEqual(self.send("alice", "newer", "x", now=T0 + 11 * HOUR).seqs["bob"], 3)

    def test_trimByCountKeepsUnacked(self):
        """
        Beyond the count limit only entries every known device acked go:
        unacked entries younger than the age limit stay.
        """
        for i in range(10):
            self.send("alice", str(i), str(i))
        self.r(self.store.ack([("bob", "phone", 8), ("bob", "laptop", 4)], T0))
        self.r(self.store.trim(T0, 24 * HOUR, 3))
        self.assertEqual([e.seq for e in self.r(self.store.fetch("bob", 0, 100))],
                         [5, 6, 7, 8, 9, 10])
        self.r(self.store.ack([("bob", "laptop", 10)], T0))
        self.r(self.store.trim(T0, 24 * HOUR, 3))
        self.assertEqual([e.seq for e in self.r(self.store.fetch("bob", 0, 100))], [8, 9, 10])

    def test_trimWithoutCursorsKeepsAll(self):
        """
        A user with no acknowledged device keeps every young entry.
        """
        for i in range(5):
            self.send("alice", str(i), str(i))
        self.r(self.store.trim(T0, 24 * HOUR, 2))
        self.assertEqual(len(self.r(self.store.fetch("bob", 0, 100))), 5)

    def test_trimForgetsDedup(self):
        """
        Trimming forgets dedup keys older than the window.
        """
        self.send("alice", "m1", "a", now=T0)
        self.r(self.store.trim(T0 + 25 * HOUR, 48 * HOUR, 1000))
        self.assertFalse(self.send("alice", "m1", "a", now=T0 + 25 * HOUR).duplicate)


    # -- groups ---------------------------------------------------------------

    def group(self, groupId="g1", owner="alice", members=("bob", "carol")):
        self.r(self.store.createGroup(groupId, "Group " + groupId, owner, T0))
        self.r(self.store.setMembers(
            groupId, [(uid, pb.ROLE_MEMBER) for uid in members], 100, T0))

    def groupSend(self, sender, clientMsgId, body, groupId="g1", now=T0):
        message = pb.Message(group_id=groupId, body=body.encode())
        return self.store.deliver(sender, clientMsgId, message, [], now)

    def test_groupInterface(self):
        """
        The store provides L{IGroupStore}.
        """
        verifyObject(IGroupStore, self.store)

    def test_createGroup(self):
        """
        A new group has its owner as only member; a second group with the
        same id is refused.
        """
        info = self.r(self.store.createGroup("g1", "Friends", "alice", T0))
        self.assertEqual(
            (info.group_id, info.name, info.role, info.member_count, info.created_ms),
            ("g1", "Friends", pb.ROLE_OWNER, 1, T0))
        self.failureResultOf(self.store.createGroup("g1", "Again", "bob", T0), GroupExists)
        self.assertEqual(self.r(self.store.group("g1")).name, "Friends")
        self.assertIsNone(self.r(self.store.group("nope")))

    def test_members(self):
        """
        Members are listed by uid with role and join time; setting an
        existing member changes its role and reports only new uids.
        """
        self.group()
        added = self.r(self.store.setMembers(
            "g1", [("bob", pb.ROLE_ADMIN), ("dave", pb.ROLE_MEMBER)], 100, T0 + 5))
        self.assertEqual(added, ["dave"])
        members = self.r(self.store.members("g1"))
        self.assertEqual(
            [(m.uid, m.role, m.joined_ms) for m in members],
            [("alice", pb.ROLE_OWNER, T0), ("bob", pb.ROLE_ADMIN, T0),
             ("carol", pb.ROLE_MEMBER, T0), ("dave", pb.ROLE_MEMBER, T0 + 5)])
        self.assertEqual(self.r(self.store.group("g1")).member_count, 4)

    def test_groupFull(self):
        """
        Members beyond the maximum size are refused, all or nothing.
        """
        self.group()
        self.failureResultOf(self.store.setMembers(
            "g1", [("dave", pb.ROLE_MEMBER), ("erin", pb.ROLE_MEMBER)], 4, T0), GroupFull)
        self.assertEqual(len(self.r(self.store.members("g1"))), 3)
        self.assertEqual(self.r(self.store.setMembers(
            "g1", [("dave", pb.ROLE_MEMBER), ("bob", pb.ROLE_ADMIN)], 4, T0)), ["dave"])

    def test_removeMembers(self):
        """
        Removing reports the uids that were members.
        """
        self.group()
        self.assertEqual(self.r(self.store.removeMembers("g1", ["bob", "zed", "bob"])), ["bob"])
        self.assertEqual([m.uid for m in self.r(self.store.members("g1"))], ["alice", "carol"])

    def test_missingGroup(self):
        """
        Operations on a group that does not exist fail with
        L{GroupNotFound}.
        """
        for d in [self.store.deleteGroup("g"), self.store.members("g"),
                  self.store.removeMembers("g", ["a"]),
                  self.store.setMembers("g", [("a", pb.ROLE_MEMBER)], 10, T0)]:
            self.failureResultOf(d, GroupNotFound)

    def test_groupsOf(self):
        """
        A user's groups, by id, with the user's role in each.
        """
        self.group("g2", owner="bob", members=["alice"])
        self.group("g1")
        groups = self.r(self.store.groupsOf("alice"))
        self.assertEqual([(g.group_id, g.role, g.member_count) for g in groups],
                         [("g1", pb.ROLE_OWNER, 3), ("g2", pb.ROLE_MEMBER, 2)])
        self.assertEqual(self.r(self.store.groupsOf("nobody")), [])

    def test_deleteGroup(self):
        """
        A deleted group is gone, with its memberships; messages already
        delivered stay.
        """
        self.group()
        self.r(self.groupSend("alice", "m1", "hi"))
        self.assertTrue(self.r(self.store.deleteGroup("g1")))
        self.assertIsNone(self.r(self.store.group("g1")))
        self.assertEqual(self.r(self.store.groupsOf("bob")), [])
        self.assertEqual(len(self.r(self.store.fetch("bob", 0, 10))), 1)
        self.failureResultOf(self.groupSend("alice", "m2", "hi"), NotMember)

    def test_groupDeliver(self):
        """
        A group message is stored once and lands in every member's inbox,
        the sender's marked outgoing.
        """
        self.group()
        delivery = self.r(self.groupSend("bob", "m1", "hello"))
        self.assertEqual(sorted(delivery.seqs), ["alice", "bob", "carol"])
        self.assertEqual(delivery.message.group_id, "g1")
        self.assertEqual(delivery.message.sender, "bob")
        for uid in ["alice", "bob", "carol"]:
            [entry] = self.r(self.store.fetch(uid, 0, 10))
            self.assertEqual(entry.message.id, delivery.message.id)
            self.assertEqual(entry.outgoing, uid == "bob")

    def test_groupDeliverNotMember(self):
        """
        A non-member's group message, or one to a missing group, stores
        nothing and fails with L{NotMember}.
        """
        self.group()
        self.failureResultOf(self.groupSend("mallory", "m1", "x"), NotMember)
        self.failureResultOf(self.groupSend("alice", "m1", "x", groupId="nope"), NotMember)
        for uid in ["alice", "bob", "mallory"]:
            self.assertEqual(self.r(self.store.head(uid)), 0)

    def test_groupMembershipAtCommit(self):
        """
        Members added later get later messages only; a removed member gets
        no more and can no longer send.
        """
        self.group()
        self.r(self.groupSend("alice", "m1", "one"))
        self.r(self.store.setMembers("g1", [("dave", pb.ROLE_MEMBER)], 100, T0))
        self.r(self.store.removeMembers("g1", ["bob"]))
        delivery = self.r(self.groupSend("alice", "m2", "two"))
        self.assertEqual(sorted(delivery.seqs), ["alice", "carol", "dave"])
        self.assertEqual([e.message.body for e in self.r(self.store.fetch("bob", 0, 10))],
                         [b"one"])
        self.assertEqual([e.message.body for e in self.r(self.store.fetch("dave", 0, 10))],
                         [b"two"])
        self.failureResultOf(self.groupSend("bob", "m3", "x"), NotMember)

    def test_groupRetryAfterRemoval(self):
        """
        A retry of a group send returns the original outcome even if the
        sender was removed meanwhile.
        """
        self.group()
        first = self.r(self.groupSend("bob", "m1", "hi"))
        self.r(self.store.removeMembers("g1", ["bob"]))
        again = self.r(self.groupSend("bob", "m1", "hi"))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.message.id, first.message.id)

    def test_systemSender(self):
        """
        The system sender has no inbox; its messages are idempotent too.
        """
        delivery = self.r(self.store.deliver(SYSTEM, "k1", text("hi"), ["bob", "carol"], T0))
        self.assertEqual(delivery.seqs, {"bob": 1, "carol": 1})
        self.assertEqual(self.r(self.store.head(SYSTEM)), 0)
        again = self.r(self.store.deliver(SYSTEM, "k1", text("hi"), ["bob", "carol"], T0))
        self.assertTrue(again.duplicate)
        self.assertEqual(self.r(self.store.head("bob")), 1)

    def test_systemGroupMessage(self):
        """
        The system may send to a group it is not a member of, but not to a
        group that does not exist.
        """
        self.group()
        delivery = self.r(self.groupSend(SYSTEM, "k1", "notice"))
        self.assertEqual(sorted(delivery.seqs), ["alice", "bob", "carol"])
        self.failureResultOf(self.groupSend(SYSTEM, "k2", "x", groupId="nope"), NotMember)


class MemoryStoreTests(StoreTestsMixin, SynchronousTestCase):
    """
    L{MemoryMessageStore}.
    """

    def makeStore(self, dedupWindowMs):
        return MemoryMessageStore(dedupWindowMs=dedupWindowMs)


class SQLiteStoreTests(StoreTestsMixin, SynchronousTestCase):
    """
    L{SQLiteMessageStore}, operations run inline (no thread).
    """

    def makeStore(self, dedupWindowMs):
        self.path = self.mktemp()
        store = SQLiteMessageStore(self.path, None, dedupWindowMs, threaded=False)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def test_durableAcrossReopen(self):
        """
        What was delivered is there after the store is closed and opened
        again, and seqs and ids continue.
        """
        first = self.send("alice", "m1", "hello")
        self.store.stopService()
        self.store = SQLiteMessageStore(self.path, None, 24 * HOUR, threaded=False)
        self.store.startService()
        self.assertEqual(len(self.r(self.store.fetch("bob", 0, 10))), 1)
        self.assertTrue(self.send("alice", "m1", "hello").duplicate)
        second = self.send("alice", "m2", "again")
        self.assertEqual(second.seqs, {"bob": 2, "alice": 2})
        self.assertGreater(second.message.id, first.message.id)

    def test_idsNeverReused(self):
        """
        Message ids are not reused after a restart, even when retention has
        removed every message.
        """
        first = self.send("alice", "m1", "hello", now=T0)
        self.r(self.store.trim(T0 + 48 * HOUR, 24 * HOUR, 1000))
        self.store.stopService()
        self.store = SQLiteMessageStore(self.path, None, 24 * HOUR, threaded=False)
        self.store.startService()
        second = self.send("alice", "m2", "again", now=T0 + 48 * HOUR)
        self.assertGreater(second.message.id, first.message.id)

    def test_walAndFullSync(self):
        """
        The database runs in WAL mode with synchronous=FULL.
        """
        db = self.store._db
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_notRunning(self):
        """
        A stopped store refuses operations with L{StoreClosed}.
        """
        self.store.stopService()
        self.failureResultOf(self.store.head("bob"), StoreClosed)
        self.store.startService()


class ThreadedSQLiteStoreTests(TestCase):
    """
    L{SQLiteMessageStore} on its writer thread, with the real reactor.
    """

    timeout = 30

    def setUp(self):
        self.store = SQLiteMessageStore(self.mktemp(), reactor)
        self.store.startService()

    def tearDown(self):
        if self.store.running:
            return self.store.stopService()

    @inlineCallbacks
    def test_groupCommit(self):
        """
        Operations queued together commit in few transactions, and each is
        answered with its own result in order.
        """
        ds = [
            self.store.deliver("alice", str(i), text(str(i)), ["bob"], T0)
            for i in range(500)
        ]
        deliveries = yield gatherResults(ds)
        self.assertEqual([d.seqs["bob"] for d in deliveries], list(range(1, 501)))
        self.assertLess(self.store.batches, 50)
        entries = yield self.store.fetch("bob", 0, 1000)
        self.assertEqual(len(entries), 500)

    @inlineCallbacks
    def test_failureIsolated(self):
        """
        An operation that fails fails alone; the others in its transaction
        commit.
        """
        bad = self.store._submit(lambda db: db.execute("SELECT * FROM nowhere"))
        good = self.store.deliver("alice", "m", text("x"), ["bob"], T0)
        yield self.assertFailure(bad, Exception)
        delivery = yield good
        self.assertEqual(delivery.seqs["bob"], 1)

    @inlineCallbacks
    def test_stopFinishesQueue(self):
        """
        Stopping answers every operation queued before it, then closes.
        """
        ds = [self.store.deliver("alice", str(i), text("x"), ["bob"], T0) for i in range(50)]
        yield self.store.stopService()
        results = yield gatherResults(ds)
        self.assertEqual(len(results), 50)
        yield self.assertFailure(self.store.head("bob"), StoreClosed)

    @inlineCallbacks
    def test_cannotOpen(self):
        """
        A database that cannot be opened makes C{startService} raise, so the
        server does not start; the store stays stopped.
        """
        yield self.store.stopService()
        self.store = SQLiteMessageStore(FilePath(self.mktemp()).child("no").child("db").path, reactor)
        self.assertRaises(sqlite3.OperationalError, self.store.startService)
        self.assertFalse(self.store.running)
        yield self.assertFailure(self.store.head("bob"), StoreClosed)


class BatchedDeliveryTests(SynchronousTestCase):
    """
    L{_Operations.deliverMany}: many deliveries in one set of statements
    give the same outcome as one by one.
    """

    def test_sameAsOneByOne(self):
        """
        Interleaved senders, recipients, a retry inside the batch and a
        retry of an earlier batch: seqs, ids and duplicates are as if each
        had been delivered alone, in order.
        """
        from imserver.store.sqlite import _Operations, openDatabase

        items = [
            ("alice", "1", text("a"), ["bob"], T0),
            ("carol", "1", text("c"), ["bob", "alice"], T0),
            ("alice", "1", text("again"), ["bob"], T0),
            ("alice", "2", text("b"), ["alice"], T0),
        ]
        outcomes = []
        for batched in (False, True):
            db = openDatabase(self.mktemp())
            ops = _Operations(24 * HOUR)
            ops.loadIds(db)
            if batched:
                results = ops.deliverMany(db, items) + ops.deliverMany(db, items[:1])
            else:
                results = [ops.deliver(db, *item) for item in items + items[:1]]
            outcomes.append([(r.message.id, r.seqs, r.duplicate) for r in results])
            db.close()
        self.assertEqual(outcomes[0], outcomes[1])
        self.assertEqual([o[2] for o in outcomes[1]], [False, False, True, False, True])


class QueryPlanTests(SynchronousTestCase):
    """
    The batched lookups use the primary keys: a full scan would make every
    batch cost time proportional to the table.
    """

    def test_dedupLookupUsesPrimaryKey(self):
        """
        The dedup lookup searches C{dedup} by its primary key.
        """
        from imserver.store.sqlite import dedupLookup, openDatabase

        db = openDatabase(":memory:")
        plan = " | ".join(row[3] for row in db.execute(
            "EXPLAIN QUERY PLAN " + dedupLookup(3), ["a", "1", "b", "2", "c", "3"]))
        self.assertIn("USING PRIMARY KEY", plan)
        self.assertNotIn("SCAN d", plan)
        self.assertNotIn("SCAN dedup", plan)
