# -*- test-case-name: tests.test_cluster -*-
"""
Cluster mode (C{--redis}): the options, the service tree, and two gates in
this process (L{imserver.tap.makeService} twice, plain TCP listeners on
loopback) sharing one real C{redis-server}, with real clients
(L{imserver.client}): messages and kicks across gates, and Redis going
away and coming back.
"""

import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import tap
from imserver.auth import createSecretFile, loadSecret, mintToken
from imserver.client import connect
from imserver.cluster import ClusterService
from imserver.errors import RemoteError
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisUnavailable
from imserver.registry.redis import RedisSessionRegistry
from imserver.registry.redisdirectory import RedisGateDirectory
from imserver.registry.remote import RemoteSession
from imserver.service import AdvertiseService

from tests.support import documentedMetrics, servedMetrics, startServer
from tests.support.cluster import RedisTestMixin
from tests.support.frames import connectRaw
from tests.support.live import Changes, ConnectionWatch, withDeadline
from tests.support.redis import whenConnected, whenDisconnected
from tests.support.rediscluster import usersOnPrimaries
from tests.support.websocket import JSON, connectWS

LISTEN = "tcp:0:interface=127.0.0.1"
URL = "redis://gate:s3cret@127.0.0.1:6390/0"

#: Seconds a gate has to be whole again once Redis is back.
RECOVERY = 5.0
#: Seconds a message has to arrive.
DEADLINE = 5.0
#: test_reshardRange: the slots moved, and a bound on the sends per pair.
RESHARD_SLOTS = 200
RESHARD_MAX_SENDS = 2000
#: Seconds between two tries while a gate recovers from an outage.
RETRY_INTERVAL = 0.05


class OptionsTests(SynchronousTestCase):
    """
    C{--redis}, C{--redis-ca} and what goes with them.
    """

    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_redis(self):
        """
        C{--redis} is parsed into a L{RedisURL}; the store is then Redis.
        """
        options = self.parse("--redis", URL)
        url = options.redisURL
        self.assertEqual(
            (url.host, url.port, url.db, url.username, url.password, url.tls),
            ("127.0.0.1", 6390, 0, "gate", "s3cret", False),
        )
        self.assertEqual(options["store"], "redis")

    def test_embedded(self):
        """
        Without C{--redis} nothing changes: no URL, the SQLite store.
        """
        options = self.parse()
        self.assertIsNone(options.redisURL)
        self.assertEqual(options["store"], "sqlite")

    def test_badURL(self):
        """
        A bad URL is a usage error that does not repeat the URL (it may
        hold a password).
        """
        for url in ["http://u:s3cret@h", "redis://u:s3cret@h:port", "redis://u:s3cret@h/x"]:
            e = self.assertRaises(UsageError, self.parse, "--redis", url)
            self.assertNotIn("s3cret", str(e))
            self.assertIn("--redis", str(e))

    def test_clusterURL(self):
        """
        C{?cluster=yes} with several seeds is a Redis Cluster's URL; a
        database other than 0 or an unknown parameter is a usage error that
        does not repeat the password.
        """
        url = self.parse(
            "--redis", "redis://gate:s3cret@127.0.0.1:7000,127.0.0.1:7001/0?cluster=yes"
        ).redisURL
        self.assertEqual(
            (url.seeds, url.username, url.password, url.tls),
            ((("127.0.0.1", 7000), ("127.0.0.1", 7001)), "gate", "s3cret", False),
        )
        for bad in [
            "redis://gate:s3cret@h:1,h:2/1?cluster=yes",
            "redis://gate:s3cret@h:1,h:2/0",
            "redis://gate:s3cret@h:1/0?shards=3",
        ]:
            e = self.assertRaises(UsageError, self.parse, "--redis", bad)
            self.assertNotIn("s3cret", str(e))

    def test_storeRefused(self):
        """
        C{--store} does not go with C{--redis}.
        """
        for store in ["sqlite", "memory"]:
            e = self.assertRaises(UsageError, self.parse, "--redis", URL, "--store", store)
            self.assertIn("--store", str(e))

    def test_redisCA(self):
        """
        C{--redis-ca} needs a C{rediss://} URL and an existing file holding
        a PEM certificate.
        """
        from imserver.tls import makeSelfSigned

        ca = FilePath(self.mktemp())
        ca.setContent(makeSelfSigned()[0])
        self.assertRaises(UsageError, self.parse, "--redis-ca", ca.path)
        self.assertRaises(UsageError, self.parse, "--redis", URL, "--redis-ca", ca.path)
        self.assertRaises(
            UsageError, self.parse, "--redis", "rediss://h", "--redis-ca", ca.path + "-missing"
        )
        notPEM = FilePath(self.mktemp())
        notPEM.setContent(b"pem")
        e = self.assertRaises(
            UsageError, self.parse, "--redis", "rediss://h", "--redis-ca", notPEM.path
        )
        self.assertIn("--redis-ca", str(e))
        options = self.parse("--redis", "rediss://h", "--redis-ca", ca.path)
        self.assertTrue(options.redisURL.tls)

    def test_gateId(self):
        """
        In cluster mode a gate id may not contain C{|}.
        """
        self.assertRaises(UsageError, self.parse, "--redis", URL, "--gate-id", "a|b")
        self.assertEqual(self.parse("--gate-id", "a|b")["gate-id"], "a|b")

    def test_serviceTree(self):
        """
        With C{--redis}: the registry, store and directory are Redis ones,
        and the cluster service is the first child of the root (started
        before the gate listens, stopped after it drained); nothing
        connects before the tree starts.
        """
        from imserver.store.redis import RedisMessageStore

        memory = MemoryReactorClock()
        options = self.parse(
            "--data-dir",
            self.mktemp(),
            "--listen",
            LISTEN,
            "--api",
            "none",
            "--redis",
            URL,
            "--gate-id",
            "g1",
        )
        root = tap.makeService(options, memory)
        self.assertEqual([s.name for s in root], ["cluster", "retention", "gate"])
        cluster = root.getServiceNamed("cluster")
        self.assertIsInstance(cluster, ClusterService)
        factory = root.getServiceNamed("gate").factory
        self.assertIsInstance(factory.registry, RedisSessionRegistry)
        self.assertIs(factory.registry, cluster.registry)
        self.assertIs(factory.messenger, cluster.messenger)
        self.assertIsInstance(factory.store, RedisMessageStore)
        self.assertEqual(factory.registry.leaseSeconds, 3.0)
        [advertise] = [s for s in root.getServiceNamed("gate") if isinstance(s, AdvertiseService)]
        self.assertIsInstance(advertise.directory, RedisGateDirectory)
        self.assertEqual(memory.tcpClients, [])

    def test_noTxredisapiWithoutRedis(self):
        """
        A gate without C{--redis} does not even import txredisapi.
        """
        code = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from imserver import tap\n"
            "o = tap.Options()\n"
            "o.parseOptions(['--data-dir', sys.argv[1], '--store', 'memory',"
            " '--listen', 'tcp:0', '--api', 'none'])\n"
            "tap.makeService(o, MemoryReactorClock())\n"
            "print('txredisapi' in sys.modules)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.mktemp()], check=True, capture_output=True, text=True
        ).stdout
        self.assertEqual(out.strip(), "False")


