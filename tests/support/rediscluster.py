# -*- test-case-name: tests.test_rediscluster,tests.test_crash -*-
"""
A real Redis Cluster for tests (L{RedisCluster}): six C{redis-server
--cluster-enabled yes} processes (L{tests.support.redis.RedisServer}) on
free loopback ports, joined by C{redis-cli --cluster create} into three
primaries with a replica each, and the manual steps of a failover (and of
a killed primary rejoining as a replica) and of a slot migration; and
L{usersOnPrimaries}, users whose keys are on each primary.  Every process
is killed at the test's cleanup; a missing C{redis-server} or C{redis-cli}
skips the test locally and fails it in CI
(L{tests.support.requireExecutable}).

Every wait is bounded: C{redis-cli} runs are killed after L{CLI_TIMEOUT},
and polling the cluster's state (for which Redis has no event) gives up
after L{POLL_TRIES} tries L{POLL_INTERVAL} apart.
"""

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater

from tests.support import freePort, requireExecutable
from tests.support.redis import RedisServer

#: Milliseconds without an answer before a node is failing: failovers take
#: about two of these.
NODE_TIMEOUT_MS = 1000

#: Seconds a C{redis-cli} run may take before it is killed.
CLI_TIMEOUT = 15.0

#: The tries of a poll of the cluster's state, and the seconds between two.
POLL_TRIES = 150
POLL_INTERVAL = 0.1


class ClusterNode(RedisServer):
    """
    One C{redis-server} of a L{RedisCluster}, without AOF; its cluster bus on
    a free port of its own (the default, port + 10000, may be out of range).

    @ivar nodeId: its cluster node id, once the cluster is created.
    """

    def __init__(self, testCase, reactor):
        RedisServer.__init__(self, testCase, reactor, appendfsync=None)
        self.nodeId = None
        self.busPort = None
        self.extraArgs += [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            self.directory.child("nodes.conf").path,
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A replica syncs at once (not after 5 s waiting for others),
            # and may be promoted however long it was cut off: failovers are
            # quick and sure.
            "--repl-diskless-sync-delay",
            "0",
            "--cluster-replica-validity-factor",
            "0",
            # The other primaries' slots keep working while one is down.
            "--cluster-require-full-coverage",
            "no",
        ]

    def _argv(self, port):
        if self.port is None:
            self.busPort = freePort()
        return RedisServer._argv(self, port) + ["--cluster-port", str(self.busPort)]

    @property
    def address(self):
        """
        C{("127.0.0.1", port)}, as the cluster names it.
        """
        return ("127.0.0.1", self.port)

    @property
    def alive(self):
        """
        Whether its process runs (it was started and not killed).
        """
        return self._process is not None and not self._process.ended.called


class _Command(ProcessProtocol):
    def __init__(self):
        self.output = []
        self.ended = Deferred()

    def outReceived(self, data):
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class NodeInfo:
    """
    One line of C{CLUSTER NODES}.

    @ivar slots: the C{(first, last)} slot ranges it serves.
    """

    def __init__(self, line):
        fields = line.split()
        self.nodeId = fields[0]
        self.port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        self.flags = set(fields[2].split(","))
        self.slots = []
        for field in fields[8:]:
            if not field.startswith("["):  # not a migration marker
                first, _, last = field.partition("-")
                self.slots.append((int(first), int(last or first)))

    def serves(self, slot):
        return any(first <= slot <= last for first, last in self.slots)


