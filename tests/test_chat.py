"""
Tests for C{python -m imserver chat} (L{imserver.chat}).

L{ChatSession} and L{TerminalInput} are driven with a fake client, a
L{Clock} and an L{io.StringIO}; the options and L{imserver.chat.prepare}
are checked without a reactor; two live tests run two chat processes
against an in-process gate on loopback TLS, one pair talking 1:1 and one
in a group.
"""

import os
import re
import shlex
import signal
import sys
import time
from io import StringIO

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import chat, tap
from imserver.__main__ import main
from imserver.auth import verifyToken
from imserver.chat import (
    ChatOptions,
    ChatSession,
    RawTerminal,
    TerminalEditor,
    TerminalInput,
    _WatchedEndpoint,
    bodyText,
    certificateProblem,
    clientMsgIdPrefix,
    defaultDeviceId,
    describe,
    prepare,
    printable,
)
from imserver.errors import RemoteError
from imserver.pb import im_pb2 as pb
from imserver.spawn import childEnvironment
from imserver.tls import CERT_FILE_NAME

from tests.support import killAtCleanup, startServer, withoutSecretEnvironment

#: 2023-11-14 22:13:20 UTC, in milliseconds.
CREATED_MS = 1700000000000


class FakeProtocol:
    """
    Stands in for an authenticated L{imserver.client.ClientProtocol}.
    """

    def __init__(self, sessionId="s1"):
        self.session = pb.AuthResponse(session_id=sessionId)
        self.closed = Deferred()
        self.membersAsked = []

    def whenClosed(self):
        return self.closed

    def members(self, groupId):
        d = Deferred()
        self.membersAsked.append((groupId, d))
        return d


class FakeClient:
    """
    Stands in for an L{imserver.client.IMClient}: records sends and lets
    the test fire connections, answers and the stop.

    @ivar sent: C{(to, body, contentType, clientMsgId, d)} per send.
    @ivar sentGroups: the C{groupId} of each send.
    @ivar typing: C{(to, active, groupId)} per typing signal sent.
    @ivar online: whether typing signals can be sent.
    """

    def __init__(self, deviceId="cli-test"):
        self.deviceId = deviceId
        self.typing = []
        self.online = True
        self.onMessage = None
        self.onNotify = None
        self.stopReason = None
        self.started = False
        self.stopped = False
        self.sent = []
        self.sentGroups = []
        self.connectWaiters = []
        self.stopWaiters = []

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True
        return succeed(None)

    def send(self, to, body, contentType="", clientMsgId=None, groupId=""):
        d = Deferred()
        self.sent.append((to, body, contentType, clientMsgId, d))
        self.sentGroups.append(groupId)
        return d

    def sendTyping(self, to, active=True, groupId=""):
        if not self.online:
            return False
        self.typing.append((to, active, groupId))
        return True

    def whenConnected(self):
        d = Deferred()
        self.connectWaiters.append(d)
        return d

    def whenStopped(self):
        d = Deferred()
        self.stopWaiters.append(d)
        return d

    def connect(self, protocol):
        """
        Fire the connection waiters, as a successful auth does.
        """
        waiters, self.connectWaiters = self.connectWaiters, []
        for d in waiters:
            d.callback(protocol)

    def giveUp(self, reason):
        """
        Fire the stop waiters, as a kick or a refused token does.
        """
        self.stopReason = reason
        waiters, self.stopWaiters = self.stopWaiters, []
        for d in waiters:
            d.callback(reason)


def _entry(
    sender,
    recipient,
    body,
    seq=1,
    outgoing=False,
    clientMsgId="x",
    contentType="text/plain",
    createdMs=CREATED_MS,
    groupId="",
):
    return pb.InboxEntry(
        seq=seq,
        outgoing=outgoing,
        message=pb.Message(
            id=seq,
            sender=sender,
            recipient=recipient,
            group_id=groupId,
            client_msg_id=clientMsgId,
            body=body,
            content_type=contentType,
            created_ms=createdMs,
        ),
    )


