# -*- test-case-name: tests.test_registry -*-
"""
The cluster session registry, in Redis, fenced by generations and gate
leases.  The cluster's gate directory, filtered by the same leases, is in
L{imserver.registry.redisdirectory}; the sessions of other gates a lookup
returns are L{imserver.registry.remote.RemoteSession}s.

Keys (L{imserver.redisclient.userKey} hash-tags a user's keys)::

    im:{u:<hex uid>}:sessions  hash: device id -> entry
    im:gen                     the generation counter
    im:gate:<gate id>          the gate's lease: its incarnation, with a TTL

An entry is C{<gate id>|<incarnation>|<generation>|<platform>|<session
id>}.  Every registration gets a new generation, larger than every one
before it (C{max(INCR im:gen, Redis time in microseconds)}, so it keeps
growing even if Redis lost the counter).  An entry is live while its gate's
lease holds the same incarnation: one key per gate, refreshed once per
sweep, stands for all its sessions.  A gate that stops refreshing (crashed,
cut off) loses all its sessions at once when the lease expires; a gate
restarted under the same id starts a new incarnation, which makes its old
entries dead at once.  Dead entries are ignored, and deleted, by whoever
meets them.

Fencing: register is one Lua script (count the user's live devices, refuse
beyond the limit, take a generation, write the entry, return the one it
replaced, which the caller kicks); unregister deletes the entry only if it
is still exactly the one this session wrote, so a late close never removes
a newer login.  Re-registering (after Redis comes back, or after this
gate's lease lapsed) writes an entry only where none newer is live: the
highest generation wins, so two gates never kick each other back and forth.

Cluster mode (a L{imserver.rediscluster.ClusterConnection}, or
C{cluster=True}): every script runs in one slot, and the same scripts serve
both modes (only C{live()} differs, L{_liveFunction}).  Keys::

    im:{u:<hex uid>}:sessions   as above
    im:{s:<n>}:gen              the generation counter of the slot of tag
                                C{s:<n>} (L{slotTag}): one per slot
    im:{gates}:lease:<gate id>  the gate's lease
    im:{gates}:leases           set: the gates with a lease (maybe expired)

  - Generations: per slot, C{max(INCR, Redis time in microseconds)} as
    above; they are only ever compared within one user's hash, which is in
    one slot.
  - Leases: a script cannot read the leases from a user's slot, so each
    gate reads them all (one script in the C{{gates}} slot that also
    extends its own, L{refreshLease}: still one command per interval) and
    passes that I{view} (gate -> incarnation) to its scripts.  An entry is
    live if the view has its incarnation, or if its incarnation is newer
    than the view (incarnations are the Redis time of the C{{gates}} slot
    when taken: a gate whose lease lapsed takes a new one, so an
    incarnation never comes back, and one older than the view and not in
    it is dead for good).  So a stale view never deletes a live entry; it
    keeps a dead gate's entries live for up to one refresh interval more
    than with one Redis (the lease's time to live plus one interval).
  - Lookups: by primary (in the slot map), in chunks, all at once: one
    key declared (it routes the call), the others passed as arguments and
    read by the script, which Redis allows for keys of other slots served
    by the same node.  A key the node refuses (its slot moved or is
    migrating) is answered "ask its own slot" and looked up on its own.
  - Re-registration: by slot, in chunks, all at once.
"""

import os

from twisted.internet.defer import DeferredList, fail, gatherResults, succeed
from twisted.logger import Logger
from zope.interface import implementer

from imserver.errors import TooManyDevices
from imserver.interfaces import IBusReceiver, ISessionRegistry
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisUnavailable, userKey
from imserver.rediscluster import ClusterConnection, byPrimary, keySlot, slotTag
from imserver.registry.remote import RemoteSession

#: The generation counter.
GENERATION_KEY = "im:gen"
#: A gate's lease is C{GATE_KEY_PREFIX + gate id}.
GATE_KEY_PREFIX = "im:gate:"

