# -*- test-case-name: tests.test_store -*-
"""
L{RedisMessageStore}: inboxes, dedup records and groups in Redis, each
operation one Lua script (C{scripts/}, read once at import) or one command.
The design is in the package docstring, L{imserver.store.redis}.
"""

import os
import re
from importlib.resources import files

import txredisapi
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.errors import NotMember
from imserver.interfaces import IGroupStore, IMessageStore, IOutbox
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisUnavailable
from imserver.rediscluster import ClusterConnection, byPrimary, keySlot
from imserver.store import (
    OUTBOX_LIMIT,
    SYSTEM,
    Delivery,
    GroupExists,
    GroupFull,
    GroupNotFound,
    OutboxFullLog,
    uniqueRecipients,
)
from imserver.store.redis.keys import (
    BODIES_KEY,
    CLUSTER_OUTBOX_KEY,
    CLUSTER_OUTBOX_LAST_KEY,
    CLUSTER_OUTBOX_STORE_KEY,
    CLUSTER_SCAN_KEYS,
    EPOCH_KEY,
    MSGID_KEY,
    OUTBOX_KEY,
    OUTBOX_LAST_KEY,
    OUTBOX_LEASE_KEY,
    OUTBOX_STORE_KEY,
    RUNID_KEY,
    SEQFLOOR_KEY,
    USER_KEYS,
    appliedKey,
    bodyKey,
    clusterPresenceKey,
    dedupKey,
    groupKey,
    presenceField,
    presenceKey,
    slotBodyPrefix,
    slotKey,
    storedMarkerKey,
    tagHex,
    tagHexOf,
    tagKey,
    userKey,
    userSlot,
)
from imserver.webhooks.events import (
    GROUP_CHANGED,
    GROUP_CREATED,
    GROUP_DELETED,
    MEMBERS_ADDED,
    MEMBERS_REMOVED,
    MESSAGE_STORED,
    USER_OFFLINE,
    USER_ONLINE,
    OutboxEntry,
    eventId,
    groupChanged,
    messageStored,
)

#: Most old entries C{trimUsers} examines in one inbox per script call.
TRIM_SCAN_LIMIT = 5000

#: Most bodies C{trimBodies} deletes per script call.
TRIM_BODY_BATCH = 1000

#: Seconds at least between two log events of one kind (an epoch lost or
#: changed, created, a floor raised) on a cluster, where each slot of a
#: primary reports them (L{RedisMessageStore.rollbacks} and C{restarts}
#: still count each).
SLOT_LOG_INTERVAL = 10.0

#: Most outbox entries deleted per C{XDEL}.
REMOVE_CHUNK = 1000

#: The outbox keys passed to the scripts that record events.
_OUTBOX_KEYS = [OUTBOX_KEY, OUTBOX_LAST_KEY, OUTBOX_STORE_KEY]

#: Cluster mode: a message to at most this many recipients outside the
#: sender's slot has those of the sender's primary appended by the begin
#: script (one round trip less); a larger one has them appended in
#: parallel with the other primaries' (measured: a 1,000-member group is
#: 9 % slower when a third of its appends wait for the begin).
BEGIN_APPEND_LIMIT = 64

_RUN_ID = re.compile(rb"^run_id:([0-9a-fA-F]+)\s*$", re.MULTILINE)


def _lua(name):
    """
    The source of C{scripts/<name>.lua}.
    """
    return (files(__package__) / "scripts" / (name + ".lua")).read_text("utf-8")


# The scripts' sources, read once; each file says its KEYS, ARGV and reply.
# Those that use the helpers of prelude.lua (hex, fmt, put, timeFloor) get
# it in front; those that append to inboxes, inbox.lua after it (and on a
# cluster, slots.lua: the appends to several slots of one primary); those
# that record outbox events, outbox.lua.
_PRELUDE = _lua("prelude")
_INBOX = _PRELUDE + _lua("inbox")
_OUTBOX = _PRELUDE + _lua("outbox")
# deliver, on the hot path, comes in two: recording message.stored, and not
# (without outbox.lua, so it does not even make its functions).
DELIVER = _INBOX + "local outboxArgs = false\n" + _lua("deliver")
DELIVER_OUTBOX = _INBOX + _lua("outbox") + _lua("deliver")
FETCH = _PRELUDE + _lua("fetch")
ACK = _lua("ack")
RESERVE_IDS = _PRELUDE + _lua("reserveIds")
TRIM_USERS = _lua("trimUsers")
TRIM_BODIES = _lua("trimBodies")
# The group scripts keep the users' groups sets themselves on one Redis
# (indexHere), not on a cluster, where those are in the users' slots.
_GROUP_CHANGES = ("createGroup", "deleteGroup", "setMembers", "removeMembers")
GROUP_CHANGES = {n: _OUTBOX + "local indexHere = true\n" + _lua(n) for n in _GROUP_CHANGES}
CLUSTER_GROUP_CHANGES = {n: _OUTBOX + "local indexHere = false\n" + _lua(n) for n in _GROUP_CHANGES}
GROUP_INFO = _lua("groupInfo")
MEMBERS = _PRELUDE + _lua("members")
GROUPS_OF = _PRELUDE + _lua("groupEntry") + _lua("groupsOf")
ENQUEUE = _OUTBOX + _lua("enqueue")
# The Redis Cluster mode's own (one slot each).
_SLOTS = _INBOX + _lua("slots")
DELIVER_BEGIN = _SLOTS + _lua("deliverBegin")
DELIVER_APPEND = _SLOTS + _lua("deliverAppend")
STORED_EVENT = _OUTBOX + _lua("storedEvent")
GROUP_OF = _PRELUDE + _lua("groupEntry") + _lua("groupOf")
PENDING = _PRELUDE + _lua("pending")
OUTBOX_STATS = _lua("outboxStats")
CLAIM_LEASE = _lua("claimLease")


