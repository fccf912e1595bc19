# -*- test-case-name: tests.test_cluster_processes -*-
"""
Cluster mode end to end, as an operator runs it: L{GATES} real C{twistd im}
processes with C{--redis} sharing one real C{redis-server} (C{appendfsync
always}), each listening on its own loopback port with its HTTP API on
another (L{ClusterProcessTests}), or all on one port with C{reusePort=yes}
(L{SharedPortTests}): the two supported ways of running several gates on one
host.  Real clients (L{imserver.client.IMClient}) go down the list of gates
when they reconnect, as a client given the dispatcher's list does.

The gates behave as one server to every client: the dispatcher lists every
gate, 1:1 and group messages and kicks cross gates, a gate killed with
C{kill -9} loses nothing (its clients resume on another gate), and a Redis
that comes back empty gets every session registered again.

Everything listens and connects on 127.0.0.1 only.  What the clients are
handed (messages, kicks) is waited for as it happens (L{Changes}); what
only Redis or a gate's HTTP API tells (leases, the gate directory,
registered sessions, presence) is polled, with a deadline
(L{ClusterMixin.poll}): those processes announce nothing to the test.
"""

import json
import time
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from imserver.auth import createSecretFile, mintToken
from imserver.client import IMClient
from imserver.pb import im_pb2 as pb
from imserver.redisclient import RedisURL, connectRedis
from imserver.registry.redis import GATE_KEY_PREFIX, parseEntry, sessionsKey
from imserver.registry.redisdirectory import GATES_KEY

from tests.support import freePort
from tests.support.live import Changes
from tests.support.redis import RedisServer, whenConnected
from tests.support.twistd import (
    TOLERATED,
    RotatingEndpoint,
    clusterGate,
    loggedTracebacks,
    newSecretFile,
)

#: Gate processes in the cluster.
GATES = 3
#: The gates' sweep interval: their leases (three intervals) lapse 1.5 s
#: after a gate dies.
SWEEP_INTERVAL = 0.5
#: Seconds within which a cluster is whole again after Redis came back.
RECOVERY = 5.0
#: Seconds allowed for anything else waited for (a message, a kick, a
#: reconnect).
DEADLINE = 10.0


class Client:
    """
    One user's L{IMClient}, to the gates in turn starting with one, and
    what it was handed (each a change of the cluster's C{changes}).

    @ivar entries: the inbox entries handed to the application, in order.
    @ivar notices: the L{pb.Notice}s it got, in order.
    @ivar kicked: the L{pb.Kicked} that stopped it, or L{None}.
    """

    def __init__(self, cluster, uid, first, deviceId="phone"):
        self.cluster = cluster
        self.uid = uid
        self.entries = []
        self.notices = []
        self.kicked = None
        self.endpoint = RotatingEndpoint(cluster.gates, first)
        self.imclient = IMClient(
            reactor,
            None,
            None,
            uid,
            mintToken(cluster.secret, uid, 3600, time.time()),
            deviceId,
            onMessage=self._received,
            onNotify=self._notified,
            endpoint=self.endpoint,
            retryPolicy=lambda attempt: 0.05,
        )
        self.imclient.whenStopped().addCallback(self._stopped)

    def _received(self, entry):
        self.entries.append(entry)
        self.cluster.changes.changed()

    def _notified(self, name, message):
        if name == "notice":
            self.notices.append(message)
            self.cluster.changes.changed()

    def _stopped(self, reason):
        if isinstance(reason, pb.Kicked):
            self.kicked = reason
            self.cluster.changes.changed()

    @property
    def protocol(self):
        return self.imclient.protocol

    def gate(self):
        """
        The index of the gate this client is connected to, or L{None}.
        """
        if self.protocol is None:
            return None
        port = self.protocol.transport.getPeer().port
        return [gate.port for gate in self.cluster.gates].index(port)

    def bodies(self, sender=None, outgoing=False):
        """
        The bodies handed over, of C{sender}'s messages (default: all),
        incoming or outgoing.
        """
        return [
            e.message.body
            for e in self.entries
            if e.outgoing == outgoing and sender in (None, e.message.sender)
        ]


