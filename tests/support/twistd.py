# -*- test-case-name: tests.test_crash,tests.test_cluster_processes -*-
"""
Real C{twistd im} gates for tests, as an operator runs them: a L{Gate} is
one gate process in its data directory, on one loopback port across
restarts (started, stopped, killed with C{kill -9}); L{clusterGate} makes
one in cluster mode, L{RotatingEndpoint} connects to several in turn, and
L{loggedTracebacks} finds the errors in their output.
"""

import time

from twisted.internet import reactor
from twisted.internet.defer import TimeoutError, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imserver.auth import createSecretFile, loadSecret
from imserver.spawn import NotListening, apiPattern, spawnTwistd

from tests.support import freePort, serverEnvironment
from tests.support.live import withDeadline

#: Heartbeat interval and idle timeout given to the gates, in seconds: a
#: dead connection is noticed within a few seconds.
HEARTBEAT_INTERVAL = 2
IDLE_TIMEOUT = 6
#: Seconds a gate gets to start listening, and to exit on SIGTERM.
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0
#: Attempts at starting a gate when its port is taken meanwhile.
START_ATTEMPTS = 5
#: Tracebacks a gate in cluster mode may log that are known and harmless,
#: so not counted as errors (none now: a publish that finds Redis gone is
#: a warning without a traceback).
TOLERATED = ()


class Gate:
    """
    A C{twistd im} gate in one data directory, on one loopback TCP port
    across restarts.

    @ivar port: the port, chosen at the first L{start}.
    @ivar apiPort: the port of its HTTP API (on 127.0.0.1, a new one at
        every start), or L{None} if it has none.
    @ivar runs: a L{imserver.spawn.TwistdProcess} per start, the last one
        current.
    @ivar kills: how often it was killed with SIGKILL.
    """

    def __init__(self, dataDir, args, secretFile=None, api=False, listenOptions=""):
        """
        @param args: the C{im} options beyond the data directory, the
            listener and the API (the store, C{--redis}, timeouts, ...).
        @param secretFile: the L{FilePath} of the secret the gate is given
            with C{--secret-file} (in C{args}), or L{None} for the data
            directory's.
        @param api: whether to run the HTTP API (on a free loopback port).
        @param listenOptions: appended to the C{tcp:} listener's
            description (C{":reusePort=yes"}).
        """
        self.dataDir = dataDir
        self.args = list(args)
        self.secretFile = secretFile
        self.api = api
        self.listenOptions = listenOptions
        self.env = serverEnvironment()
        self.port = None
        self.apiPort = None
        self.runs = []
        self.kills = 0
        self._transport = None
        self._apiListening = None

    @inlineCallbacks
    def start(self):
        """
        Start the gate and wait until it listens (and its API, if it has
        one).  The first start picks a free port (another one if it is taken
        before the gate binds it); later starts reuse it.

        @return: a L{Deferred} firing with the port.
        """
        for attempt in range(START_ATTEMPTS):
            port = self.port if self.port is not None else freePort()
            process = self._spawn(port)
            try:
                listening = yield withDeadline(
                    process.listening, START_DEADLINE, "the gate listening"
                )
            except NotListening as e:
                portTaken = "Address already in use" in e.output
                if not portTaken or attempt == START_ATTEMPTS - 1:
                    raise
                continue
            self.port = listening
            if self._apiListening is not None:
                self.apiPort = yield withDeadline(
                    self._apiListening, START_DEADLINE, "the HTTP API listening"
                )
            return listening

    def _spawn(self, port):
        process = spawnTwistd(
            reactor,
            [
                "--data-dir",
                self.dataDir.path,
                "--listen",
                "tcp:{}:interface=127.0.0.1{}".format(port, self.listenOptions),
                "--api",
                "tcp:0:interface=127.0.0.1" if self.api else "none",
            ]
            + self.args,
            path=self.dataDir.path,
            env=self.env,
        )
        self._transport = process.transport
        if self.api:
            self._apiListening = process.waitFor(apiPattern(), "the HTTP API listening")
        self.runs.append(process)
        return process

    def secret(self):
        """
        The token-signing secret: the C{--secret-file}'s, or the one the
        gate generated in its data directory at its first start.
        """
        return loadSecret(self.dataDir, self.secretFile, environ=self.env, create=False)

    def _signal(self, name):
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    @inlineCallbacks
    def kill(self):
        """
        C{kill -9} the gate and wait for it to end.
        """
        self.kills += 1
        self._signal("KILL")
        yield withDeadline(self.runs[-1].whenEnded(), STOP_DEADLINE, "the killed gate ending")

    @inlineCallbacks
    def crash(self):
        """
        C{kill -9} the gate, wait for it to end, start it again.

        @return: a L{Deferred} firing with the seconds it was down.
        """
        started = time.monotonic()
        yield self.kill()
        yield self.start()
        return time.monotonic() - started

    @inlineCallbacks
    def stop(self):
        """
        Stop the gate if it runs: SIGTERM, then SIGKILL if it has not ended
        within L{STOP_DEADLINE}.
        """
        if not self.runs or self.runs[-1].reason is not None:
            return
        run = self.runs[-1]
        self._signal("TERM")
        try:
            yield withDeadline(run.whenEnded(), STOP_DEADLINE, "the gate exiting on SIGTERM")
        except TimeoutError:
            self._signal("KILL")
            yield run.whenEnded()

    def output(self):
        """
        The output of every run, decoded, separated by a header line.
        """
        return "".join(
            "--- run {} ---\n{}".format(i + 1, run.text()) for i, run in enumerate(self.runs)
        )


def clusterGate(dataDir, redisURL, gateId, secretFile, api=False, args=(), listenOptions=""):
    """
    A L{Gate} in cluster mode: C{--redis redisURL}, its own C{--gate-id} and
    data directory, the cluster's shared C{--secret-file}.
    """
    return Gate(
        dataDir,
        [
            "--redis",
            redisURL,
            "--gate-id",
            gateId,
            "--secret-file",
            secretFile.path,
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL),
            "--idle-timeout",
            str(IDLE_TIMEOUT),
        ]
        + list(args),
        secretFile=secretFile,
        api=api,
        listenOptions=listenOptions,
    )


def newSecretFile(testCase):
    """
    A new secret file for the gates of a cluster (each gate is given it
    with C{--secret-file}).

    @rtype: L{FilePath}
    """
    secretFile = FilePath(testCase.mktemp())
    createSecretFile(secretFile)
    return secretFile


@implementer(IStreamClientEndpoint)
class RotatingEndpoint:
    """
    Connects to several gates in turn: each connection attempt goes to the
    next gate of the list, so a client whose gate died (or whose socket was
    dropped) comes back on another one, as a client going down the
    dispatcher's list does.
    """

    def __init__(self, gates, first=0, timeout=5):
        """
        @param gates: L{Gate}s; their C{port} is read at each attempt.
        @param first: the index of the gate tried first.
        """
        self.gates = gates
        self.attempts = first
        self.timeout = timeout

    def connect(self, factory):
        gate = self.gates[self.attempts % len(self.gates)]
        self.attempts += 1
        return TCP4ClientEndpoint(reactor, "127.0.0.1", gate.port, timeout=self.timeout).connect(
            factory
        )


def loggedTracebacks(output, context=15):
    """
    The lines around each C{Traceback} in C{output}.
    """
    lines = output.splitlines()
    return [
        "\n".join(lines[max(0, i - 2) : i + context])
        for i, line in enumerate(lines)
        if "Traceback" in line
    ]
