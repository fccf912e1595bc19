# -*- test-case-name: tests.test_delivery -*-
"""
Tests for reliable delivery through the gate: store-then-ack, pushes in
seq order within the unacknowledged window, cumulative acks, resume with no
gap and no repeat, idempotent send, sync, typing.
"""

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import Unavailable
from imserver.pb import im_pb2 as pb
from imserver.registry.memory import MemorySessionRegistry
from imserver.session import FETCH_RETRY_DELAY
from imserver.store.memory import MemoryMessageStore

from tests.support.frames import written
from tests.support.gate import DeliveryHarness, pushes, responses


class SlowStore(MemoryMessageStore):
    """
    A memory store whose C{fetch} answers only when the test releases it.
    """

    def __init__(self):
        MemoryMessageStore.__init__(self)
        self.held = []
        self.hold = False

    def fetch(self, uid, afterSeq, limit):
        result = MemoryMessageStore.fetch(self, uid, afterSeq, limit)
        if not self.hold:
            return result
        d = Deferred()
        self.held.append((d, result))
        return d

    def release(self):
        held, self.held = self.held, []
        for d, result in held:
            result.chainDeferred(d)


class SendTests(SynchronousTestCase):
    """
    C{send}: store, then answer, then push.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")
        self.bob, self.bobT, _, _ = self.gate.login("bob")

    def test_sendAndPush(self):
        """
        The sender gets the message id, time and its own seq; the recipient
        is pushed the entry with the sender set by the server; the sender's
        session sees its own message as outgoing.
        """
        self.gate.send(self.alice, "bob", "m1", b"hello")
        aliceFrames = written(self.aliceT)
        [response] = responses(aliceFrames)
        result = pb.SendResponse.FromString(response.body)
        self.assertEqual((result.seq, result.duplicate), (1, False))
        self.assertEqual(result.server_time_ms, 1_700_000_000_000)
        [entry] = pushes(written(self.bobT))
        self.assertEqual((entry.seq, entry.outgoing), (1, False))
        self.assertEqual(
            (
                entry.message.id,
                entry.message.sender,
                entry.message.recipient,
                entry.message.body,
                entry.message.client_msg_id,
            ),
            (result.message_id, "alice", "bob", b"hello", "m1"),
        )
        [own] = pushes(aliceFrames)
        self.assertEqual((own.seq, own.outgoing, own.message.id), (1, True, result.message_id))

    def test_otherDevicesOfSender(self):
        """
        The sender's other devices get the message too, as outgoing.
        """
        laptop, laptopT, _, _ = self.gate.login("alice", "laptop")
        self.gate.send(self.alice, "bob", "m1")
        [entry] = pushes(written(laptopT))
        self.assertTrue(entry.outgoing)

    def test_idempotent(self):
        """
        A retry with the same client_msg_id returns the original result,
        marked duplicate, and pushes nothing new.
        """
        self.gate.send(self.alice, "bob", "m1")
        first = pb.SendResponse.FromString(responses(written(self.aliceT))[0].body)
        written(self.bobT)
        self.gate.send(self.alice, "bob", "m1")
        [response] = responses(written(self.aliceT))
        again = pb.SendResponse.FromString(response.body)
        self.assertEqual(
            (again.message_id, again.seq, again.duplicate), (first.message_id, first.seq, True)
        )
        self.assertEqual(pushes(written(self.bobT)), [])

    def test_invalid(self):
        """
        Bad fields get C{BAD_REQUEST}, an oversized body
        C{MESSAGE_TOO_LARGE}; nothing is stored and the connection stays.
        """
        cases = [
            (pb.SendRequest(to="", client_msg_id="x"), pb.BAD_REQUEST),
            (pb.SendRequest(to="bob", client_msg_id=""), pb.BAD_REQUEST),
            (pb.SendRequest(to="bob", client_msg_id="x" * 65), pb.BAD_REQUEST),
            (pb.SendRequest(to="bob", client_msg_id="x", content_type="t" * 65), pb.BAD_REQUEST),
            (pb.SendRequest(to="bob", client_msg_id="x", body=b"b" * 32769), pb.MESSAGE_TOO_LARGE),
        ]
        for request, code in cases:
            self.gate.request(self.alice, "send", request, seq=7)
            [frame] = written(self.aliceT)
            self.assertEqual(frame.error.code, code, request)
        self.assertEqual(self.successResultOf(self.gate.store.head("bob")), 0)
        self.assertFalse(self.aliceT.disconnecting)

    def test_storeFailure(self):
        """
        A store failure answers C{UNAVAILABLE} (retryable) and is logged.
        """
        self.gate.store.deliver = lambda *a: fail(OSError("disk"))
        self.gate.send(self.alice, "bob", "m1")
        [frame] = written(self.aliceT)
        self.assertEqual(frame.error.code, pb.UNAVAILABLE)
        self.assertEqual(len(self.flushLoggedErrors(IOError)), 1)

    def test_answerAfterStore(self):
        """
        The answer waits for the store: nothing is answered or pushed until
        the message is stored.
        """
        pending = Deferred()
        deliver = self.gate.store.deliver
        self.gate.store.deliver = lambda *a: pending
        self.gate.send(self.alice, "bob", "m1")
        self.assertEqual(written(self.aliceT), [])
        self.assertEqual(written(self.bobT), [])
        deliver(*["alice", "m1", pb.Message(recipient="bob"), ["bob"], 1]).chainDeferred(pending)
        self.assertEqual(len(responses(written(self.aliceT))), 1)
        self.assertEqual(len(pushes(written(self.bobT))), 1)


class DeferredRegistry(MemorySessionRegistry):
    """
    A registry whose lookups for a publish answer only when the test says
    so, as Redis's do (an answer comes back on a later reactor pass).
    """

    def __init__(self):
        MemorySessionRegistry.__init__(self)
        self.waiting = []

    def sessionsForMany(self, uids):
        d = Deferred()
        self.waiting.append((d, MemorySessionRegistry.sessionsForMany(self, uids)))
        return d

    def release(self):
        waiting, self.waiting = self.waiting, []
        for d, result in waiting:
            result.chainDeferred(d)


class NoEchoTests(SynchronousTestCase):
    """
    C{AuthRequest.no_echo}: a connection is not pushed what it sent itself
    when its answer can be its copy (C{SendResponse.echo_skipped}).
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        self.alice, self.aliceT, self.auth, _ = self.gate.login("alice", noEcho=True)
        self.bob, self.bobT, _, _ = self.gate.login("bob")

    def answers(self, transport):
        return [pb.SendResponse.FromString(f.body) for f in responses(written(transport))]

    def test_told(self):
        """
        The auth answer says whether the capability is honoured: yes when
        asked, no (the default) otherwise.
        """
        self.assertTrue(self.auth.no_echo)
        _, _, plain, _ = self.gate.login("carol")
        self.assertFalse(plain.no_echo)

    def test_answerIsTheCopy(self):
        """
        The sender is answered C{echo_skipped} and pushed nothing; the
        recipient is pushed as usual; the sender's pushes continue after
        the skipped entry, and an ack of it is taken.
        """
        self.gate.send(self.alice, "bob", "m1")
        aliceFrames = written(self.aliceT)
        self.assertEqual(pushes(aliceFrames), [])
        [answer] = [pb.SendResponse.FromString(f.body) for f in responses(aliceFrames)]
        self.assertEqual((answer.seq, answer.echo_skipped, answer.duplicate), (1, True, False))
        [entry] = pushes(written(self.bobT))
        self.assertEqual((entry.seq, entry.message.client_msg_id), (1, "m1"))
        self.assertEqual(self.gate.factory.metrics.echoesSkipped, 1)

        self.gate.send(self.bob, "alice", "b1")
        [reply] = pushes(written(self.aliceT))
        self.assertEqual((reply.seq, reply.outgoing), (2, False))
        self.gate.ack(self.alice, 1)
        self.gate.ack(self.alice, 2)
        self.assertFalse(self.aliceT.disconnecting)
        self.assertEqual(self.alice.session.unackedCount(), 0)

    def test_otherDevicesPushed(self):
        """
        The sender's other devices, with or without the capability, are
        pushed the message (outgoing): only the connection that sent it
        has the answer.
        """
        _, laptopT, _, _ = self.gate.login("alice", "laptop", noEcho=True)
        self.gate.send(self.alice, "bob", "m1")
        [entry] = pushes(written(laptopT))
        self.assertEqual((entry.seq, entry.outgoing), (1, True))

    def test_groupMessage(self):
        """
        A group message's own entry (the sender's as a member) is left out
        the same way; the other members are pushed.
        """
        store = self.gate.store
        self.successResultOf(store.createGroup("g1", "Team", "alice", 0))
        self.successResultOf(store.setMembers("g1", [("bob", pb.ROLE_MEMBER)], 10, 0))
        self.gate.send(self.alice, "", "g-1", groupId="g1")
        [answer] = self.answers(self.aliceT)
        self.assertTrue(answer.echo_skipped)
        self.assertEqual(pushes(written(self.aliceT)), [])
        [entry] = pushes(written(self.bobT))
        self.assertEqual(entry.message.group_id, "g1")

    def test_earlierEntryNotPushedYet(self):
        """
        When an earlier entry is still to be pushed (the window is full),
        the own entry is not skipped: it is pushed in its turn, in seq
        order, and the answer says so.
        """
        gate = DeliveryHarness(self, max_unacked=1)
        alice, aliceT, _, _ = gate.login("alice", noEcho=True)
        bob, _, _, _ = gate.login("bob")
        gate.send(bob, "alice", "b1")
        gate.send(bob, "alice", "b2")
        self.assertEqual([e.seq for e in pushes(written(aliceT))], [1])
        gate.send(alice, "bob", "m1")
        frames = written(aliceT)
        [answer] = [pb.SendResponse.FromString(f.body) for f in responses(frames)]
        self.assertEqual((answer.seq, answer.echo_skipped), (3, False))
        self.assertEqual(pushes(frames), [])
        gate.ack(alice, 1)
        self.assertEqual([e.seq for e in pushes(written(aliceT))], [2])
        gate.ack(alice, 2)
        [own] = pushes(written(aliceT))
        self.assertEqual((own.seq, own.outgoing, own.message.client_msg_id), (3, True, "m1"))
        self.assertEqual(gate.factory.metrics.echoesSkipped, 0)

    def test_retryNotSkipped(self):
        """
        A retry answered C{duplicate} is never C{echo_skipped}: the
        original's entry was skipped (or pushed) when it was stored.
        """
        self.gate.send(self.alice, "bob", "m1")
        [first] = self.answers(self.aliceT)
        self.gate.send(self.alice, "bob", "m1")
        [again] = self.answers(self.aliceT)
        self.assertEqual((first.echo_skipped, again.echo_skipped), (True, False))
        self.assertEqual((again.seq, again.duplicate), (first.seq, True))
        self.assertEqual(pushes(written(self.aliceT)), [])

    def test_lookupAnsweredLater(self):
        """
        With a registry that answers on a later pass (Redis), the entry is
        skipped all the same, and the late announcement pushes nothing.
        """
        registry = DeferredRegistry()
        gate = DeliveryHarness(self, registry=registry)
        alice, aliceT, _, _ = gate.login("alice", noEcho=True)
        bob, bobT, _, _ = gate.login("bob")
        gate.send(alice, "bob", "m1")
        [answer] = self.answers(aliceT)
        self.assertTrue(answer.echo_skipped)
        registry.release()
        self.assertEqual(pushes(written(aliceT)), [])
        self.assertEqual([e.seq for e in pushes(written(bobT))], [1])

    def test_resumeGetsIt(self):
        """
        A new connection resuming from before the skipped entry is pushed
        it (the answer was only the old connection's copy).
        """
        self.gate.send(self.alice, "bob", "m1")
        self.gate.lose(self.alice)
        _, aliceT, _, backlog = self.gate.login("alice", noEcho=True)
        [entry] = pushes(backlog + written(aliceT))
        self.assertEqual((entry.seq, entry.outgoing), (1, True))

    def test_withoutCapability(self):
        """
        Without the capability nothing changes: the sender is pushed its
        own entry and the answer does not say C{echo_skipped}.
        """
        self.gate.send(self.bob, "alice", "b1")
        frames = written(self.bobT)
        [answer] = [pb.SendResponse.FromString(f.body) for f in responses(frames)]
        self.assertFalse(answer.echo_skipped)
        [own] = pushes(frames)
        self.assertEqual((own.seq, own.outgoing), (answer.seq, True))


