# -*- test-case-name: tests.test_store -*-
"""
The cluster-mode message store: inboxes, dedup and groups in Redis.

Every operation is one Lua script or one command, so it is atomic in
Redis, and usually one round trip (a C{deliver} also needs a block of
message ids now and then, and the Redis run id after a reconnect;
retention is many short steps).  None blocks the reactor: the store speaks
through an L{imserver.redisclient.RedisConnection} (txredisapi) and reads
the time only from the injected clock.  Nothing needs starting: the store
works as soon as it is constructed and the connection is up.

The semantics are those of L{imserver.store.memory.MemoryMessageStore}
(the reference), except that seqs do not start at 1 (see "Seqs and the
inbox epoch") and two details of retention (see "Retention").  Scripts
that answer lists answer them packed in one bulk string (each item as
C{<length>:<bytes>}, L{unpack}): txredisapi parses a long array reply one
element per reactor iteration, which made a 2000-member group's reply cost
more than its script.

Key layout
==========

Every key of one user carries the same hash tag, C{{u:<hex>}}, where
C{<hex>} is the user's uid (UTF-8) in lowercase hex: uids are arbitrary
UTF-8, and hex keeps a C{{}, C{}} or C{:} in a uid from ending the tag
early or making two users' key names collide.  (The empty uid is the
system sender, whose tag is C{{u:}}.)  Groups are tagged the same way,
C{{g:<hex>}}.

  - C{im:{u:<hex>}:head}: string, the last seq given in the user's inbox.
    Never deleted, so a seq is never given twice.
  - C{im:{u:<hex>}:inbox}: sorted set, score = seq, member =
    C{"<seq>:<message id>:<outgoing 0|1>:<created_ms>"}.
  - C{im:{u:<hex>}:cursors}: hash, device id -> C{"<seq>:<updated_ms>"}.
  - C{im:{u:<hex>}:groups}: set of the group ids the user is a member of.
  - C{im:d:{u:<hex of sender>}:<client_msg_id>}: dedup record,
    C{"<message id>:<sender's seq>:<created_ms>"}, with C{PX} = the dedup
    window.  (Same hash tag as the sender's other keys, but a prefix of its
    own, so retention's C{SCAN} of C{im:{u:*} does not list it.)
  - C{im:m:<message id>}: the serialized L{pb.Message}, stored once
    however many inboxes reference it (optionally with C{PX} =
    C{bodyTtlMs}, a backstop).
  - C{im:bodies}: sorted set of message ids scored by C{created_ms}, so
    retention finds old bodies without scanning.
  - C{im:{g:<hex>}:info}: hash C{name}, C{created}; C{im:{g:<hex>}:members}:
    hash uid -> C{"<role>:<joined_ms>:<hex of uid>"} (the hex, so a group
    message finds its members' keys without hex-encoding in Lua).
  - C{im:msgid}: the message id counter; C{im:epoch}, C{im:seqfloor},
    C{im:runid}: see below.

Scripts
=======

  - C{deliver}: epoch and seq-floor bookkeeping, the dedup check, for a
    group message the membership check and the member list, storing the
    body, and for each recipient C{seq = max(head, seqfloor) + 1}, the head
    and the inbox entry; then the dedup record.  All in one script, so a
    message is in every inbox or in none, and a retry is either a duplicate
    or the first delivery.  The message id is allocated before (the body
    must contain it): the store reserves blocks of C{idBlock} ids with the
    C{reserve} script and hands them out from memory; an id wasted by a
    duplicate or a crash is fine, ids are only unique.
  - C{fetch}: the inbox range after a seq and the bodies (C{MGET}), in one
    script; entries whose body is gone (retention) are skipped and the
    page is filled from later entries.  C{head} is one C{MGET}.
  - C{ack}: raises cursors (compared as decimal strings, so exactly).
  - C{trimUsers}, C{trimBodies}: retention (below).
  - group scripts: create, delete, set and remove members, info, members,
    groupsOf; each checks existence and writes in one script.

Today everything lives in one Redis (with a replica for failover): the
deliver script touches the keys of every recipient, which a single
instance allows but Redis Cluster would refuse across slots.  Sharding by
uid later means running the dedup, membership check, body and sender's
entry on the sender's shard and one append script per other shard holding
recipients (each shard gets the body once and assigns its users' seqs),
acking only when all shards answered; each per-shard append must then be
idempotent on the message id, so that a retry after a partial failure
completes the fan-out instead of duplicating it.

Lua numbers are doubles: seqs and ids stay below 2**53 (the seq floor is
about 1.8e15 now and reaches 2**53 around the year 2255) and are always
passed to Redis as C{string.format('%d', n)} strings, never through Lua's
C{tostring}, which would round them to 14 digits.

Seqs and the inbox epoch
========================

If Redis loses data (restarted without an AOF, a wiped or replaced
instance, a failover to a replica that was behind, or the last second of
C{appendfsync everysec}), the heads go back and seqs would be given again
to new messages; a client that already has those seqs drops the new
messages as duplicates of what it has.  To never reuse a seq:

  - C{im:seqfloor} is a lower bound for every new seq: a recipient's next
    seq is C{max(head, seqfloor) + 1}, so a user with no head key (new, or
    lost) starts above the floor, not at 1.
  - C{im:epoch} (a random id) and C{im:seqfloor} are created together by
    the first deliver script that finds C{im:epoch} missing (the first ever
    start, or after Redis lost everything), with C{seqfloor = now_ms *
    1000} (the larger of the gate's clock and Redis's C{TIME}).  Every seq
    given before was at most the old floor plus the number of messages that
    user received since; it is below the new floor unless a user received
    more than 1000 messages per millisecond on average.
  - The store reads the Redis server's C{run_id} (C{INFO server}) on every
    new connection and passes it to the deliver script, which stores it in
    C{im:runid}; when it differs (Redis restarted or failed over, and may
    have lost its last writes even though C{im:epoch} survived) the script
    raises C{im:seqfloor} to C{now_ms * 1000} the same way.  So seqs jump
    after every Redis restart, but are never reused.
  - The deliver, fetch, head and L{epoch} answers carry the current epoch;
    when the store sees it change or vanish between two operations it logs
    an error and counts it in L{RedisMessageStore.rollbacks} (a restart
    seen through the run id is logged as a warning and counted in
    L{RedisMessageStore.restarts}).

Clients treat seqs as opaque, strictly increasing unsigned 64-bit numbers:
they start near C{1.8e15}, increase by one per entry and jump after a
Redis restart.  Message ids (C{im:msgid}) get the same floor at every
block reservation, so they are not reused after a loss either.

What a loss cannot be undone by the floor: the lost messages themselves.
An entry pushed to a client before the loss stays on that client; other
devices and later syncs never see it.

Durability
==========

A C{deliver} is acked when its script's reply arrives.  With
C{appendonly yes} and C{appendfsync always}, Redis writes and fsyncs the
AOF before it sends the reply (in the same event loop pass, once for all
the commands of that pass, like a group commit), so "acked means durable":
an acked message survives a crash or a power loss of the Redis host.  With
C{appendfsync everysec} (Redis's default when the AOF is on) the reply
goes out before the fsync: a crash of the Redis host (not of the Redis
process alone, the kernel keeps its writes) can lose up to about a second
(or two, if the disk is slow) of acked messages; the run id check keeps
their seqs from being reused.  Without an AOF (RDB snapshots only) a crash
loses everything since the last snapshot, and without persistence a
restart loses everything; the epoch makes both detectable and safe for
seqs, not lossless.  Replication is asynchronous: a failover can lose
what the replica had not received (C{WAIT} would narrow that; we do not
use it).

Retention
=========

L{RedisMessageStore.trim} walks the user keys with C{SCAN MATCH im:{u:*}
(C{scanCount} keys per call) and for each page runs C{trimUsers} on the
users found (those with an inbox or cursors): entries older than the age
limit go, oldest seq first, the scan of an inbox stopping at the first
entry younger than the limit plus C{clockSkewMs} (deliveries from gates
whose clocks disagree by less than that are trimmed exactly like the
memory store does; an older entry behind a younger one beyond that waits
for a later trim); then if more than C{maxCount} entries remain, those at
or below C{min(lowest cursor, head - maxCount)} go (only in such crowded
inboxes, as the SQLite store does; the memory store applies the cutoff to
every inbox, which differs only where retention already left holes); then
cursors not updated within the age limit.  Then C{trimBodies} deletes the bodies
older than the age limit through C{im:bodies}.  Dedup records need no
trimming: they expire by their C{PX} (and C{deliver} compares their time
with the dedup window, like the memory store).  Cost: a full pass visits
every key of the database in C{SCAN} pages (about 4 keys per user, plus
the dedup records and bodies that the pattern filters out inside Redis),
i.e. about C{keys / scanCount} round trips and one script per page, each
short, so Redis is never blocked for long; an inbox whose old entries
exceed C{TRIM_SCAN_LIMIT} is finished over several script calls.

When Redis is unreachable, every operation fails at once with
L{imserver.redisclient.RedisUnavailable} (and so do Redis's own retryable
refusals: C{LOADING} while it reads its AOF after a restart, C{BUSY},
C{MISCONF}, C{OOM}, C{READONLY}, ...); nothing is queued or retried here.
"""

