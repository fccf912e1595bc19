# -*- test-case-name: tests.test_api -*-
"""
The API's routes (L{ROUTES}) and their handlers (L{Api}), and L{makeSite},
which assembles them with the HTTP layer (L{imserver.api.http}) into the
site of one gate.
"""

import random

from twisted.internet.defer import CancelledError, TimeoutError, maybeDeferred

from imserver import __version__
from imserver.api.errors import ApiError
from imserver.api.http import Answer, ApiRoot, ApiSite, Router
from imserver.api.validation import (
    checkFields,
    contentTypeField,
    deviceIdValue,
    groupIdValue,
    idempotencyKey,
    integerField,
    messagePayload,
    optionalString,
    requiredField,
    stringValue,
    uidValue,
)
from imserver.auth import mintToken
from imserver.errors import BadRequest, Unavailable
from imserver.identifiers import validateLength
from imserver.jwtauth import HMAC_ALGORITHMS, mintJWT
from imserver.pb import im_pb2 as pb
from imserver.store import SYSTEM, GroupNotFound

#: Token lifetime when C{POST /v1/tokens} gives no C{ttl}, in seconds.
DEFAULT_TOKEN_TTL = 86400
#: The longest token lifetime C{POST /v1/tokens} accepts: 366 days.
MAX_TOKEN_TTL = 366 * 86400
#: The token forms C{POST /v1/tokens} mints (C{format}): C{v1.<expiry>.<hmac>}
#: (the default), or a JWT signed with the secret.
TOKEN_FORMATS = ("v1", "jwt")
#: Longest kick message, in UTF-8 bytes.
MAX_KICK_MESSAGE = 256
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

