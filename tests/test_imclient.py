# -*- test-case-name: tests.test_imclient -*-
"""
Live tests of L{imserver.client.IMClient}, the reconnecting client, against
a real gate on loopback (plain TCP: TLS is covered by tests.test_e2e).
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imserver import tap
from imserver.auth import loadSecret, mintToken
from imserver.client import IMClient, fullJitterBackoff
from imserver.errors import RemoteError
from imserver.pb import im_pb2 as pb

from tests.support import startServer


class Inbox:
    """
    Collects what an L{IMClient} hands its application, and lets a test
    wait for a number of messages.
    """

    def __init__(self):
        self.entries = []
        self._waiting = []

    def __call__(self, entry):
        self.entries.append(entry)
        for count, d in list(self._waiting):
            if len(self.entries) >= count:
                self._waiting.remove((count, d))
                d.callback(self.entries)

    def waitFor(self, count):
        if len(self.entries) >= count:
            return Deferred().callback(self.entries) or _fired(self.entries)
        d = Deferred()
        self._waiting.append((count, d))
        return d


def _fired(value):
    d = Deferred()
    d.callback(value)
    return d


class IMClientTests(TestCase):
    """
    Reconnect, resume and retry against a live gate.
    """

    timeout = 30

    def setUp(self):
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--store",
                "memory",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--api",
                "none",
            ]
        )
        self.root = startServer(self, options)
        self.gate = self.root.getServiceNamed("gate")
        self.factory = self.gate.factory
        self.secret = loadSecret(self.dataDir)
        return self.gate.addresses().addCallback(self._listening)

    def _listening(self, addresses):
        self.port = addresses[0].port

    def client(self, uid, device="phone", token=None, **kwargs):
        client = IMClient(
            reactor,
            None,
            None,
            uid,
            token or mintToken(self.secret, uid, 3600, reactor.seconds()),
            device,
            endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
            retryPolicy=lambda attempt: 0.05,
            **kwargs,
        )
        client.start()
        self.addCleanup(client.stop)
        return client

    def dropAll(self):
        """
        Abort every server-side connection, as a network failure would.
        """
        for session in list(self.factory.connections):
            session.channel.abort()

    @inlineCallbacks
    def test_exchange(self):
        """
        A message reaches the recipient once, with its seq, and the
        recipient's ack (sent at once with C{ackDelay=0}) is stored as its
        cursor.
        """
        inbox = Inbox()
        bob = self.client("bob", onMessage=inbox, ackDelay=0)
        alice = self.client("alice")
        yield bob.whenConnected()
        yield alice.whenConnected()
        response = yield alice.send("bob", b"hello")
        self.assertFalse(response.duplicate)
        [entry] = yield inbox.waitFor(1)
        self.assertEqual(
            (entry.seq, entry.message.sender, entry.message.body), (1, "alice", b"hello")
        )
        self.assertEqual(bob.lastSeq, 1)
        yield bob.protocol.ping()
        yield self.factory.flushCursors()
        cursor = yield self.factory.store.cursor("bob", "phone")
        self.assertEqual(cursor, 1)

    @inlineCallbacks
    def test_resendAcrossReconnect(self):
        """
        Sends unanswered when the connection drops are re-sent after the
        reconnect with the same client_msg_id: each is stored once and
        delivered once, in order.
        """
        inbox = Inbox()
        bob = self.client("bob", onMessage=inbox)
        alice = self.client("alice")
        yield bob.whenConnected()
        yield alice.whenConnected()
        sends = [alice.send("bob", str(i).encode(), clientMsgId="c{}".format(i)) for i in range(20)]
        self.dropAll()
        responses = []
        for d in sends:
            responses.append((yield d))
        entries = yield inbox.waitFor(20)
        self.assertEqual([e.message.body for e in entries], [str(i).encode() for i in range(20)])
        self.assertEqual([e.seq for e in entries], list(range(1, 21)))
        head = yield self.factory.store.head("bob")
        self.assertEqual(head, 20)
        self.assertEqual(len({r.message_id for r in responses}), 20)

    @inlineCallbacks
    def test_noEcho(self):
        """
        With C{noEcho} a client's own sends reach its application only as
        send results, and the gate pushes them to it not at all (the metric
        counts each); the user's other device gets them, the peer's replies
        arrive in order, once, and a drop and resume loses and repeats
        nothing.
        """
        inbox, laptopInbox, bobInbox = Inbox(), Inbox(), Inbox()
        alice = self.client("alice", onMessage=inbox, noEcho=True)
        laptop = self.client("alice", "laptop", onMessage=laptopInbox)
        bob = self.client("bob", onMessage=bobInbox)
        for client in (alice, laptop, bob):
            yield client.whenConnected()
        pushedBefore = self.factory.metrics.messagesPushed
        for i in range(5):
            answer = yield alice.send("bob", b"a%d" % i)
            self.assertTrue(answer.echo_skipped)
            self.assertEqual(alice.lastSeq, answer.seq)
            yield bobInbox.waitFor(i + 1)
            yield bob.send("alice", b"b%d" % i)
            yield inbox.waitFor(i + 1)
        self.assertEqual([e.message.body for e in inbox.entries], [b"b%d" % i for i in range(5)])
        self.assertEqual(self.factory.metrics.echoesSkipped, 5)
        laptopEntries = yield laptopInbox.waitFor(10)
        self.assertEqual([e.seq for e in laptopEntries], list(range(1, 11)))
        # Pushed: 5 to bob, 5 back to alice, 10 to the laptop, 5 to bob's own.
        self.assertEqual(self.factory.metrics.messagesPushed - pushedBefore, 25)

        self.dropAll()
        yield bob.send("alice", b"after the drop")
        [entry] = (yield inbox.waitFor(6))[5:]
        self.assertEqual((entry.seq, entry.message.body), (11, b"after the drop"))
        self.assertEqual(len(inbox.entries), 6)
        self.assertEqual(alice.lastSeq, 11)

    @inlineCallbacks
    def test_resumeAfterDrop(self):
        """
        Messages sent while the recipient is disconnected arrive after its
        reconnect, after those it already had, none twice.
        """
        inbox = Inbox()
        bob = self.client("bob", onMessage=inbox)
        alice = self.client("alice")
        yield bob.whenConnected()
        yield alice.whenConnected()
        yield alice.send("bob", b"1")
        yield inbox.waitFor(1)
        yield bob.stop()
        yield alice.send("bob", b"2")
        yield alice.send("bob", b"3")
        bob.start()
        entries = yield inbox.waitFor(3)
        self.assertEqual([e.message.body for e in entries], [b"1", b"2", b"3"])

    @inlineCallbacks
    def test_followsLowerHead(self):
        """
        If the server's inbox head is below the client's last seq (the
        server lost or restored data), the client follows it and takes the
        server's new entries instead of dropping them as duplicates.
        """
        inbox = Inbox()
        bob = self.client("bob", onMessage=inbox, lastSeq=50)
        alice = self.client("alice")
        yield bob.whenConnected()
        self.assertEqual(bob.lastSeq, 0)
        yield alice.whenConnected()
        yield alice.send("bob", b"new")
        [entry] = yield inbox.waitFor(1)
        self.assertEqual(entry.seq, 1)

    @inlineCallbacks
    def test_noDeadProtocolAfterDrop(self):
        """
        Once a connection is lost, even in the errbacks of its failed
        requests, L{IMClient.whenConnected} waits for the next connection
        instead of returning the dead one, and C{connected} is false.
        """
        alice = self.client("alice")
        protocol = yield alice.whenConnected()
        seen = []

        def failed(failure):
            seen.append((alice.protocol, alice.whenConnected()))

        d = protocol.sync().addErrback(failed)
        protocol.transport.abortConnection()
        yield d
        [(current, next)] = seen
        self.assertIsNone(current)
        self.assertFalse(protocol.connected)
        again = yield next
        self.assertIsNot(again, protocol)
        yield again.ping()

    @inlineCallbacks
    def test_refusedToken(self):
        """
        A refused token stops the client from reconnecting.
        """
        client = self.client("alice", token="v1.1.nope")
        reason = yield client.whenStopped()
        self.assertIsInstance(reason, RemoteError)
        self.assertEqual(reason.code, pb.AUTH_FAILED)

    @inlineCallbacks
    def test_kickedStops(self):
        """
        A client replaced by a login of the same device stops; the new one
        stays.
        """
        first = self.client("alice", device="phone")
        yield first.whenConnected()
        second = self.client("alice", device="phone")
        reason = yield first.whenStopped()
        self.assertEqual(reason.reason, pb.REPLACED)
        yield second.whenConnected()
        yield second.protocol.ping()

    def test_backoff(self):
        """
        The backoff is uniform in [0, min(max, initial * 2^attempt)].
        """

        class Fixed:
            def uniform(self, low, high):
                return (low, high)

        policy = fullJitterBackoff(0.5, 30.0, Fixed())
        self.assertEqual(policy(1), (0, 1.0))
        self.assertEqual(policy(3), (0, 4.0))
        self.assertEqual(policy(100), (0, 30.0))