import os
import re

import txredisapi
from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.errors import NotMember
from imserver.interfaces import IGroupStore, IMessageStore
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisUnavailable
from imserver.store import (
    Delivery,
    GroupExists,
    GroupFull,
    GroupNotFound,
    uniqueRecipients,
)

#: The global keys.
EPOCH_KEY = "im:epoch"
SEQFLOOR_KEY = "im:seqfloor"
RUNID_KEY = "im:runid"
MSGID_KEY = "im:msgid"
BODIES_KEY = "im:bodies"

#: Redis errors that mean "not now, retry later": they become
#: L{RedisUnavailable}.
RETRYABLE_ERRORS = (
    "LOADING", "BUSY", "MISCONF", "OOM", "READONLY", "MASTERDOWN", "TRYAGAIN",
    "CLUSTERDOWN", "NOREPLICAS", "NOTREADY",
)

#: Most old entries C{trimUsers} examines in one inbox per script call.
TRIM_SCAN_LIMIT = 5000

#: Most bodies C{trimBodies} deletes per script call.
TRIM_BODY_BATCH = 1000

_RUN_ID = re.compile(rb"^run_id:([0-9a-fA-F]+)\s*$", re.MULTILINE)


def _hex(text):
    return text.encode("utf-8").hex()


def userTag(uid):
    """
    The hash tag content of a user's keys: C{u:} and the uid's UTF-8 in
    lowercase hex.
    """
    return "u:" + _hex(uid)


