# -*- test-case-name: tests.test_api -*-
"""
The HTTP API: what the app backend calls.  JSON over C{twisted.web} on its
own listener (C{--api}, loopback by default), never on a client listener.
Every route but C{GET /health} (and C{/health/live}, C{/health/ready})
needs C{Authorization: Bearer <admin token>}.

docs/api.md shows every route with curl; docs/openapi.yaml is the OpenAPI
document, which tests/test_api.py keeps equal to L{ROUTES}.

The pieces, outside in:

  - L{ApiSite}: the C{twisted.web} site; counts requests in flight, logs
    nothing by itself (the router logs one event per request).
  - L{ApiRequest}: refuses a body above C{api_max_body} (413) from its
    C{Content-Length} before reading it, or while reading a chunked one.
  - L{ApiRoot}: the root resource.  L{ApiRoot.mount} adds another resource
    beside the routes (C{/metrics}), served without the admin token.
  - L{Router}: method + path template -> handler, the token check, JSON in
    and out, errors as C{{"error": {"code": ..., "message": ...}}}.
  - L{Api}: the handlers.  They call the logic layer (the gate factory's
    C{messenger}, C{groups}, C{registry}, C{broadcast}) and never block:
    every store access returns a L{Deferred}.
  - L{ConnectionTracker}: the listening factory; on stop it waits for the
    requests in flight, then closes the connections (aborting them after
    the grace period).
  - L{MemoryGateDirectory}: the one-process L{IGateDirectory} behind the
    dispatcher route (C{GET /v1/gates}).
"""

import base64
import hashlib
import hmac
import json
import random
from io import BytesIO

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    maybeDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from urllib.parse import unquote_to_bytes
from zope.interface import implementer

from imserver import __version__
from imserver.auth import (
    createSecretFile,
    loadSecret,
    mintToken,
    validateDeviceId,
    validateUid,
)
from imserver.errors import RPCError, Unavailable
from imserver.interfaces import IGateDirectory
from imserver.messaging import MAX_CONTENT_TYPE
from imserver.pb import im_pb2 as pb
from imserver.store import SYSTEM, GroupExists, GroupFull, GroupNotFound

#: Name of the admin token file in the data directory.
ADMIN_TOKEN_FILE_NAME = "admin-token"
#: Token lifetime when C{POST /v1/tokens} gives no C{ttl}, in seconds.
DEFAULT_TOKEN_TTL = 86400
#: The longest token lifetime C{POST /v1/tokens} accepts: 366 days.
MAX_TOKEN_TTL = 366 * 86400
#: Longest kick message, in UTF-8 bytes.
MAX_KICK_MESSAGE = 256
#: Seconds an idle keep-alive connection to the API stays open.
IDLE_TIMEOUT = 60
#: Seconds C{GET /health/ready} waits for the message store to answer.
READY_TIMEOUT = 5.0

#: Every route: (method, path template, name of the L{Api} handler).  A
#: C{{name}} segment matches one percent-decoded path segment.
ROUTES = (
    ("GET", "/health", "health"),
    ("GET", "/health/live", "health"),
    ("GET", "/health/ready", "ready"),
    ("GET", "/v1/stats", "stats"),
    ("GET", "/v1/gates", "gates"),
    ("POST", "/v1/tokens", "createToken"),
    ("POST", "/v1/messages", "createMessage"),
    ("POST", "/v1/broadcast", "broadcast"),
    ("GET", "/v1/users/{uid}/presence", "presence"),
    ("POST", "/v1/users/{uid}/kick", "kick"),
    ("GET", "/v1/users/{uid}/groups", "userGroups"),
    ("POST", "/v1/groups", "createGroup"),
    ("GET", "/v1/groups/{group_id}", "getGroup"),
    ("DELETE", "/v1/groups/{group_id}", "deleteGroup"),
    ("GET", "/v1/groups/{group_id}/members", "members"),
    ("POST", "/v1/groups/{group_id}/members", "addMembers"),
    ("DELETE", "/v1/groups/{group_id}/members/{uid}", "removeMember"),
)

#: Paths served without the admin token.
PUBLIC_PATHS = frozenset([b"/health", b"/health/live", b"/health/ready"])

