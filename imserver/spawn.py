# -*- test-case-name: tests.test_bench -*-
"""
Running C{twistd im} (or another server that logs where it listens) as a
child process: its command line and environment, and a L{ProcessProtocol}
that keeps the end of its output and tells when it listens and when it has
ended.

Used by C{im-bench} (L{imserver.bench}), which starts its own gate and echo
server, and by the tests that run the gate as an operator does.
"""

import collections
import os
import re
import shutil
import sys

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

#: Bytes of output a L{TwistdProcess} keeps: the end of it.
OUTPUT_TAIL = 64 * 1024
#: Bytes of the output seen before a chunk that a pattern is searched in
#: together with the chunk, so a log line split across two reads still
#: matches.  Longer than any line waited for.
_OVERLAP = 4096


def _address(host):
    """
    C{host} as the gate logs it in an address (IPv6 in brackets), as a
    regular expression.
    """
    text = "[{}]".format(host) if ":" in host else host
    return re.escape(text.encode("ascii"))


def listeningPattern(host="127.0.0.1"):
    """
    The log line of a listener on C{host}, C{listening on HOST:PORT}, as the
    gate (and the bench's echo server) write it.

    @return: a compiled L{bytes} pattern whose group 1 is the port.
    """
    return re.compile(b"listening on " + _address(host) + rb":(\d+)\b")


def apiPattern(host="127.0.0.1"):
    """
    The gate's log line for its HTTP API listener on C{host}, C{HTTP API at
    http://HOST:PORT/} (or C{https}).

    @return: a compiled L{bytes} pattern whose group 1 is the port.
    """
    return re.compile(rb"HTTP API at https?://" + _address(host) + rb":(\d+)/")


def webPattern(host="127.0.0.1"):
    """
    The gate's log line for its web listener (C{--web}) on C{host},
    C{WebSocket at ws://HOST:PORT/ws} (or C{wss}).

    @return: a compiled L{bytes} pattern whose group 1 is the port.
    """
    return re.compile(rb"WebSocket at wss?://" + _address(host) + rb":(\d+)/ws\b")


def childEnvironment():
    """
    The environment for a child Python process: ours, with C{$PYTHONPATH}
    set to our C{sys.path} so the child finds imserver (and its twistd
    plugin) wherever it runs.

    @return: a new L{dict}.
    """
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def tasksetPrefix(cpu):
    """
    The command prefix pinning a process to C{cpu}.

    @param cpu: a CPU, or a C{taskset} CPU list (C{"0"}, C{"2-3"}); L{None}
        or C{""} for none.
    @return: C{[taskset, "-c", cpu]}, or C{[]} if there is nothing to pin
        or no C{taskset}.
    """
    if cpu in (None, ""):
        return []
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu)] if taskset else []


def twistdArgv(imArgs, cpu=None):
    """
    The command line of C{twistd --nodaemon im} run with this Python.

    @param imArgs: the arguments of the C{im} subcommand.
    @param cpu: see L{tasksetPrefix}.
    @return: the argument L{list}, the executable first.
    """
    return (
        tasksetPrefix(cpu)
        + [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "im",
        ]
        + list(imArgs)
    )


class NotListening(RuntimeError):
    """
    The process ended before it logged a line waited for (by default its
    listener).

    @ivar reason: the exception the process ended with (L{ProcessDone} or
        L{ProcessTerminated}).
    @ivar output: the end of its output, decoded.
    """

    def __init__(self, reason, output, what="listening"):
        RuntimeError.__init__(
            self, "the process ended before {} ({}):\n{}".format(what, reason, output)
        )
        self.reason = reason
        self.output = output


