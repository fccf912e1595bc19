"""
Tests for L{imserver.client.ClientProtocol}: auth, heartbeats, notifies and
closing, on L{StringTransport} and L{Clock}.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import Clock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.client import ClientProtocol
from imserver.errors import ConnectionClosedByPeer
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb

from tests.support.frames import readFrames


class ClientTests(SynchronousTestCase):
    """
    The client side of the protocol.
    """

    def setUp(self):
        self.clock = Clock()
        self.notified = []
        self.client = ClientProtocol(self.clock, lambda n, m: self.notified.append((n, m)))
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def written(self):
        frames = readFrames(self.transport.value())
        self.transport.clear()
        return frames

    def respond(self, seq, message):
        self.client.dataReceived(
            encodeFrame(pb.Frame(kind=pb.RESPONSE, seq=seq, body=message.SerializeToString()))
        )

    def authenticate(self, interval_ms=10000):
        d = self.client.authenticate("alice", "tok", "phone", pb.ANDROID, lastSeq=5)
        [frame] = self.written()
        self.respond(
            frame.seq, pb.AuthResponse(heartbeat_interval_ms=interval_ms, idle_timeout_ms=30000)
        )
        return self.successResultOf(d), frame

    def test_authRequest(self):
        """
        C{authenticate} sends every field of the C{auth} request and fires
        with the response.
        """
        response, frame = self.authenticate()
        self.assertEqual(frame.method, "auth")
        request = pb.AuthRequest.FromString(frame.body)
        self.assertEqual(
            (request.uid, request.token, request.device_id, request.platform, request.last_seq),
            ("alice", "tok", "phone", pb.ANDROID, 5),
        )
        self.assertTrue(request.client_version.startswith("imserver.client/"))
        self.assertEqual(self.client.session, response)
        self.assertEqual(self.client.heartbeatInterval, 10.0)

    def test_pingWhenQuiet(self):
        """
        The client pings only once it has sent nothing for the interval.
        """
        self.authenticate()
        self.clock.advance(6)
        d = self.client.ping()
        [ping] = self.written()
        self.respond(ping.seq, pb.PingResponse())
        self.successResultOf(d)
        self.clock.advance(4)
        self.assertEqual(self.written(), [])
        self.clock.advance(5.5)
        self.assertEqual(self.written(), [])
        self.clock.advance(0.5)
        [frame] = self.written()
        self.assertEqual(frame.method, "ping")

    def test_deadServer(self):
        """
        A ping not answered within the interval drops the connection.
        """
        self.authenticate()
        self.clock.advance(10)
        [ping] = self.written()
        self.clock.advance(9.5)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(self.transport.disconnecting)

    def test_answeredPingKeepsGoing(self):
        """
        An answered ping keeps the connection, and the next ping follows one
        interval later.
        """
        self.authenticate()
        self.clock.advance(10)
        [ping] = self.written()
        self.respond(ping.seq, pb.PingResponse())
        self.clock.advance(10)
        self.assertFalse(self.transport.disconnecting)
        [ping] = self.written()
        self.assertEqual(ping.method, "ping")

    def test_kicked(self):
        """
        A C{kicked} notify is recorded and delivered to the callback.
        """
        kicked = pb.Kicked(reason=pb.REPLACED, message="again")
        self.client.dataReceived(
            encodeFrame(pb.Frame(kind=pb.NOTIFY, method="kicked", body=kicked.SerializeToString()))
        )
        self.assertEqual(self.client.kicked, kicked)
        self.assertEqual(self.notified, [("kicked", kicked)])

    def test_closeStopsHeartbeat(self):
        """
        Closing cancels the heartbeat timer and fires C{whenClosed} with the
        reason.
        """
        self.authenticate()
        d = self.client.close()
        self.assertTrue(self.transport.disconnecting)
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(self.successResultOf(d), ConnectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsInstance(self.successResultOf(self.client.whenClosed()), ConnectionDone)

    def test_closedByServer(self):
        """
        After an ERROR frame, C{whenClosed} fires with
        L{ConnectionClosedByPeer} carrying the code.
        """
        self.client.dataReceived(
            encodeFrame(pb.Frame(kind=pb.ERROR, error=pb.Error(code=pb.SERVER_SHUTDOWN)))
        )
        self.client.connectionLost(Failure(ConnectionDone()))
        reason = self.successResultOf(self.client.whenClosed())
        self.assertIsInstance(reason, ConnectionClosedByPeer)
        self.assertEqual(reason.code, pb.SERVER_SHUTDOWN)

    def test_answersPing(self):
        """
        Either side may send C{ping}: the client answers the server's.
        """
        self.client.dataReceived(encodeFrame(pb.Frame(kind=pb.REQUEST, seq=3, method="ping")))
        [frame] = self.written()
        self.assertEqual((frame.kind, frame.seq), (pb.RESPONSE, 3))
        self.assertFalse(frame.HasField("error"))

    def test_adoptsServerFrameLimit(self):
        """
        After auth the client accepts frames up to the server's limit.
        """
        self.authenticate()
        self.assertEqual(self.client.maxFrameLength, 65536)
        d = self.client.authenticate("alice", "tok", "phone")
        [frame] = self.written()
        self.respond(
            frame.seq, pb.AuthResponse(heartbeat_interval_ms=1000, max_frame_length=200000)
        )
        self.successResultOf(d)
        self.assertEqual(self.client.maxFrameLength, 200000)


class NeverConnects:
    """
    A client endpoint whose connection attempts never finish.
    """

    def connect(self, factory):
        from twisted.internet.defer import Deferred

        return Deferred()


class IMClientOfflineTests(SynchronousTestCase):
    """
    L{IMClient} while it cannot connect.
    """

    def test_sendExpiresWhileDisconnected(self):
        """
        A send not answered within C{maxSendAge} fails with
        L{RequestTimeout}, even if no connection was ever made.
        """
        from imserver.client import IMClient
        from imserver.errors import RequestTimeout

        clock = Clock()
        client = IMClient(
            clock, None, None, "alice", "tok", "phone", endpoint=NeverConnects(), maxSendAge=60
        )
        client.start()
        d = client.send("bob", b"hi")
        clock.advance(59)
        self.assertNoResult(d)
        clock.advance(1)
        self.failureResultOf(d, RequestTimeout)
        self.assertEqual(client.pendingCount(), 0)

    def test_sendExpiresWhileStopped(self):
        """
        After L{IMClient.stop} an unanswered send stays pending until its
        C{maxSendAge} runs out, then fails with L{RequestTimeout}.
        """
        from imserver.client import IMClient
        from imserver.errors import RequestTimeout

        clock = Clock()
        client = IMClient(
            clock, None, None, "alice", "tok", "phone", endpoint=NeverConnects(), maxSendAge=60
        )
        client.start()
        d = client.send("bob", b"hi")
        client.stop()
        clock.advance(30)
        self.assertNoResult(d)
        self.assertEqual(client.pendingCount(), 1)
        clock.advance(30)
        self.failureResultOf(d, RequestTimeout)


class StringEndpoint:
    """
    A client endpoint whose connections are L{StringTransport}s, at once.

    @ivar connected: the protocols connected, in order.
    """

    def __init__(self):
        self.connected = []

    def connect(self, factory):
        from twisted.internet.defer import succeed

        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connected.append(protocol)
        return succeed(protocol)


class IMClientTypingTests(SynchronousTestCase):
    """
    L{IMClient.sendTyping}.
    """

    def test_sendTyping(self):
        """
        Typing signals go out on the authenticated connection only: before
        it, nothing is sent (or queued) and the call says so.
        """
        from imserver.client import IMClient

        clock = Clock()
        endpoint = StringEndpoint()
        client = IMClient(clock, None, None, "alice", "tok", "phone", endpoint=endpoint)
        self.assertFalse(client.sendTyping("bob"))
        client.start()
        [protocol] = endpoint.connected
        [auth] = readFrames(protocol.transport.value())
        protocol.transport.clear()
        self.assertFalse(client.sendTyping("bob"))
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(kind=pb.RESPONSE, seq=auth.seq, body=pb.AuthResponse().SerializeToString())
            )
        )
        self.assertTrue(client.sendTyping("bob"))
        self.assertTrue(client.sendTyping("", active=False, groupId="team"))
        frames = readFrames(protocol.transport.value())
        self.assertEqual([(f.kind, f.method) for f in frames], [(pb.NOTIFY, "typing")] * 2)
        self.assertEqual(
            [pb.Typing.FromString(f.body) for f in frames],
            [pb.Typing(uid="bob", active=True), pb.Typing(active=False, group_id="team")],
        )
        protocol.transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(client.sendTyping("bob"))
        client.stop()


class IMClientRetransmitTests(SynchronousTestCase):
    """
    L{IMClient} sending again a message the server could not store yet.
    """

    def test_stopCancelsRetransmit(self):
        """
        A send answered C{UNAVAILABLE} is sent again a second later on the
        same connection; L{IMClient.stop} cancels that, leaving no timer
        behind but the send's own expiry.
        """
        from imserver.client import IMClient

        clock = Clock()
        endpoint = StringEndpoint()
        client = IMClient(
            clock, None, None, "alice", "tok", "phone", endpoint=endpoint, maxSendAge=60
        )
        client.start()
        [protocol] = endpoint.connected
        [auth] = readFrames(protocol.transport.value())
        self.authRequest = pb.AuthRequest.FromString(auth.body)
        protocol.transport.clear()
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(kind=pb.RESPONSE, seq=auth.seq, body=pb.AuthResponse().SerializeToString())
            )
        )
        d = client.send("bob", b"hi", clientMsgId="m1")
        [send] = readFrames(protocol.transport.value())
        protocol.transport.clear()
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(
                    kind=pb.RESPONSE,
                    seq=send.seq,
                    error=pb.Error(code=pb.UNAVAILABLE, message="later"),
                )
            )
        )
        clock.advance(1)
        [again] = readFrames(protocol.transport.value())
        self.assertEqual(pb.SendRequest.FromString(again.body).client_msg_id, "m1")
        protocol.transport.clear()
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(
                    kind=pb.RESPONSE,
                    seq=again.seq,
                    error=pb.Error(code=pb.UNAVAILABLE, message="later"),
                )
            )
        )
        heartbeat = [c for c in clock.getDelayedCalls() if c.func == protocol._beat]
        client.stop()
        self.assertEqual(
            [
                c
                for c in clock.getDelayedCalls()
                if c not in heartbeat and c.active() and c.getTime() - clock.seconds() < 59
            ],
            [],
        )
        self.assertNoResult(d)
        clock.advance(60)
        self.failureResultOf(d)


class IMClientAckTests(SynchronousTestCase):
    """
    L{IMClient} coalescing its acks: one cumulative C{ack} for several
    entries, sent when C{ackEvery} are waiting or the stream went quiet.
    """

    def connect(self, **kwargs):
        from imserver.client import IMClient

        self.clock = Clock()
        endpoint = StringEndpoint()
        self.received = []
        client = IMClient(
            self.clock,
            None,
            None,
            "bob",
            "tok",
            "phone",
            endpoint=endpoint,
            onMessage=self.received.append,
            **kwargs,
        )
        client.start()
        [protocol] = endpoint.connected
        [auth] = readFrames(protocol.transport.value())
        self.authRequest = pb.AuthRequest.FromString(auth.body)
        protocol.transport.clear()
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(
                    kind=pb.RESPONSE,
                    seq=auth.seq,
                    body=pb.AuthResponse(max_unacked=64).SerializeToString(),
                )
            )
        )
        self.addCleanup(client.stop)
        return client, protocol

    def push(self, protocol, seq, outgoing=False, clientMsgId=""):
        entry = pb.InboxEntry(
            seq=seq,
            outgoing=outgoing,
            message=pb.Message(id=seq, sender="alice", body=b"x", client_msg_id=clientMsgId),
        )
        protocol.dataReceived(
            encodeFrame(pb.Frame(kind=pb.NOTIFY, method="message", body=entry.SerializeToString()))
        )

    def acks(self, protocol):
        frames = readFrames(protocol.transport.value())
        protocol.transport.clear()
        return [pb.Ack.FromString(f.body).seq for f in frames if f.method == "ack"]

    def test_quietInterval(self):
        """
        Entries arriving close together are acknowledged with one ack for
        the highest, once no entry came for C{ackDelay}.
        """
        client, protocol = self.connect(ackDelay=0.05)
        for seq in (1, 2, 3):
            self.push(protocol, seq)
            self.clock.advance(0.03)
        self.assertEqual(self.acks(protocol), [])
        self.clock.advance(0.02)
        self.assertEqual(self.acks(protocol), [3])
        self.assertEqual([e.seq for e in self.received], [1, 2, 3])
        self.clock.advance(1)
        self.assertEqual(self.acks(protocol), [])

    def test_everyQuarterWindow(self):
        """
        By default an ack goes out at once when a quarter of the push
        window the server announced (64 here) is unacknowledged, so the
        window never fills while the stream keeps coming.
        """
        client, protocol = self.connect()
        for seq in range(1, 16):
            self.push(protocol, seq)
        self.assertEqual(self.acks(protocol), [])
        self.push(protocol, 16)
        self.assertEqual(self.acks(protocol), [16])
        for seq in range(17, 33):
            self.push(protocol, seq)
        self.assertEqual(self.acks(protocol), [32])

    def test_ackEvery(self):
        """
        C{ackEvery} sets the count explicitly.
        """
        client, protocol = self.connect(ackEvery=2, ackDelay=10)
        for seq in (1, 2, 3):
            self.push(protocol, seq)
        self.assertEqual(self.acks(protocol), [2])
        self.clock.advance(10)
        self.assertEqual(self.acks(protocol), [3])

    def test_noDelay(self):
        """
        C{ackDelay=0} acknowledges every entry at once.
        """
        client, protocol = self.connect(ackDelay=0)
        self.push(protocol, 1)
        self.push(protocol, 2)
        self.assertEqual(self.acks(protocol), [1, 2])

    def test_duplicateCounts(self):
        """
        An entry seen before (a resend after a reconnect) is not handed to
        the application again, but still acknowledged, with the next ack.
        """
        client, protocol = self.connect(ackDelay=0.05)
        self.push(protocol, 1)
        self.push(protocol, 1)
        self.assertEqual([e.seq for e in self.received], [1])
        self.clock.advance(0.05)
        self.assertEqual(self.acks(protocol), [1])

    def test_stopFlushes(self):
        """
        L{IMClient.stop} sends the ack still waiting, so the server's
        cursor is not left behind.
        """
        client, protocol = self.connect(ackDelay=5)
        self.push(protocol, 1)
        client.stop()
        self.assertEqual(self.acks(protocol), [1])
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.active() and c.func == client._ackQuiet],
            [],
        )

    def test_connectionLostCancels(self):
        """
        The connection going away drops the waiting ack and its timer: the
        next auth resumes after the last entry handed over, so no ack is
        needed there.
        """
        client, protocol = self.connect(ackDelay=5)
        self.push(protocol, 1)
        protocol.transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if c.active() and c.func == client._ackQuiet],
            [],
        )
        self.assertEqual(client.lastSeq, 1)

    def test_manualAck(self):
        """
        With C{autoAck} false nothing is sent until L{IMClient.ack}.
        """
        client, protocol = self.connect(autoAck=False)
        self.push(protocol, 1)
        self.clock.advance(1)
        self.assertEqual(self.acks(protocol), [])
        client.ack()
        self.assertEqual(self.acks(protocol), [1])


class IMClientNoEchoTests(SynchronousTestCase):
    """
    L{IMClient} with C{noEcho}: its own sends reach the application as the
    results of C{send} only; the entries they made count as received.
    """

    connect = IMClientAckTests.connect
    push = IMClientAckTests.push
    acks = IMClientAckTests.acks

    def answer(self, protocol, seq, **fields):
        """
        Answer the one C{send} written since the last look with a
        L{pb.SendResponse} of C{seq} and C{fields}.
        """
        [request] = [f for f in readFrames(protocol.transport.value()) if f.method == "send"]
        protocol.transport.clear()
        protocol.dataReceived(
            encodeFrame(
                pb.Frame(
                    kind=pb.RESPONSE,
                    seq=request.seq,
                    body=pb.SendResponse(seq=seq, message_id=seq, **fields).SerializeToString(),
                )
            )
        )

    def test_asked(self):
        """
        The auth request carries C{no_echo} with C{noEcho}, not without.
        """
        self.connect(noEcho=True)
        self.assertTrue(self.authRequest.no_echo)
        self.connect()
        self.assertFalse(self.authRequest.no_echo)

    def test_skippedAnswerIsReceived(self):
        """
        An answer with C{echo_skipped} moves L{IMClient.lastSeq} to its seq
        and is acknowledged like a received entry; the application gets the
        result, not an C{onMessage}.
        """
        client, protocol = self.connect(noEcho=True, ackDelay=0.05)
        self.push(protocol, 1)
        results = []
        client.send("alice", b"hi", clientMsgId="c1").addCallback(results.append)
        self.answer(protocol, 2, echo_skipped=True)
        self.assertEqual([r.seq for r in results], [2])
        self.assertEqual(client.lastSeq, 2)
        self.assertEqual([e.seq for e in self.received], [1])
        self.clock.advance(0.05)
        self.assertEqual(self.acks(protocol), [2])

    def test_pushedAfterAnswer(self):
        """
        An own entry the server pushes all the same (its answer was not
        C{echo_skipped}) is taken as received, acked, and not handed on;
        the entries around it are.
        """
        client, protocol = self.connect(noEcho=True, ackDelay=0)
        client.send("alice", b"hi", clientMsgId="c1")
        self.answer(protocol, 2)
        self.assertEqual(client.lastSeq, 0)
        self.push(protocol, 1)
        self.push(protocol, 2, outgoing=True, clientMsgId="c1")
        self.push(protocol, 3)
        self.assertEqual([e.seq for e in self.received], [1, 3])
        self.assertEqual(self.acks(protocol), [1, 2, 3])
        self.assertEqual(client._ownSeqs, set())

    def test_pushedBeforeAnswer(self):
        """
        An own entry pushed before the answer is recognised by its pending
        C{client_msg_id}; the answer then changes nothing.
        """
        client, protocol = self.connect(noEcho=True, ackDelay=0)
        client.send("alice", b"hi", clientMsgId="c1")
        self.push(protocol, 1, outgoing=True, clientMsgId="c1")
        self.answer(protocol, 1)
        self.assertEqual(self.received, [])
        self.assertEqual((client.lastSeq, client._ownSeqs), (1, set()))

    def test_otherDevicesHandedOn(self):
        """
        Outgoing entries that are not this client's sends (another device
        of the user) still reach C{onMessage}; so does everything without
        C{noEcho}.
        """
        client, protocol = self.connect(noEcho=True)
        self.push(protocol, 1, outgoing=True, clientMsgId="laptop-1")
        self.assertEqual([e.seq for e in self.received], [1])
        client, protocol = self.connect()
        client.send("alice", b"hi", clientMsgId="c1")
        self.push(protocol, 1, outgoing=True, clientMsgId="c1")
        self.assertEqual([e.seq for e in self.received], [1])
