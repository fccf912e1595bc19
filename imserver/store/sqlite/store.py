# -*- test-case-name: tests.test_store -*-
"""
L{SQLiteMessageStore}: the embedded default message store, every
operation submitted to the writer thread.
"""

from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.python import runtime
from zope.interface import implementer

from imserver.interfaces import IGroupStore, IMessageStore, IOutbox
from imserver.store import OutboxFullLog
from imserver.store.sqlite.operations import _Operations
from imserver.store.sqlite.schema import WAL_AUTOCHECKPOINT
from imserver.store.sqlite.writer import GroupCommitWriter


@implementer(IMessageStore, IGroupStore, IOutbox)
class SQLiteMessageStore(GroupCommitWriter):
    """
    The durable store.  Start it (as a service) before use; stopping it
    finishes the queued operations, commits and closes the database.

    @param path: the database file.
    @param reactor: for C{callFromThread}; with C{threaded=False} (tests)
        operations run at once in the calling thread and it is unused.
    @param commitObserver: called as C{(size, seconds)} after each
        transaction, from the writer thread
        (L{imserver.metrics.GateMetrics.observeCommit}), or L{None}.
    @param commitDelay: the least seconds between two commits while
        operations keep coming (L{GroupCommitWriter}).
    @param walAutocheckpoint: WAL pages after which a commit checkpoints
        (L{openDatabase}).
    @param process: run the writer in a process of its own
        (L{GroupCommitWriter}, C{--store-writer process}).
    @param clock: an C{IReactorTime}: the time of the outbox events of
        operations given none (C{deleteGroup}, C{removeMembers}) and of
        the full-outbox warnings; C{reactor} if L{None}, or the system
        clock if that is L{None} too.

    @ivar outboxDropped: events not kept because the outbox was full, as
        of the last commit (written by the writer thread).
    """

    log = Logger()

    def __init__(
        self,
        path,
        reactor,
        dedupWindowMs=24 * 3600 * 1000,
        threaded=True,
        commitObserver=None,
        clock=None,
        commitDelay=0.0,
        walAutocheckpoint=WAL_AUTOCHECKPOINT,
        process=False,
    ):
        GroupCommitWriter.__init__(
            self,
            path,
            reactor,
            _Operations(dedupWindowMs),
            threaded,
            commitObserver,
            commitDelay,
            walAutocheckpoint,
            process,
        )
        if clock is None:
            clock = reactor
        self._seconds = clock.seconds if clock is not None else runtime.seconds
        self._fullLog = OutboxFullLog()
        self._droppedReported = 0

    def _nowMs(self):
        return int(self._seconds() * 1000)

    # The outbox's settings are the writer's (_Operations) to read.

    @property
    def outboxEvents(self):
        return self._ops.outboxEvents

    @outboxEvents.setter
    def outboxEvents(self, value):
        self._ops.outboxEvents = frozenset(value)
        self._configured()

    @property
    def outboxLimit(self):
        return self._ops.outboxLimit

    @outboxLimit.setter
    def outboxLimit(self, value):
        self._ops.outboxLimit = value
        self._configured()

    def _batchFired(self):
        dropped = self.outboxDropped
        if dropped > self._droppedReported:
            self._fullLog.dropped(
                self.log,
                dropped - self._droppedReported,
                dropped,
                self._ops.outboxLimit,
                self._seconds(),
            )
            self._droppedReported = dropped

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
        return self._submit(self._ops.deleteGroup, groupId, self._nowMs())

    def setMembers(self, groupId, members, maxSize, nowMs):
        return self._submit(self._ops.setMembers, groupId, list(members), maxSize, nowMs)

    def removeMembers(self, groupId, uids):
        return self._submit(self._ops.removeMembers, groupId, list(uids), self._nowMs())

    def group(self, groupId):
        return self._submit(self._ops.group, groupId)

    def members(self, groupId):
        return self._submit(self._ops.members, groupId)

    def groupsOf(self, uid):
        return self._submit(self._ops.groupsOf, uid)

    # -- IOutbox --------------------------------------------------------------

    def enqueue(self, events, nowMs):
        return self._submit(self._ops.enqueue, list(events), nowMs)

    def pending(self, afterId, limit):
        return self._submit(self._ops.pending, afterId, limit)

    def remove(self, ids):
        return self._submit(self._ops.remove, list(ids))

    def expire(self, beforeMs):
        return self._submit(self._ops.expire, beforeMs)

    def outboxStats(self):
        return self._submit(self._ops.outboxStats)

    def claimOutbox(self, owner, ttlMs):
        # One gate uses the database: it always holds the outbox.
        return succeed(True)

    def presentOn(self, gateId):
        return self._submit(self._ops.presentOn, gateId)
