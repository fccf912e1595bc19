# -*- test-case-name: tests.test_cluster -*-
"""
Cluster mode (C{--redis}): the Redis side of a gate, built by
L{clusterSeams}, and the L{ClusterService} that connects it, keeps the
gate's lease and keeps Redis right about this gate across outages.

Nothing here is imported without C{--redis} (a gate in embedded mode does
not even import txredisapi).
"""

import zlib
from collections import namedtuple
from functools import partial

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from imserver.errors import Unavailable
from imserver.metrics import labelled
from imserver.observe import OneShot
from imserver.service import StartupError

#: Seconds between lease refreshes in cluster mode: the sweep interval,
#: but at least this.
MIN_LEASE_INTERVAL = 0.5
#: A gate's lease lives this many refresh intervals: a gate that stopped
#: refreshing is dead for the others after about as long.
LEASE_INTERVALS = 3


#: The Redis side of a gate, not connected yet: the
#: L{imserver.redisclient.RedisConnection}, the
#: L{imserver.bus.redis.RedisGateBus}, the
#: L{imserver.registry.redis.RedisSessionRegistry}, the
#: L{imserver.store.redis.RedisMessageStore}, the
#: L{imserver.registry.redisdirectory.RedisGateDirectory}, the seconds
#: between lease refreshes, the retention lease (for
#: L{imserver.service.RetentionService}: C{retentionLease(ttlMs)}), and on
#: a Redis Cluster its retention shards (L{shardsOf}; L{None} otherwise).
ClusterSeams = namedtuple(
    "ClusterSeams",
    [
        "connection",
        "bus",
        "registry",
        "store",
        "directory",
        "interval",
        "retentionLease",
        "retentionShards",
    ],
)


def clusterSeams(reactor, url, caFile, gateId, settings, dedupWindowMs):
    """
    The Redis side of a gate in cluster mode: connection, subscriber, bus,
    registry, store and directory.  Nothing connects before the
    L{ClusterService} given them starts.

    @param url: the C{--redis} L{imserver.redisclient.RedisURL}, or an
        L{imserver.rediscluster.ClusterURL} (a Redis Cluster: the registry,
        the directory and the store then run in cluster mode, every script
        in one slot).
    @param caFile: the C{--redis-ca} path, or L{None}.
    @rtype: L{ClusterSeams}
    @raise StartupError: if C{--redis-ca} cannot be read.
    """
    from imserver.bus.redis import RedisGateBus
    from imserver.redisclient import CommandStats, connectRedis, subscribeRedis
    from imserver.rediscluster import ClusterURL, connectCluster, subscribeCluster
    from imserver.registry.redis import RedisSessionRegistry
    from imserver.registry.redisdirectory import RedisGateDirectory
    from imserver.store.redis import RedisMessageStore
    from imserver.store.redis.keys import RETENTION_LEASE_KEY

    cluster = isinstance(url, ClusterURL)
    connect, subscribeTo = (
        (connectCluster, subscribeCluster) if cluster else (connectRedis, subscribeRedis)
    )
    try:
        connection = connect(reactor, url, caFile, start=False)
    except Exception as e:  # an unreadable --redis-ca
        raise StartupError("--redis-ca {}: {}".format(caFile, e))
    connection.stats = CommandStats(reactor)

    def subscribe(channels, onMessage):
        return subscribeTo(reactor, url, channels, onMessage, caFile, start=False)

    bus = RedisGateBus(connection, subscribe, gateId, reactor)
    interval = max(settings.sweep_interval, MIN_LEASE_INTERVAL)
    registry = RedisSessionRegistry(
        connection,
        bus,
        reactor,
        gateId,
        maxDevices=settings.max_devices,
        leaseSeconds=LEASE_INTERVALS * interval,
    )
    store = RedisMessageStore(connection, reactor, dedupWindowMs)
    store.waitReplicas = settings.redis_wait_replicas
    store.waitTimeoutMs = max(1, int(settings.redis_wait_timeout * 1000))
    directory = RedisGateDirectory(connection)
    retentionLease = partial(store.claimLease, RETENTION_LEASE_KEY, gateId)
    retentionShards = None
    if cluster:
        retentionShards = partial(shardsOf, connection, store, gateId, registry.liveGates)
    return ClusterSeams(
        connection, bus, registry, store, directory, interval, retentionLease, retentionShards
    )