class ClusterMixin:
    """
    Starts L{GATES} gate processes and one C{redis-server} for a test, and
    talks to them.
    """

    timeout = 60

    @inlineCallbacks
    def startCluster(self, sharedPort=False):
        """
        Start Redis and the gates, each on its own port, or all on one
        port with C{reusePort=yes}; wait until every gate holds its lease
        and is in the directory.
        """
        # Before anything that may skip the test (no redis-server): the
        # cleanup below reads it.
        self.gates = []
        self.changes = Changes()
        # The last cleanup, once the gates stopped.
        self.addCleanup(self.assertNothingLogged)
        self.redis = RedisServer(self, reactor, appendfsync="always")
        yield self.redis.start()
        self.secretFile = newSecretFile(self)
        self.secret = self.secretFile.getContent().strip()
        tokenFile = FilePath(self.mktemp())
        createSecretFile(tokenFile)
        self.adminToken = tokenFile.getContent().strip()
        for i in range(GATES):
            dataDir = FilePath(self.mktemp())
            dataDir.makedirs()
            gate = clusterGate(
                dataDir,
                self.redis.url,
                "gate-{}".format(i),
                self.secretFile,
                api=True,
                args=[
                    "--admin-token-file",
                    tokenFile.path,
                    "--sweep-interval",
                    str(SWEEP_INTERVAL),
                ],
                listenOptions=":reusePort=yes" if sharedPort else "",
            )
            if sharedPort:
                gate.port = self.gates[0].port if self.gates else freePort()
            self.addCleanup(gate.stop)
            self.gates.append(gate)
        self.connection = connectRedis(reactor, RedisURL.parse(self.redis.url))
        self.addCleanup(self.connection.disconnect)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=self.pool)
        self.addCleanup(self.pool.closeCachedConnections)
        yield gatherResults([self.startGate(i) for i in range(GATES)])

    @inlineCallbacks
    def startGate(self, index):
        """
        Start gate C{index} and wait until it holds its lease and is in the
        gate directory.
        """
        gate = self.gates[index]
        yield gate.start()
        yield whenConnected(self.connection)
        gateId = "gate-{}".format(index)
        yield self.poll(
            lambda: self.redisCall("EXISTS", GATE_KEY_PREFIX + gateId),
            lambda found: found == 1,
            "the lease of " + gateId,
        )
        yield self.poll(
            lambda: self.redisCall("HEXISTS", GATES_KEY, gateId),
            lambda found: found == 1,
            gateId + " in the directory",
        )

    def assertNothingLogged(self):
        """
        Fail if a gate logged a traceback (but the known, harmless ones of
        L{TOLERATED}).
        """
        logged = [
            "gate-{} logged:\n{}".format(i, found)
            for i, gate in enumerate(self.gates)
            for found in loggedTracebacks(gate.output())
            if not any(pattern.search(found) for pattern in TOLERATED)
        ]
        self.assertEqual(logged, [])

    def redisCall(self, *command):
        """
        Run a command on the test's own Redis connection.
        """
        return self.connection.execute(*command)

    @inlineCallbacks
    def poll(self, query, predicate, what, timeout=DEADLINE):
        """
        Run C{query()} (returning a L{Deferred}) until C{predicate} holds
        for its result: for state in Redis or behind a gate's API, which
        the gate processes announce nothing about.

        @return: a L{Deferred} firing with that result, or failing after
            C{timeout} seconds (a query that fails counts as not yet).
        """
        deadline = reactor.seconds() + timeout
        last = None
        while True:
            try:
                last = yield query()
            except Exception as e:
                last = e
            else:
                if predicate(last):
                    return last
            if reactor.seconds() > deadline:
                self.fail("{} not within {} s; last: {!r}".format(what, timeout, last))
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def api(self, index, method, path, body=None, headers=()):
        """
        Call the HTTP API of gate C{index} with the admin token.

        @return: a L{Deferred} firing with C{(status, parsed JSON)}.
        """
        h = Headers({b"Authorization": [b"Bearer " + self.adminToken]})
        for name, value in headers:
            h.addRawHeader(name, value)
        producer = None
        if body is not None:
            producer = FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
        url = "http://127.0.0.1:{}{}".format(self.gates[index].apiPort, path)
        response = yield self.agent.request(method, url.encode("ascii"), h, producer)
        data = yield readBody(response)
        return response.code, json.loads(data)

    @inlineCallbacks
    def ok(self, index, method, path, body=None, status=200, headers=()):
        """
        Call the API like L{api}; the answer must have C{status}.

        @return: a L{Deferred} firing with the parsed answer.
        """
        code, answer = yield self.api(index, method, path, body, headers)
        self.assertEqual(code, status, answer)
        return answer

    @inlineCallbacks
    def client(self, uid, first, deviceId="phone"):
        """
        Start a client of C{uid} to gate C{first} (then the next ones) and
        wait until it is connected and authenticated there.

        @rtype: L{Client}
        """
        client = Client(self, uid, first, deviceId)
        self.addCleanup(client.imclient.stop)
        client.imclient.start()
        yield client.imclient.whenConnected()
        self.assertEqual(client.gate(), first)
        return client

    @inlineCallbacks
    def sessions(self, uid):
        """
        C{uid}'s session entries in Redis: C{{device: (gate id, session
        id)}}.
        """
        reply = yield self.redisCall("HGETALL", sessionsKey(uid))
        entries = {}
        for i in range(0, len(reply), 2):
            gateId, incarnation, generation, platform, sessionId = parseEntry(reply[i + 1])
            entries[reply[i].decode("utf-8")] = (gateId, sessionId)
        return entries

    def presence(self, index, uid):
        """
        C{uid}'s devices as gate C{index}'s API sees them:
        C{[(device id, gate id, session id)]}.
        """
        return self.ok(index, b"GET", "/v1/users/{}/presence".format(uid)).addCallback(
            lambda answer: [
                (d["device_id"], d["gate_id"], d["session_id"]) for d in answer["devices"]
            ]
        )