class WindowTests(SynchronousTestCase):
    """
    At most C{max_unacked} pushes in flight; acks let the rest follow.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, max_unacked=3)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")

    def test_window(self):
        """
        Ten messages to an online user: three are pushed; each ack lets
        as many more follow, in order, without repeats.
        """
        bob, bobT, _, _ = self.gate.login("bob")
        for i in range(10):
            self.gate.send(self.alice, "bob", str(i))
        self.assertEqual([e.seq for e in pushes(written(bobT))], [1, 2, 3])
        self.gate.ack(bob, 2)
        self.assertEqual([e.seq for e in pushes(written(bobT))], [4, 5])
        self.gate.ack(bob, 5)
        self.assertEqual([e.seq for e in pushes(written(bobT))], [6, 7, 8])
        self.gate.ack(bob, 8)
        self.assertEqual([e.seq for e in pushes(written(bobT))], [9, 10])
        self.gate.ack(bob, 10)
        self.assertEqual(written(bobT), [])

    def test_windowCountsPushesNotSeqs(self):
        """
        Seqs need not be dense (cluster mode's store jumps above a new floor
        after Redis lost data): the window counts entries pushed and not
        acknowledged, not the distance between seqs.
        """
        bob, bobT, _, _ = self.gate.login("bob")
        self.gate.send(self.alice, "bob", "0")
        self.gate.store._heads["bob"] = 1000  # the store's seqs jump
        for i in range(4):
            self.gate.send(self.alice, "bob", str(i + 1))
        self.assertEqual([e.seq for e in pushes(written(bobT))], [1, 1001, 1002])
        self.gate.ack(bob, 1001)
        self.assertEqual([e.seq for e in pushes(written(bobT))], [1003, 1004])
        self.assertEqual(bob.session.unackedCount(), 3)

    def test_storeUnavailableRetried(self):
        """
        A fetch refused with C{UNAVAILABLE} (Redis down) keeps the
        connection and is tried again after L{FETCH_RETRY_DELAY}; nothing
        is lost.
        """
        store = self.gate.store
        bob, bobT, _, _ = self.gate.login("bob")
        for i in range(5):
            self.gate.send(self.alice, "bob", str(i))
        self.assertEqual(len(pushes(written(bobT))), 3)
        fetch = store.fetch
        store.fetch = lambda *args: fail(Unavailable("redis is down"))
        self.gate.ack(bob, 3)
        self.assertEqual(written(bobT), [])
        self.assertFalse(bobT.disconnecting)
        store.fetch = fetch
        self.gate.clock.advance(FETCH_RETRY_DELAY)
        self.assertEqual([e.seq for e in pushes(written(bobT))], [4, 5])

    def test_oneFetchRetry(self):
        """
        A fetch that fails while a retry is pending (new entries were
        announced meanwhile) does not add a second retry: one is pending,
        and closing the connection cancels it.
        """
        store = self.gate.store
        bob, bobT, _, _ = self.gate.login("bob")
        for i in range(5):
            self.gate.send(self.alice, "bob", str(i))
        written(bobT)
        store.fetch = lambda *args: fail(Unavailable("redis is down"))
        self.gate.ack(bob, 3)
        self.gate.send(self.alice, "bob", "more")

        def retries():
            return [
                call
                for call in self.gate.clock.getDelayedCalls()
                if getattr(call.func, "__name__", "") == "_retryFetch"
            ]

        self.assertEqual(len(retries()), 1)
        [retry] = retries()
        bob.session.close()
        self.assertFalse(retry.active())

    def test_fetchFailsAfterConnectionLost(self):
        """
        A fetch in flight when the connection is lost, refused with
        C{UNAVAILABLE} afterwards, leaves no retry behind.
        """
        store = self.gate.store
        bob, bobT, _, _ = self.gate.login("bob")
        for i in range(5):
            self.gate.send(self.alice, "bob", str(i))
        written(bobT)
        pending = Deferred()
        store.fetch = lambda *args: pending
        self.gate.ack(bob, 3)
        bobT.loseConnection()
        bob.connectionLost(Failure(ConnectionDone()))
        pending.errback(Unavailable("redis is down"))
        self.assertEqual(self.gate.clock.getDelayedCalls(), [])

    def test_ackBeyondPushed(self):
        """
        An ack for a seq never pushed is a protocol error: ERROR
        C{BAD_ACK} and close.
        """
        bob, bobT, _, _ = self.gate.login("bob")
        self.gate.send(self.alice, "bob", "1")
        written(bobT)
        self.gate.ack(bob, 2)
        [frame] = written(bobT)
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.BAD_ACK))
        self.assertTrue(bobT.disconnecting)

    def test_oldAckIgnored(self):
        """
        An ack lower than a previous one changes nothing.
        """
        bob, bobT, _, _ = self.gate.login("bob")
        for i in range(3):
            self.gate.send(self.alice, "bob", str(i))
        written(bobT)
        self.gate.ack(bob, 3)
        self.gate.ack(bob, 1)
        self.assertFalse(bobT.disconnecting)
        self.successResultOf(self.gate.factory.flushCursors())
        self.assertEqual(self.successResultOf(self.gate.store.cursor("bob", "phone")), 3)

    def test_cursorPersisted(self):
        """
        Acks are written to the store as device cursors, all devices in one
        write per flush, not one write per ack.
        """
        writes = []
        ack = self.gate.store.ack
        self.gate.store.ack = lambda cursors, now: writes.append(list(cursors)) or ack(cursors, now)
        bob, bobT, _, _ = self.gate.login("bob")
        carol, carolT, _, _ = self.gate.login("carol")
        for to in ["bob", "bob", "carol"]:
            self.gate.send(self.alice, to, to + str(len(writes)) + str(self.gate.seq))
        self.gate.ack(bob, 1)
        self.gate.ack(bob, 2)
        self.gate.ack(carol, 1)
        self.assertEqual(writes, [])
        self.successResultOf(self.gate.factory.flushCursors())
        self.assertEqual(
            sorted(writes[0]), [("alice", "phone", 0), ("bob", "phone", 2), ("carol", "phone", 1)]
        )
        self.assertEqual(self.successResultOf(self.gate.store.cursor("bob", "phone")), 2)
        self.successResultOf(self.gate.factory.flushCursors())
        self.assertEqual(len(writes), 1)

    def test_cursorFlushFailureKept(self):
        """
        Cursors whose write failed are written by the next flush.
        """
        bob, bobT, _, _ = self.gate.login("bob")
        self.gate.send(self.alice, "bob", "1")
        self.gate.ack(bob, 1)
        ack = self.gate.store.ack
        self.gate.store.ack = lambda cursors, now: fail(OSError("disk"))
        self.successResultOf(self.gate.factory.flushCursors())
        self.assertEqual(len(self.flushLoggedErrors(IOError)), 1)
        self.gate.store.ack = ack
        # Both devices' cursors (alice's from her auth, at 0) are retried.
        self.assertEqual(self.successResultOf(self.gate.factory.flushCursors()), 2)
        self.assertEqual(self.successResultOf(self.gate.store.cursor("bob", "phone")), 1)

    def test_ackBeforeAuthIgnored(self):
        """
        Notifies before auth are ignored: no error, no effect.
        """
        protocol, transport = self.gate.connect()
        self.gate.ack(protocol, 5)
        self.assertEqual(written(transport), [])
        self.assertFalse(transport.disconnecting)


class ResumeTests(SynchronousTestCase):
    """
    Offline messages and resuming from the last acked seq.
    """

    def setUp(self):
        self.store = SlowStore()
        self.gate = DeliveryHarness(self, store=self.store, max_unacked=100, sync_page_size=4)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")

    def offline(self, count):
        for i in range(count):
            self.gate.send(self.alice, "bob", "m{}".format(i))
        written(self.aliceT)

    def test_backlogAfterAuth(self):
        """
        Messages sent while offline wait in the inbox; after auth they are
        pushed in order, after the auth response, paged.
        """
        self.offline(10)
        bob, bobT, response, rest = self.gate.login("bob")
        self.assertEqual(response.head_seq, 10)
        self.assertEqual([e.seq for e in pushes(rest)], list(range(1, 11)))

    def test_resumeFromLastSeq(self):
        """
        Auth with last_seq resumes after it: no repeat.
        """
        self.offline(10)
        bob, bobT, response, rest = self.gate.login("bob", lastSeq=6)
        self.assertEqual([e.seq for e in pushes(rest)], [7, 8, 9, 10])

    def test_lastSeqBeyondHead(self):
        """
        A last_seq beyond the head starts from the head.
        """
        self.offline(2)
        bob, bobT, response, rest = self.gate.login("bob", lastSeq=50)
        self.assertEqual(pushes(rest), [])
        self.gate.send(self.alice, "bob", "new")
        self.assertEqual([e.seq for e in pushes(written(bobT))], [3])

    def test_liveDuringReplay(self):
        """
        Messages arriving while the backlog is being fetched come after it:
        no gap, no repeat, no reordering.
        """
        self.offline(6)
        self.store.hold = True
        bob, bobT, response, rest = self.gate.login("bob")
        self.assertEqual(pushes(rest), [])
        self.store.hold = False
        for i in range(3):
            self.gate.send(self.alice, "bob", "live{}".format(i))
        self.assertEqual(pushes(written(bobT)), [])
        self.store.release()
        entries = pushes(written(bobT))
        self.assertEqual([e.seq for e in entries], list(range(1, 10)))
        self.assertEqual(
            [e.message.client_msg_id for e in entries[6:]], ["live0", "live1", "live2"]
        )

    def test_liveBetweenRegisterAndHead(self):
        """
        A message committed after the session registered but before the
        head was read is not missed.
        """
        head = self.store.head
        held = []

        def slowHead(uid):
            d = Deferred()
            held.append((d, head(uid)))
            return d

        self.store.head = slowHead
        protocol, transport = self.gate.connect()
        self.gate.request(
            protocol,
            "auth",
            pb.AuthRequest(uid="bob", device_id="phone", token=self.gate.token("bob")),
        )
        self.gate.send(self.alice, "bob", "racing")
        d, result = held[0]
        result.chainDeferred(d)
        frames = written(transport)
        self.assertEqual(frames[0].kind, pb.RESPONSE)
        self.assertEqual([e.message.client_msg_id for e in pushes(frames)], ["racing"])

    def test_retentionGap(self):
        """
        Entries removed by retention are skipped: the seqs jump, nothing
        stalls.
        """
        self.offline(6)
        self.store._inbox["bob"] = [e for e in self.store._inbox["bob"] if e[0] > 4]
        bob, bobT, response, rest = self.gate.login("bob")
        self.assertEqual([e.seq for e in pushes(rest)], [5, 6])

    def test_allTrimmed(self):
        """
        With every entry removed, nothing is pushed and later messages still
        flow.
        """
        self.offline(3)
        del self.store._inbox["bob"]
        bob, bobT, response, rest = self.gate.login("bob")
        self.assertEqual(pushes(rest), [])
        self.gate.send(self.alice, "bob", "after")
        self.assertEqual([e.seq for e in pushes(written(bobT))], [4])

    def test_fetchFailure(self):
        """
        If the inbox cannot be read, the connection is closed with
        C{UNAVAILABLE} (it resumes on reconnect); nothing is skipped.
        """
        self.offline(2)
        self.store.fetch = lambda *a: fail(OSError("disk"))
        bob, bobT, response, rest = self.gate.login("bob")
        [frame] = rest
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.UNAVAILABLE))
        self.assertEqual(len(self.flushLoggedErrors(IOError)), 1)


class SyncTests(SynchronousTestCase):
    """
    C{sync}: read pages of the inbox.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, sync_page_size=3)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")
        for i in range(5):
            self.gate.send(self.alice, "bob", str(i))
        written(self.aliceT)

    def sync(self, afterSeq, limit):
        self.gate.request(
            self.alice, "sync", pb.SyncRequest(after_seq=afterSeq, limit=limit), seq=50
        )
        [frame] = written(self.aliceT)
        return pb.SyncResponse.FromString(frame.body)

    def test_pages(self):
        """
        Pages follow after_seq and are capped at the page size; the head is
        reported; nothing is pushed by a sync.
        """
        page = self.sync(0, 0)
        self.assertEqual([e.seq for e in page.entries], [1, 2, 3])
        self.assertEqual(page.head_seq, 5)
        self.assertEqual([e.seq for e in self.sync(3, 100).entries], [4, 5])
        self.assertEqual([e.seq for e in self.sync(1, 1).entries], [2])
        self.assertEqual(list(self.sync(5, 3).entries), [])