class TwistdProcess(ProcessProtocol):
    """
    One run of C{twistd im}, or of another server logging C{listening on
    HOST:PORT}: keeps the end of its output, tells when it listens and
    when it has ended.

    It keeps only the last L{OUTPUT_TAIL} bytes of its output (the gate logs
    every connection, for as long as it runs), and searches each chunk once
    for the lines waited for, so its cost stays linear in the output.

    @ivar pid: its process id, once started.
    @ivar port: the port of the listener it logged, or L{None}.
    @ivar reason: the exception it ended with (L{ProcessDone} or
        L{ProcessTerminated}), or L{None} while it runs.
    @ivar listening: a L{Deferred} firing with L{port}, or failing with
        L{NotListening} if the process ends first.
    @ivar errors: the end of what it wrote to stderr alone (at most C{keep}
        bytes), which is also part of L{output}.
    @ivar ended: a L{Deferred} firing with L{reason} once it has ended.
        Cancel (or time out) L{whenEnded} rather than this.
    """

    def __init__(self, listening=None, keep=OUTPUT_TAIL):
        """
        @param listening: the pattern of the listener's log line, group 1
            the port: by default L{listeningPattern} for C{127.0.0.1}.  A
            L{str} is taken as the host for L{listeningPattern}.
        @param keep: how many bytes of output to keep.
        """
        if listening is None or isinstance(listening, str):
            listening = listeningPattern(listening or "127.0.0.1")
        self.pid = None
        self.port = None
        self.reason = None
        self.ended = Deferred()
        self._keep = keep
        self._chunks = collections.deque()
        self._kept = 0
        self._seen = b""
        self._waiters = []
        self.errors = b""
        self.listening = self.waitFor(listening, "listening")
        self.listening.addCallback(self._listened)

    def _listened(self, port):
        self.port = port
        return port

    @property
    def output(self):
        """
        The end of what it wrote to stdout and stderr so far: at most
        C{keep} bytes (L{OUTPUT_TAIL} by default).
        """
        if len(self._chunks) > 1:
            joined = b"".join(self._chunks)
            self._chunks = collections.deque([joined])
        return self._chunks[0][-self._keep :] if self._chunks else b""

    def text(self):
        """
        The end of the output, decoded.
        """
        return self.output.decode("utf-8", "replace")

    def waitFor(self, pattern, what=None):
        """
        Wait for a line of output.  Call it before the line can have been
        written (right after spawning, before the reactor runs again): the
        output already kept is searched too, but only its end is kept.

        @param pattern: a compiled L{bytes} pattern; group 1 is taken as a
            port number.
        @param what: names it in the failure, by default the pattern.
        @return: a L{Deferred} firing with the port of the first match, or
            failing with L{NotListening} if the process ends first.
        """
        if what is None:
            what = pattern.pattern.decode("ascii", "replace")
        d = Deferred()
        output = self.output
        match = pattern.search(output)
        if match is not None:
            d.callback(int(match.group(1)))
        elif self.reason is not None:
            d.errback(NotListening(self.reason, self.text(), what))
        else:
            self._seen = output[-_OVERLAP:]
            self._waiters.append((pattern, d, what))
        return d

    def connectionMade(self):
        """
        Remember the process id.
        """
        self.pid = self.transport.pid

    def outReceived(self, data):
        """
        Keep the end of stdout (where twistd -n logs); fire the waiters
        whose line has come.
        """
        self._chunks.append(data)
        self._kept += len(data)
        while self._kept - len(self._chunks[0]) >= self._keep:
            self._kept -= len(self._chunks.popleft())
        if self._waiters:
            window = self._seen + data
            self._seen = window[-_OVERLAP:]
            waiting, self._waiters = self._waiters, []
            for pattern, d, what in waiting:
                match = pattern.search(window)
                if match is None:
                    self._waiters.append((pattern, d, what))
                else:
                    d.callback(int(match.group(1)))

    def errReceived(self, data):
        """
        Keep the end of stderr apart (L{errors}), and as output.
        """
        self.errors = (self.errors + data)[-self._keep :]
        self.outReceived(data)

    def whenEnded(self):
        """
        @return: a new L{Deferred} firing with L{reason} once the process
            has ended, which the caller may cancel without affecting
            L{ended}.
        """
        copy = Deferred()

        def forward(result):
            copy.callback(self.reason)
            return result

        self.ended.addBoth(forward)
        return copy

    def processEnded(self, reason):
        """
        Fail every waiter (L{listening} included) still waiting, and fire
        L{ended}.
        """
        self.reason = reason.value
        waiting, self._waiters = self._waiters, []
        for _pattern, d, what in waiting:
            d.errback(NotListening(self.reason, self.text(), what))
        self.ended.callback(self.reason)


def spawnTwistd(reactor, imArgs, cpu=None, path=None, env=None, listening=None):
    """
    Start C{twistd --nodaemon im} with this Python.

    @param imArgs: the arguments of the C{im} subcommand.
    @param cpu: see L{tasksetPrefix}.
    @param path: the working directory, or L{None} for ours.
    @param env: the environment, by default L{childEnvironment}.
    @param listening: the listener to wait for, see L{TwistdProcess}.
    @return: the L{TwistdProcess}, its C{transport} set.
    """
    return spawnServer(reactor, twistdArgv(imArgs, cpu), path, env, listening)


def spawnServer(reactor, argv, path=None, env=None, listening=None):
    """
    Start a server process that logs its listener as C{twistd im} does.

    @param argv: its command line, the executable first.
    @return: the L{TwistdProcess}, its C{transport} set.
    """
    process = TwistdProcess(listening)
    if env is None:
        env = childEnvironment()
    process.transport = reactor.spawnProcess(process, argv[0], argv, env=env, path=path)
    return process