def userKey(uid, name):
    """
    The key C{name} (C{head}, C{inbox}, C{cursors}, C{groups}) of C{uid}.
    """
    return "im:{%s}:%s" % (userTag(uid), name)


def dedupKey(sender, clientMsgId):
    """
    The dedup record of C{(sender, clientMsgId)}.
    """
    return "im:d:{%s}:%s" % (userTag(sender), clientMsgId)


def groupKey(groupId, name):
    """
    The key C{name} (C{info}, C{members}) of a group.
    """
    return "im:{g:%s}:%s" % (_hex(groupId), name)


def bodyKey(messageId):
    """
    The key holding the serialized message C{messageId}.
    """
    return "im:m:%d" % (messageId,)


_PRELUDE = r"""
local function hex(s)
  local parts = {}
  for i = 1, #s, 100 do
    local j = math.min(i + 99, #s)
    parts[#parts + 1] = string.format(string.rep('%02x', j - i + 1), string.byte(s, i, j))
  end
  return table.concat(parts)
end
local function fmt(n)
  return string.format('%d', n)
end
local function put(parts, s)
  parts[#parts + 1] = #s .. ':' .. s
end
local function timeFloor()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return tonumber(t[1]) * 1000000 + us - us % 1000
end
"""

# KEYS: 1 im:epoch, 2 im:seqfloor, 3 im:runid, 4 dedup record, 5 body,
#       6 im:bodies, 7 group members (group messages only)
# ARGV: 1 sender, 2 now ms, 3 dedup window ms, 4 floor from the gate's
#       clock, 5 a new epoch id, 6 Redis run id, 7 message id, 8 body,
#       9 body TTL ms or '', 10 '1' for a group message, 11... recipients
#       (uid, user tag hex) pairs
# Returns {'ok', epoch, status, packed (uid, seq, uid, seq, ...)},
#   {'dup', epoch, status, id, sender seq, created ms, body or nil} or
#   {'notmember', epoch, status}; status is 'same', 'new' or 'restart'.
DELIVER = _PRELUDE + r"""
local sender, now = ARGV[1], tonumber(ARGV[2])
local meta = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3])
local epoch, floor = meta[1], meta[2]
local status = 'same'
if not epoch then
  epoch = ARGV[5]
  floor = math.max(tonumber(ARGV[4]), timeFloor())
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[2], fmt(floor))
  redis.call('SET', KEYS[3], ARGV[6])
  status = 'new'
elseif not floor or meta[3] ~= ARGV[6] then
  floor = math.max(tonumber(floor or '0'), tonumber(ARGV[4]), timeFloor())
  redis.call('SET', KEYS[2], fmt(floor))
  redis.call('SET', KEYS[3], ARGV[6])
  status = 'restart'
else
  floor = tonumber(floor)
end

local seen = redis.call('GET', KEYS[4])
if seen then
  local id, senderSeq, created = string.match(seen, '^(%d+):(%d+):(%d+)$')
  if tonumber(created) > now - tonumber(ARGV[3]) then
    local body = redis.call('GET', 'im:m:' .. id)
    return {'dup', epoch, status, id, senderSeq, created, body}
  end
end

-- recipients: uid, user tag hex, uid, user tag hex, ...
local recipients = {}
if ARGV[10] == '1' then
  local member = sender == ''
  local all = redis.call('HGETALL', KEYS[7])
  for i = 1, #all, 2 do
    recipients[i] = all[i]
    recipients[i + 1] = string.match(all[i + 1], '^%d+:%d+:(%x*)$')
    if all[i] == sender then
      member = true
    end
  end
  if #recipients == 0 or not member then
    return {'notmember', epoch, status}
  end
else
  for i = 11, #ARGV do
    recipients[i - 10] = ARGV[i]
  end
end

local id = ARGV[7]
if ARGV[9] ~= '' then
  redis.call('SET', KEYS[5], ARGV[8], 'PX', ARGV[9])
else
  redis.call('SET', KEYS[5], ARGV[8])
end
redis.call('ZADD', KEYS[6], ARGV[2], id)

local parts = {}
local senderSeq = '0'
for i = 1, #recipients, 2 do
  local uid = recipients[i]
  local prefix = 'im:{u:' .. recipients[i + 1] .. '}:'
  local head = tonumber(redis.call('GET', prefix .. 'head') or '0')
  if head < floor then
    head = floor
  end
  local seq = fmt(head + 1)
  local outgoing = '0'
  if uid == sender then
    outgoing = '1'
    senderSeq = seq
  end
  redis.call('SET', prefix .. 'head', seq)
  redis.call('ZADD', prefix .. 'inbox', seq, seq .. ':' .. id .. ':' .. outgoing .. ':' .. ARGV[2])
  put(parts, uid)
  put(parts, seq)
end
local window = math.max(1, tonumber(ARGV[3]))
redis.call('SET', KEYS[4], id .. ':' .. senderSeq .. ':' .. ARGV[2], 'PX', fmt(window))
return {'ok', epoch, status, table.concat(parts)}
"""