#: Cluster mode: the hash tag of the gates' keys (the leases, the set of
#: gates with a lease, the directory), all in one slot.
GATES_TAG = "{gates}"
#: Cluster mode: a gate's lease is C{CLUSTER_GATE_KEY_PREFIX + gate id}.
CLUSTER_GATE_KEY_PREFIX = "im:" + GATES_TAG + ":lease:"
#: Cluster mode: the set of gate ids with a lease (which may have expired).
CLUSTER_LEASES_KEY = "im:" + GATES_TAG + ":leases"
#: Cluster mode: an incarnation newer than a view's Redis time less this
#: (microseconds; at most half the lease's time to live) is taken as live
#: (taken after the view was read): it covers the clock difference between
#: the gates slot's primary and the replica that replaces it.
CLOCK_MARGIN_US = 1000000

#: Cluster mode: KEYS: the first user's sessions (it routes the call).
#: ARGV: how many other users' sessions keys, those keys (of slots served
#: by the same primary), then the view.  Returns, per key, as L{_LOOKUP},
#: or 0 for a key this node refused (not served here, or migrating).  (Its
#: loop is L{_LOOKUP}'s: that one is kept byte for byte, the script one
#: Redis has always run, see the registry tests' C{SINGLE_REDIS_SCRIPTS}.)
_CLUSTER_LOOKUP = """
local keys = {KEYS[1]}
for k = 2, tonumber(ARGV[1]) + 1 do
  keys[k] = ARGV[k]
end
local out = {}
for k = 1, #keys do
  local entries = redis.pcall('HGETALL', keys[k])
  if entries.err then
    out[k] = 0
  else
    local found = {}
    for i = 1, #entries, 2 do
      local v = entries[i + 1]
      if live(v) then
        found[#found + 1] = entries[i]
        found[#found + 1] = v
      else
        redis.call('HDEL', keys[k], entries[i])
      end
    end
    out[k] = found
  end
end
return out
"""

#: Users per lookup script (a group's members are looked up in chunks).
LOOKUP_CHUNK = 1000
#: Sessions per re-registration script.
RESTORE_CHUNK = 500

#: Lua: is entry C{v} live?  C{live(v)} is built from this template by
#: L{_liveFunction}: with one Redis, its gate's lease (read once per gate per
#: script run) holds its incarnation; on a cluster, the gate's view of the
#: leases, passed at the end of C{ARGV} (L{RedisSessionRegistry._viewArgs}).
_LIVE_TEMPLATE = """
local leases = {}%(view)s
local function live(v)
  local gate, inc = string.match(v, '^([^|]*)|([^|]*)|')
  if not gate then return false end
  local lease = leases[gate]
  if lease == nil then
    lease = %(lease)s
    leases[gate] = lease
  end
  return lease == inc%(fresh)s
end
"""

#: Lua, cluster mode: read the view at the end of C{ARGV}: C{gate,
#: incarnation, ...}, then the freshness bound, then how many items the
#: C{gate, incarnation} pairs are.  An incarnation is then live if the view
#: has it, or if it is newer than the view (taken after it was read, less
#: L{CLOCK_MARGIN_US}): such an incarnation cannot be known dead yet.
_CLUSTER_VIEW = """
local fresh
do
  local n = tonumber(ARGV[#ARGV])
  fresh = tonumber(ARGV[#ARGV - 1])
  for i = #ARGV - 1 - n, #ARGV - 2, 2 do
    leases[ARGV[i]] = ARGV[i + 1]
  end
end"""


def _liveFunction(cluster):
    """
    The Lua of C{live(v)}: reading the leases (one Redis) or the view passed
    by the gate (cluster mode, see L{_CLUSTER_VIEW}).
    """
    if cluster:
        return _LIVE_TEMPLATE % {
            "view": _CLUSTER_VIEW,
            "lease": "''",
            "fresh": " or (tonumber(inc) or 0) > fresh",
        }
    return _LIVE_TEMPLATE % {
        "view": "",
        "lease": "redis.call('GET', '%s' .. gate) or ''" % (GATE_KEY_PREFIX,),
        "fresh": "",
    }


#: Lua: take the next generation.
_GENERATION = """
local function nextGeneration(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local gen = redis.call('INCR', key)
  if gen < now then
    gen = now
    redis.call('SET', key, string.format('%.0f', gen))
  end
  return string.format('%.0f', gen)
end
"""

