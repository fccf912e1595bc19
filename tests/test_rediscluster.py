# -*- test-case-name: tests.test_rediscluster -*-
"""
Tests for L{imserver.rediscluster}: slots, key positions and URLs; the
routing, redirections and failover logic against a fake cluster on a
L{Clock}; and the whole against a real Redis Cluster
(L{tests.support.rediscluster.RedisCluster}).
"""

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txredisapi import ResponseError

from imserver.redisclient import CommandStats, RedisUnavailable, RedisURL
from imserver.rediscluster import (
    DEGRADED_REFRESH_INTERVAL,
    MAX_REDIRECTIONS,
    MIN_REFRESH_INTERVAL,
    ClusterConnection,
    ClusterURL,
    CrossSlotError,
    _RoundRobinEndpoint,
    commandKeys,
    commandSlot,
    connectCluster,
    crc16,
    keySlot,
    parseRedisURL,
    subscribeCluster,
)

from tests.support.live import Changes, withDeadline
from tests.support.redis import whenConnected, whenDisconnected, whenSubscribed
from tests.support.rediscluster import RedisCluster


class SlotTests(SynchronousTestCase):
    """
    L{crc16} and L{keySlot}.
    """

    def test_crc16(self):
        """
        The test vector of the Redis Cluster specification.
        """
        self.assertEqual(crc16(b"123456789"), 0x31C3)

    def test_slots(self):
        """
        The slots Redis itself gives (C{CLUSTER KEYSLOT}); text and bytes
        alike.
        """
        self.assertEqual(keySlot("foo"), 12182)
        self.assertEqual(keySlot(b"foo"), 12182)
        self.assertEqual(keySlot("{a}x"), 15495)
        self.assertEqual(keySlot(""), 0)

    def test_hashTags(self):
        """
        Only the hash tag is hashed: after the first left brace, up to the
        first right brace after it, if that is not empty.
        """
        self.assertEqual(keySlot("{user1000}.following"), keySlot("user1000"))
        self.assertEqual(keySlot("{user1000}.followers"), keySlot("user1000"))
        self.assertEqual(keySlot("foo{}{bar}"), crc16(b"foo{}{bar}") % 16384)
        self.assertEqual(keySlot("foo{{bar}}zap"), keySlot("{bar"))
        self.assertEqual(keySlot("foo{bar}{zap}"), keySlot("bar"))
        self.assertEqual(keySlot("foo{bar"), crc16(b"foo{bar") % 16384)
        self.assertEqual(keySlot("im:{u:61}:inbox"), keySlot("im:{u:61}:head"))


class CommandKeyTests(SynchronousTestCase):
    """
    L{commandKeys} and L{commandSlot}.
    """

    def test_firstArgument(self):
        """
        The single-key commands have their key first.
        """
        for name in ["GET", "SET", "HSET", "HGETALL", "ZADD", "XADD", "XDEL", "EXPIRE", "INCR"]:
            self.assertEqual(commandKeys([name, "k", "v"]), ["k"])

    def test_scripts(self):
        """
        The keys of C{EVAL} and C{EVALSHA} follow their count.
        """
        self.assertEqual(commandKeys(["EVALSHA", "abc", 2, "a", "b", "arg"]), ["a", "b"])
        self.assertEqual(commandKeys(["eval", b"return 1", "0", "arg"]), [])

    def test_multiKey(self):
        """
        C{MGET} and C{DEL}: every argument; C{MSET}: every other one.
        """
        self.assertEqual(commandKeys(["MGET", "a", "b"]), ["a", "b"])
        self.assertEqual(commandKeys(["DEL", "a", "b"]), ["a", "b"])
        self.assertEqual(commandKeys(["MSET", "a", 1, "b", 2]), ["a", "b"])

    def test_keyless(self):
        """
        C{PUBLISH}, C{PING}, C{INFO} and the per-node C{SCAN} and C{SCRIPT}
        have no key.
        """
        for command in [
            ["PUBLISH", "ch", "m"],
            ["PING"],
            ["INFO", "server"],
            ["SCAN", "0"],
            ["SCRIPT", "LOAD", "x"],
        ]:
            self.assertIsNone(commandSlot(command))

    def test_crossSlot(self):
        """
        Keys of several slots are refused, naming C{CROSSSLOT}; one hash tag
        puts them in one slot.
        """
        error = self.assertRaises(CrossSlotError, commandSlot, ["MGET", "a", "b"])
        self.assertIn("CROSSSLOT", str(error))
        self.assertIsInstance(error, ResponseError)
        self.assertRaises(CrossSlotError, commandSlot, ["EVALSHA", "x", 2, "a", "b"])
        self.assertEqual(commandSlot(["MGET", "{t}a", "{t}b"]), keySlot("t"))


