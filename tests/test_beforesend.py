# -*- test-case-name: tests.test_beforesend -*-
"""
Tests for the before-send check (L{imserver.beforesend}, C{--before-send}):
the request and answer contract (held to docs/api.md), the HTTP client's
bounds (timeout, concurrency, queue, answer size, stop), the order of a
connection's sends, how the gate applies a verdict (L{Messenger}), the
options, and end to end: the real service tree and client over loopback
TLS, asking a real C{twisted.web} receiver on loopback.
"""

import base64
import io
import json
import re
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import Clock, MemoryReactorClock
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from imserver import beforesend, tap
from imserver.auth import loadSecret, mintToken
from imserver.beforesend import (
    ALLOW,
    DEFAULT_REJECT_MESSAGE,
    MAX_REJECT_MESSAGE,
    OUTCOMES,
    REJECT,
    REPLACE,
    UNCHECKED,
    BeforeSendCheck,
    CheckFailed,
    SendOrder,
    Verdict,
    parseAnswer,
    requestBody,
)
from imserver.client import connect
from imserver.datadir import CERT_FILE_NAME
from imserver.errors import RateLimited, RemoteError, Unavailable
from imserver.httpclient import checkURL
from imserver.messaging import Messenger
from imserver.metrics import GateMetrics
from imserver.pb import im_pb2 as pb
from imserver.settings import Settings
from imserver.store.memory import MemoryMessageStore
from imserver.store.sqlite import SQLiteMessageStore
from imserver.tls import makeSelfSigned, serverOptions

from tests.support import startServer, withoutSecretEnvironment
from tests.support.frames import connectRawTLS, written
from tests.support.gate import DeliveryHarness, pushes, responses
from tests.support.live import Changes, ConnectionWatch, waitFor

DOCS = FilePath(__file__).parent().parent().child("docs")
URL = b"http://backend.example/im/before-send"
URL_LOCAL = b"http://127.0.0.1:9/check"