def _aroundList(data, name):
    """
    Split C{data}, an event's JSON whose list C{name} is empty, around that
    list: the scripts fill it in.

    @return: C{(before, after)}: C{before} ends with C{"<name>":[} and
        C{after} starts with C{]}.  (The marker can only be the key: in a
        JSON string every C{"} follows a backslash.)
    """
    marker = b'"%s":[]' % (name,)
    before, after = data.split(marker)
    return before + marker[:-1], marker[-1:] + after


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


def _pack(items):
    """
    Pack C{items} (L{str} or L{bytes}) as the scripts' C{put} does
    (L{unpack} splits them).
    """
    parts = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else item
        parts.append(b"%d:%s" % (len(data), data))
    return b"".join(parts)


def _seqs(packed):
    """
    C{{uid: seq}} from the packed C{uid, seq, ...} of a script.
    """
    it = iter(unpack(packed))
    return {uid.decode("utf-8"): int(seq) for uid, seq in zip(it, it)}


def _all(ds):
    """
    Wait for every one of C{ds}, operations in parallel (on a cluster,
    each on its slot): a L{Deferred} firing with their results, or once
    all are done, failing with the first failure (never before all are
    done, so a caller that retries finds every one finished).
    """

    def done(results):
        for ok, result in results:
            if not ok:
                return result
        return [result for _, result in results]

    return DeferredList(ds, consumeErrors=True).addCallback(done)


class _Unseen:
    def __repr__(self):
        return "<unseen>"


_UNSEEN = _Unseen()


