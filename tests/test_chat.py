"""
Tests for C{python -m imserver chat} (L{imserver.chat}).

L{ChatSession} and L{TerminalInput} are driven with a fake client, a
L{Clock} and an L{io.StringIO}; the options and L{imserver.chat.prepare}
are checked without a reactor; two live tests run two chat processes
against an in-process gate on loopback TLS, one pair talking 1:1 and one
in a group.
"""

import sys
import time
from io import StringIO

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import tap
from imserver.__main__ import main
from imserver.auth import verifyToken
from imserver.chat import (
    ChatOptions,
    ChatSession,
    TerminalInput,
    _WatchedEndpoint,
    bodyText,
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
    """

    def __init__(self, deviceId="cli-test"):
        self.deviceId = deviceId
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


def _entry(sender, recipient, body, seq=1, outgoing=False, clientMsgId="x",
           contentType="text/plain", createdMs=CREATED_MS, groupId=""):
    return pb.InboxEntry(seq=seq, outgoing=outgoing, message=pb.Message(
        id=seq, sender=sender, recipient=recipient, group_id=groupId,
        client_msg_id=clientMsgId, body=body, content_type=contentType,
        created_ms=createdMs))


class ChatSessionTests(SynchronousTestCase):
    """
    L{ChatSession} with a fake client, a clock and a string buffer.
    """

    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.out = StringIO()
        self.session = ChatSession(self.clock, self.client, self.out, "alice", "bob",
                                   where="localhost:7443", localtime=time.gmtime)
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
        self.assertEqual(out.getvalue(),
                         "chat with bob as alice via h:1 (Enter sends a line, Ctrl-D quits)\n")

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
        self.session.onMessage(_entry("alice", "bob", b"hi bob", outgoing=True,
                                      clientMsgId=clientMsgId))
        self.assertEqual(self.lines(), [])

    def test_otherDevice(self):
        """
        The user's own message sent from another device is printed as
        C{you (other device)}; to someone else, with the recipient.
        """
        self.session.onMessage(_entry("alice", "bob", b"from my phone", outgoing=True,
                                      clientMsgId="abc"))
        self.session.onMessage(_entry("alice", "carol", b"hi carol", seq=2,
                                      outgoing=True, clientMsgId="abd"))
        self.assertEqual(self.lines(), [
            "[22:13:20] you (other device): from my phone",
            "[22:13:20] you (other device) to carol: hi carol",
        ])

    def test_earlierRunOfThisDevice(self):
        """
        The user's own message sent from this device by an earlier run is
        printed as C{you}.
        """
        clientMsgId = clientMsgIdPrefix("cli-test") + "0" * 32
        self.session.onMessage(_entry("alice", "bob", b"yesterday", outgoing=True,
                                      clientMsgId=clientMsgId))
        self.assertEqual(self.lines(), ["[22:13:20] you: yesterday"])

    def test_groupMessage(self):
        """
        A group message is printed with its group, whatever the chat is
        with; the user's own, from another device, too.
        """
        self.session.onMessage(_entry("carol", "", b"hi team", groupId="team"))
        self.session.onMessage(_entry("alice", "", b"me too", seq=2, outgoing=True,
                                      clientMsgId="abc", groupId="team"))
        self.assertEqual(self.lines(), [
            "[22:13:20] carol in team: hi team",
            "[22:13:20] you (other device) in team: me too",
        ])

    def test_systemSender(self):
        """
        A message with no sender (sent by the app backend) is printed as
        from C{(system)}.
        """
        self.session.onMessage(_entry("", "alice", b"welcome"))
        self.session.onMessage(_entry("", "", b"new rules", seq=2, groupId="team"))
        self.assertEqual(self.lines(), [
            "[22:13:20] (system): welcome",
            "[22:13:20] (system) in team: new rules",
        ])

    def test_notice(self):
        """
        A C{notice} is printed with its server time; a body that is not
        text by its size and content type.
        """
        self.client.onNotify("notice", pb.Notice(
            body=b"maintenance at 5", content_type="text/plain",
            server_time_ms=CREATED_MS + 1000))
        self.client.onNotify("notice", pb.Notice(
            body=b"{}", content_type="application/json", server_time_ms=CREATED_MS))
        self.assertEqual(self.lines(), [
            "[22:13:21] notice: maintenance at 5",
            "[22:13:20] notice: [2 bytes of application/json]",
        ])

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
        self.assertEqual(self.out.getvalue(),
                         "[22:13:20] bob: \ufffd[2Jred\ufffdx\n    one\n")

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
        self.assertEqual(self.lines(), [
            "! send failed: MESSAGE_TOO_LARGE: body above 32768 bytes: "
            + "x" * 39 + "\u2026"])

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
        self.assertEqual(self.lines(), [
            "connected as alice (session s1)",
            "disconnected (closed); reconnecting",
            "reconnected as alice (session s2)",
        ])

    def test_connectFailedOnce(self):
        """
        A failure to connect is reported once while it repeats, and again
        after a successful connection.
        """
        self.session.connectFailed(OSError("refused."))
        self.session.connectFailed(OSError("refused."))
        self.client.connect(FakeProtocol())
        self.session.connectFailed(OSError("refused."))
        self.assertEqual(self.lines(), [
            "! cannot connect to localhost:7443: refused (still trying)",
            "connected as alice (session s1)",
            "! cannot connect to localhost:7443: refused (still trying)",
        ])

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
        self.assertEqual(self.lines(), [
            "(bob is typing...)",
            "(bob is typing...)",
            "[22:13:20] bob: done",
            "(bob is typing...)",
        ])

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
        self.assertTrue(line.startswith("kicked: REPLACED: signed in again (another"),
                        line)
        self.assertIn("--device", line)

    def test_tokenRefused(self):
        """
        A refused token ends the session with status 1 and a C{kicked:} line.
        """
        self.client.giveUp(RemoteError(pb.AUTH_FAILED, "authentication failed"))
        self.assertEqual(self.successResultOf(self.done), 1)
        [line] = self.lines()
        self.assertTrue(line.startswith(
            "kicked: the server refused the token for alice (AUTH_FAILED"), line)

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
        self.assertEqual(self.lines(), [
            "! 1 message(s) not confirmed by the server; they may not have been sent"])
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


class GroupChatSessionTests(SynchronousTestCase):
    """
    L{ChatSession} in a group (C{--group}).
    """

    def setUp(self):
        self.clock = Clock()
        self.client = FakeClient()
        self.out = StringIO()
        self.session = ChatSession(self.clock, self.client, self.out, "alice", None,
                                   where="localhost:7443", localtime=time.gmtime,
                                   group="team")
        self.done = self.session.start()

    def lines(self):
        return self.out.getvalue().splitlines()

    def test_start(self):
        """
        Starting names the group.
        """
        self.assertEqual(self.lines(), [
            "chat in group team as alice via localhost:7443"
            " (Enter sends a line, Ctrl-D quits)"])

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
        d.callback([pb.Member(uid="alice", role=pb.ROLE_OWNER),
                    pb.Member(uid="bob", role=pb.ROLE_MEMBER),
                    pb.Member(uid="carol", role=pb.ROLE_ADMIN)])
        first.closed.callback(ConnectionDone())
        second = FakeProtocol("s2")
        self.client.connect(second)
        self.assertEqual(second.membersAsked, [])
        self.assertEqual(self.lines()[1:3], [
            "connected as alice (session s1)",
            "members of team: alice (owner), bob, carol (admin)",
        ])

    def test_notMember(self):
        """
        C{NOT_MEMBER} for the member list says that lines will be refused;
        a refused line says why.
        """
        protocol = FakeProtocol()
        self.client.connect(protocol)
        protocol.membersAsked[0][1].errback(
            RemoteError(pb.NOT_MEMBER, "not a member of group 'team'"))
        self.session.lineReceived(b"hello?")
        self.client.sent[0][4].errback(
            RemoteError(pb.NOT_MEMBER, "not a member of group 'team'"))
        self.assertEqual(self.lines()[2:], [
            "! you are not a member of group team (or it does not exist):"
            " lines sent to it will be refused",
            "! send failed: NOT_MEMBER: not a member of group 'team': hello?",
        ])

    def test_membersOtherError(self):
        """
        Another error answer for the member list is shown once.
        """
        protocol = FakeProtocol()
        self.client.connect(protocol)
        protocol.membersAsked[0][1].errback(RemoteError(pb.UNAVAILABLE, "later"))
        self.assertEqual(self.lines()[2:],
                         ["! cannot list the members of team: UNAVAILABLE: later"])

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
        self.session.onMessage(_entry("alice", "", b"hi all", outgoing=True,
                                      clientMsgId=clientMsgId, groupId="team"))
        self.session.onMessage(_entry("bob", "", b"hello", seq=2, groupId="team"))
        self.session.onMessage(_entry("carol", "alice", b"psst", seq=3))
        self.session.onMessage(_entry("alice", "carol", b"later", seq=4, outgoing=True,
                                      clientMsgId="abc"))
        self.assertEqual(self.lines()[1:], [
            "[22:13:20] bob in team: hello",
            "[22:13:20] carol: psst",
            "[22:13:20] you (other device) to carol: later",
        ])

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
        self.assertEqual(self.lines()[1:], [
            "(bob is typing...)",
            "(carol is typing...)",
            "[22:13:20] bob in team: done",
            "(bob is typing...)",
        ])


class RecordingSession:
    """
    Records what a L{TerminalInput} hands its session.
    """

    def __init__(self):
        self.lines = []
        self.shown = []
        self.ended = False

    def lineReceived(self, line):
        self.lines.append(line)

    def show(self, text):
        self.shown.append(text)

    def inputEnded(self):
        self.ended = True


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
        self.assertEqual(describe(RemoteError(pb.UNAVAILABLE, "later")),
                         "UNAVAILABLE: later")

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
        self.assertEqual(printable("a\tb\x00\x7f\x85\u2028c"),
                         "a\tb\ufffd\ufffd\ufffd\ufffdc")

    def test_bodyText(self):
        """
        Text content types and none are decoded (invalid UTF-8 replaced).
        """
        self.assertEqual(bodyText(pb.Message(body=b"a\xff", content_type="")), "a\ufffd")
        self.assertEqual(bodyText(pb.Message(body=b"a", content_type="text/markdown")), "a")
        self.assertEqual(bodyText(pb.Message(body=b"{}", content_type="application/json")),
                         "[2 bytes of application/json]")


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
        options.parseOptions(["--uid", "alice", "--to", "bob",
                              "--data-dir", self.dataDir.path] + list(args))
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
            ("localhost", 7443, 0, defaultDeviceId()))
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
        for args in (["--token", "t", "--token-file", "f"],
                     ["--no-tls", "--ca", "ca.pem"],
                     ["--port", "0"],
                     ["--device", "a\nb"]):
            self.assertRaises(UsageError, self.parse, *args)
        self.assertRaises(UsageError, ChatOptions().parseOptions,
                          ["--uid", "al\x00ice", "--to", "bob"])

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
        self.assertRaises(UsageError, ChatOptions().parseOptions,
                          ["--uid", "alice", "--group", "te\nam"])

    def test_noSecretNoToken(self):
        """
        Without a token and without a secret to mint one: status 1 and an
        error telling to start the server or pass --token.
        """
        status = main(["chat", "--uid", "alice", "--to", "bob",
                       "--data-dir", self.dataDir.path])
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
        self.assertEqual(main(["chat", "--uid", "alice", "--to", "bob",
                               "--token-file", path.path]), 1)
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
            raise AssertionError("{} did not print {!r} in {} s:\n{}\n{}".format(
                self.name, text, timeout, self.output, self.errors))

        return d.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)

    def processEnded(self, reason):
        """
        Fire L{ended} with the exit status; fail the waiters with the
        output so far.
        """
        waiting, self._waiting = self._waiting, []
        for text, d in waiting:
            d.errback(AssertionError("{} ended without printing {!r}:\n{}\n{}".format(
                self.name, text, self.output, self.errors)))
        self.ended.callback(reason.value.exitCode)


class LiveChatTests(TestCase):
    """
    Two chat processes, as two terminals, against an in-process gate on
    loopback TLS with its self-signed certificate and generated secret.
    Groups are made through the gate's store (as the HTTP API would) before
    the chats start.
    """

    timeout = 60

    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(["--data-dir", self.dataDir.path, "--store", "memory",
                              "--listen", "ssl:0:interface=127.0.0.1", "--api", "none"])
        self.root = startServer(self, options)
        d = self.root.getServiceNamed("gate").addresses()
        return d.addCallback(self._listening)

    def _listening(self, addresses):
        self.port = addresses[0].port

    def chat(self, uid, peer=None, group=None):
        """
        Start C{python -m imserver chat --uid uid --to peer} (or C{--group
        group}) on the gate's port and data directory; kill it at cleanup if
        it still runs.

        @return: the L{ChatProcess}.
        """
        process = ChatProcess(uid)
        env = childEnvironment()
        target = ["--to", peer] if group is None else ["--group", group]
        argv = [sys.executable, "-m", "imserver", "chat", "--uid", uid] + target + [
            "--port", str(self.port), "--data-dir", self.dataDir.path]
        transport = reactor.spawnProcess(process, sys.executable, argv, env=env)
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
        yield gatherResults([alice.waitFor("connected as alice (session "),
                             bob.waitFor("connected as bob (session ")])
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
        yield gatherResults([
            process.waitFor("members of team: alice (owner), bob\n")
            for process in (alice, bob)])
        alice.transport.write(b"hello team\n")
        yield bob.waitFor("] alice in team: hello team\n")
        bob.transport.write(b"hi alice\n")
        yield alice.waitFor("] bob in team: hi alice\n")
        self.assertEqual(factory.broadcast(b"maintenance at 5", "text/plain"), 2)
        yield gatherResults([process.waitFor("] notice: maintenance at 5\n")
                             for process in (alice, bob)])
        alice.transport.closeStdin()
        bob.transport.closeStdin()
        statuses = yield gatherResults([alice.ended, bob.ended])
        self.assertEqual(statuses, [0, 0], alice.errors + bob.errors)
        self.assertNotIn("hello team", alice.output)
        self.assertEqual(alice.errors + bob.errors, "")
