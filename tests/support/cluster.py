# -*- test-case-name: tests.test_registry,tests.test_bus,tests.test_cluster -*-
"""
The Redis side of a cluster without gates: L{FakeSession}s that record what
the registry and the bus do to them, L{FakeGate}s (a command connection, a
bus and a registry each), and L{RedisTestMixin}, a fresh C{redis-server}
per test.
"""

import itertools

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from zope.interface import implementer

from imserver.bus.redis import RedisGateBus
from imserver.interfaces import ISession
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisURL, connectRedis, subscribeRedis
from imserver.rediscluster import ClusterURL, connectCluster, parseRedisURL, subscribeCluster
from imserver.registry.redis import RedisSessionRegistry, parseEntry, sessionsKey

from tests.support.live import withDeadline
from tests.support.redis import RedisServer, whenConnected, whenSubscribed

_sessionIds = itertools.count(1)


@implementer(ISession)
class FakeSession:
    """
    A session that records what the registry and the bus do to it.
    """

    platform = pb.DESKTOP

    def __init__(self, uid, deviceId, gateId="g"):
        self.uid = uid
        self.deviceId = deviceId
        self.gateId = gateId
        self.sessionId = "{}/{}".format(gateId, next(_sessionIds))
        self.kicks = []
        self.advanced = []
        self.typings = []
        self.notices = []

    def __repr__(self):
        return "<FakeSession {} {}/{}>".format(self.sessionId, self.uid, self.deviceId)

    def kick(self, reason, message):
        self.kicks.append(reason)

    def inboxAdvanced(self, seq, outgoing, encoded):
        self.advanced.append((seq, outgoing, encoded))

    def typing(self, uid, active, groupId):
        self.typings.append((uid, active, groupId))

    def notice(self, frame):
        self.notices.append(frame)


class FakeGate:
    """
    The Redis side of one gate, without the gate: a command connection, a
    bus with its subscriber, and a L{RedisSessionRegistry}.
    """

    def __init__(self, testCase, url, gateId, maxDevices=3, leaseSeconds=30.0, incarnation=None):
        if isinstance(url, str):
            url = parseRedisURL(url)
        connect, subscribe = (
            (connectCluster, subscribeCluster)
            if isinstance(url, ClusterURL)
            else (connectRedis, subscribeRedis)
        )
        self.gateId = gateId
        self.connection = connect(reactor, url, replyTimeout=2, connectTimeout=2, start=False)
        self.bus = RedisGateBus(
            self.connection,
            lambda channels, onMessage: subscribe(
                reactor, url, channels, onMessage, replyTimeout=2, connectTimeout=2, start=False
            ),
            gateId,
            reactor,
        )
        self.registry = RedisSessionRegistry(
            self.connection,
            self.bus,
            reactor,
            gateId,
            maxDevices=maxDevices,
            leaseSeconds=leaseSeconds,
            incarnation=incarnation,
        )
        testCase.addCleanup(self.stop)

    @inlineCallbacks
    def start(self):
        """
        Connect, subscribe and take the lease.
        """
        connected = whenConnected(self.connection)
        self.connection.start()
        self.bus.start()
        yield withDeadline(connected, 10, "the Redis connection")
        yield withDeadline(whenSubscribed(self.bus.subscriber), 10, "the subscription")
        yield self.registry.refreshLease()
        return self

    @inlineCallbacks
    def stop(self):
        yield self.bus.stop()
        yield self.connection.disconnect()

    def session(self, uid, deviceId):
        """
        A new L{FakeSession} of this gate.
        """
        return FakeSession(uid, deviceId, self.gateId)


class RedisTestMixin:
    """
    A fresh C{redis-server} per test.
    """

    timeout = 30

    @inlineCallbacks
    def startRedis(self, appendfsync=None):
        self.server = RedisServer(self, reactor, appendfsync=appendfsync)
        yield self.server.start()

    def gate(self, gateId, **kwargs):
        """
        @return: a L{Deferred} firing with a started L{FakeGate}.
        """
        return FakeGate(self, self.server.url, gateId, **kwargs).start()

    @inlineCallbacks
    def entries(self, uid):
        """
        The raw entries of C{uid}: C{{device: parseEntry(...)}}.
        """
        connection = connectRedis(reactor, RedisURL.parse(self.server.url))
        try:
            yield whenConnected(connection)
            reply = yield connection.execute("HGETALL", sessionsKey(uid))
        finally:
            yield connection.disconnect()
        return {reply[i].decode(): parseEntry(reply[i + 1]) for i in range(0, len(reply), 2)}