def shardsOf(connection, store, gateId, liveGates):
    """
    The retention shards of a Redis Cluster for
    L{imserver.service.RetentionService}: a lease and a pass per primary
    (C{im:retention:lease:<host>:<port>}), in an order that starts at a
    place of this gate's own, and a quota of the primaries over the live
    gates (rounded up), so that the gates share the passes.

    @param liveGates: returns how many gates are live.
    @return: C{(quota, [(lease, trim), ...])}.
    """
    from imserver.store.redis.keys import retentionLeaseKey

    primaries = connection.primaries
    if not primaries:
        return 0, []
    start = zlib.crc32(gateId.encode("utf-8")) % len(primaries)
    order = primaries[start:] + primaries[:start]
    quota = -(-len(primaries) // max(1, liveGates()))
    return quota, [
        (
            partial(store.claimLease, retentionLeaseKey(address), gateId),
            partial(store.trimPrimary, address),
        )
        for address in order
    ]


class ClusterService(Service):
    """
    Cluster mode's side of a gate (C{--redis}): the Redis connections, the
    gate's lease, and keeping the registry right across Redis outages.

    Started first and stopped last (after the gate drained its
    connections).  At start it connects to Redis and subscribes to the
    gate's bus channel; from then on, every C{interval} seconds it extends
    the gate's lease (one command for all its sessions) and pings the
    subscriber connection.  It runs a I{resync} whenever Redis may have
    forgotten or missed something of this gate:

      - the command connection (re)connects, the bus subscription is
        (re)established, or the lease was found lapsed: refresh the lease,
        re-register every session and remove the entries of sessions
        closed meanwhile (L{RedisSessionRegistry.reconcile}), advertise the
        gate again, then I{catch up} (once both connections are up): every
        local user's newest inbox entry is announced to its sessions, which
        fetch what they missed while notifications could not reach this
        gate (or were dropped because the store could not be read).

    A resync that fails (Redis went away again) is retried at the next
    connect or tick.

    @ivar resyncs: completed resyncs (for tests).
    """

    log = Logger()

    def __init__(self, connection, registry, bus, directory, messenger, clock, interval):
        """
        @param connection: the L{imserver.redisclient.RedisConnection}
            (started here).
        @param registry: the L{imserver.registry.redis.RedisSessionRegistry}.
        @param bus: the L{imserver.bus.redis.RedisGateBus} (started here).
        @param directory: the L{imserver.registry.redisdirectory.RedisGateDirectory}.
        @param messenger: the gate's L{imserver.messaging.Messenger}, which
            announces the entries of the catch-up.
        @param interval: seconds between lease refreshes.
        """
        self.setName("cluster")
        self.connection = connection
        self.registry = registry
        self.bus = bus
        self.directory = directory
        self.messenger = messenger
        self.clock = clock
        self.interval = interval
        self.resyncs = 0
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._resyncing = False
        self._resyncWaiters = []
        self._needResync = False
        self._catchUpPending = False
        self._ready = OneShot()

    def startService(self):
        Service.startService(self)
        self.connection.onConnect.append(self._connected)
        self.bus.subscriber.onSubscribe.append(self._subscribed)
        self.connection.start()
        self.bus.start()
        self._loop.start(self.interval, now=False)

    def whenReady(self):
        """
        @return: a L{Deferred} firing once connected, subscribed and
            registered for the first time.
        """
        return self._ready.when()

    def _connected(self):
        # Catch up too: pushes that came over the bus while the command
        # connection was down were dropped (the store could not be read).
        self.resync(catchUp=True)

    def _subscribed(self):
        self.resync(catchUp=True)

    def tick(self):
        """
        Refresh the lease (and resync if it had lapsed, or if the last
        resync failed); ping the subscriber connection.
        """
        if not self.connection.connected:
            return
        if self._needResync:
            self.resync()
        else:
            if self.registry.orphans:
                self.registry.dropOrphans().addErrback(
                    lambda f: self.log.debug(
                        "deleting entries of closed sessions failed: {why}", why=f.getErrorMessage()
                    )
                )
            d = self.registry.refreshLease()

            def refreshed(lapsed):
                if lapsed:
                    self.log.warn(
                        "the lease of gate {gate} had lapsed; registering its sessions again",
                        gate=self.registry.gateId,
                    )
                    self.resync(catchUp=True)

            d.addCallbacks(
                refreshed,
                lambda f: self.log.debug("lease refresh failed: {why}", why=f.getErrorMessage()),
            )
        self.bus.ping()

    def resync(self, catchUp=False):
        """
        Refresh the lease, re-register, advertise, and catch up if asked
        (now or by an earlier call not yet done).

        @return: a L{Deferred} firing once the resyncs asked so far are
            done, or could not be done (not connected; retried later).
        """
        self._needResync = True
        if catchUp:
            self._catchUpPending = True
        d = Deferred()
        self._resyncWaiters.append(d)
        if not self._resyncing:
            self._resyncing = True
            self._resyncLoop()
        return d

    @inlineCallbacks
    def _resyncLoop(self):
        while self._needResync and self.running and self.connection.connected:
            self._needResync = False
            catchUp = self._catchUpPending and self.bus.subscribed
            try:
                yield self.registry.refreshLease()
                yield self.registry.reconcile()
                yield self.directory.readvertise()
                if catchUp:
                    self._catchUpPending = False
                    yield self.catchUp()
            except Exception as e:
                if isinstance(e, Unavailable):
                    self.log.warn(
                        "resynchronizing with Redis failed ({why}); retrying", why=e.message
                    )
                else:
                    self.log.failure("resynchronizing with Redis failed; retrying")
                self._needResync = True
                if catchUp:
                    self._catchUpPending = True
                break
            self.resyncs += 1
        self._resyncing = False
        if (
            not self._needResync
            and self.connection.connected
            and self.bus.subscribed
            and not self._catchUpPending
        ):
            self._ready.fire(None)
        waiters, self._resyncWaiters = self._resyncWaiters, []
        for d in waiters:
            d.callback(None)

    def catchUp(self):
        """
        Announce every local user's newest inbox entry to its sessions:
        those behind it fetch what they missed (a session already past it
        ignores it).

        @return: a L{Deferred} firing with the number of users announced.
        """
        ds = [
            self.messenger.announceNewest(uid, sessions)
            for uid, sessions in self.registry.localSessions().items()
            if sessions
        ]
        return gatherResults(ds, consumeErrors=True).addCallbacks(
            sum, lambda failure: failure.value.subFailure
        )

    @inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        for hooks, hook in [
            (self.connection.onConnect, self._connected),
            (self.bus.subscriber.onSubscribe, self._subscribed),
        ]:
            if hook in hooks:
                hooks.remove(hook)
        steps = [
            ("publishing the last bus batches", self.bus.stop),
            ("unregistering the last sessions", self.registry.drain),
            ("withdrawing the lease", self.registry.withdrawLease),
            ("disconnecting from Redis", self.connection.disconnect),
        ]
        for what, step in steps:
            try:
                yield step()
            except Unavailable as e:
                self.log.warn("{what} failed: {why}", what=what, why=e.message)
            except Exception:
                self.log.failure("{what} failed", what=what)


class ClusterMetrics:
    """
    Cluster mode's metrics, a collector registered in the gate's
    L{prometheus_client.CollectorRegistry} beside
    L{imserver.metrics.GateMetrics}: the Redis connection (up, command
    latency and failures by command), the gate bus (batches published and
    received, lag, subscription, batches kept for a retry), the store's
    rollbacks and restarts, and the retention passes.  Read from the
    objects' own counters when C{/metrics} is scraped.
    """

    def __init__(self, registry, seams, retention):
        """
        @param registry: the gate's C{CollectorRegistry}, or L{None}.
        @param seams: the gate's L{ClusterSeams}.
        @param retention: its L{imserver.service.RetentionService}.
        """
        self.seams = seams
        self.retention = retention
        if registry is not None:
            registry.register(self)

    def describe(self):
        return [GaugeMetricFamily("imserver_redis_connected", "Whether Redis is connected.")]

    def collect(self):
        seams = self.seams
        connection, bus, store = seams.connection, seams.bus, seams.store
        yield GaugeMetricFamily(
            "imserver_redis_connected",
            "Whether the gate's command connection to Redis is up (1) or not (0).",
            value=1 if connection.connected else 0,
        )
        stats = connection.stats
        if stats is not None:
            yield stats.seconds.family()
            errors = CounterMetricFamily(
                "imserver_redis_command_errors",
                "Redis commands that failed, by command and kind: unavailable (no connection,"
                " no reply in time, a not-now error), noscript (a script sent again in full),"
                " error (any other error reply).",
                labels=["command", "kind"],
            )
            for (command, kind), count in sorted(stats.errors.items()):
                errors.add_metric([command, kind], count)
            yield errors
        redirections = getattr(connection, "redirections", None)
        if redirections is not None:  # a Redis Cluster
            yield labelled(
                "imserver_redis_redirections",
                "Redis Cluster redirections followed, by kind: moved (the slot map is"
                " updated), ask (a slot being migrated).",
                "kind",
                [(kind.lower(), count) for kind, count in sorted(redirections.items())],
            )
            yield CounterMetricFamily(
                "imserver_redis_slot_map_reads",
                "Reads of the Redis Cluster's slot map (CLUSTER SLOTS).",
                value=connection.refreshes,
            )
        yield CounterMetricFamily(
            "imserver_bus_published",
            "PUBLISH commands of the gate bus sent by this gate (batches and broadcasts).",
            value=bus.published,
        )
        yield CounterMetricFamily(
            "imserver_bus_received",
            "Gate bus batches received by this gate.",
            value=bus.received,
        )
        yield bus.lag.family()
        yield GaugeMetricFamily(
            "imserver_bus_subscribed",
            "Whether this gate's bus subscription is in place (1) or not (0).",
            value=1 if bus.subscribed else 0,
        )
        yield GaugeMetricFamily(
            "imserver_bus_retry_batches",
            "Gate bus batches kept while Redis is unreachable, to publish once it is back.",
            value=len(bus._retry),
        )
        yield CounterMetricFamily(
            "imserver_store_rollbacks",
            "Times the Redis store saw the inbox epoch change (Redis lost data).",
            value=store.rollbacks,
        )
        yield CounterMetricFamily(
            "imserver_store_restarts",
            "Times the Redis store found that Redis restarted.",
            value=store.restarts,
        )
        yield labelled(
            "imserver_retention_passes",
            "Retention intervals by outcome: run (this gate held the retention lease)"
            " or skipped (another gate did).",
            "result",
            {"run": self.retention.passes, "skipped": self.retention.skipped},
        )