_ROLES = {"member": pb.ROLE_MEMBER, "admin": pb.ROLE_ADMIN, "owner": pb.ROLE_OWNER}
_ROLE_NAMES = {value: name for name, value in _ROLES.items()}


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
    The handlers of L{ROUTES}, called by the L{Router}.  They return at
    once or a L{Deferred}; a malformed request raises L{BadRequest}.

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
        raise ApiError(
            "UNAVAILABLE", "not ready: the message store " + why, [(b"Retry-After", b"1")]
        )

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
        body = checkFields(body, {"uid", "ttl", "format"})
        uid = uidValue(requiredField(body, "uid"))
        ttl = integerField(body, "ttl", DEFAULT_TOKEN_TTL, 1, MAX_TOKEN_TTL)
        tokenFormat = optionalString(body, "format", "v1")
        if tokenFormat not in TOKEN_FORMATS:
            raise BadRequest("format must be one of {}".format(", ".join(TOKEN_FORMATS)))
        now = self.clock.seconds()
        if tokenFormat == "jwt":
            token = self._mintJWT(uid, ttl, now)
        else:
            token = mintToken(self._secret, uid, ttl, now)
        return {"uid": uid, "token": token, "expires_at": int(now + ttl)}

    def _mintJWT(self, uid, ttl, now):
        """
        A JWT the gate accepts: HMAC-signed with the secret (HS256 unless
        C{--jwt-algorithms} leaves it out), with the C{aud} and C{iss} the
        gate requires.
        """
        verifier = getattr(self.factory.authenticator, "jwt", None)
        algorithms = verifier.algorithms if verifier is not None else HMAC_ALGORITHMS
        hmacs = [alg for alg in HMAC_ALGORITHMS if alg in algorithms]
        if not hmacs:
            raise BadRequest("this gate accepts no HS256, HS384 or HS512 JWT (--jwt-algorithms)")
        return mintJWT(
            self._secret,
            uid,
            ttl,
            now,
            hmacs[0],
            getattr(verifier, "audience", None),
            getattr(verifier, "issuer", None),
        )

    def createMessage(self, params, body, request):
        body = checkFields(
            body, {"from", "to", "uids", "group_id", "text", "body_b64", "content_type"}
        )
        key = idempotencyKey(request)
        sender = uidValue(body["from"], "from") if "from" in body else SYSTEM
        targets = [name for name in ("to", "uids", "group_id") if name in body]
        if len(targets) != 1:
            raise BadRequest("give exactly one of to, uids and group_id")
        to = uids = groupId = None
        if "to" in body:
            to = uidValue(body["to"], "to")
        elif "uids" in body:
            uids = body["uids"]
            if not isinstance(uids, list) or not uids:
                raise BadRequest("uids must be a non-empty list of uids")
            if len(uids) > self.settings.max_group_size:
                raise BadRequest(
                    "uids lists more than {} users".format(self.settings.max_group_size)
                )
            uids = [uidValue(uid, "uids[{}]".format(i)) for i, uid in enumerate(uids)]
        else:
            groupId = groupIdValue(body["group_id"])
        payload = messagePayload(body, self.settings.max_message_body)
        contentType = contentTypeField(body)
        d = maybeDeferred(
            self.factory.messenger.storeMessage,
            sender,
            key,
            payload,
            contentType,
            to=to,
            uids=uids,
            groupId=groupId,
        )
        return d.addCallback(_deliveryJSON)

    def broadcast(self, params, body, request):
        body = checkFields(body, {"text", "body_b64", "content_type"})
        payload = messagePayload(body, self.settings.max_message_body)
        contentType = contentTypeField(body)

        def answer(result):
            sessions, gates = result
            return {"sessions": sessions, "gates": gates}

        return self.factory.broadcastAll(payload, contentType).addCallback(answer)

    # -- users ------------------------------------------------------------------

    def presence(self, params, body, request):
        uid = uidValue(params["uid"])

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
        uid = uidValue(params["uid"])
        body = checkFields(body, {"device_id", "message"})
        deviceId = deviceIdValue(body["device_id"]) if "device_id" in body else None
        message = optionalString(body, "message", "kicked by the server")
        validateLength("message", message, MAX_KICK_MESSAGE)

        def kickThem(sessions):
            kicked = []
            for session in sessions:
                if deviceId is None or session.deviceId == deviceId:
                    session.kick(pb.ADMIN, message)
                    kicked.append(session.deviceId)
            return {"uid": uid, "kicked": sorted(kicked)}

        return self.factory.registry.sessionsFor(uid).addCallback(kickThem)

    def userGroups(self, params, body, request):
        uid = uidValue(params["uid"])
        d = self.factory.groups.groupsOf(uid)
        return d.addCallback(
            lambda groups: {"uid": uid, "groups": [_groupJSON(g, True) for g in groups]}
        )

    # -- groups -------------------------------------------------------------------

    def createGroup(self, params, body, request):
        body = checkFields(body, {"group_id", "name", "owner"})
        groupId = stringValue(requiredField(body, "group_id"), "group_id")
        name = optionalString(body, "name")
        owner = uidValue(requiredField(body, "owner"), "owner")
        d = self.factory.groups.create(groupId, name, owner, self._nowMs())
        return d.addCallback(lambda group: Answer(201, _groupJSON(group)))

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
        body = checkFields(body, {"members"})
        given = requiredField(body, "members")
        if not isinstance(given, list) or not given:
            raise BadRequest("members must be a non-empty list")
        members = []
        for entry in given:
            if not isinstance(entry, dict):
                raise BadRequest("each member must be an object")
            entry = checkFields(entry, {"uid", "role"})
            uid = uidValue(requiredField(entry, "uid"))
            role = optionalString(entry, "role", "member")
            if role not in _ROLES:
                raise BadRequest("role must be member or admin")
            members.append((uid, _ROLES[role]))
        d = self.factory.groups.setMembers(groupId, members, self._nowMs())
        return d.addCallback(lambda added: {"group_id": groupId, "added": list(added)})

    def removeMember(self, params, body, request):
        groupId = params["group_id"]
        uid = uidValue(params["uid"])
        d = self.factory.groups.removeMembers(groupId, [uid])
        return d.addCallback(
            lambda removed: {"group_id": groupId, "uid": uid, "removed": uid in removed}
        )


# -- the site -----------------------------------------------------------------------


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
    root = ApiRoot(Router(api, ROUTES, PUBLIC_PATHS, adminToken, reactor))
    root.mount("metrics", MetricsResource(factory.metrics.registry))
    return ApiSite(root, factory.settings.api_max_body, reactor)