class TypingTests(SynchronousTestCase):
    """
    Transient typing signals.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, typing_rate=1.0)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")
        self.bob, self.bobT, _, _ = self.gate.login("bob")

    def typed(self):
        return [pb.Typing.FromString(f.body) for f in written(self.bobT) if f.method == "typing"]

    def test_forwarded(self):
        """
        A typing signal reaches the peer's sessions with the sender's uid and
        is not stored.
        """
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=True))
        self.assertEqual(self.typed(), [pb.Typing(uid="alice", active=True)])
        self.assertEqual(self.successResultOf(self.gate.store.head("bob")), 0)

    def test_rateLimited(self):
        """
        More than C{typing_rate} signals per second are dropped.
        """
        for _ in range(5):
            self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=True))
        self.assertEqual(len(self.typed()), 1)
        self.gate.clock.advance(1)
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=False))
        self.assertEqual(self.typed(), [pb.Typing(uid="alice", active=False)])

    def test_offlinePeer(self):
        """
        A signal to a user with no session goes nowhere.
        """
        self.gate.notify(self.alice, "typing", pb.Typing(uid="carol", active=True))
        self.assertEqual(self.typed(), [])
        self.assertFalse(self.aliceT.disconnecting)


class ContractFixTests(SynchronousTestCase):
    """
    Edge cases of the delivery contract.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self, sync_page_size=100, max_unacked=5)
        self.alice, self.aliceT, _, _ = self.gate.login("alice")

    def test_syncFitsOneFrame(self):
        """
        A sync response holds only as many whole entries as fit one frame.
        """
        for i in range(4):
            self.gate.send(self.alice, "bob", str(i), body=b"x" * 32768)
        written(self.aliceT)
        bob, bobT, _, _ = self.gate.login("bob")
        written(bobT)
        self.gate.request(bob, "sync", pb.SyncRequest(after_seq=0), seq=9)
        [frame] = [f for f in written(bobT) if f.kind == pb.RESPONSE]
        self.assertLessEqual(len(frame.SerializeToString()), 65536)
        response = pb.SyncResponse.FromString(frame.body)
        self.assertEqual([e.seq for e in response.entries], [1])
        self.assertEqual(response.head_seq, 4)

    def test_ackAfterSync(self):
        """
        Acking entries read with sync (beyond what was pushed, up to the
        head) moves the resume point: pushes continue after it.
        """
        for i in range(8):
            self.gate.send(self.alice, "bob", str(i))
        written(self.aliceT)
        bob, bobT, _, frames = self.gate.login("bob")
        self.assertEqual([e.seq for e in pushes(frames)], [1, 2, 3, 4, 5])
        self.gate.ack(bob, 7)
        self.assertEqual([e.seq for e in pushes(written(bobT))], [8])
        self.assertFalse(bobT.disconnecting)

    def test_ackBeyondHead(self):
        """
        An ack beyond the inbox head is C{BAD_ACK}.
        """
        self.gate.send(self.alice, "bob", "1")
        bob, bobT, _, _ = self.gate.login("bob")
        self.gate.ack(bob, 2)
        [frame] = written(bobT)
        self.assertEqual(frame.error.code, pb.BAD_ACK)

    def test_windowTold(self):
        """
        The auth response tells the client the unacknowledged window.
        """
        _, _, response, _ = self.gate.login("carol")
        self.assertEqual(response.max_unacked, 5)

    def test_connectedDeviceProtectsEntries(self):
        """
        A device that connected but never acked has a cursor, so retention
        by count keeps what it has not acknowledged.
        """
        self.gate.login("bob", device="tablet")
        self.successResultOf(self.gate.factory.flushCursors())
        for i in range(5):
            self.gate.send(self.alice, "bob", str(i))
        self.successResultOf(self.gate.store.trim(1_700_000_000_000, 10**9, 1))
        self.assertEqual(len(self.successResultOf(self.gate.store.fetch("bob", 0, 10))), 5)

    def test_stopTypingNotLost(self):
        """
        A stop signal right after a start passes the rate limit.
        """
        bob, bobT, _, _ = self.gate.login("bob")
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=True))
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=False))
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=False))
        typed = [pb.Typing.FromString(f.body).active for f in written(bobT) if f.method == "typing"]
        self.assertEqual(typed, [True, False])

    def test_noTypingBeforeAuthResponse(self):
        """
        A session whose auth is not answered yet gets no typing signal.
        """
        pending = Deferred()
        head = self.gate.store.head
        self.gate.store.head = lambda uid: pending
        protocol, transport = self.gate.connect()
        self.gate.request(
            protocol,
            "auth",
            pb.AuthRequest(uid="bob", device_id="phone", token=self.gate.token("bob")),
        )
        self.gate.notify(self.alice, "typing", pb.Typing(uid="bob", active=True))
        self.assertEqual(written(transport), [])
        head("bob").chainDeferred(pending)
        frames = written(transport)
        self.assertEqual([f.kind for f in frames], [pb.RESPONSE])

    def test_headFailureUnavailable(self):
        """
        If the inbox head cannot be read at auth, the answer is the
        retryable C{UNAVAILABLE} and no session stays registered.
        """
        self.gate.store.head = lambda uid: fail(OSError("disk"))
        protocol, transport = self.gate.connect()
        self.gate.request(
            protocol,
            "auth",
            pb.AuthRequest(uid="bob", device_id="phone", token=self.gate.token("bob")),
        )
        [frame] = written(transport)
        self.assertEqual(frame.error.code, pb.UNAVAILABLE)
        self.assertEqual(self.successResultOf(self.gate.registry.sessionsFor("bob")), [])
        self.assertEqual(len(self.flushLoggedErrors(IOError)), 1)