class ClusterProcessTests(ClusterMixin, TestCase):
    """
    L{GATES} gate processes, each on its own port, and one
    C{redis-server}, started for each test.
    """

    def setUp(self):
        return self.startCluster()

    @inlineCallbacks
    def test_dispatcher(self):
        """
        Each gate listens on its own port and advertises it: the dispatcher
        (C{GET /v1/gates}) of every gate lists all of them.  A gate stopped
        with SIGTERM withdraws at once; one killed drops out when its lease
        lapses.
        """
        expected = [
            {"host": "127.0.0.1", "port": gate.port, "tls": False, "gate_id": "gate-{}".format(i)}
            for i, gate in enumerate(self.gates)
        ]
        for index in range(GATES):
            answer = yield self.ok(index, b"GET", "/v1/gates")
            self.assertEqual(sorted(answer["addresses"], key=lambda a: a["gate_id"]), expected)
        self.assertEqual(len({gate.port for gate in self.gates}), GATES)

        yield self.gates[2].stop()
        answer = yield self.ok(0, b"GET", "/v1/gates")
        self.assertEqual(sorted(a["gate_id"] for a in answer["addresses"]), ["gate-0", "gate-1"])
        yield self.gates[1].kill()
        yield self.poll(
            lambda: self.ok(0, b"GET", "/v1/gates"),
            lambda answer: [a["gate_id"] for a in answer["addresses"]] == ["gate-0"],
            "gate-1 dropped from the directory",
            timeout=3 * 3 * SWEEP_INTERVAL,
        )

    @inlineCallbacks
    def test_messagesAcrossGates(self):
        """
        1:1 messages between clients of different gates arrive (and the
        sender gets its own copy); a group created through one gate's API,
        with members on every gate, gets a member's message and an API push
        to every member.
        """
        alice = yield self.client("alice", 0)
        bob = yield self.client("bob", 1)
        carol = yield self.client("carol", 2)
        dave = yield self.client("dave", 0)

        yield alice.imclient.send("bob", b"a->b", clientMsgId="m1")
        yield bob.imclient.send("carol", b"b->c", clientMsgId="m2")
        yield carol.imclient.send("alice", b"c->a", clientMsgId="m3")
        yield self.changes.until(
            lambda: bob.bodies("alice") and carol.bodies("bob") and alice.bodies("carol"),
            DEADLINE,
            "the 1:1 messages",
        )
        self.assertEqual(
            (bob.bodies("alice"), carol.bodies("bob"), alice.bodies("carol")),
            ([b"a->b"], [b"b->c"], [b"c->a"]),
        )
        self.assertEqual(alice.bodies(outgoing=True), [b"a->b"])

        yield self.ok(
            1,
            b"POST",
            "/v1/groups",
            {"group_id": "team", "name": "Team", "owner": "alice"},
            status=201,
        )
        yield self.ok(
            1,
            b"POST",
            "/v1/groups/team/members",
            {"members": [{"uid": "bob"}, {"uid": "carol"}, {"uid": "dave"}]},
        )
        response = yield carol.imclient.send("", b"hello team", groupId="team", clientMsgId="g1")
        pushed = yield self.ok(
            0,
            b"POST",
            "/v1/messages",
            {"group_id": "team", "text": "from the backend"},
            headers=[(b"Idempotency-Key", b"backend-1")],
        )
        self.assertEqual(sorted(pushed["seqs"]), ["alice", "bob", "carol", "dave"])
        members = [alice, bob, dave]

        def everyoneHasBoth():
            return all(b"hello team" in m.bodies("carol") for m in members) and all(
                b"from the backend" in m.bodies("") for m in members + [carol]
            )

        yield self.changes.until(everyoneHasBoth, DEADLINE, "both group messages")
        for member in members:
            [entry] = [
                e
                for e in member.entries
                if e.message.group_id == "team" and e.message.sender == "carol"
            ]
            self.assertEqual(entry.message.body, b"hello team")
        self.assertEqual(carol.bodies(outgoing=True), [b"c->a", b"hello team"])
        self.assertEqual(carol.entries[-1].seq, pushed["seqs"]["carol"])
        self.assertLess(response.seq, pushed["seqs"]["carol"])

    @inlineCallbacks
    def test_broadcastAcrossGates(self):
        """
        C{POST /v1/broadcast} to one gate process reaches every session of
        every gate process once; the answer counts this gate's sessions
        and every gate.
        """
        clients = []
        for i in range(2 * GATES):
            clients.append((yield self.client("user{}".format(i), i % GATES)))
        answer = yield self.ok(1, b"POST", "/v1/broadcast", {"text": "maintenance"})
        self.assertEqual(answer, {"sessions": 2, "gates": GATES})
        yield self.changes.until(
            lambda: all(client.notices for client in clients), DEADLINE, "the broadcast"
        )
        # A round trip on every connection: what was written before is in.
        yield gatherResults([client.protocol.ping() for client in clients])
        for client in clients:
            self.assertEqual([n.body for n in client.notices], [b"maintenance"])

    @inlineCallbacks
    def test_kickAcrossGates(self):
        """
        The same uid and device logging in on another gate kicks the first
        session (C{REPLACED}); an admin kick through a third gate's API
        reaches the new one (C{ADMIN}).
        """
        old = yield self.client("alice", 0)
        new = yield self.client("alice", 2)
        yield self.changes.until(lambda: old.kicked is not None, DEADLINE, "the first kick")
        self.assertEqual(old.kicked.reason, pb.REPLACED)
        devices = yield self.presence(1, "alice")
        self.assertEqual(devices, [("phone", "gate-2", new.protocol.session.session_id)])
        self.assertIsNone(new.kicked)

        answer = yield self.ok(1, b"POST", "/v1/users/alice/kick", {})
        self.assertEqual(answer["kicked"], ["phone"])
        yield self.changes.until(lambda: new.kicked is not None, DEADLINE, "the admin kick")
        self.assertEqual(new.kicked.reason, pb.ADMIN)
        yield self.poll(
            lambda: self.presence(0, "alice"), lambda devices: devices == [], "alice offline"
        )

    @inlineCallbacks
    def test_gateKilled(self):
        """
        A gate killed with C{kill -9} while its client is sending and being
        sent to: the client reconnects to the next gate and resumes;
        every message is acknowledged and delivered once, in order, with
        no gap in the seqs; the killed gate leaves the directory, and
        rejoins it when restarted.
        """
        alice = yield self.client("alice", 0)
        bob = yield self.client("bob", 1)
        sends = []

        def burst(first, last):
            for n in range(first, last + 1):
                sends.append(alice.imclient.send("bob", b"a%d" % (n,), clientMsgId="a%d" % (n,)))
                sends.append(bob.imclient.send("alice", b"b%d" % (n,), clientMsgId="b%d" % (n,)))

        burst(1, 10)
        yield gatherResults(sends)
        burst(11, 40)
        yield self.gates[0].kill()
        yield gatherResults(sends)
        expected = [b"a%d" % (n,) for n in range(1, 41)], [b"b%d" % (n,) for n in range(1, 41)]
        # Every message, and each sender's own copy: 80 entries each (the
        # copies interleave with the incoming messages in the inbox).
        yield self.changes.until(
            lambda: (
                (bob.bodies("alice"), alice.bodies("bob")) == expected
                and len(alice.entries) >= 80
                and len(bob.entries) >= 80
            ),
            DEADLINE,
            "every message and every sender's copy delivered",
        )
        self.assertEqual(alice.gate(), 1)
        self.assertEqual(alice.bodies(outgoing=True), expected[0])
        self.assertEqual(bob.bodies(outgoing=True), expected[1])
        for client in (alice, bob):
            seqs = [e.seq for e in client.entries]
            self.assertEqual(seqs, list(range(seqs[0], seqs[0] + 80)), client.uid)
        devices = yield self.presence(2, "alice")
        self.assertEqual(devices, [("phone", "gate-1", alice.protocol.session.session_id)])

        yield self.poll(
            lambda: self.ok(1, b"GET", "/v1/gates"),
            lambda answer: "gate-0" not in [a["gate_id"] for a in answer["addresses"]],
            "gate-0 dropped from the directory",
        )
        yield self.startGate(0)
        answer = yield self.ok(1, b"GET", "/v1/gates")
        self.assertEqual(
            sorted(a["gate_id"] for a in answer["addresses"]), ["gate-0", "gate-1", "gate-2"]
        )

    @inlineCallbacks
    def test_redisWiped(self):
        """
        Redis is killed and comes back with no data: within L{RECOVERY}
        seconds every session is registered again (in Redis, and as
        presence through another gate's API) without any client
        reconnecting, and messages flow again across gates with seqs above
        every seq given before (none reused; the messages stored before
        are gone, the documented cost of losing Redis's data).
        """
        clients = []
        for i in range(2 * GATES):
            client = yield self.client("user{}".format(i), i % GATES)
            clients.append(client)
        yield clients[0].imclient.send("user5", b"before", clientMsgId="before")
        yield self.changes.until(
            lambda: clients[5].bodies("user0") and clients[0].bodies(outgoing=True),
            DEADLINE,
            "the message before, and its sender's copy",
        )
        highest = max(e.seq for c in clients for e in c.entries)
        protocols = [c.protocol for c in clients]

        yield self.redis.wipe()
        yield self.redis.start()
        started = reactor.seconds()
        for i, client in enumerate(clients):
            expected = {"phone": ("gate-{}".format(i % GATES), client.protocol.session.session_id)}
            yield self.poll(
                lambda client=client: self.sessions(client.uid),
                lambda found, expected=expected: found == expected,
                "the session of " + client.uid,
                timeout=max(0.1, RECOVERY - (reactor.seconds() - started)),
            )
        for i, client in enumerate(clients):
            devices = yield self.presence((i + 1) % GATES, client.uid)
            self.assertEqual(
                devices,
                [("phone", "gate-{}".format(i % GATES), client.protocol.session.session_id)],
            )
        self.assertLess(reactor.seconds() - started, RECOVERY)
        self.assertEqual([c.protocol for c in clients], protocols)

        # A send may meet a gate that has not re-read Redis's run id yet:
        # the client retries it (same client_msg_id) until it is stored.
        response = yield clients[1].imclient.send("user3", b"after", clientMsgId="after")
        self.assertGreater(response.seq, highest)
        yield self.changes.until(lambda: clients[3].bodies("user1"), DEADLINE, "the message after")
        [entry] = [e for e in clients[3].entries if e.message.body == b"after"]
        self.assertGreater(entry.seq, highest)
        self.assertEqual([c.protocol for c in clients], protocols)


