# -*- test-case-name: tests.test_store -*-
"""
Tests for message stores: one suite, run against every implementation of
L{IMessageStore} (memory, SQLite inline and threaded, Redis), and one for
their webhook outbox (L{IOutbox}), plus SQLite's durability and group
commit, and Redis's seq floor, epoch, durability, outbox lease and
unavailability against a real C{redis-server}; and the Redis store on a
real Redis Cluster.
"""

import base64
import fcntl
import json
import os
import signal
import sqlite3
import threading
from functools import partial

from twisted.internet import reactor
from twisted.internet.defer import fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from imserver.errors import NotMember, Unavailable
from imserver.interfaces import IGroupStore, IMessageStore, IOutbox
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisUnavailable, RedisURL, Script, connectRedis
from imserver.rediscluster import connectCluster, keySlot, parseRedisURL
from imserver.service import RetentionService
from imserver.settings import Settings
from imserver.store import (
    OUTBOX_LIMIT,
    SYSTEM,
    GroupExists,
    GroupFull,
    GroupNotFound,
    OutboxFullLog,
)
from imserver.store.memory import MemoryMessageStore
from imserver.store.redis import RedisMessageStore, store as redisStoreModule
from imserver.store.redis.keys import groupKey, slotBodyPrefix, slotTag, userKey, userSlot
from imserver.store.sqlite import ADDED_TABLES, SQLiteMessageStore, StoreClosed
from imserver.store.sqlite.saver import LOCK_SUFFIX
from imserver.store.sqlite.schema import WAL_AUTOCHECKPOINT
from imserver.webhooks.events import (
    GROUP_CHANGED,
    GROUP_CREATED,
    GROUP_DELETED,
    GROUP_KEY_PREFIX,
    MEMBERS_ADDED,
    MESSAGE_STORED,
    USER_OFFLINE,
    USER_ONLINE,
    groupChanged,
    messageStored,
    userOffline,
    userOnline,
)

from tests.support.live import withDeadline
from tests.support.redis import RedisServer, whenConnected, whenDisconnected
from tests.support.rediscluster import RedisCluster

HOUR = 3600 * 1000
T0 = 1_700_000_000_000


def text(body, to="bob"):
    """
    A message template.
    """
    return pb.Message(recipient=to, body=body.encode(), content_type="text/plain")


class StoreTestsMixin:
    """
    The behaviour every L{IMessageStore} shares, for a
    L{twisted.trial.unittest.TestCase}: every test yields each store call,
    so stores that answer at once (memory, inline SQLite) and networked
    ones (threaded SQLite, Redis) run the same tests.  Subclasses provide
    C{makeStore(dedupWindowMs)}, returning the store or a L{Deferred} of it.

    Seqs are compared relative to a user's first one: they increase by one
    per entry in every store, but only the memory and SQLite stores start
    at 1 (Redis starts above its seq floor, L{imserver.store.redis}).

    @cvar oneFloor: whether every new inbox starts at the same seq (not on
        a Redis Cluster, where each slot has its own floor).
    """

    oneFloor = True

    @inlineCallbacks
    def setUp(self):
        self.store = yield self.makeStore(dedupWindowMs=24 * HOUR)

    def r(self, d):
        return self.successResultOf(d)

    def send(self, sender, clientMsgId, body, to="bob", now=T0):
        return self.store.deliver(sender, clientMsgId, text(body, to), [to], now)

    @inlineCallbacks
    def seqsOf(self, uid, afterSeq=0, limit=100):
        entries = yield self.store.fetch(uid, afterSeq, limit)
        return [e.seq for e in entries]

    def test_interface(self):
        """
        The store provides L{IMessageStore}.
        """
        verifyObject(IMessageStore, self.store)

    @inlineCallbacks
    def test_deliver(self):
        """
        A message lands in the recipient's inbox and, marked outgoing, in
        the sender's; the store sets id, sender, client_msg_id and time.
        """
        delivery = yield self.send("alice", "m1", "hello")
        self.assertFalse(delivery.duplicate)
        first = delivery.seqs["bob"]
        if self.oneFloor:
            self.assertEqual(delivery.seqs, {"bob": first, "alice": first})
        self.assertEqual(sorted(delivery.seqs), ["alice", "bob"])
        message = delivery.message
        self.assertTrue(message.id)
        self.assertEqual(
            (message.sender, message.client_msg_id, message.created_ms), ("alice", "m1", T0)
        )
        [entry] = yield self.store.fetch("bob", 0, 10)
        self.assertEqual((entry.seq, entry.outgoing, entry.message), (first, False, message))
        [own] = yield self.store.fetch("alice", 0, 10)
        self.assertEqual(
            (own.seq, own.outgoing, own.message.id), (delivery.seqs["alice"], True, message.id)
        )

    @inlineCallbacks
    def test_firstSeq(self):
        """
        A new inbox's first seq is at least 1; the head before it is 0.
        """
        self.assertEqual((yield self.store.head("bob")), 0)
        delivery = yield self.send("alice", "m1", "hello")
        self.assertGreaterEqual(delivery.seqs["bob"], 1)
        self.assertEqual((yield self.store.head("bob")), delivery.seqs["bob"])

    @inlineCallbacks
    def test_senderCannotBeForged(self):
        """
        The sender field of the template is overwritten with the sender.
        """
        template = text("x")
        template.sender = "mallory"
        delivery = yield self.store.deliver("alice", "m1", template, ["bob"], T0)
        self.assertEqual(delivery.message.sender, "alice")

    @inlineCallbacks
    def test_seqsIncrease(self):
        """
        Each inbox's seqs increase by one per entry, independently.
        """
        first = yield self.send("alice", "a1", "1")
        base = first.seqs["bob"] - 1
        yield self.send("carol", "c1", "2")
        delivery = yield self.send("alice", "a2", "3")
        self.assertEqual(delivery.seqs, {"bob": base + 3, "alice": first.seqs["alice"] + 1})
        self.assertEqual((yield self.seqsOf("bob")), [base + 1, base + 2, base + 3])
        self.assertEqual((yield self.store.head("bob")), base + 3)
        self.assertEqual((yield self.store.head("nobody")), 0)

    @inlineCallbacks
    def test_toSelf(self):
        """
        A message to oneself lands once.
        """
        delivery = yield self.send("alice", "m", "note", to="alice")
        self.assertEqual(list(delivery.seqs), ["alice"])
        self.assertEqual(len((yield self.store.fetch("alice", 0, 10))), 1)

    @inlineCallbacks
    def test_manyRecipients(self):
        """
        One body can land in many inboxes, each once.
        """
        delivery = yield self.store.deliver("alice", "g", text("hi"), ["bob", "carol", "bob"], T0)
        self.assertEqual(sorted(delivery.seqs), ["alice", "bob", "carol"])
        ids = set()
        for uid in ["bob", "carol", "alice"]:
            entries = yield self.store.fetch(uid, 0, 10)
            self.assertEqual([e.seq for e in entries], [delivery.seqs[uid]])
            ids.add(entries[0].message.id)
        self.assertEqual(ids, {delivery.message.id})

    @inlineCallbacks
    def test_dedup(self):
        """
        A retry with the same client_msg_id from the same sender within the
        window returns the original outcome and stores nothing.
        """
        first = yield self.send("alice", "m1", "hello")
        again = yield self.send("alice", "m1", "hello again", now=T0 + HOUR)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.message.id, first.message.id)
        self.assertEqual(again.message.created_ms, T0)
        self.assertEqual(again.message.body, b"hello")
        self.assertEqual(again.seqs, {"alice": first.seqs["alice"]})
        self.assertEqual(len((yield self.store.fetch("bob", 0, 10))), 1)
        self.assertEqual((yield self.store.head("alice")), first.seqs["alice"])

    @inlineCallbacks
    def test_dedupPerSender(self):
        """
        Another sender may use the same client_msg_id.
        """
        yield self.send("alice", "m1", "a")
        self.assertFalse((yield self.send("carol", "m1", "c")).duplicate)

    @inlineCallbacks
    def test_dedupWindowEnds(self):
        """
        After the window, the same client_msg_id stores a new message.
        """
        first = yield self.send("alice", "m1", "a")
        later = yield self.send("alice", "m1", "a", now=T0 + 24 * HOUR)
        self.assertFalse(later.duplicate)
        self.assertNotEqual(later.message.id, first.message.id)

    @inlineCallbacks
    def test_fetchPaging(self):
        """
        C{fetch} pages by seq and limit.
        """
        for i in range(5):
            delivery = yield self.send("alice", str(i), str(i))
            if i == 0:
                base = delivery.seqs["bob"] - 1
        self.assertEqual((yield self.seqsOf("bob", base + 1, 2)), [base + 2, base + 3])
        self.assertEqual((yield self.seqsOf("bob", base + 3, 10)), [base + 4, base + 5])
        self.assertEqual((yield self.store.fetch("bob", base + 5, 10)), [])

    @inlineCallbacks
    def test_fetchBeyondAnySeq(self):
        """
        C{fetch} after any uint64 (clients may ask for anything) is an
        empty page, not an error.
        """
        yield self.send("alice", "m1", "hello")
        for afterSeq in [2**53, 2**63 - 1, 2**63, 2**64 - 1]:
            self.assertEqual((yield self.store.fetch("bob", afterSeq, 10)), [], afterSeq)

    @inlineCallbacks
    def test_cursor(self):
        """
        Acks raise a device's cursor and never lower it.
        """
        self.assertEqual((yield self.store.cursor("bob", "phone")), 0)
        self.assertEqual((yield self.store.ack([("bob", "phone", 5), ("ann", "pc", 2)], T0)), 2)
        yield self.store.ack([("bob", "phone", 3)], T0)
        self.assertEqual((yield self.store.cursor("bob", "phone")), 5)
        self.assertEqual((yield self.store.cursor("ann", "pc")), 2)
        self.assertEqual((yield self.store.cursor("bob", "laptop")), 0)

    @inlineCallbacks
    def test_trimByAge(self):
        """
        Entries older than the age limit go, acked or not; seqs are never
        reused afterwards.
        """
        first = yield self.send("alice", "old", "old", now=T0)
        base = first.seqs["bob"] - 1
        yield self.send("alice", "new", "new", now=T0 + 10 * HOUR)
        removed = yield self.store.trim(T0 + 10 * HOUR, 5 * HOUR, 1000)
        self.assertEqual(removed, 2)
        entries = yield self.store.fetch("bob", 0, 10)
        self.assertEqual([e.message.client_msg_id for e in entries], ["new"])
        newer = yield self.send("alice", "newer", "x", now=T0 + 11 * HOUR)
        self.assertEqual(newer.seqs["bob"], base + 3)

    @inlineCallbacks
    def test_trimByCountKeepsUnacked(self):
        """
        Beyond the count limit only entries every known device acked go:
        unacked entries younger than the age limit stay.
        """
        for i in range(10):
            delivery = yield self.send("alice", str(i), str(i))
            if i == 0:
                base = delivery.seqs["bob"] - 1
        yield self.store.ack([("bob", "phone", base + 8), ("bob", "laptop", base + 4)], T0)
        yield self.store.trim(T0, 24 * HOUR, 3)
        self.assertEqual((yield self.seqsOf("bob")), [base + s for s in range(5, 11)])
        yield self.store.ack([("bob", "laptop", base + 10)], T0)
        yield self.store.trim(T0, 24 * HOUR, 3)
        self.assertEqual((yield self.seqsOf("bob")), [base + 8, base + 9, base + 10])

    @inlineCallbacks
    def test_trimWithoutCursorsKeepsAll(self):
        """
        A user with no acknowledged device keeps every young entry.
        """
        for i in range(5):
            yield self.send("alice", str(i), str(i))
        yield self.store.trim(T0, 24 * HOUR, 2)
        self.assertEqual(len((yield self.store.fetch("bob", 0, 100))), 5)

    @inlineCallbacks
    def test_trimForgetsCursors(self):
        """
        Cursors not updated within the age limit are forgotten; younger
        ones stay.
        """
        yield self.store.ack([("bob", "old", 3)], T0)
        yield self.store.ack([("bob", "new", 4), ("dan", "pc", 2)], T0 + 10 * HOUR)
        yield self.store.trim(T0 + 10 * HOUR, 5 * HOUR, 1000)
        self.assertEqual((yield self.store.cursor("bob", "old")), 0)
        self.assertEqual((yield self.store.cursor("bob", "new")), 4)
        self.assertEqual((yield self.store.cursor("dan", "pc")), 2)

    @inlineCallbacks
    def test_trimForgetsDedup(self):
        """
        Trimming forgets dedup keys older than the window.
        """
        yield self.send("alice", "m1", "a", now=T0)
        yield self.store.trim(T0 + 25 * HOUR, 48 * HOUR, 1000)
        self.assertFalse((yield self.send("alice", "m1", "a", now=T0 + 25 * HOUR)).duplicate)

    @inlineCallbacks
    def test_duplicateAfterTrim(self):
        """
        A retry whose message retention removed is still a duplicate within
        the dedup window, with the original id and time.
        """
        first = yield self.send("alice", "m1", "a", now=T0)
        yield self.store.trim(T0 + 2 * HOUR, HOUR, 1000)
        again = yield self.send("alice", "m1", "a", now=T0 + 2 * HOUR)
        self.assertTrue(again.duplicate)
        self.assertEqual((again.message.id, again.message.created_ms), (first.message.id, T0))

    # -- groups ---------------------------------------------------------------

    @inlineCallbacks
    def group(self, groupId="g1", owner="alice", members=("bob", "carol")):
        yield self.store.createGroup(groupId, "Group " + groupId, owner, T0)
        yield self.store.setMembers(groupId, [(uid, pb.ROLE_MEMBER) for uid in members], 100, T0)

    def groupSend(self, sender, clientMsgId, body, groupId="g1", now=T0):
        message = pb.Message(group_id=groupId, body=body.encode())
        return self.store.deliver(sender, clientMsgId, message, [], now)

    def test_groupInterface(self):
        """
        The store provides L{IGroupStore}.
        """
        verifyObject(IGroupStore, self.store)

    @inlineCallbacks
    def test_createGroup(self):
        """
        A new group has its owner as only member; a second group with the
        same id is refused.
        """
        info = yield self.store.createGroup("g1", "Friends", "alice", T0)
        self.assertEqual(
            (info.group_id, info.name, info.role, info.member_count, info.created_ms),
            ("g1", "Friends", pb.ROLE_OWNER, 1, T0),
        )
        yield self.assertFailure(self.store.createGroup("g1", "Again", "bob", T0), GroupExists)
        self.assertEqual((yield self.store.group("g1")).name, "Friends")
        self.assertIsNone((yield self.store.group("nope")))

    @inlineCallbacks
    def test_groupInfo(self):
        """
        C{group} gives id, name, time and member count, without a role.
        """
        yield self.group()
        info = yield self.store.group("g1")
        self.assertEqual(
            info, pb.Group(group_id="g1", name="Group g1", created_ms=T0, member_count=3)
        )

    @inlineCallbacks
    def test_members(self):
        """
        Members are listed by uid with role and join time; setting an
        existing member changes its role and reports only new uids.
        """
        yield self.group()
        added = yield self.store.setMembers(
            "g1", [("bob", pb.ROLE_ADMIN), ("dave", pb.ROLE_MEMBER)], 100, T0 + 5
        )
        self.assertEqual(added, ["dave"])
        members = yield self.store.members("g1")
        self.assertEqual(
            [(m.uid, m.role, m.joined_ms) for m in members],
            [
                ("alice", pb.ROLE_OWNER, T0),
                ("bob", pb.ROLE_ADMIN, T0),
                ("carol", pb.ROLE_MEMBER, T0),
                ("dave", pb.ROLE_MEMBER, T0 + 5),
            ],
        )
        self.assertEqual((yield self.store.group("g1")).member_count, 4)

    @inlineCallbacks
    def test_groupFull(self):
        """
        Members beyond the maximum size are refused, all or nothing; a role
        change in a full group is fine.
        """
        yield self.group()
        yield self.assertFailure(
            self.store.setMembers(
                "g1", [("dave", pb.ROLE_MEMBER), ("erin", pb.ROLE_MEMBER)], 4, T0
            ),
            GroupFull,
        )
        self.assertEqual(len((yield self.store.members("g1"))), 3)
        self.assertEqual(
            (
                yield self.store.setMembers(
                    "g1", [("dave", pb.ROLE_MEMBER), ("bob", pb.ROLE_ADMIN)], 4, T0
                )
            ),
            ["dave"],
        )
        self.assertEqual((yield self.store.setMembers("g1", [("carol", pb.ROLE_ADMIN)], 4, T0)), [])
        roles = {m.uid: m.role for m in (yield self.store.members("g1"))}
        self.assertEqual((roles["bob"], roles["carol"]), (pb.ROLE_ADMIN, pb.ROLE_ADMIN))

    @inlineCallbacks
    def test_removeMembers(self):
        """
        Removing reports the uids that were members.
        """
        yield self.group()
        self.assertEqual((yield self.store.removeMembers("g1", ["bob", "zed", "bob"])), ["bob"])
        self.assertEqual([m.uid for m in (yield self.store.members("g1"))], ["alice", "carol"])
        self.assertEqual((yield self.store.groupsOf("bob")), [])

    @inlineCallbacks
    def test_missingGroup(self):
        """
        Operations on a group that does not exist fail with
        L{GroupNotFound}.
        """
        for d in [
            self.store.deleteGroup("g"),
            self.store.members("g"),
            self.store.removeMembers("g", ["a"]),
            self.store.setMembers("g", [("a", pb.ROLE_MEMBER)], 10, T0),
        ]:
            yield self.assertFailure(d, GroupNotFound)

    @inlineCallbacks
    def test_groupsOf(self):
        """
        A user's groups, by id, with the user's role in each.
        """
        yield self.group("g2", owner="bob", members=["alice"])
        yield self.group("g1")
        groups = yield self.store.groupsOf("alice")
        self.assertEqual(
            [(g.group_id, g.name, g.role, g.member_count, g.created_ms) for g in groups],
            [("g1", "Group g1", pb.ROLE_OWNER, 3, T0), ("g2", "Group g2", pb.ROLE_MEMBER, 2, T0)],
        )
        self.assertEqual((yield self.store.groupsOf("nobody")), [])

    @inlineCallbacks
    def test_deleteGroup(self):
        """
        A deleted group is gone, with its memberships; messages already
        delivered stay; a group with that id can be created again.
        """
        yield self.group()
        yield self.groupSend("alice", "m1", "hi")
        self.assertTrue((yield self.store.deleteGroup("g1")))
        self.assertIsNone((yield self.store.group("g1")))
        self.assertEqual((yield self.store.groupsOf("bob")), [])
        self.assertEqual(len((yield self.store.fetch("bob", 0, 10))), 1)
        yield self.assertFailure(self.groupSend("alice", "m2", "hi"), NotMember)
        info = yield self.store.createGroup("g1", "Again", "bob", T0 + 1)
        self.assertEqual(info.member_count, 1)
        self.assertEqual([m.uid for m in (yield self.store.members("g1"))], ["bob"])

    @inlineCallbacks
    def test_groupDeliver(self):
        """
        A group message is stored once and lands in every member's inbox,
        the sender's marked outgoing.
        """
        yield self.group()
        delivery = yield self.groupSend("bob", "m1", "hello")
        self.assertFalse(delivery.duplicate)
        self.assertEqual(sorted(delivery.seqs), ["alice", "bob", "carol"])
        self.assertEqual(delivery.message.group_id, "g1")
        self.assertEqual(delivery.message.sender, "bob")
        for uid in ["alice", "bob", "carol"]:
            [entry] = yield self.store.fetch(uid, 0, 10)
            self.assertEqual(entry.seq, delivery.seqs[uid])
            self.assertEqual(entry.message.id, delivery.message.id)
            self.assertEqual(entry.outgoing, uid == "bob")

    @inlineCallbacks
    def test_groupDeliverNotMember(self):
        """
        A non-member's group message, or one to a missing group, stores
        nothing and fails with L{NotMember}.
        """
        yield self.group()
        yield self.assertFailure(self.groupSend("mallory", "m1", "x"), NotMember)
        yield self.assertFailure(self.groupSend("alice", "m1", "x", groupId="nope"), NotMember)
        for uid in ["alice", "bob", "mallory"]:
            self.assertEqual((yield self.store.head(uid)), 0)

    @inlineCallbacks
    def test_groupMembershipAtCommit(self):
        """
        Members added later get later messages only; a removed member gets
        no more and can no longer send.
        """
        yield self.group()
        yield self.groupSend("alice", "m1", "one")
        yield self.store.setMembers("g1", [("dave", pb.ROLE_MEMBER)], 100, T0)
        yield self.store.removeMembers("g1", ["bob"])
        delivery = yield self.groupSend("alice", "m2", "two")
        self.assertEqual(sorted(delivery.seqs), ["alice", "carol", "dave"])
        self.assertEqual([e.message.body for e in (yield self.store.fetch("bob", 0, 10))], [b"one"])
        self.assertEqual(
            [e.message.body for e in (yield self.store.fetch("dave", 0, 10))], [b"two"]
        )
        yield self.assertFailure(self.groupSend("bob", "m3", "x"), NotMember)

    @inlineCallbacks
    def test_groupRetryAfterRemoval(self):
        """
        A retry of a group send returns the original outcome even if the
        sender was removed meanwhile.
        """
        yield self.group()
        first = yield self.groupSend("bob", "m1", "hi")
        yield self.store.removeMembers("g1", ["bob"])
        again = yield self.groupSend("bob", "m1", "hi")
        self.assertTrue(again.duplicate)
        self.assertEqual(again.message.id, first.message.id)
        self.assertEqual(again.seqs, {"bob": first.seqs["bob"]})

    @inlineCallbacks
    def test_emptyGroup(self):
        """
        A group whose members were all removed still exists, but nobody,
        not even the system, can send to it.
        """
        yield self.group()
        yield self.store.removeMembers("g1", ["alice", "bob", "carol"])
        self.assertEqual((yield self.store.group("g1")).member_count, 0)
        self.assertEqual((yield self.store.members("g1")), [])
        yield self.assertFailure(self.groupSend(SYSTEM, "k1", "x"), NotMember)

    @inlineCallbacks
    def test_systemSender(self):
        """
        The system sender has no inbox; its messages are idempotent too.
        """
        delivery = yield self.store.deliver(SYSTEM, "k1", text("hi"), ["bob", "carol"], T0)
        self.assertEqual(sorted(delivery.seqs), ["bob", "carol"])
        self.assertEqual((yield self.store.head(SYSTEM)), 0)
        again = yield self.store.deliver(SYSTEM, "k1", text("hi"), ["bob", "carol"], T0)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.seqs, {SYSTEM: 0})
        self.assertEqual((yield self.store.head("bob")), delivery.seqs["bob"])

    @inlineCallbacks
    def test_systemGroupMessage(self):
        """
        The system may send to a group it is not a member of, but not to a
        group that does not exist.
        """
        yield self.group()
        delivery = yield self.groupSend(SYSTEM, "k1", "notice")
        self.assertEqual(sorted(delivery.seqs), ["alice", "bob", "carol"])
        yield self.assertFailure(self.groupSend(SYSTEM, "k2", "x", groupId="nope"), NotMember)

    @inlineCallbacks
    def test_awkwardIds(self):
        """
        Uids, device ids, group ids and client message ids with braces,
        colons, spaces and non-ASCII characters are kept apart.
        """
        uids = ["a", "a}", "{a}", "a:b", "a}:inbox", "\u00e9t\u00e9", "\U0001f600 x"]
        seen = {}
        for i, uid in enumerate(uids):
            delivery = yield self.store.deliver(
                "s}:{x", "m:%d}" % (i,), text(str(i), uid), [uid], T0
            )
            seen[uid] = delivery.seqs[uid]
        for i, uid in enumerate(uids):
            entries = yield self.store.fetch(uid, 0, 10)
            self.assertEqual(
                [(e.seq, e.message.body) for e in entries], [(seen[uid], str(i).encode())]
            )
        yield self.store.ack([("a}", "d:{1}", 7)], T0)
        self.assertEqual((yield self.store.cursor("a}", "d:{1}")), 7)
        self.assertEqual((yield self.store.cursor("a", "d:{1}")), 0)
        long = "\u00e9" * 150
        yield self.store.createGroup("g}:{1", "\u00e9", "a}", T0)
        yield self.store.setMembers(
            "g}:{1", [("{a}", pb.ROLE_MEMBER), (long, pb.ROLE_MEMBER)], 10, T0
        )
        self.assertEqual([g.group_id for g in (yield self.store.groupsOf("{a}"))], ["g}:{1"])
        self.assertEqual([g.group_id for g in (yield self.store.groupsOf(long))], ["g}:{1"])
        self.assertEqual([m.uid for m in (yield self.store.members("g}:{1"))], ["a}", "{a}", long])
        delivery = yield self.groupSend("{a}", "m:1}", "g", groupId="g}:{1")
        self.assertEqual(sorted(delivery.seqs), ["a}", "{a}", long])
        [entry] = yield self.store.fetch(long, 0, 10)
        self.assertEqual(entry.seq, delivery.seqs[long])
        yield self.store.deleteGroup("g}:{1")
        self.assertEqual((yield self.store.groupsOf(long)), [])