class URLTests(SynchronousTestCase):
    """
    L{parseRedisURL}.
    """

    def test_cluster(self):
        """
        Several seeds, credentials for every node, TLS.
        """
        url = parseRedisURL("rediss://gate:p%40ss@h1:7001,h2,[::1]:7003/0?cluster=yes")
        self.assertEqual(
            url,
            ClusterURL(
                seeds=(("h1", 7001), ("h2", 6379), ("::1", 7003)),
                username="gate",
                password="p@ss",
                tls=True,
            ),
        )
        self.assertEqual(url.node("h9", 1), RedisURL("h9", 1, 0, "gate", "p@ss", True))

    def test_oneSeed(self):
        """
        One seed and no database: a cluster too.
        """
        url = parseRedisURL("redis://:secret@h?cluster=yes")
        self.assertEqual((url.seeds, url.username, url.password), ((("h", 6379),), None, "secret"))

    def test_strHidesPassword(self):
        """
        The text form, which goes to logs, never shows the password.
        """
        text = str(parseRedisURL("redis://u:secret@h1:1,h2:2/0?cluster=yes"))
        self.assertEqual(text, "redis://u@h1:1,h2:2/0?cluster=yes")

    def test_single(self):
        """
        Without C{cluster=yes}: a L{RedisURL}, as L{RedisURL.parse} gives.
        """
        self.assertEqual(parseRedisURL("redis://h:1/2"), RedisURL.parse("redis://h:1/2"))
        self.assertEqual(parseRedisURL("redis://h:1/2?cluster=no"), RedisURL("h", 1, 2))

    def test_invalid(self):
        """
        A database other than 0, unknown parameters, several hosts without
        C{cluster=yes}, bad ports, no host.
        """
        for text in [
            "redis://h1:1,h2:2/3?cluster=yes",
            "redis://h1:1/x?cluster=yes",
            "redis://h1:1/0?cluster=yes&timeout=1",
            "redis://h1:1/0?cluster=yes&cluster=yes",
            "redis://h1:1/0?cluster=maybe",
            "redis://h1:1/0?cluster",
            "redis://h1:1,h2:2/0",
            "redis://h1:x/0?cluster=yes",
            "redis://h1:1,,h2/0?cluster=yes",
            "redis:///0?cluster=yes",
            "http://h1/0?cluster=yes",
        ]:
            self.assertRaises(ValueError, parseRedisURL, text)
        error = self.assertRaises(ValueError, parseRedisURL, "redis://h:1/3?cluster=yes")
        self.assertIn("database 0", str(error))


def _sha(source):
    return hashlib.sha1(source).hexdigest()


class FakeNode:
    """
    A connection to a node of a L{FakeCluster}, with the interface of a
    L{imserver.redisclient.RedisConnection}; it comes up at the next turn
    of the clock if its node is alive.

    @ivar sent: every command it sent.
    """

    def __init__(self, cluster, address):
        self.cluster = cluster
        self.address = address
        self.url = RedisURL(*address)
        self.connected = False
        self.closed = False
        self.onConnect = []
        self.onDisconnect = []
        self.sent = []
        self._asking = False
        cluster.clock.callLater(0, self.up)

    def up(self):
        if not self.closed and self.address in self.cluster.alive and not self.connected:
            self.connected = True
            for callback in list(self.onConnect):
                callback()

    def down(self):
        if self.connected:
            self.connected = False
            for callback in list(self.onDisconnect):
                callback()

    def disconnect(self):
        self.closed = True
        self.onConnect, self.onDisconnect = [], []
        self.connected = False
        return succeed(None)

    def execute(self, *command, label=None):
        if not self.connected:
            return fail(RedisUnavailable("not connected"))
        self.sent.append(command)
        try:
            return succeed(self.cluster.run(self, command))
        except Exception:
            return fail()


