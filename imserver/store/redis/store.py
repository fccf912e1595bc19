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
from imserver.store import (
    OUTBOX_LIMIT,
    Delivery,
    GroupExists,
    GroupFull,
    GroupNotFound,
    OutboxFullLog,
    uniqueRecipients,
)
from imserver.store.redis.keys import (
    BODIES_KEY,
    EPOCH_KEY,
    MSGID_KEY,
    OUTBOX_KEY,
    OUTBOX_LAST_KEY,
    OUTBOX_LEASE_KEY,
    OUTBOX_STORE_KEY,
    RUNID_KEY,
    SEQFLOOR_KEY,
    USER_KEYS,
    bodyKey,
    dedupKey,
    groupKey,
    presenceField,
    presenceKey,
    tagHex,
    tagHexOf,
    userKey,
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

#: Most outbox entries deleted per C{XDEL}.
REMOVE_CHUNK = 1000

#: The outbox keys passed to the scripts that record events.
_OUTBOX_KEYS = [OUTBOX_KEY, OUTBOX_LAST_KEY, OUTBOX_STORE_KEY]

_RUN_ID = re.compile(rb"^run_id:([0-9a-fA-F]+)\s*$", re.MULTILINE)


def _lua(name):
    """
    The source of C{scripts/<name>.lua}.
    """
    return (files(__package__) / "scripts" / (name + ".lua")).read_text("utf-8")


# The scripts' sources, read once; each file says its KEYS, ARGV and reply.
# Those that use the helpers of prelude.lua (hex, fmt, put, timeFloor) get
# it in front; those that record outbox events, outbox.lua after it.
_PRELUDE = _lua("prelude")
_OUTBOX = _PRELUDE + _lua("outbox")
# deliver, on the hot path, comes in two: recording message.stored, and not
# (without outbox.lua, so it does not even make its functions).
DELIVER = _PRELUDE + "local outboxArgs = false\n" + _lua("deliver")
DELIVER_OUTBOX = _OUTBOX + _lua("deliver")
FETCH = _PRELUDE + _lua("fetch")
ACK = _lua("ack")
RESERVE_IDS = _PRELUDE + _lua("reserveIds")
TRIM_USERS = _lua("trimUsers")
TRIM_BODIES = _lua("trimBodies")
CREATE_GROUP = _OUTBOX + _lua("createGroup")
DELETE_GROUP = _OUTBOX + _lua("deleteGroup")
SET_MEMBERS = _OUTBOX + _lua("setMembers")
REMOVE_MEMBERS = _OUTBOX + _lua("removeMembers")
GROUP_INFO = _lua("groupInfo")
MEMBERS = _PRELUDE + _lua("members")
GROUPS_OF = _PRELUDE + _lua("groupsOf")
ENQUEUE = _OUTBOX + _lua("enqueue")
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


class _Unseen:
    def __repr__(self):
        return "<unseen>"


_UNSEEN = _Unseen()


@implementer(IMessageStore, IGroupStore, IOutbox)
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
    @param clockSkewMs: how far gates' clocks may disagree before
        retention trims an inbox less exactly (docs/architecture.md, "The
        message store", Retention).
    @param scanCount: the C{COUNT} of retention's C{SCAN} calls.

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
    ):
        self.connection = connection
        self.clock = clock
        self.dedupWindowMs = dedupWindowMs
        self.idBlock = idBlock
        self.bodyTtlMs = bodyTtlMs
        self.clockSkewMs = clockSkewMs
        self.scanCount = scanCount
        self.rollbacks = 0
        self.restarts = 0
        self.outboxEvents = frozenset()
        self.outboxLimit = OUTBOX_LIMIT
        self.outboxDropped = 0
        self._fullLog = OutboxFullLog()
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
        self._deliver = script(DELIVER, "store.deliver")
        self._deliverOutbox = script(DELIVER_OUTBOX, "store.deliverOutbox")
        self._fetch = script(FETCH, "store.fetch")
        self._ack = script(ACK, "store.ack")
        self._reserveIds = script(RESERVE_IDS, "store.reserveIds")
        self._trimUsers = script(TRIM_USERS, "store.trimUsers")
        self._trimBodies = script(TRIM_BODIES, "store.trimBodies")
        self._createGroup = script(CREATE_GROUP, "store.createGroup")
        self._deleteGroup = script(DELETE_GROUP, "store.deleteGroup")
        self._setMembers = script(SET_MEMBERS, "store.setMembers")
        self._removeMembers = script(REMOVE_MEMBERS, "store.removeMembers")
        self._groupInfo = script(GROUP_INFO, "store.groupInfo")
        self._members = script(MEMBERS, "store.members")
        self._groupsOf = script(GROUPS_OF, "store.groupsOf")
        self._enqueue = script(ENQUEUE, "store.enqueue")
        self._pending = script(PENDING, "store.pending")
        self._outboxStats = script(OUTBOX_STATS, "store.outboxStats")
        self._claimLease = script(CLAIM_LEASE, "store.claimLease")
        self._scripts = [
            self._deliver,
            self._deliverOutbox,
            self._fetch,
            self._ack,
            self._reserveIds,
            self._trimUsers,
            self._trimBodies,
            self._createGroup,
            self._deleteGroup,
            self._setMembers,
            self._removeMembers,
            self._groupInfo,
            self._members,
            self._groupsOf,
            self._enqueue,
            self._pending,
            self._outboxStats,
            self._claimLease,
        ]

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
                error=failure.getErrorMessage(),
            )
            return b""

        info = self.connection.execute("INFO", "server").addErrback(noInfo)
        loads = [
            self.connection.execute("SCRIPT", "LOAD", script.source) for script in self._scripts
        ]

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

        self._reserveIds([MSGID_KEY], [self._floorCandidate(), block]).addCallbacks(
            reserved, failed
        )

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
                old=old,
                epoch=epoch,
                rollbacks=self.rollbacks,
            )
        else:
            self.log.error(
                "the inbox epoch changed from {old} to {epoch}: Redis lost its data;"
                " seqs continue above the new seq floor, messages stored before are gone",
                old=old,
                epoch=epoch,
                rollbacks=self.rollbacks,
            )

    def _observeStatus(self, status, epoch):
        if status == b"new":
            self.log.info("created the inbox epoch {epoch} and its seq floor", epoch=epoch)
        elif status == b"restart":
            self.restarts += 1
            self.log.warn(
                "Redis restarted or failed over since the last delivery: raised the seq"
                " floor, so seqs of writes it may have lost are not reused",
                epoch=epoch,
                restarts=self.restarts,
            )

    def epoch(self):
        """
        @return: a L{Deferred} firing with the current inbox epoch id
            (L{str}), or L{None} if Redis has none (nothing delivered since
            it was created or lost its data).
        """

        def got(value):
            self._observeEpoch(value)
            return self._epoch

        return self.connection.execute("GET", EPOCH_KEY).addCallback(got)

    # -- IMessageStore --------------------------------------------------------

    def deliver(self, sender, clientMsgId, message, recipients, nowMs):
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

    def _deliverWith(self, runId, messageId, sender, clientMsgId, message, recipients, nowMs):
        stored = pb.Message()
        stored.CopyFrom(message)
        stored.id = messageId
        stored.sender = sender
        stored.client_msg_id = clientMsgId
        stored.created_ms = nowMs
        groupId = message.group_id
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
        args = [
            sender,
            "%d" % (nowMs,),
            "%d" % (self.dedupWindowMs,),
            self._floorCandidate(),
            os.urandom(8).hex(),
            runId,
            "%d" % (messageId,),
            stored.SerializeToString(),
            "%d" % (self.bodyTtlMs,) if self.bodyTtlMs else "",
            "1" if groupId else "0",
        ]
        for uid in recipients:
            args += [uid, tagHex(uid)]
        script = self._deliver
        if self.outboxEvents and MESSAGE_STORED in self.outboxEvents:
            event = messageStored(stored, ())
            self._withEvent(keys, args, event, nowMs, *_aroundList(event.data, b"recipients"))
            script = self._deliverOutbox

        def done(reply):
            kind, epoch, status = reply[0], reply[1], reply[2]
            self._observeEpoch(epoch)
            self._observeStatus(status, self._epoch)
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

    def fetch(self, uid, afterSeq, limit):
        if limit <= 0:
            return succeed([])

        def done(reply):
            self._observeEpoch(reply[0])
            it = iter(unpack(reply[1]))
            return [
                pb.InboxEntry(
                    seq=int(seq), outgoing=outgoing == b"1", message=pb.Message.FromString(body)
                )
                for seq, outgoing, body in zip(it, it, it)
            ]

        return self._fetch(
            [userKey(uid, "inbox"), EPOCH_KEY], ["%d" % (afterSeq,), "%d" % (limit,)]
        ).addCallback(done)

    def head(self, uid):
        def done(reply):
            epoch, head = reply
            self._observeEpoch(epoch)
            return int(head) if head is not None else 0

        return self.connection.execute("MGET", EPOCH_KEY, userKey(uid, "head")).addCallback(done)

    def ack(self, cursors, nowMs):
        args = ["%d" % (nowMs,)]
        for uid, deviceId, seq in cursors:
            args += [tagHex(uid), deviceId, "%d" % (max(0, seq),)]
        if len(args) == 1:
            return succeed(0)
        return self._ack([], args)

    def cursor(self, uid, deviceId):
        def done(value):
            return 0 if value is None else int(value.split(b":", 1)[0])

        return self.connection.execute("HGET", userKey(uid, "cursors"), deviceId).addCallback(done)

    def trim(self, nowMs, maxAgeMs, maxCount):
        return self._trim(nowMs, maxAgeMs, maxCount)

    @inlineCallbacks
    def _trim(self, nowMs, maxAgeMs, maxCount):
        oldest = "%d" % (nowMs - maxAgeMs,)
        params = [oldest, "%d" % (maxCount,), "%d" % (self.clockSkewMs,), "%d" % (TRIM_SCAN_LIMIT,)]
        removed = 0
        cursor = b"0"
        while True:
            cursor, keys = yield self.connection.execute(
                "SCAN", cursor, "MATCH", USER_KEYS, "COUNT", self.scanCount
            )
            tags = []
            for key in keys:
                if key.endswith((b"}:inbox", b"}:cursors")):
                    tag = tagHexOf(key)
                    if tag not in tags:
                        tags.append(tag)
            while tags:
                reply = yield self._trimUsers([], params + tags)
                removed += reply[0]
                tags = reply[1:]
            if cursor in (b"0", 0, "0"):
                break
        while True:
            count = yield self._trimBodies([BODIES_KEY], [oldest, "%d" % (TRIM_BODY_BATCH,)])
            if count < TRIM_BODY_BATCH:
                break
        return removed

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

        return self._groupsOf([userKey(uid, "groups")], [uid]).addCallback(done)

    def _groupKeys(self, groupId):
        return [groupKey(groupId, "info"), groupKey(groupId, "members")]

    # -- IOutbox --------------------------------------------------------------

    def _nowMs(self):
        return int(self.clock.seconds() * 1000)

    def _withEvent(self, keys, args, event, nowMs, before, after=b""):
        """
        Pass a script what it needs to record C{event} (outbox.lua): the
        outbox keys after C{keys}, the event's values after C{args}; its
        data is C{before}, the uids the script fills in, C{after}.
        """
        keys += _OUTBOX_KEYS
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
                key, field = presenceKey(gateId), presenceField(uid, deviceId, sessionId)
            args += [event.type, event.key, event.data, op, key, field]
            count += 1
        if not count:
            return succeed(0)

        def done(kept):
            if kept < count:
                self._dropped(count - kept)
            return kept

        return self._enqueue(_OUTBOX_KEYS, args).addCallback(done)

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
            [OUTBOX_KEY, OUTBOX_STORE_KEY], ["%d" % (max(0, afterId),), "%d" % (limit,)]
        ).addCallback(done)

    @inlineCallbacks
    def remove(self, ids):
        ids = ["%d-0" % (number,) for number in ids]
        removed = 0
        for start in range(0, len(ids), REMOVE_CHUNK):
            removed += yield self.connection.execute(
                "XDEL", OUTBOX_KEY, *ids[start : start + REMOVE_CHUNK]
            )
        return removed

    def expire(self, beforeMs):
        # Entry ids are at least their created ms * 1000 (outbox.lua), so
        # every entry below this one was recorded before beforeMs.  (An
        # entry recorded by a gate whose clock is behind the others' may
        # have a larger id and go later.)
        return self.connection.execute(
            "XTRIM", OUTBOX_KEY, "MINID", "%d-0" % (max(0, beforeMs) * 1000,)
        )

    def outboxStats(self):
        def done(reply):
            return (reply[0], int(reply[1]) if len(reply) > 1 else None)

        return self._outboxStats([OUTBOX_KEY]).addCallback(done)

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

        return self.connection.execute("HKEYS", presenceKey(gateId)).addCallback(done)