#: Every error code of the API, with its HTTP status (docs/api.md lists
#: them; tests/test_api.py checks the list is the documented one).
ERROR_CODES = {
    "BAD_REQUEST": 400,
    "UNAUTHORIZED": 401,
    "NOT_MEMBER": 403,
    "NOT_FOUND": 404,
    "GROUP_NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "GROUP_EXISTS": 409,
    "GROUP_FULL": 409,
    "PAYLOAD_TOO_LARGE": 413,
    "MESSAGE_TOO_LARGE": 413,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}

_ROLES = {"member": pb.ROLE_MEMBER, "admin": pb.ROLE_ADMIN, "owner": pb.ROLE_OWNER}
_ROLE_NAMES = {value: name for name, value in _ROLES.items()}
_BODY_METHODS = frozenset([b"POST", b"PUT", b"PATCH"])


class ApiError(Exception):
    """
    An error answer: HTTP status, error code (a key of L{ERROR_CODES}) and
    message.  Never put a secret in the message.
    """

    def __init__(self, code, message, headers=()):
        Exception.__init__(self, code, message)
        self.code = code
        self.status = ERROR_CODES[code]
        self.message = message
        self.headers = list(headers)


class _Answer:
    """
    A handler's successful answer with a status other than 200.
    """

    def __init__(self, status, body):
        self.status = status
        self.body = body


def _encode(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _errorBody(code, message):
    return _encode({"error": {"code": code, "message": message}})


# -- request bodies -----------------------------------------------------------


def _refuseConstant(name):
    raise ValueError("{} is not JSON".format(name))


def _parseBody(request):
    """
    The request body as a JSON object; an empty body is C{{}}.

    @raise ApiError: C{BAD_REQUEST} if it is not a JSON object.
    """
    raw = request.content.read()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_refuseConstant)
    except (ValueError, RecursionError) as e:
        raise ApiError("BAD_REQUEST", "the body is not valid JSON: {}".format(e))
    if not isinstance(value, dict):
        raise ApiError("BAD_REQUEST", "the body must be a JSON object")
    return value


def _fields(body, allowed):
    """
    Refuse fields not in C{allowed}; return C{body} without its C{null}
    values (a null field is an absent one).
    """
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError("BAD_REQUEST", "unknown field(s): {}".format(", ".join(unknown)))
    return {name: value for name, value in body.items() if value is not None}


def _string(value, name):
    if not isinstance(value, str):
        raise ApiError("BAD_REQUEST", "{} must be a string".format(name))
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError("BAD_REQUEST", "{} is not valid Unicode".format(name))
    return value


def _optionalString(body, name, default=""):
    if name not in body:
        return default
    return _string(body[name], name)


def _required(body, name):
    if name not in body:
        raise ApiError("BAD_REQUEST", "{} is required".format(name))
    return body[name]


def _uid(value, name="uid"):
    _string(value, name)
    try:
        validateUid(value)
    except ValueError as e:
        raise ApiError("BAD_REQUEST", str(e) if name == "uid" else "{}: {}".format(name, e))
    return value


def _integer(body, name, default, minimum, maximum):
    if name not in body:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError("BAD_REQUEST", "{} must be an integer".format(name))
    if not minimum <= value <= maximum:
        raise ApiError(
            "BAD_REQUEST", "{} must be between {} and {}".format(name, minimum, maximum)
        )
    return value


def _payload(body, maxBytes):
    """
    The message body: C{text} (sent as its UTF-8 bytes) or C{body_b64}
    (standard base64), exactly one.
    """
    if ("text" in body) == ("body_b64" in body):
        raise ApiError("BAD_REQUEST", "give exactly one of text and body_b64")
    if "text" in body:
        payload = _string(body["text"], "text").encode("utf-8")
    else:
        encoded = _string(body["body_b64"], "body_b64")
        try:
            payload = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise ApiError("BAD_REQUEST", "body_b64 is not valid base64")
    if len(payload) > maxBytes:
        raise ApiError(
            "MESSAGE_TOO_LARGE",
            "body of {} bytes exceeds the limit of {}".format(len(payload), maxBytes),
        )
    return payload


def _contentType(body):
    contentType = _optionalString(body, "content_type")
    if len(contentType.encode("utf-8")) > MAX_CONTENT_TYPE:
        raise ApiError(
            "BAD_REQUEST", "content_type is longer than {} bytes".format(MAX_CONTENT_TYPE)
        )
    return contentType


