# -*- test-case-name: tests.test_store -*-
"""
The SQLite writer in a process of its own (C{--store-writer process}): the
"saver".

The writer thread (L{GroupCommitWriter}) shares the gate's core with the
reactor, and at saturation takes about 40 % of it (statements, WAL fsyncs,
checkpoints; docs/performance.md, "WAL checkpoints").  A thread on another
core does not help (the two hand the GIL back and forth); a process does.
The saver is that process: C{python -m imserver.store.sqlite.saver}, a
child of the gate, running the very same L{GroupCommitWriter} (its thread,
group commit, commit delay and fallback) over the gate's database, and
answering the gate's operations over its stdin and stdout.

The wire between them: frames of a 4-byte big-endian length and a pickle
(the two are one program, trusted, and the pipe is private).  The gate
writes C{("op", id, name, args)} and C{("configure", outboxEvents,
outboxLimit)}; the saver writes C{("result", id, ok, value)} (the
operation's result, or its exception), and per transaction C{("commit",
size, seconds, outboxDropped)} before its results and C{("fired",)} after
them.

Durability is the writer's: a result is written only once its transaction
is committed, so the gate answers a C{send} only after the commit, as
with the thread.  If the gate dies, the saver reads the end of its stdin,
finishes what it holds (committed or not, nothing of it was answered) and
exits; if the saver dies, the gate fails what was outstanding (the sends
are answered C{UNAVAILABLE} and retried by their clients with the same
C{client_msg_id}) and starts a new saver.
"""

import copyreg
import fcntl
import pickle
import signal
import struct
import sys

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

_length = struct.Struct("!I")

#: The saver's lock file: the database's path and this.
LOCK_SUFFIX = ".saver-lock"


def _registerMessages():
    """
    Have the protobuf messages pickle as their serialization (the
    generated classes do not pickle by reference: their module calls
    itself C{im_pb2}).
    """
    from imserver.pb import im_pb2

    for name in im_pb2.DESCRIPTOR.message_types_by_name:
        cls = getattr(im_pb2, name)
        copyreg.pickle(cls, _reduceMessage)


def _reduceMessage(message):
    return _message, (type(message).__name__, message.SerializeToString())


def _message(name, data):
    from imserver.pb import im_pb2

    return getattr(im_pb2, name).FromString(data)


_registerMessages()


def frame(value):
    """
    @return: C{value} as one frame: a length and a pickle.
    """
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return _length.pack(len(data)) + data


class FrameReader:
    """
    Cut a byte stream into the values of its frames.
    """

    def __init__(self):
        self._buffer = b""

    def feed(self, data):
        """
        @return: the values of the frames completed by C{data}.
        """
        buffer = self._buffer + data
        values = []
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _length.unpack_from(buffer, offset)
            end = offset + 4 + length
            if len(buffer) < end:
                break
            values.append(pickle.loads(buffer[offset + 4 : end]))
            offset = end
        self._buffer = buffer[offset:]
        return values