# KEYS: 1 inbox, 2 im:epoch.  ARGV: 1 after seq, 2 limit.
# Returns {epoch or nil, packed (seq, outgoing, body, seq, outgoing, ...)}.
FETCH = _PRELUDE + r"""
local limit = tonumber(ARGV[2])
local parts = {}
local n = 0
local low = '(' .. ARGV[1]
while n < limit do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], low, '+inf', 'LIMIT', 0,
                          math.min(limit - n, 500))
  if #page == 0 then
    break
  end
  local keys = {}
  for i, member in ipairs(page) do
    keys[i] = 'im:m:' .. string.match(member, '^%d+:(%d+):')
  end
  local bodies = redis.call('MGET', unpack(keys))
  for i, member in ipairs(page) do
    if bodies[i] then
      local seq, outgoing = string.match(member, '^(%d+):%d+:(%d):')
      put(parts, seq)
      put(parts, outgoing)
      put(parts, bodies[i])
      n = n + 1
    end
  end
  low = '(' .. string.match(page[#page], '^(%d+):')
end
return {redis.call('GET', KEYS[2]), table.concat(parts)}
"""

# ARGV: 1 now ms, then (user tag hex, device id, seq) triples.
ACK = r"""
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end
for i = 2, #ARGV, 3 do
  local key = 'im:{u:' .. ARGV[i] .. '}:cursors'
  local seq = ARGV[i + 2]
  local old = redis.call('HGET', key, ARGV[i + 1])
  if old then
    local oldSeq = string.match(old, '^(%d+):')
    if not greater(seq, oldSeq) then
      seq = oldSeq
    end
  end
  redis.call('HSET', key, ARGV[i + 1], seq .. ':' .. ARGV[1])
end
return (#ARGV - 1) / 3
"""

# KEYS: 1 im:msgid.  ARGV: 1 floor from the gate's clock, 2 block size.
# Returns the last id of the reserved block.
RESERVE_IDS = _PRELUDE + r"""
local floor = math.max(tonumber(ARGV[1]), timeFloor())
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < floor then
  redis.call('SET', KEYS[1], fmt(floor))
end
return redis.call('INCRBY', KEYS[1], ARGV[2])
"""

# ARGV: 1 oldest ms kept, 2 max count, 3 clock skew ms, 4 scan limit,
#       5... user tags (hex).
# Returns {removed, tag, ...}: the tags listed have more old entries.
TRIM_USERS = r"""
local oldest = tonumber(ARGV[1])
local maxCount = tonumber(ARGV[2])
local horizon = oldest + tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local out = {0}
local function removeAll(command, key, items)
  local n = 0
  for i = 1, #items, 1000 do
    n = n + redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
  end
  return n
end
for i = 5, #ARGV do
  local prefix = 'im:{u:' .. ARGV[i] .. '}:'
  local inbox, cursors = prefix .. 'inbox', prefix .. 'cursors'
  local acked = nil
  local stale = {}
  local all = redis.call('HGETALL', cursors)
  for j = 1, #all, 2 do
    local seq, ms = string.match(all[j + 1], '^(%d+):(%d+)$')
    seq = tonumber(seq)
    if acked == nil or seq < acked then
      acked = seq
    end
    if tonumber(ms) < oldest then
      stale[#stale + 1] = all[j]
    end
  end
  local old = {}
  local start = 0
  local more = false
  while true do
    local page = redis.call('ZRANGE', inbox, start, start + 99)
    local stop = #page == 0
    for _, member in ipairs(page) do
      local created = tonumber(string.match(member, ':(%d+)$'))
      if created < oldest then
        old[#old + 1] = member
      elseif created >= horizon then
        stop = true
        break
      end
    end
    if stop then
      break
    end
    start = start + 100
    if start >= limit then
      -- Finish in another call, if this one made progress.
      more = #old > 0
      break
    end
  end
  out[1] = out[1] + removeAll('ZREM', inbox, old)
  if more then
    out[#out + 1] = ARGV[i]
  elseif redis.call('ZCARD', inbox) > maxCount then
    local head = tonumber(redis.call('GET', prefix .. 'head') or '0')
    local cutoff = math.min(acked or 0, head - maxCount)
    if cutoff > 0 then
      out[1] = out[1] + redis.call('ZREMRANGEBYSCORE', inbox, '-inf', string.format('%d', cutoff))
    end
  end
  if not more then
    removeAll('HDEL', cursors, stale)
  end
end
return out
"""

# KEYS: 1 im:bodies.  ARGV: 1 oldest ms kept, 2 batch size.
# Returns the number of bodies deleted.
TRIM_BODIES = r"""
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0,
                       tonumber(ARGV[2]))
if #ids == 0 then
  return 0
end
local keys = {}
for i, id in ipairs(ids) do
  keys[i] = 'im:m:' .. id
end
redis.call('DEL', unpack(keys))
redis.call('ZREM', KEYS[1], unpack(ids))
return #ids
"""