class GatesMixin:
    """
    Gates in this process in cluster mode on C{self.server} (a Redis, or a
    Redis Cluster: anything with a C{url}), sharing C{self.secretFile};
    real clients over plain TCP whose notifications change
    C{self.changes}.
    """

    @inlineCallbacks
    def startGate(self, gateId, *extra):
        """
        Build and start a gate with C{--redis}; wait until it is connected,
        subscribed and registered.

        @param extra: more options.
        @return: its L{GateService}, with C{root}, C{cluster}, C{port} and
            C{watch} attributes added.
        """
        options = tap.Options()
        options.parseOptions(
            list(extra)
            + [
                "--data-dir",
                self.mktemp(),
                "--listen",
                LISTEN,
                "--api",
                "none",
                "--gate-id",
                gateId,
                "--redis",
                self.server.url,
                "--secret-file",
                self.secretFile.path,
            ]
        )
        root = startServer(self, options)
        gate = root.getServiceNamed("gate")
        gate.root = root
        gate.cluster = root.getServiceNamed("cluster")
        gate.watch = ConnectionWatch(self, gate.factory)
        yield gate.cluster.whenReady()
        [address] = yield gate.addresses()
        gate.port = address.port
        return gate

    @inlineCallbacks
    def connect(self, gate, uid, deviceId="phone"):
        """
        Connect and authenticate a client to C{gate}.

        @return: the L{ClientProtocol}, with C{notified}: the
            C{(name, message)} notifications it got (each one a change of
            C{self.changes}).
        """
        notified = []
        holder = []

        def onNotify(name, message):
            notified.append((name, message))
            if name == "message" and holder:
                # As every real client does: the push window counts from
                # the last ack (and seqs start high with the Redis store).
                holder[0].ack(message.seq)
            self.changes.changed()

        client = yield connect(
            reactor,
            "127.0.0.1",
            gate.port,
            uid=uid,
            token=mintToken(self.secret, uid, 60, time.time()),
            deviceId=deviceId,
            tls=False,
            onNotify=onNotify,
        )
        holder.append(client)
        client.notified = notified
        self.addCleanup(client.close)
        return client

    def messages(self, client):
        return [m for name, m in client.notified if name == "message"]


