# -*- test-case-name: tests.test_bench -*-
"""
The child processes of a bench run, for its coordinator
(L{imserver.bench.coordinator}): the gate (pinned to C{--server-cpu}; with
C{--gates N} > 1, its own C{redis-server} and N gates in cluster mode; with
C{p2p --before-send}, the allow-all backend it asks, pinned with it), the
echo servers of the reference, and the client workers (pinned to
C{--client-cpu}); the CPU and memory they use; and stopping every one of
them, however the run ends.
"""

import os
import re
import socket
import sys

from twisted.internet.defer import FirstError, TimeoutError, gatherResults, inlineCallbacks
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutput, getProcessOutputAndValue
from twisted.python.filepath import FilePath

from imserver.auth import loadSecret
from imserver.bench import ALLOW_ALL_COMMAND, ECHO_COMMAND, WORKER_COMMAND
from imserver.bench.control import WorkerProcess
from imserver.bench.options import (
    FILE_RESERVE,
    fileLimit,
    isWebSocket,
    listenDescription,
    overTLS,
    redisCli,
    redisServer,
)
from imserver.datadir import ADMIN_TOKEN_FILE_NAME, CERT_FILE_NAME, KEY_FILE_NAME
from imserver.spawn import (
    apiPattern,
    childEnvironment,
    spawnServer,
    spawnTwistd,
    tasksetPrefix,
    webPattern,
)

#: Times the bench tries to start redis-server on a port that was free.
REDIS_ATTEMPTS = 5
#: redis-server's log line once it accepts connections; group 1 its port.
_REDIS_READY = re.compile(rb"port=(\d+)\.(?s:.*?)Ready to accept connections")


