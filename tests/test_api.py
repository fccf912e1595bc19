"""
Tests for the HTTP API (L{imserver.api}), its service (L{imserver.service.
ApiService}, L{imserver.service.AdvertiseService}), its options
(L{imserver.tap}), its documents (docs/openapi.yaml, docs/api.md) and the
JSON log lines (L{imserver.logs}).

The live tests start the real service tree (L{imserver.tap.makeService})
in this process on OS-chosen loopback ports, with plain TCP listeners and
the memory store, and talk to it with a real HTTP client
(L{twisted.web.client.Agent}) and the real IM client (L{imserver.client}).
Every test waits for its connections to close before it finishes.
"""

import base64
import hashlib
import json
import os
import random
import re
import stat
import sys
import time
from io import BytesIO, StringIO
from urllib.parse import quote

import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imserver import __version__, api, logs, tap
from imserver.auth import loadSecret, mintToken, verifyToken
from imserver.client import connect
from imserver.errors import BadRequest, MessageTooLarge, NotMember, RateLimited, Unavailable
from imserver.framing import FrameProtocol
from imserver.interfaces import IGateDirectory
from imserver.pb import im_pb2 as pb
from imserver.service import AdvertiseService, ApiService, advertisedAddresses
from imserver.spawn import TwistdProcess

from tests.support import killAtCleanup, serverEnvironment, startServer, withoutSecretEnvironment

LOOPBACK = "tcp:0:interface=127.0.0.1"
DOCS = FilePath(__file__).parent().parent().child("docs")
#: The API's body limit in the live tests (small, so 413 is cheap to reach).
MAX_BODY = 4096
#: The maximum group size in the live tests.
MAX_GROUP = 3


def _mode(path):
    """
    The permission bits of the file at C{path} (a L{FilePath}).
    """
    return stat.S_IMODE(os.stat(path.path).st_mode)


class Notifications:
    """
    Records the notifications an IM client receives and lets a test wait
    for them.
    """

    def __init__(self):
        self.received = []
        self._waiters = []

    def __call__(self, name, message):
        """
        Record one notification; wake the waiters it satisfies.
        """
        self.received.append((name, message))
        waiters, self._waiters = self._waiters, []
        for name, count, d in waiters:
            self._check(name, count, d)

    def named(self, name):
        """
        @return: the messages of the notifications named C{name}, in order.
        """
        return [message for n, message in self.received if n == name]

    def wait(self, name, count=1):
        """
        @return: a L{Deferred} firing with the messages of the first
            C{count} notifications named C{name}, once received.
        """
        d = Deferred()
        self._check(name, count, d)
        return d

    def _check(self, name, count, d):
        found = self.named(name)
        if len(found) >= count:
            d.callback(found[:count])
        else:
            self._waiters.append((name, count, d))


class RawClient(Protocol):
    """
    Writes bytes, collects what comes back until the server closes.

    @ivar closed: a L{Deferred} firing with everything received once the
        connection is closed.
    """

    def __init__(self):
        self.data = b""
        self.closed = Deferred()

    def dataReceived(self, data):
        """
        Collect.
        """
        self.data += data

    def connectionLost(self, reason):
        """
        Fire L{closed}.
        """
        self.closed.callback(self.data)


