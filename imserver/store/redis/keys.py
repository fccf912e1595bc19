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


__all__ = [
    "EPOCH_KEY",
    "SEQFLOOR_KEY",
    "RUNID_KEY",
    "MSGID_KEY",
    "BODIES_KEY",
    "USER_KEYS",
    "userTag",
    "userKey",
    "tagHex",
    "tagHexOf",
    "dedupKey",
    "groupKey",
    "bodyKey",
]
