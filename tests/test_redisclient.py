# -*- test-case-name: tests.test_redisclient -*-
"""
Tests for L{imserver.redisclient} against a real C{redis-server}.
"""

from types import SimpleNamespace

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txredisapi import ResponseError

from imserver.errors import Unavailable
from imserver.redisclient import (
    CommandStats,
    RedisUnavailable,
    RedisURL,
    _RedisProtocol,
    _unavailable,
    connectRedis,
    encodeCommand,
)

from tests.support.redis import RedisServer, whenConnected, whenDisconnected


class RedisURLTests(SynchronousTestCase):
    """
    L{RedisURL.parse}.
    """

    def test_full(self):
        """
        User, password (percent-decoded), host, port and database.
        """
        url = RedisURL.parse("rediss://gate:p%40ss@redis.example:6380/3")
        self.assertEqual(
            (url.host, url.port, url.db, url.username, url.password, url.tls),
            ("redis.example", 6380, 3, "gate", "p@ss", True),
        )

    def test_defaults(self):
        """
        Port 6379, database 0, no credentials, no TLS.
        """
        url = RedisURL.parse("redis://localhost")
        self.assertEqual(
            (url.port, url.db, url.username, url.password, url.tls), (6379, 0, None, None, False)
        )

    def test_passwordOnly(self):
        """
        C{redis://:password@host} gives a password and no user.
        """
        url = RedisURL.parse("redis://:secret@h/1")
        self.assertEqual((url.username, url.password, url.db), (None, "secret", 1))

    def test_strHidesPassword(self):
        """
        The text form, which goes to logs, never shows the password.
        """
        text = str(RedisURL.parse("redis://u:secret@h:1/2"))
        self.assertNotIn("secret", text)
        self.assertEqual(text, "redis://u@h:1/2")

    def test_invalid(self):
        """
        Other schemes, no host, bad ports and databases are refused.
        """
        for text in [
            "http://h",
            "redis://",
            "redis://h:x",
            "redis://h/a",
            "redis://h/1?x=1",
            "h:6379",
        ]:
            self.assertRaises(ValueError, RedisURL.parse, text)


class RetryableErrorTests(SynchronousTestCase):
    """
    The errors of L{imserver.redisclient.RedisConnection.execute}.
    """

    def test_retryableErrors(self):
        """
        Redis's "not now" refusals (loading its data after a restart, busy,
        out of memory, a read-only replica, a script touching a key of a
        slot its cluster node does not serve now) become
        L{RedisUnavailable}; other errors stay what they are.
        """
        for message in [
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "OOM command not allowed",
            "READONLY You can't write against a read only replica.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "ERR Script attempted to access a non local key in a cluster node script: 2e, on"
            " @user_script:47.",
        ]:
            self.failureResultOf(
                fail(ResponseError(message)).addErrback(_unavailable), RedisUnavailable
            )
        for message in ["ERR syntax", "ERR Script attempted to call an unknown command"]:
            self.failureResultOf(
                fail(ResponseError(message)).addErrback(_unavailable), ResponseError
            )


class EncodeTests(SynchronousTestCase):
    """
    L{encodeCommand} makes the bytes txredisapi's own encoder makes.
    """

    def test_sameAsTxredisapi(self):
        """
        Bytes, text (ASCII and not), integers (negative, large), floats,
        bytearrays and other objects are encoded as txredisapi does.
        """
        protocol = txredisapi.BaseRedisProtocol(charset=None)
        commands = [
            ("PING",),
            ("SET", "k", b"\x00\xff\r\n"),
            ("EVALSHA", "abc", 2, "k1", "k2", -5, 10**20, "h\u00e9", 1.5, bytearray(b"ba"), True),
            ("SET", "", b""),
        ]
        for command in commands:
            self.assertEqual(
                encodeCommand(command, protocol._encode_value), protocol._build_command(*command)
            )