#: KEYS: the user's sessions, the generation counter.  ARGV: device id,
#: C{<gate>|<incarnation>|}, C{|<platform>|<session id>}, max devices.
#: Returns C{{1, entry, displaced entry or nil}} or C{{0, live devices}}.
_REGISTER = (
    _GENERATION
    + """
local key, device = KEYS[1], ARGV[1]
local entries = redis.call('HGETALL', key)
local others, displaced = 0, false
for i = 1, #entries, 2 do
  local d, v = entries[i], entries[i + 1]
  if live(v) then
    if d == device then displaced = v else others = others + 1 end
  else
    redis.call('HDEL', key, d)
  end
end
if not displaced and others >= tonumber(ARGV[4]) then
  return {0, others}
end
local value = ARGV[2] .. nextGeneration(KEYS[2]) .. ARGV[3]
redis.call('HSET', key, device, value)
return {1, value, displaced}
"""
)

#: KEYS: the user's sessions.  ARGV: device id, the entry.  Deletes it if
#: it is still that entry.
_UNREGISTER = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

#: KEYS: users' sessions.  Returns, per key, C{{device, entry, ...}} of
#: its live entries; deletes the dead ones.
_LOOKUP = """
local out = {}
for k = 1, #KEYS do
  local entries = redis.call('HGETALL', KEYS[k])
  local found = {}
  for i = 1, #entries, 2 do
    local v = entries[i + 1]
    if live(v) then
      found[#found + 1] = entries[i]
      found[#found + 1] = v
    else
      redis.call('HDEL', KEYS[k], entries[i])
    end
  end
  out[k] = found
end
return out
"""

#: KEYS: the generation counter, then one user's sessions per session.
#: ARGV: per session, device id, entry, generation.  Writes each entry
#: unless it is there already or a live entry with a higher generation is;
#: returns per session C{status, entry}: 0 (in place), 1 (written; the live
#: entry it replaced or nil) or 2 (a newer live entry holds the device: it).
#: Raises the counter to the highest generation given.
_RESTORE = """
local top = 0
local out = {}
for k = 2, #KEYS do
  local j = (k - 2) * 3
  local device, value, gen = ARGV[j + 1], ARGV[j + 2], tonumber(ARGV[j + 3])
  if gen > top then top = gen end
  local cur = redis.call('HGET', KEYS[k], device)
  if cur == value then
    out[#out + 1] = 0
    out[#out + 1] = false
  else
    local curLive = cur and live(cur)
    local curGen = 0
    if curLive then
      curGen = tonumber(string.match(cur, '^[^|]*|[^|]*|(%d+)|')) or 0
    end
    if curLive and curGen > gen then
      out[#out + 1] = 2
      out[#out + 1] = cur
    else
      redis.call('HSET', KEYS[k], device, value)
      out[#out + 1] = 1
      out[#out + 1] = curLive and cur or false
    end
  end
end
local counter = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if counter < top then
  redis.call('SET', KEYS[1], string.format('%.0f', top))
end
return out
"""

#: KEYS: a gate's lease.  ARGV: its incarnation.  Deletes the lease if it
#: is still that incarnation's.
_WITHDRAW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

#: Cluster mode.  KEYS: this gate's lease, the set of gates with a lease
#: (one hash tag: one slot).  ARGV: gate id, its incarnation (or empty),
#: the lease's time to live in milliseconds.  Extends the lease if it still
#: holds that incarnation, else starts a new incarnation (Redis time in
#: microseconds).  Returns C{{lapsed (0 or 1), incarnation, Redis time in
#: microseconds, gate id, incarnation, ...}}: the view, every gate with a
#: lease; forgets the gates without one.
_CLUSTER_LEASE = """
local t = redis.call('TIME')
local now = string.format('%%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local inc, lapsed = ARGV[2], 0
if inc == '' or redis.call('GET', KEYS[1]) ~= inc then
  inc, lapsed = now, 1
end
redis.call('SET', KEYS[1], inc, 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
local out = {lapsed, inc, now}
for _, gate in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local lease = redis.call('GET', '%s' .. gate)
  if lease then
    out[#out + 1] = gate
    out[#out + 1] = lease
  else
    redis.call('SREM', KEYS[2], gate)
  end
end
return out
""" % (CLUSTER_GATE_KEY_PREFIX,)

