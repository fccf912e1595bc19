# -*- test-case-name: tests.test_bench -*-
"""
Running C{twistd im} as a child process: its command line and environment,
and a L{ProcessProtocol} that collects its output and tells when it listens
and when it has ended.

Used by C{im-bench} (L{imserver.bench}), which starts its own gate, and by
the tests that run the gate as an operator does.
"""

import os
import re
import shutil
import sys

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def childEnvironment():
    """
    The environment for a child Python process: ours, with C{$PYTHONPATH}
    set to our C{sys.path} so the child finds imserver (and its twistd
    plugin) wherever it runs.

    @return: a new L{dict}.
    """
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def twistdArgv(imArgs, cpu=None):
    """
    The command line of C{twistd --nodaemon im} run with this Python.

    @param imArgs: the arguments of the C{im} subcommand.
    @param cpu: the CPU (or C{taskset} CPU list) to pin the process to with
        C{taskset -c}; not pinned if L{None} or C{""}, or if there is no
        C{taskset}.
    @return: the argument L{list}, the executable first.
    """
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", "im"] + list(imArgs)
    if cpu not in (None, ""):
        taskset = shutil.which("taskset")
        if taskset:
            argv = [taskset, "-c", str(cpu)] + argv
    return argv


class NotListening(RuntimeError):
    """
    C{twistd im} ended before it logged a C{127.0.0.1} listener.

    @ivar reason: the exception the process ended with (L{ProcessDone} or
        L{ProcessTerminated}).
    @ivar output: its output, decoded.
    """

    def __init__(self, reason, output):
        RuntimeError.__init__(self, "twistd ended before listening ({}):\n{}".format(
            reason, output))
        self.reason = reason
        self.output = output


class TwistdProcess(ProcessProtocol):
    """
    One run of C{twistd im}: collects its output and tells when it listens
    and when it has ended.

    @ivar output: everything it wrote to stdout and stderr so far.
    @ivar pid: its process id, once started.
    @ivar port: the port of the first C{127.0.0.1} listener it logged, or
        L{None}.
    @ivar reason: the exception it ended with (L{ProcessDone} or
        L{ProcessTerminated}), or L{None} while it runs.
    @ivar listening: a L{Deferred} firing with L{port}, or failing with
        L{NotListening} if the process ends first.
    @ivar ended: a L{Deferred} firing with L{reason} once it has ended.
        Cancel (or time out) L{whenEnded} rather than this.
    """

    def __init__(self):
        self.output = b""
        self.pid = None
        self.port = None
        self.reason = None
        self.listening = Deferred()
        self.ended = Deferred()

    def connectionMade(self):
        """
        Remember the process id.
        """
        self.pid = self.transport.pid

    def outReceived(self, data):
        """
        Collect stdout (where twistd -n logs); fire L{listening} at the
        first listener logged.
        """
        self.output += data
        if self.port is None:
            match = _LISTENING.search(self.output)
            if match is not None:
                self.port = int(match.group(1))
                if not self.listening.called:
                    self.listening.callback(self.port)

    errReceived = outReceived

    def text(self):
        """
        The output, decoded.
        """
        return self.output.decode("utf-8", "replace")

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
        Fail L{listening} if it has not fired, and fire L{ended}.
        """
        self.reason = reason.value
        if not self.listening.called:
            self.listening.errback(NotListening(self.reason, self.text()))
        self.ended.callback(self.reason)


def spawnTwistd(reactor, imArgs, cpu=None, path=None, env=None):
    """
    Start C{twistd --nodaemon im} with this Python.

    @param imArgs: the arguments of the C{im} subcommand.
    @param cpu: see L{twistdArgv}.
    @param path: the working directory, or L{None} for ours.
    @param env: the environment, by default L{childEnvironment}.
    @return: the L{TwistdProcess}, its C{transport} set.
    """
    process = TwistdProcess()
    argv = twistdArgv(imArgs, cpu)
    if env is None:
        env = childEnvironment()
    process.transport = reactor.spawnProcess(process, argv[0], argv, env=env, path=path)
    return process
