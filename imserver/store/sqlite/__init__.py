# -*- test-case-name: tests.test_store -*-
"""
The embedded default message store: SQLite in WAL mode, C{synchronous=FULL}.

  - L{store}: L{SQLiteMessageStore}, the L{imserver.interfaces.IMessageStore}
    and L{imserver.interfaces.IGroupStore} methods, each submitted to the
    writer.
  - L{writer}: L{GroupCommitWriter}, the one writer thread and its group
    commit: many operations to a transaction, each answered only once its
    transaction is on disk; the reactor never waits on the database.
  - L{operations}: what each operation does in SQL, on the writer thread.
  - L{schema}: the tables, and L{openDatabase}.

The design is in docs/architecture.md, "The message store".
"""

from imserver.store.sqlite.operations import MEMBER_CACHE_SIZE, _Operations
from imserver.store.sqlite.schema import (
    ADDED_TABLES,
    MAX_SQLITE_INTEGER,
    MIN_SQLITE,
    SCHEMA,
    dedupLookup,
    openDatabase,
)
from imserver.store.sqlite.store import SQLiteMessageStore
from imserver.store.sqlite.writer import MAX_BATCH, GroupCommitWriter, StoreClosed

__all__ = [
    "SQLiteMessageStore",
    "StoreClosed",
    "GroupCommitWriter",
    "MAX_BATCH",
    "MEMBER_CACHE_SIZE",
    "_Operations",
    "SCHEMA",
    "ADDED_TABLES",
    "MIN_SQLITE",
    "MAX_SQLITE_INTEGER",
    "dedupLookup",
    "openDatabase",
]
