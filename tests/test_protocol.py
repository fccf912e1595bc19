# -*- test-case-name: tests.test_protocol -*-
"""
Tests for L{imserver.protocol}: the gate's connection state machine, auth,
heartbeat sweep, kicks and shutdown, on L{StringTransport} and L{Clock}.
"""

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imserver.interfaces import ISession
from imserver.pb import im_pb2 as pb
from imserver.protocol import AUTHENTICATED
from imserver.registry.memory import MemorySessionRegistry

from tests.support.frames import written
from tests.support.gate import GateHarness


class AuthTests(SynchronousTestCase):
    """
    The C{auth} request and the rules before it.
    """

    def setUp(self):
        self.gate = GateHarness(self)

    def test_success(self):
        """
        A valid token authenticates: the response carries the jittered
        heartbeat interval, the idle timeout, the server time, a session id
        and the post-auth frame limit; the session is registered.
        """
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol)
        [frame] = written(transport)
        self.assertEqual((frame.kind, frame.seq), (pb.RESPONSE, 1))
        response = pb.AuthResponse.FromString(frame.body)
        self.assertTrue(24000 <= response.heartbeat_interval_ms <= 30000)
        self.assertEqual(response.idle_timeout_ms, 90000)
        self.assertEqual(response.server_time_ms, 1_700_000_000_000)
        self.assertEqual(response.session_id, "test/1")
        self.assertEqual(response.max_frame_length, 65536)
        self.assertEqual(protocol.session.state, AUTHENTICATED)
        session = protocol.session
        self.assertEqual(
            (session.uid, session.deviceId, session.platform), ("alice", "phone", pb.IOS)
        )
        self.assertEqual(
            self.successResultOf(self.gate.registry.sessionsFor("alice")), [protocol.session]
        )
        verifyObject(ISession, protocol.session)

    def test_jitterSpreads(self):
        """
        Heartbeat intervals differ between connections.
        """
        intervals = {self.gate.authed(device=str(i))[0].session.heartbeatInterval for i in range(5)}
        self.assertEqual(len(intervals), 5)
        self.assertTrue(all(24.0 <= i <= 30.0 for i in intervals))

    def assertAuthFailed(self, protocol, transport):
        [frame] = written(transport)
        self.assertEqual(frame.kind, pb.RESPONSE)
        self.assertEqual(frame.error.code, pb.AUTH_FAILED)
        self.assertEqual(frame.error.message, "authentication failed")
        self.assertTrue(transport.disconnecting)
        self.assertNotEqual(protocol.session.state, AUTHENTICATED)
        self.assertEqual(self.successResultOf(self.gate.registry.count()), 0)

    def test_badToken(self):
        """
        A bad token gets C{AUTH_FAILED}, then the connection is closed.
        """
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol, token="v1.9999999999.AAAA")
        self.assertAuthFailed(protocol, transport)

    def test_expiredToken(self):
        """
        An expired token gets the same C{AUTH_FAILED}.
        """
        protocol, transport = self.gate.connect()
        token = self.gate.token("alice", ttl=5)
        self.gate.clock.advance(5)
        self.gate.auth(protocol, token=token)
        self.assertAuthFailed(protocol, transport)

    def test_foreignToken(self):
        """
        A token minted for another uid gets the same C{AUTH_FAILED}.
        """
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol, uid="alice", token=self.gate.token("bob"))
        self.assertAuthFailed(protocol, transport)

    def test_invalidFields(self):
        """
        An empty or oversized uid or device id, or control characters, get
        C{BAD_REQUEST}; the connection stays for a corrected auth.
        """
        protocol, transport = self.gate.connect()
        for uid, device in [("", "d"), ("a", ""), ("x" * 129, "d"), ("a\x00b", "d"), ("a", "d\n")]:
            self.gate.auth(protocol, uid=uid, device=device, token="t")
            [frame] = written(transport)
            self.assertEqual(frame.error.code, pb.BAD_REQUEST, (uid, device))
        self.assertFalse(transport.disconnecting)
        self.gate.auth(protocol)
        [frame] = written(transport)
        self.assertFalse(frame.HasField("error"))

    def test_requestBeforeAuth(self):
        """
        Any request but C{auth} before auth gets C{NOT_AUTHENTICATED}, known
        method or not; the connection stays.
        """
        protocol, transport = self.gate.connect()
        self.gate.request(protocol, "ping", pb.PingRequest(), seq=1)
        self.gate.request(protocol, "nope", pb.PingRequest(), seq=2)
        codes = [f.error.code for f in written(transport)]
        self.assertEqual(codes, [pb.NOT_AUTHENTICATED, pb.NOT_AUTHENTICATED])
        self.assertFalse(transport.disconnecting)

    def test_secondAuth(self):
        """
        A second C{auth} on an authenticated connection gets
        C{ALREADY_AUTHENTICATED}.
        """
        protocol, transport = self.gate.authed()
        self.gate.auth(protocol, seq=2)
        [frame] = written(transport)
        self.assertEqual(frame.error.code, pb.ALREADY_AUTHENTICATED)

    def test_authWhileAuthenticating(self):
        """
        A second C{auth} while the first is still being checked gets
        C{ALREADY_AUTHENTICATED}; the first completes.
        """
        pending = Deferred()
        self.gate.factory.authenticator = type(
            "Slow", (), {"authenticate": lambda self, uid, token: pending}
        )()
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol, seq=1)
        self.gate.auth(protocol, seq=2)
        [frame] = written(transport)
        self.assertEqual((frame.seq, frame.error.code), (2, pb.ALREADY_AUTHENTICATED))
        pending.callback("alice")
        [frame] = written(transport)
        self.assertEqual(frame.seq, 1)
        self.assertFalse(frame.HasField("error"))

    def test_preauthFrameLimit(self):
        """
        Before auth, frames are limited to C{preauth_max_frame_length};
        after auth to C{max_frame_length}.
        """
        gate = GateHarness(
            self, preauth_max_frame_length=100, max_frame_length=1100, max_message_body=50
        )
        protocol, transport = gate.connect()
        protocol.dataReceived(b"\x00\x00\x00\x65")
        [frame] = written(transport)
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.FRAME_TOO_LARGE))
        self.assertTrue(transport.disconnecting)

        protocol, transport = gate.authed()
        self.assertEqual(protocol.maxFrameLength, 1100)
        protocol.dataReceived(b"\x00\x00\x04\x4d")
        [frame] = written(transport)
        self.assertEqual(frame.error.code, pb.FRAME_TOO_LARGE)

    def test_authDeadline(self):
        """
        A connection that has not authenticated within C{auth_timeout} gets
        ERROR C{AUTH_TIMEOUT} and is closed, exactly at the deadline.
        """
        protocol, transport = self.gate.connect()
        self.gate.clock.advance(9.999)
        self.assertFalse(transport.disconnecting)
        self.gate.clock.advance(0.001)
        [frame] = written(transport)
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.AUTH_TIMEOUT))
        self.assertTrue(transport.disconnecting)

    def test_authCancelsDeadline(self):
        """
        Successful auth cancels the deadline: no timer is left.
        """
        protocol, transport = self.gate.authed()
        self.assertEqual(self.gate.clock.getDelayedCalls(), [])
        self.gate.clock.advance(20)
        self.assertFalse(transport.disconnecting)

    def test_deadlineDuringAuth(self):
        """
        If the deadline passes while auth is being checked, the connection
        is closed and the late success registers nothing.
        """
        pending = Deferred()
        self.gate.factory.authenticator = type(
            "Slow", (), {"authenticate": lambda self, uid, token: pending}
        )()
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol)
        self.gate.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        pending.callback("alice")
        self.assertEqual(self.successResultOf(self.gate.registry.count()), 0)
        self.assertNotEqual(protocol.session.state, AUTHENTICATED)

    def test_lostDuringAuth(self):
        """
        A connection lost while auth is being checked leaves no session and
        no timer behind.
        """
        pending = Deferred()
        self.gate.factory.authenticator = type(
            "Slow", (), {"authenticate": lambda self, uid, token: pending}
        )()
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol)
        self.gate.lose(protocol)
        pending.callback("alice")
        self.assertEqual(self.successResultOf(self.gate.registry.count()), 0)
        self.assertEqual(self.gate.clock.getDelayedCalls(), [])
        self.assertEqual(self.gate.factory.connections, set())

    def test_ping(self):
        """
        C{ping} after auth answers with the server time.
        """
        protocol, transport = self.gate.authed()
        self.gate.request(protocol, "ping", pb.PingRequest(), seq=2)
        [frame] = written(transport)
        self.assertEqual(pb.PingResponse.FromString(frame.body).server_time_ms, 1_700_000_000_000)