class SharedPortTests(ClusterMixin, TestCase):
    """
    L{GATES} gate processes listening on one port with C{reusePort=yes}
    (C{SO_REUSEPORT}): the kernel spreads clients over them, and the
    clients of a gate that dies come back on the others through the same
    address.
    """

    def setUp(self):
        return self.startCluster(sharedPort=True)

    @inlineCallbacks
    def gatesOf(self, clients):
        """
        The gate id each client's session is registered on, from Redis.
        """
        found = []
        for client in clients:
            [(gateId, sessionId)] = (yield self.sessions(client.uid)).values()
            self.assertEqual(sessionId, client.protocol.session.session_id)
            found.append(gateId)
        return found

    @inlineCallbacks
    def test_sharedPort(self):
        """
        Every gate listens on the one port and the dispatcher lists each of
        them there; 15 clients connecting to it land on more than one gate
        (all on one: a chance of 3 in 3**15) and talk across gates.  After
        a gate is killed its clients reconnect to the same address, land on
        the others, and get what was sent to them meanwhile.
        """
        [port] = {gate.port for gate in self.gates}
        answer = yield self.ok(0, b"GET", "/v1/gates")
        self.assertEqual(
            sorted((a["gate_id"], a["port"]) for a in answer["addresses"]),
            [("gate-{}".format(i), port) for i in range(GATES)],
        )
        clients = []
        for i in range(15):
            client = Client(self, "user{}".format(i), 0)
            self.addCleanup(client.imclient.stop)
            client.imclient.start()
            clients.append(client)
        yield gatherResults([c.imclient.whenConnected() for c in clients])
        placed = yield self.gatesOf(clients)
        self.assertGreater(len(set(placed)), 1, placed)
        first = clients[0]
        other = next(c for c, g in zip(clients, placed) if g != placed[0])
        yield first.imclient.send(other.uid, b"across", clientMsgId="across")
        yield self.changes.until(
            lambda: other.bodies(first.uid) == [b"across"], DEADLINE, "the message across gates"
        )

        victim = int(placed[0].rpartition("-")[2])
        orphans = [c for c, g in zip(clients, placed) if g == placed[0]]
        yield self.gates[victim].kill()
        sends = [
            other.imclient.send(c.uid, b"meanwhile", clientMsgId="m-" + c.uid) for c in orphans
        ]
        yield gatherResults(sends)
        yield self.changes.until(
            lambda: all(c.bodies(other.uid) == [b"meanwhile"] for c in orphans),
            DEADLINE,
            "the messages sent meanwhile",
        )
        placed = yield self.gatesOf(clients)
        self.assertNotIn("gate-{}".format(victim), placed)
        self.assertEqual(len(placed), 15)