class RedisCluster:
    """
    A Redis Cluster of C{primaries} primaries with a replica each.

    @ivar nodes: its L{ClusterNode}s; the first C{primaries} are the
        primaries at the start.
    """

    def __init__(self, testCase, reactor, primaries=3):
        self.cli = requireExecutable("redis-cli", "redis-cli (Debian package redis-tools)")
        self.reactor = reactor
        self.primaries = primaries
        self.nodes = [ClusterNode(testCase, reactor) for _ in range(2 * primaries)]

    @property
    def url(self):
        """
        C{redis://...?cluster=yes} with every node as a seed.
        """
        hosts = ",".join("127.0.0.1:{}".format(node.port) for node in self.nodes)
        return "redis://{}/0?cluster=yes".format(hosts)

    @inlineCallbacks
    def start(self):
        """
        Start the nodes, create the cluster, and wait until every node says
        it is ok and every replica has synced.

        @return: a L{Deferred} firing with this cluster.
        """
        yield gatherResults([node.start() for node in self.nodes], consumeErrors=True)
        yield self.run(
            ["--cluster", "create"]
            + ["127.0.0.1:{}".format(node.port) for node in self.nodes]
            + ["--cluster-replicas", "1", "--cluster-yes"]
        )
        yield self._until(self._formed, "the cluster is formed")
        for node in self.nodes:
            node.nodeId = yield self.call(node, "CLUSTER", "MYID")
        return self

    @inlineCallbacks
    def run(self, args):
        """
        Run C{redis-cli args} (killed after L{CLI_TIMEOUT}).

        @return: a L{Deferred} firing with its output (L{str}, stripped), or
            failing with L{RuntimeError} if it failed (C{-e}: a command's
            error reply too).
        """
        command = _Command()
        transport = self.reactor.spawnProcess(
            command, self.cli, [self.cli, "-e"] + [str(a) for a in args], env={}
        )

        def kill():
            try:
                transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

        timer = self.reactor.callLater(CLI_TIMEOUT, kill)
        code = yield command.ended
        if timer.active():
            timer.cancel()
        output = b"".join(command.output).decode("utf-8", "replace").strip()
        if code != 0:
            raise RuntimeError("redis-cli {}: {}".format(" ".join(map(str, args)), output))
        return output

    def call(self, node, *command):
        """
        Run C{command} on C{node} with C{redis-cli}.

        @return: see L{run}.
        """
        return self.run(["-h", "127.0.0.1", "-p", node.port] + list(command))

    @inlineCallbacks
    def _until(self, check, what):
        for _ in range(POLL_TRIES):
            if (yield check()):
                return
            yield deferLater(self.reactor, POLL_INTERVAL, lambda: None)
        raise AssertionError(
            "{} did not happen within {:.0f} s".format(what, POLL_TRIES * POLL_INTERVAL)
        )

    @inlineCallbacks
    def _formed(self):
        for node in self.nodes:
            info = yield self.call(node, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info:
                return False
            replication = yield self.call(node, "INFO", "replication")
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return False
        return True

    def nodeAt(self, port):
        """
        @return: the L{ClusterNode} listening on C{port}.
        """
        return next(node for node in self.nodes if node.port == port)

    @inlineCallbacks
    def clusterNodes(self, via):
        """
        @return: a L{Deferred} firing with C{via}'s view of the cluster: a
            L{NodeInfo} per node.
        """
        text = yield self.call(via, "CLUSTER", "NODES")
        return [NodeInfo(line) for line in text.splitlines() if line.strip()]

    @inlineCallbacks
    def ownerOf(self, slot, via=None):
        """
        @return: a L{Deferred} firing with the L{ClusterNode} serving
            C{slot}, as C{via} (default: a live node) sees it, or L{None}.
        """
        via = via or next(node for node in self.nodes if node.alive)
        for info in (yield self.clusterNodes(via)):
            if "master" in info.flags and info.serves(slot):
                return self.nodeAt(info.port)
        return None

    @inlineCallbacks
    def killPrimaryOf(self, slot):
        """
        Kill (C{SIGKILL}) the primary of C{slot}.

        @return: a L{Deferred} firing with the killed L{ClusterNode}.
        """
        node = yield self.ownerOf(slot)
        yield node.kill()
        return node

    @inlineCallbacks
    def waitForFailover(self, slot):
        """
        Wait until every live node says a live primary serves C{slot}.

        @return: a L{Deferred} firing with that L{ClusterNode}.
        """
        owners = []

        @inlineCallbacks
        def promoted():
            del owners[:]
            for node in self.nodes:
                if node.alive:
                    owners.append((yield self.ownerOf(slot, node)))
            return all(owner is not None and owner.alive for owner in owners)

        yield self._until(promoted, "the failover of slot {}".format(slot))
        return owners[0]

    @inlineCallbacks
    def rejoin(self, node):
        """
        Start C{node}, killed after its replica was promoted, again on its
        port, cluster bus port and C{nodes.conf}, without its data: the
        cluster tells it its slots have a newer owner, and it becomes a
        replica of that owner.  Wait until it has synced and every node says
        the cluster is ok.

        @return: a L{Deferred} firing with C{node}.
        """
        yield node.start()

        @inlineCallbacks
        def replicating():
            replication = yield self.call(node, "INFO", "replication")
            if "role:slave" not in replication:
                return False
            return (yield self._formed())

        yield self._until(replicating, "the rejoin of node {}".format(node.port))
        return node

    @inlineCallbacks
    def beginMigration(self, slot, source, target):
        """
        The first steps of moving C{slot} from C{source} to C{target}: the
        target imports it, the source migrates it (keys missing on the
        source are then answered with C{ASK}).
        """
        yield self.call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.nodeId)
        yield self.call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.nodeId)

    @inlineCallbacks
    def moveKeys(self, slot, source, target, keys=None):
        """
        C{MIGRATE} C{keys} (default: every key of C{slot}) from C{source} to
        C{target}, during a migration.
        """
        if keys is None:
            text = yield self.call(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
            keys = text.split()
        if keys:
            yield self.call(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)

    @inlineCallbacks
    def endMigration(self, slot, target):
        """
        The last step: every primary is told C{target} serves C{slot} (the
        target first, as the Redis Cluster specification says).
        """
        primaries = []
        for node in self.nodes:
            if node.alive and "role:master" in (yield self.call(node, "INFO", "replication")):
                primaries.append(node)
        primaries.sort(key=lambda node: node is not target)
        for node in primaries:
            yield self.call(node, "CLUSTER", "SETSLOT", slot, "NODE", target.nodeId)

    @inlineCallbacks
    def migrateSlot(self, slot, source, target):
        """
        Move C{slot} and its keys from C{source} to C{target}; afterwards the
        source answers its commands with C{MOVED}.
        """
        yield self.beginMigration(slot, source, target)
        yield self.moveKeys(slot, source, target)
        yield self.endMigration(slot, target)


def usersOnPrimaries(primaries, count, prefix="u"):
    """
    C{count} uids per primary of a cluster whose slot ranges C{primaries}
    lists (C{[[(first, last), ...], ...]}, one list per primary, as
    L{NodeInfo.slots}): C{<prefix>0}, C{<prefix>1}... taken in order, each
    kept if its keys' slot is on a primary still short of users.

    @return: a list of uids per primary.
    """
    from imserver.redisclient import userTag
    from imserver.rediscluster import keySlot

    chosen = [[] for _ in primaries]
    n = 0
    while any(len(users) < count for users in chosen):
        uid = "{}{}".format(prefix, n)
        n += 1
        slot = keySlot("{" + userTag(uid) + "}")
        for users, ranges in zip(chosen, primaries):
            if any(first <= slot <= last for first, last in ranges) and len(users) < count:
                users.append(uid)
    return chosen