#: Cluster mode.  KEYS: the set of gates with a lease.  Returns how many of
#: them hold a lease now.
_CLUSTER_LIVE_GATES = """
local n = 0
for _, gate in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('EXISTS', '%s' .. gate)
end
return n
""" % (CLUSTER_GATE_KEY_PREFIX,)


def sessionsKey(uid):
    """
    The hash of C{uid}'s sessions.
    """
    return userKey(uid, "sessions")


def clusterGenerationKey(slot):
    """
    The generation counter of C{slot}, in cluster mode: C{im:{s:<n>}:gen}.
    """
    return "im:{" + slotTag(slot) + "}:gen"


def validateGateId(gateId):
    """
    @raise ValueError: if C{gateId} cannot name a gate in cluster mode
        (empty, or containing C{|}, the entry separator).
    """
    if not gateId or "|" in gateId:
        raise ValueError("a gate id must be non-empty and contain no '|': {!r}".format(gateId))


def parseEntry(value):
    """
    @param value: an entry, as Redis returns it (L{bytes}).
    @return: C{(gateId, incarnation, generation, platform, sessionId)}
    """
    gate, incarnation, generation, platform, sessionId = value.split(b"|", 4)
    return (
        gate.decode("utf-8"),
        incarnation.decode("ascii"),
        int(generation),
        int(platform),
        sessionId.decode("utf-8"),
    )


class _Local:
    """
    A session of this gate, and its entry once registered.
    """

    __slots__ = ("session", "entry", "generation", "pendingKick", "cancelled")

    def __init__(self, session):
        self.session = session
        self.entry = None
        self.generation = None
        self.pendingKick = None
        self.cancelled = False


