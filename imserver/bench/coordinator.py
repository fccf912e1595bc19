# -*- test-case-name: tests.test_bench -*-
"""
The bench's main process: it starts the gate (pinned to C{--server-cpu};
with C{--gates N} > 1, its own C{redis-server} and N gates in cluster mode),
the client workers (pinned to C{--client-cpu}), loads the scenario into the
workers, runs its phases, then does the same with the echo reference in
place of the gate, and gathers one result.  It shows progress on stderr
once a second and stops every child process when it ends, however it ends.
The child processes themselves are L{imserver.bench.processes}'s.
"""

import json
import shutil
import sys
import tempfile

from twisted.internet.defer import fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from imserver.bench.options import cpuCount, isWebSocket, overTLS, sourceAddresses
from imserver.bench.processes import BenchError, Processes, bounded, firstError
from imserver.bench.reference import Reference
from imserver.bench.stats import (
    evenBlocks,
    formatProgress,
    latenessSummary,
    mergeSorted,
    ratesBetween,
    ratiosTo,
    sumCounts,
)

#: Seconds into a run after which the progress line is shown.
PROGRESS_AFTER = 3.0
#: Percent of their cores above which the workers, not the server, may
#: have set the pace: the figures are then flagged (C{client_bound}).
CLIENT_CPU_LIMIT = 85.0
#: Milliseconds of p99 lateness (an open loop's sends after their scheduled
#: time) above which the run says on stderr that the clients ran late.
LATENESS_LIMIT_MS = 2.0


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
        C{client_cpu_percent}, C{client_bound} (L{Coordinator.clientBound})
        and C{server_rss_mb}, for the result; with an open loop also
        C{lateness_ms} (L{Coordinator.lateness}).
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
    @ivar processes: the run's L{Processes}.
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
        self.processes = Processes(reactor, self.options, self.log)
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
        Run the scenario, then the reference unless disabled.  The result
        says whether the run is C{valid}: no errors, and the workers were
        not the limit while measuring (L{clientBound}).

        @return: a L{Deferred} firing with an L{Outcome}, or failing with
            L{BenchError} (or what went wrong) once every child has ended.
        """
        o = self.options
        dataDir = self._dataDir = tempfile.mkdtemp(prefix="im-bench-")
        trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._kill)
        self._started = self.reactor.seconds()
        try:
            yield self.processes.startGates(dataDir, self.scenario)
            self.processes.spawnWorkers()
            self._progress.start(1.0, now=False)
            result = {
                "scenario": self.scenario.name,
                "users": o["users"],
                "workers": o["workers"],
                "sources": o["sources"],
                "transport": o["transport"],
                "store": o["store"],
            }
            if o["gates"] > 1:
                result["gates"] = o["gates"]
            result.update((yield self._runLoad(self.scenario)))
            result["valid"] = not result["errors"] and not result.get("client_bound")
            yield self.processes.stopServers()
            yield self.processes.stopRedis()
            if o["reference"]:
                yield self.processes.startEcho(dataDir)
                reference = yield self._runLoad(Reference(o))
                yield self.processes.stopServers()
                if isWebSocket(o["transport"]):
                    # The echo runs on what is under the WebSocket.
                    reference["transport"] = "tls" if overTLS(o["transport"]) else "tcp"
                result["reference"] = reference
                result["ratio_to_reference"] = ratiosTo(result, reference, self.scenario.ratios)
        finally:
            if self._progress.running:
                self._progress.stop()
            yield self.processes.shutdown()
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
                "target": self.processes.target,
                "sources": sourceAddresses(o["host"], o["sources"]),
                "first": first,
                "count": count,
                "secret": self.processes.secret,
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
            self.processes.checkServer()
        except BenchError:
            return fail()
        workers = self.processes.workers
        calls = [worker.call(command, **args) for worker, args in zip(workers, argsList)]
        d = gatherResults(calls, consumeErrors=True).addErrback(firstError)
        return self._bounded(d, "the workers to {}".format(command), timeout)

    def tell(self, command, **args):
        """
        Send every worker the same command.

        @return: a L{Deferred} firing with the workers' results in order.
        """
        return self.tellEach(command, [args] * len(self.processes.workers))

    @inlineCallbacks
    def connect(self):
        """
        Connect every user.

        @return: a L{Deferred} firing with C{connected}, C{connect_failed},
            C{connect_seconds}, C{connect_per_s}, and the server's and the
            workers' CPU meanwhile (C{connect_server_cpu_percent},
            C{connect_client_cpu_percent}, and C{connect_client_bound}, see
            L{clientBound}): which side limits the rate.
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
            "connect_client_bound": self.clientBound(figures, "connecting"),
        }
        if len(self.processes.servers) > 1:
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
        figures["client_bound"] = self.clientBound(figures, "measuring")
        serverRss = self.serverRss()
        reports = yield self.tell("report")
        self.phase = "stopping"
        yield self.tell("stop")
        latencies = mergeSorted(report["latencies_us"] for report in reports)
        self.keepLatencies(latencies)
        lateness = [report["lateness_us"] for report in reports if "lateness_us" in report]
        if lateness:
            figures["lateness_ms"] = self.lateness(mergeSorted(lateness))
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
        if self.processes.api is None:
            raise BenchError("the gate was started without its HTTP API")
        url, token = self.processes.api
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

    def clientBound(self, figures, what):
        """
        Whether the workers used more than L{CLIENT_CPU_LIMIT} percent of
        their cores (C{--client-cpu}) over C{figures}: then they, not the
        server, may have set the pace, and the rates measured are not the
        server's.  Says so on stderr.

        @param figures: from L{usageSince}.
        @param what: the phase, for the note.
        """
        cores = cpuCount(self.options["client-cpu"])
        percent = figures["client_cpu_percent"] / cores
        if percent <= CLIENT_CPU_LIMIT:
            return False
        self.log(
            "{}: the workers used {:.0f} % of their {} core(s) while {} (over {:.0f} %): "
            "the clients may have been the limit, not the server".format(
                self._segment.name, percent, cores, what, CLIENT_CPU_LIMIT
            )
        )
        return True

    def lateness(self, sortedMicroseconds):
        """
        Summarise how late the workers' open loops sent (each send's actual
        time minus its scheduled time, which latencies are measured from,
        so they include it); say so on stderr if the p99 is over
        L{LATENESS_LIMIT_MS}: the clients, not the server, then account for
        part of the latency.

        @param sortedMicroseconds: every lateness of the window, sorted.
        @return: L{latenessSummary}.
        """
        summary = latenessSummary(sortedMicroseconds)
        if summary["p99"] is not None and summary["p99"] > LATENESS_LIMIT_MS:
            self.log(
                "{}: the clients sent late: lateness p50 {} ms, p99 {} ms, max {} ms after the "
                "scheduled times (over {} ms at p99); the latencies include it".format(
                    self._segment.name,
                    summary["p50"],
                    summary["p99"],
                    summary["max"],
                    LATENESS_LIMIT_MS,
                )
            )
        return summary

    def usage(self):
        """
        @return: a mark for L{usageSince} (L{Processes.usage}).
        @raise BenchError: if a server has ended.
        """
        return self.processes.usage()

    def usageSince(self, mark):
        """
        @return: what the processes used since C{mark}
            (L{Processes.usageSince}).
        """
        return self.processes.usageSince(mark)

    def serverRss(self):
        """
        The servers' RSS now, all gates together, in bytes.

        @raise BenchError: if a server has ended.
        """
        return self.processes.serverRss()

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

    def _kill(self):
        """
        The reactor is stopping under us (Ctrl-C): leave no child and no
        data directory behind.
        """
        self.processes.kill()
        shutil.rmtree(self._dataDir, ignore_errors=True)

    def _bounded(self, d, what, timeout=None):
        """
        C{d}, failing with L{BenchError} after C{timeout} (default
        C{--timeout}) seconds.
        """
        seconds = self.options["timeout"] if timeout is None else timeout
        return bounded(self.reactor, d, seconds, what)

    # -- progress ------------------------------------------------------------

    def _tick(self):
        segment = self._segment
        now = self.reactor.seconds()
        current = [
            worker
            for worker in self.processes.workers
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