@implementer(IBodyProducer)
class ChunkedProducer:
    """
    A request body of unknown length (sent chunked), written at once.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, data):
        self.data = data

    def startProducing(self, consumer):
        """
        Write the whole body.
        """
        consumer.write(self.data)
        return succeed(None)

    def stopProducing(self):
        """
        Nothing to stop.
        """

    def pauseProducing(self):
        """
        Nothing to pause.
        """

    def resumeProducing(self):
        """
        Nothing to resume.
        """


class LiveApiTestCase(TestCase):
    """
    A gate with its HTTP API, started in this process on loopback.

    @ivar extraArgs: more C{twistd im} arguments for the gate.
    """

    timeout = 30
    extraArgs = ()

    @inlineCallbacks
    def setUp(self):
        """
        Start the gate (plain TCP, memory store, small limits) and its API
        on OS-chosen loopback ports; stop it at cleanup.
        """
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--listen",
                LOOPBACK,
                "--api",
                LOOPBACK,
                "--store",
                "memory",
                "--api-max-body",
                str(MAX_BODY),
                "--max-group-size",
                str(MAX_GROUP),
                "--max-message-body",
                "1000",
                "--gate-id",
                "gate-1",
            ]
            + list(self.extraArgs)
        )
        self.root = root = startServer(self, options)
        self.gate = root.getServiceNamed("gate")
        self.factory = self.gate.factory
        self.apiService = root.getServiceNamed("api")
        [address] = yield self.gate.addresses()
        self.clientPort = address.port
        port = yield self.apiService.whenListening()
        self.apiPort = port.getHost().port
        self.adminToken = self.dataDir.child("admin-token").getContent().strip()
        self.secret = loadSecret(self.dataDir, environ={})
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(self.pool.closeCachedConnections)

    def url(self, path):
        """
        The API URL of C{path}.
        """
        return "http://127.0.0.1:{}{}".format(self.apiPort, path).encode("ascii")

    @inlineCallbacks
    def call(self, method, path, body=None, token=True, headers=(), raw=None, producer=None):
        """
        Make one request to the API.

        @param body: an object sent as JSON, or L{None}.
        @param token: L{True} for the admin token, L{False} for none, or
            the raw C{Authorization} header value.
        @param raw: raw body bytes (instead of C{body}).
        @return: a L{Deferred} firing with C{(response, parsed JSON body)}.
        """
        if isinstance(method, str):
            method = method.encode("ascii")
        h = Headers()
        if token is True:
            h.addRawHeader(b"Authorization", b"Bearer " + self.adminToken)
        elif token:
            h.addRawHeader(b"Authorization", token)
        for name, value in headers:
            h.addRawHeader(name, value)
        if body is not None:
            raw = json.dumps(body).encode("utf-8")
        if raw is not None:
            h.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(BytesIO(raw))
        response = yield self.agent.request(method, self.url(path), h, producer)
        data = yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return response, json.loads(data)

    @inlineCallbacks
    def ok(self, method, path, body=None, status=200, **kwargs):
        """
        Make a request that must succeed with C{status}.

        @return: a L{Deferred} firing with the parsed answer.
        """
        response, answer = yield self.call(method, path, body, **kwargs)
        self.assertEqual(response.code, status, answer)
        return answer

    @inlineCallbacks
    def fails(self, method, path, body=None, status=400, code="BAD_REQUEST", **kwargs):
        """
        Make a request that must fail with C{status} and error C{code}.

        @return: a L{Deferred} firing with C{(response, error message)}.
        """
        response, answer = yield self.call(method, path, body, **kwargs)
        self.assertEqual(response.code, status, answer)
        self.assertEqual(list(answer), ["error"])
        self.assertEqual(answer["error"]["code"], code, answer)
        self.assertEqual(api.ERROR_CODES[code], status)
        self.assertIsInstance(answer["error"]["message"], str)
        return response, answer["error"]["message"]

    def push(self, body, key="key-1", **kwargs):
        """
        C{POST /v1/messages} with C{body} and the idempotency key C{key};
        must succeed.
        """
        return self.ok(
            "POST",
            "/v1/messages",
            body,
            headers=[(b"Idempotency-Key", key.encode("utf-8"))],
            **kwargs,
        )

    def token(self, uid):
        """
        A client token for C{uid}, valid for a minute.
        """
        return mintToken(self.secret, uid, 60, time.time())

    @inlineCallbacks
    def connectClient(self, uid, deviceId="laptop", token=None, platform=pb.DESKTOP):
        """
        Connect and authenticate a real IM client; closed at cleanup.

        @return: a L{Deferred} firing with C{(client, Notifications)}.
        """
        notifications = Notifications()
        client = yield connect(
            reactor,
            "127.0.0.1",
            self.clientPort,
            uid=uid,
            token=token or self.token(uid),
            deviceId=deviceId,
            platform=platform,
            onNotify=notifications,
            tls=False,
        )
        self.addCleanup(client.close)
        return client, notifications


class DocumentTests(SynchronousTestCase):
    """
    docs/openapi.yaml and docs/api.md describe exactly the routes and error
    codes of L{imserver.api}.
    """

    def openapi(self):
        """
        The parsed OpenAPI document.
        """
        return yaml.safe_load(DOCS.child("openapi.yaml").getContent())

    def served(self):
        """
        What the API site of C{twistd im} serves: the routes and the
        resources mounted beside them (C{/metrics}).

        @return: C{(set of (method, path), set of public paths)}
        """
        withoutSecretEnvironment(self)
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp(), "--store", "memory"])
        root = tap.makeService(options, reactor=MemoryReactorClock())
        mounted = root.getServiceNamed("api").site.resource.mounted
        routes = {(method, template) for method, template, name in api.ROUTES}
        routes |= {(method, path) for path, methods in mounted.items() for method in methods}
        public = {p.decode("ascii") for p in api.PUBLIC_PATHS} | set(mounted)
        return routes, public

    def test_openapiRoutesMatch(self):
        """
        Every route of L{api.ROUTES} is an operation of the OpenAPI
        document, and every operation of the document is a route.
        """
        document = self.openapi()
        self.assertTrue(document["openapi"].startswith("3.1"))
        documented = set()
        for path, item in document["paths"].items():
            for method in item:
                if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                    documented.add((method.upper(), path))
        routes = self.served()[0]
        self.assertEqual(sorted(routes - documented), [], "routes missing from the document")
        self.assertEqual(sorted(documented - routes), [], "documented routes that do not exist")

    def test_openapiPublicRoutes(self):
        """
        The document marks exactly the public paths (and mounted resources)
        as needing no token.
        """
        document = self.openapi()
        self.assertEqual(document["security"], [{"adminToken": []}])
        public = set()
        for path, item in document["paths"].items():
            for _method, operation in item.items():
                if isinstance(operation, dict) and operation.get("security") == []:
                    public.add(path)
        self.assertEqual(public, self.served()[1])

    def test_openapiReferences(self):
        """
        Every C{$ref} of the document points at something it defines.
        """
        document = self.openapi()
        refs = []

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "$ref":
                        refs.append(value)
                    else:
                        walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(document)
        self.assertTrue(refs)
        for ref in refs:
            self.assertTrue(ref.startswith("#/"), ref)
            node = document
            for part in ref[2:].split("/"):
                self.assertIn(part, node, ref)
                node = node[part]

    def test_openapiErrorCodes(self):
        """
        The document's error code enumeration is L{api.ERROR_CODES}.
        """
        schema = self.openapi()["components"]["schemas"]["Error"]
        codes = schema["properties"]["error"]["properties"]["code"]["enum"]
        self.assertEqual(sorted(codes), sorted(api.ERROR_CODES))

    def test_apiDocument(self):
        """
        docs/api.md shows every route and lists every error code with its
        status.
        """
        text = DOCS.child("api.md").getContent().decode("utf-8")
        for method, template in self.served()[0]:
            self.assertIn("{} {}".format(method, template), text)
        for code, status in api.ERROR_CODES.items():
            self.assertRegex(text, r"\| `{}` \| {} \|".format(code, status))


class AuthTests(LiveApiTestCase):
    """
    The admin token guards every route but C{/health}.
    """

    @inlineCallbacks
    def test_noToken(self):
        """
        Without C{Authorization} the answer is 401 C{UNAUTHORIZED} with a
        C{WWW-Authenticate: Bearer} challenge.
        """
        response, message = yield self.fails(
            b"GET", "/v1/stats", status=401, code="UNAUTHORIZED", token=False
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"WWW-Authenticate"), [b'Bearer realm="imserver"']
        )

    @inlineCallbacks
    def test_wrongToken(self):
        """
        A wrong token, another scheme, a token with a suffix or an empty
        one are all 401.
        """
        for value in [
            b"Bearer nope",
            b"Basic " + self.adminToken,
            b"Bearer " + self.adminToken + b"x",
            b"Bearer ",
            self.adminToken,
        ]:
            yield self.fails(b"GET", "/v1/stats", status=401, code="UNAUTHORIZED", token=value)

    @inlineCallbacks
    def test_everyRouteNeedsToken(self):
        """
        Every route but C{/health} (and C{/health/live}, C{/health/ready}),
        and unknown paths, answer 401 without the token (so the routes
        cannot be probed without it).
        """
        for method, template, _name in api.ROUTES + (("GET", "/nowhere", None),):
            if template.encode("ascii") in api.PUBLIC_PATHS:
                continue
            path = template.replace("{uid}", "alice").replace("{group_id}", "g")
            yield self.fails(
                method.encode("ascii"), path, status=401, code="UNAUTHORIZED", token=False
            )

    @inlineCallbacks
    def test_schemeCaseInsensitive(self):
        """
        The C{Bearer} scheme name is case-insensitive.
        """
        answer = yield self.ok(b"GET", "/v1/stats", token=b"bearer " + self.adminToken)
        self.assertEqual(answer["gate_id"], "gate-1")

    @inlineCallbacks
    def test_health(self):
        """
        C{GET /health}, C{/health/live} and C{/health/ready} need no token.
        """
        for path in ("/health", "/health/live", "/health/ready"):
            answer = yield self.ok(b"GET", path, token=False)
            self.assertEqual(answer, {"status": "ok"})


class HealthTests(LiveApiTestCase):
    """
    Liveness (C{/health}, C{/health/live}) and readiness (C{/health/ready}).
    """

    @inlineCallbacks
    def assertReadiness(self, ready, message=None):
        """
        C{/health} and C{/health/live} answer 200; C{/health/ready} 200 if
        C{ready}, else 503 C{UNAVAILABLE} with C{Retry-After} and
        C{message}.
        """
        for path in ("/health", "/health/live"):
            answer = yield self.ok(b"GET", path, token=False)
            self.assertEqual(answer, {"status": "ok"})
        if ready:
            answer = yield self.ok(b"GET", "/health/ready", token=False)
            self.assertEqual(answer, {"status": "ok"})
        else:
            response, text = yield self.fails(
                b"GET", "/health/ready", status=503, code="UNAVAILABLE", token=False
            )
            self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])
            self.assertEqual(text, message)

    @inlineCallbacks
    def test_ready(self):
        """
        With the store answering, the gate is live and ready; the readiness
        check reads the store.
        """
        reads = []
        head = self.factory.store.head
        self.patch(self.factory.store, "head", lambda uid: reads.append(uid) or head(uid))
        yield self.assertReadiness(True)
        self.assertEqual(reads, [""])

    @inlineCallbacks
    def test_storeUnavailable(self):
        """
        While the store fails with L{Unavailable}, the gate is live but not
        ready; ready again once the store answers.
        """
        from twisted.internet.defer import fail

        head = self.factory.store.head
        self.patch(
            self.factory.store, "head", lambda uid: fail(Unavailable("Redis is unavailable"))
        )
        yield self.assertReadiness(False, "not ready: the message store is unavailable")
        self.patch(self.factory.store, "head", head)
        yield self.assertReadiness(True)

    @inlineCallbacks
    def test_storeSilent(self):
        """
        A store that does not answer within L{api.handlers.READY_TIMEOUT}
        seconds is not ready.
        """
        self.patch(api.handlers, "READY_TIMEOUT", 0.05)
        self.patch(self.factory.store, "head", lambda uid: Deferred())
        yield self.assertReadiness(
            False, "not ready: the message store did not answer within 0.05 s"
        )

    @inlineCallbacks
    def test_storeBroken(self):
        """
        Any other failure of the store is not ready either, and is logged.
        """

        def head(uid):
            raise RuntimeError("disk on fire")

        self.patch(self.factory.store, "head", head)
        yield self.assertReadiness(False, "not ready: the message store is unavailable")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ClusterHealthTests(TestCase):
    """
    Readiness in cluster mode follows Redis: a gate with a real
    C{redis-server} is not ready while Redis is down, and live throughout.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        """
        Start Redis, then a gate in cluster mode with its API on loopback.
        """
        from tests.support.redis import RedisServer

        withoutSecretEnvironment(self)
        self.redis = RedisServer(self, reactor, appendfsync=None)
        yield self.redis.start()
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--listen",
                LOOPBACK,
                "--api",
                LOOPBACK,
                "--redis",
                self.redis.url,
                "--gate-id",
                "gate-1",
            ]
        )
        root = startServer(self, options)
        port = yield root.getServiceNamed("api").whenListening()
        self.apiPort = port.getHost().port
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(self.pool.closeCachedConnections)

    @inlineCallbacks
    def status(self, path):
        """
        @return: a L{Deferred} firing with the status and JSON answer of
            C{GET path}.
        """
        url = "http://127.0.0.1:{}{}".format(self.apiPort, path).encode("ascii")
        response = yield self.agent.request(b"GET", url)
        body = yield readBody(response)
        return response.code, json.loads(body)

    @inlineCallbacks
    def waitFor(self, code, seconds=20):
        """
        Ask C{/health/ready} every 50 ms until it answers C{code}.

        @return: a L{Deferred} firing with the last answer.
        """
        deadline = reactor.seconds() + seconds
        while True:
            status, answer = yield self.status("/health/ready")
            if status == code or reactor.seconds() > deadline:
                self.assertEqual(status, code, answer)
                return answer
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def test_redisDown(self):
        """
        Ready with Redis up; 503 C{UNAVAILABLE} once Redis stops, while
        C{/health} stays 200; ready again once Redis is back.
        """
        yield self.waitFor(200)
        yield self.redis.stop()
        answer = yield self.waitFor(503)
        self.assertEqual(answer["error"]["code"], "UNAVAILABLE")
        for path in ("/health", "/health/live"):
            status, answer = yield self.status(path)
            self.assertEqual((status, answer), (200, {"status": "ok"}))
        yield self.redis.start()
        yield self.waitFor(200)


