# -*- test-case-name: tests.test_store -*-
"""
An in-memory message store: the reference semantics, for tests and
benchmarks.  Nothing survives a restart.
"""

import os
from bisect import bisect_right

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from twisted.python import runtime
from zope.interface import implementer

from imserver.errors import NotMember
from imserver.interfaces import IGroupStore, IMessageStore, IOutbox
from imserver.pb import im_pb2 as pb
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


@implementer(IMessageStore, IGroupStore, IOutbox)
class MemoryMessageStore:
    """
    Inboxes as lists, in process memory.

    @param clock: an C{IReactorTime}: the time of the outbox events of
        operations given none (C{deleteGroup}, C{removeMembers}) and of
        the full-outbox warnings; the system clock if L{None}.
    """

    log = Logger()

    def __init__(self, dedupWindowMs=24 * 3600 * 1000, clock=None):
        self.dedupWindowMs = dedupWindowMs
        self._seconds = clock.seconds if clock is not None else runtime.seconds
        self._lastId = 0
        self._messages = {}  # id -> pb.Message
        self._inbox = {}  # uid -> list of (seq, message id, outgoing)
        self._heads = {}  # uid -> last seq
        self._dedup = {}  # (sender, client_msg_id) -> (id, sender seq, ms)
        self._cursors = {}  # (uid, device) -> (seq, ms)
        self._groups = {}  # group id -> pb.Group (role unset)
        self._members = {}  # group id -> {uid: pb.Member}
        # IOutbox
        self.outboxEvents = frozenset()
        self.outboxLimit = OUTBOX_LIMIT
        self.outboxDropped = 0
        self._storeId = os.urandom(8).hex()
        self._outbox = {}  # id -> OutboxEntry, in id order
        # Every id in _outbox, ascending, and ids removed since the last
        # compaction: pending finds its start by bisection.
        self._outboxIds = []
        self._lastOutboxId = 0
        self._present = {}  # gate id -> {(uid, device id, session id): None}
        self._fullLog = OutboxFullLog()

    def deliver(self, sender, clientMsgId, message, recipients, nowMs):
        key = (sender, clientMsgId)
        seen = self._dedup.get(key)
        if seen is not None and seen[2] > nowMs - self.dedupWindowMs:
            messageId, senderSeq, createdMs = seen
            original = self._messages.get(messageId)
            if original is None:
                original = pb.Message(id=messageId, created_ms=createdMs)
            return succeed(Delivery(original, {sender: senderSeq}, True))
        if message.group_id:
            members = self._members.get(message.group_id, {})
            if not members or (sender != SYSTEM and sender not in members):
                return fail(NotMember("not a member of group {!r}".format(message.group_id)))
            recipients = list(members)
        self._lastId += 1
        stored = pb.Message()
        stored.CopyFrom(message)
        stored.id = self._lastId
        stored.sender = sender
        stored.client_msg_id = clientMsgId
        stored.created_ms = nowMs
        self._messages[stored.id] = stored
        seqs = {}
        heads = self._heads
        head = heads.get
        inbox = self._inbox.setdefault
        messageId = stored.id
        for uid in uniqueRecipients(sender, recipients):
            seqs[uid] = heads[uid] = seq = head(uid, 0) + 1
            inbox(uid, []).append((seq, messageId, uid == sender))
        self._dedup[key] = (stored.id, seqs.get(sender, 0), nowMs)
        if self.outboxEvents and MESSAGE_STORED in self.outboxEvents:
            self._record([messageStored(stored, seqs)], nowMs)
        return succeed(Delivery(stored, seqs, False))

    def fetch(self, uid, afterSeq, limit):
        entries = []
        for seq, messageId, outgoing in self._inbox.get(uid, ()):
            if seq > afterSeq:
                entries.append(
                    pb.InboxEntry(seq=seq, outgoing=outgoing, message=self._messages[messageId])
                )
                if len(entries) >= limit:
                    break
        return succeed(entries)

    def head(self, uid):
        return succeed(self._heads.get(uid, 0))

    def ack(self, cursors, nowMs):
        count = 0
        for uid, deviceId, seq in cursors:
            old = self._cursors.get((uid, deviceId), (0, 0))[0]
            self._cursors[(uid, deviceId)] = (max(old, seq), nowMs)
            count += 1
        return succeed(count)

    def cursor(self, uid, deviceId):
        return succeed(self._cursors.get((uid, deviceId), (0, 0))[0])

    def trim(self, nowMs, maxAgeMs, maxCount):
        oldest = nowMs - maxAgeMs
        removed = 0
        for uid, entries in list(self._inbox.items()):
            cursors = [s for (u, _), (s, _) in self._cursors.items() if u == uid]
            acked = min(cursors) if cursors else 0
            cutoff = min(acked, self._heads[uid] - maxCount)
            kept = [
                e for e in entries if self._messages[e[1]].created_ms >= oldest and e[0] > cutoff
            ]
            removed += len(entries) - len(kept)
            if kept:
                self._inbox[uid] = kept
            else:
                del self._inbox[uid]
        referenced = {e[1] for entries in self._inbox.values() for e in entries}
        for messageId in [m for m in self._messages if m not in referenced]:
            if self._messages[messageId].created_ms < oldest:
                del self._messages[messageId]
        for key in [k for k, v in self._dedup.items() if v[2] <= nowMs - self.dedupWindowMs]:
            del self._dedup[key]
        for key in [k for k, v in self._cursors.items() if v[1] < oldest]:
            del self._cursors[key]
        return succeed(removed)

    # -- IGroupStore ----------------------------------------------------------

    def createGroup(self, groupId, name, owner, nowMs):
        if groupId in self._groups:
            return fail(GroupExists(groupId))
        self._groups[groupId] = pb.Group(group_id=groupId, name=name, created_ms=nowMs)
        self._members[groupId] = {owner: pb.Member(uid=owner, role=pb.ROLE_OWNER, joined_ms=nowMs)}
        self._groupChanged(nowMs, groupId, GROUP_CREATED, [owner], name)
        return succeed(self._info(groupId, owner))

    def deleteGroup(self, groupId):
        if self._groups.pop(groupId, None) is None:
            return fail(GroupNotFound(groupId))
        del self._members[groupId]
        self._groupChanged(None, groupId, GROUP_DELETED)
        return succeed(True)

    def setMembers(self, groupId, members, maxSize, nowMs):
        current = self._members.get(groupId)
        if current is None:
            return fail(GroupNotFound(groupId))
        roles = dict(members)
        added = [uid for uid in roles if uid not in current]
        if added and len(current) + len(added) > maxSize:
            return fail(GroupFull(groupId))
        for uid, role in roles.items():
            if uid in current:
                current[uid].role = role
            else:
                current[uid] = pb.Member(uid=uid, role=role, joined_ms=nowMs)
        if added:
            self._groupChanged(nowMs, groupId, MEMBERS_ADDED, added)
        return succeed(added)

    def removeMembers(self, groupId, uids):
        current = self._members.get(groupId)
        if current is None:
            return fail(GroupNotFound(groupId))
        removed = [uid for uid in dict.fromkeys(uids) if current.pop(uid, None) is not None]
        if removed:
            self._groupChanged(None, groupId, MEMBERS_REMOVED, removed)
        return succeed(removed)

    def group(self, groupId):
        if groupId not in self._groups:
            return succeed(None)
        return succeed(self._info(groupId, None))

    def members(self, groupId):
        current = self._members.get(groupId)
        if current is None:
            return fail(GroupNotFound(groupId))
        return succeed(
            [
                pb.Member(uid=m.uid, role=m.role, joined_ms=m.joined_ms)
                for _, m in sorted(current.items())
            ]
        )

    def groupsOf(self, uid):
        return succeed(
            [
                self._info(groupId, uid)
                for groupId in sorted(self._groups)
                if uid in self._members[groupId]
            ]
        )

    def _info(self, groupId, uid):
        info = pb.Group()
        info.CopyFrom(self._groups[groupId])
        members = self._members[groupId]
        info.member_count = len(members)
        if uid is not None:
            info.role = members[uid].role
        return info

    # -- IOutbox ----------------------------------------------------------------

    def _nowMs(self):
        return int(self._seconds() * 1000)

    def _groupChanged(self, nowMs, groupId, change, uids=(), name=None):
        if self.outboxEvents and GROUP_CHANGED in self.outboxEvents:
            if nowMs is None:
                nowMs = self._nowMs()
            self._record([groupChanged(groupId, change, uids, name)], nowMs)

    def _record(self, events, nowMs):
        """
        Keep C{events} while there is room; count and report the others.

        @return: how many were kept.
        """
        kept = dropped = 0
        outbox = self._outbox
        for event in events:
            if len(outbox) >= self.outboxLimit:
                dropped += 1
                continue
            self._lastOutboxId = number = self._lastOutboxId + 1
            outbox[number] = OutboxEntry(
                number, eventId(self._storeId, number), event.type, event.key, nowMs, event.data
            )
            self._outboxIds.append(number)
            kept += 1
        if dropped:
            self.outboxDropped += dropped
            self._fullLog.dropped(
                self.log, dropped, self.outboxDropped, self.outboxLimit, self._seconds()
            )
        return kept

    def enqueue(self, events, nowMs):
        events = list(events)
        for event in events:
            if event.presence is None:
                continue
            uid, deviceId, gateId, sessionId = event.presence
            if event.type == USER_ONLINE:
                self._present.setdefault(gateId, {})[(uid, deviceId, sessionId)] = None
            elif event.type == USER_OFFLINE:
                present = self._present.get(gateId)
                if present is not None:
                    present.pop((uid, deviceId, sessionId), None)
                    if not present:
                        del self._present[gateId]
        return succeed(self._record(events, nowMs))

    def pending(self, afterId, limit):
        ids, outbox = self._outboxIds, self._outbox
        entries = []
        i = bisect_right(ids, afterId)
        while i < len(ids) and len(entries) < limit:
            entry = outbox.get(ids[i])
            if entry is not None:
                entries.append(entry)
            i += 1
        return succeed(entries)

    def _forget(self, ids):
        outbox = self._outbox
        removed = 0
        for number in ids:
            if outbox.pop(number, None) is not None:
                removed += 1
        if len(self._outboxIds) > 2 * len(outbox) + 64:
            self._outboxIds = list(outbox)
        return removed

    def remove(self, ids):
        return succeed(self._forget(ids))

    def expire(self, beforeMs):
        return succeed(
            self._forget([n for n, entry in self._outbox.items() if entry.createdMs < beforeMs])
        )

    def outboxStats(self):
        for entry in self._outbox.values():
            return succeed((len(self._outbox), entry.createdMs))
        return succeed((0, None))

    def claimOutbox(self, owner, ttlMs):
        return succeed(True)

    def presentOn(self, gateId):
        return succeed(sorted(self._present.get(gateId, ())))
