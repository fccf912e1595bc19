# -*- test-case-name: tests.test_bench -*-
"""
A client worker process, C{python -m imserver.bench worker}: it runs
the loads the coordinator sends it (L{imserver.bench.control}) and reports
their counters every half second.
"""

import sys

from twisted.internet.defer import Deferred, succeed
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall

from imserver.bench import runReactor
from imserver.bench.control import ControlProtocol, WorkerError

#: Seconds between two progress reports.
PROGRESS_INTERVAL = 0.5


class Worker:
    """
    Runs one load at a time: the command C{load} creates it (its arguments
    are the load's spec, plus its C{name}); every other command C{X} calls
    its C{on_X}.

    @ivar done: a L{Deferred} firing once the worker has shut down.
    """

    def __init__(self, reactor, loads, err=sys.stderr):
        """
        @param loads: C{{name: Load subclass}}.
        """
        self.reactor = reactor
        self.loads = loads
        self.err = err
        self.control = None
        self.load = None
        self.loadName = None
        self.done = Deferred()
        self._progress = LoopingCall(self._report)
        self._progress.clock = reactor

    def handle(self, command, args):
        """
        Run one command.

        @return: its result, or a L{Deferred} of it.
        @raise WorkerError: for an unknown command or load.
        """
        if command == "load":
            return self._newLoad(**args)
        handler = getattr(self.load, "on_" + command, None)
        if handler is None:
            raise WorkerError("unknown command {!r}".format(command))
        return handler(**args)

    def _newLoad(self, name, **spec):
        if name not in self.loads:
            raise WorkerError("unknown load {!r}".format(name))
        self.load = self.loads[name](self.reactor, spec, self.err)
        self.loadName = name
        if not self._progress.running:
            self._progress.start(PROGRESS_INTERVAL, now=False)

    def _report(self):
        self.control.send(
            {
                "event": "progress",
                "load": self.loadName,
                "t": self.reactor.seconds(),
                "counts": self.load.counts,
            }
        )

    def shutdown(self):
        """
        The coordinator has gone: close the load's connections, then fire
        L{done}.
        """
        if self._progress.running:
            self._progress.stop()
        if self.load is not None and not self.load.closing:
            d = self.load.on_close()
        else:
            d = succeed(None)
        d.addBoth(lambda _: self.done.callback(None))


def runWorker(reactor, loads):
    """
    Be a worker on this process's stdio until stdin closes.

    @return: L{Worker.done}.
    """
    worker = Worker(reactor, loads)
    worker.control = ControlProtocol(worker)
    StandardIO(worker.control, reactor=reactor)
    return worker.done


def main(argv):
    """
    The C{worker} subcommand: warnings and errors go to stderr.

    @return: the exit status.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from imserver.bench.scenarios import LOADS

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)]
            )
        ]
    )
    return runReactor(runWorker, LOADS)
