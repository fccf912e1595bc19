# -*- test-case-name: tests.test_api -*-
"""
The HTTP layer of the API, on C{twisted.web}: L{Router} (method + path
template -> handler, the admin token, JSON in and out, one log event per
request), L{ApiRoot}, L{ApiRequest} (the body-size cap), L{ApiSite} (counts
requests in flight) and L{ConnectionTracker} (closes the connections on
stop).  It knows no route of its own: L{imserver.api.handlers} gives the
table and the handlers.
"""

import hashlib
import hmac
import json
from io import BytesIO
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from imserver.api.errors import ApiError, toApiError
from imserver.errors import BadRequest

#: Seconds an idle keep-alive connection to the API stays open.
IDLE_TIMEOUT = 60

_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])


class Answer:
    """
    A handler's successful answer with a status other than 200.
    """

    def __init__(self, status, body):
        self.status = status
        self.body = body


def encodeJSON(obj):
    """
    C{obj} as the bytes of an answer: compact UTF-8 JSON and a newline.
    """
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def errorBody(code, message):
    return encodeJSON({"error": {"code": code, "message": message}})


def _refuseConstant(name):
    raise ValueError("{} is not JSON".format(name))


def parseBody(request):
    """
    The request body as a JSON object; an empty body is C{{}}.

    @raise BadRequest: if it is not a JSON object.
    """
    raw = request.content.read()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_refuseConstant)
    except (ValueError, RecursionError) as e:
        raise BadRequest("the body is not valid JSON: {}".format(e))
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


class _Route:
    def __init__(self, method, template, handler):
        self.method = method
        self.template = template
        self.handler = handler
        self.parts = template.split("/")[1:]

    def match(self, segments):
        """
        @return: the path parameters if C{segments} match, else L{None}.
        """
        if len(segments) != len(self.parts):
            return None
        params = {}
        for part, segment in zip(self.parts, segments):
            if part.startswith("{"):
                params[part[1:-1]] = segment
            elif part != segment:
                return None
        return params


def decodePath(path):
    """
    Split a request path into percent-decoded UTF-8 segments.
    """
    try:
        return [unquote_to_bytes(s).decode("utf-8") for s in path.split(b"/")[1:]]
    except UnicodeDecodeError:
        raise BadRequest("the path is not UTF-8 once percent-decoded")