class LeanProtocolTests(SynchronousTestCase):
    """
    The command path of L{_RedisProtocol}, on a L{Clock} and a
    L{StringTransport}.
    """

    def setUp(self):
        self.clock = Clock()
        self.protocol = _RedisProtocol(charset=None, replyTimeout=5, convertNumbers=False)
        self.protocol.factory = SimpleNamespace(owner=SimpleNamespace(reactor=self.clock))
        self.protocol.callLater = self.clock.callLater
        self.transport = StringTransport()
        self.protocol.transport = self.transport
        self.protocol.connected = 1

    def test_repliesInOrder(self):
        """
        Commands are written as RESP; each reply fires the oldest command's
        Deferred, an error reply as a failure.
        """
        first = self.protocol.execute_command("GET", "a")
        second = self.protocol.execute_command("GET", "b")
        self.assertEqual(
            self.transport.value(), b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*2\r\n$3\r\nGET\r\n$1\r\nb\r\n"
        )
        self.protocol.dataReceived(b"$1\r\nx\r\n-ERR no\r\n")
        self.assertEqual(self.successResultOf(first), b"x")
        self.failureResultOf(second, ResponseError)

    def test_timeout(self):
        """
        No reply to the oldest command within the reply timeout fails every
        command in flight with C{txredisapi.TimeoutError} (a
        C{ConnectionError}: the gate's L{RedisUnavailable}) and drops the
        connection; one timer serves them all.
        """
        first = self.protocol.execute_command("GET", "a")
        self.clock.advance(3)
        second = self.protocol.execute_command("GET", "b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1.9)
        self.assertNoResult(first)
        self.clock.advance(0.1)
        self.failureResultOf(first, txredisapi.TimeoutError)
        self.failureResultOf(second, txredisapi.TimeoutError)
        self.assertTrue(self.transport.disconnecting)

    def test_timerMoves(self):
        """
        Once the oldest command is answered, the timeout counts from the
        next one's sending.
        """
        first = self.protocol.execute_command("GET", "a")
        self.clock.advance(4)
        second = self.protocol.execute_command("GET", "b")
        self.protocol.dataReceived(b"$1\r\nx\r\n")
        self.successResultOf(first)
        self.clock.advance(1)
        self.assertNoResult(second)
        self.clock.advance(4)
        self.failureResultOf(second, txredisapi.TimeoutError)

    def test_connectionLost(self):
        """
        A lost connection fails the commands in flight with
        C{txredisapi.ConnectionError} and stops the timer.
        """
        d = self.protocol.execute_command("GET", "a")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, txredisapi.ConnectionError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.protocol.connected = 0
        self.assertRaises(txredisapi.ConnectionError, self.protocol.execute_command, "GET", "a")


class ConnectionTests(TestCase):
    """
    L{connectRedis} against a real server.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        self.server = RedisServer(self, reactor, appendfsync=None)
        yield self.server.start()
        self.connection = connectRedis(reactor, RedisURL.parse(self.server.url), replyTimeout=2)
        self.addCleanup(self.connection.disconnect)
        yield whenConnected(self.connection)

    @inlineCallbacks
    def test_bytes(self):
        """
        Values go in and come back as bytes, unchanged (no decoding, no
        number conversion).
        """
        value = bytes(range(256))
        yield self.connection.execute("SET", "k", value)
        self.assertEqual((yield self.connection.execute("GET", "k")), value)
        yield self.connection.execute("SET", "n", b"42")
        self.assertEqual((yield self.connection.execute("GET", "n")), b"42")
        self.assertEqual((yield self.connection.execute("INCR", "n")), 43)

    @inlineCallbacks
    def test_script(self):
        """
        A script runs, and runs again after Redis forgot it.
        """
        script = self.connection.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        self.assertEqual((yield script(["c"], [5])), 5)
        yield self.connection.execute("SCRIPT", "FLUSH")
        self.assertEqual((yield script(["c"], [2])), 7)

    @inlineCallbacks
    def test_stats(self):
        """
        With L{CommandStats}, every command is timed by name (a script by
        its name, its C{NOSCRIPT} retry counted), and failures are counted
        by command and kind.
        """
        stats = self.connection.stats = CommandStats(reactor)
        yield self.connection.execute("SET", "k", b"v")
        yield self.connection.execute("GET", "k")
        yield self.assertFailure(self.connection.execute("INCR", "k"), ResponseError)
        script = self.connection.script("return 1", "one")
        yield script()
        yield script()
        histograms = stats.seconds.histograms
        self.assertEqual(
            {name: sum(h.counts) for name, h in histograms.items()},
            {"SET": 1, "GET": 1, "INCR": 1, "one": 3},
        )
        self.assertEqual(stats.errors, {("INCR", "error"): 1, ("one", "noscript"): 1})
        lost = whenDisconnected(self.connection)
        yield self.server.stop()
        yield lost
        yield self.assertFailure(self.connection.execute("GET", "k"), RedisUnavailable)
        self.assertEqual(stats.errors[("GET", "unavailable")], 1)

    @inlineCallbacks
    def test_unavailable(self):
        """
        Without Redis a command fails at once with L{RedisUnavailable} (an
        C{UNAVAILABLE} for the client); when Redis is back the connection
        comes back by itself and C{onConnect} runs again.
        """
        lost = Deferred()
        self.connection.onDisconnect.append(lambda: lost.callback(None))
        yield self.server.stop()
        yield lost
        self.assertFalse(self.connection.connected)
        failure = yield self.assertFailure(self.connection.execute("PING"), RedisUnavailable)
        self.assertIsInstance(failure, Unavailable)
        yield self.server.start()
        yield whenConnected(self.connection)
        self.assertEqual((yield self.connection.execute("PING")), b"PONG")


class RefusedAuthTests(TestCase):
    """
    A connection whose credentials Redis refuses keeps trying.
    """

    timeout = 30

    @inlineCallbacks
    def test_retriesAfterWrongPassword(self):
        """
        With a wrong password the connection stays down (commands fail with
        L{RedisUnavailable}) and keeps retrying; once Redis accepts that
        password (a rotation finished on the Redis side), it comes up by
        itself.
        """
        server = RedisServer(
            self, reactor, appendfsync=None, extraArgs=["--requirepass", "old-password"]
        )
        yield server.start()
        url = "redis://:new-password@127.0.0.1:{}/0".format(server.port)
        connection = connectRedis(reactor, RedisURL.parse(url), replyTimeout=2)
        self.addCleanup(connection.disconnect)
        up = Deferred()
        connection.onConnect.append(lambda: up.called or up.callback(None))
        admin = connectRedis(
            reactor,
            RedisURL.parse("redis://:old-password@127.0.0.1:{}/0".format(server.port)),
            replyTimeout=2,
        )
        self.addCleanup(admin.disconnect)
        adminUp = Deferred()
        admin.onConnect.append(lambda: adminUp.called or adminUp.callback(None))
        yield adminUp
        yield self.assertFailure(connection.execute("PING"), RedisUnavailable)
        yield admin.execute("CONFIG", "SET", "requirepass", "new-password")
        yield up
        self.assertEqual((yield connection.execute("PING")), b"PONG")
        self.flushLoggedErrors()