class SessionTests(SynchronousTestCase):
    """
    One session per (uid, device): kicks and device limits.
    """

    def setUp(self):
        self.gate = GateHarness(self, max_devices=2)

    def test_sameDeviceKicks(self):
        """
        The same uid and device authenticating again kicks the old session
        with a C{kicked} notify (reason C{REPLACED}) and closes it; the old
        connection's close leaves the new registration in place.
        """
        old, oldTransport = self.gate.authed()
        new, newTransport = self.gate.authed()
        [frame] = written(oldTransport)
        self.assertEqual((frame.kind, frame.method), (pb.NOTIFY, "kicked"))
        self.assertEqual(pb.Kicked.FromString(frame.body).reason, pb.REPLACED)
        self.assertTrue(oldTransport.disconnecting)
        self.gate.lose(old)
        self.assertEqual(
            self.successResultOf(self.gate.registry.sessionsFor("alice")), [new.session]
        )
        self.assertFalse(newTransport.disconnecting)

    def test_otherDevicesCoexist(self):
        """
        Different devices of one user coexist.
        """
        phone, _ = self.gate.authed(device="phone")
        laptop, _ = self.gate.authed(device="laptop")
        sessions = self.successResultOf(self.gate.registry.sessionsFor("alice"))
        self.assertEqual(set(sessions), {phone.session, laptop.session})

    def test_tooManyDevices(self):
        """
        A device beyond C{max_devices} gets C{TOO_MANY_DEVICES} and is
        closed; the others stay.
        """
        self.gate.authed(device="a")
        self.gate.authed(device="b")
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol, device="c")
        [frame] = written(transport)
        self.assertEqual(frame.error.code, pb.TOO_MANY_DEVICES)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.successResultOf(self.gate.registry.count()), 2)

    def test_unregisterOnClose(self):
        """
        Closing an authenticated connection unregisters its session.
        """
        protocol, _ = self.gate.authed()
        self.gate.lose(protocol)
        self.assertEqual(self.successResultOf(self.gate.registry.count()), 0)
        self.assertEqual(self.gate.factory.connections, set())

    def test_kickOnce(self):
        """
        Kicking a session twice sends one notify.
        """
        protocol, transport = self.gate.authed()
        protocol.session.kick(pb.ADMIN, "bye")
        protocol.session.kick(pb.ADMIN, "bye")
        self.assertEqual(len(written(transport)), 1)


