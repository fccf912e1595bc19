# -*- test-case-name: tests.test_store -*-
"""
An in-memory message store: the reference semantics, for tests and
benchmarks.  Nothing survives a restart.
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from imserver.errors import NotMember
from imserver.interfaces import IGroupStore, IMessageStore
from imserver.pb import im_pb2 as pb
from imserver.store import (
    SYSTEM,
    Delivery,
    GroupExists,
    GroupFull,
    GroupNotFound,
    uniqueRecipients,
)


@implementer(IMessageStore, IGroupStore)
class MemoryMessageStore:
    """
    Inboxes as lists, in process memory.
    """

    def __init__(self, dedupWindowMs=24 * 3600 * 1000):
        self.dedupWindowMs = dedupWindowMs
        self._lastId = 0
        self._messages = {}  # id -> pb.Message
        self._inbox = {}  # uid -> list of (seq, message id, outgoing)
        self._heads = {}  # uid -> last seq
        self._dedup = {}  # (sender, client_msg_id) -> (id, sender seq, ms)
        self._cursors = {}  # (uid, device) -> (seq, ms)
        self._groups = {}  # group id -> pb.Group (role unset)
        self._members = {}  # group id -> {uid: pb.Member}

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
        return succeed(self._info(groupId, owner))

    def deleteGroup(self, groupId):
        if self._groups.pop(groupId, None) is None:
            return fail(GroupNotFound(groupId))
        del self._members[groupId]
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
        return succeed(added)

    def removeMembers(self, groupId, uids):
        current = self._members.get(groupId)
        if current is None:
            return fail(GroupNotFound(groupId))
        removed = [uid for uid in dict.fromkeys(uids) if current.pop(uid, None) is not None]
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