class MetricsTests(LiveApiTestCase):
    """
    C{GET /metrics}: the gate's Prometheus metrics, without a token.
    """

    @inlineCallbacks
    def scrape(self):
        response = yield self.agent.request(b"GET", self.url("/metrics"))
        self.assertEqual(response.code, 200)
        text = (yield readBody(response)).decode("utf-8")
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    @inlineCallbacks
    def test_movesUnderTraffic(self):
        """
        The IM metrics count what happens: a connection, a stored message,
        its push and ack; process metrics are there too.
        """
        before = yield self.scrape()
        self.assertEqual(before["imserver_messages_stored_total"], 0)
        self.assertIn("process_resident_memory_bytes", before)
        client, notifications = yield self.connectClient("bob")
        yield self.push({"to": "bob", "text": "hi"})
        [entry] = yield notifications.wait("message")
        client.ack(entry.seq)
        yield client.ping()  # the ack is read before the ping's answer
        after = yield self.scrape()
        self.assertEqual(after["imserver_messages_stored_total"], 1)
        self.assertEqual(after["imserver_messages_pushed_total"], 1)
        self.assertEqual(after["imserver_messages_acked_total"], 1)
        self.assertEqual(after['imserver_connections{state="authenticated"}'], 1)
        self.assertGreater(after["imserver_frames_received_total"], 0)
        self.assertEqual(after["imserver_send_to_push_seconds_count"], 1)


class ErrorTests(LiveApiTestCase):
    """
    Routing and body errors are JSON errors with their codes.
    """

    @inlineCallbacks
    def test_notFound(self):
        """
        An unknown path is 404 C{NOT_FOUND}; so is a known one with a
        trailing slash or an extra segment.
        """
        for path in ["/", "/v2/stats", "/v1/stats/", "/v1/users/alice/presence/x"]:
            yield self.fails(b"GET", path, status=404, code="NOT_FOUND")

    @inlineCallbacks
    def test_methodNotAllowed(self):
        """
        A known path with another method is 405 C{METHOD_NOT_ALLOWED} with
        an C{Allow} header listing the methods it takes.
        """
        response, message = yield self.fails(
            b"PUT", "/v1/groups/g", status=405, code="METHOD_NOT_ALLOWED"
        )
        self.assertEqual(response.headers.getRawHeaders(b"Allow"), [b"DELETE, GET"])
        response, message = yield self.fails(
            b"GET", "/v1/messages", status=405, code="METHOD_NOT_ALLOWED"
        )
        self.assertEqual(response.headers.getRawHeaders(b"Allow"), [b"POST"])
        response, message = yield self.fails(
            b"POST", "/health", status=405, code="METHOD_NOT_ALLOWED", token=False
        )
        self.assertEqual(response.headers.getRawHeaders(b"Allow"), [b"GET"])

    @inlineCallbacks
    def test_badJSON(self):
        """
        A body that is not JSON, not a JSON object, or holds NaN, is 400.
        """
        for raw in [b"{", b"[1, 2]", b'"text"', b'{"uid": NaN}', b"\xff\xfe{"]:
            yield self.fails(b"POST", "/v1/tokens", raw=raw)

    @inlineCallbacks
    def test_unknownField(self):
        """
        A field the route does not know is 400, naming it.
        """
        response, message = yield self.fails(b"POST", "/v1/tokens", {"uid": "alice", "tll": 5})
        self.assertIn("tll", message)

    @inlineCallbacks
    def test_badPathEncoding(self):
        """
        A path segment that is not UTF-8 once percent-decoded is 400.
        """
        yield self.fails(b"GET", "/v1/users/%FF/presence")

    @inlineCallbacks
    def test_bodyAtLimit(self):
        """
        A body of exactly C{--api-max-body} bytes is read.
        """
        raw = json.dumps({"uid": "alice"}).encode("ascii")
        raw += b" " * (MAX_BODY - len(raw))
        answer = yield self.ok(b"POST", "/v1/tokens", raw=raw)
        self.assertEqual(answer["uid"], "alice")

    @inlineCallbacks
    def test_contentLengthTooLarge(self):
        """
        A C{Content-Length} above C{--api-max-body} is 413
        C{PAYLOAD_TOO_LARGE}, and the connection is closed.
        """
        raw = b" " * (MAX_BODY + 1)
        response, message = yield self.fails(
            b"POST", "/v1/tokens", raw=raw, status=413, code="PAYLOAD_TOO_LARGE"
        )
        self.assertIn(str(MAX_BODY), message)
        # The API still answers.
        yield self.ok(b"GET", "/health", token=False)

    @inlineCallbacks
    def test_chunkedTooLarge(self):
        """
        A chunked body (no C{Content-Length}) is refused with 413 once it
        grows past the limit.
        """
        yield self.fails(
            b"POST",
            "/v1/tokens",
            producer=ChunkedProducer(b" " * (MAX_BODY + 10)),
            status=413,
            code="PAYLOAD_TOO_LARGE",
        )

    @inlineCallbacks
    def test_chunkedBelowLimit(self):
        """
        A chunked body within the limit is read.
        """
        answer = yield self.ok(b"POST", "/v1/tokens", producer=ChunkedProducer(b'{"uid": "alice"}'))
        self.assertEqual(answer["uid"], "alice")

    @inlineCallbacks
    def test_expectContinueRefused(self):
        """
        A request announcing a body above the limit with C{Expect:
        100-continue} gets the 413 at once, and no C{100 Continue}: the
        client never sends the body.
        """
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.apiPort), client)
        client.transport.write(
            b"POST /v1/tokens HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + self.adminToken
            + b"\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n"
        )
        data = yield client.closed
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data)
        self.assertNotIn(b"100 Continue", data)
        self.assertIn(b'"PAYLOAD_TOO_LARGE"', data)

    @inlineCallbacks
    def test_internalError(self):
        """
        An unexpected exception is logged and answered 500 C{INTERNAL},
        without its text.
        """

        def broken():
            raise RuntimeError("secret detail")

        self.patch(self.factory.registry, "count", broken)
        response, message = yield self.fails(b"GET", "/v1/stats", status=500, code="INTERNAL")
        self.assertNotIn("secret detail", message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_badRequestNamesTheField(self):
        """
        A malformed identifier is 400 C{BAD_REQUEST} naming its field,
        whether the handler finds it or the logic layer (L{Groups}) does.
        """
        for body, expected in [
            ({"uid": ""}, "uid is empty"),
            ({"uid": 5}, "uid must be a string"),
        ]:
            response, message = yield self.fails(b"POST", "/v1/tokens", body)
            self.assertEqual(message, expected)
        response, message = yield self.fails(
            b"POST", "/v1/groups", {"group_id": "a\nb", "owner": "alice"}
        )
        self.assertEqual(message, "group_id contains a control or line-separator character")
        response, message = yield self.fails(
            b"POST",
            "/v1/messages",
            {"uids": ["bob", ""], "text": "x"},
            headers=[(b"Idempotency-Key", b"k")],
        )
        self.assertEqual(message, "uids[1] is empty")


class ErrorMappingTests(SynchronousTestCase):
    """
    L{imserver.api.errors.toApiError}: the one place where an error of the
    logic layer becomes an answer.
    """

    def answer(self, error, params=None):
        """
        The answer to a handler that failed with C{error}.
        """
        found = api.errors.toApiError(Failure(error), params or {})
        if found is None:
            return None
        return found.status, found.code, found.message, found.headers

    def test_badRequest(self):
        """
        A L{BadRequest} is 400 C{BAD_REQUEST} with its message.
        """
        self.assertEqual(
            self.answer(BadRequest("uid is empty")), (400, "BAD_REQUEST", "uid is empty", [])
        )

    def test_protocolErrors(self):
        """
        The other protocol errors with an API code keep their message;
        C{UNAVAILABLE} says when to retry.
        """
        self.assertEqual(self.answer(MessageTooLarge("big")), (413, "MESSAGE_TOO_LARGE", "big", []))
        self.assertEqual(self.answer(NotMember("no")), (403, "NOT_MEMBER", "no", []))
        self.assertEqual(
            self.answer(Unavailable("down")), (503, "UNAVAILABLE", "down", [(b"Retry-After", b"1")])
        )

    def test_unmapped(self):
        """
        Any other error is not mapped: the router answers it 500.
        """
        self.assertIsNone(self.answer(RateLimited("slow down")))
        self.assertIsNone(self.answer(ValueError("uid is empty")))


class ClientListenerTests(LiveApiTestCase):
    """
    The API is served on its own listener only.
    """

    @inlineCallbacks
    def test_notOnClientListener(self):
        """
        An HTTP request to the client listener gets an ERROR frame
        (C{FRAME_TOO_LARGE}: the request line read as a length prefix) and
        the connection is closed, while the API port answers it.
        """
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.clientPort), client)
        client.transport.write(
            b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + self.adminToken
            + b"\r\n\r\n"
        )
        data = yield client.closed
        self.assertNotIn(b"HTTP/", data)
        frames = []
        parser = FrameProtocol()
        parser.frameReceived = frames.append
        parser.maxFrameLength = 65536
        parser.dataReceived(data)
        [frame] = frames
        self.assertEqual(frame.kind, pb.ERROR)
        self.assertEqual(frame.error.code, pb.FRAME_TOO_LARGE)
        answer = yield self.ok(b"GET", "/health", token=False)
        self.assertEqual(answer, {"status": "ok"})