def plain(i):
    """
    An outbox event without presence, told apart by C{i}.
    """
    return groupChanged("g%d" % (i,), GROUP_CREATED, ["u%d" % (i,)], "G%d" % (i,))


#: Uids, group ids and client message ids whose JSON needs escapes.
AWKWARD = ['q"uote', "back\\slash", "tab\tnl\nctl\x01\x1f\x7f", "/sl\u00e9\U0001f600"]


class OutboxTestsMixin:
    """
    L{IOutbox}, for the test cases of L{StoreTestsMixin} (it uses their
    C{self.store}, C{send}, C{group} and C{groupSend}): the events a store
    records itself in the transaction of the change, the ones it is given,
    their ids, paging, removal, expiry, the bound, and the presence ledger.
    """

    def enable(self, *types):
        self.store.outboxEvents = frozenset(types)

    @inlineCallbacks
    def entries(self, afterId=0):
        entries = yield self.store.pending(afterId, 1000)
        return entries

    @inlineCallbacks
    def datas(self):
        entries = yield self.entries()
        return [json.loads(entry.data) for entry in entries]

    def logged(self):
        """
        Capture the store's log events; return the list they go to.
        """
        events = []
        self.store.log = Logger(observer=events.append)
        return events

    def test_outboxInterface(self):
        """
        The store provides L{IOutbox}; by default it records no events
        itself and keeps up to L{OUTBOX_LIMIT} entries.
        """
        verifyObject(IOutbox, self.store)
        self.assertEqual(self.store.outboxEvents, frozenset())
        self.assertEqual(self.store.outboxLimit, OUTBOX_LIMIT)
        self.assertEqual(self.store.outboxDropped, 0)

    @inlineCallbacks
    def test_noEventsByDefault(self):
        """
        With C{outboxEvents} empty, messages and group changes record
        nothing.
        """
        yield self.group()
        yield self.send("alice", "m1", "hello")
        yield self.groupSend("alice", "m2", "hi")
        yield self.store.removeMembers("g1", ["bob"])
        yield self.store.deleteGroup("g1")
        self.assertEqual((yield self.entries()), [])
        self.assertEqual((yield self.store.outboxStats()), (0, None))

    @inlineCallbacks
    def test_messageStored(self):
        """
        With C{message.stored} on, a stored 1:1 message records its event,
        with the time of the delivery, keyed by the sender, its data as
        L{messageStored} makes it: recipients without the sender, body in
        base64, the ids.  Group changes record nothing.
        """
        self.enable(MESSAGE_STORED)
        yield self.group()
        delivery = yield self.send("alice", "m1", "hello", now=T0 + 5)
        [entry] = yield self.entries()
        self.assertEqual(
            (entry.type, entry.key, entry.createdMs), (MESSAGE_STORED, "alice", T0 + 5)
        )
        self.assertRegex(entry.eventId, r"^evt_[0-9a-f]{16}_%d$" % (entry.id,))
        self.assertEqual(
            json.loads(entry.data),
            {
                "message_id": str(delivery.message.id),
                "client_msg_id": "m1",
                "sender": "alice",
                "to": "bob",
                "recipients": ["bob"],
                "body": base64.b64encode(b"hello").decode("ascii"),
                "content_type": "text/plain",
                "created_ms": T0 + 5,
            },
        )
        self.assertEqual(entry.data, messageStored(delivery.message, delivery.seqs).data)

    @inlineCallbacks
    def test_messageStoredGroup(self):
        """
        A group message's event names the group, not a recipient, and lists
        the members it was appended to, the sender excluded; a message of
        the system sender lists every recipient.
        """
        self.enable(MESSAGE_STORED)
        yield self.group()
        delivery = yield self.groupSend("bob", "m1", "hi")
        yield self.store.deliver(SYSTEM, "k1", text("notice"), ["bob", "carol"], T0)
        first, second = yield self.datas()
        self.assertEqual(
            (first["group_id"], first["sender"], first["message_id"]),
            ("g1", "bob", str(delivery.message.id)),
        )
        self.assertNotIn("to", first)
        self.assertEqual(sorted(first["recipients"]), ["alice", "carol"])
        self.assertEqual((second["sender"], second["recipients"]), ("", ["bob", "carol"]))

    @inlineCallbacks
    def test_messageStoredEscapes(self):
        """
        Uids, a group id and client message ids that JSON must escape give
        the very bytes L{messageStored} makes (a store building the list of
        recipients itself escapes them the same way).
        """
        self.enable(MESSAGE_STORED)
        deliveries = []
        for i, uid in enumerate(AWKWARD):
            deliveries.append(
                (yield self.store.deliver(uid, "m%s%d" % (uid, i), text("x", uid), AWKWARD, T0))
            )
        yield self.store.createGroup(AWKWARD[0], "G", AWKWARD[0], T0)
        yield self.store.setMembers(AWKWARD[0], [(AWKWARD[1], pb.ROLE_MEMBER)], 10, T0)
        deliveries.append((yield self.groupSend(AWKWARD[1], "g", "y", groupId=AWKWARD[0])))
        entries = yield self.entries()
        self.assertEqual(
            [e.data for e in entries],
            [messageStored(d.message, d.seqs).data for d in deliveries],
        )
        self.assertEqual([e.key for e in entries], AWKWARD + [AWKWARD[1]])

    @inlineCallbacks
    def test_noEventForDuplicateOrNotMember(self):
        """
        A duplicate stores nothing and records nothing; neither does a
        group message refused with L{NotMember}.
        """
        self.enable(MESSAGE_STORED)
        yield self.group()
        yield self.send("alice", "m1", "hello")
        self.assertTrue((yield self.send("alice", "m1", "hello")).duplicate)
        yield self.assertFailure(self.groupSend("mallory", "m2", "x"), NotMember)
        yield self.assertFailure(self.groupSend("alice", "m3", "x", groupId="nope"), NotMember)
        self.assertEqual([d["client_msg_id"] for d in (yield self.datas())], ["m1"])

    @inlineCallbacks
    def deliverBatch(self):
        """
        Deliver 40 messages from three senders, and a repeat, all at once,
        with C{message.stored} on; return the deliveries and the entries
        recorded, whose ids increase.
        """
        self.enable(MESSAGE_STORED)
        ds = [
            self.store.deliver("u%d" % (i % 3,), str(i), text(str(i)), ["bob"], T0)
            for i in range(40)
        ]
        ds.append(self.store.deliver("u0", "0", text("again"), ["bob"], T0))
        deliveries = yield gatherResults(ds)
        self.assertTrue(deliveries[-1].duplicate)
        entries = yield self.entries()
        ids = [e.id for e in entries]
        self.assertEqual(ids, sorted(set(ids)))
        return deliveries, entries

    @inlineCallbacks
    def test_batchInOrder(self):
        """
        Messages delivered together (one transaction for a store that
        batches) record their events in message order, with increasing ids.
        """
        deliveries, entries = yield self.deliverBatch()
        self.assertEqual(
            [json.loads(e.data)["client_msg_id"] for e in entries], [str(i) for i in range(40)]
        )
        self.assertEqual(
            [json.loads(e.data)["message_id"] for e in entries],
            [str(d.message.id) for d in deliveries[:40]],
        )

    @inlineCallbacks
    def test_groupChanged(self):
        """
        With C{group.changed} on: creating a group records C{created} (the
        owner, the name), adding members C{members_added} with only the
        uids that were not members (a role change records nothing),
        removing C{members_removed} with the uids that were members,
        deleting C{deleted}; refused changes and messages record nothing.
        """
        self.enable(GROUP_CHANGED)
        yield self.store.createGroup("g1", "Friends", "alice", T0)
        yield self.store.setMembers(
            "g1", [("bob", pb.ROLE_MEMBER), ("carol", pb.ROLE_MEMBER)], 10, T0 + 1
        )
        yield self.store.setMembers(
            "g1", [("bob", pb.ROLE_ADMIN), ("dave", pb.ROLE_MEMBER)], 10, T0 + 2
        )
        yield self.store.setMembers("g1", [("carol", pb.ROLE_ADMIN)], 10, T0 + 3)
        yield self.assertFailure(self.store.createGroup("g1", "Again", "bob", T0), GroupExists)
        yield self.assertFailure(
            self.store.setMembers("g1", [("erin", pb.ROLE_MEMBER)], 4, T0), GroupFull
        )
        yield self.assertFailure(self.store.removeMembers("nope", ["bob"]), GroupNotFound)
        yield self.assertFailure(self.store.deleteGroup("nope"), GroupNotFound)
        yield self.groupSend("alice", "m1", "hi")
        yield self.store.removeMembers("g1", ["bob", "zed", "bob"])
        yield self.store.removeMembers("g1", ["zed"])
        yield self.store.deleteGroup("g1")
        entries = yield self.entries()
        self.assertEqual(
            {(e.type, e.key) for e in entries}, {(GROUP_CHANGED, GROUP_KEY_PREFIX + "g1")}
        )
        self.assertEqual([e.createdMs for e in entries[:3]], [T0, T0 + 1, T0 + 2])
        self.assertEqual(
            [json.loads(e.data) for e in entries],
            [
                {"group_id": "g1", "change": "created", "uids": ["alice"], "name": "Friends"},
                {"group_id": "g1", "change": "members_added", "uids": ["bob", "carol"]},
                {"group_id": "g1", "change": "members_added", "uids": ["dave"]},
                {"group_id": "g1", "change": "members_removed", "uids": ["bob"]},
                {"group_id": "g1", "change": "deleted", "uids": []},
            ],
        )
        self.assertEqual(entries[1].data, groupChanged("g1", MEMBERS_ADDED, ["bob", "carol"]).data)

    @inlineCallbacks
    def test_enqueue(self):
        """
        C{enqueue} keeps the events it is given, in order, stamped with the
        time given; it answers how many it kept.
        """
        events = [plain(i) for i in range(3)]
        self.assertEqual((yield self.store.enqueue(events, T0 + 7)), 3)
        self.assertEqual((yield self.store.enqueue([], T0)), 0)
        entries = yield self.entries()
        self.assertEqual(
            [(e.type, e.key, e.data, e.createdMs) for e in entries],
            [(e.type, e.key, e.data, T0 + 7) for e in events],
        )
        self.assertEqual(len({e.eventId for e in entries}), 3)
        self.assertEqual(len({e.eventId.rsplit("_", 1)[0] for e in entries}), 1)

    @inlineCallbacks
    def test_pendingPages(self):
        """
        C{pending} gives at most C{limit} entries after C{afterId}, in id
        order.
        """
        for i in range(5):
            yield self.store.enqueue([plain(i)], T0 + i)
        entries = yield self.entries()
        ids = [e.id for e in entries]
        self.assertEqual(ids, sorted(set(ids)))
        first = yield self.store.pending(0, 2)
        self.assertEqual(first, entries[:2])
        self.assertEqual((yield self.store.pending(ids[1], 2)), entries[2:4])
        self.assertEqual((yield self.store.pending(ids[3], 10)), entries[4:])
        self.assertEqual((yield self.store.pending(ids[4], 10)), [])
        self.assertEqual((yield self.store.pending(ids[0] - 1, 1)), entries[:1])

    @inlineCallbacks
    def test_remove(self):
        """
        C{remove} forgets delivered entries and answers how many it
        removed; ids are never given again, not even once every entry is
        gone.
        """
        yield self.store.enqueue([plain(i) for i in range(4)], T0)
        entries = yield self.entries()
        self.assertEqual((yield self.store.remove([entries[0].id, entries[2].id])), 2)
        self.assertEqual((yield self.store.remove([entries[0].id])), 0)
        self.assertEqual((yield self.entries()), [entries[1], entries[3]])
        self.assertEqual((yield self.store.pending(entries[0].id, 10)), [entries[1], entries[3]])
        self.assertEqual((yield self.store.outboxStats()), (2, T0))
        self.assertEqual((yield self.store.remove([entries[1].id, entries[3].id])), 2)
        self.assertEqual((yield self.store.outboxStats()), (0, None))
        yield self.store.enqueue([plain(9)], T0)
        [later] = yield self.entries()
        self.assertGreater(later.id, entries[3].id)
        self.assertNotIn(later.eventId, [e.eventId for e in entries])

    @inlineCallbacks
    def test_removeMany(self):
        """
        C{remove} takes any number of ids at once.
        """
        yield self.store.enqueue([plain(i) for i in range(2500)], T0)
        entries = yield self.entries()
        self.assertEqual(len(entries), 1000)
        ids = [e.id for e in entries] + [e.id for e in (yield self.entries(entries[-1].id))]
        self.assertEqual((yield self.store.remove(ids)), 2000)
        self.assertEqual((yield self.store.outboxStats())[0], 500)

    @inlineCallbacks
    def test_expire(self):
        """
        C{expire} removes the entries recorded before the time given, and
        answers how many.
        """
        for i in range(3):
            yield self.store.enqueue([plain(i), plain(i + 10)], T0 + i * HOUR)
        self.assertEqual((yield self.store.outboxStats()), (6, T0))
        self.assertEqual((yield self.store.expire(T0)), 0)
        self.assertEqual((yield self.store.expire(T0 + HOUR)), 2)
        self.assertEqual((yield self.store.outboxStats()), (4, T0 + HOUR))
        self.assertEqual(
            [e.createdMs for e in (yield self.entries())], [T0 + HOUR] * 2 + [T0 + 2 * HOUR] * 2
        )
        self.assertEqual((yield self.store.expire(T0 + 3 * HOUR)), 4)
        self.assertEqual((yield self.store.outboxStats()), (0, None))

    @inlineCallbacks
    def test_trimLeavesOutbox(self):
        """
        Inbox retention (C{trim}) does not touch the outbox.
        """
        self.enable(MESSAGE_STORED)
        yield self.send("alice", "m1", "old", now=T0)
        yield self.store.trim(T0 + 48 * HOUR, HOUR, 0)
        self.assertEqual((yield self.store.fetch("bob", 0, 10)), [])
        self.assertEqual((yield self.store.outboxStats()), (1, T0))

    @inlineCallbacks
    def test_limit(self):
        """
        A full outbox keeps no new event and counts it in C{outboxDropped},
        with one warning; the message is stored all the same.  Once entries
        are removed, events are kept again.
        """
        logged = self.logged()
        self.enable(MESSAGE_STORED, GROUP_CHANGED)
        self.store.outboxLimit = 2
        for i in range(3):
            yield self.send("alice", str(i), str(i))
        yield self.store.createGroup("g1", "G", "alice", T0)
        self.assertEqual(len((yield self.store.fetch("bob", 0, 10))), 3)
        self.assertIsNotNone((yield self.store.group("g1")))
        entries = yield self.entries()
        self.assertEqual([json.loads(e.data)["client_msg_id"] for e in entries], ["0", "1"])
        self.assertEqual(self.store.outboxDropped, 2)
        self.assertEqual((yield self.store.outboxStats()), (2, T0))
        self.assertEqual((yield self.store.enqueue([plain(1)], T0)), 0)
        self.assertEqual(self.store.outboxDropped, 3)
        warnings = [e for e in logged if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual((warnings[0]["limit"], warnings[0]["count"]), (2, 1))
        yield self.store.remove([entries[0].id])
        self.assertEqual((yield self.store.enqueue([plain(1), plain(2)], T0)), 1)
        yield self.send("alice", "3", "3")
        self.assertEqual(self.store.outboxDropped, 5)
        entries = yield self.entries()
        self.assertEqual(len(entries), 2)
        self.assertEqual(entries[-1].data, plain(1).data)

    @inlineCallbacks
    def test_presence(self):
        """
        C{user.online} records the device as present on its gate and
        C{user.offline} forgets exactly that session; C{presentOn} lists a
        gate's devices.  Both events are kept in the outbox too.
        """
        yield self.store.enqueue(
            [
                userOnline("alice", "phone", pb.IOS, "gate-1", "s1"),
                userOnline("bob", "pc", pb.WEB, "gate-1", "s2"),
                userOnline("alice", "pc", pb.WEB, "gate-2", "s3"),
            ],
            T0,
        )
        self.assertEqual(
            (yield self.store.presentOn("gate-1")),
            [("alice", "phone", "s1"), ("bob", "pc", "s2")],
        )
        self.assertEqual((yield self.store.presentOn("gate-2")), [("alice", "pc", "s3")])
        self.assertEqual((yield self.store.presentOn("gate-3")), [])
        yield self.store.enqueue(
            [
                userOffline("alice", "phone", "gate-1", "s1", "closed"),
                userOffline("bob", "pc", "gate-1", "old", "closed"),
                userOffline("alice", "pc", "gate-1", "s3", "closed"),
            ],
            T0,
        )
        self.assertEqual((yield self.store.presentOn("gate-1")), [("bob", "pc", "s2")])
        self.assertEqual((yield self.store.presentOn("gate-2")), [("alice", "pc", "s3")])
        entries = yield self.entries()
        self.assertEqual([e.type for e in entries], [USER_ONLINE] * 3 + [USER_OFFLINE] * 3)

    @inlineCallbacks
    def test_presenceWhenFull(self):
        """
        The presence ledger changes even when the outbox is full and the
        event itself is not kept.
        """
        self.store.outboxLimit = 0
        self.logged()
        kept = yield self.store.enqueue(
            [
                userOnline("alice", "phone", pb.IOS, "gate-1", "s1"),
                userOnline("bob", "pc", pb.WEB, "gate-1", "s2"),
            ],
            T0,
        )
        self.assertEqual(kept, 0)
        self.assertEqual(len((yield self.store.presentOn("gate-1"))), 2)
        yield self.store.enqueue([userOffline("bob", "pc", "gate-1", "s2", "kicked")], T0)
        self.assertEqual((yield self.store.presentOn("gate-1")), [("alice", "phone", "s1")])
        self.assertEqual((yield self.store.outboxStats()), (0, None))
        self.assertEqual(self.store.outboxDropped, 3)

    @inlineCallbacks
    def test_presenceAwkwardIds(self):
        """
        Uids, device ids, gate ids (the empty one too) and session ids with
        separators and non-ASCII characters are kept apart.
        """
        gate = "g:1}\u00e9"
        yield self.store.enqueue(
            [
                userOnline("a:b", "c", pb.WEB, gate, "s"),
                userOnline("a", "b:c", pb.WEB, gate, "s"),
                userOnline("\u00e9", "", pb.WEB, gate, "1:2"),
                userOnline("a", "b", pb.WEB, "", "s"),
            ],
            T0,
        )
        self.assertEqual(
            (yield self.store.presentOn(gate)),
            [("a", "b:c", "s"), ("a:b", "c", "s"), ("\u00e9", "", "1:2")],
        )
        self.assertEqual((yield self.store.presentOn("g:1}")), [])
        self.assertEqual((yield self.store.presentOn("")), [("a", "b", "s")])

    @inlineCallbacks
    def test_claimOutbox(self):
        """
        A store one gate uses grants the outbox to whoever asks.
        """
        self.assertTrue((yield self.store.claimOutbox("gate-1", 10000)))
        self.assertTrue((yield self.store.claimOutbox("gate-2", 10000)))


class MemoryStoreTests(StoreTestsMixin, OutboxTestsMixin, TestCase):
    """
    L{MemoryMessageStore}.
    """

    def makeStore(self, dedupWindowMs):
        return MemoryMessageStore(dedupWindowMs=dedupWindowMs)

    def test_outboxClock(self):
        """
        The group changes given no time record their events at the time of
        the store's clock.
        """
        clock = Clock()
        clock.advance(1234.5678)
        self.store = MemoryMessageStore(clock=clock)
        self.enable(GROUP_CHANGED)
        self.r(self.group())
        self.r(self.store.removeMembers("g1", ["bob"]))
        clock.advance(1)
        self.r(self.store.deleteGroup("g1"))
        entries = self.r(self.store.pending(0, 10))
        self.assertEqual([e.createdMs for e in entries], [T0, T0, 1234567, 1235567])


class SQLiteStoreTests(StoreTestsMixin, OutboxTestsMixin, TestCase):
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
        first = self.r(self.send("alice", "m1", "hello"))
        self.store.stopService()
        self.store = SQLiteMessageStore(self.path, None, 24 * HOUR, threaded=False)
        self.store.startService()
        self.assertEqual(len(self.r(self.store.fetch("bob", 0, 10))), 1)
        self.assertTrue(self.r(self.send("alice", "m1", "hello")).duplicate)
        second = self.r(self.send("alice", "m2", "again"))
        self.assertEqual(second.seqs, {"bob": 2, "alice": 2})
        self.assertGreater(second.message.id, first.message.id)

    def test_idsNeverReused(self):
        """
        Message ids are not reused after a restart, even when retention has
        removed every message.
        """
        first = self.r(self.send("alice", "m1", "hello", now=T0))
        self.r(self.store.trim(T0 + 48 * HOUR, 24 * HOUR, 1000))
        self.store.stopService()
        self.store = SQLiteMessageStore(self.path, None, 24 * HOUR, threaded=False)
        self.store.startService()
        second = self.r(self.send("alice", "m2", "again", now=T0 + 48 * HOUR))
        self.assertGreater(second.message.id, first.message.id)

    def reopen(self, **kwargs):
        """
        Close the store and open the database again, events as they were.
        """
        events = self.store.outboxEvents
        self.store.stopService()
        self.store = SQLiteMessageStore(self.path, None, 24 * HOUR, threaded=False, **kwargs)
        self.store.outboxEvents = events
        self.store.startService()
        self.addCleanup(self.store.stopService)

    def test_outboxDurableAcrossReopen(self):
        """
        The outbox and the presence ledger are there after the store is
        closed and opened again, with the same ids and event ids; the
        count is right; new ids continue above every id given before, even
        once every entry was removed.
        """
        self.enable(MESSAGE_STORED)
        self.r(self.send("alice", "m1", "hello"))
        self.r(self.store.enqueue([userOnline("alice", "phone", pb.IOS, "gate-1", "s1")], T0))
        before = self.r(self.store.pending(0, 10))
        self.assertEqual(len(before), 2)
        self.reopen()
        self.assertEqual(self.r(self.store.pending(0, 10)), before)
        self.assertEqual(self.r(self.store.presentOn("gate-1")), [("alice", "phone", "s1")])
        self.assertEqual(self.r(self.store.outboxStats()), (2, T0))
        self.assertEqual(self.r(self.store.remove([e.id for e in before])), 2)
        self.reopen()
        self.assertEqual(self.r(self.store.outboxStats()), (0, None))
        self.r(self.send("alice", "m2", "again"))
        [after] = self.r(self.store.pending(0, 10))
        self.assertGreater(after.id, before[-1].id)
        self.assertEqual(after.eventId.rsplit("_", 1)[0], before[0].eventId.rsplit("_", 1)[0])

    def test_storeIdPerDatabase(self):
        """
        Every database has a store id of its own, so event ids of two
        databases differ.
        """
        self.r(self.store.enqueue([plain(1)], T0))
        other = SQLiteMessageStore(self.mktemp(), None, threaded=False)
        other.startService()
        self.addCleanup(other.stopService)
        self.r(other.enqueue([plain(1)], T0))
        [mine] = self.r(self.store.pending(0, 10))
        [theirs] = self.r(other.pending(0, 10))
        self.assertEqual(mine.id, theirs.id)
        self.assertNotEqual(mine.eventId, theirs.eventId)

    def test_upgradeOlderDatabase(self):
        """
        A database made before the outbox (without its tables and meta
        keys) gets them when it is opened, and keeps its messages.
        """
        self.r(self.send("alice", "m1", "hello"))
        self.store.stopService()
        db = sqlite3.connect(self.path)
        for table in ADDED_TABLES:
            db.execute("DROP TABLE " + table)
        db.execute("DELETE FROM meta WHERE key IN ('store_id', 'last_outbox_id')")
        db.commit()
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        db.close()
        self.assertEqual(
            tables,
            {"messages", "inbox", "heads", "dedup", "meta", "groups", "members", "cursors"},
        )
        self.reopen()
        self.enable(MESSAGE_STORED)
        self.assertEqual(len(self.r(self.store.fetch("bob", 0, 10))), 1)
        self.r(self.send("alice", "m2", "again"))
        self.r(self.store.enqueue([userOnline("alice", "pc", pb.WEB, "gate-1", "s1")], T0))
        self.assertEqual(
            [e.type for e in self.r(self.store.pending(0, 10))], [MESSAGE_STORED, USER_ONLINE]
        )
        self.assertEqual(self.r(self.store.presentOn("gate-1")), [("alice", "pc", "s1")])

    def test_eventInMessageTransaction(self):
        """
        The event is written in the message's transaction: if writing the
        event fails, the message is not stored either, and the outbox's
        counters are as before.
        """
        self.enable(MESSAGE_STORED)
        db = self.store._db
        db.execute(
            "CREATE TEMP TRIGGER refuse BEFORE INSERT ON outbox"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        self.failureResultOf(self.send("alice", "m1", "hello"), sqlite3.IntegrityError)
        self.assertEqual(self.r(self.store.head("bob")), 0)
        self.assertEqual(self.r(self.store.fetch("bob", 0, 10)), [])
        db.execute("DROP TRIGGER refuse")
        delivery = self.r(self.send("alice", "m1", "hello"))
        self.assertFalse(delivery.duplicate)
        [entry] = self.r(self.store.pending(0, 10))
        self.assertEqual(entry.id, 1)
        self.assertEqual(self.r(self.store.outboxStats()), (1, T0))

    def test_rolledBackBatch(self):
        """
        When a transaction rolls back and its operations run again one by
        one, the outbox's ids, count and dropped events are those of the
        run that committed.
        """
        self.enable(MESSAGE_STORED)
        self.store.outboxLimit = 2
        ops = self.store._ops

        def bad(db):
            db.execute("SELECT * FROM nowhere")

        batch = [
            (ops.deliver, ("alice", str(i), text(str(i)), ["bob"], T0), None) for i in range(3)
        ]
        batch.append((bad, (), None))
        results = self.store._runBatch(self.store._db, batch)
        self.assertEqual([r.seqs["bob"] for _, r in results[:3]], [1, 2, 3])
        self.assertIsInstance(results[3][1], Failure)
        self.assertEqual([e.id for e in self.r(self.store.pending(0, 10))], [1, 2])
        self.assertEqual(self.store.outboxDropped, 1)
        self.assertEqual(self.r(self.store.outboxStats()), (2, T0))

    def test_outboxClock(self):
        """
        The group changes given no time record their events at the time of
        the store's clock.
        """
        clock = Clock()
        clock.advance(1234.5678)
        self.reopen(clock=clock)
        self.enable(GROUP_CHANGED)
        self.r(self.group())
        self.r(self.store.deleteGroup("g1"))
        entries = self.r(self.store.pending(0, 10))
        self.assertEqual([e.createdMs for e in entries], [T0, T0, 1234567])
        self.assertEqual(json.loads(entries[-1].data)["change"], GROUP_DELETED)

    def test_walAndFullSync(self):
        """
        The database runs in WAL mode with synchronous=FULL.
        """
        db = self.store._db
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(db.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_walAutocheckpoint(self):
        """
        A commit checkpoints once the WAL holds C{walAutocheckpoint} pages:
        L{WAL_AUTOCHECKPOINT} (10,000, not SQLite's 1,000) by default, or
        what the store is given.
        """
        self.assertEqual(WAL_AUTOCHECKPOINT, 10000)
        db = self.store._db
        self.assertEqual(db.execute("PRAGMA wal_autocheckpoint").fetchone()[0], 10000)
        store = SQLiteMessageStore(self.mktemp(), None, threaded=False, walAutocheckpoint=500)
        store.startService()
        self.addCleanup(store.stopService)
        self.assertEqual(store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0], 500)

    def test_notRunning(self):
        """
        A stopped store refuses operations with L{StoreClosed}.
        """
        self.store.stopService()
        self.failureResultOf(self.store.head("bob"), StoreClosed)
        self.store.startService()


class ThreadedSQLiteSuiteTests(StoreTestsMixin, OutboxTestsMixin, TestCase):
    """
    L{SQLiteMessageStore} on its writer thread, with the real reactor: the
    shared suite.
    """

    timeout = 30

    def makeStore(self, dedupWindowMs):
        store = SQLiteMessageStore(self.mktemp(), reactor, dedupWindowMs)
        store.startService()
        self.addCleanup(store.stopService)
        return store


class SaverSQLiteSuiteTests(StoreTestsMixin, OutboxTestsMixin, TestCase):
    """
    L{SQLiteMessageStore} with its writer in a process of its own (the
    saver, C{--store-writer process}), with the real reactor: the shared
    suite, every operation and result through the saver's pipe.
    """

    timeout = 30

    def makeStore(self, dedupWindowMs):
        store = SQLiteMessageStore(self.mktemp(), reactor, dedupWindowMs, process=True)
        store.startService()
        self.addCleanup(store.stopService)
        return store


class SaverTests(TestCase):
    """
    The saver process's own behaviour: commits reported, a stop that
    finishes the work, a saver that dies replaced, one saver per database.
    """

    timeout = 30

    def setUp(self):
        self.commits = []
        self.path = self.mktemp()
        self.store = SQLiteMessageStore(
            self.path,
            reactor,
            process=True,
            commitObserver=lambda size, seconds: self.commits.append(size),
        )
        self.store.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.store.running:
            return self.store.stopService()

    def deliver(self, clientMsgId, to="bob"):
        return self.store.deliver(
            "alice", clientMsgId, pb.Message(recipient=to, body=b"x"), [to], T0
        )

    @inlineCallbacks
    def test_commitsReported(self):
        """
        Each transaction of the saver is reported to the gate's commit
        observer, and the store's counts follow.
        """
        results = yield gatherResults([self.deliver("m{}".format(i)) for i in range(20)])
        self.assertEqual([r.seqs["bob"] for r in results], list(range(1, 21)))
        self.assertEqual(sum(self.commits), 20)
        self.assertEqual(self.store.committed, 20)
        self.assertEqual(self.store.batches, len(self.commits))

    @inlineCallbacks
    def test_stopFinishes(self):
        """
        Stopping the store answers what was submitted, then the saver
        exits; what it committed is in the database.
        """
        sends = [self.deliver("m{}".format(i)) for i in range(50)]
        saver = self.store._saver
        yield self.store.stopService()
        self.assertTrue(saver.ended.called)
        results = yield gatherResults(sends)
        self.assertEqual(len(results), 50)
        store = SQLiteMessageStore(self.path, None, threaded=False)
        store.startService()
        self.addCleanup(store.stopService)
        self.assertEqual(self.successResultOf(store.head("bob")), 50)

    @inlineCallbacks
    def test_saverDies(self):
        """
        A saver killed with operations outstanding fails them with
        C{UNAVAILABLE} (stored or not, the client retries), and the store
        starts another saver which serves what follows, the retry of a
        stored message answered as a duplicate.
        """
        first = yield self.deliver("m0")
        saver = self.store._saver
        pending = self.deliver("m1")
        os.kill(saver.transport.pid, signal.SIGKILL)
        yield saver.ended
        yield self.assertFailure(pending, Unavailable)
        self.assertIsNot(self.store._saver, saver)
        again = yield self.deliver("m0")
        self.assertEqual((again.duplicate, again.message.id), (True, first.message.id))
        later = yield self.deliver("m1")
        self.assertIn(later.seqs["bob"], (2, 3))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @inlineCallbacks
    def test_oneSaverPerDatabase(self):
        """
        The saver holds an exclusive lock on C{<database>.saver-lock} while
        it runs (taken before it answers anything): a second saver of the
        same database waits for it.
        """
        yield self.store.head("bob")
        lock = open(self.path + LOCK_SUFFIX, "a")
        self.addCleanup(lock.close)
        self.assertRaises(
            BlockingIOError, fcntl.flock, lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB
        )

    @inlineCallbacks
    def test_outboxSettings(self):
        """
        The outbox's settings reach the saver, before and after it started.
        """
        self.store.outboxEvents = [MESSAGE_STORED]
        yield self.deliver("m0")
        stats = yield self.store.outboxStats()
        self.assertEqual(stats[0], 1)


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
        ds = [self.store.deliver("alice", str(i), text(str(i)), ["bob"], T0) for i in range(500)]
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

    def commitDelayed(self):
        """
        Restart the store with a commit delay of an hour, on a writer clock
        the test sets (C{self.now}).
        """
        self.now = [1000.0]
        #: Set when the writer reads its clock with operations queued: it
        #: is deciding whether to wait for more.
        self.deciding = threading.Event()
        store = self.store = SQLiteMessageStore(self.mktemp(), reactor, commitDelay=3600)

        def monotonic():
            if store._queue:
                self.deciding.set()
            return self.now[0]

        store.monotonic = monotonic
        store.startService()

    @inlineCallbacks
    def test_commitDelayNotAfterQuiet(self):
        """
        With a commit delay, the first operation, and one arriving longer
        than the delay after the last commit, are committed at once (an
        hour's delay would time the test out).
        """
        yield self.store.stopService()
        self.commitDelayed()
        first = yield self.store.deliver("alice", "m1", text("x"), ["bob"], T0)
        self.now[0] += 3601
        second = yield self.store.deliver("alice", "m2", text("x"), ["bob"], T0)
        self.assertEqual((first.seqs["bob"], second.seqs["bob"]), (1, 2))
        self.assertEqual(self.store.batches, 2)

    @inlineCallbacks
    def test_commitDelayGathers(self):
        """
        Operations arriving within the delay after a commit wait for its
        end and share one transaction (a stop ends the wait: they are
        committed, not dropped).
        """
        yield self.store.stopService()
        self.commitDelayed()
        yield self.store.deliver("alice", "m0", text("x"), ["bob"], T0)
        self.deciding.clear()
        ds = [self.store.deliver("alice", "m1", text("x"), ["bob"], T0)]
        # The writer has the operation, and waits instead of committing it.
        self.assertTrue(self.deciding.wait(10))
        ds += [self.store.deliver("alice", str(i), text("x"), ["bob"], T0) for i in range(4)]
        self.assertEqual(self.store.batches, 1)
        yield self.store.stopService()
        results = yield gatherResults(ds)
        self.assertEqual([d.seqs["bob"] for d in results], [2, 3, 4, 5, 6])
        self.assertEqual(self.store.batches, 2)

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
        self.store = SQLiteMessageStore(
            FilePath(self.mktemp()).child("no").child("db").path, reactor
        )
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
        plan = " | ".join(
            row[3]
            for row in db.execute(
                "EXPLAIN QUERY PLAN " + dedupLookup(3), ["a", "1", "b", "2", "c", "3"]
            )
        )
        self.assertIn("USING PRIMARY KEY", plan)
        self.assertNotIn("SCAN d", plan)
        self.assertNotIn("SCAN dedup", plan)


class RedisStoreTests(StoreTestsMixin, OutboxTestsMixin, TestCase):
    """
    L{RedisMessageStore} against a real C{redis-server} (one per test, AOF
    with C{appendfsync always}): the shared suite, then what is Redis's
    own: the seq floor and epoch across lost data, durability across a
    kill, unavailability, and the key layout.
    """

    timeout = 30

    @inlineCallbacks
    def makeStore(self, dedupWindowMs):
        self.server = RedisServer(self, reactor, appendfsync="always")
        yield self.server.start()
        self.connection = self.connect()
        yield whenConnected(self.connection)
        self.events = []
        store = RedisMessageStore(self.connection, reactor, dedupWindowMs)
        store.log = Logger(observer=self.events.append)
        return store

    def connect(self, replyTimeout=2):
        connection = connectRedis(
            reactor, RedisURL.parse(self.server.url), replyTimeout=replyTimeout
        )
        # Reconnect within 0.1 s after a restart instead of 1 s, to keep
        # the tests short.
        connection._factory.initialDelay = 0.1
        connection._factory.jitter = 0
        self.addCleanup(connection.disconnect)
        return connection

    def redis(self, *command):
        return self.connection.execute(*command)

    @inlineCallbacks
    def restartRedis(self, how):
        """
        Stop Redis (C{how}: C{"stop"} cleanly, C{"kill"} with SIGKILL, or
        C{"wipe"}: kill and delete its data), start it again, and wait
        until the connection is back.
        """
        lost = whenDisconnected(self.connection)
        yield getattr(self.server, how)()
        yield lost
        yield self.server.start()
        yield whenConnected(self.connection)

    def errors(self):
        return [e for e in self.events if e["log_level"] == LogLevel.error]

    @inlineCallbacks
    def test_nothingToStart(self):
        """
        A store built before its connection is up needs nothing started:
        it fails with L{RedisUnavailable} until the connection is up, then
        works.
        """
        connection = self.connect()
        store = RedisMessageStore(connection, reactor, 24 * HOUR)
        if not connection.connected:
            yield self.assertFailure(store.head("bob"), RedisUnavailable)
        yield whenConnected(connection)
        delivery = yield store.deliver("alice", "m1", text("x"), ["bob"], T0)
        self.assertEqual((yield store.head("bob")), delivery.seqs["bob"])
        self.assertEqual((store.rollbacks, store.restarts), (0, 0))

    @inlineCallbacks
    def test_keyLayout(self):
        """
        A user's keys share one hash tag, the hex of the uid, so a brace in
        a uid cannot end the tag; the body is stored once.
        """
        delivery = yield self.store.deliver("al{i}ce", "m1", text("x"), ["bob"], T0)
        yield self.store.ack([("bob", "phone", 1)], T0)
        yield self.store.createGroup("g", "G", "bob", T0)
        keys = sorted(k.decode() for k in (yield self.redis("KEYS", "*")))
        alice = b"al{i}ce".hex()
        bob = b"bob".hex()
        self.assertEqual(
            keys,
            sorted(
                [
                    "im:epoch",
                    "im:seqfloor",
                    "im:runid",
                    "im:msgid",
                    "im:bodies",
                    "im:m:%d" % (delivery.message.id,),
                    "im:d:{u:%s}:m1" % (alice,),
                    "im:{u:%s}:head" % (alice,),
                    "im:{u:%s}:inbox" % (alice,),
                    "im:{u:%s}:head" % (bob,),
                    "im:{u:%s}:inbox" % (bob,),
                    "im:{u:%s}:cursors" % (bob,),
                    "im:{u:%s}:groups" % (bob,),
                    "im:{g:%s}:info" % (b"g".hex(),),
                    "im:{g:%s}:members" % (b"g".hex(),),
                ]
            ),
        )
        ttl = yield self.redis("PTTL", "im:d:{u:%s}:m1" % (alice,))
        self.assertTrue(23 * HOUR < ttl <= 24 * HOUR, ttl)

    @inlineCallbacks
    def test_claimOutbox(self):
        """
        The outbox's lease: one owner at a time; the holder extends it; once
        it lapses another owner takes it.
        """
        other = RedisMessageStore(self.connect(), reactor, 24 * HOUR)
        yield whenConnected(other.connection)
        self.assertTrue((yield self.store.claimOutbox("gate-1", 10000)))
        self.assertFalse((yield other.claimOutbox("gate-2", 10000)))
        self.assertFalse((yield self.store.claimOutbox("gate-2", 10000)))
        ttl = yield self.redis("PTTL", "im:outbox:lease")
        self.assertTrue(0 < ttl <= 10000, ttl)
        self.assertTrue((yield other.claimOutbox("gate-1", 60000)))
        ttl = yield self.redis("PTTL", "im:outbox:lease")
        self.assertTrue(10000 < ttl <= 60000, ttl)
        self.assertTrue((yield self.store.claimOutbox("gate-1", 1)))
        for _ in range(400):
            if (yield other.claimOutbox("gate-2", 10000)):
                break
            yield deferLater(reactor, 0.005, lambda: None)
        else:
            self.fail("the lease of 1 ms did not lapse")
        self.assertFalse((yield self.store.claimOutbox("gate-1", 10000)))
        self.assertEqual((yield self.redis("GET", "im:outbox:lease")), b"gate-2")

    @inlineCallbacks
    def test_retentionLease(self):
        """
        Two gates' L{RetentionService}s on one Redis: one runs the passes,
        extending its lease by two intervals each time, the other skips
        them; when the lease lapses (the holder died) the other takes over.
        """
        other = RedisMessageStore(self.connect(), reactor, 24 * HOUR)
        yield whenConnected(other.connection)
        yield self.send("alice", "m1", "old")
        clock = Clock()
        clock.advance(T0 / 1000 + 10 * 3600)
        settings = Settings().replace(
            retention_interval=600.0, retention_age=3600.0, dedup_window=60.0
        )
        a, b = [
            RetentionService(
                store, clock, settings, lease=partial(store.claimLease, "im:retention:lease", gate)
            )
            for store, gate in [(self.store, "gate-a"), (other, "gate-b")]
        ]
        self.assertEqual((yield a.trim()), 2)
        for _ in range(3):
            self.assertIsNone((yield b.trim()))
            self.assertEqual((yield a.trim()), 0)
        self.assertEqual((a.passes, a.skipped, b.passes, b.skipped), (4, 0, 0, 3))
        ttl = yield self.redis("PTTL", "im:retention:lease")
        self.assertTrue(600_000 < ttl <= 1_200_000, ttl)
        yield self.redis("DEL", "im:retention:lease")
        self.assertEqual((yield b.trim()), 0)
        self.assertIsNone((yield a.trim()))
        self.assertEqual((a.passes, a.skipped, b.passes, b.skipped), (4, 1, 1, 3))
        self.assertEqual((yield self.redis("GET", "im:retention:lease")), b"gate-b")

    @inlineCallbacks
    def test_outboxKeys(self):
        """
        The outbox is a stream of entries C{<id>-0}, with the last id, the
        store id and a presence hash per gate beside it; the event ids carry
        the store id.
        """
        self.enable(MESSAGE_STORED, GROUP_CHANGED)
        yield self.send("alice", "m1", "x")
        yield self.store.enqueue([userOnline("bob", "pc", pb.WEB, "g:1", "s1")], T0)
        keys = sorted(k.decode() for k in (yield self.redis("KEYS", "im:outbox*")))
        self.assertEqual(keys, ["im:outbox", "im:outbox:last", "im:outbox:store"])
        self.assertEqual((yield self.redis("TYPE", "im:outbox")), b"stream")
        self.assertEqual(
            (yield self.redis("HKEYS", "im:presence:%s" % (b"g:1".hex(),))), [b"3:bob2:pc2:s1"]
        )
        entries = yield self.entries()
        storeId = (yield self.redis("GET", "im:outbox:store")).decode()
        self.assertEqual(
            [e.eventId for e in entries], ["evt_%s_%d" % (storeId, e.id) for e in entries]
        )
        self.assertEqual(entries[0].id, T0 * 1000)
        self.assertEqual(entries[1].id, T0 * 1000 + 1)
        self.assertEqual(int((yield self.redis("GET", "im:outbox:last"))), entries[1].id)
        raw = yield self.redis("XRANGE", "im:outbox", "-", "+")
        self.assertEqual(raw[0][0], b"%d-0" % (entries[0].id,))

    @inlineCallbacks
    def test_outboxIdsAfterLoss(self):
        """
        Ids keep increasing if Redis lost the last id, and after it lost
        everything they start above the earlier ones (at the time of the
        event), under a new store id, so event ids are never given twice.
        """
        yield self.store.enqueue([plain(1)], T0)
        yield self.redis("DEL", "im:outbox:last")
        yield self.store.enqueue([plain(2)], T0)
        first, second = yield self.entries()
        self.assertGreater(second.id, first.id)
        yield self.redis("FLUSHALL")
        yield self.store.enqueue([plain(3)], T0 + 1)
        [third] = yield self.entries()
        self.assertGreater(third.id, second.id)
        self.assertNotEqual(third.eventId.rsplit("_", 1)[0], first.eventId.rsplit("_", 1)[0])

    @inlineCallbacks
    def test_expireByIds(self):
        """
        C{expire} removes by id, and an entry's id is at least its time in
        ms * 1000: an entry recorded with a clock behind the previous one's
        goes only with that one.
        """
        yield self.store.enqueue([plain(1)], T0 + HOUR)
        yield self.store.enqueue([plain(2)], T0)
        self.assertEqual((yield self.store.expire(T0 + 1)), 0)
        self.assertEqual((yield self.store.expire(T0 + HOUR + 1)), 2)

    @inlineCallbacks
    def test_outboxDurableAcrossKill(self):
        """
        With the AOF on, the outbox and the presence ledger survive C{kill
        -9} of Redis.
        """
        self.enable(MESSAGE_STORED, GROUP_CHANGED)
        yield self.group()
        yield gatherResults([self.send("alice", str(i), str(i)) for i in range(20)])
        yield self.store.enqueue([userOnline("bob", "pc", pb.WEB, "gate-1", "s1")], T0)
        before = yield self.entries()
        self.assertEqual(len(before), 23)
        yield self.restartRedis("kill")
        self.assertEqual((yield self.entries()), before)
        self.assertEqual((yield self.store.presentOn("gate-1")), [("bob", "pc", "s1")])

    @inlineCallbacks
    def test_seqsStartAtFloor(self):
        """
        A new inbox starts right above the seq floor (now in microseconds,
        below 2**53); the seqs are exact integers.
        """
        before = int(reactor.seconds() * 1000) * 1000
        delivery = yield self.send("alice", "m1", "x")
        floor = int((yield self.redis("GET", "im:seqfloor")))
        self.assertGreaterEqual(floor, before)
        self.assertLess(floor, 2**53)
        self.assertEqual(delivery.seqs, {"bob": floor + 1, "alice": floor + 1})
        for i in range(2, 5):
            delivery = yield self.send("alice", "m%d" % (i,), "x")
            self.assertEqual(delivery.seqs["bob"], floor + i)
        self.assertEqual(
            (yield self.redis("GET", "im:{u:%s}:head" % (b"bob".hex(),))), b"%d" % (floor + 4,)
        )
        self.assertEqual((yield self.seqsOf("bob")), [floor + i for i in range(1, 5)])

    @inlineCallbacks
    def test_concurrentDeliveries(self):
        """
        Many deliveries in flight at once, from two stores (two gates) on
        one Redis: every inbox gets consecutive seqs in the order the
        deliveries were sent, and ids are unique.
        """
        other = RedisMessageStore(self.connect(), reactor, 24 * HOUR, idBlock=7)
        yield whenConnected(other.connection)
        ds = []
        for i in range(300):
            store = (self.store, other)[i % 2]
            ds.append(store.deliver("u%d" % (i % 3,), str(i), text(str(i)), ["bob"], T0))
        deliveries = yield gatherResults(ds)
        self.assertEqual(len({d.message.id for d in deliveries}), 300)
        for start in (0, 1):
            mine = [d.seqs["bob"] for d in deliveries[start::2]]
            self.assertEqual(mine, sorted(mine))
        seqs = sorted(d.seqs["bob"] for d in deliveries)
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 300)))
        entries = yield self.store.fetch("bob", 0, 1000)
        self.assertEqual([e.seq for e in entries], seqs)
        self.assertEqual({e.message.id for e in entries}, {d.message.id for d in deliveries})

    @inlineCallbacks
    def test_fetchSkipsMissingBodies(self):
        """
        Entries whose body is gone are skipped, and the page is filled from
        later entries.
        """
        deliveries = []
        for i in range(5):
            deliveries.append((yield self.send("alice", str(i), str(i))))
        for i in (1, 2):
            yield self.redis("DEL", "im:m:%d" % (deliveries[i].message.id,))
        entries = yield self.store.fetch("bob", 0, 2)
        self.assertEqual([e.message.body for e in entries], [b"0", b"3"])
        entries = yield self.store.fetch("bob", entries[-1].seq, 10)
        self.assertEqual([e.message.body for e in entries], [b"4"])

    @inlineCallbacks
    def test_trimManyUsers(self):
        """
        Retention reaches every user, across many C{SCAN} pages, and
        deletes the old bodies.
        """
        self.store.scanCount = 7
        for i in range(40):
            yield self.send("s", "old%d" % (i,), "x", to="u%d" % (i,), now=T0)
        for i in range(40):
            yield self.send("s", "new%d" % (i,), "y", to="u%d" % (i,), now=T0 + 10 * HOUR)
        removed = yield self.store.trim(T0 + 10 * HOUR, 5 * HOUR, 1000)
        self.assertEqual(removed, 80)  # 40 recipients' and 40 of the sender's
        for i in range(40):
            entries = yield self.store.fetch("u%d" % (i,), 0, 10)
            self.assertEqual([e.message.body for e in entries], [b"y"])
        self.assertEqual((yield self.redis("ZCARD", "im:bodies")), 40)
        self.assertEqual(len((yield self.redis("KEYS", "im:m:*"))), 40)

    @inlineCallbacks
    def test_trimClockSkew(self):
        """
        An old entry behind a younger one (gates whose clocks disagree) is
        removed as long as the younger one is within C{clockSkewMs} of the
        limit; the younger one stays.
        """
        yield self.send("alice", "1", "a", now=T0 + 2 * HOUR)
        yield self.send("alice", "2", "b", now=T0)
        yield self.send("alice", "3", "c", now=T0 + 20 * HOUR)
        self.store.clockSkewMs = 3 * HOUR
        removed = yield self.store.trim(T0 + 6 * HOUR, 5 * HOUR, 1000)
        self.assertEqual(removed, 2)
        entries = yield self.store.fetch("bob", 0, 10)
        self.assertEqual([e.message.body for e in entries], [b"a", b"c"])

    @inlineCallbacks
    def test_trimLongInbox(self):
        """
        An inbox with more old entries than one script call examines is
        trimmed completely, over several calls.
        """
        from imserver.store.redis import store as module

        self.patch(module, "TRIM_SCAN_LIMIT", 200)
        ds = [self.send("alice", str(i), "x", now=T0) for i in range(450)]
        yield gatherResults(ds)
        yield self.send("alice", "new", "y", now=T0 + 10 * HOUR)
        removed = yield self.store.trim(T0 + 10 * HOUR, 5 * HOUR, 1000)
        self.assertEqual(removed, 900)
        self.assertEqual([e.message.body for e in (yield self.store.fetch("bob", 0, 10))], [b"y"])

    @inlineCallbacks
    def test_epochAcrossWipe(self):
        """
        After Redis lost everything, seqs and ids continue above anything
        given before (a new epoch, a new seq floor); the store logs the
        rollback as an error and counts it.
        """
        first = yield self.send("alice", "m1", "one")
        epoch = yield self.store.epoch()
        self.assertIsNotNone(epoch)
        yield self.restartRedis("wipe")
        self.assertEqual((yield self.store.head("bob")), 0)
        self.assertEqual(self.store.rollbacks, 1)
        self.assertIsNone((yield self.store.epoch()))
        second = yield self.send("alice", "m2", "two")
        self.assertGreater(second.seqs["bob"], first.seqs["bob"])
        self.assertGreater(second.seqs["alice"], first.seqs["alice"])
        self.assertGreater(second.message.id, first.message.id)
        newEpoch = yield self.store.epoch()
        self.assertNotIn(newEpoch, (None, epoch))
        self.assertEqual(self.store.rollbacks, 1)
        self.assertEqual(len(self.errors()), 1)
        self.assertEqual(self.errors()[0]["old"], epoch)
        entries = yield self.store.fetch("bob", 0, 10)
        self.assertEqual([e.message.body for e in entries], [b"two"])

    @inlineCallbacks
    def test_epochChangeSeenByDeliver(self):
        """
        A store that never saw the epoch vanish (another gate recreated it)
        sees it change at its next delivery.
        """
        yield self.send("alice", "m1", "one")
        yield self.redis("FLUSHALL")
        other = RedisMessageStore(self.connection, reactor, 24 * HOUR)
        yield other.deliver("carol", "c1", text("x"), ["dan"], T0)
        second = yield self.send("alice", "m2", "two")
        self.assertFalse(second.duplicate)
        self.assertEqual((self.store.rollbacks, other.rollbacks), (1, 0))

    @inlineCallbacks
    def test_restartRaisesFloor(self):
        """
        After a Redis restart (even one that kept its data) the seq floor is
        raised, so seqs of writes it may have lost are never given again;
        what it kept is still there, and it is not a rollback.
        """
        first = yield self.send("alice", "m1", "one")
        yield self.restartRedis("stop")
        again = yield self.send("alice", "m1", "one")
        self.assertTrue(again.duplicate)
        second = yield self.send("alice", "m2", "two")
        self.assertGreater(second.seqs["bob"], first.seqs["bob"] + 1000)
        self.assertEqual(
            [e.message.body for e in (yield self.store.fetch("bob", 0, 10))], [b"one", b"two"]
        )
        third = yield self.send("alice", "m3", "three")
        self.assertEqual(third.seqs["bob"], second.seqs["bob"] + 1)
        self.assertEqual((self.store.rollbacks, self.store.restarts), (0, 1))
        self.assertEqual(self.errors(), [])

    @inlineCallbacks
    def test_orderAfterRestart(self):
        """
        Deliveries sent at once right after a Redis restart (which forgot
        the scripts) are still stored in the order they were sent.
        """
        yield self.send("alice", "m0", "zero")
        yield self.restartRedis("stop")
        ds = []
        for i in range(1, 201):
            ds.append(self.send("alice", "m%d" % (i,), str(i)))
            if i % 5 == 0:
                # Let replies in between, so later sends overtake retries
                # of earlier ones if the scripts were not loaded first.
                yield deferLater(reactor, 0, lambda: None)
        deliveries = yield gatherResults(ds)
        seqs = [d.seqs["bob"] for d in deliveries]
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 200)))

    @inlineCallbacks
    def test_durableAcrossKill(self):
        """
        With the AOF on, every acked delivery, cursor and group change
        survives C{kill -9} of Redis: each reached the AOF before its reply.
        (A killed process cannot tell C{appendfsync always} from
        C{everysec}, since the kernel keeps what was written; only a crash
        of the host shows the difference, see L{imserver.store.redis}.)
        """
        yield self.group()
        ds = [self.send("alice", str(i), str(i), to="u%d" % (i % 5,)) for i in range(200)]
        ds += [self.groupSend("bob", "g%d" % (i,), str(i)) for i in range(50)]
        deliveries = yield gatherResults(ds)
        yield self.store.ack([("alice", "phone", 9)], T0)
        expected = {}
        for uid in ["alice", "bob", "carol", "u0", "u1", "u2", "u3", "u4"]:
            expected[uid] = [(e.seq, e.message.id) for e in (yield self.store.fetch(uid, 0, 1000))]
        self.assertEqual(sum(len(d.seqs) for d in deliveries), sum(map(len, expected.values())))
        yield self.restartRedis("kill")
        for uid, entries in expected.items():
            got = yield self.store.fetch(uid, 0, 1000)
            self.assertEqual([(e.seq, e.message.id) for e in got], entries)
        self.assertEqual((yield self.store.cursor("alice", "phone")), 9)
        self.assertEqual(len((yield self.store.members("g1"))), 3)
        self.assertTrue((yield self.send("alice", "0", "0", to="u0")).duplicate)
        self.assertEqual(self.store.rollbacks, 0)

    @inlineCallbacks
    def test_unavailable(self):
        """
        Without Redis every operation fails at once with
        L{RedisUnavailable}; when Redis is back they work again.
        """
        first = yield self.send("alice", "m1", "one")
        yield self.group()
        lost = whenDisconnected(self.connection)
        yield self.server.stop()
        yield lost
        started = reactor.seconds()
        operations = [
            lambda: self.send("alice", "m2", "two"),
            lambda: self.groupSend("alice", "m3", "three"),
            lambda: self.store.fetch("bob", 0, 10),
            lambda: self.store.head("bob"),
            lambda: self.store.ack([("bob", "phone", 1)], T0),
            lambda: self.store.cursor("bob", "phone"),
            lambda: self.store.trim(T0, HOUR, 10),
            lambda: self.store.epoch(),
            lambda: self.store.createGroup("g2", "G", "alice", T0),
            lambda: self.store.deleteGroup("g1"),
            lambda: self.store.setMembers("g1", [("dan", pb.ROLE_MEMBER)], 10, T0),
            lambda: self.store.removeMembers("g1", ["bob"]),
            lambda: self.store.group("g1"),
            lambda: self.store.members("g1"),
            lambda: self.store.groupsOf("bob"),
            lambda: self.store.enqueue([plain(1)], T0),
            lambda: self.store.pending(0, 10),
            lambda: self.store.remove([1]),
            lambda: self.store.expire(T0),
            lambda: self.store.outboxStats(),
            lambda: self.store.claimOutbox("gate-1", 1000),
            lambda: self.store.presentOn("gate-1"),
        ]
        for operation in operations:
            yield self.assertFailure(operation(), RedisUnavailable)
        self.assertLess(reactor.seconds() - started, 1)
        yield self.server.start()
        yield whenConnected(self.connection)
        second = yield self.send("alice", "m2", "two")
        self.assertGreater(second.seqs["bob"], first.seqs["bob"])
        self.assertEqual(len((yield self.store.fetch("bob", 0, 10))), 2)

    @inlineCallbacks
    def test_unresponsive(self):
        """
        A Redis that stops answering fails operations with
        L{RedisUnavailable} after the reply timeout, never hangs them.
        """
        connection = self.connect(replyTimeout=0.3)
        yield whenConnected(connection)
        store = RedisMessageStore(connection, reactor, 24 * HOUR)
        yield store.deliver("alice", "m1", text("x"), ["bob"], T0)
        self.server._transport.signalProcess(signal.SIGSTOP)
        self.addCleanup(self.server._transport.signalProcess, signal.SIGCONT)
        started = reactor.seconds()
        yield self.assertFailure(
            store.deliver("alice", "m2", text("x"), ["bob"], T0), RedisUnavailable
        )
        self.assertLess(reactor.seconds() - started, 2)

    @inlineCallbacks
    def test_noInfoCommand(self):
        """
        If C{INFO} is not allowed (renamed away, or an ACL), the store
        warns and works without the restart check.
        """
        server = RedisServer(
            self, reactor, appendfsync=None, extraArgs=["--rename-command", "INFO", ""]
        )
        yield server.start()
        connection = connectRedis(reactor, RedisURL.parse(server.url), replyTimeout=2)
        self.addCleanup(connection.disconnect)
        yield whenConnected(connection)
        events = []
        store = RedisMessageStore(connection, reactor, 24 * HOUR)
        store.log = Logger(observer=events.append)
        first = yield store.deliver("alice", "m1", text("x"), ["bob"], T0)
        second = yield store.deliver("alice", "m2", text("x"), ["bob"], T0)
        self.assertEqual(second.seqs["bob"], first.seqs["bob"] + 1)
        self.assertEqual(
            [e["log_level"] for e in events if "run id" in e["log_format"]], [LogLevel.warn]
        )


