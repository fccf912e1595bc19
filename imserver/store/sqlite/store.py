# -*- test-case-name: tests.test_store -*-
"""
L{SQLiteMessageStore}: the embedded default message store, every
operation submitted to the writer thread.
"""

from twisted.logger import Logger
from zope.interface import implementer

from imserver.interfaces import IGroupStore, IMessageStore
from imserver.store.sqlite.operations import _Operations
from imserver.store.sqlite.writer import GroupCommitWriter


@implementer(IMessageStore, IGroupStore)
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
    """

    log = Logger()

    def __init__(
        self, path, reactor, dedupWindowMs=24 * 3600 * 1000, threaded=True, commitObserver=None
    ):
        GroupCommitWriter.__init__(
            self, path, reactor, _Operations(dedupWindowMs), threaded, commitObserver
        )

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
