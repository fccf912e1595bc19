# -*- test-case-name: tests.test_store -*-
"""
The Redis store's key names.

Every key of one user carries the same hash tag, L{userTag}, C{{u:<hex>}}
(L{imserver.redisclient}, shared with the session registry's
C{im:{u:<hex>}:sessions}); groups are tagged the same way, C{{g:<hex>}}.
(The empty uid is the system sender, whose tag is C{{u:}}.)

  - C{im:{u:<hex>}:head}: string, the last seq given in the user's inbox.
    Never deleted, so a seq is never given twice.
  - C{im:{u:<hex>}:inbox}: sorted set, score = seq, member =
    C{"<seq>:<message id>:<outgoing 0|1>:<created_ms>"}.
  - C{im:{u:<hex>}:cursors}: hash, device id -> C{"<seq>:<updated_ms>"}.
  - C{im:{u:<hex>}:groups}: set of the group ids the user is a member of.
  - C{im:d:{u:<hex of sender>}:<client_msg_id>}: dedup record,
    C{"<message id>:<sender's seq>:<created_ms>"}, with C{PX} = the dedup
    window.  (Same hash tag as the sender's other keys, but a prefix of its
    own, so retention's C{SCAN} of L{USER_KEYS} does not list it.)
  - C{im:m:<message id>}: the serialized L{pb.Message}, stored once
    however many inboxes reference it (optionally with C{PX} =
    C{bodyTtlMs}, a backstop).
  - C{im:bodies}: sorted set of message ids scored by C{created_ms}, so
    retention finds old bodies without scanning.
  - C{im:{g:<hex>}:info}: hash C{name}, C{created}; C{im:{g:<hex>}:members}:
    hash uid -> C{"<role>:<joined_ms>:<hex of uid>"} (the hex, so a group
    message finds its members' keys without hex-encoding in Lua).
  - C{im:msgid}: the message id counter; C{im:epoch}, C{im:seqfloor},
    C{im:runid}: the seq floor and the inbox epoch (docs/architecture.md,
    "Seqs, the floor and the epoch").

The webhook outbox (L{imserver.interfaces.IOutbox}), written only once
the store records events:

  - C{im:outbox}: stream, one entry per event, id C{<entry id>-0},
    fields C{c} (created ms), C{t} (type), C{k} (ordering key), C{d}
    (the C{data} JSON).
  - C{im:outbox:last}: the last entry id given: C{max(last + 1, created
    ms * 1000)}, so ids increase, and stay above every earlier one even if
    Redis lost this key.
  - C{im:outbox:store}: the store id of the event ids, set (C{NX}) with
    the first event: a Redis that lost its data makes a new one.
  - C{im:outbox:lease}: the gate sending the outbox's events, with C{PX}.
  - C{im:retention:lease}: the gate running the retention passes, with
    C{PX} (L{imserver.service.RetentionService}).
  - C{im:presence:<hex of gate id>}: hash, the devices last reported
    online on that gate: field C{<uid><device id><session id>}, each
    packed C{<length>:<bytes>} (L{imserver.store.redis.unpack}), value
    the time it went online (ms).

The scripts in C{scripts/} build the same names from a tag's hex when
they reach keys they were not passed (a recipient's C{head} and C{inbox},
C{im:m:<id>}, a member's C{groups}, a group's keys in C{groupsOf}): a change
here is a change there.
"""

from imserver.redisclient import userKey, userTag

#: The global keys.
EPOCH_KEY = "im:epoch"
SEQFLOOR_KEY = "im:seqfloor"
RUNID_KEY = "im:runid"
MSGID_KEY = "im:msgid"
BODIES_KEY = "im:bodies"

#: The webhook outbox's keys.
OUTBOX_KEY = "im:outbox"
OUTBOX_LAST_KEY = "im:outbox:last"
OUTBOX_STORE_KEY = "im:outbox:store"
OUTBOX_LEASE_KEY = "im:outbox:lease"

#: The gate running the retention passes.
RETENTION_LEASE_KEY = "im:retention:lease"

#: The C{SCAN MATCH} pattern of the user keys (not the dedup records).
USER_KEYS = "im:{u:*"


def tagHex(text):
    """
    The lowercase hex of C{text}'s UTF-8: what a user's or a group's hash
    tag carries after C{u:} or C{g:}.
    """
    return text.encode("utf-8").hex()


def tagHexOf(key):
    """
    The hex of the user tag in C{key}, a user key (L{bytes}, as C{SCAN}
    answers it).
    """
    return key[len(b"im:{u:") : key.index(b"}")]


def dedupKey(sender, clientMsgId):
    """
    The dedup record of C{(sender, clientMsgId)}.
    """
    return "im:d:{%s}:%s" % (userTag(sender), clientMsgId)


def groupKey(groupId, name):
    """
    The key C{name} (C{info}, C{members}) of a group.
    """
    return "im:{g:%s}:%s" % (tagHex(groupId), name)


def bodyKey(messageId):
    """
    The key holding the serialized message C{messageId}.
    """
    return "im:m:%d" % (messageId,)


def presenceKey(gateId):
    """
    The hash of the devices last reported online on gate C{gateId}.
    """
    return "im:presence:" + tagHex(gateId)


def presenceField(uid, deviceId, sessionId):
    """
    A device's field in its gate's L{presenceKey}: the three packed as
    L{imserver.store.redis.unpack} splits them.
    """
    parts = []
    for text in (uid, deviceId, sessionId):
        data = text.encode("utf-8")
        parts.append(b"%d:%s" % (len(data), data))
    return b"".join(parts)


__all__ = [
    "EPOCH_KEY",
    "SEQFLOOR_KEY",
    "RUNID_KEY",
    "MSGID_KEY",
    "BODIES_KEY",
    "OUTBOX_KEY",
    "OUTBOX_LAST_KEY",
    "OUTBOX_STORE_KEY",
    "OUTBOX_LEASE_KEY",
    "RETENTION_LEASE_KEY",
    "USER_KEYS",
    "userTag",
    "userKey",
    "tagHex",
    "tagHexOf",
    "dedupKey",
    "groupKey",
    "bodyKey",
    "presenceKey",
    "presenceField",
]