def apiSection():
    """
    The "Before-send check" section of docs/api.md.
    """
    text = DOCS.child("api.md").getContent().decode("utf-8")
    start = text.index("\n## Before-send check\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def jsonBlocks(section):
    """
    The JSON code blocks of C{section}, each as the list of the objects on
    its lines.
    """
    return [
        [json.loads(line) for line in block.splitlines() if line.strip()]
        for block in re.findall(r"```json\n(.*?)```", section, re.S)
    ]


def tableFirstColumn(section, header):
    """
    The backticked names of the first column of the table of C{section}
    whose header row starts with C{header}.
    """
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| " + header + " |"):
            names = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                names.append(re.match(r"\| `([^`]+)` \|", row).group(1))
            return names
    raise AssertionError("no table starting with {!r}".format(header))


def sendRequest(to="bob", groupId="", clientMsgId="m1", body=b"hello", contentType="text/plain"):
    """
    A L{pb.SendRequest}.
    """
    return pb.SendRequest(
        to=to, group_id=groupId, client_msg_id=clientMsgId, body=body, content_type=contentType
    )


class BodyTransport:
    """
    What a response body is delivered over: records C{stopProducing} (the
    connection closed, not reused).
    """

    def __init__(self):
        self.stopped = False

    def stopProducing(self):
        self.stopped = True

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


class FakeResponse:
    """
    An L{IResponse} with a status and a body, delivered at once unless
    C{hold} (then by L{finish}).
    """

    def __init__(self, code, body=b"", length=None, hold=False):
        self.code = code
        self.body = body
        self.length = len(body) if length is None else length
        self.hold = hold
        self.transport = BodyTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if not self.hold:
            self.finish()

    def finish(self):
        if self.body:
            self.protocol.dataReceived(self.body)
        self.protocol.connectionLost(Failure(ResponseDone()))


class Consumer:
    """
    Collects what a body producer writes.
    """

    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


@implementer(IAgent)
class FakeAgent:
    """
    An L{IAgent} whose requests wait until the test answers them.

    @ivar requests: C{[(method, uri, headers, body bytes, Deferred)]}.
    @ivar cancelled: the Deferreds cancelled.
    """

    def __init__(self):
        self.requests = []
        self.cancelled = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        consumer = Consumer()
        bodyProducer.startProducing(consumer)
        d = Deferred(self.cancelled.append)
        self.requests.append((method, uri, headers, consumer.data, d))
        return d

    def payload(self, index=-1):
        """
        The JSON of request C{index}.
        """
        return json.loads(self.requests[index][3])

    def answer(self, index, code=200, value=None, body=None, **kwargs):
        """
        Answer request C{index} with C{value} as JSON (or the raw C{body}).

        @return: the L{FakeResponse}.
        """
        if body is None:
            body = json.dumps(value).encode("utf-8")
        response = FakeResponse(code, body, **kwargs)
        self.requests[index][4].callback(response)
        return response


def makeCheck(testCase, failOpen=False, agent=None, clock=None, **settings):
    """
    A L{BeforeSendCheck} on a L{FakeAgent} and a L{Clock}; its log events go
    to C{testCase.events}.
    """
    testCase.agent = agent if agent is not None else FakeAgent()
    testCase.clock = clock if clock is not None else Clock()
    testCase.metrics = GateMetrics()
    testCase.events = []
    check = BeforeSendCheck(
        URL,
        testCase.agent,
        testCase.clock,
        Settings(**settings),
        testCase.metrics,
        failOpen=failOpen,
    )
    check.log = Logger(observer=testCase.events.append)
    return check


class RequestTests(SynchronousTestCase):
    """
    L{requestBody}: the JSON the backend is sent.
    """

    def test_oneToOne(self):
        """
        A 1:1 send: sender, device, C{to}, key, base64 body, content type;
        no C{group_id}.
        """
        value = json.loads(requestBody("alice", "phone", sendRequest(body=b"\x00\xffhi")))
        self.assertEqual(
            value,
            {
                "sender": "alice",
                "device_id": "phone",
                "to": "bob",
                "client_msg_id": "m1",
                "body": base64.b64encode(b"\x00\xffhi").decode("ascii"),
                "content_type": "text/plain",
            },
        )

    def test_group(self):
        """
        A group send has C{group_id} and no C{to}; an empty body and content
        type are empty strings.
        """
        value = json.loads(
            requestBody(
                "alice", "phone", sendRequest(to="", groupId="team", body=b"", contentType="")
            )
        )
        self.assertEqual(
            value,
            {
                "sender": "alice",
                "device_id": "phone",
                "group_id": "team",
                "client_msg_id": "m1",
                "body": "",
                "content_type": "",
            },
        )

    def test_unicode(self):
        """
        Identifiers are UTF-8 JSON strings, not escaped to ASCII.
        """
        data = requestBody("élodie", "téléphone", sendRequest(to="李"))
        self.assertIn("élodie".encode(), data)
        self.assertEqual(json.loads(data)["to"], "李")


class AnswerTests(SynchronousTestCase):
    """
    L{parseAnswer}: the answers the backend may give, and what is refused.
    """

    def test_allow(self):
        """
        C{allow} stores the send as it is; other members are ignored.
        """
        self.assertEqual(parseAnswer(b'{"result":"allow","extra":[1]}', 10), Verdict(ALLOW))

    def test_reject(self):
        """
        C{reject} carries the backend's message.
        """
        self.assertEqual(
            parseAnswer(b'{"result":"reject","message":"no links"}', 10),
            Verdict(REJECT, message="no links"),
        )

    def test_rejectWithoutMessage(self):
        """
        A C{reject} without a message, or with an empty one, gets the
        default message.
        """
        for data in [b'{"result":"reject"}', b'{"result":"reject","message":""}']:
            self.assertEqual(parseAnswer(data, 10).message, DEFAULT_REJECT_MESSAGE)

    def test_rejectMessageBounded(self):
        """
        A long message is cut to L{MAX_REJECT_MESSAGE} bytes of UTF-8, at a
        character boundary.
        """
        message = "é" * MAX_REJECT_MESSAGE
        verdict = parseAnswer(json.dumps({"result": "reject", "message": message}).encode(), 10)
        self.assertEqual(verdict.message, "é" * (MAX_REJECT_MESSAGE // 2))
        odd = "x" + "é" * MAX_REJECT_MESSAGE
        verdict = parseAnswer(json.dumps({"result": "reject", "message": odd}).encode(), 10)
        self.assertEqual(len(verdict.message.encode("utf-8")), MAX_REJECT_MESSAGE - 1)

    def test_replace(self):
        """
        C{replace} carries the new body, and the new content type if given.
        """
        body = base64.b64encode(b"***").decode()
        self.assertEqual(
            parseAnswer(json.dumps({"result": "replace", "body": body}).encode(), 3),
            Verdict(REPLACE, body=b"***", contentType=None),
        )
        self.assertEqual(
            parseAnswer(
                json.dumps({"result": "replace", "body": "", "content_type": "x/y"}).encode(), 3
            ),
            Verdict(REPLACE, body=b"", contentType="x/y"),
        )

    def test_malformed(self):
        """
        Anything but the documented answers is a failure of the check: not
        JSON, not an object, no or an unknown result, a message that is not
        a string, a replace without a base64 body, a body over the limit, a
        content type that is not a string or is too long.
        """
        for data in [
            b"",
            b"allow",
            b"\xff",
            b'["allow"]',
            b"{}",
            b'{"result":"ALLOW"}',
            b'{"result":null}',
            b'{"result":"reject","message":3}',
            b'{"result":"replace"}',
            b'{"result":"replace","body":"not base64!"}',
            b'{"result":"replace","body":"aGk"}',
            b'{"result":"replace","body":"\xc3\xa9"}',
            b'{"result":"replace","body":"aGVsbG8="}',
            b'{"result":"replace","body":"","content_type":1}',
            json.dumps({"result": "replace", "body": "", "content_type": "x" * 65}).encode(),
            b"[" * 100000,
        ]:
            self.assertRaises(CheckFailed, parseAnswer, data, 4)


class URLTests(SynchronousTestCase):
    """
    L{checkURL}: the C{--before-send} URLs accepted.
    """

    def test_accepted(self):
        """
        http and https URLs with a host, a port, a path and a query.
        """
        for url in [
            "http://127.0.0.1:8080/check",
            "https://backend.internal/im/before-send?x=1",
            "http://[::1]:80/",
        ]:
            self.assertEqual(checkURL(url), url.encode("ascii"))

    def test_refused(self):
        """
        Other schemes, no host, credentials, a fragment, port 0, a bad port,
        non-ASCII: refused, saying why.
        """
        for url, why in [
            ("ftp://host/x", "scheme"),
            ("backend/x", "scheme"),
            ("http:///x", "host"),
            ("http://user:pw@host/x", "password"),
            ("http://host/x#frag", "fragment"),
            ("http://host:0/x", "port 0"),
            ("http://host:99999/x", "URL"),
            ("http://hôst/x", "ASCII"),
        ]:
            e = self.assertRaises(ValueError, checkURL, url)
            self.assertIn(why, str(e), url)


class CheckTests(SynchronousTestCase):
    """
    L{BeforeSendCheck} on a fake agent and a L{Clock}.
    """

    def test_post(self):
        """
        A check POSTs the send's JSON to the URL, as C{application/json},
        and fires with the verdict; it is counted and timed.
        """
        check = makeCheck(self)
        d = check.check("alice", "phone", sendRequest())
        self.assertNoResult(d)
        [(method, uri, headers, body, _)] = self.agent.requests
        self.assertEqual((method, uri), (b"POST", URL))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertTrue(headers.getRawHeaders(b"user-agent")[0].startswith(b"imserver/"))
        self.assertEqual(body, requestBody("alice", "phone", sendRequest()))
        self.clock.advance(0.25)
        self.agent.answer(0, value={"result": "allow"})
        self.assertEqual(self.successResultOf(d), Verdict(ALLOW))
        self.assertEqual(self.metrics.beforeSendChecks["allow"], 1)
        self.assertEqual(self.metrics.beforeSendSeconds.sum, 0.25)
        self.assertEqual(check.pending, 0)

    def test_outcomesCounted(self):
        """
        Each answer is counted under its result.
        """
        check = makeCheck(self)
        answers = [
            {"result": "reject"},
            {"result": "replace", "body": ""},
            {"result": "replace", "body": ""},
        ]
        for i, answer in enumerate(answers):
            check.check("alice", "phone", sendRequest())
            self.agent.answer(i, value=answer)
        self.assertEqual(
            self.metrics.beforeSendChecks,
            dict.fromkeys(OUTCOMES, 0) | {"reject": 1, "replace": 2},
        )

    def test_timeoutClosed(self):
        """
        No answer within C{before_send_timeout}: the request is cancelled
        and, failing closed, the send is refused C{UNAVAILABLE}.
        """
        check = makeCheck(self, before_send_timeout=1.5)
        d = check.check("alice", "phone", sendRequest())
        self.clock.advance(1.4)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.agent.cancelled, [self.agent.requests[0][4]])
        self.assertEqual(self.metrics.beforeSendChecks["timeout"], 1)
        self.assertEqual(self.metrics.beforeSendChecks["error"], 0)
        self.assertEqual(check.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeoutOpen(self):
        """
        Failing open, a check that times out lets the send through
        unchecked.
        """
        check = makeCheck(self, failOpen=True)
        d = check.check("alice", "phone", sendRequest())
        self.clock.advance(2.0)
        self.assertIs(self.successResultOf(d), UNCHECKED)
        self.assertFalse(UNCHECKED.checked)

    def test_timeoutWhileReadingBody(self):
        """
        The timeout covers the answer's body too: a body that does not end
        in time fails the check and closes the connection.
        """
        check = makeCheck(self)
        d = check.check("alice", "phone", sendRequest())
        response = self.agent.answer(0, value={"result": "allow"}, hold=True)
        self.clock.advance(2.0)
        self.failureResultOf(d, Unavailable)
        self.assertTrue(response.transport.stopped)
        response.finish()  # too late: ignored

    def test_failures(self):
        """
        A status other than 200 (its body read, so the connection is
        reused), a malformed answer and a connection error are failures of
        the check, counted as C{error}: C{UNAVAILABLE} failing closed.
        """
        check = makeCheck(self)
        results = [check.check("alice", "phone", sendRequest()) for _ in range(4)]
        for index, code in enumerate((500, 204)):
            response = self.agent.answer(index, code=code, body=b"x")
            self.assertFalse(response.transport.stopped)
        self.agent.answer(2, body=b"<html>")
        self.agent.requests[3][4].errback(ConnectionRefusedError())
        for d in results:
            self.failureResultOf(d, Unavailable)
        self.assertEqual(self.metrics.beforeSendChecks["error"], 4)

    def test_failuresOpen(self):
        """
        Failing open, every failure lets the send through unchecked.
        """
        check = makeCheck(self, failOpen=True)
        d = check.check("alice", "phone", sendRequest())
        self.agent.answer(0, code=503)
        self.assertIs(self.successResultOf(d), UNCHECKED)

    def test_answerTooLong(self):
        """
        An answer longer than a replaced body of C{max_message_body} needs
        (plus L{beforesend.ANSWER_SLACK}) fails the check and closes the
        connection, whether its length is announced or not.
        """
        check = makeCheck(self, max_message_body=3 * 1024, max_frame_length=64 * 1024)
        self.assertEqual(check.answerLimit, 4 * 1024 + beforesend.ANSWER_SLACK)
        big = json.dumps({"result": "allow", "pad": "x" * check.answerLimit}).encode()
        first = check.check("alice", "phone", sendRequest())
        second = check.check("alice", "phone", sendRequest())
        announced = self.agent.answer(0, body=big)
        chunked = self.agent.answer(1, body=big, length=UNKNOWN_LENGTH)
        for d, response in [(first, announced), (second, chunked)]:
            self.failureResultOf(d, Unavailable)
            self.assertTrue(response.transport.stopped)

    def test_resentOnce(self):
        """
        A request that fails before any answer (the backend closed a
        persistent connection as it went out) is sent once more; a second
        such failure fails the check.
        """
        check = makeCheck(self)
        d = check.check("alice", "phone", sendRequest())
        self.agent.requests[0][4].errback(
            ResponseNeverReceived([Failure(ConnectionRefusedError())])
        )
        self.assertNoResult(d)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(self.agent.requests[1][3], self.agent.requests[0][3])
        self.agent.requests[1][4].errback(
            ResponseNeverReceived([Failure(ConnectionRefusedError())])
        )
        self.failureResultOf(d, Unavailable)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(self.metrics.beforeSendChecks["error"], 1)

    def test_concurrencyAndQueue(self):
        """
        At most C{before_send_concurrency} requests are in flight; the next
        sends wait in the queue, first come first served, and start as
        slots free up; a send finding the queue full is refused
        C{RATE_LIMITED} at once, failing open or not.
        """
        check = makeCheck(self, failOpen=True, before_send_concurrency=2, before_send_queue=2)
        results = [check.check("alice", "phone", sendRequest(clientMsgId=str(i))) for i in range(5)]
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual((check.inFlight, len(check.queued), check.pending), (2, 2, 4))
        self.failureResultOf(results[4], RateLimited)
        self.assertEqual(self.metrics.beforeSendChecks["queue_full"], 1)
        self.assertEqual(self.metrics.rateLimited, 1)
        self.agent.answer(1, value={"result": "allow"})
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(self.agent.payload()["client_msg_id"], "2")
        self.agent.answer(0, value={"result": "allow"})
        self.assertEqual(self.agent.payload()["client_msg_id"], "3")
        self.assertEqual((check.inFlight, len(check.queued)), (2, 0))

    def test_timeoutIncludesQueue(self):
        """
        The timeout counts from the send's arrival, its wait in the queue
        included: a send that waited 1 s of its 2 s for a slot gets 1 s
        for its request.
        """
        check = makeCheck(self, failOpen=True, before_send_concurrency=1)
        first = check.check("alice", "phone", sendRequest(clientMsgId="1"))
        self.clock.advance(1.0)
        second = check.check("alice", "phone", sendRequest(clientMsgId="2"))
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(first), UNCHECKED)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertNoResult(second)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(second), UNCHECKED)
        self.assertEqual(self.agent.cancelled, [r[4] for r in self.agent.requests])
        self.assertEqual(self.metrics.beforeSendChecks["timeout"], 2)

    def test_warningsThrottled(self):
        """
        Failures are logged at most once per L{beforesend.WARN_INTERVAL}, the
        next warning counting the ones left out.
        """
        check = makeCheck(self)
        results = []
        for _ in range(3):
            results.append(check.check("alice", "phone", sendRequest()))
            self.agent.requests[-1][4].errback(ConnectionRefusedError())
        self.assertEqual(len(self.events), 1)
        self.clock.advance(beforesend.WARN_INTERVAL)
        results.append(check.check("alice", "phone", sendRequest()))
        self.agent.answer(-1, code=500)
        for d in results:
            self.failureResultOf(d, Unavailable)
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.events[1]["others"], 2)
        self.assertIn("HTTP status 500", self.events[1]["why"])
        self.assertEqual(self.events[1]["policy"], "refused UNAVAILABLE")

    def test_stop(self):
        """
        Stopping refuses what waits, queued or in flight, C{UNAVAILABLE}
        even failing open, cancels the requests and leaves no timer; later
        sends are refused at once.
        """
        check = makeCheck(self, failOpen=True, before_send_concurrency=1)
        inFlight = check.check("alice", "phone", sendRequest())
        queued = check.check("alice", "phone", sendRequest())
        check.stop()
        self.failureResultOf(inFlight, Unavailable)
        self.failureResultOf(queued, Unavailable)
        self.assertEqual(self.agent.cancelled, [self.agent.requests[0][4]])
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(check.pending, 0)
        self.failureResultOf(check.check("alice", "phone", sendRequest()), Unavailable)