class HeartbeatTests(SynchronousTestCase):
    """
    The idle sweep.
    """

    def setUp(self):
        self.gate = GateHarness(self, idle_timeout=90, heartbeat_interval=30)

    def test_idleCloseExactly(self):
        """
        A connection heard nothing from for C{idle_timeout} is closed with
        ERROR C{IDLE_TIMEOUT} by the first sweep at or after that point,
        not before.
        """
        protocol, transport = self.gate.authed()
        self.gate.clock.advance(89.999)
        self.assertEqual(self.gate.factory.sweep(), 0)
        self.gate.clock.advance(0.001)
        self.assertEqual(self.gate.factory.sweep(), 1)
        [frame] = written(transport)
        self.assertEqual((frame.kind, frame.error.code), (pb.ERROR, pb.IDLE_TIMEOUT))
        self.assertTrue(transport.disconnecting)

    def test_anyBytesCount(self):
        """
        Any bytes received, even part of a frame, reset the idle time.
        """
        protocol, transport = self.gate.authed()
        self.gate.clock.advance(80)
        protocol.dataReceived(b"\x00")
        self.gate.clock.advance(80)
        self.assertEqual(self.gate.factory.sweep(), 0)
        self.gate.clock.advance(10)
        self.assertEqual(self.gate.factory.sweep(), 1)

    def test_onlyIdleClosed(self):
        """
        The sweep closes the idle connections and leaves the others.
        """
        idle, idleTransport = self.gate.authed(device="a")
        busy, busyTransport = self.gate.authed(device="b")
        self.gate.clock.advance(60)
        self.gate.request(busy, "ping", pb.PingRequest(), seq=2)
        self.gate.clock.advance(30)
        self.assertEqual(self.gate.factory.sweep(), 1)
        self.assertTrue(idleTransport.disconnecting)
        self.assertFalse(busyTransport.disconnecting)

    def test_noTimersWhileIdle(self):
        """
        Authenticated connections have no per-connection timer.
        """
        for i in range(10):
            self.gate.authed(device=str(i))
        self.assertEqual(self.gate.clock.getDelayedCalls(), [])