# KEYS: 1 info, 2 members, 3 the owner's groups.
# ARGV: 1 group id, 2 name, 3 owner, 4 now ms, 5 owner role, 6 owner's tag hex.
CREATE_GROUP = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'exists'
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'created', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5] .. ':' .. ARGV[4] .. ':' .. ARGV[6])
redis.call('SADD', KEYS[3], ARGV[1])
return 'ok'
"""

# KEYS: 1 info, 2 members.  ARGV: 1 group id.
DELETE_GROUP = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'notfound'
end
for _, value in ipairs(redis.call('HVALS', KEYS[2])) do
  local tag = string.match(value, '^%d+:%d+:(%x*)$')
  redis.call('SREM', 'im:{u:' .. tag .. '}:groups', ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[2])
return 'ok'
"""

# KEYS: 1 info, 2 members.
# ARGV: 1 group id, 2 max size, 3 now ms, 4... (uid, role, tag hex) triples.
# Returns {'ok', packed added uids}, {'notfound'} or {'full'}.
SET_MEMBERS = _PRELUDE + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local added = {}
for i = 4, #ARGV, 3 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    put(added, ARGV[i])
  end
end
if #added > 0 and redis.call('HLEN', KEYS[2]) + #added > tonumber(ARGV[2]) then
  return {'full'}
end
for i = 4, #ARGV, 3 do
  local uid, role, tag = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[2], uid)
  if old then
    local joined = string.match(old, '^%d+:(%d+):')
    redis.call('HSET', KEYS[2], uid, role .. ':' .. joined .. ':' .. tag)
  else
    redis.call('HSET', KEYS[2], uid, role .. ':' .. ARGV[3] .. ':' .. tag)
    redis.call('SADD', 'im:{u:' .. tag .. '}:groups', ARGV[1])
  end
end
return {'ok', table.concat(added)}
"""

# KEYS: 1 info, 2 members.  ARGV: 1 group id, 2... (uid, tag hex) pairs.
# Returns {'ok', packed removed uids} or {'notfound'}.
REMOVE_MEMBERS = _PRELUDE + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local removed = {}
for i = 2, #ARGV, 2 do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    put(removed, ARGV[i])
    redis.call('SREM', 'im:{u:' .. ARGV[i + 1] .. '}:groups', ARGV[1])
  end
end
return {'ok', table.concat(removed)}
"""

# KEYS: 1 info, 2 members.
# Returns {'ok', name, created, member count} or {'notfound'}.
GROUP_INFO = r"""
local info = redis.call('HMGET', KEYS[1], 'name', 'created')
if not info[1] then
  return {'notfound'}
end
return {'ok', info[1], info[2], redis.call('HLEN', KEYS[2])}
"""

# KEYS: 1 info, 2 members.
# Returns {'ok', packed (uid, role:joined, ...)} or {'notfound'}.
MEMBERS = _PRELUDE + r"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local parts = {}
for _, value in ipairs(redis.call('HGETALL', KEYS[2])) do
  put(parts, value)
end
return {'ok', table.concat(parts)}
"""

# KEYS: 1 the user's groups.  ARGV: 1 uid.
# Returns packed (group id, name, created, role, member count, ...).
GROUPS_OF = _PRELUDE + r"""
local parts = {}
for _, gid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local prefix = 'im:{g:' .. hex(gid) .. '}:'
  local info = redis.call('HMGET', prefix .. 'info', 'name', 'created')
  local member = redis.call('HGET', prefix .. 'members', ARGV[1])
  if info[1] and member then
    put(parts, gid)
    put(parts, info[1])
    put(parts, info[2])
    put(parts, string.match(member, '^(%d+):'))
    put(parts, tostring(redis.call('HLEN', prefix .. 'members')))
  end