def _idempotencyKey(request):
    values = request.requestHeaders.getRawHeaders(b"idempotency-key")
    if not values:
        raise ApiError("BAD_REQUEST", "the Idempotency-Key header is required")
    if len(values) > 1:
        raise ApiError("BAD_REQUEST", "give one Idempotency-Key header")
    try:
        key = values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ApiError("BAD_REQUEST", "Idempotency-Key is not UTF-8")
    if not key:
        raise ApiError("BAD_REQUEST", "Idempotency-Key is empty")
    return key


# -- JSON shapes of the answers --------------------------------------------------


def _platformName(platform):
    if platform == pb.PLATFORM_UNSPECIFIED:
        return "unspecified"
    try:
        return pb.Platform.Name(platform).lower()
    except ValueError:
        return str(platform)


def _groupJSON(group, withRole=False):
    result = {
        "group_id": group.group_id,
        "name": group.name,
        "member_count": group.member_count,
        "created_ms": group.created_ms,
    }
    if withRole:
        result["role"] = _ROLE_NAMES.get(group.role, "member")
    return result


def _memberJSON(member):
    return {
        "uid": member.uid,
        "role": _ROLE_NAMES.get(member.role, "member"),
        "joined_ms": member.joined_ms,
    }


def _deliveryJSON(delivery):
    message = delivery.message
    return {
        "message_id": message.id,
        "created_ms": message.created_ms,
        "duplicate": bool(delivery.duplicate),
        # The system sender has no inbox, so no seq of its own.
        "seqs": {uid: seq for uid, seq in delivery.seqs.items() if uid != SYSTEM},
    }


# -- the handlers -----------------------------------------------------------------


