# -*- test-case-name: tests.test_redisclient,tests.test_registry,tests.test_store -*-
"""
Redis for tests: a real C{redis-server} (L{RedisServer}), started on a free
loopback port in a temporary directory, stopped (or killed, or restarted)
by the test, always gone after it; missing C{redis-server} skips the test
locally and fails it in CI (L{tests.support.requireExecutable}).  And
waiting for a L{imserver.redisclient.RedisConnection} to come up or go
down, on its own C{onConnect} and C{onDisconnect} events.
"""

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.filepath import FilePath

from tests.support import freePort, requireExecutable

#: Seconds a redis-server may take to say it is ready.
START_TIMEOUT = 10.0


class _RedisProcess(ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ready = Deferred()
        self.ended = Deferred()

    def outReceived(self, data):
        self.output.append(data)
        if not self.ready.called and b"Ready to accept connections" in b"".join(self.output):
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(
                    "redis-server ended before it was ready:\n"
                    + b"".join(self.output).decode("utf-8", "replace")
                )
            )
        self.ended.callback(None)


class RedisServer:
    """
    One C{redis-server} process under a test.

    @ivar port: its port on 127.0.0.1.
    @ivar url: C{redis://127.0.0.1:port/0}.
    @ivar directory: its working directory (AOF and RDB files).
    """

    def __init__(self, testCase, reactor, appendfsync="always", extraArgs=()):
        """
        @param appendfsync: C{always}, C{everysec}, or L{None} for no AOF.
        """
        self.executable = requireExecutable(
            "redis-server", "redis-server (Debian package redis-server)"
        )
        self.testCase = testCase
        self.reactor = reactor
        self.appendfsync = appendfsync
        self.extraArgs = list(extraArgs)
        self.directory = FilePath(testCase.mktemp())
        self.directory.makedirs()
        self.port = None
        self._process = None
        self._transport = None
        testCase.addCleanup(self.kill)

    @property
    def url(self):
        return "redis://127.0.0.1:{}/0".format(self.port)

    def _argv(self, port):
        argv = [
            self.executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory.path,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--loglevel",
            "notice",
        ]
        if self.appendfsync:
            argv += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        return argv + self.extraArgs

    @inlineCallbacks
    def start(self, attempts=5):
        """
        Start it (again, on the same port and data, if it ran before).

        @return: a L{Deferred} firing once it accepts connections.
        """
        for attempt in range(attempts):
            port = self.port or freePort()
            process = _RedisProcess()
            transport = self.reactor.spawnProcess(
                process,
                self.executable,
                self._argv(port),
                env={},
                path=self.directory.path,
            )
            timer = self.reactor.callLater(START_TIMEOUT, transport.signalProcess, "KILL")
            try:
                yield process.ready
            except RuntimeError:
                if timer.active():
                    timer.cancel()
                if self.port is not None or attempt == attempts - 1:
                    raise
                continue  # the port was taken meanwhile: another one
            timer.cancel()
            self.port, self._process, self._transport = port, process, transport
            return self

    def _signal(self, name):
        if self._process is None or self._process.ended.called:
            return None
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass
        process, self._process = self._process, None
        return process.ended

    @inlineCallbacks
    def stop(self):
        """
        Stop it cleanly (SIGTERM: with an AOF, everything written is kept).
        """
        yield self._signal("TERM")

    @inlineCallbacks
    def kill(self):
        """
        Kill it (SIGKILL).
        """
        yield self._signal("KILL")

    @inlineCallbacks
    def wipe(self):
        """
        Kill it and delete its data: it comes back empty on L{start}.
        """
        yield self.kill()
        for child in self.directory.children():
            child.remove()


def _when(already, callbacks):
    """
    @param already: whether the awaited state holds now.
    @param callbacks: the list of callables called when it comes about.
    @return: a L{Deferred} firing at once if C{already}, else the next time
        C{callbacks} are called.
    """
    d = Deferred()
    if already:
        d.callback(None)
        return d

    def once():
        callbacks.remove(once)
        d.callback(None)

    callbacks.append(once)
    return d


def whenConnected(connection):
    """
    @return: a L{Deferred} firing once C{connection} (a
        L{imserver.redisclient.RedisConnection}) is up (at once if it is).
    """
    return _when(connection.connected, connection.onConnect)


def whenDisconnected(connection):
    """
    @return: a L{Deferred} firing once C{connection} (a
        L{imserver.redisclient.RedisConnection}) is lost (at once if it is
        down).
    """
    return _when(not connection.connected, connection.onDisconnect)


def whenSubscribed(subscriber):
    """
    @return: a L{Deferred} firing once C{subscriber} (a
        L{imserver.redisclient.RedisSubscriber}) has its subscription in
        place (at once if it has).
    """
    return _when(subscriber.subscribed, subscriber.onSubscribe)