class ChatSessionTests(SynchronousTestCase):
    """
    L{ChatSession} with a fake client, a clock and a string buffer.
    """

    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.out = StringIO()
        self.session = ChatSession(
            self.clock,
            self.client,
            self.out,
            "alice",
            "bob",
            where="localhost:7443",
            localtime=time.gmtime,
        )
        self.done = self.session.start()
        self.out.seek(0)
        self.out.truncate()

    def lines(self):
        return self.out.getvalue().splitlines()

    def test_start(self):
        """
        Starting prints who talks to whom, hooks the client's callbacks and
        starts it.
        """
        out = StringIO()
        client = FakeClient()
        session = ChatSession(self.clock, client, out, "alice", "bob", where="h:1")
        session.start()
        self.assertTrue(client.started)
        self.assertEqual(client.onMessage, session.onMessage)
        self.assertEqual(client.onNotify, session.onNotify)
        self.assertEqual(
            out.getvalue(), "chat with bob as alice via h:1 (Enter sends a line, Ctrl-D quits)\n"
        )

    def test_incoming(self):
        """
        A message from the peer is printed as C{[HH:MM:SS] sender: text},
        in the given local time.
        """
        self.client.onMessage(_entry("bob", "alice", "h\u00e9llo".encode("utf-8")))
        self.assertEqual(self.lines(), ["[22:13:20] bob: h\u00e9llo"])

    def test_incomingFromSomeoneElse(self):
        """
        A message from another user is printed under that user's name.
        """
        self.session.onMessage(_entry("carol", "alice", b"hey"))
        self.assertEqual(self.lines(), ["[22:13:20] carol: hey"])

    def test_send(self):
        """
        A line is sent to the peer as C{text/plain} with a client_msg_id
        carrying this device's prefix; a trailing carriage return is dropped.
        """
        self.session.lineReceived(b"hi bob\r")
        [(to, body, contentType, clientMsgId, d)] = self.client.sent
        self.assertEqual((to, body, contentType), ("bob", b"hi bob", "text/plain"))
        self.assertEqual(self.client.sentGroups, [""])
        self.assertTrue(clientMsgId.startswith(clientMsgIdPrefix("cli-test")))
        self.assertLessEqual(len(clientMsgId), 64)
        self.assertEqual(self.lines(), [])

    def test_blankLinesIgnored(self):
        """
        Empty and whitespace-only lines are not sent.
        """
        self.session.lineReceived(b"")
        self.session.lineReceived(b"  \t\r")
        self.assertEqual(self.client.sent, [])

    def test_notUtf8(self):
        """
        A line that is not UTF-8 is not sent, with a note.
        """
        self.session.lineReceived(b"caf\xe9")
        self.assertEqual(self.client.sent, [])
        self.assertEqual(self.lines(), ["! not sent: the line is not valid UTF-8"])

    def test_ownSendNotEchoed(self):
        """
        The server's copy of a message this process sent is not printed.
        """
        self.session.lineReceived(b"hi bob")
        clientMsgId = self.client.sent[0][3]
        self.session.onMessage(
            _entry("alice", "bob", b"hi bob", outgoing=True, clientMsgId=clientMsgId)
        )
        self.assertEqual(self.lines(), [])

    def test_otherDevice(self):
        """
        The user's own message sent from another device is printed as
        C{you (other device)}; to someone else, with the recipient.
        """
        self.session.onMessage(
            _entry("alice", "bob", b"from my phone", outgoing=True, clientMsgId="abc")
        )
        self.session.onMessage(
            _entry("alice", "carol", b"hi carol", seq=2, outgoing=True, clientMsgId="abd")
        )
        self.assertEqual(
            self.lines(),
            [
                "[22:13:20] you (other device): from my phone",
                "[22:13:20] you (other device) to carol: hi carol",
            ],
        )

    def test_earlierRunOfThisDevice(self):
        """
        The user's own message sent from this device by an earlier run is
        printed as C{you}.
        """
        clientMsgId = clientMsgIdPrefix("cli-test") + "0" * 32
        self.session.onMessage(
            _entry("alice", "bob", b"yesterday", outgoing=True, clientMsgId=clientMsgId)
        )
        self.assertEqual(self.lines(), ["[22:13:20] you: yesterday"])

    def test_groupMessage(self):
        """
        A group message is printed with its group, whatever the chat is
        with; the user's own, from another device, too.
        """
        self.session.onMessage(_entry("carol", "", b"hi team", groupId="team"))
        self.session.onMessage(
            _entry("alice", "", b"me too", seq=2, outgoing=True, clientMsgId="abc", groupId="team")
        )
        self.assertEqual(
            self.lines(),
            [
                "[22:13:20] carol in team: hi team",
                "[22:13:20] you (other device) in team: me too",
            ],
        )

    def test_systemSender(self):
        """
        A message with no sender (sent by the app backend) is printed as
        from C{(system)}.
        """
        self.session.onMessage(_entry("", "alice", b"welcome"))
        self.session.onMessage(_entry("", "", b"new rules", seq=2, groupId="team"))
        self.assertEqual(
            self.lines(),
            [
                "[22:13:20] (system): welcome",
                "[22:13:20] (system) in team: new rules",
            ],
        )

    def test_notice(self):
        """
        A C{notice} is printed with its server time; a body that is not
        text by its size and content type.
        """
        self.client.onNotify(
            "notice",
            pb.Notice(
                body=b"maintenance at 5",
                content_type="text/plain",
                server_time_ms=CREATED_MS + 1000,
            ),
        )
        self.client.onNotify(
            "notice",
            pb.Notice(body=b"{}", content_type="application/json", server_time_ms=CREATED_MS),
        )
        self.assertEqual(
            self.lines(),
            [
                "[22:13:21] notice: maintenance at 5",
                "[22:13:20] notice: [2 bytes of application/json]",
            ],
        )

    def test_unknownNotify(self):
        """
        Notifications the chat does not know are not shown.
        """
        self.client.onNotify("presence", pb.Typing(uid="bob", active=True))
        self.assertEqual(self.lines(), [])

    def test_controlCharacters(self):
        """
        Control characters in a received text cannot drive the terminal;
        continuation lines are indented.
        """
        self.session.onMessage(_entry("bob", "alice", b"\x1b[2Jred\rx\none"))
        self.assertEqual(self.out.getvalue(), "[22:13:20] bob: \ufffd[2Jred\ufffdx\n    one\n")

    def test_notText(self):
        """
        A body that is not text is shown by its size and content type.
        """
        self.session.onMessage(_entry("bob", "alice", b"\x89PNG", contentType="image/png"))
        self.assertEqual(self.lines(), ["[22:13:20] bob: [4 bytes of image/png]"])

    def test_sendFailed(self):
        """
        A send the server refuses for good is reported with its error.
        """
        self.session.lineReceived(b"x" * 50)
        d = self.client.sent[0][4]
        d.errback(RemoteError(pb.MESSAGE_TOO_LARGE, "body above 32768 bytes"))
        self.assertEqual(
            self.lines(),
            ["! send failed: MESSAGE_TOO_LARGE: body above 32768 bytes: " + "x" * 39 + "\u2026"],
        )

    def test_connectedAndReconnected(self):
        """
        Each successful connection is announced with its session id, and a
        connection lost is announced too.
        """
        first = FakeProtocol("s1")
        self.client.connect(first)
        first.closed.callback(OSError("closed"))
        second = FakeProtocol("s2")
        self.client.connect(second)
        self.assertEqual(
            self.lines(),
            [
                "connected as alice (session s1)",
                "disconnected (closed); reconnecting",
                "reconnected as alice (session s2)",
            ],
        )

    def test_connectFailedOnce(self):
        """
        A failure to connect is reported once while it repeats, and again
        after a successful connection.
        """
        self.session.connectFailed(OSError("refused."))
        self.session.connectFailed(OSError("refused."))
        self.client.connect(FakeProtocol())
        self.session.connectFailed(OSError("refused."))
        self.assertEqual(
            self.lines(),
            [
                "! cannot connect to localhost:7443: refused (still trying)",
                "connected as alice (session s1)",
                "! cannot connect to localhost:7443: refused (still trying)",
            ],
        )

    def test_typing(self):
        """
        The peer typing is shown at most once per interval, and again after
        a message from the peer; others typing and typing stopped are not.
        """
        typing = self.client.onNotify
        typing("typing", pb.Typing(uid="bob", active=True))
        self.clock.advance(1)
        typing("typing", pb.Typing(uid="bob", active=True))
        typing("typing", pb.Typing(uid="carol", active=True))
        typing("typing", pb.Typing(uid="bob", active=False))
        self.clock.advance(self.session.typingInterval)
        typing("typing", pb.Typing(uid="bob", active=True))
        self.session.onMessage(_entry("bob", "alice", b"done"))
        typing("typing", pb.Typing(uid="bob", active=True))
        self.assertEqual(
            self.lines(),
            [
                "(bob is typing...)",
                "(bob is typing...)",
                "[22:13:20] bob: done",
                "(bob is typing...)",
            ],
        )

    def test_typingRefreshed(self):
        """
        A peer that keeps typing (a signal every few seconds) is shown once;
        again after a stop, or after C{typingInterval} seconds of silence.
        """
        typing = self.client.onNotify
        for _ in range(4):
            typing("typing", pb.Typing(uid="bob", active=True))
            self.clock.advance(2.5)
        typing("typing", pb.Typing(uid="bob", active=False))
        typing("typing", pb.Typing(uid="bob", active=True))
        self.clock.advance(self.session.typingInterval)
        typing("typing", pb.Typing(uid="bob", active=True))
        self.assertEqual(self.lines(), ["(bob is typing...)"] * 3)

    def test_typingInAGroup(self):
        """
        The peer typing in a group is not shown in a 1:1 chat.
        """
        self.client.onNotify("typing", pb.Typing(uid="bob", active=True, group_id="team"))
        self.assertEqual(self.lines(), [])

    def test_noMembersAsked(self):
        """
        A 1:1 chat does not ask for group members.
        """
        protocol = FakeProtocol()
        self.client.connect(protocol)
        self.assertEqual(protocol.membersAsked, [])

    def test_kicked(self):
        """
        A kick is printed, with a hint for a replaced device, and ends the
        session with status 1.
        """
        self.client.giveUp(pb.Kicked(reason=pb.REPLACED, message="signed in again"))
        self.assertEqual(self.successResultOf(self.done), 1)
        self.assertTrue(self.client.stopped)
        [line] = self.lines()
        self.assertTrue(line.startswith("kicked: REPLACED: signed in again (another"), line)
        self.assertIn("--device", line)

    def test_tokenRefused(self):
        """
        A refused token ends the session with status 1 and a C{kicked:} line.
        """
        self.client.giveUp(RemoteError(pb.AUTH_FAILED, "authentication failed"))
        self.assertEqual(self.successResultOf(self.done), 1)
        [line] = self.lines()
        self.assertTrue(
            line.startswith("kicked: the server refused the token for alice (AUTH_FAILED"), line
        )

    def test_endOfInput(self):
        """
        End of input with nothing pending stops the client; status 0.
        """
        self.session.inputEnded()
        self.assertEqual(self.successResultOf(self.done), 0)
        self.assertTrue(self.client.stopped)

    def test_endOfInputWaitsForSends(self):
        """
        End of input waits for every send to be answered.
        """
        self.session.lineReceived(b"one")
        self.session.lineReceived(b"two")
        self.session.inputEnded()
        self.assertNoResult(self.done)
        self.client.sent[0][4].callback(pb.SendResponse())
        self.assertNoResult(self.done)
        self.client.sent[1][4].errback(RemoteError(pb.BAD_REQUEST, "no"))
        self.assertEqual(self.successResultOf(self.done), 0)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_endOfInputBounded(self):
        """
        End of input waits at most C{drainTimeout} for answers, then says
        what is unconfirmed; status 1.
        """
        self.session.lineReceived(b"one")
        self.session.inputEnded()
        self.clock.advance(self.session.drainTimeout - 0.1)
        self.assertNoResult(self.done)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(self.done), 1)
        self.assertEqual(
            self.lines(),
            ["! 1 message(s) not confirmed by the server; they may not have been sent"],
        )
        self.client.sent[0][4].callback(pb.SendResponse())

    def test_nothingAfterTheEnd(self):
        """
        Once over, the session sends and announces nothing more.
        """
        self.session.inputEnded()
        self.session.lineReceived(b"late")
        self.client.connect(FakeProtocol())
        self.session.connectFailed(OSError("refused"))
        self.assertEqual(self.client.sent, [])
        self.assertEqual(self.lines(), [])