class TokenTests(LiveApiTestCase):
    """
    C{POST /v1/tokens}.
    """

    @inlineCallbacks
    def test_mint(self):
        """
        The minted token is valid for the uid for C{ttl} seconds, only for
        it, and a real client authenticates with it.
        """
        before = int(time.time())
        answer = yield self.ok(b"POST", "/v1/tokens", {"uid": "dave", "ttl": 120})
        self.assertEqual(sorted(answer), ["expires_at", "token", "uid"])
        self.assertEqual(answer["uid"], "dave")
        self.assertTrue(before + 120 <= answer["expires_at"] <= int(time.time()) + 120)
        token = answer["token"]
        self.assertTrue(verifyToken(self.secret, "dave", token, time.time()))
        self.assertFalse(verifyToken(self.secret, "erin", token, time.time()))
        self.assertFalse(verifyToken(self.secret, "dave", token, time.time() + 121))
        client, _ = yield self.connectClient("dave", token=token)
        self.assertTrue(client.session.session_id)

    @inlineCallbacks
    def test_defaultTTL(self):
        """
        Without C{ttl} the token lives a day.
        """
        now = time.time()
        answer = yield self.ok(b"POST", "/v1/tokens", {"uid": "dave"})
        self.assertLess(abs(answer["expires_at"] - (now + 86400)), 5)

    @inlineCallbacks
    def test_errors(self):
        """
        A missing or invalid uid, and a ttl that is not an integer in
        1..366 days, are 400.
        """
        for body in [
            {},
            {"uid": ""},
            {"uid": "a\nb"},
            {"uid": 7},
            {"uid": "x" * 129},
            {"uid": "a", "ttl": 0},
            {"uid": "a", "ttl": 366 * 86400 + 1},
            {"uid": "a", "ttl": "60"},
            {"uid": "a", "ttl": 1.5},
            {"uid": "a", "ttl": True},
            {"uid": "\ud800"},
        ]:
            yield self.fails(b"POST", "/v1/tokens", body)


class MessageTests(LiveApiTestCase):
    """
    C{POST /v1/messages}.
    """

    @inlineCallbacks
    def test_toOnlineUser(self):
        """
        A message from the system to an online user is pushed to it at
        once, from the empty sender, and is in its inbox only.
        """
        client, notifications = yield self.connectClient("bob")
        answer = yield self.push({"to": "bob", "text": "h\u00e9llo", "content_type": "text/plain"})
        self.assertEqual(sorted(answer), ["created_ms", "duplicate", "message_id", "seqs"])
        self.assertEqual(answer["seqs"], {"bob": 1})
        self.assertFalse(answer["duplicate"])
        self.assertLess(abs(answer["created_ms"] / 1000.0 - time.time()), 5)
        [entry] = yield notifications.wait("message")
        self.assertEqual(entry.seq, 1)
        self.assertEqual(entry.message.id, answer["message_id"])
        self.assertEqual(entry.message.sender, "")
        self.assertEqual(entry.message.recipient, "bob")
        self.assertEqual(entry.message.body, "h\u00e9llo".encode("utf-8"))
        self.assertEqual(entry.message.content_type, "text/plain")

    @inlineCallbacks
    def test_toOfflineUser(self):
        """
        A message to an offline user waits in its inbox and is pushed when
        it connects.
        """
        answer = yield self.push({"to": "carol", "text": "later"})
        client, notifications = yield self.connectClient("carol")
        [entry] = yield notifications.wait("message")
        self.assertEqual((entry.seq, entry.message.id), (1, answer["message_id"]))
        self.assertEqual(entry.message.body, b"later")

    @inlineCallbacks
    def test_base64Body(self):
        """
        C{body_b64} carries any bytes.
        """
        body = bytes(range(256))
        client, notifications = yield self.connectClient("bob")
        yield self.push(
            {
                "to": "bob",
                "body_b64": base64.b64encode(body).decode("ascii"),
                "content_type": "application/octet-stream",
            }
        )
        [entry] = yield notifications.wait("message")
        self.assertEqual(entry.message.body, body)

    @inlineCallbacks
    def test_onBehalf(self):
        """
        With C{from}, the message is sent as that user: it is in the
        sender's inbox too (outgoing) and the recipient sees the sender.
        """
        bob, bobNotes = yield self.connectClient("bob")
        alice, aliceNotes = yield self.connectClient("alice")
        answer = yield self.push({"from": "alice", "to": "bob", "text": "hi"})
        self.assertEqual(answer["seqs"], {"alice": 1, "bob": 1})
        [entry] = yield bobNotes.wait("message")
        self.assertEqual(entry.message.sender, "alice")
        self.assertFalse(entry.outgoing)
        [mine] = yield aliceNotes.wait("message")
        self.assertTrue(mine.outgoing)

    @inlineCallbacks
    def test_toMany(self):
        """
        C{uids} stores one message in every listed inbox.
        """
        answer = yield self.push({"uids": ["bob", "carol"], "text": "all"})
        self.assertEqual(answer["seqs"], {"bob": 1, "carol": 1})
        for uid in "bob", "carol":
            entries = yield self.factory.store.fetch(uid, 0, 10)
            self.assertEqual([e.message.id for e in entries], [answer["message_id"]])

    @inlineCallbacks
    def test_idempotent(self):
        """
        The same C{Idempotency-Key} again stores nothing and answers the
        same message id, marked duplicate.
        """
        first = yield self.push({"to": "bob", "text": "once"}, key="k")
        second = yield self.push({"to": "bob", "text": "once"}, key="k")
        self.assertEqual(second["message_id"], first["message_id"])
        self.assertTrue(second["duplicate"])
        head = yield self.factory.store.head("bob")
        self.assertEqual(head, 1)
        third = yield self.push({"to": "bob", "text": "once"}, key="k2")
        self.assertNotEqual(third["message_id"], first["message_id"])

    @inlineCallbacks
    def test_errors(self):
        """
        Missing or bad key, targets, body or content type are 400; a body
        above C{--max-message-body} is 413 C{MESSAGE_TOO_LARGE}.
        """
        key = [(b"Idempotency-Key", b"k")]
        yield self.fails(b"POST", "/v1/messages", {"to": "bob", "text": "x"})
        yield self.fails(
            b"POST",
            "/v1/messages",
            {"to": "bob", "text": "x"},
            headers=[(b"Idempotency-Key", b" ")],
        )
        yield self.fails(
            b"POST",
            "/v1/messages",
            {"to": "bob", "text": "x"},
            headers=[(b"Idempotency-Key", b"x" * 65)],
        )
        yield self.fails(
            b"POST",
            "/v1/messages",
            {"to": "bob", "text": "x"},
            headers=[(b"Idempotency-Key", b"\xff")],
        )
        for body in [
            {"text": "no target"},
            {"to": "bob", "uids": ["carol"], "text": "two targets"},
            {"to": "bob"},
            {"to": "bob", "text": "x", "body_b64": "eA=="},
            {"to": "bob", "body_b64": "not base64!"},
            {"to": "bob", "body_b64": 5},
            {"to": "", "text": "x"},
            {"to": "b\x00b", "text": "x"},
            {"uids": [], "text": "x"},
            {"uids": "bob", "text": "x"},
            {"uids": ["a", "b", "c", "d"], "text": "x"},
            {"uids": ["a", 5], "text": "x"},
            {"from": "", "to": "bob", "text": "x"},
            {"to": "bob", "text": "x", "content_type": "t" * 65},
            {"to": "bob", "text": "x", "sender": "alice"},
        ]:
            yield self.fails(b"POST", "/v1/messages", body, headers=key)
        big = "x" * (self.factory.settings.max_message_body + 1)
        yield self.fails(
            b"POST",
            "/v1/messages",
            {"to": "bob", "text": big},
            headers=key,
            status=413,
            code="MESSAGE_TOO_LARGE",
        )

    @inlineCallbacks
    def test_unavailable(self):
        """
        A store that is down is 503 C{UNAVAILABLE} with C{Retry-After}.
        """
        from twisted.internet.defer import fail

        self.patch(
            self.factory.messenger,
            "storeMessage",
            lambda *a, **k: fail(Unavailable("storage is down")),
        )
        response, message = yield self.fails(
            b"POST",
            "/v1/messages",
            {"to": "bob", "text": "x"},
            headers=[(b"Idempotency-Key", b"k")],
            status=503,
            code="UNAVAILABLE",
        )
        self.assertEqual(response.headers.getRawHeaders(b"Retry-After"), [b"1"])

    @inlineCallbacks
    def test_toGroup(self):
        """
        A message to a group, from the system or from a member, lands in
        every member's inbox and is pushed to the online ones; on behalf of
        a non-member it is 403 C{NOT_MEMBER}, to no group 403 too.
        """
        yield self.ok(b"POST", "/v1/groups", {"group_id": "g", "owner": "alice"}, status=201)
        yield self.ok(b"POST", "/v1/groups/g/members", {"members": [{"uid": "bob"}]})
        bob, notes = yield self.connectClient("bob")
        answer = yield self.push({"group_id": "g", "text": "news"}, key="g1")
        self.assertEqual(answer["seqs"], {"alice": 1, "bob": 1})
        [entry] = yield notes.wait("message")
        self.assertEqual(entry.message.group_id, "g")
        self.assertEqual(entry.message.body, b"news")
        answer = yield self.push({"from": "alice", "group_id": "g", "text": "hi"}, key="g2")
        self.assertEqual(answer["seqs"], {"alice": 2, "bob": 2})
        key = [(b"Idempotency-Key", b"g3")]
        yield self.fails(
            b"POST",
            "/v1/messages",
            {"from": "mallory", "group_id": "g", "text": "x"},
            headers=key,
            status=403,
            code="NOT_MEMBER",
        )
        yield self.fails(
            b"POST",
            "/v1/messages",
            {"from": "alice", "group_id": "nope", "text": "x"},
            headers=key,
            status=403,
            code="NOT_MEMBER",
        )