class Api:
    """
    The handlers of L{ROUTES}.  Each is called as C{handler(params, body,
    request)}: the decoded path parameters, the parsed JSON body (C{{}} for
    methods without one) and the L{ApiRequest}; it returns (or a
    L{Deferred} fires with) the JSON answer, or a L{_Answer}, or raises
    L{ApiError} or an error of the logic layer (see L{Router}).

    @ivar factory: the L{imserver.protocol.GateFactory}: its C{messenger},
        C{groups}, C{registry}, C{broadcast} and connections.
    @ivar directory: the L{IGateDirectory} of the dispatcher.
    """

    def __init__(self, factory, directory, secret, clock, rng=None):
        self.factory = factory
        self.settings = factory.settings
        self.directory = directory
        self._secret = secret
        self.clock = clock
        self.random = rng if rng is not None else random.SystemRandom()
        self.startedAt = clock.seconds()

    def _nowMs(self):
        return int(self.clock.seconds() * 1000)

    # -- service --------------------------------------------------------------

    def health(self, params, body, request):
        """
        Liveness (C{/health}, C{/health/live}): the process runs and
        answers, whatever the state of the store.
        """
        return {"status": "ok"}

    def ready(self, params, body, request):
        """
        Readiness (C{/health/ready}): one read from the message store (in
        cluster mode a Redis command), answered within L{READY_TIMEOUT}
        seconds; else C{UNAVAILABLE}, as the routes that need the store
        answer meanwhile.
        """
        d = maybeDeferred(self.factory.store.head, SYSTEM)
        d.addTimeout(READY_TIMEOUT, self.clock)
        return d.addCallbacks(lambda _: {"status": "ok"}, self._notReady)

    def _notReady(self, failure):
        # The route needs no token: say what is wrong, not the details.
        if failure.check(TimeoutError, CancelledError):
            why = "did not answer within {:g} s".format(READY_TIMEOUT)
        else:
            if not failure.check(Unavailable):
                Router.log.failure("the readiness check failed", failure)
            why = "is unavailable"
        raise ApiError("UNAVAILABLE", "not ready: the message store " + why,
                       [(b"Retry-After", b"1")])

    def stats(self, params, body, request):
        factory = self.factory

        def answer(sessions):
            return {
                "gate_id": factory.gateId,
                "version": __version__,
                "uptime_seconds": int(self.clock.seconds() - self.startedAt),
                "connections": len(factory.connections),
                "sessions": sessions,
            }

        return factory.registry.count().addCallback(answer)

    def gates(self, params, body, request):
        def answer(gates):
            addresses = [
                {"host": host, "port": port, "tls": tls, "gate_id": gateId}
                for gateId, listed in sorted(gates.items())
                for host, port, tls in listed
            ]
            self.random.shuffle(addresses)
            return {"addresses": addresses}

        return self.directory.gates().addCallback(answer)

    # -- tokens and messages ------------------------------------------------------

    def createToken(self, params, body, request):
        body = _fields(body, {"uid", "ttl"})
        uid = _uid(_required(body, "uid"))
        ttl = _integer(body, "ttl", DEFAULT_TOKEN_TTL, 1, MAX_TOKEN_TTL)
        now = self.clock.seconds()
        token = mintToken(self._secret, uid, ttl, now)
        return {"uid": uid, "token": token, "expires_at": int(now + ttl)}

    def createMessage(self, params, body, request):
        body = _fields(
            body, {"from", "to", "uids", "group_id", "text", "body_b64", "content_type"}
        )
        key = _idempotencyKey(request)
        sender = _uid(body["from"], "from") if "from" in body else SYSTEM
        targets = [name for name in ("to", "uids", "group_id") if name in body]
        if len(targets) != 1:
            raise ApiError("BAD_REQUEST", "give exactly one of to, uids and group_id")
        to = uids = groupId = None
        if "to" in body:
            to = _uid(body["to"], "to")
        elif "uids" in body:
            uids = body["uids"]
            if not isinstance(uids, list) or not uids:
                raise ApiError("BAD_REQUEST", "uids must be a non-empty list of uids")
            if len(uids) > self.settings.max_group_size:
                raise ApiError(
                    "BAD_REQUEST",
                    "uids lists more than {} users".format(self.settings.max_group_size),
                )
            uids = [_uid(uid, "uids") for uid in uids]
        else:
            groupId = _uid(body["group_id"], "group_id")
        payload = _payload(body, self.settings.max_message_body)
        contentType = _contentType(body)
        d = maybeDeferred(
            self.factory.messenger.storeMessage, sender, key, payload, contentType,
            to=to, uids=uids, groupId=groupId,
        )
        return d.addCallback(_deliveryJSON)

    def broadcast(self, params, body, request):
        body = _fields(body, {"text", "body_b64", "content_type"})
        payload = _payload(body, self.settings.max_message_body)
        contentType = _contentType(body)
        return {"sessions": self.factory.broadcast(payload, contentType)}

    # -- users ------------------------------------------------------------------

    def presence(self, params, body, request):
        uid = _uid(params["uid"])

        def answer(sessions):
            devices = sorted(
                (
                    {
                        "device_id": s.deviceId,
                        "platform": _platformName(s.platform),
                        "session_id": s.sessionId,
                        "gate_id": s.gateId,
                    }
                    for s in sessions
                ),
                key=lambda device: device["device_id"],
            )
            return {"uid": uid, "online": bool(devices), "devices": devices}

        return self.factory.registry.sessionsFor(uid).addCallback(answer)

    def kick(self, params, body, request):
        uid = _uid(params["uid"])
        body = _fields(body, {"device_id", "message"})
        deviceId = None
        if "device_id" in body:
            deviceId = _string(body["device_id"], "device_id")
            try:
                validateDeviceId(deviceId)
            except ValueError as e:
                raise ApiError("BAD_REQUEST", str(e))
        message = _optionalString(body, "message", "kicked by the server")
        if len(message.encode("utf-8")) > MAX_KICK_MESSAGE:
            raise ApiError(
                "BAD_REQUEST", "message is longer than {} bytes".format(MAX_KICK_MESSAGE)
            )

        def kickThem(sessions):
            kicked = []
            for session in sessions:
                if deviceId is None or session.deviceId == deviceId:
                    session.kick(pb.ADMIN, message)
                    kicked.append(session.deviceId)
            return {"uid": uid, "kicked": sorted(kicked)}

        return self.factory.registry.sessionsFor(uid).addCallback(kickThem)

    def userGroups(self, params, body, request):
        uid = _uid(params["uid"])
        d = self.factory.groups.groupsOf(uid)
        return d.addCallback(
            lambda groups: {"uid": uid, "groups": [_groupJSON(g, True) for g in groups]}
        )

    # -- groups -------------------------------------------------------------------

    def createGroup(self, params, body, request):
        body = _fields(body, {"group_id", "name", "owner"})
        groupId = _string(_required(body, "group_id"), "group_id")
        name = _optionalString(body, "name")
        owner = _uid(_required(body, "owner"), "owner")
        d = self.factory.groups.create(groupId, name, owner, self._nowMs())
        return d.addCallback(lambda group: _Answer(201, _groupJSON(group)))

    def getGroup(self, params, body, request):
        groupId = params["group_id"]

        def answer(group):
            if group is None:
                raise GroupNotFound()
            return _groupJSON(group)

        return self.factory.groups.group(groupId).addCallback(answer)

    def deleteGroup(self, params, body, request):
        groupId = params["group_id"]
        d = self.factory.groups.delete(groupId)
        return d.addCallback(lambda _: {"group_id": groupId, "deleted": True})

    def members(self, params, body, request):
        groupId = params["group_id"]
        d = self.factory.groups.members(groupId)
        return d.addCallback(
            lambda members: {
                "group_id": groupId,
                "members": [_memberJSON(m) for m in members],
            }
        )

    def addMembers(self, params, body, request):
        groupId = params["group_id"]
        body = _fields(body, {"members"})
        given = _required(body, "members")
        if not isinstance(given, list) or not given:
            raise ApiError("BAD_REQUEST", "members must be a non-empty list")
        members = []
        for entry in given:
            if not isinstance(entry, dict):
                raise ApiError("BAD_REQUEST", "each member must be an object")
            entry = _fields(entry, {"uid", "role"})
            uid = _uid(_required(entry, "uid"))
            role = _optionalString(entry, "role", "member")
            if role not in _ROLES:
                raise ApiError("BAD_REQUEST", "role must be member or admin")
            members.append((uid, _ROLES[role]))
        d = self.factory.groups.setMembers(groupId, members, self._nowMs())
        return d.addCallback(lambda added: {"group_id": groupId, "added": list(added)})

    def removeMember(self, params, body, request):
        groupId = params["group_id"]
        uid = _uid(params["uid"])
        d = self.factory.groups.removeMembers(groupId, [uid])
        return d.addCallback(
            lambda removed: {"group_id": groupId, "uid": uid, "removed": uid in removed}
        )