class FakeCluster:
    """
    The truth a L{ClusterConnection} sees through L{FakeNode}s: which node
    serves which slot, the keys and scripts of each node, a migration.

    @ivar nodes: the last L{FakeNode} made for each address.
    """

    def __init__(self, clock, ranges):
        """
        @param ranges: C{(host, port)} -> list of C{(first, last)} slots.
        """
        self.clock = clock
        self.ranges = ranges
        self.alive = set(ranges)
        self.data = {address: {} for address in ranges}
        self.scripts = {address: set() for address in ranges}
        self.migrating = {}
        self.nodes = {}

    def connect(self, host, port):
        node = self.nodes[(host, port)] = FakeNode(self, (host, port))
        self.data.setdefault((host, port), {})
        self.scripts.setdefault((host, port), set())
        return node

    def kill(self, address):
        self.alive.discard(address)
        if address in self.nodes:
            self.nodes[address].down()

    def owner(self, slot):
        for address, ranges in self.ranges.items():
            if any(first <= slot <= last for first, last in ranges):
                return address
        return None

    def run(self, node, command):
        name = command[0].upper()
        data = self.data[node.address]
        if name == "ASKING":
            node._asking = True
            return "OK"
        asking, node._asking = node._asking, False
        if name == "CLUSTER":
            return [
                [first, last, [address[0].encode(), address[1], b"id"]]
                for address, ranges in sorted(self.ranges.items())
                for first, last in ranges
            ]
        if name in ("PING", "PUBLISH"):
            return "PONG" if name == "PING" else 0
        if name == "SCRIPT":
            self.scripts[node.address].add(_sha(command[2]))
            return _sha(command[2])
        if name == "SCAN":
            keys, start = sorted(data), int(command[1])
            return [b"%d" % (start + 2) if start + 2 < len(keys) else b"0", keys[start : start + 2]]
        slot = commandSlot(command)
        key = commandKeys(command)[0]
        owner = self.owner(slot)
        if owner != node.address:
            if not (asking and self.migrating.get(slot) == node.address):
                raise ResponseError("MOVED %d %s:%d" % (slot, owner[0], owner[1]))
        elif slot in self.migrating and key not in data:
            target = self.migrating[slot]
            raise ResponseError("ASK %d %s:%d" % (slot, target[0], target[1]))
        if name == "GET":
            return data.get(key)
        if name == "SET":
            data[key] = command[2]
            return "OK"
        if name == "EVAL":
            self.scripts[node.address].add(_sha(command[1]))
        elif command[1] not in self.scripts[node.address]:
            raise ResponseError("NOSCRIPT No matching script.")
        return node.address[1]


A, B, C, D = (("127.0.0.1", port) for port in (7001, 7002, 7003, 7004))


def keyOn(cluster, address):
    """
    A key whose slot C{address} serves in C{cluster}.
    """
    n = 0
    while cluster.owner(keySlot("k%d" % (n,))) != address:
        n += 1
    return "k%d" % (n,)


