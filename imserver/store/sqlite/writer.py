# -*- test-case-name: tests.test_store -*-
"""
The SQLite store's writer thread and its group commit: L{GroupCommitWriter}.

Every operation runs on one dedicated writer thread.  The thread takes every
operation waiting when it starts a transaction, runs them all in it
(consecutive deliveries share one set of multi-row statements), commits,
and only then hands the results back to the reactor thread in one
C{callFromThread}: group commit.  If an operation fails, the transaction is
rolled back and each operation is run again alone, so it fails alone.  A
C{deliver} is therefore answered only once its transaction is on disk, and
many messages share one fsync.  The
reactor never waits on the database.

Under steady arrivals a writer that starts a transaction as soon as one
operation waits commits nearly every message alone, and each commit costs
the gate's core far more than a message does (a wake-up of the writer, one
of the reactor, the statements' preparation).  So within C{commitDelay}
seconds of the end of its previous commit the writer waits for that
moment before it takes the queue: commits are at least C{commitDelay}
apart, and operations arriving meanwhile share one.  An operation arriving
after a quiet spell (more than C{commitDelay} since the last commit) is
taken at once, so a lone message pays no wait.
"""

import collections
import sqlite3
import sys
import threading
import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.store import GroupExists, GroupFull, GroupNotFound
from imserver.store.sqlite.schema import WAL_AUTOCHECKPOINT, openDatabase

#: Most operations committed in one transaction.
MAX_BATCH = 2000

#: Exceptions an operation raises before it has written anything.
_REFUSALS = (GroupExists, GroupFull, GroupNotFound)


class StoreClosed(Exception):
    """
    The store is stopped; the operation was not run.
    """


class GroupCommitWriter(Service):
    """
    A service running operations (methods of an L{_Operations}, given the
    connection first) on one writer thread, many to a transaction.  Start
    it before use; stopping it finishes the queued operations, commits and
    closes the database.

    @param path: the database file.
    @param reactor: for C{callFromThread}; with C{threaded=False} (tests)
        operations run at once in the calling thread and it is unused.
    @param ops: the L{imserver.store.sqlite.operations._Operations}.
    @param commitObserver: called as C{(size, seconds)} after each
        transaction, from the writer thread
        (L{imserver.metrics.GateMetrics.observeCommit}), or L{None}.
    @param commitDelay: the least seconds between the end of a commit and
        the start of the next transaction while operations keep coming (the
        C{store_commit_delay} setting; 0: none).
    @param process: run the writer in a process of its own, the saver
        (L{imserver.store.sqlite.saver}; C{--store-writer process}), rather
        than in a thread of this one; C{reactor} must then spawn processes.
    """

    log = Logger()
    _saver = None

    def __init__(
        self,
        path,
        reactor,
        ops,
        threaded=True,
        commitObserver=None,
        commitDelay=0.0,
        walAutocheckpoint=WAL_AUTOCHECKPOINT,
        process=False,
    ):
        self.path = path
        self.process = process
        self._reactor = reactor
        self._ops = ops
        self._threaded = threaded
        self._queue = collections.deque()
        self._wakeup = threading.Condition()
        self._thread = None
        self._stopped = None
        self._db = None
        self.batches = 0
        self.committed = 0
        # Events the outbox did not keep, as of the last commit: written by
        # the writer thread only.
        self.outboxDropped = ops.outboxDropped
        self.commitObserver = commitObserver
        self.commitDelay = commitDelay
        self.walAutocheckpoint = walAutocheckpoint
        # The writer thread's clock for commitDelay (tests replace it).
        self.monotonic = time.monotonic

    # -- service ------------------------------------------------------------

    def startService(self):
        # Opened here, once, before anything is served: a store that cannot
        # open stops the server from starting instead of failing every
        # request.  From then on only the writer thread touches it.
        db = openDatabase(self.path, self.walAutocheckpoint)
        try:
            self._ops.loadIds(db)
        except BaseException:
            db.close()
            raise
        if self.process:
            # Opened (and checked) here; the saver opens it again.
            db.close()
            Service.startService(self)
            self._spawnSaver()
            return
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
        if self._saver is not None:
            saver, self._saver = self._saver, None
            saver.finish()
            return saver.ended
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

    # -- the saver ------------------------------------------------------------

    def _spawnSaver(self):
        from imserver.spawn import childEnvironment
        from imserver.store.sqlite.saver import SaverProcess

        saver = self._saver = SaverProcess(self)
        argv = [
            sys.executable,
            "-m",
            "imserver.store.sqlite.saver",
            self.path,
            str(self._ops.dedupWindowMs),
            repr(self.commitDelay),
            str(self.walAutocheckpoint),
        ]
        self._reactor.spawnProcess(
            saver, sys.executable, argv, env=childEnvironment(), childFDs={0: "w", 1: "r", 2: 2}
        )
        saver.configure(self._ops.outboxEvents, self._ops.outboxLimit)

    def _saverEnded(self, saver, reason):
        """
        The saver process C{saver} ended: if it was not stopped, start a new
        one (what it held was failed, its clients retry).
        """
        if saver is self._saver and self.running:
            self.log.error(
                "the SQLite saver process ended unexpectedly ({why}); starting another",
                why=reason.getErrorMessage(),
            )
            self._spawnSaver()

    def _configured(self):
        """
        The outbox's settings changed: tell the saver, if there is one.
        """
        if self._saver is not None:
            self._saver.configure(self._ops.outboxEvents, self._ops.outboxLimit)

    def _submit(self, function, *args):
        if not self.running:
            return fail(StoreClosed("the message store is not running"))
        if self._saver is not None:
            return self._saver.submit(function.__name__, args)
        if not self._threaded:
            [(_, result)] = self._runBatch(self._db, [(function, args, None)])
            self._batchFired()
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
        delay = self.commitDelay
        clock = self.monotonic
        lastCommit = clock() - delay
        while not stopping:
            with self._wakeup:
                while not queue:
                    self._wakeup.wait()
                if delay > 0:
                    # Just committed: let the next operations join this one
                    # (submitters do not notify a non-empty queue: the wait
                    # runs to its end, or to a stop).
                    remaining = lastCommit + delay - clock()
                    while remaining > 0 and queue[-1] is not None and len(queue) < MAX_BATCH:
                        self._wakeup.wait(remaining)
                        remaining = lastCommit + delay - clock()
                batch = []
                while queue and len(batch) < MAX_BATCH:
                    item = queue.popleft()
                    if item is None:
                        stopping = True
                        break
                    batch.append(item)
            if batch:
                results = self._runBatch(db, batch)
                lastCommit = clock()
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
        # Committed: publish the count (read on the reactor thread).
        self.outboxDropped = self._ops.outboxDropped
        self.batches += 1
        self.committed += len(batch)
        if self.commitObserver is not None:
            self.commitObserver(len(batch), time.perf_counter() - started)
        return results

    def _runTransaction(self, db, batch):
        state = self._ops.checkpoint()
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
            self._ops.restore(state)
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
        self._batchFired()

    def _batchFired(self):
        """
        Called on the reactor thread after a transaction's results were
        handed back.
        """
