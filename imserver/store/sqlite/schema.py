# -*- test-case-name: tests.test_store -*-
"""
The SQLite store's schema, and opening a database with it.
"""

import sqlite3

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
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_ms);
CREATE TABLE IF NOT EXISTS presence (
    gate_id TEXT NOT NULL,
    uid TEXT NOT NULL,
    device_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    PRIMARY KEY (gate_id, uid, device_id, session_id)
) WITHOUT ROWID;
"""

#: The tables added after the first release, by C{CREATE ... IF NOT EXISTS}
#: when an older database is opened: the webhook outbox and the presence
#: ledger (L{imserver.interfaces.IOutbox}).
ADDED_TABLES = ("outbox", "presence")

#: Upserts (3.24) and row values (3.15).
MIN_SQLITE = (3, 24, 0)

#: The largest integer SQLite stores (signed 64 bits); seqs never get near.
MAX_SQLITE_INTEGER = 2**63 - 1


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


#: WAL pages after which a commit checkpoints (copies the WAL into the
#: database file): the C{store_wal_autocheckpoint} setting's default.
WAL_AUTOCHECKPOINT = 10000

#: Milliseconds a statement waits for another connection's lock.
BUSY_TIMEOUT_MS = 10000


def openDatabase(path, walAutocheckpoint=WAL_AUTOCHECKPOINT):
    """
    Open (creating if needed) the database at C{path} with the durable
    settings.

    @param walAutocheckpoint: the commit after which the WAL holds this many
        pages checkpoints it (SQLite's C{wal_autocheckpoint}; its own
        default is 1000, which at thousands of messages per second
        checkpoints every tenth of a second).

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
    db.execute("PRAGMA wal_autocheckpoint={:d}".format(walAutocheckpoint))
    # Wait for another connection's lock rather than fail at once: the
    # saver of a gate that was killed may still be finishing (closing the
    # database checkpoints it) when the next gate opens it.
    db.execute("PRAGMA busy_timeout={:d}".format(BUSY_TIMEOUT_MS))
    db.executescript(SCHEMA)
    return db
