# -*- test-case-name: tests.test_store -*-
"""
The embedded default message store: SQLite in WAL mode, C{synchronous=FULL}.

Every operation runs on one dedicated writer thread.  The thread takes every
operation waiting when it starts a transaction, runs them all in it
(consecutive deliveries share one set of multi-row statements), commits,
and only then hands the results back to the reactor thread in one
C{callFromThread}: group commit.  If an operation fails, the transaction is
rolled back and each operation is run again alone, so it fails alone.  A
C{deliver} is therefore answered only once its transaction is on disk, and
many messages share one fsync.  The
reactor never waits on the database.
"""

import collections
import sqlite3
import threading
import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created_ms);
CREATE TABLE IF NOT EXISTS inbox (
    uid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    outgoing INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (uid, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_created ON inbox (created_ms);
CREATE TABLE IF NOT EXISTS heads (
    uid TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (
    sender TEXT NOT NULL,
    client_msg_id TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    sender_seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, client_msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_created ON dedup (created_ms);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    group_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    group_id TEXT NOT NULL,
    uid TEXT NOT NULL,
    role INTEGER NOT NULL,
    joined_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_uid ON members (uid, group_id);
CREATE TABLE IF NOT EXISTS cursors (
    uid TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (uid, device_id)
) WITHOUT ROWID;
"""

#: Upserts (3.24) and row values (3.15).
MIN_SQLITE = (3, 24, 0)

#: The largest integer SQLite stores (signed 64 bits); seqs never get near.
MAX_SQLITE_INTEGER = 2**63 - 1

#: Most operations committed in one transaction.
MAX_BATCH = 2000

#: Groups whose member lists the writer keeps in memory.
MEMBER_CACHE_SIZE = 4096

#: Exceptions an operation raises before it has written anything.
_REFUSALS = (GroupExists, GroupFull, GroupNotFound)


def dedupLookup(count):
    """
    SQL finding C{count} (sender, client_msg_id) keys in C{dedup}.  A join
    against the keys, because C{(a, b) IN (VALUES ...)} scans the table.
    """
    return (
        "WITH k(s, c) AS (VALUES {}) SELECT d.sender, d.client_msg_id,"
        " d.message_id, d.sender_seq, d.created_ms FROM k JOIN dedup d"
        " ON d.sender = k.s AND d.client_msg_id = k.c".format(",".join(["(?, ?)"] * count))
    )


def _chunks(values, size):
    for start in range(0, len(values), size):
        yield values[start : start + size]


class StoreClosed(Exception):
    """
    The store is stopped; the operation was not run.
    """


def openDatabase(path):
    """
    Open (creating if needed) the database at C{path} with the durable
    settings.

    @rtype: L{sqlite3.Connection}
    """
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise RuntimeError(
            "SQLite {} is too old: imserver needs {} or newer".format(
                sqlite3.sqlite_version, ".".join(map(str, MIN_SQLITE))
            )
        )
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


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

    def loadIds(self, db):
        """
        Read the last message id; ids are then assigned here, by the one
        writer, without a read per message.  The high-water mark is kept in
        C{meta} too, so ids are never reused even after retention removed
        every message.
        """
        row = db.execute("SELECT value FROM meta WHERE key = 'last_message_id'").fetchone()
        stored = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        self.lastId = max(stored, row[0] if row else 0)

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
        return results

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
        return self._info(db, groupId, owner)

    def deleteGroup(self, db, groupId):
        self._groupRow(db, groupId)
        db.execute("DELETE FROM members WHERE group_id = ?", (groupId,))
        db.execute("DELETE FROM groups WHERE group_id = ?", (groupId,))
        self.memberCache.pop(groupId, None)
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
        return added

    def removeMembers(self, db, groupId, uids):
        self._groupRow(db, groupId)
        removed = []
        for uid in dict.fromkeys(uids):
            if db.execute(
                "DELETE FROM members WHERE group_id = ? AND uid = ?", (groupId, uid)
            ).rowcount:
                removed.append(uid)
        self.memberCache.pop(groupId, None)
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


@implementer(IMessageStore, IGroupStore)
class SQLiteMessageStore(Service):
    """
    The durable store.  Start it (as a service) before use; stopping it
    finishes the queued operations, commits and closes the database.

    @param path: the database file.
    @param reactor: for C{callFromThread}; with C{threaded=False} (tests)
        operations run at once in the calling thread and it is unused.
    @param commitObserver: called as C{(size, seconds)} after each
        transaction, from the writer thread
        (L{imserver.metrics.GateMetrics.observeCommit}), or L{None}.
    """

    log = Logger()

    def __init__(
        self, path, reactor, dedupWindowMs=24 * 3600 * 1000, threaded=True, commitObserver=None
    ):
        self.path = path
        self._reactor = reactor
        self._ops = _Operations(dedupWindowMs)
        self._threaded = threaded
        self._queue = collections.deque()
        self._wakeup = threading.Condition()
        self._thread = None
        self._stopped = None
        self._db = None
        self.batches = 0
        self.committed = 0
        self.commitObserver = commitObserver

    # -- IMessageStore ----------------------------------------------------

    def deliver(self, sender, clientMsgId, message, recipients, nowMs):
        return self._submit(
            self._ops.deliver, sender, clientMsgId, message, list(recipients), nowMs
        )

    def fetch(self, uid, afterSeq, limit):
        return self._submit(self._ops.fetch, uid, afterSeq, limit)

    def head(self, uid):
        return self._submit(self._ops.head, uid)

    def ack(self, cursors, nowMs):
        return self._submit(self._ops.ack, list(cursors), nowMs)

    def cursor(self, uid, deviceId):
        return self._submit(self._ops.cursor, uid, deviceId)

    def trim(self, nowMs, maxAgeMs, maxCount):
        return self._submit(self._ops.trim, nowMs, maxAgeMs, maxCount)

    # -- IGroupStore --------------------------------------------------------

    def createGroup(self, groupId, name, owner, nowMs):
        return self._submit(self._ops.createGroup, groupId, name, owner, nowMs)

    def deleteGroup(self, groupId):
        return self._submit(self._ops.deleteGroup, groupId)

    def setMembers(self, groupId, members, maxSize, nowMs):
        return self._submit(self._ops.setMembers, groupId, list(members), maxSize, nowMs)

    def removeMembers(self, groupId, uids):
        return self._submit(self._ops.removeMembers, groupId, list(uids))

    def group(self, groupId):
        return self._submit(self._ops.group, groupId)

    def members(self, groupId):
        return self._submit(self._ops.members, groupId)

    def groupsOf(self, uid):
        return self._submit(self._ops.groupsOf, uid)

    # -- service ------------------------------------------------------------

    def startService(self):
        # Opened here, once, before anything is served: a store that cannot
        # open stops the server from starting instead of failing every
        # request.  From then on only the writer thread touches it.
        db = openDatabase(self.path)
        self._ops.loadIds(db)
        Service.startService(self)
        if self._threaded:
            self._thread = threading.Thread(
                target=self._run, args=(db,), name="imserver-sqlite-writer", daemon=True
            )
            self._stopped = Deferred()
            self._thread.start()
        else:
            self._db = db

    def stopService(self):
        Service.stopService(self)
        if not self._threaded:
            if self._db is not None:
                self._db.close()
                self._db = None
            return succeed(None)
        with self._wakeup:
            self._queue.append(None)
            self._wakeup.notify()
        return self._stopped

    # -- internals ------------------------------------------------------------

    def _submit(self, function, *args):
        if not self.running:
            return fail(StoreClosed("the message store is not running"))
        if not self._threaded:
            [(_, result)] = self._runBatch(self._db, [(function, args, None)])
            return fail(result) if isinstance(result, Failure) else succeed(result)
        d = Deferred()
        queue = self._queue
        with self._wakeup:
            queue.append((function, args, d))
            if len(queue) == 1:
                # The writer waits only on an empty queue: wake it then.
                self._wakeup.notify()
        return d

    def _run(self, db):
        queue = self._queue
        stopping = False
        while not stopping:
            with self._wakeup:
                while not queue:
                    self._wakeup.wait()
                batch = []
                while queue and len(batch) < MAX_BATCH:
                    item = queue.popleft()
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            if batch:
                results = self._runBatch(db, batch)
                self._reactor.callFromThread(self._fire, results)
        db.close()
        self._reactor.callFromThread(self._stopped.callback, None)

    def _runBatch(self, db, batch):
        """
        Run C{batch} in one transaction.  If an operation raises, the
        transaction is rolled back and every operation is run again in a
        transaction of its own, so one failure fails alone.

        @return: C{[(deferred, result or Failure)]}, in batch order.
        """
        started = time.perf_counter()
        results = self._runTransaction(db, batch)
        self.batches += 1
        self.committed += len(batch)
        if self.commitObserver is not None:
            self.commitObserver(len(batch), time.perf_counter() - started)
        return results

    def _runTransaction(self, db, batch):
        lastId = self._ops.lastId
        deliver = self._ops.deliver
        try:
            db.execute("BEGIN IMMEDIATE")
            results = []
            i = 0
            while i < len(batch):
                function, args, d = batch[i]
                if function != deliver:
                    try:
                        result = function(db, *args)
                    except _REFUSALS:
                        # Refused before writing anything: fails alone,
                        # without rolling back the rest of the batch.
                        result = Failure()
                    results.append((d, result))
                    i += 1
                    continue
                # Consecutive deliveries: one set of statements for all.
                j = i
                while j < len(batch) and batch[j][0] == deliver:
                    j += 1
                deliveries = self._ops.deliverMany(db, [item[1] for item in batch[i:j]])
                results.extend(zip([item[2] for item in batch[i:j]], deliveries))
                i = j
            db.execute("COMMIT")
            return results
        except Exception:
            failure = Failure()
            self._rollback(db)
            self._ops.lastId = lastId
            self._ops.memberCache.clear()
            if len(batch) == 1:
                return [(batch[0][2], failure)]
        return [self._runTransaction(db, [item])[0] for item in batch]

    def _rollback(self, db):
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _fire(self, results):
        for d, result in results:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