class BroadcastTests(LiveApiTestCase):
    """
    C{POST /v1/broadcast}.
    """

    @inlineCallbacks
    def test_broadcast(self):
        """
        Every connected session gets a C{notice} notify with the body and
        content type; nothing is stored.
        """
        alice, aliceNotes = yield self.connectClient("alice")
        bob, bobNotes = yield self.connectClient("bob", platform=pb.IOS)
        answer = yield self.ok(
            b"POST", "/v1/broadcast", {"text": "maintenance at 10", "content_type": "text/plain"}
        )
        self.assertEqual(answer, {"sessions": 2, "gates": 1})
        for notes in aliceNotes, bobNotes:
            [notice] = yield notes.wait("notice")
            self.assertEqual(notice.body, b"maintenance at 10")
            self.assertEqual(notice.content_type, "text/plain")
        head = yield self.factory.store.head("alice")
        self.assertEqual(head, 0)

    @inlineCallbacks
    def test_nobody(self):
        """
        With no session connected it reaches 0 sessions.
        """
        answer = yield self.ok(b"POST", "/v1/broadcast", {"body_b64": "AAE="})
        self.assertEqual(answer, {"sessions": 0, "gates": 1})

    @inlineCallbacks
    def test_errors(self):
        """
        No body is 400; too large a body is 413 C{MESSAGE_TOO_LARGE}.
        """
        yield self.fails(b"POST", "/v1/broadcast", {})
        yield self.fails(b"POST", "/v1/broadcast", {"text": "x", "to": "bob"})
        big = "x" * (self.factory.settings.max_message_body + 1)
        yield self.fails(
            b"POST", "/v1/broadcast", {"text": big}, status=413, code="MESSAGE_TOO_LARGE"
        )


class PresenceTests(LiveApiTestCase):
    """
    C{GET /v1/users/{uid}/presence}.
    """

    @inlineCallbacks
    def test_offline(self):
        """
        A user without sessions is offline, with no devices.
        """
        answer = yield self.ok(b"GET", "/v1/users/alice/presence")
        self.assertEqual(answer, {"uid": "alice", "online": False, "devices": []})

    @inlineCallbacks
    def test_devices(self):
        """
        Every device of the user is listed with its platform, session and
        gate.
        """
        laptop, _ = yield self.connectClient("alice", "laptop")
        phone, _ = yield self.connectClient("alice", "phone", platform=pb.IOS)
        answer = yield self.ok(b"GET", "/v1/users/alice/presence")
        self.assertEqual(
            answer,
            {
                "uid": "alice",
                "online": True,
                "devices": [
                    {
                        "device_id": "laptop",
                        "platform": "desktop",
                        "session_id": laptop.session.session_id,
                        "gate_id": "gate-1",
                    },
                    {
                        "device_id": "phone",
                        "platform": "ios",
                        "session_id": phone.session.session_id,
                        "gate_id": "gate-1",
                    },
                ],
            },
        )

    @inlineCallbacks
    def test_percentEncodedUid(self):
        """
        The uid in the path is percent-decoded: it may hold C{/}, spaces
        and any non-control character.
        """
        uid = "team/\u00e9 x"
        yield self.connectClient(uid)
        answer = yield self.ok(b"GET", "/v1/users/{}/presence".format(quote(uid, safe="")))
        self.assertEqual((answer["uid"], answer["online"]), (uid, True))

    @inlineCallbacks
    def test_badUid(self):
        """
        A uid with a control character, or an empty one, is 400.
        """
        yield self.fails(b"GET", "/v1/users/a%0Ab/presence")
        yield self.fails(b"GET", "/v1/users//presence")


class KickTests(LiveApiTestCase):
    """
    C{POST /v1/users/{uid}/kick}.
    """

    @inlineCallbacks
    def test_kickAll(self):
        """
        Every session of the user gets a C{kicked} notify (C{ADMIN}) and is
        closed; the presence shows it offline.
        """
        laptop, laptopNotes = yield self.connectClient("alice", "laptop")
        phone, phoneNotes = yield self.connectClient("alice", "phone")
        closed = [laptop.whenClosed(), phone.whenClosed()]
        answer = yield self.ok(b"POST", "/v1/users/alice/kick")
        self.assertEqual(answer, {"uid": "alice", "kicked": ["laptop", "phone"]})
        for notes in laptopNotes, phoneNotes:
            [kicked] = yield notes.wait("kicked")
            self.assertEqual(kicked.reason, pb.ADMIN)
            self.assertEqual(kicked.message, "kicked by the server")
        for d in closed:
            yield d
        answer = yield self.ok(b"GET", "/v1/users/alice/presence")
        self.assertFalse(answer["online"])

    @inlineCallbacks
    def test_kickOneDevice(self):
        """
        With C{device_id} only that device is kicked, with the message
        given; the other stays connected.
        """
        laptop, laptopNotes = yield self.connectClient("alice", "laptop")
        phone, phoneNotes = yield self.connectClient("alice", "phone")
        closed = phone.whenClosed()
        answer = yield self.ok(
            b"POST", "/v1/users/alice/kick", {"device_id": "phone", "message": "lost phone"}
        )
        self.assertEqual(answer, {"uid": "alice", "kicked": ["phone"]})
        [kicked] = yield phoneNotes.wait("kicked")
        self.assertEqual((kicked.reason, kicked.message), (pb.ADMIN, "lost phone"))
        yield closed
        yield laptop.ping()
        self.assertEqual(laptopNotes.named("kicked"), [])

    @inlineCallbacks
    def test_kickNobody(self):
        """
        Kicking a user without sessions, or a device it does not have,
        kicks nothing.
        """
        answer = yield self.ok(b"POST", "/v1/users/alice/kick")
        self.assertEqual(answer, {"uid": "alice", "kicked": []})
        yield self.connectClient("alice", "laptop")
        answer = yield self.ok(b"POST", "/v1/users/alice/kick", {"device_id": "tv"})
        self.assertEqual(answer, {"uid": "alice", "kicked": []})

    @inlineCallbacks
    def test_errors(self):
        """
        A bad device id or too long a message is 400.
        """
        for body in [
            {"device_id": ""},
            {"device_id": "a\tb"},
            {"message": "m" * 257},
            {"device": "x"},
            {"message": 3},
        ]:
            yield self.fails(b"POST", "/v1/users/alice/kick", body)