def _picklable(error):
    """
    C{error}, or a L{RuntimeError} saying what it was if it does not
    pickle.
    """
    try:
        pickle.dumps(error, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return RuntimeError("{}: {}".format(type(error).__name__, error))
    return error


class SaverProcess(ProcessProtocol):
    """
    The gate's side of the saver: sends the operations of its
    L{GroupCommitWriter} to the child and fires their L{Deferred}s with
    what comes back.

    @ivar ended: fired when the child process has ended.
    """

    log = Logger()
    _broken = False

    def __init__(self, writer):
        """
        @param writer: the L{GroupCommitWriter} (in process mode) it serves:
            told the commits (C{commitObserver}, C{outboxDropped}) and each
            transaction's end (C{_batchFired}), and asked to start a new
            saver if this one dies while it runs.
        """
        self.writer = writer
        self.ended = Deferred()
        self._reader = FrameReader()
        self._pending = {}
        self._next = 0

    def _write(self, value):
        # spawnProcess connects this protocol before it returns: the
        # transport is there from the first operation on.
        self.transport.write(frame(value))

    def submit(self, name, args):
        """
        Run the operation C{name} of the saver's L{_Operations} with C{args}.

        @return: a L{Deferred} firing with its result.
        """
        self._next += 1
        d = self._pending[self._next] = Deferred()
        self._write(("op", self._next, name, args))
        return d

    def configure(self, outboxEvents, outboxLimit):
        """
        Tell the saver the outbox's settings.
        """
        self._write(("configure", frozenset(outboxEvents), outboxLimit))

    def finish(self):
        """
        Close the saver's stdin: it finishes what it holds and exits.
        """
        if self.transport is not None:
            self.transport.closeStdin()

    def childDataReceived(self, childFD, data):
        if self._broken:
            return
        writer = self.writer
        try:
            messages = self._reader.feed(data)
        except Exception:
            # Never expected; what follows cannot be trusted either: end
            # this saver (what it held fails, retryably) and have another.
            self._broken = True
            self.log.failure("the SQLite saver sent what does not decode")
            self.transport.signalProcess("KILL")
            return
        for message in messages:
            kind = message[0]
            if kind == "result":
                _, ident, ok, value = message
                d = self._pending.pop(ident)
                if ok:
                    d.callback(value)
                else:
                    d.errback(Failure(value))
            elif kind == "commit":
                _, size, seconds, dropped = message
                writer.outboxDropped = dropped
                writer.batches += 1
                writer.committed += size
                if writer.commitObserver is not None:
                    writer.commitObserver(size, seconds)
            elif kind == "fired":
                writer._batchFired()

    def processEnded(self, reason):
        from imserver.errors import Unavailable

        pending, self._pending = self._pending, {}
        if pending:
            self.log.error(
                "the SQLite saver ended with {count} operations outstanding: {why}",
                count=len(pending),
                why=reason.getErrorMessage(),
            )
        # The next saver first, so that what the failures below make retry
        # goes to it.
        self.writer._saverEnded(self, reason)
        for d in pending.values():
            # Committed or not, nobody knows: what a client must retry.
            d.errback(Unavailable("message storage is unavailable; retry later"))
        self.ended.callback(None)


@implementer(IHalfCloseableProtocol)
class _Child(Protocol):
    """
    The saver's side: operations from stdin to its L{GroupCommitWriter},
    results to stdout.  The end of stdin (the gate stops, or died) stops
    the writer, which answers everything it holds first; then stdout is
    closed and the process ends.
    """

    _stopping = None

    def __init__(self, reactor, writer):
        self.reactor = reactor
        self.writer = writer
        self._reader = FrameReader()

    def send(self, value):
        self.transport.write(frame(value))

    def dataReceived(self, data):
        writer = self.writer
        ops = writer._ops
        for message in self._reader.feed(data):
            kind = message[0]
            if kind == "op":
                _, ident, name, args = message
                writer._submit(getattr(ops, name), *args).addCallbacks(
                    self._done, self._failed, (ident,), None, (ident,)
                )
            elif kind == "configure":
                _, ops.outboxEvents, ops.outboxLimit = message

    def _done(self, value, ident):
        self.send(("result", ident, True, value))

    def _failed(self, failure, ident):
        self.send(("result", ident, False, _picklable(failure.value)))

    def _stopWriter(self):
        if self._stopping is None:
            self._stopping = self.writer.stopService()
        return self._stopping

    def readConnectionLost(self):
        # The gate closed our stdin: answer what is left, then close.
        self._stopWriter().addBoth(self._close)

    def _close(self, _):
        if self._writeLost:
            self._stop(None)
        else:
            # Written out first; connectionLost follows.
            self.transport.loseConnection()

    _writeLost = False

    def writeConnectionLost(self):
        # Nobody reads our answers any more (the gate is gone): finish the
        # transaction in hand and end.
        self._writeLost = True
        self._stopWriter().addBoth(self._stop)

    def connectionLost(self, reason):
        # Our stdout is closed too (or the gate is gone): once the writer
        # has finished (committed or rolled back), end.
        self._stopWriter().addBoth(self._stop)

    _ended = False

    def _stop(self, _):
        if not self._ended:
            self._ended = True
            self.reactor.stop()


def main(argv=None):
    """
    The saver: C{python -m imserver.store.sqlite.saver PATH DEDUP_WINDOW_MS
    COMMIT_DELAY WAL_AUTOCHECKPOINT}.
    """
    from twisted.internet import reactor, stdio

    from imserver.store.sqlite.operations import _Operations
    from imserver.store.sqlite.writer import GroupCommitWriter

    path, dedupWindowMs, commitDelay, walAutocheckpoint = (argv or sys.argv[1:])[:4]
    # One saver per database at a time: the saver of a gate that died may
    # still be finishing its last transaction (it exits when it reads the
    # end of its stdin); a new one waits for it here, before it reads the
    # database's ids.  The lock goes with the process, however it ends.
    lock = open(path + LOCK_SUFFIX, "a")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    protocol = None

    def observe(size, seconds):
        # From the writer thread, after the commit and before the results.
        reactor.callFromThread(protocol.send, ("commit", size, seconds, writer.outboxDropped))

    class Writer(GroupCommitWriter):
        def _batchFired(self):
            protocol.send(("fired",))

    writer = Writer(
        path,
        reactor,
        _Operations(int(dedupWindowMs)),
        True,
        observe,
        float(commitDelay),
        int(walAutocheckpoint),
    )
    protocol = _Child(reactor, writer)
    writer.startService()
    stdio.StandardIO(protocol, reactor=reactor)
    # The gate decides when the saver ends (it closes our stdin): a signal
    # to the whole process group (Ctrl-C, a supervisor stopping the gate)
    # must not end it before the gate's last operations are committed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    # Run as the module proper, not as __main__, so that what it pickles
    # (the messages' reducer) names the module the gate imports.
    from imserver.store.sqlite import saver

    sys.exit(saver.main())
