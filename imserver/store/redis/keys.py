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

On a Redis Cluster (L{imserver.store.redis.RedisMessageStore} with
C{cluster=True}) the user, dedup and group keys are the same, and a
script only touches keys of one slot, so the global keys are replaced:

  - C{im:{s:<n>}:epoch}, C{im:{s:<n>}:seqfloor}, C{im:{s:<n>}:runid}:
    the epoch, the seq floor and the run id of one slot, guarding the
    inboxes of that slot; C{s:<n>} (L{slotTag}) is the first such tag in
    the slot, so these keys are in the slot of the users they guard.
  - C{im:m:{s:<n>}:<message id>}: a body, stored in every slot holding an
    inbox entry of it (and in the sender's), so C{fetch} reads one slot;
    C{im:{s:<n>}:bodies}: that slot's index of them by C{created_ms}.
  - C{im:a:{s:<n>}:<message id>}: the seqs a deliver gave in that slot
    (packed uid, seq), with C{PX} = the dedup window: a retry answers them
    instead of appending again.
  - The dedup record C{im:d:{u:<hex of sender>}:<client_msg_id>} is a hash:
    C{id}, C{seq}, C{created}, C{here} (the packed uid, seq of the sender's
    slot), C{there} (the packed uid, tag hex of the recipients in other
    slots).
  - The outbox and the presence ledger share the tag C{{im}}:
    C{im:{im}:outbox}, C{im:{im}:outbox:last}, C{im:{im}:outbox:store},
    C{im:{im}:presence:<hex of gate id>}, and C{im:{im}:stored:<message
    id>}, the marker of a C{message.stored} event recorded (C{PX} = the
    dedup window).  C{im:msgid} and the leases are used alone, and keep
    their names.

The scripts in C{scripts/} build the same names from a tag's hex when
they reach keys they were not passed (a recipient's C{head} and C{inbox},
C{im:m:<id>}, a member's C{groups}, a group's keys in C{groupsOf}): a change
here is a change there.
"""

from imserver.redisclient import userKey, userTag
from imserver.rediscluster import keySlot, slotTag

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


def retentionLeaseKey(address):
    """
    On a Redis Cluster, the lease of the gate running the retention passes
    of the primary at C{address} (C{(host, port)}):
    C{im:retention:lease:<host>:<port>}.
    """
    return "%s:%s:%d" % (RETENTION_LEASE_KEY, address[0], address[1])


#: The C{SCAN MATCH} pattern of the user keys (not the dedup records).
USER_KEYS = "im:{u:*"


#: The cluster mode's outbox keys (one slot: C{{im}}).
CLUSTER_OUTBOX_KEY = "im:{im}:outbox"
CLUSTER_OUTBOX_LAST_KEY = "im:{im}:outbox:last"
CLUSTER_OUTBOX_STORE_KEY = "im:{im}:outbox:store"

#: The C{SCAN MATCH} pattern of the cluster mode's user and slot keys.
CLUSTER_SCAN_KEYS = "im:{[us]:*"


def tagKey(hexTag, name):
    """
    The key C{name} of the user whose tag's hex is C{hexTag} (as the
    scripts build it): L{userKey} without the uid.
    """
    return "im:{u:%s}:%s" % (hexTag, name)


def userSlot(uid):
    """
    The cluster slot of the keys of user C{uid}.
    """
    return keySlot(userTag(uid))


def slotKey(slot, name):
    """
    The key C{name} (C{epoch}, C{seqfloor}, C{runid}, C{bodies}) of slot
    C{slot}.
    """
    return "im:{%s}:%s" % (slotTag(slot), name)


def slotBodyPrefix(slot):
    """
    What the keys of the bodies stored in slot C{slot} start with (their
    message id follows).
    """
    return "im:m:{%s}:" % (slotTag(slot),)


def appliedKey(slot, messageId):
    """
    The record of the entries a deliver of C{messageId} made in C{slot}.
    """
    return "im:a:{%s}:%d" % (slotTag(slot), messageId)


def storedMarkerKey(messageId):
    """
    The marker of the C{message.stored} event of C{messageId} (cluster
    mode).
    """
    return "im:{im}:stored:%d" % (messageId,)


def clusterPresenceKey(gateId):
    """
    L{presenceKey} in cluster mode (tagged C{{im}}, as the outbox).
    """
    return "im:{im}:presence:" + tagHex(gateId)


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
    "retentionLeaseKey",
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
    "CLUSTER_OUTBOX_KEY",
    "CLUSTER_OUTBOX_LAST_KEY",
    "CLUSTER_OUTBOX_STORE_KEY",
    "CLUSTER_SCAN_KEYS",
    "slotTag",
    "tagKey",
    "userSlot",
    "slotKey",
    "slotBodyPrefix",
    "appliedKey",
    "storedMarkerKey",
    "clusterPresenceKey",
]