@implementer(IMessageStore, IGroupStore, IOutbox)
class RedisMessageStore:
    """
    Inboxes, dedup records and groups in Redis.  Usable at once: there is
    nothing to start or stop (the connection is the caller's).

    @param connection: an L{imserver.redisclient.RedisConnection}, or an
        L{imserver.rediscluster.ClusterConnection} (see C{cluster}).
    @param clock: an C{IReactorTime}, for the seq and id floors.
    @param dedupWindowMs: how long a C{(sender, client_msg_id)} is
        remembered.
    @param idBlock: message ids reserved per round trip.
    @param bodyTtlMs: if set, message bodies also expire (C{PX}) after this
        long, a backstop for retention; leave it L{None} or well above the
        retention age, since a body that expired takes its entries with it.
    @param clockSkewMs: how far gates' clocks may disagree before
        retention trims an inbox less exactly (docs/architecture.md, "The
        message store", Retention).
    @param scanCount: the C{COUNT} of retention's C{SCAN} calls.
    @param cluster: whether C{connection} is a Redis Cluster (an
        L{imserver.rediscluster.ClusterConnection}): every script then
        touches one slot, with the keys and steps of
        docs/architecture.md, "The message store on a Redis Cluster".
        L{None} (the default): if C{connection} is a C{ClusterConnection}.
        On one Redis the keys, scripts and round trips are those of before
        the cluster mode.

    @ivar rollbacks: how many times the store saw the inbox epoch change or
        vanish (Redis lost data).
    @ivar restarts: how many times a deliver found that Redis restarted
        since the previous deliver (the seq floor was raised).
    """

    log = Logger()

    def __init__(
        self,
        connection,
        clock,
        dedupWindowMs=24 * 3600 * 1000,
        idBlock=100,
        bodyTtlMs=None,
        clockSkewMs=60 * 1000,
        scanCount=1000,
        cluster=None,
    ):
        if cluster is None:
            cluster = isinstance(connection, ClusterConnection)
        self.cluster = cluster
        self.connection = connection
        self.clock = clock
        self.dedupWindowMs = dedupWindowMs
        self.idBlock = idBlock
        self.bodyTtlMs = bodyTtlMs
        self.clockSkewMs = clockSkewMs
        self.scanCount = scanCount
        self.rollbacks = 0
        self.restarts = 0
        # Replicas (Redis WAIT) a delivery waits for before it is answered,
        # and for how long (ms): --redis-wait-replicas, --redis-wait-timeout.
        self.waitReplicas = 0
        self.waitTimeoutMs = 1000
        self.outboxEvents = frozenset()
        self.outboxLimit = OUTBOX_LIMIT
        self.outboxDropped = 0
        self._fullLog = OutboxFullLog()
        # The last epoch seen: one (key None) on one Redis, per slot on a
        # cluster.
        self._epochs = {}
        self._slotLogged = {}
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
        self._scripts = []

        def script(source, name):
            made = connection.script(source, "store." + name)
            self._scripts.append(made)
            return made

        self._fetch = script(FETCH, "fetch")
        self._ack = script(ACK, "ack")
        self._reserveIds = script(RESERVE_IDS, "reserveIds")
        self._trimUsers = script(TRIM_USERS, "trimUsers")
        self._trimBodies = script(TRIM_BODIES, "trimBodies")
        self._groupInfo = script(GROUP_INFO, "groupInfo")
        self._members = script(MEMBERS, "members")
        self._enqueue = script(ENQUEUE, "enqueue")
        self._pending = script(PENDING, "pending")
        self._outboxStats = script(OUTBOX_STATS, "outboxStats")
        self._claimLease = script(CLAIM_LEASE, "claimLease")
        if cluster:
            self._outboxKeys = [
                CLUSTER_OUTBOX_KEY,
                CLUSTER_OUTBOX_LAST_KEY,
                CLUSTER_OUTBOX_STORE_KEY,
            ]
            self._presenceKey = clusterPresenceKey
            self._deliverBegin = script(DELIVER_BEGIN, "deliverBegin")
            self._deliverAppend = script(DELIVER_APPEND, "deliverAppend")
            self._storedEvent = script(STORED_EVENT, "storedEvent")
            self._groupOf = script(GROUP_OF, "groupOf")
        else:
            self._outboxKeys = _OUTBOX_KEYS
            self._presenceKey = presenceKey
            self._deliver = script(DELIVER, "deliver")
            self._deliverOutbox = script(DELIVER_OUTBOX, "deliverOutbox")
            self._groupsOf = script(GROUPS_OF, "groupsOf")
        changes = CLUSTER_GROUP_CHANGES if cluster else GROUP_CHANGES
        self._createGroup = script(changes["createGroup"], "createGroup")
        self._deleteGroup = script(changes["deleteGroup"], "deleteGroup")
        self._setMembers = script(changes["setMembers"], "setMembers")
        self._removeMembers = script(changes["removeMembers"], "removeMembers")

    # -- plumbing -----------------------------------------------------------

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
        after a restart, which could reorder them).  On a cluster the
        scripts go to every primary, and read the run id themselves (the
        gate cannot know which process will run them): the run id is then
        C{"cluster"}.

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
                error=failure.getErrorMessage(),
            )
            return b""

        if self.cluster:
            # The scripts read the run id themselves.
            info = succeed(b"")
        else:
            info = self.connection.execute("INFO", "server").addErrback(noInfo)
        loads = [
            self.connection.execute("SCRIPT", "LOAD", script.source) for script in self._scripts
        ]
        if self.cluster:
            # Loaded on every primary: one that is down (its slots fail
            # over) must not stop the others' deliveries; a script missing
            # on the promoted replica is sent with EVAL there once.
            loads = [load.addErrback(lambda _: None) for load in loads]

        def got(results):
            if number != self._connectionNumber:
                raise RedisUnavailable("the Redis connection changed meanwhile")
            if self.cluster:
                self._runId = "cluster"
            else:
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

        self._reserveIds([MSGID_KEY], [self._floorCandidate(), block]).addCallbacks(
            reserved, failed
        )

    @property
    def _epoch(self):
        return self._epochs.get(None, _UNSEEN)

    def _observeEpoch(self, epoch, slot=None):
        """
        Note the epoch an answer carried (on a cluster, C{slot}'s); log and
        count a change or a loss.
        """
        if isinstance(epoch, bytes):
            epoch = epoch.decode("ascii", "replace")
        old = self._epochs.get(slot, _UNSEEN)
        self._epochs[slot] = epoch
        if old is _UNSEEN or old is None or old == epoch:
            return
        self.rollbacks += 1
        if not self._loud("rollback"):
            return
        if epoch is None:
            self.log.error(
                "Redis lost the inbox epoch {old}: Redis lost its data; new seqs will"
                " start above a new seq floor, messages stored before are gone",
                old=old,
                epoch=epoch,
                slot=slot,
                rollbacks=self.rollbacks,
            )
        else:
            self.log.error(
                "the inbox epoch changed from {old} to {epoch}: Redis lost its data;"
                " seqs continue above the new seq floor, messages stored before are gone",
                old=old,
                epoch=epoch,
                slot=slot,
                rollbacks=self.rollbacks,
            )

    def _loud(self, kind):
        """
        Whether to log an event of C{kind} (C{"rollback"}, C{"new"},
        C{"restart"}): always on one Redis; on a cluster, where each slot
        sees it (thousands for one primary), at most once per
        L{SLOT_LOG_INTERVAL} seconds per kind.
        """
        if not self.cluster:
            return True
        now = self.clock.seconds()
        last = self._slotLogged.get(kind)
        if last is not None and now - last < SLOT_LOG_INTERVAL:
            return False
        self._slotLogged[kind] = now
        return True

    def _observeStatus(self, status, epoch, slot=None):
        if status == b"new":
            if self._loud("new"):
                self.log.info(
                    "created the inbox epoch {epoch} and its seq floor", epoch=epoch, slot=slot
                )
        elif status == b"restart":
            self.restarts += 1
            if not self._loud("restart"):
                return
            self.log.warn(
                "Redis restarted or failed over since the last delivery: raised the seq"
                " floor, so seqs of writes it may have lost are not reused",
                epoch=epoch,
                slot=slot,
                restarts=self.restarts,
            )

    def _observe(self, reply, slot=None):
        """
        Note the epoch and the floor status at the start of a deliver
        script's C{reply}.
        """
        self._observeEpoch(reply[1], slot)
        self._observeStatus(reply[2], self._epochs[slot], slot)

    def epoch(self, uid=None):
        """
        @param uid: on a cluster, whose slot's epoch (required there).
        @return: a L{Deferred} firing with the current inbox epoch id
            (L{str}), or L{None} if Redis has none (nothing delivered since
            it was created or lost its data).
        """
        slot = userSlot(uid) if self.cluster else None
        key = slotKey(slot, "epoch") if self.cluster else EPOCH_KEY

        def got(value):
            self._observeEpoch(value, slot)
            return self._epochs[slot]

        return self.connection.execute("GET", key).addCallback(got)

    # -- IMessageStore --------------------------------------------------------

    def deliver(self, sender, clientMsgId, message, recipients, nowMs):
        d = self._write(sender, clientMsgId, message, recipients, nowMs)
        if self.waitReplicas:
            d.addCallback(self._replicated)
        return d

    def _replicated(self, delivery):
        """
        Wait until L{waitReplicas} replicas have the delivery (C{WAIT} on
        the connection: every write it sent so far; on a cluster, on every
        primary); fewer within L{waitTimeoutMs}: L{RedisUnavailable}, and the
        client's retry (answered from the dedup record) waits again.
        """

        def waited(replicas):
            if replicas < self.waitReplicas:
                raise RedisUnavailable(
                    "{} of {} replicas acknowledged the message within {} ms".format(
                        replicas, self.waitReplicas, self.waitTimeoutMs
                    )
                )
            return delivery

        keys = None
        if self.cluster and not delivery.duplicate:
            # The primaries written: the sender's and the recipients'
            # slots, and the outbox's if the event was recorded.  (A
            # duplicate may come after writes to any: every primary.)
            keys = [userKey(uid, "inbox") for uid in delivery.seqs]
            keys.append(userKey(delivery.message.sender, "inbox"))
            if self.outboxEvents and MESSAGE_STORED in self.outboxEvents:
                keys.append(self._outboxKeys[0])
        d = self.connection.waitReplicas(self.waitReplicas, self.waitTimeoutMs, keys)
        return d.addCallback(waited)

    def _write(self, sender, clientMsgId, message, recipients, nowMs):
        groupId = message.group_id
        recipients = [] if groupId else uniqueRecipients(sender, recipients)
        if self._runId is not None and self._nextId <= self._lastId:
            # The usual case: one round trip.
            messageId = self._nextId
            self._nextId += 1
            return self._deliverWith(
                self._runId, messageId, sender, clientMsgId, message, recipients, nowMs
            )
        d = self._serverRunId()

        def withRunId(runId):
            return self._newId().addCallback(
                lambda messageId: self._deliverWith(
                    runId, messageId, sender, clientMsgId, message, recipients, nowMs
                )
            )

        return d.addCallback(withRunId)

    def _deliverArgs(self, sender, nowMs, messageId, data, *runId):
        """
        The first C{ARGV} of the deliver scripts: sender, now ms, dedup
        window, floor candidate, a new epoch id, (on one Redis) the run id,
        message id, body, body TTL.
        """
        return [
            sender,
            "%d" % (nowMs,),
            "%d" % (self.dedupWindowMs,),
            self._floorCandidate(),
            os.urandom(8).hex(),
            *runId,
            "%d" % (messageId,),
            data,
            "%d" % (self.bodyTtlMs,) if self.bodyTtlMs else "",
        ]

    def _deliverWith(self, runId, messageId, sender, clientMsgId, message, recipients, nowMs):
        stored = pb.Message()
        stored.CopyFrom(message)
        stored.id = messageId
        stored.sender = sender
        stored.client_msg_id = clientMsgId
        stored.created_ms = nowMs
        groupId = message.group_id
        if self.cluster:
            return self._deliverCluster(stored, recipients, nowMs)
        keys = [
            EPOCH_KEY,
            SEQFLOOR_KEY,
            RUNID_KEY,
            dedupKey(sender, clientMsgId),
            bodyKey(messageId),
            BODIES_KEY,
        ]
        if groupId:
            # KEYS[7], read only for a group message: no empty key name
            # otherwise (an ACL user limited to ~im:* refuses one).
            keys.append(groupKey(groupId, "members"))
        args = self._deliverArgs(sender, nowMs, messageId, stored.SerializeToString(), runId)
        args.append("1" if groupId else "0")
        for uid in recipients:
            args += [uid, tagHex(uid)]
        script = self._deliver
        if self.outboxEvents and MESSAGE_STORED in self.outboxEvents:
            event = messageStored(stored, ())
            self._withEvent(keys, args, event, nowMs, *_aroundList(event.data, b"recipients"))
            script = self._deliverOutbox

        def done(reply):
            kind = reply[0]
            self._observe(reply)
            if kind == b"ok":
                if len(reply) > 4:
                    self._kept(reply[4])
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

        return script(keys, args).addCallback(done)

    # -- deliver on a Redis Cluster ---------------------------------------------

    def _deliverCluster(self, stored, recipients, nowMs):
        """
        L{deliver} on a cluster: for a group, its members first (the
        group's slot); then L{_begin} on the sender's slot, L{_fanOut} to
        the other slots, and the C{message.stored} event.
        """
        groupId = stored.group_id
        if not groupId:
            return self._begin(stored, recipients, nowMs)

        def gotMembers(reply):
            members = []
            if reply[0] == b"ok":
                it = iter(unpack(reply[1]))
                members = [uid.decode("utf-8") for uid, _ in zip(it, it)]
            if members and (stored.sender == SYSTEM or stored.sender in members):
                return self._begin(stored, members, nowMs)
            # Not a member (now): a retry of a message sent while it was
            # one is still a duplicate.
            return self._begin(stored, None, nowMs)

        return self._members(self._groupKeys(groupId)).addCallback(gotMembers)

    def _slotArgs(self, slot, messageId):
        """
        The first keys of the deliver scripts of a cluster: the slot's
        epoch, floor and run id, and the body's key; and the body prefix.
        """
        prefix = slotBodyPrefix(slot)
        keys = [slotKey(slot, "epoch"), slotKey(slot, "seqfloor"), slotKey(slot, "runid")]
        return keys, prefix + "%d" % (messageId,), prefix

    def _begin(self, stored, recipients, nowMs, together=True):
        """
        Step 1 (C{deliverBegin.lua}), on the sender's slot: the dedup
        check; the body, the entries of that slot, and the dedup record
        naming the recipients of the other slots; and, in the same call,
        step 2 for the other slots the sender's primary serves (slot
        blocks, as L{_append}).

        @param recipients: the uids, in order, or L{None} to look for the
            dedup record only (a group message from a non-member).
        @param together: whether to send the other slots of the sender's
            primary with it (if one of them is not served there, it is sent
            again without them); only for at most L{BEGIN_APPEND_LIMIT}
            recipients in other slots.
        """
        sender = stored.sender
        slot = userSlot(sender)
        here, there = [], []
        for uid in recipients or ():
            (here if userSlot(uid) == slot else there).append(uid)
        keys, body, prefix = self._slotArgs(slot, stored.id)
        keys += [dedupKey(sender, stored.client_msg_id), body, slotKey(slot, "bodies")]
        packed = []
        for uid in there:
            packed += [uid, tagHex(uid)]
        data = stored.SerializeToString()
        args = self._deliverArgs(sender, nowMs, stored.id, data)
        args += [prefix, _pack(packed), "1" if recipients is None else "0", "%d" % (2 * len(here),)]
        for uid in here:
            args += [uid, tagHex(uid)]
        bySlot = {}
        for uid in there:
            bySlot.setdefault(userSlot(uid), []).append(uid)
        local = []
        if together and bySlot and len(there) <= BEGIN_APPEND_LIMIT:
            primary = self.connection.addressOf(slot)
            local = [other for other in bySlot if self.connection.addressOf(other) == primary]
            for other in local:
                args += self._slotBlock(other, stored.id, bySlot[other])
        elsewhere = [uid for uid in there if userSlot(uid) not in local]

        def begun(reply):
            kind = reply[0]
            if kind == b"moved":
                return self._begin(stored, recipients, nowMs, together=False)
            self._observe(reply, slot)
            if kind == b"none":
                raise NotMember("not a member of group {!r}".format(stored.group_id))
            if kind == b"ok":
                seqs = _seqs(reply[3])
                for other, (_, epoch, status, otherPacked) in zip(local, reply[4:]):
                    self._observe((None, epoch, status), other)
                    seqs.update(_seqs(otherPacked))
                return self._fanOut(stored, data, recipients, seqs, elsewhere, None)
            originalId, senderSeq, createdMs, originalData, herePacked, therePacked = reply[3:9]
            if originalData is None:
                # Its body is gone (retention): nothing left to complete.
                original = pb.Message(id=int(originalId), created_ms=int(createdMs))
                return Delivery(original, {sender: int(senderSeq)}, True)
            original = pb.Message.FromString(originalData)
            seqs = _seqs(herePacked)
            it = iter(unpack(therePacked))
            there[:] = [uid.decode("utf-8") for uid, _ in zip(it, it)]
            order = list(seqs) + there
            return self._fanOut(original, originalData, order, seqs, there, int(senderSeq))

        return self._deliverBegin(keys, args).addCallback(begun)

    def _fanOut(self, stored, data, order, seqs, there, senderSeq):
        """
        Step 2 (C{deliverAppend.lua}), on every other slot of C{there} in
        parallel, idempotent on the message id; then the C{message.stored}
        event, once per message id; then the outcome.

        @param senderSeq: L{None} for a first delivery; for a retry (the
            dedup record was there), the sender's seq: the outcome is then
            a duplicate unless this call appended anything.
        """
        bySlot = {}
        for uid in there:
            bySlot.setdefault(userSlot(uid), []).append(uid)
        appends = [self._append(slots, stored, data, bySlot) for slots in self._byPrimary(bySlot)]

        def appended(results):
            fresh = senderSeq is None
            for replies in results:
                for kind, packed in replies:
                    fresh = fresh or kind == b"ok"
                    seqs.update(_seqs(packed))
            if fresh:
                outcome = Delivery(stored, {uid: seqs[uid] for uid in order}, False)
            else:
                outcome = Delivery(stored, {stored.sender: senderSeq}, True)
            if self.outboxEvents and MESSAGE_STORED in self.outboxEvents:
                return self._recordStored(stored, order).addCallback(lambda _: outcome)
            return outcome

        return _all(appends).addCallback(appended)

    def _byPrimary(self, items, slotOf=lambda slot: slot):
        """
        C{items} (slots by default) grouped by primary (L{byPrimary}).
        """
        return byPrimary(self.connection, items, slotOf)

    def _append(self, slots, stored, data, bySlot):
        """
        C{deliverAppend.lua} on the primary of C{slots}, for the
        recipients C{bySlot[slot]} of each: one call.  If the script finds
        a slot not (or no longer) served there, it writes nothing, and each
        slot gets a call of its own, routed by its own keys (C{MOVED} and
        C{ASK} followed).

        @return: a L{Deferred} firing with C{[(kind, packed)]}, per slot.
        """
        args = self._deliverArgs(stored.sender, stored.created_ms, stored.id, data)
        for slot in slots:
            args += self._slotBlock(slot, stored.id, bySlot[slot])
        # The first slot's keys, declared: they route the call.
        keys = args[8:14]

        def done(reply):
            if reply[0] == b"moved":
                self.log.debug(
                    "slot {slot} is not on the primary of slot {first} any more: one call per slot",
                    slot=slots[int(reply[1]) - 1],
                    first=slots[0],
                )
                return _all(
                    [self._append([slot], stored, data, bySlot) for slot in slots]
                ).addCallback(lambda results: [r for replies in results for r in replies])
            out = []
            for slot, (kind, epoch, status, packed) in zip(slots, reply):
                self._observe((kind, epoch, status), slot)
                out.append((kind, packed))
            return out

        return self._deliverAppend(keys, args).addCallback(done)

    def _slotBlock(self, slot, messageId, uids):
        """
        The slot block (C{slots.lua}) of the recipients C{uids} of C{slot}:
        the slot's 6 keys, how many recipients, their (uid, user tag hex).
        """
        keys, body, _ = self._slotArgs(slot, messageId)
        block = keys + [appliedKey(slot, messageId), body, slotKey(slot, "bodies")]
        block.append("%d" % (len(uids),))
        for uid in uids:
            block += [uid, tagHex(uid)]
        return block

    def _recordStored(self, stored, recipients):
        """
        Record the C{message.stored} event of C{stored} unless it was
        recorded within the dedup window (C{storedEvent.lua}).
        """
        event = messageStored(stored, recipients)
        keys = self._outboxKeys + [storedMarkerKey(stored.id)]
        args = [
            "%d" % (self.outboxLimit,),
            os.urandom(8).hex(),
            "%d" % (stored.created_ms,),
            event.type,
            event.key,
            event.data,
            "%d" % (max(1, self.dedupWindowMs),),
        ]
        return self._storedEvent(keys, args).addCallback(self._kept)

    def fetch(self, uid, afterSeq, limit):
        if limit <= 0:
            return succeed([])

        slot = userSlot(uid) if self.cluster else None

        def done(reply):
            self._observeEpoch(reply[0], slot)
            it = iter(unpack(reply[1]))
            return [
                pb.InboxEntry(
                    seq=int(seq), outgoing=outgoing == b"1", message=pb.Message.FromString(body)
                )
                for seq, outgoing, body in zip(it, it, it)
            ]

        keys = [userKey(uid, "inbox"), EPOCH_KEY]
        args = ["%d" % (afterSeq,), "%d" % (limit,)]
        if self.cluster:
            keys[1] = slotKey(slot, "epoch")
            args += [slotBodyPrefix(slot), slotKey(slot, "bodies")]
        return self._fetch(keys, args).addCallback(done)

    def head(self, uid):
        slot = userSlot(uid) if self.cluster else None

        def done(reply):
            epoch, head = reply
            self._observeEpoch(epoch, slot)
            return int(head) if head is not None else 0

        epochKey = slotKey(slot, "epoch") if self.cluster else EPOCH_KEY
        return self.connection.execute("MGET", epochKey, userKey(uid, "head")).addCallback(done)

    def ack(self, cursors, nowMs):
        if self.cluster:
            return self._ackCluster(cursors, nowMs)
        args = ["%d" % (nowMs,)]
        for uid, deviceId, seq in cursors:
            args += [tagHex(uid), deviceId, "%d" % (max(0, seq),)]
        if len(args) == 1:
            return succeed(0)
        return self._ack([], args).addCallback(lambda reply: reply[0])

    def _ackCluster(self, cursors, nowMs):
        """
        L{ack} on a cluster: one C{ack.lua} per primary (by the slot map),
        in parallel, each given a key of its first user's slot to be routed
        there; the cursors a node refused (their slot is not, or no longer,
        served there) are written again, each routed by its own key.
        """
        groups = self._byPrimary(cursors, lambda cursor: userSlot(cursor[0]))
        if not groups:
            return succeed(0)
        return _all([self._ackOn(triples, nowMs) for triples in groups]).addCallback(sum)

    def _ackOn(self, triples, nowMs):
        """
        C{ack.lua} for C{triples} (C{(uid, deviceId, seq)}), routed by the
        first user's key; each triple the node refused, again on its own.

        @return: a L{Deferred} firing with the number of cursors written.
        """
        args = ["%d" % (nowMs,)]
        for uid, deviceId, seq in triples:
            args += [tagHex(uid), deviceId, "%d" % (max(0, seq),)]

        def done(reply):
            refused = [triples[int(n) - 1] for n in reply[1:]]
            if not refused:
                return reply[0]
            if len(triples) == 1:
                raise RedisUnavailable("the primary of {} refused its key".format(triples[0][0]))
            alone = _all([self._ackOn([triple], nowMs) for triple in refused])
            return alone.addCallback(lambda counts: reply[0] + sum(counts))

        return self._ack([userKey(triples[0][0], "cursors")], args).addCallback(done)

    def cursor(self, uid, deviceId):
        def done(value):
            return 0 if value is None else int(value.split(b":", 1)[0])

        return self.connection.execute("HGET", userKey(uid, "cursors"), deviceId).addCallback(done)

    def trim(self, nowMs, maxAgeMs, maxCount):
        return self._trim(nowMs, maxAgeMs, maxCount)

    def trimPrimary(self, address, nowMs, maxAgeMs, maxCount):
        """
        L{trim} on a Redis Cluster, of the keys of one primary only.

        @param address: the primary's C{(host, port)}, as
            L{imserver.rediscluster.ClusterConnection.primaries} has it (if
            it is not a primary now: nothing done, 0).
        """
        if address not in self.connection.primaries:
            return succeed(0)
        return self._trim(nowMs, maxAgeMs, maxCount, address)

    @inlineCallbacks
    def _trim(self, nowMs, maxAgeMs, maxCount, primary=None):
        oldest = "%d" % (nowMs - maxAgeMs,)
        params = [oldest, "%d" % (maxCount,), "%d" % (self.clockSkewMs,), "%d" % (TRIM_SCAN_LIMIT,)]
        removed = 0
        cursor = b"0"
        if primary is not None:
            # The cluster connection's SCAN cursor names the node it is at.
            here = b"%s:%d:" % (primary[0].encode(), primary[1])
            cursor = here + b"0"
        pattern = CLUSTER_SCAN_KEYS if self.cluster else USER_KEYS
        while True:
            cursor, keys = yield self.connection.execute(
                "SCAN", cursor, "MATCH", pattern, "COUNT", self.scanCount
            )
            if primary is not None and not bytes(cursor).startswith(here):
                # That primary is done (the cursor moved on to the next).
                cursor = b"0"
            # On a cluster, the users by slot, each slot's run with one of
            # its keys (routing), and the slots' bodies indexes.
            bySlot = {}
            indexes = []
            for key in keys:
                if key.startswith(b"im:{u:") and key.endswith((b"}:inbox", b"}:cursors")):
                    tag = tagHexOf(key)
                    slot = keySlot(b"u:" + tag) if self.cluster else None
                    routing, tags = bySlot.setdefault(slot, ([key] if self.cluster else [], []))
                    if tag not in tags:
                        tags.append(tag)
                elif key.startswith(b"im:{s:") and key.endswith(b"}:bodies"):
                    indexes.append(key)
            for routing, tags in bySlot.values():
                while tags:
                    reply = yield self._trimUsers(routing, params + tags)
                    removed += reply[0]
                    tags = reply[1:]
            for index in indexes:
                tag = index[len(b"im:{") : index.index(b"}")]
                yield self._trimBodiesOf(index, oldest, b"im:m:{%s}:" % (tag,))
            if cursor in (b"0", 0, "0"):
                break
        if not self.cluster:
            yield self._trimBodiesOf(BODIES_KEY, oldest)
        return removed

    @inlineCallbacks
    def _trimBodiesOf(self, index, oldest, *prefix):
        """
        Delete the bodies of the index C{index} older than C{oldest}, a
        batch per call (C{prefix}: on a cluster, their keys' prefix).
        """
        while True:
            args = [oldest, "%d" % (TRIM_BODY_BATCH,)] + list(prefix)
            count = yield self._trimBodies([index], args)
            if count < TRIM_BODY_BATCH:
                break

    # -- IGroupStore --------------------------------------------------------

    def createGroup(self, groupId, name, owner, nowMs):
        def done(reply):
            if reply == b"exists":
                raise GroupExists(groupId)
            if reply == b"full":
                self._kept(0)
            return pb.Group(
                group_id=groupId, name=name, created_ms=nowMs, member_count=1, role=pb.ROLE_OWNER
            )

        keys = [groupKey(groupId, "info"), groupKey(groupId, "members"), userKey(owner, "groups")]
        args = [groupId, name, owner, "%d" % (nowMs,), "%d" % (pb.ROLE_OWNER,), tagHex(owner)]
        if self.cluster:
            # The owner's groups first: an entry there for a group it is not
            # a member of is ignored (groupsOf checks the members).
            d = self.connection.execute("SADD", keys.pop(), groupId)
            d.addCallback(lambda _: self._createGroup(keys, args)).addCallback(done)
            return self._thenGroupEvent(d, nowMs, groupId, GROUP_CREATED, [owner], name)
        self._withGroupEvent(keys, args, nowMs, groupId, GROUP_CREATED, [owner], name)
        return self._createGroup(keys, args).addCallback(done)

    def deleteGroup(self, groupId):
        def done(reply):
            if reply == b"notfound":
                raise GroupNotFound(groupId)
            if reply == b"full":
                self._kept(0)
            return True

        keys, args = self._groupKeys(groupId), [groupId]
        if self.cluster:

            def deleted(reply):
                if reply == b"notfound":
                    raise GroupNotFound(groupId)
                keys = [tagKey(tag.decode("ascii"), "groups") for tag in unpack(reply[1])]
                return self._index("SREM", groupId, keys)

            d = self._deleteGroup(keys, args).addCallback(deleted).addCallback(lambda _: True)
            return self._thenGroupEvent(d, self._nowMs(), groupId, GROUP_DELETED, ())
        self._withGroupEvent(keys, args, self._nowMs(), groupId, GROUP_DELETED)
        return self._deleteGroup(keys, args).addCallback(done)

    def setMembers(self, groupId, members, maxSize, nowMs):
        roles = dict(members)
        args = [groupId, "%d" % (maxSize,), "%d" % (nowMs,)]
        for uid, role in roles.items():
            args += [uid, "%d" % (role,), tagHex(uid)]

        def done(reply):
            if reply[0] == b"notfound":
                raise GroupNotFound(groupId)
            if reply[0] == b"full":
                raise GroupFull(groupId)
            if len(reply) > 2:
                self._kept(reply[2])
            return [uid.decode("utf-8") for uid in unpack(reply[1])]

        keys = self._groupKeys(groupId)
        if self.cluster:
            # Their groups first (see createGroup).
            d = self._index("SADD", groupId, [userKey(uid, "groups") for uid in roles])
            d.addCallback(lambda _: self._setMembers(keys, args)).addCallback(done)
            return self._thenGroupEvent(d, nowMs, groupId, MEMBERS_ADDED, None)
        self._withGroupEvent(keys, args, nowMs, groupId, MEMBERS_ADDED, uids=None)
        return self._setMembers(keys, args).addCallback(done)

    def removeMembers(self, groupId, uids):
        def done(reply):
            if reply[0] == b"notfound":
                raise GroupNotFound(groupId)
            if len(reply) > 2:
                self._kept(reply[2])
            return [uid.decode("utf-8") for uid in unpack(reply[1])]

        args = [groupId]
        for uid in dict.fromkeys(uids):
            args += [uid, tagHex(uid)]
        keys = self._groupKeys(groupId)
        if self.cluster:

            def unlink(removed):
                keys = [userKey(uid, "groups") for uid in removed]
                return self._index("SREM", groupId, keys).addCallback(lambda _: removed)

            d = self._removeMembers(keys, args).addCallback(done).addCallback(unlink)
            return self._thenGroupEvent(d, self._nowMs(), groupId, MEMBERS_REMOVED, None)
        self._withGroupEvent(keys, args, self._nowMs(), groupId, MEMBERS_REMOVED, uids=None)
        return self._removeMembers(keys, args).addCallback(done)

    def group(self, groupId):
        def done(reply):
            if reply[0] == b"notfound":
                return None
            _, name, createdMs, count = reply
            return pb.Group(
                group_id=groupId,
                name=name.decode("utf-8"),
                created_ms=int(createdMs),
                member_count=count,
            )

        return self._groupInfo(self._groupKeys(groupId)).addCallback(done)

    def members(self, groupId):
        def done(reply):
            if reply[0] == b"notfound":
                raise GroupNotFound(groupId)
            it = iter(unpack(reply[1]))
            result = []
            for uid, value in zip(it, it):
                role, joinedMs = value.split(b":")[:2]
                result.append(
                    pb.Member(uid=uid.decode("utf-8"), role=int(role), joined_ms=int(joinedMs))
                )
            result.sort(key=lambda member: member.uid)
            return result

        return self._members(self._groupKeys(groupId)).addCallback(done)

    def groupsOf(self, uid):
        def done(reply):
            it = iter(unpack(reply))
            groups = [
                pb.Group(
                    group_id=groupId.decode("utf-8"),
                    name=name.decode("utf-8"),
                    created_ms=int(createdMs),
                    role=int(role),
                    member_count=int(count),
                )
                for groupId, name, createdMs, role, count in zip(it, it, it, it, it)
            ]
            groups.sort(key=lambda group: group.group_id)
            return groups

        if self.cluster:
            return self._groupsOfCluster(uid).addCallback(done)
        return self._groupsOf([userKey(uid, "groups")], [uid]).addCallback(done)

    def _groupsOfCluster(self, uid):
        """
        On a cluster: the user's groups, then each group on its slot (in
        parallel); the reply packed as C{groupsOf.lua}'s.
        """

        def got(groupIds):
            d = _all(
                [
                    self._groupOf([groupKey(groupId.decode("utf-8"), "info")], [uid, groupId])
                    for groupId in groupIds
                ]
            )
            return d.addCallback(b"".join)

        return self.connection.execute("SMEMBERS", userKey(uid, "groups")).addCallback(got)

    def _groupKeys(self, groupId):
        return [groupKey(groupId, "info"), groupKey(groupId, "members")]

    def _index(self, command, groupId, keys):
        """
        On a cluster: add C{groupId} to (C{SADD}) or remove it from
        (C{SREM}) the users' groups sets C{keys}, in parallel.
        """
        return _all([self.connection.execute(command, key, groupId) for key in keys])

    def _thenGroupEvent(self, d, nowMs, groupId, change, uids, name=None):
        """
        On a cluster, after the change C{d} made: record its
        C{group.changed} event, if the store records them (C{uids}
        L{None}: those C{d} fires with, and only if there are some).  The
        outbox is in another slot: an event is lost if this fails after
        the change (at most once).
        """
        if not (self.outboxEvents and GROUP_CHANGED in self.outboxEvents):
            return d

        def record(result):
            listed = result if uids is None else uids
            if uids is None and not listed:
                return result
            event = groupChanged(groupId, change, listed, name)
            return self.enqueue([event], nowMs).addCallback(lambda _: result)

        return d.addCallback(record)

    # -- IOutbox --------------------------------------------------------------

    def _nowMs(self):
        return int(self.clock.seconds() * 1000)

    def _withEvent(self, keys, args, event, nowMs, before, after=b""):
        """
        Pass a script what it needs to record C{event} (outbox.lua): the
        outbox keys after C{keys}, the event's values after C{args}; its
        data is C{before}, the uids the script fills in, C{after}.
        """
        keys += self._outboxKeys
        args += [
            "%d" % (self.outboxLimit,),
            os.urandom(8).hex(),
            "%d" % (nowMs,),
            event.type,
            event.key,
            before,
            after,
        ]

    def _withGroupEvent(self, keys, args, nowMs, groupId, change, uids=(), name=None):
        """
        L{_withEvent} for a C{group.changed} event, if the store records
        them; C{uids} L{None}: the script fills them in.
        """
        if self.outboxEvents and GROUP_CHANGED in self.outboxEvents:
            event = groupChanged(groupId, change, uids or (), name)
            if uids is None:
                self._withEvent(keys, args, event, nowMs, *_aroundList(event.data, b"uids"))
            else:
                self._withEvent(keys, args, event, nowMs, event.data)

    def _kept(self, kept):
        """
        A script recorded an event (C{kept} 1) or found the outbox full (0).
        """
        if not kept:
            self._dropped(1)

    def _dropped(self, count):
        self.outboxDropped += count
        self._fullLog.dropped(
            self.log, count, self.outboxDropped, self.outboxLimit, self.clock.seconds()
        )

    def enqueue(self, events, nowMs):
        args = ["%d" % (self.outboxLimit,), os.urandom(8).hex(), "%d" % (nowMs,)]
        count = 0
        for event in events:
            op, key, field = "", "", ""
            if event.presence is not None and event.type in (USER_ONLINE, USER_OFFLINE):
                uid, deviceId, gateId, sessionId = event.presence
                op = "+" if event.type == USER_ONLINE else "-"
                key, field = self._presenceKey(gateId), presenceField(uid, deviceId, sessionId)
            args += [event.type, event.key, event.data, op, key, field]
            count += 1
        if not count:
            return succeed(0)

        def done(kept):
            if kept < count:
                self._dropped(count - kept)
            return kept

        return self._enqueue(self._outboxKeys, args).addCallback(done)

    def pending(self, afterId, limit):
        if limit <= 0:
            return succeed([])

        def done(reply):
            packed, storeId = reply[0], reply[1] if len(reply) > 1 else None
            storeId = storeId.decode("ascii") if storeId is not None else ""
            it = iter(unpack(packed))
            return [
                OutboxEntry(
                    int(number),
                    eventId(storeId, int(number)),
                    kind.decode("utf-8"),
                    key.decode("utf-8"),
                    int(createdMs),
                    data,
                )
                for number, createdMs, kind, key, data in zip(it, it, it, it, it)
            ]

        return self._pending(
            [self._outboxKeys[0], self._outboxKeys[2]], ["%d" % (max(0, afterId),), "%d" % (limit,)]
        ).addCallback(done)

    @inlineCallbacks
    def remove(self, ids):
        ids = ["%d-0" % (number,) for number in ids]
        removed = 0
        for start in range(0, len(ids), REMOVE_CHUNK):
            removed += yield self.connection.execute(
                "XDEL", self._outboxKeys[0], *ids[start : start + REMOVE_CHUNK]
            )
        return removed

    def expire(self, beforeMs):
        # Entry ids are at least their created ms * 1000 (outbox.lua), so
        # every entry below this one was recorded before beforeMs.  (An
        # entry recorded by a gate whose clock is behind the others' may
        # have a larger id and go later.)
        return self.connection.execute(
            "XTRIM", self._outboxKeys[0], "MINID", "%d-0" % (max(0, beforeMs) * 1000,)
        )

    def outboxStats(self):
        def done(reply):
            return (reply[0], int(reply[1]) if len(reply) > 1 else None)

        return self._outboxStats(self._outboxKeys[:1]).addCallback(done)

    def claimOutbox(self, owner, ttlMs):
        return self.claimLease(OUTBOX_LEASE_KEY, owner, ttlMs)

    def claimLease(self, key, owner, ttlMs):
        """
        Take the lease C{key} for C{ttlMs} if nobody holds it, or extend it
        if C{owner} does (one gate of the cluster doing a job:
        L{OUTBOX_LEASE_KEY}, L{RETENTION_LEASE_KEY}).

        @return: a L{Deferred} firing with whether C{owner} holds it now.
        """
        return self._claimLease([key], [owner, "%d" % (ttlMs,)]).addCallback(
            lambda reply: reply == 1
        )

    def presentOn(self, gateId):
        def done(fields):
            present = []
            for field in fields:
                uid, deviceId, sessionId = unpack(field)
                present.append(
                    (uid.decode("utf-8"), deviceId.decode("utf-8"), sessionId.decode("utf-8"))
                )
            present.sort()
            return present

        return self.connection.execute("HKEYS", self._presenceKey(gateId)).addCallback(done)