class Router(Resource):
    """
    Dispatches requests to the handlers of an
    L{imserver.api.handlers.Api} by method and path, checks the admin
    token, and writes every answer as JSON.

    Order of checks: the token (except on the public paths: a request
    without it learns nothing about the routes), then the route (404), the
    method (405), the body (413 already while reading, then 400), the
    handler.

    A handler is called as C{handler(params, body, request)}: the decoded
    path parameters, the parsed JSON body (C{{}} for methods without one)
    and the L{ApiRequest}; it returns (or a L{Deferred} fires with) the JSON
    answer, or an L{Answer}, or raises L{ApiError} or an error of the logic
    layer (L{toApiError} turns it into the answer).
    """

    log = Logger()
    isLeaf = True

    def __init__(self, api, routes, publicPaths, adminToken, clock):
        """
        @param api: the object whose methods are the handlers.
        @param routes: (method, path template, name of the handler on
            C{api}); a C{{name}} segment matches one percent-decoded path
            segment.
        @param publicPaths: the paths (L{bytes}) served without the token.
        """
        Resource.__init__(self)
        self.api = api
        self._routes = [
            _Route(method, template, getattr(api, name)) for method, template, name in routes
        ]
        self._publicPaths = publicPaths
        self._tokenDigest = hashlib.sha256(adminToken).digest()
        self._clock = clock

    def authorized(self, request):
        """
        Does C{request} carry the admin token?  Compared in constant time
        (digests of equal length, so not even the length leaks).
        """
        values = request.requestHeaders.getRawHeaders(b"authorization")
        if not values or len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        presented = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(presented, self._tokenDigest)

    def render(self, request):
        started = self._clock.seconds()
        gone = []
        request.notifyFinish().addErrback(gone.append)
        context = {"route": None, "params": {}, "body": {}}
        d = maybeDeferred(self._dispatch, request, context)
        d.addCallback(
            lambda result: (
                (result.status, result.body, [])
                if isinstance(result, Answer)
                else (200, result, [])
            )
        )
        d.addErrback(self._failed, request, context)
        d.addCallback(self._respond, request, context, started, gone)
        d.addErrback(lambda f: self.log.failure("writing an API answer failed", f))
        return NOT_DONE_YET

    def _dispatch(self, request, context):
        path = request.path
        if path not in self._publicPaths and not self.authorized(request):
            raise ApiError(
                "UNAUTHORIZED",
                "missing or wrong admin token (Authorization: Bearer <token>)",
                [(b"WWW-Authenticate", b'Bearer realm="imserver"')],
            )
        segments = decodePath(path)
        found = []
        for route in self._routes:
            params = route.match(segments)
            if params is not None:
                found.append((route, params))
        if not found:
            raise ApiError("NOT_FOUND", "no such route")
        method = request.method.decode("ascii", "replace")
        for route, params in found:  # noqa: B007 (used after the break)
            if route.method == method:
                break
        else:
            allowed = ", ".join(sorted({route.method for route, _ in found}))
            raise ApiError(
                "METHOD_NOT_ALLOWED",
                "{} is not allowed here; allowed: {}".format(method[:16], allowed),
                [(b"Allow", allowed.encode("ascii"))],
            )
        context["route"] = route.template
        context["params"] = params
        body = parseBody(request) if request.method in _BODY_METHODS else {}
        context["body"] = body
        return route.handler(params, body, request)

    def _failed(self, failure, request, context):
        error = toApiError(failure, context["params"])
        if error is None:
            self.log.failure(
                "API {method} {route} failed",
                failure,
                method=request.method.decode("ascii", "replace"),
                route=context["route"],
            )
            error = ApiError("INTERNAL", "internal error")
        return (
            error.status,
            {"error": {"code": error.code, "message": error.message}},
            [(b"Cache-Control", b"no-store")] + error.headers,
        )

    def _respond(self, answer, request, context, started, gone):
        status, body, headers = answer
        if not gone:
            data = encodeJSON(body)
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % (len(data),))
            request.setHeader(b"Server", b"imserver")
            for name, value in headers:
                request.setHeader(name, value)
            request.write(data)
            request.finish()
        fields = {
            "method": request.method.decode("ascii", "replace")[:16],
            "route": context["route"] or request.path.decode("utf-8", "replace")[:200],
            "status": status,
            "duration_ms": round((self._clock.seconds() - started) * 1000, 1),
        }
        for name, value in list(context["params"].items()) + [
            (key, context["body"].get(key)) for key in ("uid", "to", "group_id", "owner")
        ]:
            if isinstance(value, str) and name not in fields:
                fields[name] = value[:128]
        if isinstance(context["body"].get("from"), str):
            fields["sender"] = context["body"]["from"][:128]
        if gone:
            fields["client_gone"] = True
            self.log.info(
                "API {method} {route} -> {status} ({duration_ms} ms), client gone", **fields
            )
        else:
            self.log.info("API {method} {route} -> {status} ({duration_ms} ms)", **fields)


class ApiRoot(Resource):
    """
    The root resource of the API site: every path goes to the L{Router},
    except those of resources added with L{mount}.

    @ivar mounted: C{{"/name": [methods]}} of the mounted resources (what
        the OpenAPI document must describe besides the routes).
    """

    def __init__(self, router):
        Resource.__init__(self)
        self.router = router
        self.mounted = {}

    def mount(self, name, resource, methods=("GET",)):
        """
        Serve C{resource} at C{/name} (and below), without the admin token:
        for C{/metrics}.

        @param methods: the HTTP methods it answers, for the route listing.
        """
        self.putChild(name.encode("ascii"), resource)
        self.mounted["/" + name] = list(methods)

    def getChild(self, path, request):
        return self.router

    def render(self, request):
        return self.router.render(request)