class SendOrderTests(SynchronousTestCase):
    """
    L{SendOrder}: a connection's sends are handed on in the order received.
    """

    def test_inOrder(self):
        """
        A later check that answers first waits for the earlier ones; a
        failed check takes its turn too; then each outcome fires.
        """
        order = SendOrder()
        checks = [Deferred() for _ in range(3)]
        proceeded = []

        def proceed(verdict, name):
            proceeded.append((name, verdict if not isinstance(verdict, Failure) else "failed"))
            return name

        results = [order.add(d, proceed, name) for d, name in zip(checks, "abc")]
        checks[2].callback("allow-c")
        checks[1].errback(Unavailable("down"))
        self.assertEqual(proceeded, [])
        self.assertEqual(len(order), 3)
        checks[0].callback("allow-a")
        self.assertEqual(proceeded, [("a", "allow-a"), ("b", "failed"), ("c", "allow-c")])
        self.assertEqual([self.successResultOf(d) for d in results], ["a", "b", "c"])
        self.assertEqual(len(order), 0)

    def test_outcome(self):
        """
        What C{proceed} returns, raises or fails with is the send's outcome.
        """
        order = SendOrder()

        def raising(verdict):
            raise Unavailable("store down")

        self.failureResultOf(order.add(succeed(1), raising), Unavailable)
        self.failureResultOf(order.add(succeed(1), lambda v: fail(RateLimited())), RateLimited)
        self.assertEqual(self.successResultOf(order.add(succeed(1), lambda v: v + 1)), 2)