# -- routing ------------------------------------------------------------------------


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


def _decodePath(path):
    """
    Split a request path into percent-decoded UTF-8 segments.
    """
    try:
        return [unquote_to_bytes(s).decode("utf-8") for s in path.split(b"/")[1:]]
    except UnicodeDecodeError:
        raise ApiError("BAD_REQUEST", "the path is not UTF-8 once percent-decoded")


def _logicError(failure, params):
    """
    Turn an error of the logic layer into an L{ApiError}; anything else
    stays as it is (an internal error).
    """
    error = failure.value
    groupId = params.get("group_id")
    if isinstance(error, ApiError):
        return error
    if isinstance(error, GroupNotFound):
        return ApiError(
            "GROUP_NOT_FOUND",
            "no group {!r}".format(groupId) if groupId is not None else "no such group",
        )
    if isinstance(error, GroupExists):
        return ApiError("GROUP_EXISTS", str(error) or "the group exists already")
    if isinstance(error, GroupFull):
        return ApiError("GROUP_FULL", str(error) or "the group would exceed its maximum size")
    if isinstance(error, RPCError):
        name = pb.ErrorCode.Name(error.code) if error.code in pb.ErrorCode.values() else ""
        if name in ("BAD_REQUEST", "MESSAGE_TOO_LARGE", "NOT_MEMBER", "UNAVAILABLE"):
            headers = [(b"Retry-After", b"1")] if name == "UNAVAILABLE" else []
            return ApiError(name, error.message, headers)
    return None