class GroupTests(LiveApiTestCase):
    """
    The group routes.
    """

    @inlineCallbacks
    def test_lifecycle(self):
        """
        Create a group, add members, list them and the user's groups,
        remove one, delete the group.
        """
        created = yield self.ok(
            b"POST", "/v1/groups", {"group_id": "g1", "name": "Team", "owner": "alice"}, status=201
        )
        self.assertEqual(
            {k: created[k] for k in ("group_id", "name", "member_count")},
            {"group_id": "g1", "name": "Team", "member_count": 1},
        )
        self.assertLess(abs(created["created_ms"] / 1000.0 - time.time()), 5)
        group = yield self.ok(b"GET", "/v1/groups/g1")
        self.assertEqual(group, created)
        added = yield self.ok(
            b"POST",
            "/v1/groups/g1/members",
            {"members": [{"uid": "bob"}, {"uid": "carol", "role": "admin"}]},
        )
        self.assertEqual(added, {"group_id": "g1", "added": ["bob", "carol"]})
        again = yield self.ok(
            b"POST", "/v1/groups/g1/members", {"members": [{"uid": "bob", "role": "admin"}]}
        )
        self.assertEqual(again, {"group_id": "g1", "added": []})
        members = yield self.ok(b"GET", "/v1/groups/g1/members")
        self.assertEqual(
            [(m["uid"], m["role"]) for m in members["members"]],
            [("alice", "owner"), ("bob", "admin"), ("carol", "admin")],
        )
        self.assertEqual(members["group_id"], "g1")
        groups = yield self.ok(b"GET", "/v1/users/carol/groups")
        self.assertEqual(groups["uid"], "carol")
        [entry] = groups["groups"]
        self.assertEqual(
            (entry["group_id"], entry["role"], entry["member_count"]), ("g1", "admin", 3)
        )
        removed = yield self.ok(b"DELETE", "/v1/groups/g1/members/bob")
        self.assertEqual(removed, {"group_id": "g1", "uid": "bob", "removed": True})
        removed = yield self.ok(b"DELETE", "/v1/groups/g1/members/bob")
        self.assertEqual(removed["removed"], False)
        groups = yield self.ok(b"GET", "/v1/users/bob/groups")
        self.assertEqual(groups, {"uid": "bob", "groups": []})
        deleted = yield self.ok(b"DELETE", "/v1/groups/g1")
        self.assertEqual(deleted, {"group_id": "g1", "deleted": True})
        yield self.fails(b"GET", "/v1/groups/g1", status=404, code="GROUP_NOT_FOUND")

    @inlineCallbacks
    def test_percentEncodedGroupId(self):
        """
        Group ids in paths are percent-decoded like uids.
        """
        groupId = "a/b \u00e9"
        yield self.ok(b"POST", "/v1/groups", {"group_id": groupId, "owner": "alice"}, status=201)
        group = yield self.ok(b"GET", "/v1/groups/" + quote(groupId, safe=""))
        self.assertEqual(group["group_id"], groupId)

    @inlineCallbacks
    def test_createErrors(self):
        """
        An existing group id is 409 C{GROUP_EXISTS}; a missing or bad id or
        owner, or a bad name, is 400.
        """
        yield self.ok(b"POST", "/v1/groups", {"group_id": "g1", "owner": "alice"}, status=201)
        yield self.fails(
            b"POST",
            "/v1/groups",
            {"group_id": "g1", "owner": "bob"},
            status=409,
            code="GROUP_EXISTS",
        )
        for body in [
            {"owner": "alice"},
            {"group_id": "g2"},
            {"group_id": "", "owner": "a"},
            {"group_id": "g\n", "owner": "a"},
            {"group_id": "g2", "owner": ""},
            {"group_id": "g2", "owner": "a", "name": 5},
            {"group_id": "g2", "owner": "a", "name": "n" * 257},
            {"group_id": "g2", "owner": "a", "members": []},
        ]:
            yield self.fails(b"POST", "/v1/groups", body)

    @inlineCallbacks
    def test_notFound(self):
        """
        Every route on a group that does not exist is 404
        C{GROUP_NOT_FOUND}.
        """
        notFound = dict(status=404, code="GROUP_NOT_FOUND")
        yield self.fails(b"GET", "/v1/groups/nope", **notFound)
        yield self.fails(b"DELETE", "/v1/groups/nope", **notFound)
        yield self.fails(b"GET", "/v1/groups/nope/members", **notFound)
        yield self.fails(
            b"POST", "/v1/groups/nope/members", {"members": [{"uid": "bob"}]}, **notFound
        )
        yield self.fails(b"DELETE", "/v1/groups/nope/members/bob", **notFound)

    @inlineCallbacks
    def test_full(self):
        """
        Members beyond C{--max-group-size} are 409 C{GROUP_FULL}, and none
        of them is added.
        """
        yield self.ok(b"POST", "/v1/groups", {"group_id": "g", "owner": "alice"}, status=201)
        yield self.fails(
            b"POST",
            "/v1/groups/g/members",
            {"members": [{"uid": "b"}, {"uid": "c"}, {"uid": "d"}]},
            status=409,
            code="GROUP_FULL",
        )
        members = yield self.ok(b"GET", "/v1/groups/g/members")
        self.assertEqual(len(members["members"]), 1)
        yield self.ok(b"POST", "/v1/groups/g/members", {"members": [{"uid": "b"}, {"uid": "c"}]})

    @inlineCallbacks
    def test_memberErrors(self):
        """
        Bad member lists and roles are 400, and so is changing or removing
        the owner.
        """
        yield self.ok(b"POST", "/v1/groups", {"group_id": "g", "owner": "alice"}, status=201)
        for body in [
            {},
            {"members": []},
            {"members": "bob"},
            {"members": ["bob"]},
            {"members": [{"uid": "bob", "role": "boss"}]},
            {"members": [{"uid": "bob", "role": "owner"}]},
            {"members": [{"role": "member"}]},
            {"members": [{"uid": "bob", "rank": 1}]},
            {"members": [{"uid": "alice", "role": "admin"}]},
        ]:
            yield self.fails(b"POST", "/v1/groups/g/members", body)
        yield self.fails(b"DELETE", "/v1/groups/g/members/alice")


class GatesTests(LiveApiTestCase):
    """
    C{GET /v1/gates}, the dispatcher.
    """

    @inlineCallbacks
    def test_listsThisGate(self):
        """
        By default the gate advertises its client listener.
        """
        answer = yield self.ok(b"GET", "/v1/gates")
        self.assertEqual(
            answer,
            {
                "addresses": [
                    {
                        "host": "127.0.0.1",
                        "port": self.clientPort,
                        "tls": False,
                        "gate_id": "gate-1",
                    }
                ]
            },
        )

    @inlineCallbacks
    def test_shuffled(self):
        """
        The addresses of every gate of the directory are listed in a random
        order.
        """
        router = self.apiService.site.resource.router
        directory = router.api.directory
        yield directory.advertise(
            "gate-2", [("b{}.example".format(i), 443, True) for i in range(10)]
        )
        router.api.random = random.Random(1)
        answer = yield self.ok(b"GET", "/v1/gates")
        addresses = [(a["host"], a["port"], a["tls"], a["gate_id"]) for a in answer["addresses"]]
        expected = sorted(addresses)
        self.assertEqual(len(expected), 11)
        random.Random(1).shuffle(expected)
        self.assertEqual(addresses, expected)


class AdvertiseOptionTests(LiveApiTestCase):
    """
    C{--advertise} replaces the derived addresses.
    """

    extraArgs = ("--advertise", "chat.example.com:443", "--advertise", "tcp:[2001:db8::1]:7000")

    @inlineCallbacks
    def test_advertised(self):
        """
        The dispatcher lists the C{--advertise} addresses, TLS unless
        C{tcp:}.
        """
        answer = yield self.ok(b"GET", "/v1/gates")
        self.assertEqual(
            sorted((a["host"], a["port"], a["tls"]) for a in answer["addresses"]),
            [("2001:db8::1", 7000, False), ("chat.example.com", 443, True)],
        )

    @inlineCallbacks
    def test_withdrawnOnStop(self):
        """
        Stopping the service removes the gate from the directory.
        """
        directory = self.apiService.site.resource.router.api.directory
        yield self.root.stopService()
        gates = yield directory.gates()
        self.assertEqual(gates, {})