class TypingSignalTests(SynchronousTestCase):
    """
    L{ChatSession} tells the peer (or the group) when this user types.
    """

    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.session = ChatSession(self.clock, self.client, StringIO(), "alice", "bob")
        self.session.start()

    def test_startRefreshStop(self):
        """
        Typing sends a start, nothing more for C{typingRefresh} seconds,
        then a refresh; sending the line sends a stop first.
        """
        self.session.typing()
        self.clock.advance(1)
        self.session.typing()
        self.assertEqual(self.client.typing, [("bob", True, "")])
        self.clock.advance(self.session.typingRefresh - 1)
        self.session.typing()
        self.assertEqual(self.client.typing, [("bob", True, "")] * 2)
        self.session.lineReceived(b"hello")
        self.assertEqual(self.client.typing, [("bob", True, "")] * 2 + [("bob", False, "")])
        self.assertEqual(len(self.client.sent), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle(self):
        """
        A line left alone for C{typingIdle} seconds (counted from the last
        key) sends a stop.
        """
        self.session.typing()
        self.clock.advance(2)
        self.session.typing()
        self.clock.advance(self.session.typingIdle - 0.1)
        self.assertEqual(self.client.typing, [("bob", True, "")])
        self.clock.advance(0.1)
        self.assertEqual(self.client.typing, [("bob", True, ""), ("bob", False, "")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_erased(self):
        """
        A line emptied without being sent sends a stop, once.
        """
        self.session.typing()
        self.session.typingStopped()
        self.session.typingStopped()
        self.assertEqual(self.client.typing, [("bob", True, ""), ("bob", False, "")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rate(self):
        """
        No signal follows another by less than L{chat.TYPING_MIN_GAP}
        seconds, but a stop right after a start (as the server allows).
        """
        self.session.typing()
        self.session.lineReceived(b"one")
        self.clock.advance(chat.TYPING_MIN_GAP / 2)
        self.session.typing()
        self.assertEqual(self.client.typing, [("bob", True, ""), ("bob", False, "")])
        self.clock.advance(chat.TYPING_MIN_GAP / 2)
        self.session.typing()
        self.assertEqual(
            self.client.typing, [("bob", True, ""), ("bob", False, ""), ("bob", True, "")]
        )

    def test_offline(self):
        """
        While not connected nothing is sent, and no stop follows; the next
        key once connected sends the start.
        """
        self.client.online = False
        self.session.typing()
        self.session.lineReceived(b"one")
        self.session.typing()
        self.client.online = True
        self.session.typing()
        self.assertEqual(self.client.typing, [("bob", True, "")])

    def test_group(self):
        """
        In a group the signals go to the group.
        """
        client = FakeClient()
        session = ChatSession(self.clock, client, StringIO(), "alice", None, group="team")
        session.typing()
        session.typingStopped()
        self.assertEqual(client.typing, [("", True, "team"), ("", False, "team")])

    def test_disabled(self):
        """
        With C{sendTyping=False} (C{--no-typing}) nothing is sent.
        """
        client = FakeClient()
        session = ChatSession(self.clock, client, StringIO(), "alice", "bob", sendTyping=False)
        session.typing()
        self.assertEqual(client.typing, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_end(self):
        """
        The end of input, or of the session, sends a stop.
        """
        self.session.typing()
        self.session.inputEnded()
        self.assertEqual(self.client.typing, [("bob", True, ""), ("bob", False, "")])
        client = FakeClient()
        session = ChatSession(self.clock, client, StringIO(), "alice", "bob")
        session.start()
        session.typing()
        client.giveUp(pb.Kicked(reason=pb.ADMIN))
        self.assertEqual(client.typing, [("bob", True, ""), ("bob", False, "")])
        session.typing()
        self.assertEqual(len(client.typing), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CertificateTests(SynchronousTestCase):
    """
    L{ChatSession.connectFailed} with a certificate the chat refuses, and
    L{certificateProblem}.
    """

    UNTRUSTED = SSL.Error([("SSL routines", "", "certificate verify failed")])

    def session(self, **kwargs):
        self.client = FakeClient()
        self.out = StringIO()
        session = ChatSession(
            Clock(),
            self.client,
            self.out,
            "alice",
            "bob",
            where="localhost:7443",
            host="localhost",
            **kwargs,
        )
        self.done = session.start()
        return session

    def lines(self):
        return self.out.getvalue().splitlines()[1:]

    def test_problem(self):
        """
        An untrusted certificate and one that does not name the host are
        certificate problems; other failures are not.
        """
        from service_identity import VerificationError

        self.assertEqual(certificateProblem(self.UNTRUSTED), chat.UNTRUSTED)
        self.assertEqual(certificateProblem(VerificationError(errors=[])), chat.WRONG_NAME)
        self.assertIsNone(certificateProblem(SSL.Error([("SSL routines", "", "bad")])))
        self.assertIsNone(certificateProblem(OSError("refused")))

    def test_untrusted(self):
        """
        An untrusted certificate ends the session, status 1, saying what
        was trusted and what to do.
        """
        self.session(trusted="imserver-data/tls-cert.pem").connectFailed(self.UNTRUSTED)
        self.assertEqual(self.successResultOf(self.done), 1)
        self.assertTrue(self.client.stopped)
        self.assertEqual(
            self.lines(),
            [
                "! cannot connect to localhost:7443: TLS failed: certificate verify failed",
                "! the gate's certificate is not trusted (this chat trusts"
                " imserver-data/tls-cert.pem): pass --ca FILE with the gate's certificate"
                " (or its CA's), or --data-dir DIR naming the server's data directory"
                " (which holds tls-cert.pem); or --keep-trying to try again and again",
            ],
        )

    def test_wrongName(self):
        """
        A certificate that does not name the host ends the session, status
        1, with a hint about C{--host}.
        """
        from service_identity import VerificationError

        self.session().connectFailed(VerificationError(errors=[]))
        self.assertEqual(self.successResultOf(self.done), 1)
        self.assertIn(
            "the gate's certificate does not name localhost: give --host", self.lines()[1]
        )

    def test_keepTrying(self):
        """
        With C{keepTrying} the failure is reported once, with the hint once,
        and the client keeps trying.
        """
        session = self.session(keepTrying=True)
        session.connectFailed(self.UNTRUSTED)
        session.connectFailed(self.UNTRUSTED)
        self.assertNoResult(self.done)
        self.assertFalse(self.client.stopped)
        [failed, hint] = self.lines()
        self.assertTrue(failed.endswith("certificate verify failed (still trying)"), failed)
        self.assertTrue(hint.startswith("! the gate's certificate is not trusted: pass --ca"), hint)


class GroupChatSessionTests(SynchronousTestCase):
    """
    L{ChatSession} in a group (C{--group}).
    """

    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.out = StringIO()
        self.session = ChatSession(
            self.clock,
            self.client,
            self.out,
            "alice",
            None,
            where="localhost:7443",
            localtime=time.gmtime,
            group="team",
        )
        self.done = self.session.start()

    def lines(self):
        return self.out.getvalue().splitlines()

    def test_start(self):
        """
        Starting names the group.
        """
        self.assertEqual(
            self.lines(),
            ["chat in group team as alice via localhost:7443 (Enter sends a line, Ctrl-D quits)"],
        )

    def test_send(self):
        """
        A line is sent to the group, with no recipient.
        """
        self.session.lineReceived(b"hi all")
        [(to, body, contentType, clientMsgId, d)] = self.client.sent
        self.assertEqual((to, body, contentType), ("", b"hi all", "text/plain"))
        self.assertEqual(self.client.sentGroups, ["team"])

    def test_members(self):
        """
        Once connected the members are listed, owner and admins marked;
        only on the first connection.
        """
        first = FakeProtocol("s1")
        self.client.connect(first)
        [(groupId, d)] = first.membersAsked
        self.assertEqual(groupId, "team")
        d.callback(
            [
                pb.Member(uid="alice", role=pb.ROLE_OWNER),
                pb.Member(uid="bob", role=pb.ROLE_MEMBER),
                pb.Member(uid="carol", role=pb.ROLE_ADMIN),
            ]
        )
        first.closed.callback(ConnectionDone())
        second = FakeProtocol("s2")
        self.client.connect(second)
        self.assertEqual(second.membersAsked, [])
        self.assertEqual(
            self.lines()[1:3],
            [
                "connected as alice (session s1)",
                "members of team: alice (owner), bob, carol (admin)",
            ],
        )

    def test_notMember(self):
        """
        C{NOT_MEMBER} for the member list says that lines will be refused;
        a refused line says why.
        """
        protocol = FakeProtocol()
        self.client.connect(protocol)
        protocol.membersAsked[0][1].errback(
            RemoteError(pb.NOT_MEMBER, "not a member of group 'team'")
        )
        self.session.lineReceived(b"hello?")
        self.client.sent[0][4].errback(RemoteError(pb.NOT_MEMBER, "not a member of group 'team'"))
        self.assertEqual(
            self.lines()[2:],
            [
                "! you are not a member of group team (or it does not exist):"
                " lines sent to it will be refused",
                "! send failed: NOT_MEMBER: not a member of group 'team': hello?",
            ],
        )

    def test_membersOtherError(self):
        """
        Another error answer for the member list is shown once.
        """
        protocol = FakeProtocol()
        self.client.connect(protocol)
        protocol.membersAsked[0][1].errback(RemoteError(pb.UNAVAILABLE, "later"))
        self.assertEqual(
            self.lines()[2:], ["! cannot list the members of team: UNAVAILABLE: later"]
        )

    def test_membersNotAnswered(self):
        """
        Without an answer (the connection closed first) nothing is shown,
        and the next connection asks again.
        """
        first = FakeProtocol("s1")
        self.client.connect(first)
        first.membersAsked[0][1].errback(ConnectionDone())
        first.closed.callback(ConnectionDone())
        second = FakeProtocol("s2")
        self.client.connect(second)
        self.assertEqual(len(second.membersAsked), 1)
        self.assertEqual([line for line in self.lines() if "member" in line], [])

    def test_incoming(self):
        """
        Messages in the group show sender and group; a direct message shows
        its sender only; the server's copy of a line sent here is not shown.
        """
        self.session.lineReceived(b"hi all")
        clientMsgId = self.client.sent[0][3]
        self.session.onMessage(
            _entry("alice", "", b"hi all", outgoing=True, clientMsgId=clientMsgId, groupId="team")
        )
        self.session.onMessage(_entry("bob", "", b"hello", seq=2, groupId="team"))
        self.session.onMessage(_entry("carol", "alice", b"psst", seq=3))
        self.session.onMessage(
            _entry("alice", "carol", b"later", seq=4, outgoing=True, clientMsgId="abc")
        )
        self.assertEqual(
            self.lines()[1:],
            [
                "[22:13:20] bob in team: hello",
                "[22:13:20] carol: psst",
                "[22:13:20] you (other device) to carol: later",
            ],
        )

    def test_typing(self):
        """
        Members typing in the group are shown, each at most once per
        interval and again after a message from them in the group; typing
        elsewhere, and this user's own, is not.
        """
        typing = self.client.onNotify
        typing("typing", pb.Typing(uid="bob", active=True, group_id="team"))
        typing("typing", pb.Typing(uid="carol", active=True, group_id="team"))
        typing("typing", pb.Typing(uid="bob", active=True, group_id="team"))
        typing("typing", pb.Typing(uid="bob", active=True))
        typing("typing", pb.Typing(uid="dave", active=True, group_id="other"))
        typing("typing", pb.Typing(uid="alice", active=True, group_id="team"))
        self.session.onMessage(_entry("bob", "", b"done", groupId="team"))
        typing("typing", pb.Typing(uid="bob", active=True, group_id="team"))
        typing("typing", pb.Typing(uid="carol", active=True, group_id="team"))
        self.assertEqual(
            self.lines()[1:],
            [
                "(bob is typing...)",
                "(carol is typing...)",
                "[22:13:20] bob in team: done",
                "(bob is typing...)",
            ],
        )


class RecordingSession:
    """
    Records what a L{TerminalInput} hands its session.
    """

    def __init__(self):
        self.lines = []
        self.shown = []
        self.ended = False
        self.events = []

    def lineReceived(self, line):
        self.lines.append(line)
        self.events.append(("line", line))

    def show(self, text):
        self.shown.append(text)

    def inputEnded(self):
        self.ended = True
        self.events.append(("end",))

    def typing(self):
        self.events.append(("typing",))

    def typingStopped(self):
        self.events.append(("stopped",))


class TerminalInputTests(SynchronousTestCase):
    """
    L{TerminalInput} turns standard input into lines.
    """

    def setUp(self):
        self.session = RecordingSession()
        self.input = TerminalInput(self.session)
        self.input.MAX_LENGTH = 10

    def test_lines(self):
        """
        Lines end with a newline, however the input is chunked.
        """
        self.input.dataReceived(b"one\ntw")
        self.input.dataReceived(b"o\n\nthree\n")
        self.assertEqual(self.session.lines, [b"one", b"two", b"", b"three"])

    def test_lastLine(self):
        """
        At end of input an unterminated last line is handed over, then the
        end.
        """
        self.input.dataReceived(b"one\nlast")
        self.input.readConnectionLost()
        self.assertEqual(self.session.lines, [b"one", b"last"])
        self.assertTrue(self.session.ended)

    def test_tooLongInOneChunk(self):
        """
        A line longer than C{MAX_LENGTH} is dropped whole with a note; the
        lines after it arrive.
        """
        self.input.dataReceived(b"a" * 20 + b"\nb\nc\n")
        self.assertEqual(self.session.lines, [b"b", b"c"])
        self.assertEqual(self.session.shown, ["! not sent: a line longer than 10 bytes"])

    def test_tooLongAcrossChunks(self):
        """
        A too long line arriving in pieces is dropped up to its newline, and
        noted once.
        """
        self.input.dataReceived(b"a" * 12)
        self.input.dataReceived(b"a" * 12)
        self.input.dataReceived(b"aaa\nnext\n")
        self.input.dataReceived(b"tail")
        self.input.readConnectionLost()
        self.assertEqual(self.session.lines, [b"next", b"tail"])
        self.assertEqual(len(self.session.shown), 1)

    def test_tooLongAtEnd(self):
        """
        The end of input in the middle of a too long line hands nothing over.
        """
        self.input.dataReceived(b"a" * 12)
        self.input.readConnectionLost()
        self.assertEqual(self.session.lines, [])
        self.assertTrue(self.session.ended)

    def test_closed(self):
        """
        L{TerminalInput.closed} fires when standard input and output are
        closed.
        """
        self.input.connectionLost(None)
        self.successResultOf(self.input.closed)

    def test_typing(self):
        """
        Data ending in a partial line that is not blank is the user typing.
        """
        for data in (b"he", b"llo\n", b"  ", b"\n", b"a\nb"):
            self.input.dataReceived(data)
        self.assertEqual(
            self.session.events,
            [("typing",), ("line", b"hello"), ("line", b"  "), ("line", b"a"), ("typing",)],
        )


class TerminalEditorTests(SynchronousTestCase):
    """
    L{TerminalEditor} edits lines from a terminal's keys.
    """

    def setUp(self):
        self.session = RecordingSession()
        self.editor = TerminalEditor(self.session)
        self.transport = StringTransport()
        self.editor.makeConnection(self.transport)

    def typed(self, *chunks):
        """
        Feed C{chunks}; return what was echoed.
        """
        for chunk in chunks:
            self.editor.dataReceived(chunk)
        echoed = self.transport.value()
        self.transport.clear()
        return echoed

    def test_line(self):
        """
        Keys are echoed; Enter (CR, LF or CR LF) echoes a newline and sends
        the line; the user typing is reported as the line grows (not for
        lines that arrive whole, pasted).
        """
        self.assertEqual(self.typed(b"hi", b" bo", b"b\r\n", b"x\ry\n"), b"hi bob\nx\ny\n")
        self.assertEqual(
            self.session.events,
            [("typing",), ("typing",), ("line", b"hi bob"), ("line", b"x"), ("line", b"y")],
        )

    def test_erase(self):
        """
        Backspace (DEL or BS) removes the last character, a multi-byte or
        wide one whole; emptying the line reports the typing stopped.
        """
        echoed = self.typed("a\u00e9\u6f22".encode("utf-8"), b"\x7f", b"\x08")
        self.assertEqual(echoed, "a\u00e9\u6f22".encode("utf-8") + b"\b\b  \b\b" + b"\b \b")
        self.assertEqual(self.session.events, [("typing",)])
        self.assertEqual(self.typed(b"\x7f", b"\x7f"), b"\b \b")
        self.assertEqual(self.session.events, [("typing",), ("stopped",)])
        self.assertEqual(self.typed(b"b\n"), b"b\n")
        self.assertEqual(self.session.lines, [b"b"])

    def test_killAndWordErase(self):
        """
        Ctrl-W removes the last word (and the blanks after it), Ctrl-U the
        line.
        """
        self.typed(b"one two  ")
        self.assertEqual(self.typed(b"\x17"), b"\b" * 5 + b" " * 5 + b"\b" * 5)
        self.assertEqual(self.typed(b"\x15"), b"\b" * 4 + b" " * 4 + b"\b" * 4)
        self.typed(b"three\n")
        self.assertEqual(self.session.lines, [b"three"])

    def test_tab(self):
        """
        A tab is kept; erasing it redraws the line.
        """
        self.typed(b"a\t")
        self.assertEqual(self.typed(b"\x7f"), b"\r\x1b[Ka")

    def test_ignored(self):
        """
        Escape sequences (arrows, function keys, Alt+key) and other control
        characters change nothing.
        """
        self.assertEqual(self.typed(b"a\x1b[A\x1b[1;5C\x1bOP\x1bx\x01\x1b", b"[Bb\n"), b"ab\n")
        self.assertEqual(self.session.lines, [b"ab"])

    def test_endOfFile(self):
        """
        Ctrl-D on a line that is not empty is ignored; on an empty line it
        ends the input, and later keys are ignored.
        """
        self.typed(b"a\x04")
        self.assertFalse(self.session.ended)
        self.typed(b"\x7f\x04b\n")
        self.assertTrue(self.session.ended)
        self.assertEqual(self.session.lines, [])

    def test_tooLong(self):
        """
        At C{MAX_LENGTH} bytes, more characters are refused with a bell.
        """
        self.editor.MAX_LENGTH = 3
        self.assertEqual(self.typed(b"abcd"), b"abc\x07")
        self.typed(b"\n")
        self.assertEqual(self.session.lines, [b"abc"])

    def test_ownKeys(self):
        """
        The terminal's own keys can be given.
        """
        editor = TerminalEditor(self.session, erase=(b"#",), kill=(b"@",))
        editor.makeConnection(StringTransport())
        editor.dataReceived(b"ab#c@d\n")
        self.assertEqual(self.session.lines, [b"d"])

    def test_output(self):
        """
        Output is printed above the line being edited, which is redrawn.
        """
        self.editor.write(b"first\n")
        self.assertEqual(self.typed(b"hel"), b"first\nhel")
        self.editor.write(b"[12:00:00] bob: hi\n")
        self.assertEqual(self.transport.value(), b"\r\x1b[K[12:00:00] bob: hi\nhel")
        self.transport.clear()
        self.editor.redraw()
        self.assertEqual(self.transport.value(), b"\r\x1b[Khel")

    def test_hangUp(self):
        """
        When the terminal goes, the input ends; the line being edited is not
        sent.
        """
        self.typed(b"half")
        self.editor.readConnectionLost()
        self.editor.readConnectionLost()
        self.assertEqual(self.session.events, [("typing",), ("end",)])

    def test_finish(self):
        """
        At the end a line being edited is left on its own line.
        """
        self.editor.finish()
        self.typed(b"half")
        self.editor.finish()
        self.assertEqual(self.transport.value(), b"\n")


class RawTerminalTests(SynchronousTestCase):
    """
    L{RawTerminal} on a pseudo-terminal.
    """

    def setUp(self):
        import pty

        self.master, self.slave = pty.openpty()
        self.addCleanup(os.close, self.master)
        self.addCleanup(os.close, self.slave)

    def test_enterAndRestore(self):
        """
        L{RawTerminal.enter} turns off line editing and echo, keeps signals
        and output processing, and reports the terminal's own keys;
        L{RawTerminal.restore} puts the mode back, once.
        """
        import termios

        mode = termios.tcgetattr(self.slave)
        mode[6][termios.VERASE] = b"#"
        termios.tcsetattr(self.slave, termios.TCSANOW, mode)
        before = termios.tcgetattr(self.slave)
        terminal = RawTerminal(self.slave)
        keys = terminal.enter()
        self.assertTrue(terminal.entered)
        self.assertEqual(keys["erase"], (b"#", b"\x7f", b"\x08"))
        self.assertIn(b"\x04", keys["endOfFile"])
        lflag = termios.tcgetattr(self.slave)[3]
        self.assertFalse(lflag & (termios.ICANON | termios.ECHO))
        self.assertTrue(lflag & termios.ISIG)
        self.assertEqual(termios.tcgetattr(self.slave)[6][termios.VMIN], 1)
        terminal.restore()
        self.assertFalse(terminal.entered)
        self.assertEqual(termios.tcgetattr(self.slave), before)
        terminal.restore()

    def test_notATerminal(self):
        """
        On something else L{RawTerminal.enter} raises C{termios.error}.
        """
        import termios

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertRaises(termios.error, RawTerminal(r).enter)


class FormattingTests(SynchronousTestCase):
    """
    L{describe}, L{printable} and L{bodyText}.
    """

    def test_describeKicked(self):
        """
        A kick is described by its reason name and message.
        """
        self.assertEqual(describe(pb.Kicked(reason=pb.ADMIN, message="bye")), "ADMIN: bye")
        self.assertEqual(describe(pb.Kicked(reason=pb.ADMIN)), "ADMIN")

    def test_describeRemoteError(self):
        """
        A protocol error is described by its code name and message.
        """
        self.assertEqual(describe(RemoteError(pb.UNAVAILABLE, "later")), "UNAVAILABLE: later")

    def test_describeTLS(self):
        """
        A TLS failure is described by OpenSSL's reasons.
        """
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(describe(error), "TLS failed: certificate verify failed")

    def test_describeOther(self):
        """
        Anything else is its text, or its class name when it has none.
        """
        self.assertEqual(describe(OSError("refused")), "refused")
        self.assertEqual(describe(ConnectionDone()), "Connection was closed cleanly.")
        self.assertEqual(describe(KeyError()), "KeyError")

    def test_printable(self):
        """
        Tabs stay; C0, C1, DEL and line separators become U+FFFD.
        """
        self.assertEqual(printable("a\tb\x00\x7f\x85\u2028c"), "a\tb\ufffd\ufffd\ufffd\ufffdc")

    def test_bodyText(self):
        """
        Text content types and none are decoded (invalid UTF-8 replaced).
        """
        self.assertEqual(bodyText(pb.Message(body=b"a\xff", content_type="")), "a\ufffd")
        self.assertEqual(bodyText(pb.Message(body=b"a", content_type="text/markdown")), "a")
        self.assertEqual(
            bodyText(pb.Message(body=b"{}", content_type="application/json")),
            "[2 bytes of application/json]",
        )


class WatchedEndpointTests(SynchronousTestCase):
    """
    L{_WatchedEndpoint} reports failed attempts and connections closed
    before auth.
    """

    class Endpoint:
        """
        An endpoint that answers with a prepared result.
        """

        def __init__(self, result):
            self.result = result

        def connect(self, factory):
            return self.result

    def test_connectFailed(self):
        """
        A failed attempt is reported and still fails.
        """
        error = OSError("refused")
        d = Deferred()
        endpoint = _WatchedEndpoint(self.Endpoint(d))
        reported = []
        endpoint.onFailure = reported.append
        result = endpoint.connect(None)
        d.errback(error)
        self.failureResultOf(result, OSError)
        self.assertEqual(reported, [error])

    def test_closedBeforeAuth(self):
        """
        A connection closed before auth is reported; one closed after is not.
        """
        reported = []
        protocols = []
        for session in (None, pb.AuthResponse()):
            protocol = FakeProtocol()
            protocol.session = session
            endpoint = _WatchedEndpoint(self.Endpoint(succeed(protocol)))
            endpoint.onFailure = reported.append
            self.assertIs(self.successResultOf(endpoint.connect(None)), protocol)
            protocols.append(protocol)
        reason = ConnectionDone()
        for protocol in protocols:
            protocol.closed.callback(reason)
        self.assertEqual(reported, [reason])


class OptionsTests(SynchronousTestCase):
    """
    L{ChatOptions}, L{prepare} and C{python -m imserver chat}'s exit
    statuses.
    """

    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        self.dataDir.makedirs()
        self.stderr = StringIO()
        self.patch(sys, "stderr", self.stderr)

    def parse(self, *args):
        options = ChatOptions()
        options.parseOptions(
            ["--uid", "alice", "--to", "bob", "--data-dir", self.dataDir.path] + list(args)
        )
        return options

    def writeSecret(self):
        self.dataDir.child("secret").setContent(b"0123456789abcdef0123456789abcdef\n")
        return b"0123456789abcdef0123456789abcdef"

    def test_defaults(self):
        """
        By default: localhost:7443 over TLS, device C{cli-<hostname>}.
        """
        options = self.parse()
        self.assertEqual(
            (options["host"], options["port"], options["no-tls"], options["device"]),
            ("localhost", 7443, 0, defaultDeviceId()),
        )
        self.assertTrue(defaultDeviceId().startswith("cli-"))

    def test_required(self):
        """
        C{--uid} and one of C{--to} and C{--group} are required: a usage
        error, status 2.
        """
        self.assertEqual(main(["chat", "--uid", "alice"]), 2)
        self.assertIn("--to or --group is required", self.stderr.getvalue())
        self.assertEqual(main(["chat", "--to", "bob"]), 2)
        self.assertIn("--uid is required", self.stderr.getvalue())

    def test_conflicts(self):
        """
        C{--token} with C{--token-file}, C{--ca} with C{--no-tls}, a bad
        port or uid are usage errors.
        """
        for args in (
            ["--token", "t", "--token-file", "f"],
            ["--no-tls", "--ca", "ca.pem"],
            ["--port", "0"],
            ["--device", "a\nb"],
        ):
            self.assertRaises(UsageError, self.parse, *args)
        self.assertRaises(
            UsageError, ChatOptions().parseOptions, ["--uid", "al\x00ice", "--to", "bob"]
        )

    def test_group(self):
        """
        C{--group} replaces C{--to}; giving both is a usage error, and the
        group id follows the uid rules.
        """
        options = ChatOptions()
        options.parseOptions(["--uid", "alice", "--group", "team", "--token", "t"])
        self.assertEqual((options["group"], options["to"]), ("team", None))
        config = prepare(options)
        self.assertEqual((config.group, config.peer), ("team", None))
        self.assertIsNone(self.parse()["group"])
        error = self.assertRaises(UsageError, self.parse, "--group", "team")
        self.assertIn("not both", str(error))
        self.assertRaises(
            UsageError, ChatOptions().parseOptions, ["--uid", "alice", "--group", "te\nam"]
        )

    def test_noSecretNoToken(self):
        """
        Without a token and without a secret to mint one: status 1 and an
        error telling to start the server or pass --token.
        """
        status = main(["chat", "--uid", "alice", "--to", "bob", "--data-dir", self.dataDir.path])
        self.assertEqual(status, 1)
        error = self.stderr.getvalue()
        self.assertIn("cannot mint a token for alice", error)
        self.assertIn("Start the server first", error)
        self.assertIn("--token", error)

    def test_missingSecretFile(self):
        """
        A --secret-file that does not exist is a clear error, not a
        traceback.
        """
        options = self.parse("--secret-file", self.dataDir.child("nope").path)
        error = self.assertRaises(ValueError, prepare, options)
        self.assertIn("cannot mint a token for alice", str(error))

    def test_mintedToken(self):
        """
        Without --token the token is minted, at each call, from the data
        directory's secret, for this uid.
        """
        secret = self.writeSecret()
        config = prepare(self.parse())
        token = config.token(1000.0)
        self.assertTrue(verifyToken(secret, "alice", token, 1000.0))
        self.assertFalse(verifyToken(secret, "bob", token, 1000.0))

    def test_tokenGiven(self):
        """
        --token is used as given, --token-file as its content.
        """
        self.assertEqual(prepare(self.parse("--token", "v1.2.3")).token, "v1.2.3")
        path = self.dataDir.child("alice.token")
        path.setContent(b"v1.4.5\n")
        self.assertEqual(prepare(self.parse("--token-file", path.path)).token, "v1.4.5")

    def test_tokenFileMissing(self):
        """
        A missing or empty --token-file is an error, status 1.
        """
        path = self.dataDir.child("alice.token")
        self.assertEqual(
            main(["chat", "--uid", "alice", "--to", "bob", "--token-file", path.path]), 1
        )
        self.assertIn("cannot read --token-file", self.stderr.getvalue())
        path.setContent(b"\n")
        self.assertRaises(ValueError, prepare, self.parse("--token-file", path.path))

    def test_defaultCA(self):
        """
        The data directory's certificate is trusted when it exists;
        otherwise the system's trust store (L{None}).
        """
        self.writeSecret()
        self.assertIsNone(prepare(self.parse()).trustRoot)
        from imserver.tls import ensureSelfSigned

        ensureSelfSigned(self.dataDir)
        trustRoot = prepare(self.parse()).trustRoot
        expected = self.dataDir.child(CERT_FILE_NAME).getContent()
        self.assertEqual(trustRoot.dumpPEM(), expected)
        self.assertIsNone(prepare(self.parse("--no-tls")).trustRoot)

    def test_typingAndKeepTrying(self):
        """
        Typing signals are on and certificate failures final by default;
        C{--no-typing} and C{--keep-trying} change that.
        """
        self.writeSecret()
        config = prepare(self.parse())
        self.assertEqual((config.typing, config.keepTrying), (True, False))
        config = prepare(self.parse("--no-typing", "--keep-trying"))
        self.assertEqual((config.typing, config.keepTrying), (False, True))

    def test_trusted(self):
        """
        The configuration says in words what it trusts, for messages.
        """
        self.writeSecret()
        self.assertEqual(
            prepare(self.parse()).trusted,
            "the system's CAs, since there is no " + self.dataDir.child(CERT_FILE_NAME).path,
        )
        from imserver.tls import ensureSelfSigned

        cert, _ = ensureSelfSigned(self.dataDir)
        self.assertEqual(prepare(self.parse()).trusted, cert.path)
        self.assertEqual(prepare(self.parse("--ca", cert.path)).trusted, cert.path)
        self.assertIsNone(prepare(self.parse("--no-tls")).trusted)

    def test_badCA(self):
        """
        A --ca that is missing or not a certificate is an error.
        """
        self.writeSecret()
        path = self.dataDir.child("ca.pem")
        self.assertRaises(ValueError, prepare, self.parse("--ca", path.path))
        path.setContent(b"not a certificate")
        error = self.assertRaises(ValueError, prepare, self.parse("--ca", path.path))
        self.assertIn("cannot use", str(error))


class ChatProcess(ProcessProtocol):
    """
    A C{python -m imserver chat} subprocess: collects its output and lets
    a test wait for some text in it.

    @ivar ended: fires with the exit status.
    """

    def __init__(self, name):
        self.name = name
        self.output = ""
        self.errors = ""
        self.ended = Deferred()
        self._waiting = []

    def outReceived(self, data):
        """
        Collect stdout and fire the waiters whose text arrived.
        """
        self.output += data.decode("utf-8", "replace")
        for text, d in list(self._waiting):
            if text in self.output:
                self._waiting.remove((text, d))
                d.callback(self.output)

    def errReceived(self, data):
        """
        Collect stderr.
        """
        self.errors += data.decode("utf-8", "replace")

    def waitFor(self, text, timeout=30):
        """
        @return: a L{Deferred} firing once C{text} is in stdout, or failing
            with the output so far after C{timeout} seconds.
        """
        if text in self.output:
            return succeed(self.output)
        d = Deferred()
        self._waiting.append((text, d))

        def timedOut(result, timeout):
            self._waiting.remove((text, d))
            raise AssertionError(
                "{} did not print {!r} in {} s:\n{}\n{}".format(
                    self.name, text, timeout, self.output, self.errors
                )
            )

        return d.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)

    def processEnded(self, reason):
        """
        Fire L{ended} with the exit status; fail the waiters with the
        output so far.
        """
        waiting, self._waiting = self._waiting, []
        for text, d in waiting:
            d.errback(
                AssertionError(
                    "{} ended without printing {!r}:\n{}\n{}".format(
                        self.name, text, self.output, self.errors
                    )
                )
            )
        self.ended.callback(reason.value.exitCode)


class LiveChatTests(TestCase):
    """
    Two chat processes, as two terminals, against an in-process gate on
    loopback TLS with its self-signed certificate and generated secret.
    Groups are made through the gate's store (as the HTTP API would) before
    the chats start.
    """

    timeout = 60
    #: More C{twistd im} arguments for the gate.
    gateArgs = ()

    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--store",
                "memory",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--api",
                "none",
            ]
            + list(self.gateArgs)
        )
        self.root = startServer(self, options)
        d = self.root.getServiceNamed("gate").addresses()
        return d.addCallback(self._listening)

    def _listening(self, addresses):
        self.port = addresses[0].port

    def chat(self, uid, peer=None, group=None, extra=(), usePTY=False, thenStty=False):
        """
        Start C{python -m imserver chat --uid uid --to peer} (or C{--group
        group}) on the gate's port and data directory; kill it at cleanup if
        it still runs.

        @param extra: more arguments.
        @param usePTY: run it on a pseudo-terminal, as in a terminal window
            (its standard error goes there too).
        @param thenStty: run it from C{sh}, which prints C{STTY:} and the
            terminal's mode (C{stty -a}) once it is over, and exits with
            its status.
        @return: the L{ChatProcess}.
        """
        process = ChatProcess(uid)
        env = childEnvironment()
        target = ["--to", peer] if group is None else ["--group", group]
        argv = (
            [sys.executable, "-m", "imserver", "chat", "--uid", uid]
            + target
            + ["--port", str(self.port), "--data-dir", self.dataDir.path]
            + list(extra)
        )
        executable = sys.executable
        if thenStty:
            executable = "/bin/sh"
            argv = [executable, "-c", shlex.join(argv) + "; s=$?; echo STTY:; stty -a; exit $s"]
        transport = reactor.spawnProcess(process, executable, argv, env=env, usePTY=usePTY)
        process.transport = transport
        killAtCleanup(self, process, transport)
        return process

    @inlineCallbacks
    def test_twoTerminals(self):
        """
        A line typed in alice's chat shows in bob's as C{alice: line}, and
        the answer comes back; alice's own line is not echoed; closing both
        inputs ends both with status 0.
        """
        alice = self.chat("alice", "bob")
        bob = self.chat("bob", "alice")
        yield gatherResults(
            [
                alice.waitFor("connected as alice (session "),
                bob.waitFor("connected as bob (session "),
            ]
        )
        alice.transport.write("hello bob, \u00e7a va?\n".encode("utf-8"))
        yield bob.waitFor("] alice: hello bob, \u00e7a va?\n")
        bob.transport.write(b"fine, thanks\n")
        yield alice.waitFor("] bob: fine, thanks\n")
        alice.transport.closeStdin()
        bob.transport.closeStdin()
        statuses = yield gatherResults([alice.ended, bob.ended])
        self.assertEqual(statuses, [0, 0], alice.errors + bob.errors)
        self.assertNotIn("hello bob", alice.output)
        self.assertNotIn("fine, thanks", bob.output)
        self.assertEqual(alice.errors + bob.errors, "")

    @inlineCallbacks
    def test_group(self):
        """
        Two members chatting in a group see its members, each other's lines
        as C{sender in group: line}, and a broadcast notice.
        """
        factory = self.root.getServiceNamed("gate").factory
        yield factory.groups.create("team", "Team", "alice", CREATED_MS)
        yield factory.groups.setMembers("team", [("bob", pb.ROLE_MEMBER)], CREATED_MS)
        alice = self.chat("alice", group="team")
        bob = self.chat("bob", group="team")
        yield gatherResults(
            [process.waitFor("members of team: alice (owner), bob\n") for process in (alice, bob)]
        )
        alice.transport.write(b"hello team\n")
        yield bob.waitFor("] alice in team: hello team\n")
        bob.transport.write(b"hi alice\n")
        yield alice.waitFor("] bob in team: hi alice\n")
        self.assertEqual(factory.broadcast(b"maintenance at 5", "text/plain"), 2)
        yield gatherResults(
            [process.waitFor("] notice: maintenance at 5\n") for process in (alice, bob)]
        )
        alice.transport.closeStdin()
        bob.transport.closeStdin()
        statuses = yield gatherResults([alice.ended, bob.ended])
        self.assertEqual(statuses, [0, 0], alice.errors + bob.errors)
        self.assertNotIn("hello team", alice.output)
        self.assertEqual(alice.errors + bob.errors, "")

    @inlineCallbacks
    def test_typingFromAPipe(self):
        """
        A partial line on alice's input shows C{(alice is typing...)} in
        bob's chat; the line, once complete, arrives as a message.
        """
        alice = self.chat("alice", "bob")
        bob = self.chat("bob", "alice")
        yield gatherResults(
            [
                alice.waitFor("connected as alice (session "),
                bob.waitFor("connected as bob (session "),
            ]
        )
        alice.transport.write(b"hel")
        yield bob.waitFor("(alice is typing...)\n")
        alice.transport.write(b"lo\n")
        yield bob.waitFor("] alice: hello\n")
        alice.transport.closeStdin()
        bob.transport.closeStdin()
        statuses = yield gatherResults([alice.ended, bob.ended])
        self.assertEqual(statuses, [0, 0], alice.errors + bob.errors)

    @inlineCallbacks
    def test_typingInATerminal(self):
        """
        In a terminal, alice's chat reads key by key and echoes them: the
        first keys of a line show C{(alice is typing...)} in bob's chat
        before Enter sends it; Backspace edits the line; Ctrl-D on an empty
        line quits with status 0, leaving the terminal as it was (line
        editing, echo and signals on).
        """
        alice = self.chat("alice", "bob", usePTY=True, thenStty=True)
        bob = self.chat("bob", "alice")
        yield gatherResults(
            [
                alice.waitFor("connected as alice (session "),
                bob.waitFor("connected as bob (session "),
            ]
        )
        alice.transport.write(b"hx")
        yield bob.waitFor("(alice is typing...)\n")
        yield alice.waitFor("hx")
        alice.transport.write(b"\x7fello\r")
        yield bob.waitFor("] alice: hello\n")
        bob.transport.write(b"hi alice\n")
        yield alice.waitFor("] bob: hi alice")
        alice.transport.write(b"\x04")
        bob.transport.closeStdin()
        statuses = yield gatherResults([alice.ended, bob.ended])
        self.assertEqual(statuses, [0, 0], alice.output + bob.errors)
        self.assertNotIn("Traceback", alice.output)
        modes = set(re.split(r"[\s;]+", alice.output.partition("STTY:")[2]))
        self.assertLessEqual({"icanon", "echo", "isig"}, modes, alice.output)

    @inlineCallbacks
    def test_terminalAfterSuspend(self):
        """
        After Ctrl-Z and C{fg} (the shell set its own terminal mode
        meanwhile), the chat reads key by key again and redraws the line
        being typed.
        """
        import termios

        alice = self.chat("alice", "bob", usePTY=True)
        yield alice.waitFor("connected as alice (session ")
        alice.transport.write(b"zq")
        yield alice.waitFor("zq")
        master = alice.transport.fileno()
        mode = termios.tcgetattr(master)
        self.assertFalse(mode[3] & termios.ICANON)
        mode[3] |= termios.ICANON | termios.ECHO
        termios.tcsetattr(master, termios.TCSANOW, mode)
        alice.transport.signalProcess(signal.SIGSTOP)
        alice.transport.signalProcess(signal.SIGCONT)
        yield alice.waitFor("\r\x1b[Kzq")
        self.assertFalse(termios.tcgetattr(master)[3] & (termios.ICANON | termios.ECHO))
        alice.transport.write(b"\x15\x04")
        status = yield alice.ended
        self.assertEqual(status, 0, alice.output)

    @inlineCallbacks
    def test_untrustedCertificate(self):
        """
        A chat that does not trust the gate's certificate says what to do
        and exits with status 1; with C{--keep-trying} it keeps trying.
        """
        from imserver.tls import makeSelfSigned

        other = FilePath(self.mktemp())
        other.setContent(makeSelfSigned()[0])
        alice = self.chat("alice", "bob", extra=["--ca", other.path])
        status = yield alice.ended
        self.assertEqual(status, 1, alice.output + alice.errors)
        self.assertIn(
            "! cannot connect to localhost:{}: TLS failed: certificate verify failed\n".format(
                self.port
            ),
            alice.output,
        )
        self.assertIn("(this chat trusts {}): pass --ca FILE".format(other.path), alice.output)
        self.assertIn("--data-dir DIR", alice.output)
        self.assertNotIn("still trying", alice.output)
        self.assertEqual(alice.errors, "")

        bob = self.chat("bob", "alice", extra=["--ca", other.path, "--keep-trying"])
        yield bob.waitFor("certificate verify failed (still trying)\n")
        yield bob.waitFor("pass --ca FILE")
        self.assertFalse(bob.ended.called)
        bob.transport.signalProcess("KILL")
        yield bob.ended


class LiveCertificateNameTests(TestCase):
    """
    A chat against a gate whose certificate, trusted, does not name the
    host the chat connects to.
    """

    timeout = 60
    _listening = LiveChatTests._listening
    chat = LiveChatTests.chat

    def setUp(self):
        """
        Start the gate of L{LiveChatTests} with a certificate for
        C{gate.example} only.
        """
        from imserver.tls import makeSelfSigned

        cert, key = makeSelfSigned(hostnames=("gate.example",), addresses=())
        directory = FilePath(self.mktemp())
        directory.makedirs()
        self.certPath, keyPath = directory.child("cert.pem"), directory.child("key.pem")
        self.certPath.setContent(cert)
        keyPath.setContent(key)
        self.gateArgs = ["--tls-cert", self.certPath.path, "--tls-key", keyPath.path]
        return LiveChatTests.setUp(self)

    @inlineCallbacks
    def test_wrongName(self):
        """
        The chat says to use a host name the certificate holds and exits
        with status 1.
        """
        alice = self.chat("alice", "bob", extra=["--ca", self.certPath.path])
        status = yield alice.ended
        self.assertEqual(status, 1, alice.output + alice.errors)
        self.assertIn("the gate's certificate does not name localhost: give --host", alice.output)