class FakeClusterTests(SynchronousTestCase):
    """
    L{ClusterConnection} against a L{FakeCluster} on a L{Clock}.
    """

    def setUp(self):
        self.clock = Clock()
        self.fake = FakeCluster(
            self.clock, {A: [(0, 5460)], B: [(5461, 10922)], C: [(10923, 16383)]}
        )
        url = ClusterURL(seeds=(A, D))
        self.fake.alive.add(D)  # a seed that is not a primary (a replica)
        self.cluster = ClusterConnection(self.clock, url, self.fake.connect)
        self.events = []
        self.cluster.onConnect.append(lambda: self.events.append("connect"))
        self.cluster.onDisconnect.append(lambda: self.events.append("disconnect"))

    def connect(self):
        self.cluster.start()
        self.clock.advance(0)  # the seeds come up, A is asked for the map
        self.clock.advance(0)  # the primaries come up
        self.assertTrue(self.cluster.connected)

    def test_beforeTheMap(self):
        """
        Before the slot map is known a command fails at once with
        L{RedisUnavailable}.
        """
        self.failureResultOf(self.cluster.execute("GET", "k"), RedisUnavailable)
        self.cluster.start()
        self.failureResultOf(self.cluster.execute("GET", "k"), RedisUnavailable)
        self.assertEqual(self.events, [])

    def test_connect(self):
        """
        The map comes from a seed; a connection per primary; the seed that
        is no primary is closed; C{onConnect} once all are up.
        """
        self.connect()
        self.assertEqual(self.events, ["connect"])
        self.assertEqual(self.cluster.primaries, [A, B, C])
        self.assertEqual(self.cluster.refreshes, 1)
        self.assertTrue(self.fake.nodes[D].closed)
        self.assertEqual(self.fake.nodes[D].sent, [])
        self.assertEqual(self.fake.nodes[A].sent, [("CLUSTER", "SLOTS")])

    def test_routing(self):
        """
        A command goes to the primary of its key's slot.
        """
        self.connect()
        for address in (A, B, C):
            key = keyOn(self.fake, address)
            self.successResultOf(self.cluster.execute("SET", key, b"v"))
            self.assertEqual(self.fake.data[address], {key: b"v"})
            self.assertEqual(self.successResultOf(self.cluster.execute("GET", key)), b"v")
        self.assertEqual(self.cluster.redirections, {"MOVED": 0, "ASK": 0})

    def test_crossSlot(self):
        """
        A script with keys of two slots is refused, and nothing is sent.
        """
        self.connect()
        script = self.cluster.script(b"return 1")
        failure = self.failureResultOf(script(["a", "b"]), CrossSlotError)
        self.assertIn("CROSSSLOT", failure.getErrorMessage())
        self.assertEqual(sum(len(n.sent) for n in self.fake.nodes.values()), 1)

    def test_moved(self):
        """
        C{MOVED}: the slot is updated at once and the command runs on the
        new owner; later commands go there straight; one full read of the
        map follows, rate-limited.
        """
        self.connect()
        key = keyOn(self.fake, A)
        slot = keySlot(key)
        self.fake.ranges[A] = [(0, slot - 1), (slot + 1, 5460)]
        self.fake.ranges[B].append((slot, slot))
        self.fake.data[B][key] = b"moved"
        self.assertEqual(self.successResultOf(self.cluster.execute("GET", key)), b"moved")
        self.assertEqual(self.cluster.redirections, {"MOVED": 1, "ASK": 0})
        self.assertEqual(self.cluster.addressOf(slot), B)
        self.assertEqual(self.successResultOf(self.cluster.execute("GET", key)), b"moved")
        self.assertEqual(self.cluster.redirections["MOVED"], 1)
        self.assertEqual(len(self.fake.nodes[A].sent), 2)  # CLUSTER SLOTS, the first GET
        self.clock.advance(MIN_REFRESH_INTERVAL / 2)
        self.assertEqual(self.cluster.refreshes, 1)
        self.clock.advance(MIN_REFRESH_INTERVAL / 2)
        self.assertEqual(self.cluster.refreshes, 2)

    def test_refreshRateLimited(self):
        """
        A burst of C{MOVED}s reads the map once; a primary left without
        slots is closed.
        """
        self.connect()
        self.clock.advance(MIN_REFRESH_INTERVAL)
        keys = [k for k in ("x%d" % (n,) for n in range(99)) if keySlot(k) <= 5460][:3]
        self.fake.ranges = {B: [(0, 10922)], C: [(10923, 16383)]}
        for key in keys:
            self.successResultOf(self.cluster.execute("GET", key))
        self.assertEqual(self.cluster.redirections["MOVED"], 3)
        self.clock.advance(0)
        self.assertEqual(self.cluster.refreshes, 2)
        self.clock.advance(MIN_REFRESH_INTERVAL * 3)
        self.assertEqual(self.cluster.refreshes, 2)
        self.assertEqual(self.cluster.primaries, [B, C])
        self.assertTrue(self.fake.nodes[A].closed)

    def test_ask(self):
        """
        C{ASK}: C{ASKING} then the command on the target, the map
        unchanged.
        """
        self.connect()
        key = keyOn(self.fake, A)
        slot = keySlot(key)
        self.fake.migrating[slot] = B
        self.fake.data[B][key] = b"there"
        self.assertEqual(self.successResultOf(self.cluster.execute("GET", key)), b"there")
        self.assertEqual(self.cluster.redirections, {"MOVED": 0, "ASK": 1})
        self.assertEqual(self.fake.nodes[B].sent[-2:], [("ASKING",), ("GET", key)])
        self.assertEqual(self.cluster.addressOf(slot), A)
        self.clock.advance(MIN_REFRESH_INTERVAL)
        self.assertEqual(self.cluster.refreshes, 1)

    def test_movedSameHost(self):
        """
        A C{MOVED} without a host means the host of the node that answered.
        """
        self.connect()
        key = keyOn(self.fake, A)
        slot = keySlot(key)
        run = self.fake.run

        def moved(node, command):
            if node.address == A and command[0] == "GET":
                raise ResponseError("MOVED %d :7002" % (slot,))
            return run(node, command)

        self.fake.run = moved
        self.fake.ranges[A] = [(0, slot - 1), (slot + 1, 5460)]
        self.fake.ranges[B].append((slot, slot))
        self.successResultOf(self.cluster.execute("GET", key))
        self.assertEqual(self.cluster.addressOf(slot), B)
        self.assertEqual(self.fake.nodes[B].sent[-1], ("GET", key))

    def test_stats(self):
        """
        The L{CommandStats} given reach every node's connection, and count
        the commands refused before any node (C{CROSSSLOT}, no primary).
        """
        self.connect()
        stats = CommandStats(self.clock)
        self.cluster.stats = stats
        self.assertTrue(all(n.stats is stats for n in self.fake.nodes.values() if not n.closed))
        self.cluster.execute("MGET", "a", "b", label="m").addErrback(lambda _: None)
        self.fake.kill(A)
        self.cluster.execute("GET", keyOn(self.fake, A)).addErrback(lambda _: None)
        self.assertEqual(stats.errors, {("m", "error"): 1})

    def test_tooManyRedirections(self):
        """
        A command still redirected after L{MAX_REDIRECTIONS} fails with
        L{RedisUnavailable}.
        """
        self.connect()
        key = keyOn(self.fake, A)
        run = self.fake.run

        def bounce(node, command):
            if command[0] == "GET":
                other = B if node.address == A else A
                raise ResponseError("MOVED %d %s:%d" % (keySlot(key), other[0], other[1]))
            return run(node, command)

        self.fake.run = bounce
        failure = self.failureResultOf(self.cluster.execute("GET", key), RedisUnavailable)
        self.assertIn("redirections", failure.getErrorMessage())
        self.assertEqual(self.cluster.redirections["MOVED"], MAX_REDIRECTIONS)

    def test_failover(self):
        """
        A dead primary: its slots fail at once, the others work, the map is
        read every L{DEGRADED_REFRESH_INTERVAL}; once a replica is promoted
        it is used by itself, and the dead node is closed.
        """
        self.connect()
        onA, onB = keyOn(self.fake, A), keyOn(self.fake, B)
        self.fake.kill(A)
        self.assertFalse(self.cluster.connected)
        self.assertEqual(self.events, ["connect", "disconnect"])
        self.failureResultOf(self.cluster.execute("GET", onA), RedisUnavailable)
        self.successResultOf(self.cluster.execute("SET", onB, b"b"))
        self.clock.advance(0)
        refreshes = self.cluster.refreshes
        for _ in range(3):
            self.clock.advance(DEGRADED_REFRESH_INTERVAL)
        self.assertEqual(self.cluster.refreshes, refreshes + 3)
        self.fake.ranges[D] = self.fake.ranges.pop(A)
        self.clock.advance(DEGRADED_REFRESH_INTERVAL)
        self.clock.advance(0)
        self.assertTrue(self.cluster.connected)
        self.assertEqual(self.events, ["connect", "disconnect", "connect"])
        self.assertEqual(self.cluster.primaries, [B, C, D])
        self.assertTrue(self.fake.nodes[A].closed)
        self.successResultOf(self.cluster.execute("SET", onA, b"a"))
        self.assertEqual(self.fake.data[D], {onA: b"a"})
        refreshes = self.cluster.refreshes
        self.clock.advance(10)
        self.assertEqual(self.cluster.refreshes, refreshes)

    def test_backAsReplica(self):
        """
        A primary that comes back after its replica was promoted (a replica
        itself now) makes the map read again at once, not only when a
        command is redirected: the slots go to the promoted node, and a
        C{WAIT} that reached the old node meanwhile fails with
        L{RedisUnavailable} (a replica refuses C{WAIT}) and asks for the
        map too.
        """
        self.connect()
        onA = keyOn(self.fake, A)
        self.fake.kill(A)
        self.clock.advance(0)
        # D is promoted, and A restarts as a replica before the next read.
        self.fake.ranges[D] = self.fake.ranges.pop(A)
        self.fake.alive.add(A)
        self.fake.nodes[A].up()
        refreshes = self.cluster.refreshes
        self.clock.advance(DEGRADED_REFRESH_INTERVAL)
        self.clock.advance(0)
        self.assertGreater(self.cluster.refreshes, refreshes)
        self.assertEqual(self.cluster.primaries, [B, C, D])
        self.successResultOf(self.cluster.execute("SET", onA, b"a"))
        self.assertEqual(self.fake.data[D], {onA: b"a"})

    def test_waitOnKeys(self):
        """
        C{waitReplicas} with keys sends C{WAIT} to their primaries only and
        answers the fewest; a node refusing it fails it with
        L{RedisUnavailable} and the map is read again.
        """
        self.connect()
        onA, onB = keyOn(self.fake, A), keyOn(self.fake, B)
        answers = {A: 2, B: 1}

        def run(node, command):
            if command[0] == "WAIT":
                answer = answers[node.address]
                if isinstance(answer, Exception):
                    raise answer
                return answer
            return original(node, command)

        original = self.fake.run
        self.fake.run = run
        self.assertEqual(self.successResultOf(self.cluster.waitReplicas(1, 100, [onA, onB])), 1)
        self.assertEqual([c[0] for c in self.fake.nodes[C].sent].count("WAIT"), 0)
        self.assertEqual(self.successResultOf(self.cluster.waitReplicas(1, 100, [onA])), 2)
        answers[A] = ResponseError("ERR WAIT cannot be used with replica instances.")
        refreshes = self.cluster.refreshes
        self.failureResultOf(self.cluster.waitReplicas(1, 100, [onA]), RedisUnavailable)
        self.clock.advance(DEGRADED_REFRESH_INTERVAL)
        self.assertGreater(self.cluster.refreshes, refreshes)

    def test_scripts(self):
        """
        C{EVALSHA}, and C{EVAL} on each primary that does not know the
        script yet; C{SCRIPT LOAD} goes to every primary.
        """
        self.connect()
        source = b"return 1"
        script = self.cluster.script(source)
        onA, onB = keyOn(self.fake, A), keyOn(self.fake, B)
        self.assertEqual(self.successResultOf(script([onA])), 7001)
        self.assertEqual(self.successResultOf(script([onB])), 7002)
        self.assertEqual(self.successResultOf(script([onA])), 7001)
        names = [c[0] for c in self.fake.nodes[A].sent[1:]]
        self.assertEqual(names, ["EVALSHA", "EVAL", "EVALSHA"])
        other = b"return 2"
        self.assertEqual(
            self.successResultOf(self.cluster.execute("SCRIPT", "LOAD", other)), _sha(other)
        )
        for address in (A, B, C):
            self.assertIn(_sha(other), self.fake.scripts[address])

    def test_keyless(self):
        """
        A command without a key goes to a live primary.
        """
        self.connect()
        self.fake.kill(A)
        for _ in range(4):
            self.assertEqual(self.successResultOf(self.cluster.execute("PING")), "PONG")
        self.assertEqual(self.successResultOf(self.cluster.publish("ch", b"m")), 0)
        self.assertNotIn(("PING",), self.fake.nodes[A].sent)

    def test_scan(self):
        """
        C{SCAN} walks every primary behind one cursor.
        """
        self.connect()
        keys = set()
        for address in (A, B, C):
            for n in range(3):
                self.fake.data[address]["%s-%d" % (address[1], n)] = b"v"
                keys.add("%s-%d" % (address[1], n))
        found, cursor, calls = [], b"0", 0
        while True:
            cursor, page = self.successResultOf(self.cluster.execute("SCAN", cursor))
            found += page
            calls += 1
            if cursor == b"0":
                break
        self.assertEqual(sorted(found), sorted(keys))
        self.assertEqual(calls, 6)

    def test_disconnect(self):
        """
        L{ClusterConnection.disconnect} closes every node and leaves no
        timer; commands fail afterwards.
        """
        self.connect()
        self.fake.kill(A)
        self.successResultOf(self.cluster.disconnect())
        self.assertTrue(all(node.closed for node in self.fake.nodes.values()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.cluster.connected)
        self.failureResultOf(self.cluster.execute("GET", "k"), RedisUnavailable)


class RoundRobinEndpointTests(SynchronousTestCase):
    """
    The subscriber's endpoint: each connection attempt to the next seed.
    """

    def test_turns(self):
        """
        Every C{connect} goes to the next endpoint, round and round.
        """
        used = []

        class Endpoint:
            def __init__(self, name):
                self.name = name

            def connect(self, factory):
                used.append(self.name)
                return succeed(None)

        endpoint = _RoundRobinEndpoint([Endpoint("a"), Endpoint("b"), Endpoint("c")])
        for _ in range(4):
            self.successResultOf(endpoint.connect(None))
        self.assertEqual(used, ["a", "b", "c", "a"])


def nextCall(callbacks):
    """
    @return: a L{Deferred} firing the next time C{callbacks} are called.
    """
    d = Deferred()

    def once():
        callbacks.remove(once)
        d.callback(None)

    callbacks.append(once)
    return d


class RealClusterTests(TestCase):
    """
    L{connectCluster} and L{subscribeCluster} against a real Redis Cluster
    of three primaries with a replica each.
    """

    timeout = 45

    @inlineCallbacks
    def setUp(self):
        self.cluster = RedisCluster(self, reactor)
        yield self.cluster.start()
        self.url = parseRedisURL(self.cluster.url)
        self.client = connectCluster(reactor, self.url, replyTimeout=2, connectTimeout=2)
        self.addCleanup(self.client.disconnect)
        yield withDeadline(whenConnected(self.client), 10, "the cluster connection")

    def keysOfEveryPrimary(self):
        keys, n = {}, 0
        while len(keys) < 3:
            key = "k%d" % (n,)
            keys.setdefault(self.client.addressOf(keySlot(key)), key)
            n += 1
        return [keys[address] for address in sorted(keys)]

    @inlineCallbacks
    def test_commands(self):
        """
        Commands and scripts on keys of all three primaries; C{SCAN} finds
        them all; a script with keys of two slots is refused before
        anything is sent; L{ClusterConnection.disconnect} closes it all.
        """
        client = self.client
        keys = self.keysOfEveryPrimary()
        self.assertEqual(len(self.client.primaries), 3)
        script = client.script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        for key in keys:
            yield client.execute("SET", key, b"\x00\xff")
            self.assertEqual((yield client.execute("GET", key)), b"\x00\xff")
            yield client.execute("HSET", key + "h", "f", b"1")
            self.assertEqual((yield client.execute("HGETALL", key + "h")), [b"f", b"1"])
            self.assertEqual((yield script([key + "n"], [5])), 5)
            yield client.execute("XADD", key + "s", "*", "f", b"v")
            self.assertEqual((yield client.execute("XLEN", key + "s")), 1)
        yield client.execute("SCRIPT", "FLUSH")
        self.assertEqual((yield script([keys[0] + "n"], [2])), 7)
        self.assertEqual((yield client.execute("MGET", "{t}a", "{t}b")), [None, None])
        self.assertIsInstance((yield client.publish("ch", b"m")), int)
        found, cursor = set(), b"0"
        while True:
            cursor, page = yield client.execute("SCAN", cursor, "COUNT", 100)
            found.update(page)
            if cursor == b"0":
                break
        expected = {(k + suffix).encode() for k in keys for suffix in ("", "h", "n", "s")}
        self.assertEqual(found, expected)
        yield self.assertFailure(script(["a", "b"], [1]), CrossSlotError)
        self.assertEqual((yield client.execute("EXISTS", "a")), 0)
        self.assertEqual((yield client.execute("EXISTS", "b")), 0)
        yield client.disconnect()
        self.assertFalse(client.connected)
        yield self.assertFailure(client.execute("GET", keys[0]), RedisUnavailable)

    @inlineCallbacks
    def test_waitReplicas(self):
        """
        L{ClusterConnection.waitReplicas} runs C{WAIT} on every primary
        and answers the fewest replicas that have this client's writes:
        each primary's replica, once it has synchronised.
        """
        for key in self.keysOfEveryPrimary():
            yield self.client.execute("SET", key, b"v")
        self.assertEqual((yield self.client.waitReplicas(1, 5000)), 1)
        self.assertEqual((yield self.client.waitReplicas(2, 50)), 1)

    @inlineCallbacks
    def migration(self, key):
        slot = keySlot(key)
        source = yield self.cluster.ownerOf(slot)
        target = next(n for n in self.cluster.nodes[:3] if n is not source)
        self.assertEqual(self.client.addressOf(slot), source.address)
        return slot, source, target

    @inlineCallbacks
    def test_moved(self):
        """
        After a slot migrated, the first command on it is C{MOVED}: the map
        is updated and the next command goes straight to the new owner.
        """
        client = self.client
        yield client.execute("SET", "{m}a", b"1")
        slot, source, target = yield self.migration("{m}a")
        yield self.cluster.migrateSlot(slot, source, target)
        self.assertEqual((yield client.execute("GET", "{m}a")), b"1")
        self.assertEqual(client.redirections, {"MOVED": 1, "ASK": 0})
        self.assertEqual(client.addressOf(slot), target.address)
        self.assertEqual((yield client.execute("INCR", "{m}b")), 1)
        self.assertEqual(client.redirections, {"MOVED": 1, "ASK": 0})

    @inlineCallbacks
    def test_ask(self):
        """
        During a migration, a key already moved is answered C{ASK}: the
        command runs on the target after C{ASKING}, the map unchanged; a
        key not moved yet is still read on the source.
        """
        client = self.client
        yield client.execute("SET", "{a}moved", b"1")
        yield client.execute("SET", "{a}stays", b"2")
        slot, source, target = yield self.migration("{a}moved")
        yield self.cluster.beginMigration(slot, source, target)
        yield self.cluster.moveKeys(slot, source, target, ["{a}moved"])
        self.assertEqual((yield client.execute("GET", "{a}moved")), b"1")
        self.assertEqual(client.redirections, {"MOVED": 0, "ASK": 1})
        self.assertEqual((yield client.execute("GET", "{a}stays")), b"2")
        self.assertEqual(client.redirections, {"MOVED": 0, "ASK": 1})
        # A new key is made on the target.
        yield client.execute("SET", "{a}new", b"3")
        self.assertEqual(client.redirections, {"MOVED": 0, "ASK": 2})
        self.assertEqual(client.addressOf(slot), source.address)
        self.assertEqual((yield self.cluster.call(target, "DBSIZE")), "2")

    @inlineCallbacks
    def test_failover(self):
        """
        kill -9 of a primary: commands for its slots fail at once with
        L{RedisUnavailable}, the others work; once its replica is promoted
        commands for its slots work again by themselves.
        """
        client = self.client
        dead, alive = self.keysOfEveryPrimary()[:2]
        slot = keySlot(dead)
        yield client.execute("SET", alive, b"a")
        killed = yield self.cluster.killPrimaryOf(slot)
        yield withDeadline(whenDisconnected(client), 5, "the loss of the primary")
        started = reactor.seconds()
        yield self.assertFailure(client.execute("SET", dead, b"d"), RedisUnavailable)
        self.assertLess(reactor.seconds() - started, 0.5)
        self.assertEqual((yield client.execute("GET", alive)), b"a")
        yield withDeadline(whenConnected(client), 20, "the use of the promoted replica")
        promoted = yield self.cluster.waitForFailover(slot)
        self.assertEqual(client.addressOf(slot), promoted.address)
        self.assertNotIn(killed.address, client.primaries)
        yield client.execute("SET", dead, b"d")
        self.assertEqual((yield client.execute("GET", dead)), b"d")
        script = client.script("return redis.call('GET', KEYS[1])")
        self.assertEqual((yield script([dead])), b"d")

    @inlineCallbacks
    def test_subscriber(self):
        """
        The subscriber gets messages published through another node, and
        survives the death of the node it subscribed on.
        """
        messages, changes = [], Changes()

        def received(channel, message):
            messages.append((channel, message))
            changes.changed()

        subscriber = subscribeCluster(reactor, self.url, [b"ch"], received, replyTimeout=2)
        self.addCleanup(subscriber.disconnect)
        yield withDeadline(whenSubscribed(subscriber), 10, "the subscription")
        first = self.cluster.nodeAt(subscriber.node[1])
        other = next(n for n in self.cluster.nodes if n is not first)
        yield self.cluster.call(other, "PUBLISH", "ch", "one")
        yield changes.until(lambda: len(messages) == 1, 5, "the first message")
        lost = nextCall(subscriber.onUnsubscribe)
        yield first.kill()
        yield withDeadline(lost, 5, "the loss of the subscription")
        yield withDeadline(whenSubscribed(subscriber), 10, "the subscription again")
        self.assertNotEqual(subscriber.node, first.address)
        second = self.cluster.nodeAt(subscriber.node[1])
        other = next(n for n in self.cluster.nodes if n.alive and n is not second)
        yield self.cluster.call(other, "PUBLISH", "ch", "two")
        yield changes.until(lambda: len(messages) == 2, 5, "the second message")
        self.assertEqual(messages, [(b"ch", b"one"), (b"ch", b"two")])