class ShutdownTests(SynchronousTestCase):
    """
    L{GateFactory.shutdown}.
    """

    def setUp(self):
        # The close bound beyond the shutdown grace: the grace is what
        # aborts (ClosingTests covers the close bound).
        self.gate = GateHarness(self, shutdown_grace=5, close_timeout=30)

    def test_noConnections(self):
        """
        With no connections shutdown is immediate.
        """
        self.successResultOf(self.gate.factory.shutdown())

    def test_closesAndWaits(self):
        """
        Every connection gets ERROR C{SERVER_SHUTDOWN} and is closed; the
        result fires once all are gone.
        """
        a, aTransport = self.gate.authed(device="a")
        b, bTransport = self.gate.connect()
        d = self.gate.factory.shutdown()
        for transport in (aTransport, bTransport):
            [frame] = written(transport)
            self.assertEqual(frame.error.code, pb.SERVER_SHUTDOWN)
            self.assertTrue(transport.disconnecting)
        self.gate.lose(a)
        self.assertNoResult(d)
        self.gate.lose(b)
        self.successResultOf(d)
        self.assertEqual(self.gate.clock.getDelayedCalls(), [])

    def test_abortAfterGrace(self):
        """
        Connections still open after C{shutdown_grace} are aborted.
        """
        protocol, transport = self.gate.authed()
        aborted = []
        transport.abortConnection = lambda: aborted.append(True) or self.gate.lose(protocol)
        d = self.gate.factory.shutdown()
        self.gate.clock.advance(4.9)
        self.assertEqual(aborted, [])
        self.gate.clock.advance(0.1)
        self.assertEqual(aborted, [True])
        self.successResultOf(d)


class SlowRegistry(MemorySessionRegistry):
    """
    A registry whose C{register} answers only when the test says so.
    """

    def __init__(self):
        MemorySessionRegistry.__init__(self)
        self.waiting = []

    def register(self, session):
        d = Deferred()
        self.waiting.append((d, MemorySessionRegistry.register(self, session)))
        return d

    def release(self):
        for d, result in self.waiting:
            result.chainDeferred(d)
        self.waiting = []


class ValidationTests(SynchronousTestCase):
    """
    Field checks on C{auth} and registration races.
    """

    def setUp(self):
        self.gate = GateHarness(self)

    def authWith(self, **fields):
        protocol, transport = self.gate.connect()
        request = pb.AuthRequest(uid="alice", device_id="d", token=self.gate.token("alice"))
        for name, value in fields.items():
            setattr(request, name, value)
        self.gate.request(protocol, "auth", request)
        [frame] = written(transport)
        return frame

    def test_clientVersionBytes(self):
        """
        C{client_version} is limited to 64 bytes of UTF-8, not characters.
        """
        self.assertEqual(self.authWith(client_version="é" * 33).error.code, pb.BAD_REQUEST)
        self.assertFalse(self.authWith(client_version="é" * 32).HasField("error"))

    def test_unknownPlatform(self):
        """
        A platform value outside the enum is C{BAD_REQUEST}.
        """
        self.assertEqual(self.authWith(platform=99).error.code, pb.BAD_REQUEST)

    def test_identifierCharacters(self):
        """
        Identifiers may hold any printable Unicode, format characters such
        as the zero-width joiner included, but no line separators.
        """
        self.assertFalse(self.authWith(device_id="\U0001f469\u200d\U0001f4bb").HasField("error"))
        self.assertEqual(self.authWith(device_id="a\u2028b").error.code, pb.BAD_REQUEST)

    def test_closedWhileRegistering(self):
        """
        A connection lost while its registration is pending is unregistered
        once the registration completes: it never holds a device slot.
        """
        self.gate = GateHarness(self, registry=SlowRegistry())
        registry = self.gate.registry
        protocol, transport = self.gate.connect()
        self.gate.auth(protocol)
        self.gate.lose(protocol)
        registry.release()
        self.assertEqual(self.successResultOf(registry.count()), 0)
        self.assertNotEqual(protocol.session.state, AUTHENTICATED)
