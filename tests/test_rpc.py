# -*- test-case-name: tests.test_rpc -*-
"""
Tests for L{imserver.rpc}: the symmetric request/response/notify layer.
"""

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import Clock, EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.errors import (
    ConnectionClosedByPeer,
    MalformedResponse,
    RemoteError,
    RequestTimeout,
    RPCError,
)
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.rpc import Method, Notification, RPCProtocol

from tests.support.frames import readFrames

ECHO = Method("echo", pb.PingResponse, pb.PingResponse)
SLOW = Method("slow", pb.PingRequest, pb.PingResponse)
BROKEN = Method("broken", pb.PingRequest, pb.PingResponse)
REFUSE = Method("refuse", pb.PingRequest, pb.PingResponse)
FATAL = Method("fatal", pb.PingRequest, pb.PingResponse)
HELLO = Notification("hello", pb.Kicked)


class Peer(RPCProtocol):
    """
    An L{RPCProtocol} with a few responders for the tests.
    """

    def __init__(self, clock):
        RPCProtocol.__init__(self, clock)
        self.pending = []
        self.notified = []

    @ECHO.responder
    def echo(self, request):
        return pb.PingResponse(server_time_ms=request.server_time_ms + 1)

    @SLOW.responder
    def slow(self, request):
        d = Deferred()
        self.pending.append(d)
        return d

    @BROKEN.responder
    def broken(self, request):
        raise ZeroDivisionError("oops")

    @REFUSE.responder
    def refuse(self, request):
        raise RPCError("no", code=pb.BAD_REQUEST)

    @FATAL.responder
    def fatal(self, request):
        raise RPCError("bye", code=pb.AUTH_FAILED, fatal=True)

    @HELLO.handler
    def hello(self, message):
        self.notified.append(message)