end
return table.concat(parts)
"""


def unpack(data):
    """
    Split what the scripts' C{put} packed: each item as C{<length>:<bytes>}
    (one bulk reply instead of a long array, which txredisapi parses one
    element per reactor iteration).

    @rtype: L{list} of L{bytes}
    """
    items = []
    position, end = 0, len(data)
    while position < end:
        colon = data.index(b":", position)
        start = colon + 1
        position = start + int(data[position:colon])
        items.append(data[start:position])
    return items


def _retryable(failure):
    """
    Turn Redis's "not now" refusals into L{RedisUnavailable}.
    """
    failure.trap(txredisapi.ResponseError)
    message = str(failure.value)
    if message.split(" ", 1)[0] in RETRYABLE_ERRORS:
        raise RedisUnavailable("Redis refused: {}".format(message))
    return failure


class _Unseen:
    def __repr__(self):
        return "<unseen>"


_UNSEEN = _Unseen()


@implementer(IMessageStore, IGroupStore)
class RedisMessageStore:
    """
    Inboxes, dedup records and groups in Redis.  Usable at once: there is
    nothing to start or stop (the connection is the caller's).

    @param connection: an L{imserver.redisclient.RedisConnection}.
    @param clock: an C{IReactorTime}, for the seq and id floors.
    @param dedupWindowMs: how long a C{(sender, client_msg_id)} is
        remembered.
    @param idBlock: message ids reserved per round trip.
    @param bodyTtlMs: if set, message bodies also expire (C{PX}) after this
        long, a backstop for retention; leave it L{None} or well above the
        retention age, since a body that expired takes its entries with it.
    @param clockSkewMs: see "Retention" in the module docstring.
    @param scanCount: the C{COUNT} of retention's C{SCAN} calls.

    @ivar rollbacks: how many times the store saw the inbox epoch change or
        vanish (Redis lost data).
    @ivar restarts: how many times a deliver found that Redis restarted
        since the previous deliver (the seq floor was raised).
    """

    log = Logger()

    def __init__(self, connection, clock, dedupWindowMs=24 * 3600 * 1000, idBlock=100,
                 bodyTtlMs=None, clockSkewMs=60 * 1000, scanCount=1000):
        self.connection = connection
        self.clock = clock
        self.dedupWindowMs = dedupWindowMs
        self.idBlock = idBlock
        self.bodyTtlMs = bodyTtlMs
        self.clockSkewMs = clockSkewMs
        self.scanCount = scanCount
        self.rollbacks = 0
        self.restarts = 0
        self._epoch = _UNSEEN
        # Message ids reserved and not handed out: [next, last].
        self._nextId = 1
        self._lastId = 0
        self._idWaiters = []
        self._reserving = False
        # The server's run id, read once per connection.
        self._runId = None
        self._runIdWaiters = None
        self._connectionNumber = 0
        connection.onConnect.append(self._connectionChanged)
        connection.onDisconnect.append(self._connectionChanged)
        script = connection.script
        self._deliver = script(DELIVER)
        self._fetch = script(FETCH)
        self._ack = script(ACK)
        self._reserveIds = script(RESERVE_IDS)
        self._trimUsers = script(TRIM_USERS)
        self._trimBodies = script(TRIM_BODIES)
        self._createGroup = script(CREATE_GROUP)
        self._deleteGroup = script(DELETE_GROUP)
        self._setMembers = script(SET_MEMBERS)
        self._removeMembers = script(REMOVE_MEMBERS)
        self._groupInfo = script(GROUP_INFO)
        self._members = script(MEMBERS)
        self._groupsOf = script(GROUPS_OF)
        self._scripts = [
            self._deliver, self._fetch, self._ack, self._reserveIds, self._trimUsers,
            self._trimBodies, self._createGroup, self._deleteGroup, self._setMembers,
            self._removeMembers, self._groupInfo, self._members, self._groupsOf,
        ]

    # -- plumbing -----------------------------------------------------------

    def _execute(self, *command):
        return self.connection.execute(*command).addErrback(_retryable)

    def _call(self, script, keys=(), args=()):
        return script(keys, args).addErrback(_retryable)

    def _floorCandidate(self):
        """
        C{now_ms * 1000} by the injected clock.
        """
        return "%d" % (int(self.clock.seconds() * 1000) * 1000,)

    def _connectionChanged(self):
        # A new connection may reach another Redis process: read its run id
        # again before the next deliver, and take ids from it, not from a
        # block reserved on a process that may have lost data since.
        self._connectionNumber += 1
        self._runId = None
        self._nextId, self._lastId = 1, 0

    def _serverRunId(self):
        """
        Read the run id of the Redis process of the current connection, and
        load the scripts into it (so deliveries do not fall back to C{EVAL}
        after a restart, which could reorder them).

        @return: a L{Deferred} firing with the run id.
        """
        if self._runId is not None:
            return succeed(self._runId)
        waiter = Deferred()
        if self._runIdWaiters is not None:
            self._runIdWaiters.append(waiter)
            return waiter
        self._runIdWaiters = [waiter]
        number = self._connectionNumber

        def noInfo(failure):
            # INFO renamed away or not allowed to our user: run without the
            # restart check (the epoch still catches a total loss).
            failure.trap(txredisapi.ResponseError)
            self.log.warn(
                "cannot read the Redis run id ({error}): a Redis restart that lost"
                " recent writes will not raise the seq floor",
                error=failure.getErrorMessage())
            return b""

        info = self._execute("INFO", "server").addErrback(noInfo)
        loads = [self._execute("SCRIPT", "LOAD", script.source) for script in self._scripts]

        def got(results):
            if number != self._connectionNumber:
                raise RedisUnavailable("the Redis connection changed meanwhile")
            match = _RUN_ID.search(results[0])
            self._runId = match.group(1).decode("ascii") if match else "unknown"
            return self._runId

        def fire(result):
            if isinstance(result, Failure) and result.check(FirstError):
                result = result.value.subFailure
            waiters, self._runIdWaiters = self._runIdWaiters, None
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        gatherResults([info] + loads, consumeErrors=True).addCallback(got).addBoth(fire)
        return waiter

    def _newId(self):
        """
        @return: a L{Deferred} firing with a message id never given before.
        """
        if self._nextId <= self._lastId:
            messageId = self._nextId
            self._nextId += 1
            return succeed(messageId)
        waiter = Deferred()
        self._idWaiters.append(waiter)
        if not self._reserving:
            self._reserve()
        return waiter

    def _reserve(self):
        self._reserving = True
        block = max(self.idBlock, len(self._idWaiters))

        def reserved(last):
            self._reserving = False
            self._nextId, self._lastId = last - block + 1, last
            while self._idWaiters and self._nextId <= self._lastId:
                messageId = self._nextId
                self._nextId += 1
                self._idWaiters.pop(0).callback(messageId)
            if self._idWaiters and not self._reserving:
                self._reserve()

        def failed(failure):
            self._reserving = False
            waiters, self._idWaiters = self._idWaiters, []
            for waiter in waiters:
                waiter.errback(failure)

        self._call(self._reserveIds, [MSGID_KEY], [self._floorCandidate(), block]).addCallbacks(
            reserved, failed)

    def _observeEpoch(self, epoch):
        """
        Note the epoch an answer carried; log and count a change or a loss.
        """
        if isinstance(epoch, bytes):
            epoch = epoch.decode("ascii", "replace")
        old, self._epoch = self._epoch, epoch
        if old is _UNSEEN or old is None or old == epoch:
            return
        self.rollbacks += 1
        if epoch is None:
            self.log.error(
                "Redis lost the inbox epoch {old}: Redis lost its data; new seqs will"
                " start above a new seq floor, messages stored before are gone",
                old=old, epoch=epoch, rollbacks=self.rollbacks)
        else:
            self.log.error(
                "the inbox epoch changed from {old} to {epoch}: Redis lost its data;"
                " seqs continue above the new seq floor, messages stored before are gone",
                old=old, epoch=epoch, rollbacks=self.rollbacks)

    def _observeStatus(self, status, epoch):
        if status == b"new":
            self.log.info("created the inbox epoch {epoch} and its seq floor", epoch=epoch)
        elif status == b"restart":
            self.restarts += 1
            self.log.warn(
                "Redis restarted or failed over since the last delivery: raised the seq"
                " floor, so seqs of writes it may have lost are not reused",
                epoch=epoch, restarts=self.restarts)

    def epoch(self):
        """
        @return: a L{Deferred} firing with the current inbox epoch id
            (L{str}), or L{None} if Redis has none (nothing delivered since
            it was created or lost its data).
        """
        def got(value):
            self._observeEpoch(value)
            return self._epoch

        return self._execute("GET", EPOCH_KEY).addCallback(got)

    # -- IMessageStore --------------------------------------------------------

    def deliver(self, sender, clientMsgId, message, recipients, nowMs):
        groupId = message.group_id
        recipients = [] if groupId else uniqueRecipients(sender, recipients)
        if self._runId is not None and self._nextId <= self._lastId:
            # The usual case: one round trip.
            messageId = self._nextId
            self._nextId += 1
            return self._deliverWith(
                self._runId, messageId, sender, clientMsgId, message, recipients, nowMs)
        d = self._serverRunId()

        def withRunId(runId):
            return self._newId().addCallback(
                lambda messageId: self._deliverWith(
                    runId, messageId, sender, clientMsgId, message, recipients, nowMs))

        return d.addCallback(withRunId)

    def _deliverWith(self, runId, messageId, sender, clientMsgId, message, recipients, nowMs):
        stored = pb.Message()
        stored.CopyFrom(message)
        stored.id = messageId
        stored.sender = sender
        stored.client_msg_id = clientMsgId
        stored.created_ms = nowMs
        groupId = message.group_id
        keys = [
            EPOCH_KEY, SEQFLOOR_KEY, RUNID_KEY, dedupKey(sender, clientMsgId),
            bodyKey(messageId), BODIES_KEY,
        ]
        if groupId:
            # KEYS[7], read only for a group message: no empty key name
            # otherwise (an ACL user limited to ~im:* refuses one).
            keys.append(groupKey(groupId, "members"))
        args = [
            sender, "%d" % (nowMs,), "%d" % (self.dedupWindowMs,), self._floorCandidate(),
            os.urandom(8).hex(), runId, "%d" % (messageId,), stored.SerializeToString(),
            "%d" % (self.bodyTtlMs,) if self.bodyTtlMs else "", "1" if groupId else "0",
        ]
        for uid in recipients:
            args += [uid, _hex(uid)]

        def done(reply):
            kind, epoch, status = reply[0], reply[1], reply[2]
            self._observeEpoch(epoch)
            self._observeStatus(status, self._epoch)
            if kind == b"ok":
                it = iter(unpack(reply[3]))
                seqs = {uid.decode("utf-8"): int(seq) for uid, seq in zip(it, it)}
                return Delivery(stored, seqs, False)
            if kind == b"dup":
                originalId, senderSeq, createdMs, body = reply[3:7]
                if body is not None:
                    original = pb.Message.FromString(body)
                else:
                    original = pb.Message(id=int(originalId), created_ms=int(createdMs))
                return Delivery(original, {sender: int(senderSeq)}, True)
            raise NotMember("not a member of group {!r}".format(groupId))

        return self._call(self._deliver, keys, args).addCallback(done)

    def fetch(self, uid, afterSeq, limit):
        if limit <= 0:
            return succeed([])

        def done(reply):
            self._observeEpoch(reply[0])
            it = iter(unpack(reply[1]))
            return [
                pb.InboxEntry(seq=int(seq), outgoing=outgoing == b"1",
                              message=pb.Message.FromString(body))
                for seq, outgoing, body in zip(it, it, it)
            ]

        return self._call(
            self._fetch, [userKey(uid, "inbox"), EPOCH_KEY], ["%d" % (afterSeq,), "%d" % (limit,)]
        ).addCallback(done)

    def head(self, uid):
        def done(reply):
            epoch, head = reply
            self._observeEpoch(epoch)
            return int(head) if head is not None else 0

        return self._execute("MGET", EPOCH_KEY, userKey(uid, "head")).addCallback(done)

    def ack(self, cursors, nowMs):
        args = ["%d" % (nowMs,)]
        for uid, deviceId, seq in cursors:
            args += [_hex(uid), deviceId, "%d" % (max(0, seq),)]
        if len(args) == 1:
            return succeed(0)
        return self._call(self._ack, [], args)

    def cursor(self, uid, deviceId):
        def done(value):
            return 0 if value is None else int(value.split(b":", 1)[0])

        return self._execute("HGET", userKey(uid, "cursors"), deviceId).addCallback(done)

    def trim(self, nowMs, maxAgeMs, maxCount):
        return self._trim(nowMs, maxAgeMs, maxCount)

    @inlineCallbacks
    def _trim(self, nowMs, maxAgeMs, maxCount):
        oldest = "%d" % (nowMs - maxAgeMs,)
        params = [oldest, "%d" % (maxCount,), "%d" % (self.clockSkewMs,), "%d" % (TRIM_SCAN_LIMIT,)]
        removed = 0
        cursor = b"0"
        while True:
            cursor, keys = yield self._execute(
                "SCAN", cursor, "MATCH", "im:{u:*", "COUNT", self.scanCount)
            tags = []
            for key in keys:
                if key.endswith((b"}:inbox", b"}:cursors")):
                    tag = key[len(b"im:{u:"):key.index(b"}")]
                    if tag not in tags:
                        tags.append(tag)
            while tags:
                reply = yield self._call(self._trimUsers, [], params + tags)
                removed += reply[0]
                tags = reply[1:]
            if cursor in (b"0", 0, "0"):
                break
        while True:
            count = yield self._call(
                self._trimBodies, [BODIES_KEY], [oldest, "%d" % (TRIM_BODY_BATCH,)])
            if count < TRIM_BODY_BATCH:
                break
        return removed

    # -- IGroupStore --------------------------------------------------------

    def createGroup(self, groupId, name, owner, nowMs):
        def done(reply):
            if reply == b"exists":
                raise GroupExists(groupId)
            return pb.Group(group_id=groupId, name=name, created_ms=nowMs, member_count=1,
                            role=pb.ROLE_OWNER)

        return self._call(
            self._createGroup,
            [groupKey(groupId, "info"), groupKey(groupId, "members"), userKey(owner, "groups")],
            [groupId, name, owner, "%d" % (nowMs,), "%d" % (pb.ROLE_OWNER,), _hex(owner)],
        ).addCallback(done)

    def deleteGroup(self, groupId):
        def done(reply):
            if reply == b"notfound":
                raise GroupNotFound(groupId)
            return True

        return self._call(
            self._deleteGroup, self._groupKeys(groupId), [groupId]).addCallback(done)

    def setMembers(self, groupId, members, maxSize, nowMs):
        roles = dict(members)
        args = [groupId, "%d" % (maxSize,), "%d" % (nowMs,)]
        for uid, role in roles.items():
            args += [uid, "%d" % (role,), _hex(uid)]

        def done(reply):
            if reply[0] == b"notfound":
                raise GroupNotFound(groupId)
            if reply[0] == b"full":
                raise GroupFull(groupId)
            return [uid.decode("utf-8") for uid in unpack(reply[1])]

        return self._call(self._setMembers, self._groupKeys(groupId), args).addCallback(done)

    def removeMembers(self, groupId, uids):
        def done(reply):
            if reply[0] == b"notfound":
                raise GroupNotFound(groupId)
            return [uid.decode("utf-8") for uid in unpack(reply[1])]

        args = [groupId]
        for uid in dict.fromkeys(uids):
            args += [uid, _hex(uid)]
        return self._call(self._removeMembers, self._groupKeys(groupId), args).addCallback(done)

    def group(self, groupId):
        def done(reply):
            if reply[0] == b"notfound":
                return None
            _, name, createdMs, count = reply
            return pb.Group(group_id=groupId, name=name.decode("utf-8"),
                            created_ms=int(createdMs), member_count=count)

        return self._call(self._groupInfo, self._groupKeys(groupId)).addCallback(done)

    def members(self, groupId):
        def done(reply):
            if reply[0] == b"notfound":
                raise GroupNotFound(groupId)
            it = iter(unpack(reply[1]))
            result = []
            for uid, value in zip(it, it):
                role, joinedMs = value.split(b":")[:2]
                result.append(pb.Member(uid=uid.decode("utf-8"), role=int(role),
                                        joined_ms=int(joinedMs)))
            result.sort(key=lambda member: member.uid)
            return result

        return self._call(self._members, self._groupKeys(groupId)).addCallback(done)

    def groupsOf(self, uid):
        def done(reply):
            it = iter(unpack(reply))
            groups = [
                pb.Group(group_id=groupId.decode("utf-8"), name=name.decode("utf-8"),
                         created_ms=int(createdMs), role=int(role), member_count=int(count))
                for groupId, name, createdMs, role, count in zip(it, it, it, it, it)
            ]
            groups.sort(key=lambda group: group.group_id)
            return groups

        return self._call(self._groupsOf, [userKey(uid, "groups")], [uid]).addCallback(done)

    def _groupKeys(self, groupId):
        return [groupKey(groupId, "info"), groupKey(groupId, "members")]