class Router(Resource):
    """
    Dispatches requests to the handlers of an L{Api} by method and path,
    checks the admin token, and writes every answer as JSON.

    Order of checks: the token (except on L{PUBLIC_PATHS}: a request without
    it learns nothing about the routes), then the route (404), the method
    (405), the body (413 already while reading, then 400), the handler.
    """

    log = Logger()
    isLeaf = True

    def __init__(self, api, adminToken, clock):
        Resource.__init__(self)
        self.api = api
        self._routes = [
            _Route(method, template, getattr(api, name)) for method, template, name in ROUTES
        ]
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
        d.addCallback(lambda result: (
            (result.status, result.body, [])
            if isinstance(result, _Answer) else (200, result, [])
        ))
        d.addErrback(self._failed, request, context)
        d.addCallback(self._respond, request, context, started, gone)
        d.addErrback(lambda f: self.log.failure("writing an API answer failed", f))
        return NOT_DONE_YET

    def _dispatch(self, request, context):
        path = request.path
        if path not in PUBLIC_PATHS and not self.authorized(request):
            raise ApiError(
                "UNAUTHORIZED",
                "missing or wrong admin token (Authorization: Bearer <token>)",
                [(b"WWW-Authenticate", b'Bearer realm="imserver"')],
            )
        segments = _decodePath(path)
        found = []
        for route in self._routes:
            params = route.match(segments)
            if params is not None:
                found.append((route, params))
        if not found:
            raise ApiError("NOT_FOUND", "no such route")
        method = request.method.decode("ascii", "replace")
        for route, params in found:
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
        body = _parseBody(request) if request.method in _BODY_METHODS else {}
        context["body"] = body
        return route.handler(params, body, request)

    def _failed(self, failure, request, context):
        error = _logicError(failure, context["params"])
        if error is None:
            self.log.failure(
                "API {method} {route} failed", failure,
                method=request.method.decode("ascii", "replace"),
                route=context["route"],
            )
            error = ApiError("INTERNAL", "internal error")
        return error.status, {"error": {"code": error.code, "message": error.message}}, [
            (b"Cache-Control", b"no-store")
        ] + error.headers

    def _respond(self, answer, request, context, started, gone):
        status, body, headers = answer
        if not gone:
            data = _encode(body)
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"%d" % (len(data),))
            request.setHeader(b"Server", b"imserver")
            for name, value in headers:
                request.setHeader(name, value)
            request.write(data)
            request.finish()
        fields = {"method": request.method.decode("ascii", "replace")[:16],
                  "route": context["route"] or request.path.decode("utf-8", "replace")[:200],
                  "status": status,
                  "duration_ms": round((self._clock.seconds() - started) * 1000, 1)}
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
        the OpenAPI document must describe besides L{ROUTES}).
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
        body = _errorBody(
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
            self, resource, timeout=IDLE_TIMEOUT, reactor=reactor,
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


def makeSite(factory, directory, secret, adminToken, reactor, rng=None):
    """
    The API site for one gate.

    @param factory: the L{imserver.protocol.GateFactory}.
    @param directory: the L{IGateDirectory} for the dispatcher.
    @param secret: the client-token secret (L{bytes}), for C{POST /v1/tokens}.
    @param adminToken: the bearer token (L{bytes}) every route but
        C{/health} requires.
    @param reactor: the reactor (connection timeouts, the clock).
    @return: an L{ApiSite}, with the gate's Prometheus metrics at
        C{/metrics}.
    """
    from prometheus_client.twisted import MetricsResource

    api = Api(factory, directory, secret, reactor, rng)
    root = ApiRoot(Router(api, adminToken, reactor))
    root.mount("metrics", MetricsResource(factory.metrics.registry))
    return ApiSite(root, factory.settings.api_max_body, reactor)


def loadAdminToken(dataDir, tokenFile=None):
    """
    The admin bearer token: the content of C{tokenFile} if given (which
    must exist), else of C{<dataDir>/admin-token}, generated if absent (32
    random bytes as hex, mode 0600), like the client-token secret.

    @param dataDir: a L{FilePath}.
    @param tokenFile: a path (L{str}) or L{None}.
    @rtype: L{bytes}
    @raise ValueError: if it cannot be read or is shorter than 16 bytes.
    """
    if tokenFile is None:
        path = dataDir.child(ADMIN_TOKEN_FILE_NAME)
        if not path.exists():
            createSecretFile(path)
            Router.log.info("generated a new HTTP API admin token in {path}", path=path.path)
    else:
        path = FilePath(tokenFile)
    return loadSecret(secretFile=path, environ={})


# -- the dispatcher's directory ------------------------------------------------------


@implementer(IGateDirectory)
class MemoryGateDirectory:
    """
    The gates of one process (so, this gate): a dictionary.
    """

    def __init__(self):
        self._gates = {}

    def advertise(self, gateId, addresses):
        self._gates[gateId] = [tuple(a) for a in addresses]
        return succeed(None)

    def withdraw(self, gateId):
        self._gates.pop(gateId, None)
        return succeed(None)

    def gates(self):
        return succeed({gateId: list(a) for gateId, a in self._gates.items()})