class RecordingSession:
    """
    Records what it is told about its user's inbox.
    """

    def __init__(self):
        self.advanced = []

    def inboxAdvanced(self, seq, outgoing, encoded):
        self.advanced.append((seq, outgoing, pb.Message.FromString(encoded.data).body))


class AnnounceNewestTests(SynchronousTestCase):
    """
    L{imserver.messaging.Messenger.announceNewest}, cluster mode's catch-up:
    a user's newest inbox entry, read from the store, announced to the
    sessions given.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        self.messenger = self.gate.factory.messenger

    def store(self, sender, to, clientMsgId, body):
        return self.successResultOf(
            self.messenger.storeMessage(sender, clientMsgId, body, "", to=to)
        )

    def test_newest(self):
        """
        Every session given is told of the newest entry only, with its seq
        and outgoing flag; the result counts the entries announced.
        """
        self.store("alice", "bob", "m1", b"one")
        delivery = self.store("alice", "bob", "m2", b"two")
        sessions = [RecordingSession(), RecordingSession()]
        self.assertEqual(self.successResultOf(self.messenger.announceNewest("bob", sessions)), 1)
        for session in sessions:
            self.assertEqual(session.advanced, [(delivery.seqs["bob"], False, b"two")])
        sender = RecordingSession()
        self.successResultOf(self.messenger.announceNewest("alice", [sender]))
        self.assertEqual(sender.advanced, [(delivery.seqs["alice"], True, b"two")])

    def test_emptyInbox(self):
        """
        A user with an empty inbox announces nothing.
        """
        session = RecordingSession()
        self.assertEqual(self.successResultOf(self.messenger.announceNewest("carol", [session])), 0)
        self.assertEqual(session.advanced, [])