class GateTests(SynchronousTestCase):
    """
    The gate with a before-send check (a fake agent), on a L{Clock}:
    what clients are answered and what is stored.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        check = makeCheck(self, clock=self.gate.clock)
        self.metrics = check.metrics = self.gate.factory.metrics
        self.gate.factory.messenger.beforeSend = check
        self.alice, self.aliceT, _, _ = self.gate.login("alice")
        self.bob, self.bobT, _, _ = self.gate.login("bob")

    def send(self, clientMsgId, body=b"hi", to="bob", groupId="", contentType=""):
        """
        Send from alice (pipelined: nothing waits for the answer).
        """
        self.gate.seq += 1
        self.gate.request(
            self.alice,
            "send",
            sendRequest(
                to=to, groupId=groupId, clientMsgId=clientMsgId, body=body, contentType=contentType
            ),
            seq=self.gate.seq,
        )

    def answers(self):
        """
        The send responses alice got since the last call: C{[(seq, error
        code or SendResponse)]}.
        """
        return [
            (f.seq, f.error.code if f.HasField("error") else pb.SendResponse.FromString(f.body))
            for f in responses(written(self.aliceT))
        ]

    def test_pipelinedInOrder(self):
        """
        Two sends pipelined on one connection are stored in the order
        received even when the second's check answers first; both checks
        run at once.
        """
        self.send("m1", b"first")
        self.send("m2", b"second")
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.answer(1, value={"result": "allow"})
        self.assertEqual(self.answers(), [])
        self.agent.answer(0, value={"result": "allow"})
        [(seq1, first), (seq2, second)] = self.answers()
        self.assertEqual((seq1, seq2), (101, 102))
        self.assertLess(first.seq, second.seq)
        self.assertEqual(
            [e.message.body for e in pushes(written(self.bobT))], [b"first", b"second"]
        )

    def test_rejected(self):
        """
        A rejected send is answered C{REJECTED} with the backend's message;
        nothing is stored or pushed, and the key is still free.
        """
        self.send("m1")
        self.agent.answer(0, value={"result": "reject", "message": "no links please"})
        [frame] = responses(written(self.aliceT))
        self.assertEqual((frame.error.code, frame.error.message), (pb.REJECTED, "no links please"))
        self.assertEqual(pushes(written(self.bobT)), [])
        self.assertEqual(self.successResultOf(self.gate.store.head("bob")), 0)
        self.send("m1")
        self.agent.answer(1, value={"result": "allow"})
        [(_, response)] = self.answers()
        self.assertFalse(response.duplicate)

    def test_rejectedRetryOfStored(self):
        """
        A retry of a stored message gets its original answer even if the
        backend now rejects it: idempotency is the store's.
        """
        self.send("m1", b"original")
        self.agent.answer(0, value={"result": "allow"})
        [(_, original)] = self.answers()
        self.send("m1", b"again")
        self.agent.answer(1, value={"result": "reject", "message": "muted"})
        [(_, retry)] = self.answers()
        self.assertTrue(retry.duplicate)
        self.assertEqual(
            (retry.message_id, retry.seq, retry.server_time_ms),
            (original.message_id, original.seq, original.server_time_ms),
        )
        self.assertEqual(self.metrics.dedupHits, 1)
        self.assertEqual([e.message.body for e in pushes(written(self.bobT))], [b"original"])

    def test_replacedRetryOfStored(self):
        """
        A retry the backend now answers with another body keeps the stored
        message: the dedup answer, nothing new pushed.
        """
        self.send("m1", b"original")
        self.agent.answer(0, value={"result": "allow"})
        self.answers()
        written(self.bobT)
        self.send("m1", b"original")
        self.agent.answer(1, value={"result": "replace", "body": "eA=="})
        [(_, retry)] = self.answers()
        self.assertTrue(retry.duplicate)
        self.assertEqual(pushes(written(self.bobT)), [])

    def test_replaced(self):
        """
        A replaced send stores the backend's body and content type: the
        recipient and the sender's own copy get them.
        """
        self.send("m1", b"damn", contentType="text/plain")
        self.agent.answer(
            0,
            value={
                "result": "replace",
                "body": base64.b64encode(b"d**n").decode(),
                "content_type": "text/x-redacted",
            },
        )
        [(_, response)] = self.answers()
        self.assertFalse(response.duplicate)
        [entry] = pushes(written(self.bobT))
        self.assertEqual(
            (entry.message.body, entry.message.content_type), (b"d**n", "text/x-redacted")
        )
        [own] = self.successResultOf(self.gate.store.fetch("alice", 0, 10))
        self.assertEqual((own.message.body, own.outgoing), (b"d**n", True))

    def test_replacedKeepsContentType(self):
        """
        Without a C{content_type} the replacement keeps the client's.
        """
        self.send("m1", b"x", contentType="text/plain")
        self.agent.answer(0, value={"result": "replace", "body": "eQ=="})
        [entry] = pushes(written(self.bobT))
        self.assertEqual((entry.message.body, entry.message.content_type), (b"y", "text/plain"))

    def test_invalidNotChecked(self):
        """
        An invalid send is refused as without the check, before the backend
        is asked.
        """
        self.send("m1", body=b"x" * (self.gate.settings.max_message_body + 1))
        self.send("", body=b"x")
        self.send("m3", to="bob", groupId="team")
        self.assertEqual(
            [code for _, code in self.answers()],
            [pb.MESSAGE_TOO_LARGE, pb.BAD_REQUEST, pb.BAD_REQUEST],
        )
        self.assertEqual(self.agent.requests, [])

    def test_unavailable(self):
        """
        A check that fails (closed) is answered C{UNAVAILABLE}; nothing is
        stored.
        """
        self.send("m1")
        self.agent.answer(0, code=502)
        self.assertEqual(self.answers(), [(101, pb.UNAVAILABLE)])
        self.assertEqual(self.successResultOf(self.gate.store.head("bob")), 0)

    def test_rateLimited(self):
        """
        A send that finds the check's queue full is answered
        C{RATE_LIMITED}, in its turn.
        """
        check = self.gate.factory.messenger.beforeSend
        check.concurrency, check.queueLimit = 1, 0
        self.send("m1")
        self.send("m2")
        self.assertEqual(self.answers(), [])
        self.agent.answer(0, value={"result": "allow"})
        [(_, first), second] = self.answers()
        self.assertIsInstance(first, pb.SendResponse)
        self.assertEqual(second, (102, pb.RATE_LIMITED))

    def test_group(self):
        """
        A group send is checked with its C{group_id}, then stored for the
        members.
        """
        store = self.gate.store
        self.successResultOf(store.createGroup("team", "Team", "alice", 0))
        self.successResultOf(store.setMembers("team", [("bob", pb.ROLE_MEMBER)], 10, 0))
        self.send("g1", b"all", to="", groupId="team")
        self.assertEqual(self.agent.payload()["group_id"], "team")
        self.assertNotIn("to", self.agent.payload())
        self.agent.answer(0, value={"result": "allow"})
        [entry] = pushes(written(self.bobT))
        self.assertEqual((entry.message.group_id, entry.message.body), ("team", b"all"))

    def test_senderIsAuthenticated(self):
        """
        The backend is told the connection's uid and device id.
        """
        self.send("m1")
        self.assertEqual(
            (self.agent.payload()["sender"], self.agent.payload()["device_id"]),
            ("alice", "phone"),
        )

    def test_off(self):
        """
        Without a check, a send is stored at once and nothing is asked.
        """
        gate = DeliveryHarness(self)
        self.assertIsNone(gate.factory.messenger.beforeSend)
        alice, aliceT, _, _ = gate.login("alice")
        gate.send(alice, "bob", "m1")
        [frame] = responses(written(aliceT))
        self.assertFalse(frame.HasField("error"))
        self.assertIsNone(alice.session._sendOrder)


class ProbeTestsMixin:
    """
    L{Messenger.storedBefore} on each message store: it finds a stored
    key and stores nothing for an unknown one (it relies on the
    documented order of L{IMessageStore.deliver}: dedup first, then the
    group).  Subclasses make the store in C{makeStore}.
    """

    @inlineCallbacks
    def setUp(self):
        self.store = yield self.makeStore()
        self.messenger = Messenger(self.store, None, Clock(), Settings(), GateMetrics())

    @inlineCallbacks
    def test_unknownKey(self):
        """
        An unknown key: L{None}, nothing stored, the key still free.
        """
        found = yield self.messenger.storedBefore("alice", "m1")
        self.assertIsNone(found)
        head = yield self.store.head("alice")
        self.assertEqual(head, 0)
        delivery = yield self.store.deliver("alice", "m1", pb.Message(body=b"x"), ["bob"], 1000)
        self.assertFalse(delivery.duplicate)
        self.assertEqual(set(delivery.seqs), {"alice", "bob"})

    @inlineCallbacks
    def test_storedKey(self):
        """
        A stored key, 1:1 or group: the original's delivery, as a
        duplicate; nothing more stored.
        """
        original = yield self.store.deliver(
            "alice", "m1", pb.Message(recipient="bob", body=b"x"), ["bob"], 1000
        )
        yield self.store.createGroup("team", "Team", "alice", 1000)
        group = yield self.store.deliver("alice", "g1", pb.Message(group_id="team"), [], 1000)
        for key, stored in [("m1", original), ("g1", group)]:
            found = yield self.messenger.storedBefore("alice", key)
            self.assertTrue(found.duplicate)
            self.assertEqual(found.message.id, stored.message.id)
            self.assertEqual(found.seqs["alice"], stored.seqs["alice"])
        head = yield self.store.head("alice")
        self.assertEqual(head, group.seqs["alice"])


class MemoryProbeTests(ProbeTestsMixin, TestCase):
    """
    The probe on the memory store.
    """

    def makeStore(self):
        return MemoryMessageStore()


class SQLiteProbeTests(ProbeTestsMixin, TestCase):
    """
    The probe on the SQLite store (operations inline).
    """

    def makeStore(self):
        store = SQLiteMessageStore(self.mktemp(), None, 24 * 3600 * 1000, threaded=False)
        store.startService()
        self.addCleanup(store.stopService)
        return store


class RedisProbeTests(ProbeTestsMixin, TestCase):
    """
    The probe on the Redis store, against a real C{redis-server}.
    """

    timeout = 30

    @inlineCallbacks
    def makeStore(self):
        from imserver.redisclient import RedisURL, connectRedis
        from imserver.store.redis import RedisMessageStore

        from tests.support.redis import RedisServer, whenConnected

        server = RedisServer(self, reactor)
        yield server.start()
        connection = connectRedis(reactor, RedisURL.parse(server.url))
        self.addCleanup(connection.disconnect)
        yield whenConnected(connection)
        return RedisMessageStore(connection, reactor, 24 * 3600 * 1000)


class MetricsTests(SynchronousTestCase):
    """
    The check's metrics on C{/metrics}.
    """

    def test_collected(self):
        """
        The checks by outcome, their latency, and the sends waiting.
        """
        check = makeCheck(self)
        self.metrics.watchBeforeSend(check)
        check.check("alice", "phone", sendRequest())
        families = {f.name: f for f in self.metrics.collect()}
        checks = families["imserver_before_send_checks"]
        self.assertEqual(
            sorted(s.labels["result"] for s in checks.samples if s.name.endswith("_total")),
            sorted(OUTCOMES),
        )
        self.assertEqual(families["imserver_before_send_pending"].samples[0].value, 1)
        self.assertIn("imserver_before_send_seconds", families)


class DocumentTests(SynchronousTestCase):
    """
    docs/api.md, docs/protocol.md and the clients say what the code does.
    """

    def test_requestExamples(self):
        """
        The request examples of docs/api.md have exactly the members the
        gate sends (1:1, then group), and the field table lists them all.
        """
        [oneToOne, group] = jsonBlocks(apiSection())[0]
        self.assertEqual(
            set(oneToOne),
            set(json.loads(requestBody("a", "d", sendRequest()))),
        )
        self.assertEqual(
            set(group),
            set(json.loads(requestBody("a", "d", sendRequest(to="", groupId="g")))),
        )
        self.assertEqual(set(tableFirstColumn(apiSection(), "Field")), set(oneToOne) | set(group))

    def test_answerExamples(self):
        """
        The answer examples of docs/api.md are accepted, with the results
        the answer table lists.
        """
        answers = jsonBlocks(apiSection())[1]
        verdicts = [parseAnswer(json.dumps(a).encode(), 32768) for a in answers]
        self.assertEqual([v.result for v in verdicts], [ALLOW, REJECT, REPLACE])
        self.assertEqual(tableFirstColumn(apiSection(), "`result`"), [ALLOW, REJECT, REPLACE])

    def test_metricOutcomes(self):
        """
        docs/api.md lists every outcome label of the checks' counter.
        """
        text = DOCS.child("api.md").getContent().decode("utf-8")
        row = next(
            line for line in text.splitlines() if "imserver_before_send_checks_total" in line
        )
        for outcome in OUTCOMES:
            self.assertIn("`{}`".format(outcome), row)

    def test_javaScriptErrorNames(self):
        """
        The JavaScript client names every error code of the protocol.
        """
        script = (
            (FilePath(beforesend.__file__).sibling("web").child("static").child("imserver.js"))
            .getContent()
            .decode("utf-8")
        )
        names = dict(
            (int(number), name)
            for number, name in re.findall(r'^  (\d+): "([A-Z_]+)",$', script, re.M)
        )
        self.assertEqual(names, {v: k for k, v in pb.ErrorCode.items()})

    def test_rejectedFinal(self):
        """
        The clients give up a send refused C{REJECTED}.
        """
        from imserver.client import imclient

        self.assertIn(pb.REJECTED, imclient._FINAL_SEND_ERRORS)
        script = (
            (FilePath(beforesend.__file__).sibling("web").child("static").child("imserver.js"))
            .getContent()
            .decode("utf-8")
        )
        [final] = re.findall(r"const FINAL_SEND_ERRORS = new Set\(\[(.*?)\]\)", script, re.S)
        self.assertIn('"REJECTED"', final)


class OptionsTests(SynchronousTestCase):
    """
    C{--before-send}, C{--before-send-failure}, C{--before-send-ca} of
    C{twistd im}.
    """

    def options(self, *args):
        withoutSecretEnvironment(self)
        options = tap.Options()
        options.parseOptions(
            ["--data-dir", self.mktemp(), "--store", "memory", "--api", "none"] + list(args)
        )
        return options

    def test_off(self):
        """
        Off by default (and with C{none}): no check, no service.
        """
        for args in [(), ("--before-send", "none")]:
            options = self.options(*args)
            self.assertIsNone(options.beforeSendURL)
            root = tap.makeService(options, reactor=MemoryReactorClock())
            self.assertIsNone(root.getServiceNamed("gate").factory.messenger.beforeSend)
            self.assertRaises(KeyError, root.getServiceNamed, "before-send")

    def test_on(self):
        """
        C{--before-send URL} gives the messenger a check, failing closed by
        default, with the settings; its service stops after the gate.
        """
        options = self.options(
            "--before-send", "http://127.0.0.1:9/check", "--before-send-timeout", "0.5"
        )
        root = tap.makeService(options, reactor=MemoryReactorClock())
        check = root.getServiceNamed("gate").factory.messenger.beforeSend
        self.assertIsInstance(check, BeforeSendCheck)
        self.assertEqual((check.url, check.timeout, check.failOpen), (URL_LOCAL, 0.5, False))
        services = list(root)
        self.assertLess(
            services.index(root.getServiceNamed("before-send")),
            services.index(root.getServiceNamed("gate")),
        )
        options = self.options(
            "--before-send", "https://b.example/", "--before-send-failure", "open"
        )
        root = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertTrue(root.getServiceNamed("gate").factory.messenger.beforeSend.failOpen)

    def test_refused(self):
        """
        A bad URL, failure policy or CA file stops the gate at start,
        naming the option.
        """
        ca = FilePath(self.mktemp())
        ca.setContent(b"not a certificate")
        for args, option in [
            (["--before-send", "ftp://x/"], "--before-send ftp://x/"),
            (["--before-send", "http://u:p@x/"], "--before-send"),
            (
                ["--before-send", "http://x/", "--before-send-failure", "maybe"],
                "--before-send-failure",
            ),
            (["--before-send-ca", ca.path], "--before-send-ca"),
            (["--before-send", "http://x/", "--before-send-ca", ca.path], "--before-send-ca"),
            (["--before-send", "https://x/", "--before-send-ca", ca.path], "--before-send-ca"),
            (
                ["--before-send", "https://x/", "--before-send-ca", ca.path + ".no"],
                "--before-send-ca",
            ),
            (["--before-send-timeout", "0"], "--before-send-timeout"),
            (["--before-send-concurrency", "0"], "--before-send-concurrency"),
        ]:
            e = self.assertRaises(UsageError, self.options, *args)
            self.assertIn(option, str(e), args)

    def test_ca(self):
        """
        A PEM certificate is accepted as C{--before-send-ca}.
        """
        ca = FilePath(self.mktemp())
        ca.setContent(makeSelfSigned()[0])
        options = self.options("--before-send", "https://localhost/", "--before-send-ca", ca.path)
        self.assertEqual(options.beforeSendURL, b"https://localhost/")


class Receiver(Resource):
    """
    The app backend's before-send endpoint: records each request's JSON and
    answers with C{self.answer(value)}: C{(status, body bytes)}, or
    L{None} to never answer.
    """

    isLeaf = True

    def __init__(self):
        Resource.__init__(self)
        self.requests = []
        self.hanging = []
        self.changes = Changes()
        self.answer = lambda value: (200, b'{"result":"allow"}')

    def render_POST(self, request):
        self.requests.append(
            (request.getHeader("content-type"), json.loads(request.content.read()))
        )
        self.changes.changed()
        result = self.answer(self.requests[-1][1])
        if result is None:
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        status, body = result
        request.setResponseCode(status)
        return body


class TrackingFactory(WrappingFactory):
    """
    Tells when the wrapped server has no connection left.
    """

    def __init__(self, wrapped):
        WrappingFactory.__init__(self, wrapped)
        self._idle = []

    def unregisterProtocol(self, p):
        WrappingFactory.unregisterProtocol(self, p)
        if not self.protocols:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def whenIdle(self):
        """
        @return: a L{Deferred} firing once no connection is open.
        """
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d


class EndToEndTests(TestCase):
    """
    The real gate (L{tap.makeService}) and client over loopback TLS, with a
    real C{twisted.web} receiver on loopback as the app backend.
    """

    timeout = 30

    def startReceiver(self, tls=False):
        """
        Start the receiver on 127.0.0.1 (TLS with a self-signed certificate
        for localhost if C{tls}); stop it at cleanup, once its connections
        are closed.

        @return: its URL.
        """
        self.receiver = Receiver()
        site = Site(self.receiver)
        site.noisy = False
        tracking = TrackingFactory(site)
        if tls:
            cert, key = makeSelfSigned()
            self.receiverCA = FilePath(self.mktemp())
            self.receiverCA.setContent(cert)
            port = reactor.listenSSL(0, tracking, serverOptions(cert, key), interface="127.0.0.1")
        else:
            port = reactor.listenTCP(0, tracking, interface="127.0.0.1")

        @inlineCallbacks
        def stop():
            yield tracking.whenIdle()
            yield port.stopListening()

        self.addCleanup(stop)
        scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
        return "{}://{}:{}/im/before-send".format(scheme, host, port.getHost().port)

    @inlineCallbacks
    def startGate(self, *args, url=True, tls=False, ca=True):
        """
        Start the receiver, then the gate with it as its before-send check
        (unless not C{url}; over TLS if C{tls}, with its certificate as
        C{--before-send-ca} if C{ca}), and C{args}.
        """
        receiverURL = self.startReceiver(tls=tls)
        if tls and ca:
            args += ("--before-send-ca", self.receiverCA.path)
        dataDir = FilePath(self.mktemp())
        withoutSecretEnvironment(self)
        options = tap.Options()
        argv = ["--data-dir", dataDir.path, "--listen", "ssl:0:interface=127.0.0.1"]
        argv += ["--api", "none", "--store", "memory"]
        if url:
            argv += ["--before-send", receiverURL]
        options.parseOptions(argv + list(args))
        self.root = startServer(self, options)
        self.gate = self.root.getServiceNamed("gate")
        self.factory = self.gate.factory
        self.watch = ConnectionWatch(self, self.factory)
        [address] = yield self.gate.addresses()
        self.port = address.port
        self.caFile = dataDir.child(CERT_FILE_NAME).path
        self.secret = loadSecret(dataDir)

    def connect(self, uid):
        """
        Connect and authenticate C{uid} with the real client; record its
        pushes in C{self.pushed[uid]}.
        """
        self.pushed = getattr(self, "pushed", {})
        self.changes = getattr(self, "changes", Changes())
        pushed = self.pushed[uid] = []

        def onNotify(name, message):
            if name == "message":
                pushed.append(message)
                self.changes.changed()

        d = connect(
            reactor,
            "localhost",
            self.port,
            uid=uid,
            deviceId="phone",
            token=mintToken(self.secret, uid, 60, time.time()),
            caFile=self.caFile,
            onNotify=onNotify,
        )

        def closeAtCleanup(client):
            self.addCleanup(client.close)
            return client

        return d.addCallback(closeAtCleanup)

    @inlineCallbacks
    def closeAll(self, *clients):
        """
        Close C{clients} and wait for the server's side of each.
        """
        for client in clients:
            yield client.close()
        yield self.watch.whenAllClosed()

    def received(self, uid, count):
        """
        @return: a L{Deferred} firing once C{uid} was pushed C{count}
            entries.
        """
        return self.changes.until(
            lambda: len(self.pushed[uid]) >= count, 10, "{} pushes to {}".format(count, uid)
        )

    @inlineCallbacks
    def test_allow(self):
        """
        An allowed send is stored and pushed; the receiver got the
        documented JSON, as C{application/json}.
        """
        yield self.startGate()
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        response = yield alice.send("bob", b"hello", "m1", contentType="text/plain")
        self.assertFalse(response.duplicate)
        yield self.received("bob", 1)
        self.assertEqual(self.pushed["bob"][0].message.body, b"hello")
        [(contentType, value)] = self.receiver.requests
        self.assertEqual(contentType, "application/json")
        [documented, _] = jsonBlocks(apiSection())[0]
        self.assertEqual(set(value), set(documented))
        self.assertEqual(
            value,
            {
                "sender": "alice",
                "device_id": "phone",
                "to": "bob",
                "client_msg_id": "m1",
                "body": "aGVsbG8=",
                "content_type": "text/plain",
            },
        )
        yield self.closeAll(alice, bob)

    @inlineCallbacks
    def test_reject(self):
        """
        A rejection reaches the client as C{REJECTED} with the backend's
        message; nothing is pushed.
        """
        yield self.startGate()
        self.receiver.answer = lambda value: (
            200,
            json.dumps(
                {"result": "reject", "message": "no spam, {}".format(value["sender"])}
            ).encode(),
        )
        alice = yield self.connect("alice")
        e = yield self.assertFailure(alice.send("bob", b"buy now", "m1"), RemoteError)
        self.assertEqual((e.code, e.message), (pb.REJECTED, "no spam, alice"))
        head = yield self.factory.store.head("bob")
        self.assertEqual(head, 0)
        yield self.closeAll(alice)

    @inlineCallbacks
    def test_rawClient(self):
        """
        A raw client written from docs/protocol.md pipelines two sends
        behind its auth: the one the backend rejects is answered with an
        error RESPONSE C{REJECTED} (32) and the backend's message, the next
        one is stored; the answers come back in the order sent.
        """
        yield self.startGate()
        self.receiver.answer = lambda value: (
            (200, b'{"result":"reject","message":"no spam"}')
            if base64.b64decode(value["body"]) == b"buy now"
            else (200, b'{"result":"allow"}')
        )
        client = yield connectRawTLS(self, self.port, FilePath(self.caFile))
        token = mintToken(self.secret, "alice", 60, time.time())
        client.send(1, "auth", pb.AuthRequest(uid="alice", token=token, device_id="raw"))
        client.send(2, "send", pb.SendRequest(to="bob", client_msg_id="m1", body=b"buy now"))
        client.send(3, "send", pb.SendRequest(to="bob", client_msg_id="m2", body=b"hello"))
        auth, rejected, stored = yield client.responses(3)
        self.assertEqual([f.seq for f in (auth, rejected, stored)], [1, 2, 3])
        self.assertFalse(auth.HasField("error"))
        self.assertEqual(pb.REJECTED, 32)
        self.assertEqual((rejected.error.code, rejected.error.message), (pb.REJECTED, "no spam"))
        self.assertFalse(stored.HasField("error"))
        head = yield self.factory.store.head("bob")
        self.assertEqual(head, 1)

    @inlineCallbacks
    def test_replace(self):
        """
        A replaced body reaches the recipient and the sender's own devices.
        """
        yield self.startGate()
        self.receiver.answer = lambda value: (
            200,
            json.dumps(
                {
                    "result": "replace",
                    "body": base64.b64encode(base64.b64decode(value["body"]).upper()).decode(),
                    "content_type": "text/upper",
                }
            ).encode(),
        )
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        yield alice.send("bob", b"quiet please", "m1")
        yield self.received("bob", 1)
        yield self.received("alice", 1)
        for uid, outgoing in [("bob", False), ("alice", True)]:
            [entry] = self.pushed[uid]
            self.assertEqual(
                (entry.message.body, entry.message.content_type, entry.outgoing),
                (b"QUIET PLEASE", "text/upper", outgoing),
            )
        yield self.closeAll(alice, bob)

    @inlineCallbacks
    def test_group(self):
        """
        A group send is checked with its C{group_id} and stored for the
        members.
        """
        yield self.startGate()
        store = self.factory.store
        yield store.createGroup("team", "Team", "alice", 0)
        yield store.setMembers("team", [("bob", pb.ROLE_MEMBER)], 10, 0)
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        yield alice.send("", b"hi all", "g1", groupId="team")
        yield self.received("bob", 1)
        self.assertEqual(self.pushed["bob"][0].message.group_id, "team")
        [(_, value)] = self.receiver.requests
        [_, documented] = jsonBlocks(apiSection())[0]
        self.assertEqual(set(value), set(documented))
        self.assertEqual(value["group_id"], "team")
        yield self.closeAll(alice, bob)

    @inlineCallbacks
    def test_hangClosed(self):
        """
        A backend that does not answer within the timeout: failing closed,
        the send is refused C{UNAVAILABLE} and nothing is stored.
        """
        yield self.startGate("--before-send-timeout", "0.2")
        self.receiver.answer = lambda value: None
        alice = yield self.connect("alice")
        e = yield self.assertFailure(alice.send("bob", b"x", "m1"), RemoteError)
        self.assertEqual(e.code, pb.UNAVAILABLE)
        head = yield self.factory.store.head("bob")
        self.assertEqual(head, 0)
        self.assertEqual(self.factory.metrics.beforeSendChecks["timeout"], 1)
        yield self.closeAll(alice)

    @inlineCallbacks
    def test_hangOpen(self):
        """
        Failing open, a send the backend does not answer in time is stored
        unchecked.
        """
        yield self.startGate("--before-send-timeout", "0.2", "--before-send-failure", "open")
        self.receiver.answer = lambda value: None
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        response = yield alice.send("bob", b"unchecked", "m1")
        self.assertFalse(response.duplicate)
        yield self.received("bob", 1)
        self.assertEqual(self.pushed["bob"][0].message.body, b"unchecked")
        yield self.closeAll(alice, bob)

    @inlineCallbacks
    def test_errorsClosed(self):
        """
        A 500 and a garbage answer are failures: C{UNAVAILABLE}; the client
        retry with the same key is stored once the backend allows it.
        """
        yield self.startGate()
        answers = [(500, b"oops"), (200, b"<html>garbage</html>"), (200, b'{"result":"allow"}')]
        self.receiver.answer = lambda value: answers.pop(0)
        alice = yield self.connect("alice")
        for _ in range(2):
            e = yield self.assertFailure(alice.send("bob", b"x", "m1"), RemoteError)
            self.assertEqual(e.code, pb.UNAVAILABLE)
        response = yield alice.send("bob", b"x", "m1")
        self.assertFalse(response.duplicate)
        self.assertEqual(self.factory.metrics.beforeSendChecks["error"], 2)
        self.assertEqual(len(self.receiver.requests), 3)
        yield self.closeAll(alice)

    @inlineCallbacks
    def test_pipelined(self):
        """
        Sends pipelined on one connection are stored in the order sent,
        though the backend answers the first one last.
        """
        yield self.startGate()
        waiting = []

        def answer(value):
            if value["client_msg_id"] == "m1":
                waiting.append(value)
                return None
            return (200, b'{"result":"allow"}')

        self.receiver.answer = answer
        alice = yield self.connect("alice")
        bob = yield self.connect("bob")
        first = alice.send("bob", b"1", "m1")
        second = alice.send("bob", b"2", "m2")
        yield self.receiver.changes.until(lambda: len(self.receiver.requests) == 2, 10)
        # The gate has the second verdict (and holds it) before the first.
        checks = self.factory.metrics.beforeSendChecks
        yield waitFor(lambda: checks["allow"] == 1, 10)
        head = yield self.factory.store.head("bob")
        self.assertEqual(head, 0)
        [request] = self.receiver.hanging
        request.write(b'{"result":"allow"}')
        request.finish()
        responses_ = [(yield first), (yield second)]
        self.assertLess(responses_[0].seq, responses_[1].seq)
        yield self.received("bob", 2)
        self.assertEqual([e.message.body for e in self.pushed["bob"]], [b"1", b"2"])
        yield self.closeAll(alice, bob)

    @inlineCallbacks
    def test_https(self):
        """
        An https:// URL is verified with C{--before-send-ca}: sends are
        checked over TLS.
        """
        yield self.startGate(tls=True)
        alice = yield self.connect("alice")
        response = yield alice.send("bob", b"x", "m1")
        self.assertFalse(response.duplicate)
        self.assertEqual(len(self.receiver.requests), 1)
        yield self.closeAll(alice)

    @inlineCallbacks
    def test_httpsUnverified(self):
        """
        A backend whose certificate the gate cannot verify (the system's
        trust store does not know it) is never asked: the TLS handshake
        fails, and so does the check.
        """
        yield self.startGate(tls=True, ca=False)
        alice = yield self.connect("alice")
        e = yield self.assertFailure(alice.send("bob", b"x", "m1"), RemoteError)
        self.assertEqual(e.code, pb.UNAVAILABLE)
        self.assertEqual(self.receiver.requests, [])
        self.assertEqual(self.factory.metrics.beforeSendChecks["error"], 1)
        yield self.closeAll(alice)

    @inlineCallbacks
    def test_off(self):
        """
        Without C{--before-send} the backend is never asked.
        """
        yield self.startGate(url=False)
        alice = yield self.connect("alice")
        yield alice.send("bob", b"x", "m1")
        self.assertEqual(self.receiver.requests, [])
        self.assertIsNone(self.factory.messenger.beforeSend)
        yield self.closeAll(alice)


class FakeRequest:
    """
    What L{AllowAll.render_POST} reads and sets of a request.
    """

    def __init__(self, body):
        self.content = io.BytesIO(body)
        self.code = 200
        self.headers = {}

    def setResponseCode(self, code):
        self.code = code

    def setHeader(self, name, value):
        self.headers[name] = value


class BenchTests(TestCase):
    """
    C{im-bench p2p --before-send}: the allow-all backend, and a short run
    through it.
    """

    timeout = 60

    def test_allowAll(self):
        """
        The bench's backend allows every before-send request, and refuses
        what is not one.
        """
        from imserver.bench.allowall import ALLOW as ANSWER, AllowAll

        resource = AllowAll()
        request = FakeRequest(requestBody("a", "d", sendRequest()))
        self.assertEqual(resource.render_POST(request), ANSWER)
        self.assertEqual(parseAnswer(ANSWER, 10), Verdict(ALLOW))
        self.assertEqual(request.headers[b"content-type"], b"application/json")
        for body in [b"", b"[]", b"{}", b"\xff"]:
            request = FakeRequest(body)
            resource.render_POST(request)
            self.assertEqual(request.code, 400)
        self.assertEqual(resource.checks, 5)

    @inlineCallbacks
    def test_p2p(self):
        """
        A second of p2p with the check: every send goes through the
        backend, nothing fails, and the backend's CPU is reported.
        """
        from imserver.bench.coordinator import Coordinator
        from imserver.bench.p2p import P2P

        options = P2P.Options()
        options.parseOptions(
            ["--users", "6", "--duration", "1", "--warmup", "0.3", "--no-reference"]
            + ["--before-send", "--server-cpu", "", "--client-cpu", ""]
        )
        err = io.StringIO()
        outcome = yield Coordinator(reactor, P2P(options), err=err).run()
        result = outcome.result
        self.assertEqual(result["errors"], 0, err.getvalue())
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertIn("before_send_backend_cpu_percent", result)
        self.assertIn("before_send", result)
        self.assertIn("before-send backend at http://127.0.0.1:", err.getvalue())