class PeerTestCase(SynchronousTestCase):
    """
    Common set-up: a L{Peer} on a L{StringTransport} with a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.peer = Peer(self.clock)
        self.transport = StringTransport()
        self.peer.makeConnection(self.transport)

    def receive(self, **fields):
        """
        Feed the peer one frame.
        """
        self.peer.dataReceived(encodeFrame(pb.Frame(**fields)))

    def written(self):
        """
        Frames the peer wrote since the last call.
        """
        frames = readFrames(self.transport.value())
        self.transport.clear()
        return frames


class TablesTests(SynchronousTestCase):
    """
    Responder tables are built per class.
    """

    def test_tables(self):
        """
        Decorated methods appear in the class's tables; the base class's
        tables stay empty.
        """
        self.assertEqual(sorted(Peer.responders), ["broken", "echo", "fatal", "refuse", "slow"])
        self.assertEqual(list(Peer.notificationHandlers), ["hello"])
        self.assertEqual(RPCProtocol.responders, {})

    def test_inherited(self):
        """
        A subclass inherits its base's responders and can add its own.
        """

        class More(Peer):
            @Method("more", pb.PingRequest, pb.PingResponse).responder
            def more(self, request):
                return pb.PingResponse()

        self.assertIn("echo", More.responders)
        self.assertIn("more", More.responders)
        self.assertNotIn("more", Peer.responders)


class IncomingTests(PeerTestCase):
    """
    Requests and notifies arriving from the peer.
    """

    def test_response(self):
        """
        A request is answered with a RESPONSE echoing its seq.
        """
        self.receive(
            kind=pb.REQUEST,
            seq=7,
            method="echo",
            body=pb.PingResponse(server_time_ms=41).SerializeToString(),
        )
        [frame] = self.written()
        self.assertEqual(frame.kind, pb.RESPONSE)
        self.assertEqual(frame.seq, 7)
        self.assertFalse(frame.HasField("error"))
        self.assertEqual(pb.PingResponse.FromString(frame.body).server_time_ms, 42)

    def test_unknownMethod(self):
        """
        An unknown method gets an C{UNKNOWN_METHOD} error response; the
        connection stays.
        """
        self.receive(kind=pb.REQUEST, seq=3, method="nope")
        [frame] = self.written()
        self.assertEqual((frame.kind, frame.seq), (pb.RESPONSE, 3))
        self.assertEqual(frame.error.code, pb.UNKNOWN_METHOD)
        self.assertFalse(self.transport.disconnecting)

    def test_malformedBody(self):
        """
        A body that does not parse as the method's request gets
        C{BAD_REQUEST}; the connection stays.
        """
        self.receive(kind=pb.REQUEST, seq=4, method="echo", body=b"\xff\xff")
        [frame] = self.written()
        self.assertEqual(frame.error.code, pb.BAD_REQUEST)
        self.assertFalse(self.transport.disconnecting)

    def test_declaredError(self):
        """
        An L{RPCError} raised by a responder becomes its error code.
        """
        self.receive(kind=pb.REQUEST, seq=5, method="refuse")
        [frame] = self.written()
        self.assertEqual((frame.seq, frame.error.code), (5, pb.BAD_REQUEST))
        self.assertEqual(frame.error.message, "no")
        self.assertFalse(self.transport.disconnecting)

    def test_fatalError(self):
        """
        A fatal L{RPCError} is answered, then the connection is closed.
        """
        self.receive(kind=pb.REQUEST, seq=5, method="fatal")
        [frame] = self.written()
        self.assertEqual(frame.error.code, pb.AUTH_FAILED)
        self.assertTrue(self.transport.disconnecting)

    def test_unexpectedException(self):
        """
        A responder's unexpected exception is logged with its traceback and
        answered with a generic C{INTERNAL} error that reveals nothing.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.receive(kind=pb.REQUEST, seq=6, method="broken")
        [frame] = self.written()
        self.assertEqual(frame.error.code, pb.INTERNAL)
        self.assertNotIn("oops", frame.error.message)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(any("log_failure" in e for e in observer))

    def test_asyncResponse(self):
        """
        A responder's L{Deferred} result is sent when it fires, with the
        right seq, even when answered out of order.
        """
        self.receive(kind=pb.REQUEST, seq=10, method="slow")
        self.receive(kind=pb.REQUEST, seq=11, method="slow")
        self.assertEqual(self.written(), [])
        self.peer.pending[1].callback(pb.PingResponse(server_time_ms=2))
        self.peer.pending[0].errback(RPCError("x", code=pb.BAD_REQUEST))
        first, second = self.written()
        self.assertEqual(
            (first.seq, first.body), (11, pb.PingResponse(server_time_ms=2).SerializeToString())
        )
        self.assertEqual((second.seq, second.error.code), (10, pb.BAD_REQUEST))

    def test_asyncUnexpectedFailure(self):
        """
        An unexpected failure of a responder's L{Deferred} is logged and
        answered with C{INTERNAL}.
        """
        self.receive(kind=pb.REQUEST, seq=10, method="slow")
        self.peer.pending[0].errback(ZeroDivisionError())
        [frame] = self.written()
        self.assertEqual(frame.error.code, pb.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_seqZero(self):
        """
        A request with seq 0 is a protocol error: ERROR C{DUPLICATE_SEQ} and
        close.
        """
        self.receive(kind=pb.REQUEST, seq=0, method="echo")
        [frame] = self.written()
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.DUPLICATE_SEQ))
        self.assertTrue(self.transport.disconnecting)

    def test_seqReusedWhileOutstanding(self):
        """
        Reusing the seq of a request still being worked on is
        C{DUPLICATE_SEQ}; reusing it after the answer is fine.
        """
        self.receive(kind=pb.REQUEST, seq=9, method="slow")
        self.peer.pending[0].callback(pb.PingResponse())
        self.written()
        self.receive(kind=pb.REQUEST, seq=9, method="slow")
        self.assertFalse(self.transport.disconnecting)
        self.receive(kind=pb.REQUEST, seq=9, method="slow")
        [frame] = self.written()
        self.assertEqual((frame.kind, frame.seq, frame.error.code), (pb.ERROR, 9, pb.DUPLICATE_SEQ))
        self.assertTrue(self.transport.disconnecting)

    def test_noResponseAfterDisconnect(self):
        """
        A responder that finishes after the connection is gone writes
        nothing.
        """
        self.receive(kind=pb.REQUEST, seq=10, method="slow")
        self.peer.connectionLost(Failure(ConnectionDone()))
        self.peer.pending[0].callback(pb.PingResponse())
        self.assertEqual(self.written(), [])

    def test_unknownKind(self):
        """
        A frame of an unknown kind is C{BAD_FRAME}.
        """
        self.receive(kind=99, seq=1)
        [frame] = self.written()
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.BAD_FRAME))

    def test_notify(self):
        """
        A notification is handed to its handler; nothing is written back.
        """
        message = pb.Kicked(reason=pb.ADMIN, message="hi")
        self.receive(kind=pb.NOTIFY, method="hello", body=message.SerializeToString())
        self.assertEqual(self.peer.notified, [message])
        self.assertEqual(self.written(), [])

    def test_unknownNotifyIgnored(self):
        """
        Unknown or malformed notifications are ignored and the connection
        stays: notifies are one-way and forward compatible.
        """
        self.receive(kind=pb.NOTIFY, method="future")
        self.receive(kind=pb.NOTIFY, method="hello", body=b"\xff")
        self.assertEqual(self.peer.notified, [])
        self.assertEqual(self.written(), [])
        self.assertFalse(self.transport.disconnecting)

    def test_ignoredLoggedOnce(self):
        """
        Frames ignored as meaningless (unknown notifications, responses to
        unknown seqs) are logged once per connection, so a peer cannot make
        the server write a log line per few bytes.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(50):
            self.receive(kind=pb.NOTIFY, method="future")
            self.receive(kind=pb.RESPONSE, seq=99)
        logged = [e for e in events if "dropped silently" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)


class OutgoingTests(PeerTestCase):
    """
    Requests this side makes.
    """

    def call(self, timeout=None):
        """
        Call C{echo} and return the Deferred and the frame written.
        """
        d = self.peer.callRemote(ECHO, pb.PingResponse(server_time_ms=1), timeout)
        [frame] = self.written()
        return d, frame

    def test_request(self):
        """
        C{callRemote} writes a REQUEST with a fresh nonzero seq, the method
        name and the serialized body.
        """
        d, frame = self.call()
        self.assertEqual(frame.kind, pb.REQUEST)
        self.assertEqual(frame.method, "echo")
        self.assertNotEqual(frame.seq, 0)
        self.assertEqual(pb.PingResponse.FromString(frame.body).server_time_ms, 1)
        _, second = self.call()
        self.assertNotEqual(second.seq, frame.seq)

    def test_response(self):
        """
        The response with the same seq fires the Deferred with the parsed
        message and cancels the timeout.
        """
        d, frame = self.call()
        self.receive(
            kind=pb.RESPONSE,
            seq=frame.seq,
            body=pb.PingResponse(server_time_ms=5).SerializeToString(),
        )
        self.assertEqual(self.successResultOf(d).server_time_ms, 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_errorResponse(self):
        """
        An error response fails the Deferred with L{RemoteError}.
        """
        d, frame = self.call()
        self.receive(
            kind=pb.RESPONSE, seq=frame.seq, error=pb.Error(code=pb.BAD_REQUEST, message="m")
        )
        error = self.failureResultOf(d, RemoteError).value
        self.assertEqual((error.code, error.message), (pb.BAD_REQUEST, "m"))

    def test_malformedResponse(self):
        """
        A response body that does not parse fails the Deferred.
        """
        d, frame = self.call()
        self.receive(kind=pb.RESPONSE, seq=frame.seq, body=b"\xff")
        self.failureResultOf(d, MalformedResponse)

    def test_timeout(self):
        """
        With no response the Deferred fails with L{RequestTimeout} exactly at
        the timeout; a late response is then dropped.
        """
        d, frame = self.call(timeout=5)
        self.clock.advance(4.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.failureResultOf(d, RequestTimeout)
        self.receive(kind=pb.RESPONSE, seq=frame.seq, body=b"")
        self.assertFalse(self.transport.disconnecting)

    def test_defaultTimeout(self):
        """
        Without a timeout argument, C{requestTimeout} applies.
        """
        self.peer.requestTimeout = 2
        d, _ = self.call()
        self.clock.advance(2)
        self.failureResultOf(d, RequestTimeout)

    def test_unknownSeqDropped(self):
        """
        A response for a seq nobody is waiting for is logged and dropped.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        d, frame = self.call()
        self.receive(kind=pb.RESPONSE, seq=frame.seq + 1, body=b"")
        self.assertNoResult(d)
        self.assertFalse(self.transport.disconnecting)
        self.assertTrue(any(e.get("seq") == frame.seq + 1 for e in observer))

    def test_disconnectFailsAll(self):
        """
        Losing the connection fails every outstanding request with the reason
        and cancels their timeouts; later calls fail at once.
        """
        first, _ = self.call()
        second, _ = self.call()
        self.peer.connectionLost(Failure(ConnectionLost("gone")))
        self.failureResultOf(first, ConnectionLost)
        self.failureResultOf(second, ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(self.peer.callRemote(ECHO, pb.PingResponse()), ConnectionLost)

    def test_errbackMayCallAgain(self):
        """
        An errback run by the fail-all may call C{callRemote}; it fails at
        once and the table is not mutated under the loop.
        """
        d, _ = self.call()
        again = []
        d.addErrback(lambda f: again.append(self.peer.callRemote(ECHO, pb.PingResponse())))
        self.peer.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(again[0], ConnectionDone)

    def test_peerErrorFrame(self):
        """
        An ERROR frame from the peer closes the connection, and outstanding
        requests fail with L{ConnectionClosedByPeer} carrying its code.
        """
        d, _ = self.call()
        self.receive(kind=pb.ERROR, error=pb.Error(code=pb.IDLE_TIMEOUT, message="idle"))
        self.assertTrue(self.transport.disconnecting)
        self.peer.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.failureResultOf(d, ConnectionClosedByPeer).value.code, pb.IDLE_TIMEOUT
        )

    def test_cancel(self):
        """
        Cancelling the Deferred forgets the request and its timeout.
        """
        d, frame = self.call()
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.peer._outstanding, {})

    def test_seqWraps(self):
        """
        Seqs wrap at 2^32, skipping 0 and seqs still outstanding.
        """
        self.peer._lastSeq = 2**32 - 2
        _, a = self.call()
        _, b = self.call()
        self.assertEqual((a.seq, b.seq), (2**32 - 1, 1))
        self.peer._lastSeq = 2**32 - 2
        _, c = self.call()
        self.assertEqual(c.seq, 2)

    def test_notify(self):
        """
        C{sendNotify} writes a NOTIFY with seq 0.
        """
        self.peer.sendNotify(HELLO, pb.Kicked(reason=pb.REPLACED))
        [frame] = self.written()
        self.assertEqual((frame.kind, frame.seq, frame.method), (pb.NOTIFY, 0, "hello"))
        self.assertEqual(pb.Kicked.FromString(frame.body).reason, pb.REPLACED)