class ApiRequest(Request):
    """
    A request whose body may not exceed the site's C{maxBody}: refused with
    413 (and the connection closed) as soon as its C{Content-Length} says
    so, before any of it is read, or once a chunked body grows past it.
    The body is kept in memory (never in a temporary file).
    """

    _received = 0
    _refused = False

    def _maxBody(self):
        return self.channel.site.maxBody

    def gotLength(self, length):
        self.content = BytesIO()
        if length is not None and length > self._maxBody():
            self._refuse(length)

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._maxBody():
            self._refuse(None)
            return
        self.content.write(data)

    def _refuse(self, length):
        self._refused = True
        self.content = BytesIO()
        # No "100 Continue" for a body that will not be read.
        self.requestHeaders.removeHeader(b"expect")
        limit = self._maxBody()
        body = errorBody(
            "PAYLOAD_TOO_LARGE",
            "the request body exceeds the limit of {} bytes".format(limit),
        )
        channel = self.channel
        peer = channel.transport.getPeer()
        Router.log.info(
            "API refused a request body of {length} bytes (limit {limit}) from {peer}",
            length=length if length is not None else "more than {}".format(limit),
            limit=limit,
            peer="{}:{}".format(getattr(peer, "host", peer), getattr(peer, "port", "")),
            status=413,
        )
        channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(body),) + body
        )
        channel.loseConnection()

    def process(self):
        if self._refused:
            # The answer is written and the connection closing.
            return
        site = self.channel.site
        site.requestStarted()
        self.notifyFinish().addBoth(site.requestEnded)
        Request.process(self)


class ApiSite(Site):
    """
    The C{twisted.web} site of the API.

    @ivar maxBody: the largest request body accepted, in bytes.
    @ivar inFlight: requests being answered now.
    """

    noisy = False
    requestFactory = ApiRequest

    def __init__(self, resource, maxBody, reactor):
        Site.__init__(
            self,
            resource,
            timeout=IDLE_TIMEOUT,
            reactor=reactor,
            parsePOSTFormSubmission=False,
        )
        self.maxBody = maxBody
        self.inFlight = 0
        self._idle = []

    def startFactory(self):
        # No access log file and no per-second log clock: the router logs
        # one event per request, without headers.
        pass

    def stopFactory(self):
        pass

    def log(self, request):
        pass

    def requestStarted(self):
        self.inFlight += 1

    def requestEnded(self, result=None):
        self.inFlight -= 1
        if not self.inFlight:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def whenIdle(self):
        """
        @return: a L{Deferred} firing once no request is in flight.
        """
        if not self.inFlight:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        return d


class ConnectionTracker(WrappingFactory):
    """
    Listens for an L{ApiSite} and keeps its connections, so they can be
    closed when the API stops.
    """

    noisy = False

    def __init__(self, site):
        WrappingFactory.__init__(self, site)
        self._gone = []

    def unregisterProtocol(self, p):
        WrappingFactory.unregisterProtocol(self, p)
        if not self.protocols:
            waiters, self._gone = self._gone, []
            for d in waiters:
                d.callback(None)

    def _whenNoConnections(self):
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._gone.append(d)
        return d

    def drain(self, clock, grace):
        """
        Wait for the requests in flight, then close every connection; abort
        those still open C{grace} seconds from now.

        @return: a L{Deferred} firing once every connection is closed.
        """
        site = self.wrappedFactory

        def closeAll(_=None):
            for p in list(self.protocols):
                p.transport.loseConnection()

        def abortAll():
            for p in list(self.protocols):
                p.transport.abortConnection()

        timer = clock.callLater(grace, abortAll)
        site.whenIdle().addCallback(closeAll)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        return self._whenNoConnections().addBoth(done)