class _FailingSlots:
    """
    A L{ClusterConnection} whose scripts on the slots in C{failing} fail
    with L{RedisUnavailable} before being sent: a step of a deliver that
    did not happen (its primary unreachable).
    """

    def __init__(self, connection):
        self.connection = connection
        self.onConnect = connection.onConnect
        self.onDisconnect = connection.onDisconnect
        self.failing = set()
        self.refused = 0

    @property
    def connected(self):
        return self.connection.connected

    def addressOf(self, slot):
        return self.connection.addressOf(slot)

    def execute(self, *command, label=None):
        if command[0] in ("EVALSHA", "EVAL") and int(command[2]) > 0:
            if keySlot(command[3]) in self.failing:
                self.refused += 1
                return fail(RedisUnavailable("slot {} is down".format(keySlot(command[3]))))
        return self.connection.execute(*command, label=label)

    def script(self, source, name=None):
        return Script(self, source, name)


class RedisClusterStoreTests(StoreTestsMixin, OutboxTestsMixin, TestCase):
    """
    L{RedisMessageStore} on a real Redis Cluster (three primaries with a
    replica each, one cluster per test, about two seconds to start): the
    shared suite, then what is the cluster mode's own: a delivery across
    primaries, a partial fan-out completed by a retry, the seq floor of a
    slot whose primary lost its data or failed over, retention on every
    primary, the keys per slot.
    """

    timeout = 60
    oneFloor = False

    @inlineCallbacks
    def makeStore(self, dedupWindowMs):
        self.cluster = RedisCluster(self, reactor)
        yield self.cluster.start()
        self.connection = connectCluster(
            reactor, parseRedisURL(self.cluster.url), replyTimeout=2, connectTimeout=2
        )
        self.addCleanup(self.connection.disconnect)
        yield withDeadline(whenConnected(self.connection), 10, "the cluster connection")
        self.events = []
        store = RedisMessageStore(self.connection, reactor, dedupWindowMs)
        store.log = Logger(observer=self.events.append)
        return store

    def redis(self, *command):
        return self.connection.execute(*command)

    def spread(self, prefix="u"):
        """
        Three uids whose keys are on three different primaries.
        """
        byPrimary, n = {}, 0
        while len(byPrimary) < 3:
            uid = "%s%d" % (prefix, n)
            byPrimary.setdefault(self.connection.addressOf(userSlot(uid)), uid)
            n += 1
        return [byPrimary[address] for address in sorted(byPrimary)]

    @inlineCallbacks
    def allKeys(self):
        found, cursor = set(), b"0"
        while True:
            cursor, page = yield self.redis("SCAN", cursor, "COUNT", 1000)
            found.update(key.decode() for key in page)
            if cursor == b"0":
                return found

    @inlineCallbacks
    def bodies(self):
        """
        The message ids of the bodies stored, with how many slots hold each.
        """
        counts = {}
        for key in (yield self.allKeys()):
            if key.startswith("im:m:"):
                messageId = int(key.rsplit(":", 1)[1])
                counts[messageId] = counts.get(messageId, 0) + 1
        return counts

    def test_clusterMode(self):
        """
        The store sees it is on a cluster (a L{ClusterConnection}); any
        other connection is one Redis unless told otherwise.
        """
        self.assertTrue(self.store.cluster)
        failing = _FailingSlots(self.connection)
        self.assertFalse(RedisMessageStore(failing, reactor).cluster)
        self.assertTrue(RedisMessageStore(failing, reactor, cluster=True).cluster)

    @inlineCallbacks
    def test_acrossPrimaries(self):
        """
        A 1:1 delivery to a list of users and a group delivery, the users on
        three primaries: every inbox gets its entry, the body is stored in
        each of their slots, each slot has its own epoch and floor.
        """
        alice, bob, carol = self.spread()
        delivery = yield self.store.deliver(alice, "m1", text("hi", bob), [bob, carol], T0)
        self.assertEqual(sorted(delivery.seqs), sorted([alice, bob, carol]))
        for uid in (alice, bob, carol):
            [entry] = yield self.store.fetch(uid, 0, 10)
            self.assertEqual(
                (entry.seq, entry.message.id, entry.outgoing),
                (delivery.seqs[uid], delivery.message.id, uid == alice),
            )
            self.assertEqual((yield self.store.head(uid)), delivery.seqs[uid])
        self.assertEqual((yield self.bodies()), {delivery.message.id: 3})
        epochs = set()
        for uid in (alice, bob, carol):
            epochs.add((yield self.store.epoch(uid)))
        self.assertEqual(len(epochs), 3)
        self.assertNotIn(None, epochs)
        yield self.store.createGroup("g", "G", alice, T0)
        yield self.store.setMembers("g", [(bob, pb.ROLE_MEMBER), (carol, pb.ROLE_MEMBER)], 10, T0)
        group = yield self.store.deliver(carol, "g1", pb.Message(group_id="g", body=b"x"), [], T0)
        self.assertEqual(sorted(group.seqs), sorted([alice, bob, carol]))
        for uid in (alice, bob, carol):
            self.assertEqual(group.seqs[uid], delivery.seqs[uid] + 1)
            entries = yield self.store.fetch(uid, delivery.seqs[uid], 10)
            self.assertEqual([e.message.body for e in entries], [b"x"])
        self.assertEqual([g.group_id for g in (yield self.store.groupsOf(bob))], ["g"])
        again = yield self.store.deliver(carol, "g1", pb.Message(group_id="g", body=b"x"), [], T0)
        self.assertTrue(again.duplicate)
        self.assertEqual(again.seqs, {carol: group.seqs[carol]})
        self.assertEqual(self.store.rollbacks, 0)

    def recordAppends(self):
        """
        Record the slots of each C{deliverAppend.lua} call of the store.
        """
        calls = []
        append = self.store._deliverAppend

        def recording(keys, args):
            slots, i = [], 8
            while i < len(args):
                slots.append(keySlot(args[i]))
                i += 7 + 2 * int(args[i + 6])
            calls.append(slots)
            return append(keys, args)

        self.store._deliverAppend = recording
        return calls

    def manySlots(self, count):
        """
        C{count} uids of different slots, on every primary.
        """
        uids, slots, n = [], set(), 0
        while len(uids) < count:
            uid = "many%d" % (n,)
            if userSlot(uid) not in slots:
                slots.add(userSlot(uid))
                uids.append(uid)
            n += 1
        return uids

    @inlineCallbacks
    def test_appendPerPrimary(self):
        """
        A message to users of many slots is appended with one script call
        per other primary, carrying every slot of that primary (those of
        the sender's primary go with the begin script, up to
        C{BEGIN_APPEND_LIMIT} recipients); each inbox gets its one entry; a
        retry finds every slot applied.
        """
        sender, *others = self.manySlots(40)
        calls = self.recordAppends()
        delivery = yield self.store.deliver(sender, "m1", text("hi", others[0]), others, T0)
        there = {userSlot(uid) for uid in others} - {userSlot(sender)}
        # The sender's primary's other slots go with the begin script.
        senderPrimary = self.connection.addressOf(userSlot(sender))
        elsewhere = {slot for slot in there if self.connection.addressOf(slot) != senderPrimary}
        self.assertLess(len(elsewhere), len(there))
        self.assertEqual(len(calls), len({self.connection.addressOf(slot) for slot in elsewhere}))
        for slots in calls:
            self.assertEqual(len({self.connection.addressOf(slot) for slot in slots}), 1)
        self.assertEqual(sorted(slot for slots in calls for slot in slots), sorted(elsewhere))
        for uid in [sender] + others:
            [entry] = yield self.store.fetch(uid, 0, 10)
            self.assertEqual(
                (entry.seq, entry.message.id), (delivery.seqs[uid], delivery.message.id)
            )
        del calls[:]
        again = yield self.store.deliver(sender, "m1", text("hi", others[0]), others, T0)
        self.assertTrue(again.duplicate)
        self.assertEqual(sorted(slot for slots in calls for slot in slots), sorted(there))
        for uid in others:
            self.assertEqual(len((yield self.store.fetch(uid, 0, 10))), 1)
        # Beyond BEGIN_APPEND_LIMIT recipients, every other slot is
        # appended in parallel, none by the begin.
        self.patch(redisStoreModule, "BEGIN_APPEND_LIMIT", len(others) - 1)
        del calls[:]
        yield self.store.deliver(sender, "m2", text("hi", others[0]), others, T0)
        self.assertEqual(sorted(slot for slots in calls for slot in slots), sorted(there))

    @inlineCallbacks
    def test_appendRefused(self):
        """
        When the gate's slot map puts on one primary slots another serves
        (it is stale), the scripts refuse before writing anything (the
        begin is sent again without the other slots, the append splits into
        a call per slot, routed by its keys): every inbox gets exactly one
        entry, with the seqs answered.
        """
        sender, *others = self.manySlots(12)
        self.patch(
            self.connection, "addressOf", lambda slot, real=self.connection.addressOf: real(0)
        )
        calls = self.recordAppends()
        begins = []
        begin = self.store._deliverBegin

        def recording(keys, args):
            begins.append(len(args) - 12 - int(args[11]))
            return begin(keys, args)

        self.store._deliverBegin = recording
        delivery = yield self.store.deliver(sender, "m1", text("hi", others[0]), others, T0)
        slots = sorted({userSlot(uid) for uid in others} - {userSlot(sender)})
        # The begin with the other slots of "its primary" (all of them, by
        # the stale map), refused; again alone; then the appends.
        self.assertEqual(len(begins), 2)
        self.assertGreater(begins[0], 0)
        self.assertEqual(begins[1], 0)
        self.assertEqual(sorted(calls[0]), slots)
        self.assertEqual(sorted(calls[1:]), [[slot] for slot in slots])
        for uid in [sender] + others:
            [entry] = yield self.store.fetch(uid, 0, 10)
            self.assertEqual(
                (entry.seq, entry.message.id), (delivery.seqs[uid], delivery.message.id)
            )
            self.assertEqual((yield self.store.head(uid)), delivery.seqs[uid])

    @inlineCallbacks
    def test_ackPerPrimary(self):
        """
        Cursors of users of many slots are written with one C{ack.lua} call
        per primary; with a stale slot map (every slot placed on one
        primary) the cursors that node refuses are written again, each on
        its own: every cursor is written, once counted.
        """
        uids = self.manySlots(30)
        calls = []
        ack = self.store._ack

        def recording(keys, args):
            calls.append(len(args) // 3)
            return ack(keys, args)

        self.store._ack = recording
        written = yield self.store.ack([(uid, "d", 5) for uid in uids], T0)
        self.assertEqual(written, 30)
        primaries = [self.connection.addressOf(userSlot(uid)) for uid in uids]
        self.assertEqual(sorted(calls), sorted(primaries.count(a) for a in set(primaries)))
        del calls[:]
        first = self.connection.addressOf(0)
        self.patch(self.connection, "addressOf", lambda slot: first)
        written = yield self.store.ack([(uid, "d", 7) for uid in uids], T0)
        self.assertEqual(written, 30)
        # The call goes to the primary of the first user's key (it routes).
        self.assertEqual(calls, [30] + [1] * (30 - primaries.count(primaries[0])))
        for uid in uids:
            self.assertEqual((yield self.store.cursor(uid, "d")), 7)

    @inlineCallbacks
    def migrateAllBut(self, slot, kept):
        """
        Begin moving C{slot} to another primary and move every key of it
        but C{kept} (which must exist).

        @return: a L{Deferred} firing with a callable that moves C{kept}
            and ends the migration (returning a L{Deferred}).
        """
        source = yield self.cluster.ownerOf(slot)
        target = next(node for node in self.cluster.nodes[:3] if node is not source)
        yield self.cluster.beginMigration(slot, source, target)
        keys = [key for key in (yield self.allKeys()) if keySlot(key) == slot]
        self.assertIn(kept, keys)
        yield self.cluster.moveKeys(slot, source, target, [k for k in keys if k != kept])

        @inlineCallbacks
        def finish():
            yield self.cluster.moveKeys(slot, source, target, [kept])
            yield self.cluster.endMigration(slot, target)

        return finish

    @inlineCallbacks
    def test_fetchDuringMigration(self):
        """
        While a user's slot migrates, with their inbox on the target and a
        body not moved yet, a fetch fails with L{RedisUnavailable} (the
        session retries) rather than answering without that entry; once
        every key is moved, it answers the entry.
        """
        alice, bob, _ = self.spread()
        delivery = yield self.store.deliver(alice, "m1", text("hi", bob), [bob], T0)
        slot = userSlot(bob)
        body = slotBodyPrefix(slot) + "%d" % (delivery.message.id,)
        finish = yield self.migrateAllBut(slot, body)
        yield self.assertFailure(self.store.fetch(bob, 0, 10), RedisUnavailable)
        yield finish()
        [entry] = yield self.store.fetch(bob, 0, 10)
        self.assertEqual((entry.seq, entry.message.id), (delivery.seqs[bob], delivery.message.id))

    @inlineCallbacks
    def test_deliverDuringMigration(self):
        """
        While a recipient's slot migrates, with every key of it on the
        target but the recipient's head, a deliver fails with
        L{RedisUnavailable} (Redis refuses the script on both nodes: it
        declares new keys, the body and the applied record, and a migrating
        slot serves a call only with all its keys) rather than taking a seq
        without the head; once the head
        is moved too, the retry appends a higher seq (higher by more than
        one: the slot's run id is now another primary's, which raises its
        floor).
        """
        alice, bob, _ = self.spread()
        first = yield self.store.deliver(alice, "m1", text("hi", bob), [bob], T0)
        finish = yield self.migrateAllBut(userSlot(bob), userKey(bob, "head"))
        send = partial(self.store.deliver, alice, "m2", text("again", bob), [bob], T0)
        yield self.assertFailure(send(), RedisUnavailable)
        yield finish()
        second = yield send()
        self.assertGreater(second.seqs[bob], first.seqs[bob])
        entries = yield self.store.fetch(bob, 0, 10)
        self.assertEqual([e.seq for e in entries], [first.seqs[bob], second.seqs[bob]])

    @inlineCallbacks
    def test_keyLayout(self):
        """
        The keys: the user and group keys as on one Redis, the seq floor,
        epoch, run id and bodies per slot, the applied record in the other
        slots, the outbox under C{{im}}.
        """
        alice, bob, _ = self.spread()
        self.store.outboxEvents = frozenset([MESSAGE_STORED])
        delivery = yield self.store.deliver(alice, "m1", text("x", bob), [bob], T0)
        messageId = delivery.message.id
        keys = yield self.allKeys()
        expected = {"im:msgid", "im:{im}:outbox", "im:{im}:outbox:last", "im:{im}:outbox:store"}
        expected.add("im:{im}:stored:%d" % (messageId,))
        expected.add("im:d:{u:%s}:m1" % (alice.encode().hex(),))
        expected.add("im:a:{%s}:%d" % (slotTag(userSlot(bob)), messageId))
        for uid in (alice, bob):
            tag = slotTag(userSlot(uid))
            expected.update(
                "im:{%s}:%s" % (tag, n) for n in ("epoch", "seqfloor", "runid", "bodies")
            )
            expected.add("im:m:{%s}:%d" % (tag, messageId))
            expected.update("im:{u:%s}:%s" % (uid.encode().hex(), n) for n in ("head", "inbox"))
        self.assertEqual(keys, expected)
        self.assertEqual(keySlot(slotTag(userSlot(bob))), userSlot(bob))
        ttl = yield self.redis("PTTL", "im:a:{%s}:%d" % (slotTag(userSlot(bob)), messageId))
        self.assertTrue(23 * HOUR < ttl <= 24 * HOUR, ttl)

    @inlineCallbacks
    def test_claimOutbox(self):
        """
        The outbox's lease (alone in its slot): one owner at a time; the
        holder extends it.
        """
        other = RedisMessageStore(self.connection, reactor, 24 * HOUR)
        self.assertTrue((yield self.store.claimOutbox("gate-1", 10000)))
        self.assertFalse((yield other.claimOutbox("gate-2", 10000)))
        self.assertTrue((yield other.claimOutbox("gate-1", 60000)))
        ttl = yield self.redis("PTTL", "im:outbox:lease")
        self.assertTrue(10000 < ttl <= 60000, ttl)

    @inlineCallbacks
    def test_batchInOrder(self):
        """
        Concurrent deliveries record their events in order per ordering
        key (the sender); senders on different slots are independent.
        """
        _, entries = yield self.deliverBatch()
        self.assertEqual(len(entries), 40)
        for sender in ("u0", "u1", "u2"):
            mine = [json.loads(e.data) for e in entries if e.key == sender]
            self.assertEqual(
                [data["client_msg_id"] for data in mine],
                [str(i) for i in range(40) if "u%d" % (i % 3,) == sender],
            )

    @inlineCallbacks
    def test_partialFanOut(self):
        """
        A deliver whose step on one slot failed fails with
        L{RedisUnavailable}, leaving the other inboxes written; a retry
        completes it: the missing entry is appended, the others are not
        appended again, the seqs are the same, the outcome is a first
        delivery (the recipients were never told); the next retry is a
        duplicate; the C{message.stored} event is recorded once.
        """
        alice, bob, carol = self.spread()
        failing = _FailingSlots(self.connection)
        store = RedisMessageStore(failing, reactor, 24 * HOUR, cluster=True)
        store.outboxEvents = frozenset([MESSAGE_STORED])
        failing.failing.add(userSlot(carol))
        send = partial(store.deliver, alice, "m1", text("hi", bob), [bob, carol], T0)
        yield self.assertFailure(send(), RedisUnavailable)
        self.assertEqual(failing.refused, 1)
        [bobEntry] = yield self.store.fetch(bob, 0, 10)
        [aliceEntry] = yield self.store.fetch(alice, 0, 10)
        self.assertEqual((yield self.store.fetch(carol, 0, 10)), [])
        self.assertEqual((yield self.entries()), [])
        failing.failing.clear()
        retry = yield send()
        self.assertFalse(retry.duplicate)
        self.assertEqual(retry.message.id, bobEntry.message.id)
        self.assertEqual((retry.seqs[alice], retry.seqs[bob]), (aliceEntry.seq, bobEntry.seq))
        for uid in (alice, bob, carol):
            entries = yield store.fetch(uid, 0, 10)
            self.assertEqual([e.seq for e in entries], [retry.seqs[uid]])
            self.assertEqual(entries[0].message.id, retry.message.id)
        again = yield send()
        self.assertTrue(again.duplicate)
        self.assertEqual(again.seqs, {alice: aliceEntry.seq})
        self.assertEqual(again.message, retry.message)
        [event] = yield self.datas()
        self.assertEqual(
            (event["message_id"], sorted(event["recipients"])),
            (str(retry.message.id), sorted([bob, carol])),
        )
        self.assertEqual((yield self.bodies()), {retry.message.id: 3})

    @inlineCallbacks
    def test_eventAfterFanOut(self):
        """
        The C{message.stored} event is recorded after every inbox was
        written: if recording it fails, the deliver fails, and a retry (a
        duplicate now) records it, once.
        """
        alice, bob, _ = self.spread()
        failing = _FailingSlots(self.connection)
        store = RedisMessageStore(failing, reactor, 24 * HOUR, cluster=True)
        store.outboxEvents = frozenset([MESSAGE_STORED])
        failing.failing.add(keySlot("im"))
        send = partial(store.deliver, alice, "m1", text("hi", bob), [bob], T0)
        yield self.assertFailure(send(), RedisUnavailable)
        [entry] = yield store.fetch(bob, 0, 10)
        self.assertEqual((yield self.entries()), [])
        failing.failing.clear()
        retry = yield send()
        self.assertTrue(retry.duplicate)
        yield send()
        [event] = yield self.datas()
        self.assertEqual(event["message_id"], str(entry.message.id))

    @inlineCallbacks
    def test_groupChangeRetried(self):
        """
        Adding a member whose group script failed (its slot unreachable)
        leaves the member's groups set ahead of the group, which
        C{groupsOf} ignores; the retry completes the change, recording its
        event once.
        """
        alice, bob, _ = self.spread()
        failing = _FailingSlots(self.connection)
        store = RedisMessageStore(failing, reactor, 24 * HOUR, cluster=True)
        store.outboxEvents = frozenset([GROUP_CHANGED])
        yield store.createGroup("g", "G", alice, T0)
        failing.failing.add(keySlot(groupKey("g", "info")))
        add = partial(store.setMembers, "g", [(bob, pb.ROLE_MEMBER)], 10, T0)
        yield self.assertFailure(add(), RedisUnavailable)
        self.assertEqual((yield self.redis("SMEMBERS", userKey(bob, "groups"))), [b"g"])
        self.assertEqual((yield self.store.groupsOf(bob)), [])
        failing.failing.clear()
        self.assertEqual((yield add()), [bob])
        self.assertEqual([g.group_id for g in (yield store.groupsOf(bob))], ["g"])
        self.assertEqual(
            [(d["change"], d["uids"]) for d in (yield self.datas())],
            [(GROUP_CREATED, [alice]), (MEMBERS_ADDED, [bob])],
        )
        yield store.removeMembers("g", [bob])
        self.assertEqual((yield store.groupsOf(bob)), [])
        self.assertEqual((yield self.redis("SMEMBERS", userKey(bob, "groups"))), [])

    @inlineCallbacks
    def test_floorAfterWipe(self):
        """
        A primary that lost its data (C{FLUSHALL} on it alone): the next
        seqs of its users are above every seq given before, in a new epoch
        of their slot; the other primaries' users go on as before.  Each
        slot's loss is counted, the error logged once.
        """
        alice, bob, carol = self.spread()
        address = self.connection.addressOf(userSlot(bob))
        neighbour = next(
            uid
            for uid in ("n%d" % (i,) for i in range(1000))
            if self.connection.addressOf(userSlot(uid)) == address
            and userSlot(uid) != userSlot(bob)
        )
        yield self.store.deliver(alice, "m0", text("zero", neighbour), [neighbour], T0)
        first = yield self.store.deliver(alice, "m1", text("one", bob), [bob, carol], T0)
        second = yield self.store.deliver(alice, "m2", text("two", bob), [bob, carol], T0)
        epoch = yield self.store.epoch(bob)
        node = yield self.cluster.ownerOf(userSlot(bob))
        yield self.cluster.call(node, "FLUSHALL")
        self.assertEqual((yield self.store.head(bob)), 0)
        self.assertEqual((yield self.store.head(neighbour)), 0)
        self.assertEqual(self.store.rollbacks, 2)
        third = yield self.store.deliver(alice, "m3", text("three", bob), [bob, carol], T0)
        self.assertFalse(third.duplicate)
        self.assertGreater(third.seqs[bob], second.seqs[bob])
        self.assertNotIn((yield self.store.epoch(bob)), (None, epoch))
        self.assertEqual(third.seqs[carol], first.seqs[carol] + 2)
        self.assertEqual(third.seqs[alice], first.seqs[alice] + 2)
        self.assertEqual([e.message.body for e in (yield self.store.fetch(bob, 0, 10))], [b"three"])
        self.assertEqual(len((yield self.store.fetch(carol, 0, 10))), 3)
        self.assertEqual(
            [e["old"] for e in self.events if e["log_level"] == LogLevel.error], [epoch]
        )

    @inlineCallbacks
    def test_floorAfterLaggingFailover(self):
        """
        A failover to a replica that missed the last writes (simulated: the
        head goes back and the run id of the slot is another process's):
        the slot's floor is raised, so no seq is given twice.
        """
        alice, bob, _ = self.spread()
        deliveries = []
        for i in range(3):
            deliveries.append((yield self.store.deliver(alice, str(i), text("x", bob), [bob], T0)))
        slot = userSlot(bob)
        node = yield self.cluster.ownerOf(slot)
        head = "im:{u:%s}:head" % (bob.encode().hex(),)
        yield self.cluster.call(node, "SET", head, str(deliveries[0].seqs[bob]))
        yield self.cluster.call(node, "SET", "im:{%s}:runid" % (slotTag(slot),), "0" * 40)
        restarts = self.store.restarts
        later = yield self.store.deliver(alice, "3", text("x", bob), [bob], T0)
        self.assertGreater(later.seqs[bob], deliveries[-1].seqs[bob])
        self.assertEqual(later.seqs[alice], deliveries[-1].seqs[alice] + 1)
        self.assertEqual(self.store.restarts, restarts + 1)
        self.assertEqual(self.store.rollbacks, 0)

    @inlineCallbacks
    def test_failover(self):
        """
        A real failover of a recipient's primary: its slot fails with
        L{RedisUnavailable} meanwhile (the deliver can be retried), then the
        promoted replica's run id raises the slot's floor; the retry
        completes the message, nothing is given twice.
        """
        alice, bob, _ = self.spread()
        first = yield self.store.deliver(alice, "m1", text("x", bob), [bob], T0)
        slot = userSlot(bob)
        yield self.cluster.killPrimaryOf(slot)
        yield self.assertFailure(
            self.store.deliver(alice, "m2", text("y", bob), [bob], T0), RedisUnavailable
        )
        yield self.cluster.waitForFailover(slot)
        for _ in range(100):
            try:
                second = yield self.store.deliver(alice, "m2", text("y", bob), [bob], T0)
                break
            except RedisUnavailable:
                yield deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail("the slot of bob did not come back")
        self.assertGreater(second.seqs[bob], first.seqs[bob])
        self.assertEqual(second.seqs[alice], first.seqs[alice] + 1)
        self.assertGreaterEqual(self.store.restarts, 1)
        self.assertEqual(
            [e.message.body for e in (yield self.store.fetch(bob, 0, 10))], [b"x", b"y"]
        )

    @inlineCallbacks
    def test_trimAcrossPrimaries(self):
        """
        Retention reaches the users and the bodies of every primary.
        """
        self.store.scanCount = 7
        senders = self.spread("s")
        users = ["t%d" % (i,) for i in range(30)]
        for age, body, now in (("old", "x", T0), ("new", "y", T0 + 10 * HOUR)):
            for i, uid in enumerate(users):
                sender = senders[i % 3]
                yield self.store.deliver(sender, age + str(i), text(body, uid), [uid], now)
        self.assertEqual(
            len({self.connection.addressOf(userSlot(uid)) for uid in users + senders}), 3
        )
        removed = yield self.store.trim(T0 + 10 * HOUR, 5 * HOUR, 1000)
        self.assertEqual(removed, 60)
        for uid in users:
            entries = yield self.store.fetch(uid, 0, 10)
            self.assertEqual([e.message.body for e in entries], [b"y"])
        for sender in senders:
            entries = yield self.store.fetch(sender, 0, 100)
            self.assertEqual({e.message.body for e in entries}, {b"y"})
        bodies = yield self.bodies()
        self.assertEqual(len(bodies), 30)

    @inlineCallbacks
    def test_trimPrimary(self):
        """
        C{trimPrimary} trims the users and bodies of one primary only.
        """
        self.store.scanCount = 7
        senders = self.spread("s")
        users = ["t%d" % (i,) for i in range(30)]
        for i, uid in enumerate(users):
            yield self.store.deliver(senders[i % 3], "old" + str(i), text("x", uid), [uid], T0)
        primary = self.connection.addressOf(userSlot(users[0]))
        removed = yield self.store.trimPrimary(primary, T0 + 10 * HOUR, 5 * HOUR, 1000)
        mine = [
            uid for uid in users + senders if self.connection.addressOf(userSlot(uid)) == primary
        ]
        self.assertEqual(removed, sum(10 if uid in senders else 1 for uid in mine))
        for uid in users + senders:
            entries = yield self.store.fetch(uid, 0, 100)
            self.assertEqual(entries == [], uid in mine, uid)
        self.assertEqual((yield self.store.trimPrimary(("127.0.0.1", 1), T0, 0, 0)), 0)

    @inlineCallbacks
    def test_retentionShards(self):
        """
        Three gates' retention services on three primaries, with the shards
        of L{imserver.cluster.shardsOf}: each interval each gate runs the
        pass of one primary, a different one each, and keeps it.
        """
        from imserver.cluster import shardsOf
        from imserver.store.redis.keys import retentionLeaseKey

        clock = Clock()
        settings = Settings().replace(
            retention_interval=600.0, retention_age=3600.0, dedup_window=60.0
        )
        services = {
            gate: RetentionService(
                self.store,
                clock,
                settings,
                shards=partial(shardsOf, self.connection, self.store, gate, lambda: 3),
            )
            for gate in ["gate-a", "gate-b", "gate-c"]
        }
        for _ in range(2):
            for service in services.values():
                yield service.trim()
        self.assertEqual([s.passes for s in services.values()], [2, 2, 2])
        holders = []
        for primary in self.connection.primaries:
            holders.append((yield self.redis("GET", retentionLeaseKey(primary))))
        self.assertEqual(sorted(holders), [b"gate-a", b"gate-b", b"gate-c"])

    @inlineCallbacks
    def test_ackAcrossPrimaries(self):
        """
        One C{ack} of cursors of users on three primaries.
        """
        users = self.spread()
        count = yield self.store.ack([(uid, "phone", 5) for uid in users], T0)
        self.assertEqual(count, 3)
        for uid in users:
            self.assertEqual((yield self.store.cursor(uid, "phone")), 5)


class WaitReplicasTests(TestCase):
    """
    C{--redis-wait-replicas}: a delivery is answered once a replica has it
    (Redis C{WAIT}), on a real primary and replica.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        # No 5 s wait before a replica's synchronisation.
        self.primary = RedisServer(
            self, reactor, appendfsync=None, extraArgs=["--repl-diskless-sync-delay", "0"]
        )
        yield self.primary.start()
        self.replica = RedisServer(
            self,
            reactor,
            appendfsync=None,
            extraArgs=["--replicaof", "127.0.0.1", str(self.primary.port)],
        )
        yield self.replica.start()
        connection = connectRedis(reactor, RedisURL.parse(self.primary.url), replyTimeout=2)
        self.addCleanup(connection.disconnect)
        yield whenConnected(connection)
        self.store = RedisMessageStore(connection, reactor, 24 * HOUR)
        self.store.waitReplicas = 1
        # Long enough for a loaded machine; short where no replica answers.
        self.store.waitTimeoutMs = 10000
        self.connection = connection
        # The replica has synchronised once it says so.
        for _ in range(200):
            info = yield connection.execute("INFO", "replication")
            if b"connected_slaves:1" in info and b"state=online" in info:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("the replica never came online")

    def send(self, clientMsgId, body):
        return self.store.deliver("alice", clientMsgId, text(body, "bob"), ["bob"], T0)

    @inlineCallbacks
    def test_waits(self):
        """
        With the replica up a delivery is answered; with the replica gone
        it fails with L{RedisUnavailable} after the timeout, though the
        primary stored it; the retry, once the replica is back, is
        answered (a duplicate: the original, with its seq).
        """
        first = yield self.send("m1", "one")
        self.assertFalse(first.duplicate)
        yield self.replica.stop()
        self.store.waitTimeoutMs = 200
        yield self.assertFailure(self.send("m2", "two"), RedisUnavailable)
        self.store.waitTimeoutMs = 10000
        self.assertEqual((yield self.store.head("bob")) - first.seqs["bob"], 1)
        yield self.replica.start()
        for _ in range(200):
            info = yield self.connection.execute("INFO", "replication")
            if b"state=online" in info:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        retry = yield self.send("m2", "two")
        self.assertTrue(retry.duplicate)
        self.assertEqual(retry.message.body, b"two")

    @inlineCallbacks
    def test_off(self):
        """
        With C{waitReplicas} 0 (the default) nothing waits: a delivery is
        answered with the replica gone.
        """
        self.store.waitReplicas = 0
        yield self.replica.stop()
        delivery = yield self.send("m1", "one")
        self.assertFalse(delivery.duplicate)


class RetentionServiceTests(SynchronousTestCase):
    """
    L{RetentionService} on a L{Clock}: a pass per interval, skipped when
    another gate holds the lease, postponed when the store or the lease is
    unavailable.
    """

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryMessageStore(clock=self.clock)
        self.trims = []
        trim = self.store.trim
        self.patch(self.store, "trim", lambda *a: self.trims.append(a) or trim(*a))
        self.logged = []

    def service(self, lease=None, shards=None):
        service = RetentionService(
            self.store,
            self.clock,
            Settings().replace(
                retention_interval=10.0, retention_age=60.0, retention_count=5, dedup_window=60.0
            ),
            lease=lease,
            shards=shards,
        )
        service.log = Logger(observer=self.logged.append)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_everyInterval(self):
        """
        Without a lease a pass runs at start and every interval, with the
        retention settings in milliseconds.
        """
        service = self.service()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.trims, [(0, 60000, 5), (10000, 60000, 5), (20000, 60000, 5)])
        self.assertEqual(service.passes, 3)

    def test_lease(self):
        """
        With a lease, the pass runs only in the intervals its answer is
        true; it is asked for two intervals.
        """
        answers = [True, False, True]
        asked = []
        service = self.service(lambda ttlMs: asked.append(ttlMs) or succeed(answers.pop(0)))
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual([a[0] for a in self.trims], [0, 20000])
        self.assertEqual((service.passes, service.skipped), (2, 1))
        self.assertEqual(asked, [20000] * 3)

    def test_shards(self):
        """
        With shards, each interval the gate asks their leases in their
        order and runs the passes of those it holds, up to the quota; an
        interval with none held is skipped.
        """
        held = {"a": False, "b": True, "c": True}
        asked, ran = [], []

        def shard(name):
            def lease(ttlMs):
                asked.append((name, ttlMs))
                return succeed(held[name])

            def trim(*args):
                ran.append((name,) + args)
                return succeed(1)

            return lease, trim

        quota = [1]
        service = self.service(shards=lambda: (quota[0], [shard(n) for n in "abc"]))
        self.assertEqual(ran, [("b", 0, 60000, 5)])
        self.assertEqual(asked, [("a", 20000), ("b", 20000)])
        quota[0] = 2
        self.clock.advance(10)
        self.assertEqual([r[0] for r in ran], ["b", "b", "c"])
        held.update(b=False, c=False)
        self.clock.advance(10)
        self.assertEqual((service.passes, service.skipped), (3, 1))
        self.assertEqual(self.trims, [])

    def test_unavailable(self):
        """
        A lease or a pass that fails with L{Unavailable} is logged as a
        warning and tried again at the next interval.
        """
        answers = [fail(RedisUnavailable("down")), succeed(True)]
        service = self.service(lambda ttlMs: answers.pop(0))
        self.assertEqual(self.trims, [])
        self.clock.advance(10)
        self.assertEqual(service.passes, 1)
        self.assertEqual(
            [e["log_level"] for e in self.logged if "postponed" in e["log_format"]],
            [LogLevel.warn],
        )


class OutboxFullLogTests(SynchronousTestCase):
    """
    L{OutboxFullLog}: the warning that the outbox is full, rate-limited.
    """

    def test_rateLimited(self):
        """
        The first events not kept are reported at once, later ones at most
        once per interval, counting what was not reported yet.
        """
        events = []
        log = Logger(observer=events.append)
        full = OutboxFullLog(interval=10)
        full.dropped(log, 1, 1, 5, 100.0)
        full.dropped(log, 2, 3, 5, 105.0)
        full.dropped(log, 1, 4, 5, 109.9)
        self.assertEqual(len(events), 1)
        full.dropped(log, 1, 5, 5, 110.0)
        self.assertEqual(
            [(e["log_level"], e["count"], e["total"], e["limit"]) for e in events],
            [(LogLevel.warn, 1, 1, 5), (LogLevel.warn, 4, 5, 5)],
        )