class TwoGatesTests(GatesMixin, RedisTestMixin, TestCase):
    """
    Two gates in this process, one C{redis-server} (with an AOF, so a
    stopped Redis comes back with its data), real clients over plain TCP.

    The tests wait on events: a client's notifications (L{Changes}), the
    gates' Redis connections going down and coming back, connections
    closing.  Only a gate's recovery after an outage is polled, within
    L{RECOVERY}: what it waits for (every gate using Redis again, the
    sessions registered again) is state in Redis and in the gates that
    announces nothing.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        self.changes = Changes()
        yield self.startRedis(appendfsync="always")
        secretFile = FilePath(self.mktemp())
        createSecretFile(secretFile)
        self.secretFile = secretFile
        self.secret = loadSecret(secretFile=secretFile, environ={})
        self.a = yield self.startGate("gate-a")
        self.b = yield self.startGate("gate-b")

    @inlineCallbacks
    def test_messageAcrossGates(self):
        """
        A message from a client on gate A to a client on gate B arrives,
        and a group message reaches members on both gates.
        """
        alice = yield self.connect(self.a, "alice")
        bob = yield self.connect(self.b, "bob")
        carol = yield self.connect(self.b, "carol")
        sent = yield alice.send("bob", b"hello", "m1")
        yield self.changes.until(
            lambda: self.messages(bob) and self.messages(alice),
            DEADLINE,
            "the message at bob and alice",
        )
        [entry] = self.messages(bob)
        self.assertEqual(
            (entry.message.sender, entry.message.body, entry.outgoing), ("alice", b"hello", False)
        )
        self.assertEqual(self.messages(alice)[0].seq, sent.seq)

        groups = self.a.factory.groups
        yield groups.create("team", "Team", "alice", int(time.time() * 1000))
        yield groups.setMembers(
            "team", [("bob", pb.ROLE_MEMBER), ("carol", pb.ROLE_MEMBER)], int(time.time() * 1000)
        )
        published = self.a.cluster.bus.published
        yield alice.send("", b"all", "m2", groupId="team")
        yield self.changes.until(
            lambda: (
                len(self.messages(bob)) == 2
                and self.messages(carol)
                and len(self.messages(alice)) == 2
            ),
            DEADLINE,
            "the group message at every member",
        )
        self.assertEqual(self.messages(carol)[0].message.body, b"all")
        self.assertEqual(self.a.cluster.bus.published - published, 1)

    @inlineCallbacks
    def test_metrics(self):
        """
        C{/metrics} of a gate in cluster mode has the Redis connection's
        command latencies and failures, the bus's batches and lag, the
        store's rollbacks and restarts, and the retention passes: one gate
        runs them, the other skips them.
        """
        alice = yield self.connect(self.a, "alice")
        bob = yield self.connect(self.b, "bob")
        yield alice.send("bob", b"hello", "m1")
        yield self.changes.until(lambda: self.messages(bob), DEADLINE, "the message at bob")

        def sample(gate, name, **labels):
            return gate.factory.metrics.registry.get_sample_value(name, labels or None)

        for gate in self.a, self.b:
            self.assertEqual(sample(gate, "imserver_redis_connected"), 1)
            self.assertEqual(sample(gate, "imserver_bus_subscribed"), 1)
            self.assertEqual(sample(gate, "imserver_store_rollbacks_total"), 0)
            self.assertEqual(sample(gate, "imserver_bus_retry_batches"), 0)
            self.assertGreaterEqual(
                sample(gate, "imserver_redis_command_seconds_count", command="registry.register"),
                1,
            )
        self.assertEqual(
            sample(self.a, "imserver_redis_command_seconds_count", command="store.deliver"), 1
        )
        self.assertGreaterEqual(sample(self.a, "imserver_bus_published_total"), 1)
        self.assertGreaterEqual(sample(self.b, "imserver_bus_received_total"), 1)
        self.assertGreaterEqual(sample(self.b, "imserver_bus_lag_seconds_count"), 1)
        self.assertEqual(
            sample(self.a, "imserver_redis_command_errors_total", command="PING", kind="error"),
            None,
        )
        served = servedMetrics(self.a.factory.metrics.registry)
        self.assertEqual(served - documentedMetrics(), set(), "served, not in docs/api.md")
        # Served only with --webhook, --before-send, --web:
        optional = {m for m in documentedMetrics() if m.startswith("imserver_webhook_")}
        optional |= {
            "imserver_before_send_pending",
            "imserver_web_http_connections",
            "imserver_websocket_upgrades_refused",
            # Redis Cluster only:
            "imserver_redis_redirections",
            "imserver_redis_slot_map_reads",
        }
        self.assertEqual(
            documentedMetrics() - optional - served, set(), "in docs/api.md, not served"
        )
        runs = [
            sample(g, "imserver_retention_passes_total", result="run") for g in (self.a, self.b)
        ]
        self.assertEqual(sorted(runs), [0, 1])
        skipped = [
            sample(g, "imserver_retention_passes_total", result="skipped") for g in (self.a, self.b)
        ]
        self.assertEqual(sorted(skipped), [0, 1])

    @inlineCallbacks
    def test_broadcastEveryGate(self):
        """
        A broadcast through one gate reaches every session of every gate
        once: gate A writes it to its own, the others get it through the
        bus; the answer counts A's sessions and the gates reached.
        """
        c = yield self.startGate("gate-c")
        clients = [
            (yield self.connect(self.a, "alice")),
            (yield self.connect(self.b, "bob")),
            (yield self.connect(self.b, "bob", "laptop")),
            (yield self.connect(c, "carol")),
        ]

        def notices(client):
            return [m.body for name, m in client.notified if name == "notice"]

        answer = yield self.a.factory.broadcastAll(b"maintenance", "text/plain")
        self.assertEqual(answer, (1, 3))
        yield self.changes.until(
            lambda: all(notices(client) for client in clients),
            DEADLINE,
            "the notice at every session",
        )
        # A second broadcast from another gate, then a round trip to each
        # gate: had anything come twice, it would be here by now.
        answer = yield c.factory.broadcastAll(b"again", "text/plain")
        self.assertEqual(answer, (1, 3))
        yield self.changes.until(
            lambda: all(len(notices(client)) == 2 for client in clients),
            DEADLINE,
            "the second notice at every session",
        )
        for client in clients:
            yield client.ping()
        for client in clients:
            self.assertEqual(notices(client), [b"maintenance", b"again"])

    @inlineCallbacks
    def test_broadcastRedisDown(self):
        """
        While Redis is unavailable a broadcast fails with
        L{RedisUnavailable} (the API's C{503 UNAVAILABLE}) and no session
        gets it, not even on the gate asked.
        """
        alice = yield self.connect(self.a, "alice")
        lost = whenDisconnected(self.a.cluster.connection)
        yield self.server.kill()
        yield lost
        yield self.assertFailure(
            self.a.factory.broadcastAll(b"maintenance", "text/plain"), RedisUnavailable
        )
        self.assertEqual([m for name, m in alice.notified if name == "notice"], [])

    @inlineCallbacks
    def test_kickAcrossGates(self):
        """
        The same uid and device logging in on gate B kicks the session on
        gate A with C{REPLACED}; the registry then knows only the new one.
        """
        old = yield self.connect(self.a, "alice")
        new = yield self.connect(self.b, "alice")
        reason = yield old.whenClosed()
        self.assertIsNotNone(old.kicked, reason)
        self.assertEqual(old.kicked.reason, pb.REPLACED)
        yield self.a.watch.whenAllClosed()
        [session] = yield self.a.factory.registry.sessionsFor("alice")
        self.assertIsInstance(session, RemoteSession)
        self.assertEqual((session.gateId, session.sessionId), ("gate-b", new.session.session_id))
        yield new.ping()
        self.assertIsNone(new.kicked)

    @inlineCallbacks
    def test_webSocketAcrossGates(self):
        """
        A WebSocket session on gate C gets a message sent on gate B, and is
        kicked (C{REPLACED}) when its uid and device sign in on gate B.
        """
        c = yield self.startGate("gate-c", "--web", "tcp:0:interface=127.0.0.1")
        webPort = (yield c.web.whenListening()).getHost().port
        browser = yield connectWS(webPort, [JSON])
        self.addCleanup(lambda: browser.closed)
        response = yield browser.call(
            "auth",
            {
                "uid": "alice",
                "token": mintToken(self.secret, "alice", 60, time.time()),
                "deviceId": "web",
            },
        )
        self.assertNotIn("error", response)
        bob = yield self.connect(self.b, "bob")
        yield bob.send("alice", b"via redis", "w1")
        push = yield browser.nextNotify("message", timeout=DEADLINE)
        self.assertEqual(push["body"]["message"]["sender"], "bob")
        yield self.connect(self.b, "alice", deviceId="web")
        kicked = yield browser.nextNotify("kicked", timeout=DEADLINE)
        self.assertEqual(kicked["body"]["reason"], "REPLACED")
        code = yield browser.closed
        self.assertEqual(code, 1000)

    @inlineCallbacks
    def waitForRedis(self, gates, event):
        """
        Wait until every gate's command connection saw C{event}
        (C{"down"} or C{"up"}).
        """
        for gate in gates:
            connection = gate.cluster.connection
            if event == "up":
                yield whenConnected(connection)
            else:
                yield whenDisconnected(connection)

    @inlineCallbacks
    def outage(self, restart, downFor=0):
        """
        Clients on both gates; Redis goes away: sends and new logins answer
        C{UNAVAILABLE}, connections and heartbeats stay.  Redis comes back
        (by C{restart}): within L{RECOVERY} seconds a send (retried with the
        same id) works and reaches the other gate, and both sessions are
        registered again.  The retries and the check of the registrations
        poll (every L{RETRY_INTERVAL}) once both gates are connected again:
        nothing announces when a gate uses Redis again.

        @return: the seconds it took.
        """
        alice = yield self.connect(self.a, "alice")
        bob = yield self.connect(self.b, "bob")
        yield alice.send("bob", b"before", "m1")
        yield self.changes.until(lambda: self.messages(bob), DEADLINE, "the message at bob")
        yield self.server.stop()
        yield self.waitForRedis([self.a, self.b], "down")

        failure = yield self.assertFailure(alice.send("bob", b"during", "m2"), RemoteError)
        self.assertEqual(failure.code, pb.UNAVAILABLE)
        failure = yield self.assertFailure(self.connect(self.b, "carol"), RemoteError)
        self.assertEqual(failure.code, pb.UNAVAILABLE)
        yield alice.ping()
        yield bob.ping()
        self.assertTrue(alice.connected and bob.connected)
        if downFor:
            # Long enough for the reconnect backoff to reach its cap.
            yield deferLater(reactor, downFor, lambda: None)
            yield alice.ping()
            self.assertTrue(alice.connected and bob.connected)

        yield restart()
        started = reactor.seconds()
        yield withDeadline(
            self.waitForRedis([self.a, self.b], "up"),
            RECOVERY,
            "both gates connected to Redis again",
        )
        while True:
            try:
                yield alice.send("bob", b"during", "m2")
                break
            except RemoteError as e:
                self.assertEqual(e.code, pb.UNAVAILABLE)
                self.assertLess(reactor.seconds() - started, RECOVERY)
                yield deferLater(reactor, RETRY_INTERVAL, lambda: None)
        yield self.changes.until(
            lambda: len(self.messages(bob)) == 2,
            max(0.1, RECOVERY - (reactor.seconds() - started)),
            "the message sent after the outage at bob",
        )
        self.assertEqual(self.messages(bob)[1].message.body, b"during")

        @inlineCallbacks
        def registered():
            while True:
                try:
                    found = yield self.a.factory.registry.sessionsForMany(["alice", "bob"])
                except RedisUnavailable:
                    found = {}
                if [s.sessionId for s in found.get("alice", [])] == [alice.session.session_id] and [
                    s.sessionId for s in found.get("bob", [])
                ] == [bob.session.session_id]:
                    return
                self.assertLess(reactor.seconds() - started, RECOVERY)
                yield deferLater(reactor, RETRY_INTERVAL, lambda: None)

        yield registered()
        took = reactor.seconds() - started
        yield alice.ping()
        self.assertEqual(self.a.watch.built[0].session.uid, "alice")
        self.assertEqual(len(self.a.watch.built), 1)
        # Cursor flushes and the like, refused while Redis was away.
        self.flushLoggedErrors(RedisUnavailable)
        return took

    @inlineCallbacks
    def test_redisRestarts(self):
        """
        Redis stops and comes back with its data: the gates carry on.
        """
        yield self.outage(self.server.start)

    @inlineCallbacks
    def test_longOutage(self):
        """
        After a longer outage (the reconnect backoff at its cap) the gates
        are whole again within L{RECOVERY} seconds too.
        """
        took = yield self.outage(self.server.start, downFor=6)
        self.assertLess(took, RECOVERY)

    @inlineCallbacks
    def test_redisWiped(self):
        """
        Redis comes back empty: the gates register their sessions again
        and carry on (messages are stored afresh).
        """

        @inlineCallbacks
        def wipeAndStart():
            yield self.server.wipe()
            yield self.server.start()

        yield self.outage(wipeAndStart)

    @inlineCallbacks
    def test_directory(self):
        """
        The gate directory lists both gates, and forgets one that stops.
        """
        directory = self.a.cluster.directory
        gates = yield directory.gates()
        self.assertEqual(
            gates,
            {
                "gate-a": [("127.0.0.1", self.a.port, False)],
                "gate-b": [("127.0.0.1", self.b.port, False)],
            },
        )
        yield self.b.root.stopService()
        gates = yield directory.gates()
        self.assertEqual(list(gates), ["gate-a"])

    @inlineCallbacks
    def test_stop(self):
        """
        A gate that stops drains its clients, withdraws its lease and
        unregisters its sessions: the other gate sees none of them.
        """
        alice = yield self.connect(self.a, "alice")
        yield self.a.root.stopService()
        yield alice.whenClosed()
        self.assertEqual((yield self.b.factory.registry.sessionsFor("alice")), [])
        lease = yield self.b.cluster.connection.execute("EXISTS", "im:gate:gate-a")
        self.assertEqual(lease, 0)
        self.assertFalse(self.a.cluster.connection.connected)


class RedisClusterGatesTests(GatesMixin, TestCase):
    """
    Three gates on a real six-node Redis Cluster (three primaries, three
    replicas), users whose keys are on each of the three primaries, real
    clients over plain TCP.
    """

    timeout = 90

    @inlineCallbacks
    def setUp(self):
        from tests.support.rediscluster import RedisCluster

        self.changes = Changes()
        self.server = RedisCluster(self, reactor)
        yield self.server.start()
        secretFile = FilePath(self.mktemp())
        createSecretFile(secretFile)
        self.secretFile = secretFile
        self.secret = loadSecret(secretFile=secretFile, environ={})
        self.gates = []
        for name in "gate-a", "gate-b", "gate-c":
            self.gates.append((yield self.startGate(name)))
        infos = yield self.server.clusterNodes(self.server.nodes[0])
        self.primaries = [info.slots for info in infos if "master" in info.flags and info.slots]
        self.assertEqual(len(self.primaries), 3)

    @inlineCallbacks
    def test_acrossShardsAndGates(self):
        """
        1:1 messages between users on different gates whose keys are on
        different primaries arrive once, in order; a group message whose
        members are spread over the three primaries and three gates reaches
        every member once; a broadcast reaches every session; a login on
        another gate kicks the older session.
        """
        (a1, a2), (b1, b2), (c1, c2) = usersOnPrimaries(self.primaries, 2)
        ga, gb, gc = self.gates
        clients = {}
        for uid, gate in [(a1, ga), (b1, gb), (c1, gc), (a2, gb), (b2, gc), (c2, ga)]:
            clients[uid] = yield self.connect(gate, uid)
        for n in range(5):
            yield clients[a1].send(b1, b"1:1 %d" % (n,), "m%d" % (n,))
            yield clients[b2].send(c2, b"back %d" % (n,), "n%d" % (n,))
        yield self.changes.until(
            lambda: len(self.messages(clients[b1])) == 5 and len(self.messages(clients[c2])) == 5,
            DEADLINE,
            "the 1:1 messages",
        )
        self.assertEqual(
            [e.message.body for e in self.messages(clients[b1])],
            [b"1:1 %d" % (n,) for n in range(5)],
        )
        seqs = [e.seq for e in self.messages(clients[c2])]
        self.assertEqual(seqs, sorted(set(seqs)))

        nowMs = int(time.time() * 1000)
        groups = ga.factory.groups
        yield groups.create("team", "Team", a1, nowMs)
        others = [b1, c1, a2, b2, c2]
        yield groups.setMembers("team", [(uid, pb.ROLE_MEMBER) for uid in others], nowMs)
        yield clients[c1].send("", b"everyone", "g1", groupId="team")

        def everyone():
            return all(
                [e.message.body for e in self.messages(clients[uid])].count(b"everyone") == 1
                for uid in [a1] + others
            )

        yield self.changes.until(everyone, DEADLINE, "the group message at every member")

        answer = yield gb.factory.broadcastAll(b"maintenance", "text/plain")
        self.assertEqual(answer, (2, 3))
        registry = ga.factory.metrics.registry
        self.assertGreaterEqual(registry.get_sample_value("imserver_redis_slot_map_reads_total"), 1)
        self.assertEqual(
            registry.get_sample_value("imserver_redis_redirections_total", {"kind": "moved"}), 0
        )
        served = servedMetrics(registry)
        self.assertEqual(served - documentedMetrics(), set(), "served, not in docs/api.md")
        yield self.changes.until(
            lambda: all(
                any(name == "notice" for name, _ in client.notified) for client in clients.values()
            ),
            DEADLINE,
            "the broadcast at every session",
        )

        newer = yield self.connect(gc, a1)
        reason = yield clients[a1].whenClosed()
        self.assertEqual(clients[a1].kicked.reason, pb.REPLACED, reason)
        yield newer.ping()
        # Nothing came twice meanwhile.
        self.assertTrue(everyone())

    @inlineCallbacks
    def test_rawClient(self):
        """
        A client written from docs/protocol.md alone (not ours), on a third
        gate, pipelining a ping behind its auth (refused: not signed in
        yet, as docs/protocol.md says): it gets a 1:1 message from a
        user of another gate and primary, a group message, and a broadcast
        made on another gate, each once; it acks late, after all of them,
        and its ack is taken (the device's cursor).
        """
        (a1,), (b1,), (c1,) = usersOnPrimaries(self.primaries, 1)
        ga, gb, gc = self.gates
        sender = yield self.connect(ga, a1)
        token = mintToken(self.secret, b1, 60, time.time())
        raw = yield connectRaw(self, gc.port)
        raw.onFrame = self.changes.changed
        raw.send(1, "auth", pb.AuthRequest(uid=b1, token=token, device_id="raw"))
        raw.send(2, "ping", pb.PingRequest())
        answers = yield raw.responses(2)
        # The ping came before the auth succeeded: refused, as documented.
        self.assertEqual(
            sorted((f.seq, f.error.code) for f in answers), [(1, 0), (2, pb.NOT_AUTHENTICATED)]
        )
        yield sender.send(b1, b"direct", "m1")
        nowMs = int(time.time() * 1000)
        yield ga.factory.groups.create("team", "Team", a1, nowMs)
        yield ga.factory.groups.setMembers(
            "team", [(b1, pb.ROLE_MEMBER), (c1, pb.ROLE_MEMBER)], nowMs
        )
        yield sender.send("", b"to the team", "g1", groupId="team")
        yield gb.factory.broadcastAll(b"maintenance", "text/plain")
        yield self.changes.until(
            lambda: len(raw.notifications("message")) >= 2 and raw.notifications("notice"),
            DEADLINE,
            "the pushes at the raw client",
        )
        entries = [pb.InboxEntry.FromString(body) for body in raw.notifications("message")]
        self.assertEqual([e.message.body for e in entries], [b"direct", b"to the team"])
        self.assertLess(entries[0].seq, entries[1].seq)
        [notice] = [pb.Notice.FromString(body) for body in raw.notifications("notice")]
        self.assertEqual((notice.body, notice.content_type), (b"maintenance", "text/plain"))
        raw.notify("ack", pb.Ack(seq=entries[1].seq))
        raw.send(3, "ping", pb.PingRequest())
        pong = (yield raw.responses(3))[2]
        self.assertFalse(pong.HasField("error"))
        self.assertEqual([f for f in raw.frames if f.kind == pb.ERROR], [])
        yield gc.factory.flushCursors()
        self.assertEqual((yield gc.factory.store.cursor(b1, "raw")), entries[1].seq)
        self.assertEqual(len(raw.notifications("message")), 2)

    @inlineCallbacks
    def test_failover(self):
        """
        A primary killed (SIGKILL) with its replica promoted: sends to the
        users whose keys it held answer C{UNAVAILABLE} while nobody serves
        their slot, the clients stay connected, and once the replica is
        promoted the same sends (retried with the same ids) are stored and
        delivered, by themselves.
        """
        from imserver.redisclient import userTag
        from imserver.rediscluster import keySlot

        (a1,), (b1,), (c1,) = usersOnPrimaries(self.primaries, 1)
        ga, gb, gc = self.gates
        sender = yield self.connect(ga, a1)
        receiver = yield self.connect(gb, b1)
        yield sender.send(b1, b"before", "m0")
        yield self.changes.until(lambda: self.messages(receiver), DEADLINE, "the first message")
        slot = keySlot("{" + userTag(b1) + "}")
        yield self.server.killPrimaryOf(slot)
        failure = yield self.assertFailure(sender.send(b1, b"during", "m1"), RemoteError)
        self.assertEqual(failure.code, pb.UNAVAILABLE)
        yield self.server.waitForFailover(slot)
        # Each gate's cluster connection is back once its slot map names
        # the promoted replica and it is connected to it.
        for gate in self.gates:
            yield withDeadline(whenConnected(gate.cluster.connection), 20, "the slot map")
        yield sender.send(b1, b"during", "m1")
        yield self.changes.until(
            lambda: [e.message.body for e in self.messages(receiver)] == [b"before", b"during"],
            20,
            "the message sent during the failover",
        )
        self.assertIsNone(sender.kicked)
        yield sender.ping()
        yield receiver.ping()

    @inlineCallbacks
    def test_reshardRange(self):
        """
        A range of slots resharded by C{redis-cli --cluster reshard} from
        one primary to another while messages flow between users whose
        keys are in that range and users elsewhere, across gates; senders
        retry C{UNAVAILABLE} with the same id, as clients do.  Every
        message arrives once, in order, with rising seqs; the slots end on
        the target, and the traffic met the move (a C{MOVED} or C{ASK}
        redirection, a new read of the slot map, or a send refused during
        the migration and retried: which ones depends on the timing).
        """
        from imserver.store.redis.keys import userSlot

        infos = yield self.server.clusterNodes(self.server.nodes[0])
        owners = {info.port: info for info in infos if "master" in info.flags and info.slots}
        source = yield self.server.ownerOf(0)
        target = next(node for node in self.server.nodes[:3] if node is not source)
        count = RESHARD_SLOTS
        moved = range(owners[source.port].slots[0][0], owners[source.port].slots[0][0] + count)
        inRange, elsewhere, n = [], [], 0
        while len(inRange) < 3 or len(elsewhere) < 3:
            uid = "r%d" % (n,)
            (inRange if userSlot(uid) in moved else elsewhere).append(uid)
            n += 1
        pairs = [
            (elsewhere[0], inRange[0]),
            (inRange[1], elsewhere[1]),
            (inRange[2], inRange[0]),
            (elsewhere[2], inRange[1]),
        ]
        clients = {}
        for i, uid in enumerate(inRange[:3] + elsewhere[:3]):
            clients[uid] = yield self.connect(self.gates[i % 3], uid)
        sent = {pair: 0 for pair in pairs}
        unavailable = []
        refreshesBefore = sum(gate.cluster.connection.refreshes for gate in self.gates)
        resharding = self.server.run(
            [
                "--cluster",
                "reshard",
                "127.0.0.1:{}".format(source.port),
                "--cluster-from",
                source.nodeId,
                "--cluster-to",
                target.nodeId,
                "--cluster-slots",
                count,
                "--cluster-yes",
            ]
        )
        done = []
        resharding.addBoth(done.append)

        @inlineCallbacks
        def sendUntilDone(pair):
            sender, recipient = pair
            while (not done or sent[pair] < 20) and sent[pair] < RESHARD_MAX_SENDS:
                body = b"%s>%s %d" % (sender.encode(), recipient.encode(), sent[pair])
                msgId = "%s-%d" % (recipient, sent[pair])
                try:
                    yield clients[sender].send(recipient, body, msgId)
                except RemoteError as e:
                    # UNAVAILABLE during a slot's migration; RATE_LIMITED
                    # past --request-rate: both retried after a pause.
                    self.assertIn(e.code, (pb.UNAVAILABLE, pb.RATE_LIMITED), e)
                    unavailable.append(e)
                    yield deferLater(reactor, 0.1, lambda: None)
                    continue
                sent[pair] += 1

        yield gatherResults([sendUntilDone(pair) for pair in pairs], consumeErrors=True)
        # redis-cli's output, or its Failure.
        self.assertIsInstance(done[0], str)
        for slot in (moved[0], moved[-1]):
            self.assertIs((yield self.server.ownerOf(slot)), target)

        def received(recipient, sender):
            prefix = sender.encode() + b">"
            return [
                e for e in self.messages(clients[recipient]) if e.message.body.startswith(prefix)
            ]

        yield self.changes.until(
            lambda: all(len(received(r, s)) >= sent[(s, r)] for s, r in pairs),
            DEADLINE,
            "every message",
        )
        for sender, recipient in pairs:
            bodies = [e.message.body for e in received(recipient, sender)]
            self.assertEqual(
                bodies,
                [
                    b"%s>%s %d" % (sender.encode(), recipient.encode(), k)
                    for k in range(sent[(sender, recipient)])
                ],
            )
        for uid, client in clients.items():
            seqs = [e.seq for e in self.messages(client)]
            self.assertEqual(seqs, sorted(set(seqs)), uid)
        redirections = {"MOVED": 0, "ASK": 0}
        for gate in self.gates:
            for kind, n in gate.cluster.connection.redirections.items():
                redirections[kind] += n
        refreshes = sum(gate.cluster.connection.refreshes for gate in self.gates) - refreshesBefore
        self.assertGreaterEqual(
            redirections["MOVED"] + redirections["ASK"] + max(0, refreshes) + len(unavailable),
            1,
            (redirections, refreshes, len(unavailable)),
        )

    @inlineCallbacks
    def test_reshard(self):
        """
        The slot of a recipient's keys moved to another primary while the
        gates run (migration begun, its keys moved, then handed over): a
        send during the migration is stored (through C{ASK}) or answers
        C{UNAVAILABLE} (C{TRYAGAIN}) and is stored by its retry; after it
        the gates follow C{MOVED}; every message arrives once, in order.
        """
        from imserver.redisclient import userTag
        from imserver.rediscluster import keySlot

        (a1,), (b1,), _ = usersOnPrimaries(self.primaries, 1)
        ga, gb, _ = self.gates
        sender = yield self.connect(ga, a1)
        receiver = yield self.connect(gb, b1)
        for n in range(3):
            yield sender.send(b1, b"m%d" % (n,), "m%d" % (n,))
        slot = keySlot("{" + userTag(b1) + "}")
        source = yield self.server.ownerOf(slot)
        primaries = [node for node in self.server.nodes[:3] if node is not source]
        target = primaries[0]
        yield self.server.beginMigration(slot, source, target)
        yield self.server.moveKeys(slot, source, target)
        pending = []
        try:
            yield sender.send(b1, b"m3", "m3")
        except RemoteError as e:
            self.assertEqual(e.code, pb.UNAVAILABLE)
            pending.append(e)
        yield self.server.endMigration(slot, target)
        if pending:
            yield sender.send(b1, b"m3", "m3")
        for n in range(4, 6):
            yield sender.send(b1, b"m%d" % (n,), "m%d" % (n,))
        yield self.changes.until(
            lambda: len(self.messages(receiver)) >= 6, DEADLINE, "the six messages"
        )
        yield receiver.ping()
        self.assertEqual(
            [e.message.body for e in self.messages(receiver)], [b"m%d" % (n,) for n in range(6)]
        )
        redirections = ga.cluster.connection.redirections
        self.assertGreaterEqual(redirections["MOVED"] + redirections["ASK"], 1)