@implementer(ISessionRegistry, IBusReceiver)
class RedisSessionRegistry:
    """
    The sessions of every gate, in Redis; this gate's own sessions also in
    memory (for the bus, re-registration and lookups resolving to them).

    A lookup returns this gate's sessions themselves and
    L{RemoteSession}s for the others.  L{count} counts this gate's
    sessions only.

    @ivar incarnation: this registry's lease value: new for every process
        (cluster mode: and after every lapse of the lease; L{None} before
        the first L{refreshLease}, when register fails with
        L{RedisUnavailable}).
    @ivar cluster: whether it runs on a Redis Cluster.
    """

    log = Logger()

    def __init__(
        self,
        connection,
        bus,
        clock,
        gateId,
        maxDevices=10,
        leaseSeconds=3.0,
        incarnation=None,
        cluster=None,
    ):
        """
        @param connection: the L{imserver.redisclient.RedisConnection}, or
            the L{imserver.rediscluster.ClusterConnection}.
        @param bus: the L{imserver.interfaces.IGateBus}; this registry becomes its
            receiver.
        @param leaseSeconds: the lease's time to live; L{refreshLease} must
            run well within it (every sweep).
        @param incarnation: one Redis: this process's lease value (default:
            random).  Cluster mode: the incarnation to resume if the lease
            still holds it (default: none; L{refreshLease} takes one).
        @param cluster: whether C{connection} is a Redis Cluster (default:
            whether it is a L{ClusterConnection}).
        """
        validateGateId(gateId)
        if cluster is None:
            cluster = isinstance(connection, ClusterConnection)
        self.connection = connection
        self.bus = bus
        self.clock = clock
        self.gateId = gateId
        self.maxDevices = maxDevices
        self.leaseSeconds = leaseSeconds
        self.cluster = cluster
        self._local = {}
        self._byUid = {}
        self._orphans = set()
        self._pending = set()
        live = _liveFunction(cluster)
        self._register = connection.script(live + _REGISTER, "registry.register")
        self._unregister = connection.script(_UNREGISTER, "registry.unregister")
        self._lookup = connection.script(
            live + (_CLUSTER_LOOKUP if cluster else _LOOKUP), "registry.lookup"
        )
        self._restore = connection.script(live + _RESTORE, "registry.restore")
        self._withdraw = connection.script(_WITHDRAW, "registry.withdraw")
        if cluster:
            self.leaseKey = CLUSTER_GATE_KEY_PREFIX + gateId
            self._takeLease = connection.script(_CLUSTER_LEASE, "registry.lease")
            self._liveGates = connection.script(_CLUSTER_LIVE_GATES, "registry.liveGates")
            # {gate id: incarnation} of the leases at the last refresh, and
            # the freshness bound (see _CLUSTER_VIEW).
            self._view = {}
            self._fresh = 0
            slotTag(0)  # the table, now rather than at the first login
            self._setIncarnation(incarnation)
        else:
            self.leaseKey = GATE_KEY_PREFIX + gateId
            self._setIncarnation(incarnation or os.urandom(8).hex())
        bus.receiver = self

    def _setIncarnation(self, incarnation):
        self.incarnation = incarnation
        self._prefix = None if incarnation is None else "{}|{}|".format(self.gateId, incarnation)

    def liveGates(self):
        """
        Cluster mode: how many gates held a lease at this gate's last lease
        refresh (the view), this one included.
        """
        return len(set(self._view) | {self.gateId})

    def _viewArgs(self):
        """
        The view of the leases the cluster mode's scripts take at the end of
        their C{ARGV} (see L{_CLUSTER_VIEW}); nothing with one Redis.
        """
        if not self.cluster:
            return []
        view = dict(self._view)
        view[self.gateId] = self.incarnation
        args = []
        for gate, incarnation in view.items():
            args += [gate, incarnation]
        return args + [self._fresh, len(args)]

    def _shards(self, items, uid):
        """
        C{items} grouped by the slot of their user's keys (cluster mode),
        or all together (one Redis), each group in their order.

        @param uid: gives an item's uid.
        """
        if not self.cluster:
            return [items] if items else []
        groups = {}
        for item in items:
            groups.setdefault(keySlot(sessionsKey(uid(item))), []).append(item)
        return list(groups.values())

    def _generationKey(self, uid):
        if not self.cluster:
            return GENERATION_KEY
        return clusterGenerationKey(keySlot(sessionsKey(uid)))

    # -- ISessionRegistry -----------------------------------------------------

    def register(self, session):
        if self._prefix is None:
            return fail(RedisUnavailable("gate {} has no lease yet".format(self.gateId)))
        local = _Local(session)
        self._remember(local)
        d = self._register(
            [sessionsKey(session.uid), self._generationKey(session.uid)],
            [
                session.deviceId,
                self._prefix,
                "|{}|{}".format(int(session.platform), session.sessionId),
                self.maxDevices,
            ]
            + self._viewArgs(),
        )
        return d.addCallbacks(self._registered, self._registerFailed, (local,), None, (local,))

    def _registered(self, reply, local):
        session = local.session
        if reply[0] == 0:
            self._forget(local)
            raise TooManyDevices(
                "{} devices are already connected; the limit is {}".format(
                    reply[1], self.maxDevices
                )
            )
        entry, displaced = reply[1], reply[2]
        local.entry = entry
        local.generation = parseEntry(entry)[2]
        if local.cancelled:
            # Unregistered while registering: take the entry back.
            self._delete(session.uid, session.deviceId, entry)
            return None
        if not entry.startswith(self._prefix.encode("utf-8")):
            # Cluster mode: this gate took a new incarnation meanwhile (its
            # lease had lapsed), and the reconcile may have missed it.
            self._restoreLocals([local]).addErrback(
                lambda f: self.log.warn(
                    "re-registering {uid}/{device} failed: {why}",
                    uid=session.uid,
                    device=session.deviceId,
                    why=f.getErrorMessage(),
                )
            )
        result = None
        if displaced is not None:
            result = self._resolve(session.uid, session.deviceId, displaced, forget=True)
        pending, local.pendingKick = local.pendingKick, None
        if pending is not None and pending[0] == local.generation:
            # A newer login elsewhere displaced this one before we even had
            # its answer.
            session.kick(pending[1], pending[2])
        return result

    def _registerFailed(self, failure, local):
        # If the script ran but its answer was lost, the entry left behind
        # names this gate and an unknown session: lookups here delete it.
        self._forget(local)
        return failure

    def unregister(self, session):
        local = self._local.get(session.sessionId)
        if local is None or local.session is not session:
            return succeed(False)
        self._forget(local)
        if local.entry is None:
            local.cancelled = True
            return succeed(False)
        return self._delete(session.uid, session.deviceId, local.entry)

    def _delete(self, uid, deviceId, entry):
        """
        Delete C{uid}'s entry for C{deviceId} if it is still C{entry}; if
        Redis is unavailable, remember it for the next L{reconcile}.

        @return: a L{Deferred} firing with whether it was deleted.
        """
        d = self._unregister([sessionsKey(uid)], [deviceId, entry])
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result

        def failed(failure):
            failure.trap(RedisUnavailable)
            self._orphans.add((uid, deviceId, entry))
            self.log.debug("unregistering {uid}/{device} waits for Redis", uid=uid, device=deviceId)
            return False

        return d.addBoth(done).addCallbacks(lambda deleted: bool(deleted), failed)

    def sessionsFor(self, uid):
        return self.sessionsForMany([uid]).addCallback(lambda found: found.get(uid, []))

    def sessionsForMany(self, uids):
        uids = list(dict.fromkeys(uids))
        if not uids:
            return succeed({})
        if self.cluster:
            groups = byPrimary(self.connection, uids, lambda uid: keySlot(sessionsKey(uid)))
        else:
            groups = [uids]
        chunks = [
            group[i : i + LOOKUP_CHUNK]
            for group in groups
            for i in range(0, len(group), LOOKUP_CHUNK)
        ]
        view = self._viewArgs()
        ds = [self._lookupChunk(chunk, view) for chunk in chunks]

        def found(replies):
            result = {}
            for chunk, reply in zip(chunks, replies):
                for uid, entries in zip(chunk, reply):
                    sessions = []
                    for i in range(0, len(entries), 2):
                        session = self._resolve(uid, entries[i].decode("utf-8"), entries[i + 1])
                        if session is not None:
                            sessions.append(session)
                    if sessions:
                        result[uid] = sessions
            return result

        if len(ds) == 1:
            return ds[0].addCallback(lambda reply: found([reply]))
        return gatherResults(ds, consumeErrors=True).addCallbacks(
            found, lambda failure: failure.value.subFailure
        )

    def _lookupChunk(self, chunk, view):
        """
        The lookup script for the users of C{chunk}: with one Redis, all
        keys declared; on a cluster, one call on the primary of the first
        (L{_CLUSTER_LOOKUP}), and a call of its own for each user whose
        key that node refused.

        @return: a L{Deferred} firing with the entries per user of C{chunk}.
        """
        keys = [sessionsKey(uid) for uid in chunk]
        if not self.cluster:
            return self._lookup(keys, view)

        def done(reply):
            refused = [i for i, entries in enumerate(reply) if entries == 0]
            if not refused:
                return reply

            def alone(replies):
                for i, entries in zip(refused, replies):
                    if entries[0] == 0:
                        raise RedisUnavailable("{} refused its own key".format(keys[i]))
                    reply[i] = entries[0]
                return reply

            return gatherResults(
                [self._lookup([keys[i]], ["0"] + view) for i in refused], consumeErrors=True
            ).addCallbacks(alone, lambda failure: failure.value.subFailure)

        return self._lookup(keys[:1], ["%d" % (len(keys) - 1,)] + keys[1:] + view).addCallback(done)

    def count(self):
        return succeed(sum(1 for local in self._local.values() if local.entry is not None))

    # -- entries ---------------------------------------------------------------

    def _remember(self, local):
        session = local.session
        self._local[session.sessionId] = local
        self._byUid.setdefault(session.uid, {})[session.sessionId] = local

    def _forget(self, local):
        session = local.session
        if self._local.get(session.sessionId) is local:
            del self._local[session.sessionId]
            sessions = self._byUid.get(session.uid)
            if sessions is not None:
                sessions.pop(session.sessionId, None)
                if not sessions:
                    del self._byUid[session.uid]

    def _resolve(self, uid, deviceId, entry, forget=False):
        """
        The L{ISession} of a live entry: a session of this gate (L{None}
        if it is gone: then the entry is deleted), or a L{RemoteSession}.

        @param forget: the entry was just displaced: a local session is no
            longer registered.
        """
        gateId, incarnation, generation, platform, sessionId = parseEntry(entry)
        if gateId == self.gateId and incarnation == self.incarnation:
            local = self._local.get(sessionId)
            if local is None:
                # Left behind by a registration whose answer was lost.
                self._delete(uid, deviceId, entry)
                return None
            if forget:
                self._forget(local)
            return local.session
        return RemoteSession(self.bus, uid, deviceId, platform, sessionId, gateId, generation)

    def localSessions(self):
        """
        @return: C{{uid: [session, ...]}} of this gate's registered
            sessions.
        """
        return {
            uid: [local.session for local in sessions.values() if local.entry is not None]
            for uid, sessions in self._byUid.items()
        }

    # -- the lease and re-registration -----------------------------------------

    def refreshLease(self):
        """
        Extend this gate's lease by L{leaseSeconds}: one command, whatever
        the number of sessions.  In cluster mode, the same command reads
        the view of every gate's lease the scripts are given until the next
        refresh, and a lapsed lease starts a new incarnation.

        @return: a L{Deferred} firing with L{True} if the lease had lapsed
            (or never existed, or Redis lost it): every gate may have
            forgotten this gate's sessions, so they need L{reconcile}.
        """
        ttl = int(self.leaseSeconds * 1000)
        if self.cluster:
            d = self._takeLease(
                [self.leaseKey, CLUSTER_LEASES_KEY], [self.gateId, self.incarnation or "", ttl]
            )
            return d.addCallback(self._leaseTaken)
        d = self.connection.execute("SET", self.leaseKey, self.incarnation, "PX", ttl, "GET")
        return d.addCallback(lambda old: old != self.incarnation.encode("ascii"))

    def _leaseTaken(self, reply):
        lapsed, incarnation, now = reply[0], reply[1].decode("ascii"), int(reply[2])
        if incarnation != self.incarnation:
            self._setIncarnation(incarnation)
        self._view = {
            reply[i].decode("utf-8"): reply[i + 1].decode("ascii") for i in range(3, len(reply), 2)
        }
        # No larger than half the lease: a lease that expired is always
        # older than the margin, so its incarnation is never taken as new.
        self._fresh = now - min(CLOCK_MARGIN_US, int(self.leaseSeconds * 500000))
        return bool(lapsed)

    def withdrawLease(self):
        """
        Delete this gate's lease (it is stopping): every entry it still
        has is dead at once (in cluster mode: for every other gate once it
        refreshed its view).
        """
        if self.incarnation is None:
            return succeed(0)
        return self._withdraw([self.leaseKey], [self.incarnation])

    def reconcile(self):
        """
        Write this gate's sessions back where Redis lost them (a restart
        without data, a lapsed lease, in cluster mode a new incarnation),
        and delete the entries of sessions that closed while Redis was
        unavailable.  A session whose device has a newer live registration
        meanwhile is kicked (C{REPLACED}); a registration it outlived
        (older generation) is kicked instead.

        @return: a L{Deferred} firing with C{(restored, kicked)} counts.
        """
        locals_ = [local for local in self._local.values() if local.entry is not None]
        orphans = list(self._orphans)
        ds = [self._restoreLocals(locals_), self.dropOrphans()]
        d = gatherResults(ds, consumeErrors=True)

        def done(results):
            restored, kicked = results[0]
            if restored or kicked or orphans:
                self.log.info(
                    "re-registered {restored} of {n} sessions with Redis ({kicked} "
                    "displaced meanwhile), removed {orphans} left by closed sessions",
                    restored=restored,
                    n=len(locals_),
                    kicked=kicked,
                    orphans=len(orphans),
                )
            return restored, kicked

        return d.addCallbacks(done, lambda failure: failure.value.subFailure)

    def _restoreLocals(self, locals_):
        """
        Write the entries of C{locals_} back, in chunks of L{RESTORE_CHUNK}
        of one slot each in cluster mode, all at once.

        @return: a L{Deferred} firing with C{(restored, kicked)} counts.
        """
        if not locals_:
            return succeed((0, 0))
        ds = []
        view = self._viewArgs()
        prefix = self._prefix.encode("utf-8")
        for group in self._shards(locals_, lambda local: local.session.uid):
            for start in range(0, len(group), RESTORE_CHUNK):
                chunk = group[start : start + RESTORE_CHUNK]
                keys, args, entries = [self._generationKey(chunk[0].session.uid)], [], []
                for local in chunk:
                    session = local.session
                    # The same entry, but for this incarnation (cluster mode:
                    # a new one after the lease lapsed).
                    entry = prefix + local.entry.split(b"|", 2)[2]
                    entries.append(entry)
                    keys.append(sessionsKey(session.uid))
                    args += [session.deviceId, entry, local.generation]
                d = self._restore(keys, args + view)
                ds.append(d.addCallback(self._restored, chunk, entries))
        d = gatherResults(ds, consumeErrors=True)

        def total(results):
            return sum(r[0] for r in results), sum(r[1] for r in results)

        return d.addCallbacks(total, lambda failure: failure.value.subFailure)

    @property
    def orphans(self):
        """
        How many entries of closed sessions wait to be deleted (their
        unregister found Redis unavailable).
        """
        return len(self._orphans)

    def dropOrphans(self):
        """
        Delete the entries of sessions that closed while Redis was
        unavailable (each only if it is still theirs).

        @return: a L{Deferred} firing with the number deleted or gone.
        """
        orphans = list(self._orphans)
        if not orphans:
            return succeed(0)

        def dropped(_, orphan):
            self._orphans.discard(orphan)

        return gatherResults(
            [
                self._unregister([sessionsKey(uid)], [deviceId, entry]).addCallback(
                    dropped, (uid, deviceId, entry)
                )
                for uid, deviceId, entry in orphans
            ],
            consumeErrors=True,
        ).addCallbacks(lambda _: len(orphans), lambda failure: failure.value.subFailure)

    def _restored(self, reply, chunk, entries):
        restored = kicked = 0
        for i, local in enumerate(chunk):
            status, current = reply[2 * i], reply[2 * i + 1]
            session = local.session
            if status != 2:
                if self._local.get(session.sessionId) is local:
                    local.entry = entries[i]
                elif entries[i] != local.entry:
                    # Unregistered meanwhile, with the entry of the previous
                    # incarnation: delete the one just written.
                    self._delete(session.uid, session.deviceId, entries[i])
            if status == 1:
                restored += 1
                if current is not None:
                    displaced = self._resolve(session.uid, session.deviceId, current, forget=True)
                    if displaced is not None:
                        displaced.kick(pb.REPLACED, "the same device signed in again")
            elif status == 2:
                kicked += 1
                if self._local.get(session.sessionId) is local:
                    self._forget(local)
                    session.kick(pb.REPLACED, "the same device signed in again")
        return restored, kicked

    def broadcast(self, frame):
        d = self.bus.broadcast(frame)
        if self.cluster:
            # A cluster's PUBLISH counts the subscribers of the node that
            # got it only: the other gates are those holding a lease now.
            d.addCallback(lambda _: self._liveGates([CLUSTER_LEASES_KEY]))
            d.addCallback(lambda live: max(0, live - 1))
        return d

    def drain(self):
        """
        @return: a L{Deferred} firing once the unregistrations in flight are
            done.
        """
        return DeferredList(list(self._pending), consumeErrors=True)

    # -- IBusReceiver -------------------------------------------------------------

    def forwardReceived(self, encoded, targets):
        if not self.connection.connected:
            # A session behind the push would fetch from the store, fail,
            # and close.  The catch-up after the reconnect announces it.
            self.log.debug("dropped a push while Redis is unavailable")
            return
        byUid = self._byUid
        for uid, seq, outgoing in targets:
            sessions = byUid.get(uid)
            if sessions:
                for local in list(sessions.values()):
                    local.session.inboxAdvanced(seq, outgoing, encoded)

    def kickReceived(self, uid, deviceId, sessionId, generation, reason, message):
        local = self._local.get(sessionId)
        if local is None:
            return
        if local.generation is None:
            # Our register's answer is still on its way: kick once it is
            # here, if it is the registration that was displaced.
            local.pendingKick = (generation, reason, message)
        elif local.generation == generation:
            local.session.kick(reason, message)

    def typingReceived(self, toUid, fromUid, active, groupId):
        for local in list(self._byUid.get(toUid, {}).values()):
            local.session.typing(fromUid, active, groupId)

    def noticeReceived(self, sessionId, frame):
        local = self._local.get(sessionId)
        if local is not None:
            local.session.notice(frame)

    def broadcastReceived(self, frame):
        # Every session this gate holds, as GateFactory.broadcast writes to
        # its own (a session not delivering, or paused, skips it).
        for local in list(self._local.values()):
            local.session.notice(frame)