class StatsTests(LiveApiTestCase):
    """
    C{GET /v1/stats}.
    """

    @inlineCallbacks
    def test_stats(self):
        """
        The gate's id, version, uptime, connections and sessions.
        """
        yield self.connectClient("alice")
        answer = yield self.ok(b"GET", "/v1/stats")
        self.assertEqual(answer["gate_id"], "gate-1")
        self.assertEqual(answer["version"], __version__)
        self.assertEqual((answer["connections"], answer["sessions"]), (1, 1))
        self.assertIsInstance(answer["uptime_seconds"], int)


class StopTests(LiveApiTestCase):
    """
    Stopping the API service.
    """

    extraArgs = ("--shutdown-grace", "0.5")

    @inlineCallbacks
    def test_closesIdleConnections(self):
        """
        A kept-alive idle connection is closed when the API stops, and the
        port no longer accepts.
        """
        yield self.ok(b"GET", "/health", token=False)
        tracker = self.apiService.factory
        self.assertEqual(len(tracker.protocols), 1)
        yield self.apiService.stopService()
        self.assertEqual(tracker.protocols, {})
        from twisted.internet.error import ConnectionRefusedError

        yield self.assertFailure(
            self.agent.request(b"GET", self.url("/health")), ConnectionRefusedError
        )

    @inlineCallbacks
    def test_waitsForRequestsInFlight(self):
        """
        A request in flight when the API stops is answered before its
        connection is closed.
        """
        pending, answered = yield self._statsInFlight()
        stopped = self.apiService.stopService()
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertNoResult(stopped)
        pending.callback(5)
        response, answer = yield answered
        self.assertEqual((response.code, answer["sessions"]), (200, 5))
        yield stopped

    @inlineCallbacks
    def _statsInFlight(self):
        """
        A C{GET /v1/stats} the API has accepted and cannot answer until the
        test fires C{pending} (the registry's count).

        @return: a L{Deferred} firing with C{(pending, answered)} once the
            request is in flight; C{answered} fires with its response.
        """
        pending = Deferred()
        self.patch(self.factory.registry, "count", lambda: pending)
        answered = self.call(b"GET", "/v1/stats")
        while not self.apiService.site.inFlight:
            yield deferLater(reactor, 0.01, lambda: None)
        return pending, answered

    @inlineCallbacks
    def test_abortsAfterGrace(self):
        """
        A request still unanswered C{--shutdown-grace} seconds after the API
        began to stop has its connection aborted; its late answer is
        dropped.
        """
        from twisted.web._newclient import ResponseNeverReceived

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pending, answered = yield self._statsInFlight()
        site = self.apiService.site
        started = time.time()
        yield self.apiService.stopService()
        self.assertGreaterEqual(time.time() - started, 0.4)
        yield self.assertFailure(answered, ResponseNeverReceived)
        self.assertEqual(site.inFlight, 0)
        pending.callback(1)
        [event] = [e for e in events if e.get("route") == "/v1/stats"]
        self.assertTrue(event["client_gone"])


