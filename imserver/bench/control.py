# -*- test-case-name: tests.test_bench -*-
"""
The channel between the bench's coordinator and its worker processes: one
JSON object per line, commands on the worker's stdin, answers and progress
on its stdout (its stderr is the bench's).

Coordinator to worker::

    {"id": 7, "cmd": "connect", "args": {...}}

Worker to coordinator::

    {"id": 7, "result": {...}}                  the command succeeded
    {"id": 7, "error": "text"}                  it failed
    {"event": "progress", "load": "ping", "t": 12.5, "counts": {...}}

The worker exits when its stdin closes.
"""

import json
import sys

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.protocols.basic import LineOnlyReceiver

from imserver.observe import OneShot


class WorkerError(Exception):
    """
    A worker answered a command with an error, or ended.
    """


class LineBuffer:
    """
    Splits a byte stream into lines.  Unlike L{LineOnlyReceiver} it never
    scans again what it already holds, so a result of several megabytes
    (a worker's latencies) costs one pass.
    """

    def __init__(self):
        self._parts = []

    def feed(self, data):
        """
        @param data: the next L{bytes} of the stream.
        @return: the lines completed by C{data}, without their newlines.
        """
        if b"\n" not in data:
            self._parts.append(data)
            return []
        lines = data.split(b"\n")
        lines[0] = b"".join(self._parts) + lines[0]
        rest = lines.pop()
        self._parts = [rest] if rest else []
        return lines


class WorkerProcess(ProcessProtocol):
    """
    The coordinator's side of one worker process.

    @ivar index: the worker's number.
    @ivar pid: its process id, once started.
    @ivar progress: the latest progress sample, C{(load, seconds, counts)},
        or L{None}.
    @ivar previous: the progress sample before it for the same load, or
        L{None}.
    """

    def __init__(self, index):
        self.index = index
        self.pid = None
        self.progress = None
        self.previous = None
        self.reason = None
        self._pending = {}
        self._nextId = 0
        self._lines = LineBuffer()
        self._ended = OneShot()

    def connectionMade(self):
        self.pid = self.transport.pid

    def call(self, command, **args):
        """
        Send a command.

        @return: a L{Deferred} firing with the worker's result, or failing
            with L{WorkerError}.
        """
        if self.reason is not None:
            return fail(WorkerError("worker {} has ended: {}".format(self.index, self.reason)))
        self._nextId += 1
        d = self._pending[self._nextId] = Deferred()
        message = {"id": self._nextId, "cmd": command, "args": args}
        self.transport.write(json.dumps(message).encode("utf-8") + b"\n")
        return d

    def outReceived(self, data):
        for line in self._lines.feed(data):
            try:
                message = json.loads(line)
            except ValueError:
                sys.stderr.write("im-bench: worker {} wrote {!r}\n".format(self.index, line[:200]))
                continue
            self._received(message)

    def _received(self, message):
        if "id" in message:
            d = self._pending.pop(message["id"], None)
            if d is None:
                return
            if "error" in message:
                d.errback(WorkerError("worker {}: {}".format(self.index, message["error"])))
            else:
                d.callback(message.get("result"))
        elif message.get("event") == "progress":
            sample = (message["load"], message["t"], message["counts"])
            if self.progress is not None and self.progress[0] == sample[0]:
                self.previous = self.progress
            else:
                self.previous = None
            self.progress = sample

    def processEnded(self, reason):
        self.reason = reason.value
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(WorkerError("worker {} ended: {}".format(self.index, self.reason)))
        self._ended.fire(self.reason)

    def finish(self):
        """
        Close the worker's stdin, which makes it close its connections and
        exit.
        """
        if self.reason is None:
            self.transport.closeStdin()

    def whenEnded(self):
        """
        @return: a L{Deferred} firing once the worker has ended.
        """
        return self._ended.when()


class ControlProtocol(LineOnlyReceiver):
    """
    The worker's side of the channel, on its stdio: hands each command to
    the worker and writes back its result or error.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, worker):
        """
        @param worker: has C{handle(command, args)}, returning a result or a
            L{Deferred} of one, and C{shutdown()}, called when stdin closes.
        """
        self.worker = worker

    def lineReceived(self, line):
        message = json.loads(line)
        ident = message["id"]
        d = maybeDeferred(self.worker.handle, message["cmd"], message.get("args", {}))
        d.addCallbacks(
            lambda result: self.send({"id": ident, "result": result}),
            lambda failure: self._failed(ident, message["cmd"], failure),
        )

    def _failed(self, ident, command, failure):
        if not failure.check(WorkerError):
            sys.stderr.write("im-bench worker: {} failed\n".format(command))
            failure.printTraceback(sys.stderr)
        self.send({"id": ident, "error": failure.getErrorMessage()})

    def send(self, message):
        """
        Write one message to the coordinator.
        """
        self.transport.write(json.dumps(message).encode("utf-8") + b"\n")

    def connectionLost(self, reason):
        self.worker.shutdown()
