# -*- test-case-name: tests.test_webhooks -*-
"""
Webhook events: what the app backend is told, as JSON.

Producers make an L{OutboxEvent} (type, ordering key, the C{data} object as
JSON bytes); the outbox (L{imserver.interfaces.IOutbox}) keeps it as an
L{OutboxEntry}, with an id giving its place and an event id for the
receiver's idempotency, until the backend has acknowledged it.
L{envelope} makes the body that is posted.  The schema is in docs/api.md,
"Webhooks", and docs/openapi.yaml; tests/test_webhooks.py holds the docs to
it.

Order is kept per ordering key: the user (C{user.*}, and C{message.stored}
by its sender) or the group (C{group.changed}).
"""

import base64
import json
from dataclasses import dataclass

from imserver.pb import im_pb2 as pb

USER_ONLINE = "user.online"
USER_OFFLINE = "user.offline"
MESSAGE_STORED = "message.stored"
GROUP_CHANGED = "group.changed"

#: Every event type, in the order the docs list them.
EVENT_TYPES = (USER_ONLINE, USER_OFFLINE, MESSAGE_STORED, GROUP_CHANGED)

#: C{group.changed} C{change} values.
GROUP_CREATED = "created"
GROUP_DELETED = "deleted"
MEMBERS_ADDED = "members_added"
MEMBERS_REMOVED = "members_removed"

#: The ordering key of a group's events is this prefix and the group id: a
#: control character, which no uid contains.
GROUP_KEY_PREFIX = "\x1fgroup:"

_PLATFORMS = {value: name.lower() for name, value in pb.Platform.items()}


@dataclass(frozen=True)
class OutboxEvent:
    """
    An event to keep until it is delivered.

    @ivar type: one of L{EVENT_TYPES}.
    @ivar key: the ordering key: events of one key are delivered in the
        order they were recorded.
    @ivar data: the event's C{data} object, UTF-8 JSON bytes.
    @ivar presence: for C{user.online}/C{user.offline}, C{(uid, deviceId,
        gateId, sessionId)}: the outbox also keeps who it last reported
        online (L{imserver.interfaces.IOutbox.presentOn}); else L{None}.
    """

    type: str
    key: str
    data: bytes
    presence: tuple | None = None


@dataclass(frozen=True)
class OutboxEntry:
    """
    An event kept in the outbox.

    @ivar id: its place in the outbox: ids increase in the order events
        were recorded (not necessarily dense).
    @ivar eventId: the event id the receiver sees (stable across retries,
        unique per store).
    @ivar createdMs: when it was recorded, Unix epoch ms.
    """

    id: int
    eventId: str
    type: str
    key: str
    createdMs: int
    data: bytes


def _json(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode(
        "utf-8"
    )


def eventId(storeId, number):
    """
    The event id of outbox entry C{number} of the store C{storeId} (a random
    token made when the store was created).
    """
    return "evt_{}_{}".format(storeId, number)


def envelope(entry):
    """
    The JSON body posted for C{entry}: C{{"id", "type", "created_ms",
    "data"}}, bytes.
    """
    head = _json({"id": entry.eventId, "type": entry.type, "created_ms": entry.createdMs})
    return head[:-1] + b',"data":' + entry.data + b"}"


def userOnline(uid, deviceId, platform, gateId, sessionId):
    """
    A device of C{uid} authenticated on gate C{gateId}.
    """
    return OutboxEvent(
        USER_ONLINE,
        uid,
        _json(
            {
                "uid": uid,
                "device_id": deviceId,
                "platform": _PLATFORMS.get(platform, "platform_unspecified"),
                "gate_id": gateId,
                "session_id": sessionId,
            }
        ),
        (uid, deviceId, gateId, sessionId),
    )


def userOffline(uid, deviceId, gateId, sessionId, reason):
    """
    A device of C{uid} is no longer connected.

    @param reason: C{"closed"} (its connection ended), C{"kicked"} or
        C{"gate_restarted"} (the gate stopped without closing it: reported
        when it starts again).
    """
    return OutboxEvent(
        USER_OFFLINE,
        uid,
        _json(
            {
                "uid": uid,
                "device_id": deviceId,
                "gate_id": gateId,
                "session_id": sessionId,
                "reason": reason,
            }
        ),
        (uid, deviceId, gateId, sessionId),
    )


def messageStored(message, recipients):
    """
    A message was stored (1:1, group, or a push of the HTTP API: sender
    C{""}).

    @param message: the stored L{pb.Message}.
    @param recipients: the uids whose inboxes it was appended to, the
        sender's own excluded.
    """
    data = {
        "message_id": str(message.id),
        "client_msg_id": message.client_msg_id,
        "sender": message.sender,
        "body": base64.b64encode(message.body).decode("ascii"),
        "content_type": message.content_type,
        "created_ms": message.created_ms,
    }
    if message.group_id:
        data["group_id"] = message.group_id
    else:
        data["to"] = message.recipient
    data["recipients"] = [uid for uid in recipients if uid != message.sender]
    return OutboxEvent(MESSAGE_STORED, message.sender, _json(data))


def groupChanged(groupId, change, uids=(), name=None):
    """
    A group was created or deleted, or members were added or removed.

    @param change: L{GROUP_CREATED}, L{GROUP_DELETED}, L{MEMBERS_ADDED} or
        L{MEMBERS_REMOVED}.
    @param uids: the members concerned (the owner for C{created}).
    """
    data = {"group_id": groupId, "change": change, "uids": list(uids)}
    if name is not None:
        data["name"] = name
    return OutboxEvent(GROUP_CHANGED, GROUP_KEY_PREFIX + groupId, _json(data))