class LoggingTests(LiveApiTestCase):
    """
    What the API logs.
    """

    def capture(self):
        """
        Record every log event until cleanup.

        @return: the L{list} they are appended to.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @inlineCallbacks
    def test_oneEventPerRequest(self):
        """
        Every request is logged with its method, route, status and the uid
        it is about.
        """
        events = self.capture()
        yield self.ok(b"GET", "/v1/users/alice/presence")
        [event] = [e for e in events if e.get("route") == "/v1/users/{uid}/presence"]
        self.assertEqual((event["method"], event["status"], event["uid"]), ("GET", 200, "alice"))
        self.assertIn("GET /v1/users/{uid}/presence -> 200", formatEvent(event))

    @inlineCallbacks
    def test_noSecrets(self):
        """
        Neither the admin token (right or wrong), nor minted tokens, nor
        the secret appear in any log event.
        """
        events = self.capture()
        answer = yield self.ok(b"POST", "/v1/tokens", {"uid": "alice"})
        yield self.fails(
            b"GET", "/v1/stats", status=401, code="UNAUTHORIZED", token=b"Bearer wrong-token-value"
        )
        yield self.fails(
            b"POST", "/v1/tokens", raw=b" " * (MAX_BODY + 1), status=413, code="PAYLOAD_TOO_LARGE"
        )
        self.assertTrue(events)
        text = "\n".join(formatEvent(e) + repr(e) + logs.formatJSONLine(e) for e in events)
        for secret in [
            self.adminToken.decode("ascii"),
            answer["token"],
            "wrong-token-value",
            self.secret.decode("ascii"),
        ]:
            self.assertNotIn(secret, text)


class JSONLogTests(SynchronousTestCase):
    """
    L{logs.jsonLogger}: one JSON object per line for log shippers.
    """

    def test_jsonLogger(self):
        """
        The factory writes each event to standard output as one line of
        JSON with the time, level, namespace, formatted message and the
        event's fields.
        """
        out = StringIO()
        self.patch(sys, "stdout", out)
        observer = logs.jsonLogger()
        log = Logger(namespace="imserver.test", observer=observer)
        log.info(
            "API {method} {route} -> {status}",
            method="GET",
            route="/x",
            status=200,
            uid="\u00e9l\u00e8ve",
            peer=object(),
        )
        log.warn("second")
        lines = out.getvalue().splitlines(True)
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.endswith("\n") and line.isascii() for line in lines))
        record = json.loads(lines[0])
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "imserver.test")
        self.assertEqual(record["message"], "API GET /x -> 200")
        self.assertEqual(
            (record["method"], record["status"], record["uid"]), ("GET", 200, "\u00e9l\u00e8ve")
        )
        self.assertTrue(record["peer"].startswith("<object object"))
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(json.loads(lines[1])["level"], "warn")

    def test_failure(self):
        """
        A logged failure adds its error and traceback; fields named like
        the fixed ones are renamed.
        """
        out = StringIO()
        log = Logger(observer=logs.jsonLineObserver(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure(
                "it broke", Failure(), message="mine", time=3, namespace="n", ratio=float("nan")
            )
        record = json.loads(out.getvalue())
        self.assertEqual(record["message"], "it broke")
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("division", record["error"])
        self.assertEqual(
            (
                record["field_message"],
                record["field_time"],
                record["field_namespace"],
                record["ratio"],
            ),
            ("mine", 3, "n", "nan"),
        )


class TwistdJSONLogTests(TestCase):
    """
    C{twistd --logger imserver.logs.jsonLogger -n im} with the API, as an
    operator runs it.
    """

    timeout = 30

    @inlineCallbacks
    def test_jsonLinesAndApi(self):
        """
        Every line twistd writes is a JSON object, the API answers on the
        port it logs, and SIGTERM stops it cleanly.
        """
        dataDir = FilePath(self.mktemp())
        dataDir.makedirs()
        process = TwistdProcess()
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--logger",
            "imserver.logs.jsonLogger",
            "im",
            "--data-dir",
            dataDir.path,
            "--listen",
            LOOPBACK,
            "--api",
            LOOPBACK,
            "--store",
            "memory",
        ]
        process.transport = reactor.spawnProcess(
            process, argv[0], argv, env=serverEnvironment(), path=dataDir.parent().path
        )
        killAtCleanup(self, process, process.transport)
        yield process.listening
        pattern = re.compile(rb"HTTP API at http://127\.0\.0\.1:(\d+)/")
        for _ in range(500):
            match = pattern.search(process.output)
            if match or process.ended.called:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertIsNotNone(match, process.text())
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield Agent(reactor, pool=pool).request(
            b"GET", b"http://127.0.0.1:%s/health" % (match.group(1),)
        )
        body = yield readBody(response)
        self.assertEqual(json.loads(body), {"status": "ok"})
        process.transport.signalProcess("TERM")
        yield process.ended
        lines = process.text().splitlines()
        self.assertTrue(lines)
        records = [json.loads(line) for line in lines]
        messages = [r["message"] for r in records]
        self.assertTrue(any(m.startswith("API GET /health -> 200") for m in messages), messages)
        self.assertNotIn("Traceback", process.text())


class OptionsTests(SynchronousTestCase):
    """
    The API options of C{twistd im} and the service tree they build.
    """

    def setUp(self):
        """
        No secret in the environment; a fresh data directory and memory
        reactor.
        """
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        self.reactor = MemoryReactorClock()

    def options(self, *argv):
        """
        Parse C{argv} (with the data directory and a memory store).
        """
        options = tap.Options()
        options.parseOptions(["--data-dir", self.dataDir.path, "--store", "memory"] + list(argv))
        return options

    def makeService(self, *argv):
        """
        Build the service tree on the memory reactor.
        """
        return tap.makeService(self.options(*argv), reactor=self.reactor)

    def test_defaults(self):
        """
        By default the API listens on 127.0.0.1:7480, with the admin token
        of the data directory, and the gate advertises its listeners.
        """
        options = self.options()
        self.assertEqual(options["api"], "tcp:7480:interface=127.0.0.1")
        self.assertEqual(options["api"], tap.DEFAULT_API)
        self.assertIsNone(options["admin-token-file"])
        self.assertEqual(options["advertise"], [])
        self.assertEqual(options.settings.api_max_body, 1024 * 1024)

    def test_tree(self):
        """
        The API service follows the gate in the root (so it stops first),
        and listens on its endpoint with the API site; the advertiser is a
        child of the gate, after its listeners.
        """
        root = self.makeService("--listen", "tcp:7000:interface=127.0.0.1")
        names = [service.name for service in root]
        self.assertEqual(names, ["retention", "gate", "api"])
        gate = root.getServiceNamed("gate")
        self.assertEqual(
            [service.name for service in gate], ["listen tcp:7000:interface=127.0.0.1", "advertise"]
        )
        self.assertIsInstance(gate.getServiceNamed("advertise"), AdvertiseService)
        service = root.getServiceNamed("api")
        self.assertIsInstance(service, ApiService)
        self.assertIsInstance(service.site, api.ApiSite)
        self.assertEqual(service.site.maxBody, 1024 * 1024)
        self.assertIs(
            service.site.resource.router.api.factory, root.getServiceNamed("gate").factory
        )
        root.startService()
        ports = [(port, interface) for port, factory, backlog, interface in self.reactor.tcpServers]
        self.assertEqual(ports, [(7000, "127.0.0.1"), (7480, "127.0.0.1")])
        self.assertIs(self.reactor.tcpServers[1][1], service.factory)
        self.assertIs(service.factory.wrappedFactory, service.site)
        self.successResultOf(root.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_apiNone(self):
        """
        C{--api none} runs no API and generates no admin token.
        """
        root = self.makeService("--api", "none")
        self.assertEqual([s.name for s in root], ["retention", "gate", "certificates"])
        self.assertFalse(self.dataDir.child("admin-token").exists())

    def test_apiInvalid(self):
        """
        An API endpoint that cannot be parsed is a usage error naming
        C{--api}.
        """
        e = self.assertRaises(UsageError, self.options, "--api", "tcp:1\\")
        self.assertIn("--api", str(e))
        e = self.assertRaises(UsageError, self.makeService, "--api", "bogus:1")
        self.assertIn("--api", str(e))

    def test_apiMaxBody(self):
        """
        C{--api-max-body} is the site's body limit.
        """
        root = self.makeService("--api-max-body", "10")
        self.assertEqual(root.getServiceNamed("api").site.maxBody, 10)

    def test_adminTokenGenerated(self):
        """
        The admin token is generated into the data directory (mode 0600,
        64 hex characters) and kept by the next start; it is not the
        client-token secret.
        """
        first = self.makeService()
        path = self.dataDir.child("admin-token")
        self.assertEqual(_mode(path), 0o600)
        token = path.getContent().strip()
        self.assertEqual(len(token), 64)
        self.makeService()
        self.assertEqual(path.getContent().strip(), token)
        self.assertNotEqual(token, self.dataDir.child("secret").getContent().strip())
        router = first.getServiceNamed("api").site.resource.router
        self.assertEqual(router._tokenDigest, hashlib.sha256(token).digest())

    def test_adminTokenFile(self):
        """
        C{--admin-token-file} names the token; it must exist and hold at
        least 16 bytes.
        """
        path = FilePath(self.mktemp())
        path.setContent(b"  a-very-long-admin-token  \n")
        self.assertEqual(api.loadAdminToken(self.dataDir, path.path), b"a-very-long-admin-token")
        self.makeService("--admin-token-file", path.path)
        self.assertFalse(self.dataDir.child("admin-token").exists())
        missing = FilePath(self.mktemp())
        e = self.assertRaises(UsageError, self.makeService, "--admin-token-file", missing.path)
        self.assertIn("--admin-token-file", str(e))
        path.setContent(b"short\n")
        self.assertRaises(UsageError, self.makeService, "--admin-token-file", path.path)

    def test_parseAdvertise(self):
        """
        C{--advertise} takes C{[tls:|ssl:|tcp:]HOST:PORT}, IPv6 in brackets.
        """
        self.assertEqual(
            tap.parseAdvertise("chat.example.com:443"), ("chat.example.com", 443, True)
        )
        self.assertEqual(tap.parseAdvertise("tls:10.0.0.1:7443"), ("10.0.0.1", 7443, True))
        self.assertEqual(tap.parseAdvertise("ssl:h:1"), ("h", 1, True))
        self.assertEqual(tap.parseAdvertise("tcp:h:7000"), ("h", 7000, False))
        self.assertEqual(tap.parseAdvertise("[::1]:7443"), ("::1", 7443, True))
        self.assertEqual(tap.parseAdvertise("tcp:[::1]:7000"), ("::1", 7000, False))
        for bad in [
            "host",
            "host:",
            ":443",
            "host:0",
            "host:65536",
            "host:x",
            "::1:7443",
            "[::1]7443",
            "[::1",
            "tcp:7000",
        ]:
            self.assertRaises(ValueError, tap.parseAdvertise, bad)
        self.assertRaises(UsageError, self.options, "--advertise", "nope")
        options = self.options("--advertise", "a:1", "--advertise", "tcp:b:2")
        self.assertEqual(options.advertised, [("a", 1, True), ("b", 2, False)])


class AdvertiseTests(SynchronousTestCase):
    """
    The addresses a gate advertises, and the memory directory.
    """

    def test_directory(self):
        """
        L{api.MemoryGateDirectory} provides L{IGateDirectory}, keeps the
        last addresses of each gate and forgets a withdrawn one.
        """
        directory = api.MemoryGateDirectory()
        self.assertTrue(verifyObject(IGateDirectory, directory))
        self.successResultOf(directory.advertise("g1", [("a", 1, True)]))
        self.successResultOf(directory.advertise("g2", [("b", 2, False)]))
        self.successResultOf(directory.advertise("g1", [("c", 3, True)]))
        self.assertEqual(
            self.successResultOf(directory.gates()),
            {"g1": [("c", 3, True)], "g2": [("b", 2, False)]},
        )
        self.successResultOf(directory.withdraw("g1"))
        self.successResultOf(directory.withdraw("g1"))
        self.assertEqual(self.successResultOf(directory.gates()), {"g2": [("b", 2, False)]})

    def test_derived(self):
        """
        The listening addresses, TLS for C{ssl:}, the host name for a
        wildcard interface; addresses without host and port are skipped.
        """
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        self.assertEqual(
            advertisedAddresses(
                [
                    "ssl:7443",
                    "tcp:7000:interface=127.0.0.1",
                    "tcp6:7001",
                    "unix:/s",
                    "ssl:7444:interface=\\:\\:",
                ],
                [
                    IPv4Address("TCP", "0.0.0.0", 7443),
                    IPv4Address("TCP", "127.0.0.1", 7000),
                    IPv6Address("TCP", "::1", 7001),
                    UNIXAddress(b"/s"),
                    IPv6Address("TCP", "::", 7444),
                ],
                "gatehost",
            ),
            [
                ("gatehost", 7443, True),
                ("127.0.0.1", 7000, False),
                ("::1", 7001, False),
                ("gatehost", 7444, True),
            ],
        )

    def test_service(self):
        """
        L{AdvertiseService} advertises once the gate listens and withdraws
        when stopped.
        """
        from twisted.internet.address import IPv4Address

        listening = Deferred()

        class Gate:
            def addresses(self):
                return listening

        directory = api.MemoryGateDirectory()
        service = AdvertiseService(directory, "g", Gate(), ["ssl:7443"], hostname="h")
        service.startService()
        self.assertEqual(self.successResultOf(directory.gates()), {})
        listening.callback([IPv4Address("TCP", "0.0.0.0", 7443)])
        self.assertEqual(self.successResultOf(directory.gates()), {"g": [("h", 7443, True)]})
        self.assertEqual(service.addresses, [("h", 7443, True)])
        self.successResultOf(service.stopService())
        self.assertEqual(self.successResultOf(directory.gates()), {})