def freePort(host):
    """
    A TCP port free on C{host} right now (another process may take it
    before it is used: the caller retries then).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BenchError(Exception):
    """
    The run cannot go on (a server or worker ended, a phase timed out).
    """


def cpuSeconds(pid):
    """
    User plus system CPU seconds used so far by process C{pid}.
    """
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rssBytes(pid):
    """
    The resident set size of process C{pid}, in bytes.
    """
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def firstError(failure):
    """
    Errback of C{gatherResults}: the first failure itself.
    """
    return failure.value.subFailure if failure.check(FirstError) else failure


def bounded(clock, d, seconds, what):
    """
    C{d}, failing with L{BenchError} after C{seconds}.

    @param what: what C{d} waits for, for the error.
    """

    def timedOut(failure):
        failure.trap(TimeoutError)
        raise BenchError("timed out after {} s waiting for {}".format(seconds, what))

    return d.addTimeout(seconds, clock).addErrback(timedOut)


class Processes:
    """
    The child processes of one run.

    @ivar servers: the gates (or echo servers) running, one per C{--gates}.
    @ivar redis: the C{redis-server} of a cluster run, or L{None}.
    @ivar backend: the allow-all before-send backend of a C{--before-send}
        run, or L{None}.
    @ivar workers: the L{WorkerProcess}es.
    @ivar target: what the workers connect to (C{host}, C{port},
        C{ports}, C{tls}, C{ca}, C{websocket}), once the servers listen.
    @ivar secret: the gates' token secret (hex), once they started.
    @ivar api: C{(URL, admin token)} of the first gate's HTTP API, if the
        scenario uses it.
    """

    def __init__(self, reactor, options, log):
        """
        @param options: the scenario's options.
        @param log: called with a note for stderr.
        """
        self.reactor = reactor
        self.options = options
        self.log = log
        self.workers = []
        self.servers = []
        # Every redis-server started: the primary first, then its replica,
        # or the nodes of a cluster.
        self.redises = []
        self.backend = None
        self.beforeSendURL = None
        self.target = None
        self.secret = None
        self.api = None

    @inlineCallbacks
    def startGates(self, dataDir, scenario):
        """
        Start the gate, or with C{--gates N} > 1 a C{redis-server} and N
        gates in cluster mode sharing the data directory (the secret, the
        certificate, the admin token): the first alone, as it creates them,
        then the others.

        @param scenario: the L{imserver.bench.scenario.Scenario} run
            against them.
        """
        o = self.options
        gates = o["gates"]
        redisURL = None
        if o["store"] == "redis":
            redisURL = yield self._startRedis(dataDir)
        if o.get("before-send"):
            yield self._startBackend()
        ports = [(yield self._startGate(dataDir, scenario, 0, redisURL))]
        ports += yield gatherResults(
            [self._startGate(dataDir, scenario, i, redisURL) for i in range(1, gates)],
            consumeErrors=True,
        ).addErrback(firstError)
        self.secret = loadSecret(FilePath(dataDir), create=False).hex()
        tls = overTLS(o["transport"])
        self.target = {
            "host": o["host"],
            "port": ports[0],
            "ports": ports,
            "tls": tls,
            "ca": os.path.join(dataDir, CERT_FILE_NAME) if tls else None,
            "websocket": isWebSocket(o["transport"]),
        }

    @inlineCallbacks
    def _startGate(self, dataDir, scenario, index, redisURL):
        """
        Start gate C{index} (the HTTP API on the first only, if the scenario
        uses it) and wait until it listens.  Over WebSocket its web listener
        (C{--web}, TLS for C{wss}) is the client port; its C{--listen} is
        then plain TCP, on a free port, unused.

        @param redisURL: the cluster's Redis, or L{None} for one gate.
        @return: a L{Deferred} firing with its client port.
        """
        o = self.options
        api = scenario.usesApi and index == 0
        websocket = isWebSocket(o["transport"])
        imArgs = ["--data-dir", dataDir]
        if redisURL is None:
            imArgs += ["--store", o["store"]]
        else:
            imArgs += ["--redis", redisURL, "--gate-id", "bench-{}".format(index)]
        imArgs += [
            # The API on a free loopback port, if the scenario uses it.
            "--api",
            listenDescription("tcp", o["host"]) if api else "none",
            "--listen",
            listenDescription("tcp" if websocket else o["transport"], o["host"]),
            # The bench is the gate's only client: lift the limits
            # against abuse, but the open-file budget.
            "--max-connections",
            str(fileLimit() - FILE_RESERVE),
            "--max-connections-per-ip",
            str(2 * o["users"]),
            "--accept-rate",
            "1e9",
            "--request-rate",
            "1e9",
        ]
        if websocket:
            imArgs += ["--web", listenDescription(o["transport"], o["host"])]
        if self.beforeSendURL is not None:
            imArgs += ["--before-send", self.beforeSendURL]
        imArgs += scenario.gateArguments()
        imArgs += o.get("gate-options", [])
        server = spawnTwistd(
            self.reactor,
            imArgs,
            o["server-cpu"],
            listening=webPattern(o["host"]) if websocket else o["host"],
        )
        self.servers.append(server)
        waits = [server.listening]
        if api:
            waits.append(server.waitFor(apiPattern(o["host"]), "its HTTP API listening"))
        listening = gatherResults(waits, consumeErrors=True).addErrback(firstError)
        what = "the gate to listen" if o["gates"] == 1 else "gate {} to listen".format(index)
        ports = yield self._bounded(listening, what)
        if api:
            host = "[{}]".format(o["host"]) if ":" in o["host"] else o["host"]
            self.api = (
                "http://{}:{}".format(host, ports[1]),
                FilePath(dataDir).child(ADMIN_TOKEN_FILE_NAME).getContent().strip(),
            )
        return ports[0]

    @property
    def redis(self):
        """
        The (first) C{redis-server}, or L{None}.
        """
        return self.redises[0] if self.redises else None

    @inlineCallbacks
    def _startRedis(self, dataDir):
        """
        Start C{redis-server} on a free loopback port, in C{dataDir}, without
        persistence, pinned with the gates; with C{--redis-replicas 1} a
        replica of it too (in C{dataDir}/replica); with C{--redis-cluster N}
        a Redis Cluster of N primaries instead (L{_startCluster}).

        @return: a L{Deferred} firing with the C{redis://} URL for the gates.
        """
        if self.options["redis-cluster"]:
            return (yield self._startCluster(dataDir))
        redis, url, port = yield self._spawnRedis(dataDir, [])
        self.redises.append(redis)
        if self.options["redis-replicas"]:
            replicaDir = os.path.join(dataDir, "replica")
            os.mkdir(replicaDir)
            replica, _, _ = yield self._spawnRedis(
                replicaDir, ["--replicaof", _redisHost(self.options["host"]), str(port)]
            )
            self.redises.append(replica)
        return url

    @inlineCallbacks
    def _startCluster(self, dataDir):
        """
        Start C{--redis-cluster} nodes (each in its own directory below
        C{dataDir}, pinned with the gates), make them a Redis Cluster with
        C{redis-cli --cluster create} (no replicas: every node a primary),
        and wait until every node says the cluster is ok.

        @return: a L{Deferred} firing with the cluster's C{redis://} URL
            (every node a seed, C{?cluster=yes}).
        """
        o = self.options
        host = _redisHost(o["host"])
        ports = []
        for i in range(o["redis-cluster"]):
            nodeDir = os.path.join(dataDir, "redis-{}".format(i))
            os.mkdir(nodeDir)
            config = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            redis, _, port = yield self._spawnRedis(nodeDir, config)
            self.redises.append(redis)
            ports.append(port)
        addresses = ["{}:{}".format(host, port) for port in ports]
        cli = redisCli()
        out, err, code = yield self._bounded(
            getProcessOutputAndValue(
                cli,
                ["--cluster", "create"] + addresses + ["--cluster-replicas", "0", "--cluster-yes"],
                env={},
                reactor=self.reactor,
            ),
            "redis-cli --cluster create",
        )
        if code != 0:
            raise BenchError("redis-cli --cluster create failed:\n" + (out + err).decode()[-3000:])
        deadline = self.reactor.seconds() + o["timeout"]
        for port in ports:
            while True:
                info = yield getProcessOutput(
                    cli,
                    ["-h", host, "-p", str(port), "CLUSTER", "INFO"],
                    env={},
                    reactor=self.reactor,
                )
                if b"cluster_state:ok" in info:
                    break
                if self.reactor.seconds() > deadline:
                    raise BenchError("the Redis Cluster did not form in time")
                yield deferLater(self.reactor, 0.1, lambda: None)
        self.log("Redis Cluster of {} primaries: {}".format(len(ports), ", ".join(addresses)))
        bracketed = [
            "[{}]:{}".format(host, p) if ":" in host else a for p, a in zip(ports, addresses)
        ]
        return "redis://{}/0?cluster=yes".format(",".join(bracketed))

    @inlineCallbacks
    def _spawnRedis(self, dataDir, extra):
        """
        Start one C{redis-server} with the arguments C{extra}.

        @return: a L{Deferred} firing with C{(process, URL, port)}.
        """
        o = self.options
        executable = redisServer()
        if executable is None:
            raise BenchError("--gates > 1 needs redis-server (Debian package redis-server)")
        host = _redisHost(o["host"])
        bracketed = "[{}]".format(host) if ":" in host else host
        for attempt in range(REDIS_ATTEMPTS):
            port = freePort(host)
            argv = (
                tasksetPrefix(o["server-cpu"])
                + [
                    executable,
                    "--port",
                    str(port),
                    "--bind",
                    host,
                    "--dir",
                    dataDir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                    "--loglevel",
                    "notice",
                    "--maxclients",
                    str(max(1000, 64 * o["gates"])),
                    # A replica synchronises at once.
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                + extra
            )
            redis = spawnServer(self.reactor, argv, listening=_REDIS_READY)
            try:
                yield self._bounded(redis.listening, "redis-server to start")
            except Exception:
                # Most likely the port was taken meanwhile: another one.
                self._signal(redis, "KILL")
                yield redis.whenEnded()
                if attempt == REDIS_ATTEMPTS - 1:
                    raise BenchError(
                        "redis-server did not start; its output ends with:\n" + redis.text()[-3000:]
                    )
                continue
            self.log("redis-server {} on port {}".format(executable, port))
            return redis, "redis://{}:{}/0".format(bracketed, port), port

    @inlineCallbacks
    def _startBackend(self):
        """
        Start the allow-all before-send backend (L{imserver.bench.allowall})
        on a free loopback port, pinned with the gates.
        """
        from imserver.bench.allowall import url

        o = self.options
        argv = tasksetPrefix(o["server-cpu"]) + [
            sys.executable,
            "-m",
            "imserver.bench",
            ALLOW_ALL_COMMAND,
            "--host",
            o["host"],
        ]
        self.backend = spawnServer(self.reactor, argv, listening=o["host"])
        port = yield self._bounded(self.backend.listening, "the before-send backend to listen")
        self.beforeSendURL = url(o["host"], port)
        self.log("before-send backend at {}".format(self.beforeSendURL))

    @inlineCallbacks
    def startEcho(self, dataDir):
        """
        Start one echo server per gate: the same connections per process,
        over the scenario's transport, or for a WebSocket the one under it
        (TCP for C{ws}, TLS for C{wss}): the reference stays raw Twisted.
        """
        o = self.options
        args = [sys.executable, "-m", "imserver.bench", ECHO_COMMAND, "--host", o["host"]]
        if self.target["tls"]:
            args += [
                "--tls-cert",
                os.path.join(dataDir, CERT_FILE_NAME),
                "--tls-key",
                os.path.join(dataDir, KEY_FILE_NAME),
            ]
        self.servers = [
            spawnServer(self.reactor, tasksetPrefix(o["server-cpu"]) + args, listening=o["host"])
            for _ in range(o["gates"])
        ]
        listening = gatherResults(
            [server.listening for server in self.servers], consumeErrors=True
        ).addErrback(firstError)
        ports = yield self._bounded(listening, "the echo server to listen")
        self.target = dict(self.target, port=ports[0], ports=ports, websocket=False)

    def spawnWorkers(self):
        """
        Start C{--workers} worker processes.
        """
        self.workers = [self._spawnWorker(i) for i in range(self.options["workers"])]

    def _spawnWorker(self, index):
        process = WorkerProcess(index)
        argv = tasksetPrefix(self.options["client-cpu"]) + [
            sys.executable,
            "-m",
            "imserver.bench",
            WORKER_COMMAND,
        ]
        process.transport = self.reactor.spawnProcess(
            process, argv[0], argv, env=childEnvironment(), childFDs={0: "w", 1: "r", 2: 2}
        )
        return process

    @inlineCallbacks
    def stopServers(self):
        servers, self.servers = self.servers, []
        for server in servers:
            if server.reason is None:
                self._signal(server, "TERM")
        yield gatherResults(
            [self._ended(server, "the server to stop") for server in servers], consumeErrors=True
        )

    @inlineCallbacks
    def stopRedis(self):
        redises, self.redises = self.redises, []
        for redis in redises:
            if redis.reason is None:
                self._signal(redis, "TERM")
        yield gatherResults(
            [self._ended(redis, "redis-server to stop") for redis in redises], consumeErrors=True
        )

    @inlineCallbacks
    def shutdown(self):
        for worker in self.workers:
            worker.finish()
        yield gatherResults(
            [
                self._ended(worker, "worker {} to exit".format(worker.index))
                for worker in self.workers
            ],
            consumeErrors=True,
        )
        yield self.stopServers()
        yield self.stopRedis()
        backend, self.backend = self.backend, None
        if backend is not None:
            if backend.reason is None:
                self._signal(backend, "TERM")
            yield self._ended(backend, "the before-send backend to stop")

    @inlineCallbacks
    def _ended(self, process, what):
        """
        Wait for C{process} to end; kill it if that takes longer than
        C{--timeout}.
        """
        try:
            yield self._bounded(process.whenEnded(), what)
        except BenchError as e:
            self.log("{}; killing it".format(e))
            self._signal(process, "KILL")
            yield process.whenEnded()

    def kill(self):
        """
        Kill every child now (the reactor is stopping under us).
        """
        for process in self.workers + self.servers + self.redises + [self.backend]:
            if process is not None:
                self._signal(process, "KILL")

    @staticmethod
    def _signal(process, signal):
        try:
            process.transport.signalProcess(signal)
        except ProcessExitedAlready:
            pass

    def _bounded(self, d, what):
        """
        C{d}, failing with L{BenchError} after C{--timeout} seconds.
        """
        return bounded(self.reactor, d, self.options["timeout"], what)

    # -- what they use ------------------------------------------------------

    def usage(self):
        """
        @return: a mark for L{usageSince}: the time and the CPU seconds of
            the servers (all gates together), of the workers, of Redis and
            of the before-send backend so far.
        @raise BenchError: if a server has ended.
        """
        self.checkServer()
        return (
            self.reactor.seconds(),
            sum(cpuSeconds(server.pid) for server in self.servers),
            sum(cpuSeconds(worker.pid) for worker in self.workers),
            sum(cpuSeconds(redis.pid) for redis in self.redises),
            cpuSeconds(self.backend.pid) if self.backend is not None else 0.0,
        )

    def usageSince(self, mark):
        """
        @return: C{seconds} since C{mark}, C{server_cpu_percent} (all gates
            together, in percent of one core) and C{client_cpu_percent}
            (all workers together) meanwhile, and C{server_rss_mb} (all
            gates together) now; with several gates also
            C{gate_rss_mb} (each gate's), and C{redis_cpu_percent} and
            C{redis_rss_mb}; with a before-send backend
            C{before_send_backend_cpu_percent}.
        """
        now, server, clients, redis, backend = self.usage()
        seconds = now - mark[0]
        figures = {
            "seconds": round(seconds, 3),
            "server_cpu_percent": round(100 * (server - mark[1]) / seconds, 1),
            "client_cpu_percent": round(100 * (clients - mark[2]) / seconds, 1),
            "server_rss_mb": round(self.serverRss() / 2**20, 1),
        }
        if len(self.servers) > 1:
            figures["gate_rss_mb"] = [
                round(rssBytes(server.pid) / 2**20, 1) for server in self.servers
            ]
        if self.redis is not None:
            figures["redis_cpu_percent"] = round(100 * (redis - mark[3]) / seconds, 1)
            figures["redis_rss_mb"] = round(
                sum(rssBytes(redis.pid) for redis in self.redises) / 2**20, 1
            )
        if self.backend is not None:
            figures["before_send_backend_cpu_percent"] = round(
                100 * (backend - mark[4]) / seconds, 1
            )
        return figures

    def serverRss(self):
        """
        The servers' RSS now, all gates together, in bytes.

        @raise BenchError: if a server has ended.
        """
        self.checkServer()
        return sum(rssBytes(server.pid) for server in self.servers)

    def checkServer(self):
        """
        @raise BenchError: if a server (or Redis) has ended.
        """
        for name, server in self._servers():
            if server.reason is not None:
                raise BenchError(
                    "{} ended ({}); its output ends with:\n{}".format(
                        name, server.reason, server.text()[-3000:]
                    )
                )

    def _servers(self):
        """
        @return: C{(name, process)} of each server and of Redis.
        """
        names = (
            ["the server"]
            if len(self.servers) == 1
            else ["server {}".format(i) for i in range(len(self.servers))]
        )
        pairs = list(zip(names, self.servers))
        for i, redis in enumerate(self.redises):
            pairs.append(("redis-server" if i == 0 else "redis-server {}".format(i), redis))
        if self.backend is not None:
            pairs.append(("the before-send backend", self.backend))
        return pairs


def _redisHost(host):
    """
    The address Redis listens on for the bench's C{--host}: 127.0.0.1, or
    C{--host} itself if it is IPv6.
    """
    return "127.0.0.1" if ":" not in host else host
