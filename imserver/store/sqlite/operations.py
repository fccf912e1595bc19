# -*- test-case-name: tests.test_store -*-
"""
What each operation of the SQLite store does in SQL: L{_Operations}, run
on the writer thread (L{imserver.store.sqlite.writer}) inside a
transaction.
"""

import os

from twisted.python.failure import Failure

from imserver.errors import NotMember
from imserver.pb import im_pb2 as pb
from imserver.store import (
    OUTBOX_LIMIT,
    SYSTEM,
    Delivery,
    GroupExists,
    GroupFull,
    GroupNotFound,
    uniqueRecipients,
)
from imserver.store.sqlite.schema import MAX_SQLITE_INTEGER, dedupLookup
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

#: Groups whose member lists the writer keeps in memory.
MEMBER_CACHE_SIZE = 4096


def _chunks(values, size):
    for start in range(0, len(values), size):
        yield values[start : start + size]


class _Operations:
    """
    The store's operations, each run on the writer thread inside a
    transaction, given the connection first.
    """

    def __init__(self, dedupWindowMs):
        self.dedupWindowMs = dedupWindowMs
        self.lastId = None
        # group id -> member uids.  Only this writer changes memberships, so
        # the cache is exact; it is emptied when a transaction rolls back.
        self.memberCache = {}
        # The outbox.  outboxEvents and outboxLimit are set on the reactor
        # thread (the store's attributes) and read here; the rest is this
        # thread's: the entries in the table, the last entry id given, the
        # events not kept.
        self.outboxEvents = frozenset()
        self.outboxLimit = OUTBOX_LIMIT
        self.outboxCount = 0
        self.outboxDropped = 0
        self.lastOutboxId = 0
        self.storeId = None

    def loadIds(self, db):
        """
        Read the last message id; ids are then assigned here, by the one
        writer, without a read per message.  The high-water mark is kept in
        C{meta} too, so ids are never reused even after retention removed
        every message.  The same for outbox entry ids (the high-water mark
        is written when entries are deleted), and the outbox's size and the
        store id, made the first time.
        """
        row = db.execute("SELECT value FROM meta WHERE key = 'last_message_id'").fetchone()
        stored = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        self.lastId = max(stored, row[0] if row else 0)
        row = db.execute("SELECT value FROM meta WHERE key = 'last_outbox_id'").fetchone()
        count, highest = db.execute("SELECT count(*), coalesce(max(id), 0) FROM outbox").fetchone()
        self.outboxCount = count
        self.lastOutboxId = max(highest, row[0] if row else 0)
        # The store id: a random 63-bit integer, shown in hex.
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('store_id', ?) ON CONFLICT (key) DO NOTHING",
            (int.from_bytes(os.urandom(8), "big") >> 1,),
        )
        row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        self.storeId = "%016x" % (row[0],)

    def checkpoint(self):
        """
        @return: what a rolled back transaction must restore (L{restore}).
        """
        return (self.lastId, self.lastOutboxId, self.outboxCount, self.outboxDropped)

    def restore(self, state):
        """
        After a rollback: forget what the transaction did to the counters
        and the member cache.
        """
        self.lastId, self.lastOutboxId, self.outboxCount, self.outboxDropped = state
        self.memberCache.clear()

    def deliver(self, db, sender, clientMsgId, message, recipients, nowMs):
        return self.deliverMany(db, [(sender, clientMsgId, message, recipients, nowMs)])[0]

    def deliverMany(self, db, items):
        """
        Deliver many messages with a few statements for all of them: one
        dedup lookup, one lookup of the inbox heads, then one multi-row
        insert per table.  Same outcome as delivering them one by one in
        order.

        @param items: C{(sender, clientMsgId, message, recipients, nowMs)}
            tuples.
        @return: a L{Delivery} per item, in order.
        """
        recipientLists = [self._recipients(db, item[0], item[2], item[3]) for item in items]
        keys = list({(item[0], item[1]) for item in items})
        seen = {}
        for chunk in _chunks(keys, 400):
            rows = db.execute(dedupLookup(len(chunk)), [v for key in chunk for v in key]).fetchall()
            for sender, clientMsgId, messageId, senderSeq, createdMs in rows:
                seen[(sender, clientMsgId)] = (messageId, senderSeq, createdMs)
        uids = list({uid for uids in recipientLists if uids is not None for uid in uids})
        heads = {}
        for chunk in _chunks(uids, 800):
            heads.update(
                db.execute(
                    "SELECT uid, seq FROM heads WHERE uid IN ({})".format(
                        ",".join("?" * len(chunk))
                    ),
                    chunk,
                ).fetchall()
            )
        messageRows, inboxRows, dedupRows, results = [], [], [], []
        stored = {}
        for (sender, clientMsgId, message, _, nowMs), recipients in zip(items, recipientLists):
            key = (sender, clientMsgId)
            previous = seen.get(key)
            if previous is not None and previous[2] > nowMs - self.dedupWindowMs:
                results.append(self._duplicate(db, sender, previous, stored))
                continue
            if recipients is None:
                results.append(
                    Failure(NotMember("not a member of group {!r}".format(message.group_id)))
                )
                continue
            copy = pb.Message()
            copy.CopyFrom(message)
            copy.id = self.lastId = self.lastId + 1
            copy.sender = sender
            copy.client_msg_id = clientMsgId
            copy.created_ms = nowMs
            stored[copy.id] = copy
            messageRows.append((copy.id, nowMs, copy.SerializeToString()))
            seqs = {}
            for uid in recipients:
                seq = heads[uid] = heads.get(uid, 0) + 1
                inboxRows.append((uid, seq, copy.id, uid == sender, nowMs))
                seqs[uid] = seq
            senderSeq = seqs.get(sender, 0)
            seen[key] = (copy.id, senderSeq, nowMs)
            dedupRows.append((sender, clientMsgId, copy.id, senderSeq, nowMs))
            results.append(Delivery(copy, seqs, False))
        if messageRows:
            db.executemany(
                "INSERT INTO messages (id, created_ms, data) VALUES (?, ?, ?)", messageRows
            )
            db.executemany(
                "INSERT INTO inbox (uid, seq, message_id, outgoing, created_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                inboxRows,
            )
            db.executemany(
                "INSERT OR REPLACE INTO dedup (sender, client_msg_id, message_id,"
                " sender_seq, created_ms) VALUES (?, ?, ?, ?, ?)",
                dedupRows,
            )
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_message_id', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (self.lastId,),
            )
            touched = {row[0] for row in inboxRows}
            db.executemany(
                "INSERT INTO heads (uid, seq) VALUES (?, ?)"
                " ON CONFLICT (uid) DO UPDATE SET seq = excluded.seq",
                [(uid, heads[uid]) for uid in touched],
            )
            if self.outboxEvents and MESSAGE_STORED in self.outboxEvents:
                self._record(
                    db,
                    [
                        (result.message.created_ms, messageStored(result.message, result.seqs))
                        for result in results
                        if isinstance(result, Delivery) and not result.duplicate
                    ],
                )
        return results

    # -- the outbox -----------------------------------------------------------

    def _record(self, db, events):
        """
        Insert C{events}, C{(createdMs, OutboxEvent)} pairs, while there is
        room; count the others.

        @return: how many were kept.
        """
        room = max(0, self.outboxLimit - self.outboxCount)
        if len(events) > room:
            self.outboxDropped += len(events) - room
            events = events[:room]
        if not events:
            return 0
        first = self.lastOutboxId + 1
        db.executemany(
            "INSERT INTO outbox (id, created_ms, type, key, data) VALUES (?, ?, ?, ?, ?)",
            [
                (first + i, createdMs, event.type, event.key, event.data)
                for i, (createdMs, event) in enumerate(events)
            ],
        )
        self.lastOutboxId += len(events)
        self.outboxCount += len(events)
        return len(events)

    def _groupChanged(self, db, nowMs, groupId, change, uids=(), name=None):
        if self.outboxEvents and GROUP_CHANGED in self.outboxEvents:
            self._record(db, [(nowMs, groupChanged(groupId, change, uids, name))])

    def enqueue(self, db, events, nowMs):
        for event in events:
            if event.presence is None:
                continue
            uid, deviceId, gateId, sessionId = event.presence
            if event.type == USER_ONLINE:
                db.execute(
                    "INSERT INTO presence (gate_id, uid, device_id, session_id)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (gateId, uid, deviceId, sessionId),
                )
            elif event.type == USER_OFFLINE:
                db.execute(
                    "DELETE FROM presence WHERE gate_id = ? AND uid = ? AND device_id = ?"
                    " AND session_id = ?",
                    (gateId, uid, deviceId, sessionId),
                )
        return self._record(db, [(nowMs, event) for event in events])

    def pending(self, db, afterId, limit):
        rows = db.execute(
            "SELECT id, type, key, created_ms, data FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (min(afterId, MAX_SQLITE_INTEGER), limit),
        ).fetchall()
        storeId = self.storeId
        return [
            OutboxEntry(number, eventId(storeId, number), kind, key, createdMs, bytes(data))
            for number, kind, key, createdMs, data in rows
        ]

    def _deleted(self, db, count):
        """
        C{count} entries were deleted: keep the id high-water mark, which
        the table may no longer hold.
        """
        if count:
            self.outboxCount -= count
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('last_outbox_id', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (self.lastOutboxId,),
            )
        return count

    def remove(self, db, ids):
        removed = 0
        for chunk in _chunks(ids, 800):
            removed += db.execute(
                "DELETE FROM outbox WHERE id IN ({})".format(",".join("?" * len(chunk))), chunk
            ).rowcount
        return self._deleted(db, removed)

    def expire(self, db, beforeMs):
        removed = db.execute("DELETE FROM outbox WHERE created_ms < ?", (beforeMs,)).rowcount
        return self._deleted(db, removed)

    def outboxStats(self, db):
        row = db.execute("SELECT created_ms FROM outbox ORDER BY id LIMIT 1").fetchone()
        return (self.outboxCount, None if row is None else row[0])

    def presentOn(self, db, gateId):
        return [
            tuple(row)
            for row in db.execute(
                "SELECT uid, device_id, session_id FROM presence WHERE gate_id = ?"
                " ORDER BY uid, device_id, session_id",
                (gateId,),
            )
        ]

    # -- deliveries (helpers) ---------------------------------------------------

    def _recipients(self, db, sender, message, recipients):
        """
        The inboxes a message lands in: for a group message its members
        now, or L{None} if the sender is not one of them.
        """
        groupId = message.group_id
        if not groupId:
            return uniqueRecipients(sender, recipients)
        members = self.memberCache.get(groupId)
        if members is None:
            members = dict.fromkeys(
                row[0]
                for row in db.execute("SELECT uid FROM members WHERE group_id = ?", (groupId,))
            )
            if len(self.memberCache) >= MEMBER_CACHE_SIZE:
                self.memberCache.clear()
            self.memberCache[groupId] = members
        if not members or (sender != SYSTEM and sender not in members):
            return None
        return list(members)

    def _duplicate(self, db, sender, previous, stored):
        messageId, senderSeq, createdMs = previous
        original = stored.get(messageId)
        if original is None:
            row = db.execute("SELECT data FROM messages WHERE id = ?", (messageId,)).fetchone()
            original = (
                pb.Message.FromString(row[0])
                if row is not None
                else pb.Message(id=messageId, created_ms=createdMs)
            )
        return Delivery(original, {sender: senderSeq}, True)

    def fetch(self, db, uid, afterSeq, limit):
        if afterSeq > MAX_SQLITE_INTEGER:
            return []  # beyond any seq (a client may ask for anything uint64)
        rows = db.execute(
            "SELECT i.seq, i.outgoing, m.data FROM inbox i"
            " JOIN messages m ON m.id = i.message_id"
            " WHERE i.uid = ? AND i.seq > ? ORDER BY i.seq LIMIT ?",
            (uid, afterSeq, limit),
        ).fetchall()
        return [
            pb.InboxEntry(seq=seq, outgoing=bool(outgoing), message=pb.Message.FromString(data))
            for seq, outgoing, data in rows
        ]

    def head(self, db, uid):
        row = db.execute("SELECT seq FROM heads WHERE uid = ?", (uid,)).fetchone()
        return 0 if row is None else row[0]

    def ack(self, db, cursors, nowMs):
        rows = [(uid, deviceId, seq, nowMs) for uid, deviceId, seq in cursors]
        db.executemany(
            "INSERT INTO cursors (uid, device_id, seq, updated_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (uid, device_id) DO UPDATE SET"
            " seq = max(seq, excluded.seq), updated_ms = excluded.updated_ms",
            rows,
        )
        return len(rows)

    def cursor(self, db, uid, deviceId):
        row = db.execute(
            "SELECT seq FROM cursors WHERE uid = ? AND device_id = ?", (uid, deviceId)
        ).fetchone()
        return 0 if row is None else row[0]

    def trim(self, db, nowMs, maxAgeMs, maxCount):
        oldest = nowMs - maxAgeMs
        removed = db.execute("DELETE FROM inbox WHERE created_ms < ?", (oldest,)).rowcount
        crowded = db.execute(
            "SELECT uid, count(*) FROM inbox GROUP BY uid HAVING count(*) > ?", (maxCount,)
        ).fetchall()
        for uid, _ in crowded:
            head = self.head(db, uid)
            acked = db.execute(
                "SELECT coalesce(min(seq), 0) FROM cursors WHERE uid = ?", (uid,)
            ).fetchone()[0]
            cutoff = min(acked, head - maxCount)
            removed += db.execute(
                "DELETE FROM inbox WHERE uid = ? AND seq <= ?", (uid, cutoff)
            ).rowcount
        db.execute("DELETE FROM messages WHERE created_ms < ?", (oldest,))
        db.execute("DELETE FROM dedup WHERE created_ms <= ?", (nowMs - self.dedupWindowMs,))
        db.execute("DELETE FROM cursors WHERE updated_ms < ?", (oldest,))
        return removed

    # -- groups -------------------------------------------------------------

    def _groupRow(self, db, groupId):
        row = db.execute(
            "SELECT name, created_ms FROM groups WHERE group_id = ?", (groupId,)
        ).fetchone()
        if row is None:
            raise GroupNotFound(groupId)
        return row

    def _info(self, db, groupId, uid):
        name, createdMs = self._groupRow(db, groupId)
        count = db.execute(
            "SELECT count(*) FROM members WHERE group_id = ?", (groupId,)
        ).fetchone()[0]
        info = pb.Group(group_id=groupId, name=name, created_ms=createdMs, member_count=count)
        if uid is not None:
            info.role = db.execute(
                "SELECT role FROM members WHERE group_id = ? AND uid = ?", (groupId, uid)
            ).fetchone()[0]
        return info

    def createGroup(self, db, groupId, name, owner, nowMs):
        if db.execute("SELECT 1 FROM groups WHERE group_id = ?", (groupId,)).fetchone():
            raise GroupExists(groupId)
        db.execute(
            "INSERT INTO groups (group_id, name, created_ms) VALUES (?, ?, ?)",
            (groupId, name, nowMs),
        )
        db.execute(
            "INSERT INTO members (group_id, uid, role, joined_ms) VALUES (?, ?, ?, ?)",
            (groupId, owner, pb.ROLE_OWNER, nowMs),
        )
        self.memberCache.pop(groupId, None)
        self._groupChanged(db, nowMs, groupId, GROUP_CREATED, [owner], name)
        return self._info(db, groupId, owner)

    def deleteGroup(self, db, groupId, nowMs=0):
        self._groupRow(db, groupId)
        db.execute("DELETE FROM members WHERE group_id = ?", (groupId,))
        db.execute("DELETE FROM groups WHERE group_id = ?", (groupId,))
        self.memberCache.pop(groupId, None)
        self._groupChanged(db, nowMs, groupId, GROUP_DELETED)
        return True

    def setMembers(self, db, groupId, members, maxSize, nowMs):
        self._groupRow(db, groupId)
        roles = dict(members)
        current = {
            row[0] for row in db.execute("SELECT uid FROM members WHERE group_id = ?", (groupId,))
        }
        added = [uid for uid in roles if uid not in current]
        if added and len(current) + len(added) > maxSize:
            raise GroupFull(groupId)
        db.executemany(
            "INSERT INTO members (group_id, uid, role, joined_ms) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (group_id, uid) DO UPDATE SET role = excluded.role",
            [(groupId, uid, role, nowMs) for uid, role in roles.items()],
        )
        self.memberCache.pop(groupId, None)
        if added:
            self._groupChanged(db, nowMs, groupId, MEMBERS_ADDED, added)
        return added

    def removeMembers(self, db, groupId, uids, nowMs=0):
        self._groupRow(db, groupId)
        removed = []
        for uid in dict.fromkeys(uids):
            if db.execute(
                "DELETE FROM members WHERE group_id = ? AND uid = ?", (groupId, uid)
            ).rowcount:
                removed.append(uid)
        self.memberCache.pop(groupId, None)
        if removed:
            self._groupChanged(db, nowMs, groupId, MEMBERS_REMOVED, removed)
        return removed

    def group(self, db, groupId):
        try:
            return self._info(db, groupId, None)
        except GroupNotFound:
            return None

    def members(self, db, groupId):
        self._groupRow(db, groupId)
        return [
            pb.Member(uid=uid, role=role, joined_ms=joinedMs)
            for uid, role, joinedMs in db.execute(
                "SELECT uid, role, joined_ms FROM members WHERE group_id = ? ORDER BY uid",
                (groupId,),
            )
        ]

    def groupsOf(self, db, uid):
        rows = db.execute(
            "SELECT g.group_id, g.name, g.created_ms, m.role,"
            " (SELECT count(*) FROM members c WHERE c.group_id = g.group_id)"
            " FROM members m JOIN groups g ON g.group_id = m.group_id"
            " WHERE m.uid = ? ORDER BY g.group_id",
            (uid,),
        ).fetchall()
        return [
            pb.Group(
                group_id=groupId, name=name, created_ms=createdMs, role=role, member_count=count
            )
            for groupId, name, createdMs, role, count in rows
        ]
