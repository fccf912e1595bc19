# -*- test-case-name: tests.test_bench -*-
"""
The bench's main process: it starts the gate (pinned to C{--server-cpu};
with C{--gates N} > 1, its own C{redis-server} and N gates in cluster mode),
the client workers (pinned to C{--client-cpu}), loads the scenario into the
workers, runs its phases, then does the same with the echo reference in
place of the gate, and gathers one result.  It shows progress on stderr
once a second and stops every child process when it ends, however it ends.
"""

import json
import os
import re
import shutil
import socket
import sys
import tempfile

from twisted.internet.defer import (
    FirstError,
    TimeoutError,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from imserver.auth import loadSecret
from imserver.bench import ECHO_COMMAND, WORKER_COMMAND
from imserver.bench.control import WorkerProcess
from imserver.bench.options import (
    FILE_RESERVE,
    fileLimit,
    listenDescription,
    redisServer,
    sourceAddresses,
)
from imserver.bench.reference import Reference
from imserver.bench.stats import (
    evenBlocks,
    formatProgress,
    mergeSorted,
    ratesBetween,
    ratiosTo,
    sumCounts,
)
from imserver.datadir import ADMIN_TOKEN_FILE_NAME, CERT_FILE_NAME, KEY_FILE_NAME
from imserver.spawn import (
    apiPattern,
    childEnvironment,
    spawnServer,
    spawnTwistd,
    tasksetPrefix,
)

#: Seconds into a run after which the progress line is shown.
PROGRESS_AFTER = 3.0
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


def _firstError(failure):
    """
    Errback of C{gatherResults}: the first failure itself.
    """
    return failure.value.subFailure if failure.check(FirstError) else failure


@implementer(IBodyProducer)
class _JSONBody:
    """
    A request body of JSON, all at once.
    """

    def __init__(self, value):
        self._data = json.dumps(value).encode("utf-8")
        self.length = len(self._data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class Window:
    """
    What one measurement window measured, added up over the workers.

    @ivar seconds: its length.
    @ivar counts: C{{counter: gained in the window}}.
    @ivar latencies: every latency recorded, microseconds, sorted.
    @ivar figures: C{seconds}, C{server_cpu_percent},
        C{client_cpu_percent} and C{server_rss_mb}, for the result.
    @ivar serverRss: the server's RSS at its end, in bytes.
    """

    def __init__(self, counts, latencies, figures, serverRss):
        self.seconds = figures["seconds"]
        self.counts = counts
        self.latencies = latencies
        self.figures = figures
        self.serverRss = serverRss

    def rate(self, name):
        """
        Counter C{name} per second, rounded to 0.1.
        """
        return round(self.counts.get(name, 0) / self.seconds, 1)


class Outcome:
    """
    What a run produced.

    @ivar result: the result (JSON).
    @ivar latencies: C{{scenario name: sorted microseconds}}, for the
        scenario and the reference (C{"reference"}) if they have any.
    @ivar timelines: C{{scenario name: [(seconds, {counter: per
        second})]}}, one sample a second.
    """

    def __init__(self, result, latencies, timelines):
        self.result = result
        self.latencies = latencies
        self.timelines = timelines


class _Segment:
    """
    The part of a run one load is in the workers: its progress samples.
    """

    def __init__(self, name, rates, started):
        self.name = name
        self.rates = rates
        self.started = started
        self.samples = []


class Coordinator:
    """
    Runs one scenario, and then the reference, through worker processes.

    Scenarios' L{drive} methods use L{connect}, L{window}, L{tell},
    L{tellEach}, L{callApi}, L{usage}, L{usageSince}, L{serverRss},
    L{keepLatencies}, L{blocks} and L{phase}.

    @ivar blocks: C{(first user, count)} of each worker.
    @ivar phase: what the run is doing, for the progress line.
    @ivar servers: the gates (or echo servers) running, one per C{--gates}.
    @ivar redis: the C{redis-server} of a cluster run, or L{None}.
    """

    def __init__(self, reactor, scenario, err=sys.stderr):
        """
        @param scenario: an L{imserver.bench.scenario.Scenario}.
        @param err: where progress and notes go.
        """
        self.reactor = reactor
        self.scenario = scenario
        self.options = scenario.options
        self.err = err
        self.blocks = evenBlocks(self.options["users"], self.options["workers"])
        self.phase = "starting"
        self.workers = []
        self.servers = []
        self.redis = None
        self._target = None
        self._secret = None
        self._api = None
        self._dataDir = None
        self._segment = None
        self._started = None
        self._latencies = {}
        self._timelines = {}
        self._progress = LoopingCall(self._tick)
        self._progress.clock = reactor

    # -- the run -------------------------------------------------------------

    @inlineCallbacks
    def run(self):
        """
        Run the scenario, then the reference unless disabled.

        @return: a L{Deferred} firing with an L{Outcome}, or failing with
            L{BenchError} (or what went wrong) once every child has ended.
        """
        o = self.options
        dataDir = self._dataDir = tempfile.mkdtemp(prefix="im-bench-")
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._kill)
        self._started = self.reactor.seconds()
        try:
            yield self._startGates(dataDir)
            self.workers = [self._spawnWorker(i) for i in range(o["workers"])]
            self._progress.start(1.0, now=False)
            result = {
                "scenario": self.scenario.name,
                "users": o["users"],
                "workers": o["workers"],
                "sources": o["sources"],
                "transport": o["transport"],
                "store": o["store"] if o["gates"] == 1 else "redis",
            }
            if o["gates"] > 1:
                result["gates"] = o["gates"]
            result.update((yield self._runLoad(self.scenario)))
            yield self._stopServers()
            yield self._stopRedis()
            if o["reference"]:
                yield self._startEcho(dataDir)
                reference = yield self._runLoad(Reference(o))
                yield self._stopServers()
                result["reference"] = reference
                result["ratio_to_reference"] = ratiosTo(result, reference, self.scenario.ratios)
        finally:
            if self._progress.running:
                self._progress.stop()
            yield self._shutdown()
            self.reactor.removeSystemEventTrigger(trigger)
            shutil.rmtree(dataDir, ignore_errors=True)
        return Outcome(result, self._latencies, self._timelines)

    @inlineCallbacks
    def _runLoad(self, scenario):
        o = self.options
        self._segment = _Segment(scenario.name, scenario.rates, self.reactor.seconds())
        self._timelines[scenario.name] = self._segment.samples
        specs = [
            {
                "name": scenario.name,
                "target": self._target,
                "sources": sourceAddresses(o["host"], o["sources"]),
                "first": first,
                "count": count,
                "secret": self._secret,
                "connectWindow": o["connect-window"],
                "timeout": o["timeout"],
                "config": scenario.workerConfig(first, count),
            }
            for first, count in self.blocks
        ]
        yield self.tellEach("load", specs)
        result = yield scenario.drive(self)
        self.phase = "closing"
        finals = yield self.tell("close")
        result["errors"] = sumCounts(finals).get("errors", 0)
        return result

    # -- for scenarios -------------------------------------------------------

    def tellEach(self, command, argsList, timeout=None):
        """
        Send each worker a command, with its own arguments.

        @param argsList: one C{dict} of arguments per worker.
        @param timeout: seconds to wait for every answer (default
            C{--timeout}).
        @return: a L{Deferred} firing with the workers' results in order,
            or failing with L{BenchError} at once if the server has ended.
        """
        try:
            self._checkServer()
        except BenchError:
            return fail()
        calls = [worker.call(command, **args) for worker, args in zip(self.workers, argsList)]
        d = gatherResults(calls, consumeErrors=True).addErrback(_firstError)
        return self._bounded(d, "the workers to {}".format(command), timeout)

    def tell(self, command, **args):
        """
        Send every worker the same command.

        @return: a L{Deferred} firing with the workers' results in order.
        """
        return self.tellEach(command, [args] * len(self.workers))

    @inlineCallbacks
    def connect(self):
        """
        Connect every user.

        @return: a L{Deferred} firing with C{connected}, C{connect_failed},
            C{connect_seconds}, C{connect_per_s}, and the server's and the
            workers' CPU meanwhile (C{connect_server_cpu_percent},
            C{connect_client_cpu_percent}): which side limits the rate.
            With several gates, also C{gate_connections} (per gate) and
            C{connect_redis_cpu_percent}.
        """
        self.phase = "connecting"
        mark = self.usage()
        answers = yield self.tell("connect")
        figures = self.usageSince(mark)
        seconds = figures["seconds"]
        connected = sum(answer["connected"] for answer in answers)
        failed = sum(answer["failed"] for answer in answers)
        self.log(
            "{}: {:,} connected in {:.2f} s{}".format(
                self._segment.name,
                connected,
                seconds,
                ", {:,} failed".format(failed) if failed else "",
            )
        )
        result = {
            "connected": connected,
            "connect_failed": failed,
            "connect_seconds": seconds,
            "connect_per_s": round(connected / seconds, 1),
            "connect_server_cpu_percent": figures["server_cpu_percent"],
            "connect_client_cpu_percent": figures["client_cpu_percent"],
        }
        if len(self.servers) > 1:
            result["gate_connections"] = [
                sum(counts) for counts in zip(*(answer["gates"] for answer in answers))
            ]
        if "redis_cpu_percent" in figures:
            result["connect_redis_cpu_percent"] = figures["redis_cpu_percent"]
        return result

    @inlineCallbacks
    def window(self):
        """
        Start the traffic, warm up for C{--warmup}, measure for
        C{--duration}, stop the traffic.

        @return: a L{Deferred} firing with a L{Window}.
        """
        o = self.options
        yield self.tell("start")
        self.phase = "warming up"
        yield deferLater(self.reactor, o["warmup"])
        yield self.tell("measure")
        self.phase = "measuring"
        mark = self.usage()
        yield deferLater(self.reactor, o["duration"])
        figures = self.usageSince(mark)
        serverRss = self.serverRss()
        reports = yield self.tell("report")
        self.phase = "stopping"
        yield self.tell("stop")
        latencies = mergeSorted(report["latencies_us"] for report in reports)
        self.keepLatencies(latencies)
        return Window(
            sumCounts(report["counts"] for report in reports), latencies, figures, serverRss
        )

    @inlineCallbacks
    def callApi(self, method, path, body=None):
        """
        Call the gate's HTTP API (a scenario with C{usesApi} only) with the
        admin token.

        @param method: C{b"GET"}, C{b"POST"}, ...
        @param path: the path, C{/v1/...}.
        @param body: a JSON value to send, or L{None}.
        @return: a L{Deferred} firing with the decoded JSON answer, or
            failing with L{BenchError} for an error status or after
            C{--timeout}.
        """
        if self._api is None:
            raise BenchError("the gate was started without its HTTP API")
        url, token = self._api
        agent = Agent(self.reactor, pool=HTTPConnectionPool(self.reactor, persistent=False))
        headers = Headers({b"Authorization": [b"Bearer " + token]})
        what = "the gate's API to answer {} {}".format(method.decode("ascii"), path)
        response = yield self._bounded(
            agent.request(
                method,
                (url + path).encode("utf-8"),
                headers,
                None if body is None else _JSONBody(body),
            ),
            what,
        )
        data = yield self._bounded(readBody(response), what)
        if not 200 <= response.code < 300:
            raise BenchError(
                "{} {}: {} {}".format(
                    method.decode("ascii"),
                    path,
                    response.code,
                    data.decode("utf-8", "replace")[:500],
                )
            )
        return json.loads(data)

    def usage(self):
        """
        @return: a mark for L{usageSince}: the time and the CPU seconds of
            the servers (all gates together), of the workers and of Redis
            so far.
        @raise BenchError: if a server has ended.
        """
        self._checkServer()
        return (
            self.reactor.seconds(),
            sum(cpuSeconds(server.pid) for server in self.servers),
            sum(cpuSeconds(worker.pid) for worker in self.workers),
            cpuSeconds(self.redis.pid) if self.redis is not None else 0.0,
        )

    def usageSince(self, mark):
        """
        @return: C{seconds} since C{mark}, C{server_cpu_percent} (all gates
            together, in percent of one core) and C{client_cpu_percent}
            (all workers together) meanwhile, and C{server_rss_mb} (all
            gates together) now; with several gates also
            C{gate_rss_mb} (each gate's), and C{redis_cpu_percent} and
            C{redis_rss_mb}.
        """
        now, server, clients, redis = self.usage()
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
            figures["redis_rss_mb"] = round(rssBytes(self.redis.pid) / 2**20, 1)
        return figures

    def serverRss(self):
        """
        The servers' RSS now, all gates together, in bytes.

        @raise BenchError: if a server has ended.
        """
        self._checkServer()
        return sum(rssBytes(server.pid) for server in self.servers)

    def _checkServer(self):
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
        if self.redis is not None:
            pairs.append(("redis-server", self.redis))
        return pairs

    def keepLatencies(self, latencies):
        """
        Keep the latencies (sorted microseconds) of the current load for
        the charts.
        """
        self._latencies[self._segment.name] = latencies

    def log(self, text):
        """
        Write a note to stderr.
        """
        self.err.write("im-bench: {}\n".format(text))
        self.err.flush()

    # -- processes -----------------------------------------------------------

    @inlineCallbacks
    def _startGates(self, dataDir):
        """
        Start the gate, or with C{--gates N} > 1 a C{redis-server} and N
        gates in cluster mode sharing the data directory (the secret, the
        certificate, the admin token): the first alone, as it creates them,
        then the others.
        """
        o = self.options
        gates = o["gates"]
        redisURL = None
        if gates > 1:
            redisURL = yield self._startRedis(dataDir)
        ports = [(yield self._startGate(dataDir, 0, redisURL))]
        ports += yield gatherResults(
            [self._startGate(dataDir, i, redisURL) for i in range(1, gates)], consumeErrors=True
        ).addErrback(_firstError)
        self._secret = loadSecret(FilePath(dataDir), create=False).hex()
        tls = o["transport"] == "tls"
        self._target = {
            "host": o["host"],
            "port": ports[0],
            "ports": ports,
            "tls": tls,
            "ca": os.path.join(dataDir, CERT_FILE_NAME) if tls else None,
        }

    @inlineCallbacks
    def _startGate(self, dataDir, index, redisURL):
        """
        Start gate C{index} (the HTTP API on the first only, if the scenario
        uses it) and wait until it listens.

        @param redisURL: the cluster's Redis, or L{None} for one gate.
        @return: a L{Deferred} firing with its client port.
        """
        o = self.options
        api = self.scenario.usesApi and index == 0
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
            listenDescription(o["transport"], o["host"]),
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
        imArgs += self.scenario.gateArguments()
        server = spawnTwistd(self.reactor, imArgs, o["server-cpu"], listening=o["host"])
        self.servers.append(server)
        waits = [server.listening]
        if api:
            waits.append(server.waitFor(apiPattern(o["host"]), "its HTTP API listening"))
        listening = gatherResults(waits, consumeErrors=True).addErrback(_firstError)
        what = "the gate to listen" if o["gates"] == 1 else "gate {} to listen".format(index)
        ports = yield self._bounded(listening, what)
        if api:
            host = "[{}]".format(o["host"]) if ":" in o["host"] else o["host"]
            self._api = (
                "http://{}:{}".format(host, ports[1]),
                FilePath(dataDir).child(ADMIN_TOKEN_FILE_NAME).getContent().strip(),
            )
        return ports[0]

    @inlineCallbacks
    def _startRedis(self, dataDir):
        """
        Start C{redis-server} on a free loopback port, in C{dataDir}, without
        persistence, pinned with the gates.

        @return: a L{Deferred} firing with its C{redis://} URL.
        """
        o = self.options
        executable = redisServer()
        if executable is None:
            raise BenchError("--gates > 1 needs redis-server (Debian package redis-server)")
        host = "127.0.0.1" if ":" not in o["host"] else o["host"]
        bracketed = "[{}]".format(host) if ":" in host else host
        for attempt in range(REDIS_ATTEMPTS):
            port = freePort(host)
            argv = tasksetPrefix(o["server-cpu"]) + [
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
            ]
            self.redis = spawnServer(self.reactor, argv, listening=_REDIS_READY)
            try:
                yield self._bounded(self.redis.listening, "redis-server to start")
            except Exception:
                # Most likely the port was taken meanwhile: another one.
                redis, self.redis = self.redis, None
                self._signal(redis, "KILL")
                yield redis.whenEnded()
                if attempt == REDIS_ATTEMPTS - 1:
                    raise BenchError(
                        "redis-server did not start; its output ends with:\n" + redis.text()[-3000:]
                    )
                continue
            self.log("redis-server {} on port {}".format(executable, port))
            return "redis://{}:{}/0".format(bracketed, port)

    @inlineCallbacks
    def _startEcho(self, dataDir):
        """
        Start one echo server per gate: the same connections per process.
        """
        o = self.options
        args = [sys.executable, "-m", "imserver.bench", ECHO_COMMAND, "--host", o["host"]]
        if self._target["tls"]:
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
        ).addErrback(_firstError)
        ports = yield self._bounded(listening, "the echo server to listen")
        self._target = dict(self._target, port=ports[0], ports=ports)

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
    def _stopServers(self):
        servers, self.servers = self.servers, []
        for server in servers:
            if server.reason is None:
                self._signal(server, "TERM")
        yield gatherResults(
            [self._ended(server, "the server to stop") for server in servers], consumeErrors=True
        )

    @inlineCallbacks
    def _stopRedis(self):
        redis, self.redis = self.redis, None
        if redis is not None:
            if redis.reason is None:
                self._signal(redis, "TERM")
            yield self._ended(redis, "redis-server to stop")

    @inlineCallbacks
    def _shutdown(self):
        for worker in self.workers:
            worker.finish()
        yield gatherResults(
            [
                self._ended(worker, "worker {} to exit".format(worker.index))
                for worker in self.workers
            ],
            consumeErrors=True,
        )
        yield self._stopServers()
        yield self._stopRedis()

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

    def _kill(self):
        """
        The reactor is stopping under us (Ctrl-C): leave no child and no
        data directory behind.
        """
        for process in self.workers + self.servers + [self.redis]:
            if process is not None:
                self._signal(process, "KILL")
        shutil.rmtree(self._dataDir, ignore_errors=True)

    @staticmethod
    def _signal(process, signal):
        try:
            process.transport.signalProcess(signal)
        except ProcessExitedAlready:
            pass

    def _bounded(self, d, what, timeout=None):
        """
        C{d}, failing with L{BenchError} after C{timeout} (default
        C{--timeout}) seconds.
        """
        seconds = self.options["timeout"] if timeout is None else timeout

        def timedOut(failure):
            failure.trap(TimeoutError)
            raise BenchError("timed out after {} s waiting for {}".format(seconds, what))

        return d.addTimeout(seconds, self.reactor).addErrback(timedOut)

    # -- progress ------------------------------------------------------------

    def _tick(self):
        segment = self._segment
        now = self.reactor.seconds()
        current = [
            worker
            for worker in self.workers
            if worker.progress is not None and worker.progress[0] == segment.name
        ]
        totals = sumCounts(worker.progress[2] for worker in current)
        rates = sumCounts(
            ratesBetween(worker.previous[1:], worker.progress[1:])
            for worker in current
            if worker.previous is not None
        )
        segment.samples.append(
            (
                round(now - segment.started, 2),
                {name: round(rates.get(name, 0.0), 1) for name in segment.rates},
            )
        )
        if now - self._started >= PROGRESS_AFTER and totals:
            self.err.write(
                formatProgress(
                    segment.name, self.phase, now - self._started, totals, rates, segment.rates
                )
                + "\n"
            )
            self.err.flush()
