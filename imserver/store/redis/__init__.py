# -*- test-case-name: tests.test_store -*-
"""
The cluster-mode message store: inboxes, dedup and groups in Redis.

  - L{store}: L{RedisMessageStore}.  Every operation is one Lua script or
    one command, so it is atomic in Redis, and usually one round trip; the
    store speaks through an L{imserver.redisclient.RedisConnection}, reads
    the time only from the injected clock, and needs no starting.
  - L{keys}: the key names and what each key holds.
  - C{scripts/*.lua}: the scripts, one per operation, each saying its
    C{KEYS}, C{ARGV} and reply; C{prelude.lua} holds the helpers some of
    them share, C{inbox.lua} those that append to inboxes (the seq floor
    and epoch check, the body, the entries), C{groupEntry.lua} one group
    of C{groupsOf}, C{outbox.lua} those of the scripts that record webhook
    events (L{imserver.interfaces.IOutbox}) in the step that makes the
    change they report.

On a Redis Cluster (an L{imserver.rediscluster.ClusterConnection}, seen at
construction; C{cluster=True} forces it) every script touches the keys of
one slot: a deliver is a step on the sender's slot, then one per other slot
holding recipients, each idempotent, with the epoch and seq floor kept per
slot and the bodies stored in each slot that references them (keys.py,
C{deliverBegin.lua}, C{deliverAppend.lua}; docs/architecture.md, "The
message store on a Redis Cluster").  On one Redis nothing of this changes
the keys, the scripts' work or the round trips.

The semantics are those of L{imserver.store.memory.MemoryMessageStore}
(the reference), except that seqs start above a floor, not at 1, and two
details of retention.  The design (scripts, retention, durability, what
happens when Redis is unavailable) is in docs/architecture.md, "The
message store" and "Seqs, the floor and the epoch"; sharding it later is
in docs/scaling.md, "Sharding Redis".
"""

from imserver.store.redis.keys import (
    BODIES_KEY,
    EPOCH_KEY,
    MSGID_KEY,
    RUNID_KEY,
    SEQFLOOR_KEY,
    bodyKey,
    dedupKey,
    groupKey,
    userKey,
    userTag,
)
from imserver.store.redis.store import RedisMessageStore, unpack

__all__ = [
    "RedisMessageStore",
    "unpack",
    "EPOCH_KEY",
    "SEQFLOOR_KEY",
    "RUNID_KEY",
    "MSGID_KEY",
    "BODIES_KEY",
    "userTag",
    "userKey",
    "dedupKey",
    "groupKey",
    "bodyKey",
]
