# -*- test-case-name: tests.test_bench -*-
"""
Tests of C{im-bench} (L{imserver.bench}) and of L{imserver.spawn}: unit
tests of their pure pieces, and smoke tests that run each scenario (and the
echo reference, and the charts) for a second or so against a real spawned
gate and real worker processes.  The smoke tests assert that traffic flowed
and nothing failed, never how fast (timings belong in docs/performance.md,
not in tests).
"""

import base64
import collections
import io
import itertools
import json
import math
import random
import shutil
import statistics
import struct
import sys
import time
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone, ProcessDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.bench import options as bench_options, websocket
from imserver.bench.arrivals import (
    BUSY,
    TICK,
    Arrivals,
    arrivalTimes,
    burstTimes,
    evenTimes,
    poissonTimes,
)
from imserver.bench.cli import writeReport
from imserver.bench.control import ControlProtocol, LineBuffer, WorkerError, WorkerProcess
from imserver.bench.coordinator import Coordinator, _Segment
from imserver.bench.fanout import GROUP, Fanout, FanoutLoad, MemberClient
from imserver.bench.hold import Hold
from imserver.bench.options import cpuCount, loopback, sourceAddresses
from imserver.bench.p2p import P2P, P2PLoad
from imserver.bench.ping import Ping
from imserver.bench.plot import cdfPoints
from imserver.bench.scenario import gateOf
from imserver.bench.stats import (
    evenBlocks,
    formatProgress,
    latencySummary,
    latenessSummary,
    mergeSorted,
    percentile,
    ratesBetween,
    ratiosTo,
    shares,
    sumCounts,
)
from imserver.bench.storm import Storm
from imserver.bench.websocket import (
    HandshakeError,
    WebSocketClientEndpoint,
    WebSocketFramer,
    acceptValue,
    upgradeRequest,
)
from imserver.bench.worker import Worker
from imserver.framing import lengthPrefixed
from imserver.pb import im_pb2 as pb
from imserver.spawn import (
    NotListening,
    TwistdProcess,
    apiPattern,
    childEnvironment,
    tasksetPrefix,
    twistdArgv,
    webPattern,
)
from imserver.web import jsonframes
from imserver.wire import EncodedMessage

from tests.support import requireExecutable

#: Every smoke run: unpinned, so the tests run on any machine.
UNPINNED = ["--server-cpu", "", "--client-cpu", ""]


class StatsTests(SynchronousTestCase):
    """
    L{imserver.bench.stats}.
    """

    def test_percentile(self):
        """
        Nearest-rank percentiles of sorted values; L{None} for no values.
        """
        values = list(range(1, 101))
        self.assertEqual(percentile(values, 0.5), 50)
        self.assertEqual(percentile(values, 0.99), 99)
        self.assertEqual(percentile(values, 1.0), 100)
        self.assertIsNone(percentile([], 0.5))

    def test_latencySummary(self):
        """
        Microseconds in, milliseconds out; L{None} everywhere for no values.
        """
        summary = latencySummary(list(range(1000, 1001000, 1000)))
        self.assertEqual(summary, {"p50": 500.0, "p99": 990.0, "p999": 999.0, "max": 1000.0})
        self.assertEqual(latencySummary([]), {"p50": None, "p99": None, "p999": None, "max": None})

    def test_evenBlocks(self):
        """
        Users are split as evenly as possible into consecutive blocks of even
        sizes (pairs stay together); an odd user goes to the last block.
        """
        self.assertEqual(evenBlocks(8, 2), [(0, 4), (4, 4)])
        self.assertEqual(evenBlocks(10, 3), [(0, 4), (4, 4), (8, 2)])
        self.assertEqual(evenBlocks(7, 2), [(0, 4), (4, 3)])
        self.assertEqual(evenBlocks(1, 1), [(0, 1)])
        for users, workers in [(400, 3), (18001, 2), (2, 1)]:
            blocks = evenBlocks(users, workers)
            self.assertEqual(sum(count for first, count in blocks), users)
            self.assertTrue(all(first % 2 == 0 for first, count in blocks))

    def test_shares(self):
        """
        A total is split in proportion to the weights, adding up exactly.
        """
        self.assertEqual(shares(10, [4, 4, 2]), [4, 4, 2])
        self.assertEqual(shares(5, [4, 4, 2]), [2, 2, 1])
        self.assertEqual(sum(shares(1000, [6667, 6667, 6666])), 1000)
        self.assertEqual(shares(0, [3, 3]), [0, 0])

    def test_aggregation(self):
        """
        Counters of several workers add up by name; their sorted latencies
        merge into one sorted list.
        """
        self.assertEqual(sumCounts([{"a": 1, "b": 2}, {"a": 3, "c": 1}]), {"a": 4, "b": 2, "c": 1})
        self.assertEqual(sumCounts([]), {})
        self.assertEqual(mergeSorted([[1, 5, 9], [], [2, 5, 10]]), [1, 2, 5, 5, 9, 10])

    def test_ratesBetween(self):
        """
        Rates are the counters' gains over the time between two samples.
        """
        self.assertEqual(
            ratesBetween((10.0, {"a": 100, "b": 5}), (10.5, {"a": 300, "b": 5})),
            {"a": 400.0, "b": 0.0},
        )
        self.assertEqual(ratesBetween((1.0, {"a": 1}), (1.0, {"a": 2})), {"a": 0.0})

    def test_ratiosTo(self):
        """
        Each mapped figure is divided by the reference's; missing or zero
        figures are left out.
        """
        ratios = ratiosTo(
            {"requests_per_s": 30000.0, "connect_per_s": 900.0, "x": 1},
            {"requests_per_s": 60000.0, "connect_per_s": 0},
            {
                "requests_per_s": "requests_per_s",
                "connect_per_s": "connect_per_s",
                "missing": "requests_per_s",
            },
        )
        self.assertEqual(ratios, {"requests_per_s": 0.5})

    def test_formatProgress(self):
        """
        One line: scenario, elapsed seconds, phase, then every counter, with
        its rate for the rate counters.
        """
        line = formatProgress(
            "ping",
            "measuring",
            12.4,
            {"connected": 1000, "requests": 123456, "errors": 0},
            {"connected": 0.0, "requests": 35210.4},
            ("requests",),
        )
        self.assertEqual(
            line,
            "im-bench ping   12s measuring: connected 1,000  requests 123,456 (35,210/s)  errors 0",
        )
        self.assertNotIn("\n", line)

    def test_cdfPoints(self):
        """
        The CDF of a few values is all of them; of many, a thinned set that
        keeps the largest.
        """
        self.assertEqual(cdfPoints([1, 2, 3, 4]), ([1, 2, 3, 4], [0.25, 0.5, 0.75, 1.0]))
        values, fractions = cdfPoints(list(range(100000)), points=100)
        self.assertLessEqual(len(values), 102)
        self.assertEqual((values[-1], fractions[-1]), (99999, 1.0))
        self.assertEqual(cdfPoints([]), ([], []))


class GateOfTests(SynchronousTestCase):
    """
    L{gateOf}: which gate each user connects to.
    """

    def test_pairsSpanGates(self):
        """
        With several gates every pair (C{i}, C{i ^ 1}) is on two gates and
        the senders (even users) are spread evenly; with one gate all are
        on it.
        """
        self.assertEqual({gateOf(i, 1) for i in range(100)}, {0})
        for gates in 2, 3, 4:
            users = 24 * gates
            for i in range(0, users, 2):
                self.assertNotEqual(gateOf(i, gates), gateOf(i ^ 1, gates))
            senders = [gateOf(i, gates) for i in range(0, users, 2)]
            self.assertEqual(
                [senders.count(g) for g in range(gates)], [users // 2 // gates] * gates
            )
            everyone = [gateOf(i, gates) for i in range(users)]
            self.assertEqual([everyone.count(g) for g in range(gates)], [users // gates] * gates)


class OptionsTests(SynchronousTestCase):
    """
    The options of the scenarios (L{imserver.bench.options}).
    """

    def setUp(self):
        self.patch(bench_options, "fileLimit", lambda: 20000)

    def parse(self, scenario, *args):
        """
        Parse C{args} as the options of C{scenario}.
        """
        options = scenario.Options()
        options.parseOptions(list(args))
        return options

    def test_gateOption(self):
        """
        C{--gate-option} collects long options for the gates, in order, and
        refuses anything else.
        """
        self.assertEqual(self.parse(P2P)["gate-options"], [])
        options = self.parse(
            P2P, "--gate-option=--store-commit-delay=0", "--gate-option", "--max-unacked=10"
        )
        self.assertEqual(options["gate-options"], ["--store-commit-delay=0", "--max-unacked=10"])
        self.assertRaises(UsageError, self.parse, P2P, "--gate-option", "x")

    def test_loopbackOnly(self):
        """
        Only literal loopback addresses are accepted as the target.
        """
        self.assertEqual(loopback("127.0.0.1"), "127.0.0.1")
        self.assertEqual(loopback("127.9.8.7"), "127.9.8.7")
        self.assertEqual(loopback("0:0:0:0:0:0:0:1"), "::1")
        for address in [
            "10.0.0.1",
            "192.168.1.5",
            "0.0.0.0",
            "::",
            "2001:db8::1",
            "localhost",
            "example.com",
        ]:
            self.assertRaises(UsageError, loopback, address)

    def test_refusesNonLoopbackHost(self):
        """
        Every scenario refuses a C{--host} beyond loopback.
        """
        for scenario in (Fanout, Hold, P2P, Ping, Storm):
            error = self.assertRaises(UsageError, self.parse, scenario, "--host", "10.1.2.3")
            self.assertIn("not a loopback address", str(error))

    def test_workersAndSources(self):
        """
        By default each worker holds at most 15,000 connections and each
        source address carries at most 10,000; an IPv6 target has one source.
        """
        options = self.parse(Ping, "--users", "16000")
        self.assertEqual((options["workers"], options["sources"]), (2, 2))
        options = self.parse(Ping, "--users", "400")
        self.assertEqual((options["workers"], options["sources"]), (1, 1))
        self.assertEqual(sourceAddresses("127.0.0.1", 3), ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        options = self.parse(Ping, "--host", "::1")
        self.assertEqual(sourceAddresses(options["host"], options["sources"]), [None])
        self.assertRaises(UsageError, self.parse, Ping, "--host", "::1", "--sources", "2")

    def test_limits(self):
        """
        The gate holds every connection: more users than its file limit
        allows are refused, and so are more per source address than the
        ephemeral ports allow.
        """
        error = self.assertRaises(UsageError, self.parse, Ping, "--users", "19001")
        self.assertIn("RLIMIT_NOFILE", str(error))
        self.assertEqual(self.parse(Ping, "--users", "19000")["workers"], 2)
        self.patch(bench_options, "fileLimit", lambda: 100000)
        error = self.assertRaises(
            UsageError, self.parse, Ping, "--users", "30000", "--sources", "1"
        )
        self.assertIn("--sources", str(error))
        self.assertEqual(self.parse(Ping, "--users", "30000")["sources"], 3)

    def test_gates(self):
        """
        With C{--gates}, each gate (not the machine) holds at most its file
        budget; 100,000 users need 6 gates, 7 workers and 10 sources by
        default; C{--gates} > 1 needs redis-server.
        """
        self.patch(bench_options, "redisServer", lambda: "/usr/bin/redis-server")
        options = self.parse(Hold, "--users", "100000", "--gates", "6")
        self.assertEqual((options["gates"], options["workers"], options["sources"]), (6, 7, 10))
        error = self.assertRaises(UsageError, self.parse, Hold, "--users", "100000", "--gates", "5")
        self.assertIn("--gates", str(error))
        error = self.assertRaises(
            UsageError, self.parse, Hold, "--users", "38000", "--gates", "2", "--workers", "1"
        )
        self.assertIn("--workers", str(error))
        self.assertRaises(UsageError, self.parse, Hold, "--gates", "0")
        self.assertEqual(self.parse(Hold)["gates"], 1)
        self.patch(bench_options, "redisServer", lambda: None)
        error = self.assertRaises(UsageError, self.parse, Hold, "--gates", "2")
        self.assertIn("redis-server", str(error))
        self.assertEqual(self.parse(Hold, "--gates", "1")["gates"], 1)
        error = self.assertRaises(UsageError, self.parse, Hold, "--store", "redis")
        self.assertIn("redis-server", str(error))

    def test_store(self):
        """
        C{--store} is sqlite, memory or redis; with C{--gates} > 1 it is
        always redis.
        """
        self.patch(bench_options, "redisServer", lambda: "/usr/bin/redis-server")
        self.assertEqual(self.parse(P2P)["store"], "sqlite")
        self.assertEqual(self.parse(P2P, "--store", "redis")["store"], "redis")
        self.assertEqual(self.parse(P2P, "--gates", "2")["store"], "redis")
        error = self.assertRaises(UsageError, self.parse, P2P, "--store", "mysql")
        self.assertIn("--store", str(error))
        options = self.parse(P2P, "--store", "redis", "--redis-replicas", "1")
        self.assertEqual(options["redis-replicas"], 1)
        self.patch(bench_options, "redisCli", lambda: "/usr/bin/redis-cli")
        options = self.parse(P2P, "--redis-cluster", "3")
        self.assertEqual((options["redis-cluster"], options["store"]), (3, "redis"))
        for argv in [["--redis-cluster", "2"], ["--redis-cluster", "3", "--redis-replicas", "1"]]:
            error = self.assertRaises(UsageError, self.parse, P2P, *argv)
            self.assertIn("--redis-", str(error))
        self.patch(bench_options, "redisCli", lambda: None)
        error = self.assertRaises(UsageError, self.parse, P2P, "--redis-cluster", "3")
        self.assertIn("redis-cli", str(error))
        for argv in [["--redis-replicas", "1"], ["--store", "redis", "--redis-replicas", "2"]]:
            error = self.assertRaises(UsageError, self.parse, P2P, *argv)
            self.assertIn("--redis-replicas", str(error))

    def test_values(self):
        """
        Bad values are refused: odd pairs, workers beyond half the users,
        storm drops beyond the users, durations out of range.
        """
        self.assertRaises(UsageError, self.parse, P2P, "--users", "7")
        self.assertRaises(UsageError, self.parse, Ping, "--users", "0")
        self.assertRaises(UsageError, self.parse, Ping, "--users", "4", "--workers", "3")
        self.assertRaises(UsageError, self.parse, Ping, "--duration", "0")
        self.assertRaises(UsageError, self.parse, Ping, "--transport", "quic")
        self.assertRaises(UsageError, self.parse, Storm, "--users", "4", "--drop", "5")
        self.assertRaises(UsageError, self.parse, Hold, "--users", "5", "--seed-profile")
        self.patch(bench_options.importlib.util, "find_spec", lambda name: None)
        error = self.assertRaises(UsageError, self.parse, Ping, "--plot", "charts")
        self.assertIn("matplotlib", str(error))
        self.assertEqual(self.parse(Storm, "--users", "10")["drop"], 5)

    def test_fanout(self):
        """
        C{fanout} has 1000 members by default, C{--users} is the same as
        C{--members}, and members ack well within the gate's window.
        """
        self.assertEqual(self.parse(Fanout)["users"], 1000)
        options = self.parse(Fanout, "--members", "7")
        self.assertEqual((options["members"], options["users"]), (7, 7))
        options = self.parse(Fanout, "--users", "9")
        self.assertEqual((options["members"], options["users"]), (9, 9))
        self.assertRaises(UsageError, self.parse, Fanout, "--members", "1")
        self.assertRaises(UsageError, self.parse, Fanout, "--ack-every", "0")
        self.assertRaises(UsageError, self.parse, Fanout, "--ack-every", "129")
        self.assertRaises(UsageError, self.parse, Fanout, "--body", "4")
        self.assertRaises(UsageError, self.parse, Fanout, "--inflight", "0")
        arguments = Fanout(self.parse(Fanout, "--members", "3000")).gateArguments()
        self.assertEqual(arguments[arguments.index("--max-group-size") + 1], "3000")
        self.assertGreater(
            int(arguments[arguments.index("--max-unacked") + 1]),
            2 * self.parse(Fanout)["ack-every"],
        )

    def test_arrivals(self):
        """
        The open-loop scenarios take C{--arrivals} (even by default, poisson
        or burst, nothing else) and C{--seed}; each worker gets them with
        its phase, the share of the users before it.
        """
        for scenario in (P2P, Fanout, Hold):
            options = self.parse(scenario)
            self.assertEqual((options["arrivals"], options["seed"]), ("even", 0))
            for kind in ("poisson", "burst"):
                self.assertEqual(self.parse(scenario, "--arrivals", kind)["arrivals"], kind)
            error = self.assertRaises(UsageError, self.parse, scenario, "--arrivals", "bursty")
            self.assertEqual(str(error), "--arrivals is even, poisson or burst")
            self.assertRaises(UsageError, self.parse, scenario, "--seed", "x")
        options = self.parse(
            P2P, "--users", "400", "--workers", "2", "--rate", "2000", "--arrivals", "poisson",
            "--seed", "7",
        )  # fmt: skip
        config = P2P(options).workerConfig(200, 200)
        self.assertEqual(
            (config["rate"], config["arrivals"], config["seed"], config["phase"]),
            (1000.0, "poisson", 7, 0.5),
        )
        self.assertEqual(Fanout(self.parse(Fanout)).workerConfig(0, 1000)["phase"], 0.0)
        self.assertEqual(Hold(self.parse(Hold)).workerConfig(100, 100)["phase"], 0.25)
        self.assertNotIn("arrivals", self.parse(Ping))

    def test_transports(self):
        """
        C{hold}, C{ping} and C{p2p} run over tcp, tls, ws and wss; the other
        scenarios refuse a WebSocket with a message saying which take it.
        """
        for scenario in (Hold, Ping, P2P):
            for transport in ("tcp", "tls", "ws", "wss"):
                self.assertEqual(
                    self.parse(scenario, "--transport", transport)["transport"], transport
                )
        for scenario in (Fanout, Storm):
            self.assertEqual(self.parse(scenario, "--transport", "tls")["transport"], "tls")
            error = self.assertRaises(UsageError, self.parse, scenario, "--transport", "ws")
            self.assertIn("hold, ping and p2p", str(error))
            self.assertIn("tcp or tls", str(error))
        error = self.assertRaises(UsageError, self.parse, Ping, "--transport", "udp")
        self.assertEqual(str(error), "--transport is tcp, tls, ws or wss")

    def test_cpuLists(self):
        """
        C{--server-cpu} and C{--client-cpu} are C{taskset} CPU lists (or
        C{""}, unpinned), counted for the client CPU check.
        """
        self.assertEqual([cpuCount(c) for c in ("1", "0-3", "0,2", "0-1,3")], [1, 4, 2, 3])
        self.assertGreaterEqual(cpuCount(""), 1)
        for bad in ("x", "3-1", "1,", "-1"):
            self.assertRaises(UsageError, cpuCount, bad)
        self.assertRaises(UsageError, self.parse, Ping, "--client-cpu", "one")

    def test_clientBound(self):
        """
        A window in which the workers used more than 85 % of their cores
        (C{--client-cpu}) is flagged, and said so on stderr.
        """
        for cpus, below, above in [("1", 85.0, 86.0), ("0-1", 170.0, 171.0)]:
            err = io.StringIO()
            coordinator = Coordinator(Clock(), Ping(self.parse(Ping, "--client-cpu", cpus)), err)
            coordinator._segment = _Segment("ping", (), 0.0)
            self.assertFalse(coordinator.clientBound({"client_cpu_percent": below}, "measuring"))
            self.assertEqual(err.getvalue(), "")
            self.assertTrue(coordinator.clientBound({"client_cpu_percent": above}, "measuring"))
            self.assertIn("ping: the workers used 86 % of their", err.getvalue())

    def test_referenceFlags(self):
        """
        The reference is on unless C{--no-reference}.
        """
        self.assertTrue(self.parse(Ping)["reference"])
        self.assertFalse(self.parse(Ping, "--no-reference")["reference"])
        self.assertTrue(self.parse(Ping, "--no-reference", "--reference")["reference"])


class ControlTests(SynchronousTestCase):
    """
    The JSON-lines channel between the coordinator and its workers.
    """

    def test_lineBuffer(self):
        """
        Lines are returned once complete, however the bytes are split.
        """
        lines = LineBuffer()
        self.assertEqual(lines.feed(b'{"a":'), [])
        self.assertEqual(lines.feed(b' 1}\n{"b"'), [b'{"a": 1}'])
        self.assertEqual(lines.feed(b": 2}\n\n"), [b'{"b": 2}', b""])
        self.assertEqual(lines.feed(b"x\ny\n"), [b"x", b"y"])

    def test_workerProcess(self):
        """
        A command is one JSON line; the answer with its id fires its
        L{Deferred}, an error answer fails it, progress samples are kept,
        and the worker ending fails what is still outstanding.
        """
        worker = WorkerProcess(0)
        worker.transport = StringTransport()
        first = worker.call("connect")
        second = worker.call("report", x=1)
        self.assertEqual(
            [json.loads(line) for line in worker.transport.value().splitlines()],
            [{"id": 1, "cmd": "connect", "args": {}}, {"id": 2, "cmd": "report", "args": {"x": 1}}],
        )
        worker.outReceived(
            b'{"event": "progress", "load": "ping", "t": 1.0, '
            b'"counts": {"requests": 5}}\n{"id": 1, "res'
        )
        worker.outReceived(b'ult": {"connected": 2}}\n')
        self.assertEqual(self.successResultOf(first), {"connected": 2})
        self.assertEqual(worker.progress, ("ping", 1.0, {"requests": 5}))
        worker.outReceived(
            b'{"event": "progress", "load": "ping", "t": 1.5, "counts": {"requests": 9}}\n'
        )
        self.assertEqual(worker.previous, ("ping", 1.0, {"requests": 5}))
        third = worker.call("stop")
        worker.outReceived(b'{"id": 3, "error": "no load"}\n')
        self.assertIn("no load", str(self.failureResultOf(third, WorkerError).value))
        worker.processEnded(Failure(RuntimeError("gone")))
        self.assertIn("gone", str(self.failureResultOf(second, WorkerError).value))
        self.failureResultOf(worker.call("stop"), WorkerError)

    def test_controlProtocol(self):
        """
        The worker side answers each command with its result or its error,
        and reports progress of the load it runs.
        """

        class FakeLoad:
            counts = {"connected": 0}
            closing = False

            def __init__(self, reactor, spec, err):
                self.spec = spec

            def on_connect(self):
                self.counts = {"connected": 3}
                return {"connected": 3}

            def on_close(self):
                self.closing = True
                return succeed(self.counts)

        clock = Clock()
        worker = Worker(clock, {"fake": FakeLoad}, err=io.StringIO())
        control = worker.control = ControlProtocol(worker)
        transport = StringTransport()
        control.makeConnection(transport)
        for command in [
            {"id": 1, "cmd": "connect", "args": {}},
            {"id": 2, "cmd": "load", "args": {"name": "fake", "first": 0}},
            {"id": 3, "cmd": "connect", "args": {}},
            {"id": 4, "cmd": "load", "args": {"name": "nope"}},
        ]:
            control.dataReceived(json.dumps(command).encode() + b"\n")
        clock.advance(0.5)
        answers = [json.loads(line) for line in transport.value().splitlines()]
        self.assertEqual(answers[0], {"id": 1, "error": "unknown command 'connect'"})
        self.assertEqual(
            answers[1:3], [{"id": 2, "result": None}, {"id": 3, "result": {"connected": 3}}]
        )
        self.assertIn("nope", answers[3]["error"])
        self.assertEqual(
            answers[4], {"event": "progress", "load": "fake", "t": 0.5, "counts": {"connected": 3}}
        )
        worker.shutdown()
        self.successResultOf(worker.done)


class _Sender:
    """
    A session of an open-loop load (L{P2PLoad}): it records what it sends
    and acks, and every send is answered at once.
    """

    connected = 1

    def __init__(self, index):
        self.index = index
        self.sent = []
        self.acked = []

    def send(self, to, body, clientMsgId, **kwargs):
        self.sent.append((to, body))
        return succeed(None)

    def ack(self, seq):
        self.acked.append(seq)


class ArrivalsTests(SynchronousTestCase):
    """
    The open loop: its arrival processes and its clock
    (L{imserver.bench.arrivals}), and loads measuring latency from each
    message's scheduled time.
    """

    @staticmethod
    def take(times, count):
        """
        The first C{count} times of an arrival process.
        """
        return list(itertools.islice(times, count))

    def test_evenTimes(self):
        """
        Even arrivals are 1 / rate apart, on a grid anchored at time 0 of
        the clock, from the first at or after the start; two workers at half
        the rate with phases 0 and 0.5 make one even schedule together,
        whenever each starts.
        """
        times = self.take(evenTimes(250, 10.0011), 1000)
        self.assertAlmostEqual(times[0], 10.004)
        for earlier, later in zip(times, times[1:]):
            self.assertAlmostEqual(later - earlier, 0.004)
        self.assertEqual(self.take(evenTimes(128, 2.0), 3), [2.0, 2 + 1 / 128, 2 + 2 / 128])
        merged = sorted(
            self.take(evenTimes(125, 3.0), 500) + self.take(evenTimes(125, 3.0021, 0.5), 500)
        )
        for got, expected in zip(merged, self.take(evenTimes(250, 3.0), 1000)):
            self.assertAlmostEqual(got, expected, places=9)

    def test_poissonTimes(self):
        """
        Poisson arrivals have the mean rate (within 2 % over 20,000 for a
        fixed seed) and gaps spread as an exponential's (standard deviation
        the mean); the same seed gives the same times, another seed others.
        """
        times = self.take(poissonTimes(1000, 5.0, random.Random("7:0")), 20000)
        gaps = [later - earlier for earlier, later in zip([5.0] + times, times)]
        mean = statistics.fmean(gaps)
        # (Trial's assertAlmostEqual has no delta.)
        self.assertLess(abs(mean / 0.001 - 1), 0.02)
        self.assertLess(abs(statistics.pstdev(gaps) / mean - 1), 0.03)
        self.assertTrue(all(gap >= 0 for gap in gaps))
        self.assertEqual(self.take(poissonTimes(1000, 5.0, random.Random("7:0")), 100), times[:100])
        self.assertNotEqual(
            self.take(poissonTimes(1000, 5.0, random.Random("7:200")), 100), times[:100]
        )

    def test_burstTimes(self):
        """
        Burst arrivals come every 10 ms after the start, as many at once as
        are due, the fraction carried over: 2, 3, 2, 3... at 250/s.
        """
        times = self.take(burstTimes(250, 1.0), 250)
        bursts = collections.Counter(round(t, 9) for t in times)
        self.assertEqual(len(bursts), 100)
        self.assertEqual(sorted(bursts)[:3], [1.01, 1.02, 1.03])
        self.assertEqual([bursts[t] for t in sorted(bursts)][:4], [2, 3, 2, 3])
        self.assertAlmostEqual(times[-1], 2.0)

    def test_arrivalTimes(self):
        """
        L{arrivalTimes} names the three processes.
        """
        self.assertEqual(self.take(arrivalTimes("even", 128, 1.0), 2), [1.0, 1 + 1 / 128])
        self.assertEqual(
            self.take(arrivalTimes("poisson", 10, 1.0, rng=random.Random(3)), 5),
            self.take(poissonTimes(10, 1.0, random.Random(3)), 5),
        )
        self.assertEqual(
            self.take(arrivalTimes("burst", 250, 1.0), 5), self.take(burstTimes(250, 1.0), 5)
        )
        self.assertRaises(ValueError, arrivalTimes, "bursty", 10, 0.0)

    def clockAt(self, seconds):
        """
        A L{Clock} at C{seconds}.
        """
        clock = Clock()
        clock.advance(seconds)
        return clock

    def test_onTime(self):
        """
        Each message is fired with its due time once that time has come; a
        clock waking on time means no lateness; one timer at most is
        pending, and stopping cancels it.
        """
        clock = self.clockAt(2.0)
        fired, late = [], []
        arrivals = Arrivals(
            clock, evenTimes(128, 2.0), fired.append, late.append, now=clock.seconds
        )
        arrivals.start()
        clock.advance(0)
        for _ in range(128):
            clock.advance(1 / 128)
            self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(fired, [2.0 + k / 128 for k in range(129)])
        self.assertEqual(late, [0.0] * 129)
        arrivals.stop()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(1)
        self.assertEqual(len(fired), 129)

    def test_lateWake(self):
        """
        A wake that comes late sends everything due by then, oldest first,
        each message with its own due time and how late it is.
        """
        clock = self.clockAt(0.0)
        fired, late = [], []
        arrivals = Arrivals(clock, evenTimes(128, 0.0), fired.append, late.append, clock.seconds)
        arrivals.start()
        clock.advance(0)
        clock.advance(4 / 128)
        self.assertEqual(fired, [k / 128 for k in range(5)])
        self.assertEqual(late, [0.0, 3 / 128, 2 / 128, 1 / 128, 0.0])

    def test_tick(self):
        """
        Above 1 / L{TICK} messages a second the clock wakes at most once per
        tick, however often the reactor runs, and sends what came due
        meanwhile: no timer per message, and never more than one pending.
        """
        clock = self.clockAt(0.0)
        wakes, late = [], []
        arrivals = Arrivals(
            clock,
            evenTimes(10000, 0.0),
            lambda due: wakes.append(clock.seconds()),
            late.append,
            clock.seconds,
        )
        arrivals.start()
        for _ in range(10000):
            clock.advance(0.0001)
            self.assertLessEqual(len(clock.getDelayedCalls()), 1)
        self.assertLessEqual(len(set(wakes)), 1 / TICK + 1)
        self.assertGreaterEqual(len(wakes), 9990)
        self.assertLessEqual(max(late), TICK + 0.0001 + 1e-9)
        arrivals.stop()

    def test_behind(self):
        """
        A client slower than its rate falls behind without starving its
        reactor: a wake sends only what was due when it began, for at most
        L{BUSY} seconds, then lets the reactor run; the lateness grows and
        shows it.
        """
        clock = self.clockAt(0.0)
        sent = []

        def fire(due):
            # Each send takes 3 ms; one is due every 1 ms.
            sent.append(clock.seconds())
            clock.rightNow += 0.003

        late = []
        arrivals = Arrivals(clock, evenTimes(1000, 0.0), fire, late.append, clock.seconds)
        arrivals.start()
        while clock.seconds() < 1.0:
            clock.advance(0.0001)
        self.assertEqual(late, sorted(late))
        self.assertGreater(late[-1], 0.6)
        self.assertEqual(len(late), len(sent))
        self.assertLess(len(sent), 340)
        # A wake sends for BUSY seconds at most, then the reactor runs again.
        runs = [1]
        for earlier, later in zip(sent, sent[1:]):
            if later - earlier < 0.003 + 1e-9:
                runs[-1] += 1
            else:
                runs.append(1)
        self.assertEqual(max(runs), math.ceil(BUSY / 0.003))
        arrivals.stop()

    def openLoop(self, rate, arrivals="even", seed=0, phase=0.0, start=1.0):
        """
        A started open-loop L{P2PLoad} on a L{Clock} at C{start}, measuring,
        with four users (two senders) of L{_Sender}.
        """
        clock = self.clockAt(start)
        load = P2PLoad(
            clock,
            {
                "target": {"host": "127.0.0.1", "port": 1, "tls": False, "ca": None},
                "sources": ["127.0.0.2"],
                "first": 0,
                "count": 4,
                "secret": "00" * 32,
                "connectWindow": 1,
                "timeout": 5,
                "config": {
                    "inflight": 1,
                    "rate": rate,
                    "body": 20,
                    "arrivals": arrivals,
                    "seed": seed,
                    "phase": phase,
                },
            },
            err=io.StringIO(),
        )
        load.now = clock.seconds
        load.clients = [_Sender(index) for index in range(4)]
        load.on_measure()
        load.on_start()
        return clock, load

    def stamps(self, load):
        """
        The due times stamped in the messages the load's senders sent, in
        order.
        """
        return sorted(
            struct.unpack_from("!d", body)[0] for sender in load.clients for to, body in sender.sent
        )

    def deliver(self, load):
        """
        Deliver to each receiver what its partner sent.
        """
        for sender in load.clients[0::2]:
            for seq, (to, body) in enumerate(sender.sent, 1):
                self.assertEqual(to, "u{}".format(sender.index + 1))
                entry = pb.InboxEntry(seq=seq, message=pb.Message(body=body))
                load.notified(load.clients[sender.index + 1], "message", entry)

    def test_latencyFromScheduledTime(self):
        """
        The open loop's senders take turns; each message carries its due
        time, and its latency is measured from it: a message sent late has
        its lateness in its latency.  The lateness is reported with the
        latencies.
        """
        clock, load = self.openLoop(128)
        clock.advance(0)
        clock.advance(3 / 128)
        self.assertEqual([len(sender.sent) for sender in load.clients], [2, 0, 2, 0])
        self.assertEqual(self.stamps(load), [1 + k / 128 for k in range(4)])
        clock.advance(1 / 256)
        self.deliver(load)
        report = load.on_report()
        # Delivered at 1 + 7/256: due at 1 and sent on time, then due at
        # 1 + 2/256, 4/256 and 6/256 and all sent at 1 + 6/256.
        self.assertEqual(report["latencies_us"], [3906, 11718, 19531, 27343])
        self.assertEqual(report["lateness_us"], [0, 0, 7812, 15625])
        self.assertEqual(report["counts"]["sent"], 4)
        self.assertEqual(report["counts"]["delivered"], 4)
        self.assertEqual(load.clients[1].acked, [1, 2])
        load.on_stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_loadArrivals(self):
        """
        A load's open loop follows the config's C{arrivals}: even on its
        phase, Poisson drawn from C{seed} and its first user, bursts every
        10 ms.
        """
        clock, load = self.openLoop(250, phase=0.5)
        clock.pump([0.001] * 100)
        self.assertEqual(
            self.stamps(load), self.take(evenTimes(250, 1.0, 0.5), len(self.stamps(load)))
        )
        self.assertEqual(len(self.stamps(load)), 25)
        clock, load = self.openLoop(250, "poisson", seed=7)
        clock.pump([0.001] * 100)
        expected = self.take(poissonTimes(250, 1.0, random.Random("7:0")), 100)
        self.assertEqual(self.stamps(load), [t for t in expected if t <= clock.seconds()])
        clock, load = self.openLoop(250, "burst")
        clock.pump([0.001] * 100)
        expected = self.take(burstTimes(250, 1.0), 30)
        self.assertEqual(self.stamps(load), [t for t in expected if t <= clock.seconds()])
        self.assertEqual(len(set(self.stamps(load))), 9)

    def test_lateness(self):
        """
        The coordinator summarises the workers' lateness (p50, p99, max, in
        ms), and says on stderr when the p99 is over 2 ms.
        """
        self.assertEqual(latenessSummary([100, 200, 1500]), {"p50": 0.2, "p99": 1.5, "max": 1.5})
        self.assertEqual(latenessSummary([]), {"p50": None, "p99": None, "max": None})
        err = io.StringIO()
        options = P2P.Options()
        options.parseOptions(["--rate", "10"])
        coordinator = Coordinator(Clock(), P2P(options), err)
        coordinator._segment = _Segment("p2p", (), 0.0)
        self.assertEqual(coordinator.lateness([100, 200, 2000])["p99"], 2.0)
        self.assertEqual(err.getvalue(), "")
        self.assertEqual(
            coordinator.lateness([100, 200, 2500]), {"p50": 0.2, "p99": 2.5, "max": 2.5}
        )
        self.assertIn("p2p: the clients sent late", err.getvalue())
        self.assertIn("p99 2.5 ms", err.getvalue())


def _frame(frame):
    """
    C{frame}, serialized and length-prefixed.
    """
    data = frame.SerializeToString()
    return struct.pack("!I", len(data)) + data


def _acks(data):
    """
    The seqs of the C{ack} frames in C{data}, after the first frame (the
    C{auth} request).
    """
    seqs = []
    while data:
        size = struct.unpack("!I", data[:4])[0]
        frame = pb.Frame.FromString(data[4 : 4 + size])
        data = data[4 + size :]
        if frame.method == "ack":
            seqs.append(pb.Ack.FromString(frame.body).seq)
    return seqs


class MemberClientTests(SynchronousTestCase):
    """
    L{MemberClient}, the lean group member of C{fanout}.
    """

    def setUp(self):
        self.clock = Clock()
        self.err = io.StringIO()
        self.load = FanoutLoad(
            self.clock,
            {
                "target": {"host": "127.0.0.1", "port": 1, "tls": False, "ca": None},
                "sources": ["127.0.0.2"],
                "first": 0,
                "count": 4,
                "secret": "00" * 32,
                "connectWindow": 1,
                "timeout": 5,
                "config": {
                    "group": GROUP,
                    "inflight": 1,
                    "rate": 0,
                    "body": 20,
                    "ackEvery": 4,
                    "sampleEvery": 3,
                },
            },
            err=self.err,
        )
        self.client = MemberClient(self.load, 1)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def authenticate(self):
        """
        Answer the client's C{auth}.
        """
        self.client.dataReceived(
            _frame(
                pb.Frame(
                    kind=pb.RESPONSE, seq=1, body=pb.AuthResponse(head_seq=0).SerializeToString()
                )
            )
        )
        self.assertIs(self.successResultOf(self.client.ready), self.client)

    def push(self, seq, outgoing=False):
        """
        The gate's C{message} notify of inbox entry C{seq}.
        """
        body = struct.pack("!d", time.perf_counter()) + b"x" * 12
        message = pb.Message(
            id=seq,
            sender="u0",
            group_id=GROUP,
            client_msg_id="m",
            body=body,
            created_ms=1767139200123,
        )
        return lengthPrefixed(EncodedMessage(message).frame(seq, outgoing))

    def test_auth(self):
        """
        The client sends its pre-encoded C{auth} first and is ready once it
        is answered; a failed C{auth} fails C{ready} and closes.
        """
        data = self.transport.value()
        request = pb.Frame.FromString(data[4:])
        self.assertEqual((request.kind, request.seq, request.method), (pb.REQUEST, 1, "auth"))
        self.assertEqual(pb.AuthRequest.FromString(request.body).uid, "u1")
        self.assertNoResult(self.client.ready)
        failing = MemberClient(self.load, 2)
        failing.makeConnection(StringTransport())
        failing.dataReceived(
            _frame(
                pb.Frame(
                    kind=pb.RESPONSE,
                    seq=1,
                    error=pb.Error(code=pb.AUTH_FAILED, message="bad token"),
                )
            )
        )
        self.failureResultOf(failing.ready, ValueError)
        self.assertTrue(failing.transport.disconnecting)

    def test_countsAcksAndSamples(self):
        """
        Pushes are counted however the bytes are split; the client acks
        every C{ackEvery} entries, and the rest once its stream is quiet
        for a tick of the load's timer; the latency of every
        C{sampleEvery}-th entry is recorded; the sender's own (outgoing)
        entries are not deliveries.
        """
        self.authenticate()
        self.load.on_measure()
        self.load.on_start()
        data = b"".join(self.push(seq) for seq in range(1, 126)) + self.push(126, outgoing=True)
        for i in range(0, len(data), 7):
            self.client.dataReceived(data[i : i + 7])
        self.assertEqual(self.load.counts["delivered"], 125)
        self.assertEqual(self.client.seq, 126)
        self.assertEqual(_acks(self.transport.value()), list(range(4, 125, 4)))
        self.clock.advance(0.05)
        self.client.dataReceived(self.push(127))
        self.clock.advance(0.05)
        self.assertEqual(_acks(self.transport.value())[-1], 124)
        self.clock.advance(0.05)
        self.assertEqual(_acks(self.transport.value())[-1], 127)
        self.assertEqual(self.load.counts["acks"], 32)
        self.clock.advance(0.05)
        self.assertEqual(self.load.counts["acks"], 32)
        self.assertEqual(self.load.counts["delivered"], 126)
        self.assertEqual(len(self.load.latencies), 41)
        self.assertTrue(all(0 <= value < 60e6 for value in self.load.latencies))
        self.assertEqual(self.load.counts["errors"], 0)
        self.assertNotIn("lateness_us", self.load.on_report())

    def test_otherEncoding(self):
        """
        A push encoded otherwise than the gate does it today is parsed in
        full, and counted the same.
        """
        self.authenticate()
        entry = pb.InboxEntry(seq=3, message=pb.Message(id=1, body=b"\0" * 8))
        self.client.dataReceived(
            _frame(
                pb.Frame(kind=pb.NOTIFY, seq=9, method="message", body=entry.SerializeToString())
            )
        )
        self.assertEqual((self.load.counts["delivered"], self.client.seq), (1, 3))

    def test_error(self):
        """
        An ERROR frame from the gate is an error, and the client closes.
        """
        self.authenticate()
        self.client.dataReceived(
            _frame(pb.Frame(kind=pb.ERROR, error=pb.Error(code=pb.SLOW_CONSUMER, message="slow")))
        )
        self.assertEqual(self.load.counts["errors"], 1)
        self.assertIn("SLOW_CONSUMER", self.err.getvalue())
        self.assertTrue(self.transport.disconnecting)


class SpawnTests(SynchronousTestCase):
    """
    L{imserver.spawn}: the command line and the output of a server child.
    """

    def test_listening(self):
        """
        A server child is listening once it logs its address (IPv6 in
        brackets), even split over two reads; other addresses do not count.
        """
        for host, line in [
            ("127.0.0.1", b"gate listening on 127.0.0.1:7001\n"),
            ("127.0.0.5", b"x\nlistening on 127.0.0.5:7002\n"),
            ("::1", b"listening on [::1]:7003\n"),
        ]:
            process = TwistdProcess(host)
            process.outReceived(b"listening on 127.0.0.10:1\n")
            process.outReceived(line[:-9])
            self.assertNoResult(process.listening)
            process.errReceived(line[-9:])
            self.assertEqual(self.successResultOf(process.listening), int(line[-5:-1]))
            self.assertEqual(process.port, int(line[-5:-1]))

    def test_waitFor(self):
        """
        Other lines can be waited for, such as the HTTP API's; one already
        written is found at once; the process ending first fails the wait
        with L{NotListening}, naming what was waited for.
        """
        process = TwistdProcess()
        api = process.waitFor(apiPattern("127.0.0.1"), "the HTTP API")
        process.outReceived(b"listening on 127.0.0.1:5000\nHTTP API at http://127.0.0.1:5")
        process.outReceived(b"001/\n")
        self.assertEqual(self.successResultOf(api), 5001)
        self.assertEqual(self.successResultOf(process.waitFor(apiPattern())), 5001)
        missing = process.waitFor(apiPattern("::1"), "the IPv6 API")
        process.processEnded(Failure(ProcessDone(0)))
        error = self.failureResultOf(missing, NotListening).value
        self.assertIn("the IPv6 API", str(error))
        self.assertIn("HTTP API at", error.output)
        self.failureResultOf(process.waitFor(apiPattern("::1")), NotListening)
        self.assertIsInstance(self.successResultOf(process.ended), ProcessDone)

    def test_webListener(self):
        """
        The gate's web listener is found by its WebSocket address, C{ws} or
        C{wss}, IPv6 in brackets.
        """
        process = TwistdProcess(webPattern("127.0.0.1"))
        process.outReceived(b"listening on 127.0.0.1:5000\n")
        self.assertNoResult(process.listening)
        process.outReceived(b"chat page at http://127.0.0.1:5001/, WebSocket at ws://127.0.0.1:5")
        process.outReceived(b"001/ws\n")
        self.assertEqual(self.successResultOf(process.listening), 5001)
        process = TwistdProcess(webPattern("::1"))
        process.outReceived(b"chat page at https://[::1]:5002/, WebSocket at wss://[::1]:5002/ws\n")
        self.assertEqual(self.successResultOf(process.listening), 5002)

    def test_boundedOutput(self):
        """
        Only the end of the output is kept, yet a line is found however
        much came before it.
        """
        process = TwistdProcess(keep=1000)
        for i in range(500):
            process.outReceived(b"connection %d from 127.0.0.2\n" % (i,))
        process.outReceived(b"listening on 127.0.0.1:6000\n")
        self.assertEqual(self.successResultOf(process.listening), 6000)
        self.assertEqual(len(process.output), 1000)
        self.assertTrue(process.text().endswith("listening on 127.0.0.1:6000\n"))
        process.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(len(process.text()), 1000)

    def test_taskset(self):
        """
        A CPU pins the command with C{taskset -c} (if there is one); none,
        or C{""}, does not.
        """
        self.assertEqual(tasksetPrefix(None), [])
        self.assertEqual(tasksetPrefix(""), [])
        taskset = shutil.which("taskset")
        self.assertEqual(tasksetPrefix(1), [taskset, "-c", "1"] if taskset else [])
        argv = twistdArgv(["--store", "memory"], "0")
        self.assertEqual(argv[: len(tasksetPrefix("0"))], tasksetPrefix("0"))
        self.assertEqual(argv[-3:], ["im", "--store", "memory"])
        self.assertEqual(twistdArgv([])[0], sys.executable)


def _serverFrame(opcode, payload, final=True, masked=False):
    """
    A WebSocket frame from the server: unmasked (unless C{masked}, which a
    server must never do).
    """
    first = (0x80 if final else 0) | opcode
    mask = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        header = bytes((first, mask | size))
    elif size < 1 << 16:
        header = bytes((first, mask | 126)) + struct.pack("!H", size)
    else:
        header = bytes((first, mask | 127)) + struct.pack("!Q", size)
    return header + (b"\0\0\0\0" if masked else b"") + payload


def _clientFrames(data):
    """
    The client frames in C{data}, as RFC 6455 reads them: C{(opcode,
    final, masking key, unmasked payload)}.
    """
    frames = []
    while data:
        first, second = data[0], data[1]
        assert second & 0x80, "an unmasked client frame"
        size, offset = second & 0x7F, 2
        if size == 126:
            (size,), offset = struct.unpack("!H", data[2:4]), 4
        elif size == 127:
            (size,), offset = struct.unpack("!Q", data[2:10]), 10
        key = data[offset : offset + 4]
        masked = data[offset + 4 : offset + 4 + size]
        payload = bytes(byte ^ key[i % 4] for i, byte in enumerate(masked))
        frames.append((first & 0x0F, bool(first & 0x80), key, payload))
        data = data[offset + 4 + size :]
    return frames


class _Recorder(Protocol):
    """
    A client protocol keeping what it is given.
    """

    made = False
    lost = None

    def __init__(self):
        self.data = b""

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class _FakeEndpoint:
    """
    An endpoint connecting at once to a L{StringTransport}.
    """

    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


class WebSocketFramerTests(SynchronousTestCase):
    """
    L{imserver.bench.websocket}: the bench's WebSocket client layer, which
    turns the client protocol's length-prefixed frames into binary
    messages and back.
    """

    key = b"dGhlIHNhbXBsZSBub25jZQ=="

    def setUp(self):
        self.clock = Clock()
        self.wrapped = _Recorder()
        request = upgradeRequest("127.0.0.1", 7481, self.key)
        self.framer = WebSocketFramer(self.wrapped, request, self.key, self.clock, 5)
        self.transport = StringTransport()
        self.framer.makeConnection(self.transport)

    def answer(self, status=b"101 Switching Protocols", accept=None, protocol=b"imserver.v1.proto"):
        """
        The server's answer to the upgrade request.
        """
        lines = [
            b"HTTP/1.1 " + status,
            b"Upgrade: WebSocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Accept: " + (accept or acceptValue(self.key)),
        ]
        if protocol:
            lines.append(b"Sec-WebSocket-Protocol: " + protocol)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def upgrade(self):
        """
        Answer the upgrade; the client protocol is connected.
        """
        self.framer.dataReceived(self.answer())
        self.assertIs(self.successResultOf(self.framer.opened), self.wrapped)
        self.transport.clear()

    def test_request(self):
        """
        The upgrade request asks for C{/ws} and the C{imserver.v1.proto}
        subprotocol, without C{Origin}; the accept value is RFC 6455's.
        """
        lines = self.transport.value().split(b"\r\n")
        self.assertEqual(lines[0], b"GET /ws HTTP/1.1")
        for header in [
            b"Host: 127.0.0.1:7481",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: " + self.key,
            b"Sec-WebSocket-Protocol: imserver.v1.proto",
        ]:
            self.assertIn(header, lines)
        self.assertEqual(lines[-2:], [b"", b""])
        self.assertFalse([line for line in lines if line.lower().startswith(b"origin")])
        self.assertIn(b"Host: [::1]:80\r\n", upgradeRequest("::1", 80, self.key))
        self.assertEqual(acceptValue(self.key), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.assertEqual(websocket.PROTO, jsonframes.PROTO)

    def test_upgrade(self):
        """
        The client protocol is connected once the whole answer has come,
        even split over reads; frames in the same read as its end go up.
        """
        answer = self.answer()
        self.framer.dataReceived(answer[:30])
        self.assertFalse(self.wrapped.made)
        self.assertNoResult(self.framer.opened)
        self.framer.dataReceived(answer[30:] + _serverFrame(0x2, b"abc"))
        self.assertTrue(self.wrapped.made)
        self.assertIs(self.wrapped.transport, self.framer)
        self.assertIs(self.successResultOf(self.framer.opened), self.wrapped)
        self.assertEqual(self.wrapped.data, lengthPrefixed(b"abc"))
        self.clock.advance(10)
        self.assertFalse(self.transport.disconnecting)

    def test_refused(self):
        """
        An answer other than a 101 with the right accept value and our
        subprotocol, and no extension, fails the connection; so do no
        answer within the timeout and the connection ending first.
        """
        extension = self.answer().replace(
            b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
        for answer in [
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            self.answer(accept=b"wrong"),
            self.answer(protocol=b"imserver.v1.json"),
            self.answer(protocol=None),
            extension,
            b"x" * 9000,
        ]:
            self.setUp()
            self.framer.dataReceived(answer)
            self.failureResultOf(self.framer.opened, HandshakeError)
            self.assertTrue(self.transport.disconnecting)
            self.assertFalse(self.wrapped.made)
        self.setUp()
        self.clock.advance(5)
        self.failureResultOf(self.framer.opened, HandshakeError)
        self.setUp()
        self.framer.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(self.framer.opened, ConnectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_write(self):
        """
        Each length-prefixed frame written is one final binary message,
        masked with the all-zero key (so its payload is sent as it is),
        whatever the writes' boundaries and the frames' sizes.
        """
        self.upgrade()
        self.wrapped.transport.write(lengthPrefixed(b"ping"))
        self.assertEqual(self.transport.value(), b"\x82\x84\0\0\0\0ping")
        self.transport.clear()
        medium, large = b"m" * 300, b"L" * 70000
        data = b"".join(lengthPrefixed(p) for p in (b"a", medium, large, b"tail"))
        self.wrapped.transport.write(data[:7])
        self.wrapped.transport.writeSequence([data[7:100], data[100:-3]])
        self.wrapped.transport.write(data[-3:])
        self.assertEqual(
            _clientFrames(self.transport.value()),
            [(0x2, True, b"\0\0\0\0", p) for p in (b"a", medium, large, b"tail")],
        )

    def test_read(self):
        """
        Each binary message read goes up as one length-prefixed frame,
        whatever the reads' boundaries and the lengths' encodings;
        fragmented messages are reassembled; pings are answered; pongs are
        ignored.
        """
        self.upgrade()
        medium, large = b"m" * 300, b"L" * 70000
        data = b"".join(
            [
                _serverFrame(0x2, b"one"),
                _serverFrame(0x2, medium),
                _serverFrame(0x9, b"hi"),
                _serverFrame(0x2, b"fr", final=False),
                _serverFrame(0xA, b""),
                _serverFrame(0x0, b"ag", final=False),
                _serverFrame(0x0, b"ment"),
                _serverFrame(0x2, large),
            ]
        )
        for i in range(0, len(data), 7):
            self.framer.dataReceived(data[i : i + 7])
        self.assertEqual(
            self.wrapped.data,
            b"".join(lengthPrefixed(p) for p in (b"one", medium, b"fragment", large)),
        )
        self.assertEqual(_clientFrames(self.transport.value()), [(0xA, True, b"\0\0\0\0", b"hi")])
        self.assertFalse(self.transport.disconnecting)

    def test_serverCloses(self):
        """
        The server's close: the messages before it go up, its code is sent
        back, TCP closes and nothing more is read or written; then the
        client protocol loses its connection.
        """
        self.upgrade()
        close = _serverFrame(0x8, struct.pack("!H", 4005) + b"IDLE_TIMEOUT")
        self.framer.dataReceived(_serverFrame(0x2, b"error") + close + _serverFrame(0x2, b"x"))
        self.assertEqual(self.wrapped.data, lengthPrefixed(b"error"))
        self.assertEqual(
            _clientFrames(self.transport.value()),
            [(0x8, True, b"\0\0\0\0", struct.pack("!H", 4005))],
        )
        self.assertTrue(self.transport.disconnecting)
        self.transport.clear()
        self.wrapped.transport.write(lengthPrefixed(b"late"))
        self.framer.dataReceived(_serverFrame(0x2, b"late"))
        self.assertEqual(
            (self.transport.value(), self.wrapped.data), (b"", lengthPrefixed(b"error"))
        )
        self.framer.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(self.wrapped.lost.value, ConnectionDone)

    def test_clientCloses(self):
        """
        The client protocol closing sends a close (1000), then closes TCP.
        """
        self.upgrade()
        self.wrapped.transport.loseConnection()
        self.assertEqual(
            _clientFrames(self.transport.value()),
            [(0x8, True, b"\0\0\0\0", struct.pack("!H", 1000))],
        )
        self.assertTrue(self.transport.disconnecting)
        self.wrapped.transport.loseConnection()
        self.assertEqual(len(_clientFrames(self.transport.value())), 1)

    def test_protocolErrors(self):
        """
        A masked server frame, a text message, a reserved opcode, a
        continuation of nothing or a new message inside a fragmented one
        abort the connection; nothing goes up.
        """
        for data in [
            _serverFrame(0x2, b"m", masked=True),
            _serverFrame(0x1, b"text"),
            _serverFrame(0x3, b""),
            _serverFrame(0x0, b"cont"),
            _serverFrame(0x2, b"a", final=False) + _serverFrame(0x2, b"b"),
        ]:
            self.setUp()
            self.upgrade()
            self.framer.dataReceived(data)
            self.assertTrue(self.transport.disconnecting)
            self.assertEqual(self.wrapped.data, b"")

    def test_endpoint(self):
        """
        The endpoint connects the one under it, upgrades, and fires with
        the client protocol once upgraded.
        """
        below = _FakeEndpoint()
        endpoint = WebSocketClientEndpoint(self.clock, below, "::1", 7481, 5)
        wrapped = _Recorder()
        d = endpoint.connect(Factory.forProtocol(lambda: wrapped))
        self.assertNoResult(d)
        request = below.transport.value()
        self.assertIn(b"Host: [::1]:7481\r\n", request)
        key = request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
        self.assertEqual(len(base64.b64decode(key)), 16)
        self.key = key
        below.protocol.dataReceived(self.answer())
        self.assertIs(self.successResultOf(d), wrapped)
        self.assertTrue(wrapped.made)


class MicroTests(SynchronousTestCase):
    """
    C{python -m imserver.bench.micro}: a tiny run of each measurement.
    """

    def test_run(self):
        """
        Every figure is a positive CPU time per unit, one per round, and the
        JSON file holds the same result.
        """
        from imserver.bench import micro

        config = micro.Options()
        path = self.mktemp()
        config.parseOptions(
            [
                "--pings",
                "200",
                "--messages",
                "50",
                "--members",
                "20",
                "--group-messages",
                "32",
                "--repeat",
                "2",
                "--json",
                path,
            ]
        )
        out = io.StringIO()
        result = micro.run(config, out)
        for name in ("ping_us", "p2p_message_us", "p2p_no_echo_message_us", "fanout_delivery_us"):
            self.assertGreater(result[name], 0)
            self.assertEqual(len(result[name + "_rounds"]), 2)
        with open(path) as f:
            self.assertEqual(json.load(f), result)
        self.assertEqual(json.loads(out.getvalue()), result)

    def test_checksTheWork(self):
        """
        A measurement whose frames did not all go out (an error path
        measured instead of the work) fails instead of reporting.
        """
        from imserver.bench import micro

        transport = micro.CountingTransport()
        transport.write(b"x")
        self.assertRaises(RuntimeError, micro._check, transport, 2, "test")
        micro._check(transport, 1, "test")

    def test_options(self):
        """
        Sizes must be positive and the group messages a whole number of ack
        intervals.
        """
        from imserver.bench import micro

        for argv in (["--members", "1"], ["--repeat", "0"], ["--group-messages", "10"]):
            self.assertRaises(UsageError, micro.Options().parseOptions, argv)


class TLSMemoryTests(SynchronousTestCase):
    """
    C{python -m imserver.bench.tlsmemory}: OpenSSL's memory per server TLS
    connection with the gate's context.
    """

    def test_measure(self):
        """
        Each variant completes real handshakes: the version asked for is
        the one negotiated, and the figure is a size.
        """
        from imserver.bench import tlsmemory

        result = tlsmemory.measure(20)
        self.assertEqual(result["tls_version"], "TLSv1.3")
        self.assertTrue(result["release_buffers"])
        self.assertIsInstance(result["rss_per_connection_kb"], float)
        older = tlsmemory.measure(5, maxVersion="1.2", releaseBuffers=False)
        self.assertEqual(older["tls_version"], "TLSv1.2")
        self.assertFalse(older["release_buffers"])

    def test_options(self):
        """
        Only TLS 1.2 and 1.3 can be asked for.
        """
        from imserver.bench import tlsmemory

        self.assertRaises(UsageError, tlsmemory.Options().parseOptions, ["--max-version", "1.1"])
        out = io.StringIO()
        with mock.patch("sys.stdout", out):
            self.assertEqual(tlsmemory.main(["--count", "3"]), 0)
        self.assertEqual(json.loads(out.getvalue())["count"], 3)


class SmokeTests(TestCase):
    """
    Each scenario for about a second, with a few users, against a real
    spawned gate and real workers.
    """

    timeout = 60

    def run_(self, scenario, *args):
        """
        Run C{scenario} with C{args}, unpinned.

        @return: a L{Deferred} firing with the L{Outcome}.
        """
        options = scenario.Options()
        options.parseOptions(list(args) + UNPINNED)
        self.err = io.StringIO()
        return Coordinator(reactor, scenario(options), err=self.err).run()

    def assertClean(self, result, users):
        """
        Every user connected and nothing failed.
        """
        self.assertEqual(result["connected"], users)
        self.assertEqual(result["connect_failed"], 0)
        self.assertEqual(result["errors"], 0, self.err.getvalue())

    @inlineCallbacks
    def runHold(self, *extra):
        """
        C{hold} with 6 users and the seed profile (and C{extra} options):
        connections heartbeat, messages flow, the gate's memory per
        connection is reported.

        @return: a L{Deferred} firing with the result.
        """
        outcome = yield self.run_(
            Hold,
            "--users",
            "6",
            *extra,
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--heartbeat",
            "0.2",
            "--seed-profile",
            "--seed-period",
            "0.3",
            "--no-reference",
        )
        result = outcome.result
        self.assertClean(result, 6)
        self.assertGreater(result["pings_per_s"], 0)
        self.assertGreater(result["seed_messages_per_s"], 0)
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertEqual(result["arrivals"], "even")
        self.assertEqual(set(result["lateness_ms"]), {"p50", "p99", "max"})
        self.assertIn("rss_per_connection_kb", result)
        return result

    @inlineCallbacks
    def test_hold(self):
        """
        Held connections heartbeat, and with the seed profile messages flow;
        the gate's memory per connection is reported.
        """
        result = yield self.runHold()
        self.assertGreater(result["server_rss_mb"], 0)
        self.assertNotIn("reference", result)
        for key in ("gates", "gate_connections", "gate_rss_mb", "redis_rss_mb"):
            self.assertNotIn(key, result)

    @inlineCallbacks
    def test_holdGates(self):
        """
        With C{--gates 2} the bench starts its own redis-server and two gates
        in cluster mode; users are spread over both, and the gates' and
        Redis's figures are reported.
        """
        requireExecutable("redis-server", "redis-server (Debian package redis-server)")
        outcome = yield self.run_(
            Hold,
            "--gates",
            "2",
            "--users",
            "20",
            "--duration",
            "0.5",
            "--warmup",
            "0.1",
            "--no-reference",
        )
        result = outcome.result
        self.assertClean(result, 20)
        self.assertEqual((result["gates"], result["store"]), (2, "redis"))
        self.assertEqual(len(result["gate_connections"]), 2)
        self.assertEqual(sum(result["gate_connections"]), 20)
        self.assertTrue(all(count > 0 for count in result["gate_connections"]))
        self.assertEqual(len(result["gate_rss_mb"]), 2)
        self.assertGreater(result["server_rss_mb"], max(result["gate_rss_mb"]))
        self.assertGreater(result["redis_rss_mb"], 0)
        self.assertIn("redis_cpu_percent", result)

    @inlineCallbacks
    def test_p2pRedisCluster(self):
        """
        With C{--redis-cluster 3} the bench starts a Redis Cluster of three
        primaries and runs the gates on it; messages flow.
        """
        requireExecutable("redis-server", "redis-server (Debian package redis-server)")
        requireExecutable("redis-cli", "redis-cli (Debian package redis-tools)")
        outcome = yield self.run_(
            P2P,
            "--redis-cluster",
            "3",
            "--gates",
            "2",
            "--users",
            "20",
            "--duration",
            "0.5",
            "--warmup",
            "0.1",
            "--no-reference",
        )
        result = outcome.result
        self.assertEqual(result["store"], "redis")
        self.assertEqual(result["errors"], 0)
        self.assertGreater(result["sends_acked_per_s"], 0)
        self.assertGreater(result["redis_rss_mb"], 0)

    @inlineCallbacks
    def test_p2pTwoWorkers(self):
        """
        Messages flow between pairs held by two workers; latencies come from
        both.
        """
        outcome = yield self.run_(
            P2P,
            "--users",
            "8",
            "--workers",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--no-reference",
        )
        result = outcome.result
        self.assertClean(result, 8)
        self.assertEqual(result["workers"], 2)
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertIsNotNone(result["latency_ms"]["p99"])
        self.assertNotIn("arrivals", result)
        self.assertNotIn("lateness_ms", result)
        self.assertTrue(outcome.latencies["p2p"])
        self.assertTrue(outcome.timelines["p2p"])

    @inlineCallbacks
    def test_p2pNoEcho(self):
        """
        With C{--no-echo} the senders are pushed none of their own messages
        back (C{echoes_per_s} 0, as many as deliveries without the flag),
        and every message is delivered.
        """
        rates = {}
        for flags in ((), ("--no-echo",)):
            outcome = yield self.run_(
                P2P,
                "--users",
                "8",
                "--duration",
                "0.5",
                "--warmup",
                "0.2",
                "--no-reference",
                *flags,
            )
            result = outcome.result
            self.assertClean(result, 8)
            self.assertGreater(result["deliveries_per_s"], 0)
            rates[flags] = result
        self.assertGreater(rates[()]["echoes_per_s"], 0)
        self.assertNotIn("no_echo", rates[()])
        self.assertEqual(rates[("--no-echo",)]["echoes_per_s"], 0)
        self.assertTrue(rates[("--no-echo",)]["no_echo"])

    def openLoop(self, arrivals, *args):
        """
        Run C{p2p} in the open loop, C{arrivals} spaced, with two workers;
        check that messages flowed, latency was measured and the lateness
        reported.

        @return: a L{Deferred} firing with the result.
        """

        def check(outcome):
            result = outcome.result
            self.assertClean(result, 8)
            self.assertGreater(result["deliveries_per_s"], 0)
            self.assertIsNotNone(result["latency_ms"]["p99"])
            self.assertEqual(result["arrivals"], arrivals)
            self.assertEqual(result["mode"], "open loop 200.0 msg/s, {} arrivals".format(arrivals))
            lateness = result["lateness_ms"]
            self.assertEqual(set(lateness), {"p50", "p99", "max"})
            self.assertTrue(0 <= lateness["p50"] <= lateness["p99"] <= lateness["max"])
            return result

        return self.run_(
            P2P,
            "--users",
            "8",
            "--workers",
            "2",
            "--rate",
            "200",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "--no-reference",
            *args,
        ).addCallback(check)

    def test_p2pOpenLoop(self):
        """
        The open loop sends at a fixed rate, evenly spaced by default.
        """
        return self.openLoop("even")

    def test_p2pOpenLoopPoisson(self):
        """
        The open loop with Poisson arrivals.
        """
        return self.openLoop("poisson", "--arrivals", "poisson", "--seed", "3")

    def test_p2pOpenLoopBurst(self):
        """
        The open loop with the old bursts every 10 ms.
        """
        return self.openLoop("burst", "--arrivals", "burst")

    @inlineCallbacks
    def test_pingReferencePlot(self):
        """
        Ping round trips over TLS, then the echo reference over TLS with the
        gate's certificate: both report round trips, the ratios relate them,
        and the charts are written.
        """
        outcome = yield self.run_(
            Ping, "--users", "4", "--transport", "tls", "--duration", "1", "--warmup", "0.2"
        )
        result = outcome.result
        self.assertClean(result, 4)
        self.assertGreater(result["requests_per_s"], 0)
        reference = result["reference"]
        self.assertEqual(reference["connected"], 4)
        self.assertEqual(reference["errors"], 0)
        self.assertGreater(reference["requests_per_s"], 0)
        self.assertIn("rss_per_idle_connection_kb", reference)
        self.assertEqual(set(result["ratio_to_reference"]), {"requests_per_s", "connect_per_s"})

        plots = FilePath(self.mktemp())
        options = {"json": plots.sibling("result.json").path, "plot": plots.path}
        out = io.StringIO()
        writeReport(options, outcome, out, err=io.StringIO())
        self.assertEqual(json.loads(out.getvalue()), result)
        self.assertEqual(json.loads(plots.sibling("result.json").getContent()), result)
        charts = sorted(child.basename() for child in plots.children())
        self.assertEqual(charts, ["ping-latency-cdf.png", "ping-throughput.png"])
        for chart in plots.children():
            self.assertEqual(chart.getContent()[:8], b"\x89PNG\r\n\x1a\n")

    @inlineCallbacks
    def test_pingWebSocket(self):
        """
        Ping round trips over WebSocket (the gate's web listener), then the
        echo reference over the TCP under it; the result says whether the
        clients were the limit.
        """
        outcome = yield self.run_(
            Ping, "--users", "4", "--transport", "ws", "--duration", "1", "--warmup", "0.2"
        )
        result = outcome.result
        self.assertClean(result, 4)
        self.assertEqual(result["transport"], "ws")
        self.assertGreater(result["requests_per_s"], 0)
        self.assertIsNotNone(result["latency_ms"]["p99"])
        # Whether one worker doing round trips flat out used most of the
        # machine's cores depends on the machine: only that it is told.
        self.assertIsInstance(result["client_bound"], bool)
        self.assertIs(result["valid"], not result["client_bound"])
        reference = result["reference"]
        self.assertEqual((reference["transport"], reference["errors"]), ("tcp", 0))
        self.assertGreater(reference["requests_per_s"], 0)
        self.assertGreater(result["ratio_to_reference"]["requests_per_s"], 0)

    @inlineCallbacks
    def test_holdWebSocket(self):
        """
        Sessions of the client library held over WebSocket heartbeat, and
        with the seed profile messages flow both ways.
        """
        yield self.runHold("--transport", "ws")

    @inlineCallbacks
    def test_p2pWebSocket(self):
        """
        Messages flow between pairs over WebSocket, with two workers.
        """
        outcome = yield self.run_(
            P2P,
            "--users",
            "8",
            "--workers",
            "2",
            "--transport",
            "ws",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--no-reference",
        )
        result = outcome.result
        self.assertClean(result, 8)
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertGreater(result["sends_acked_per_s"], 0)
        self.assertIsNotNone(result["latency_ms"]["p99"])

    @inlineCallbacks
    def test_p2pSecureWebSocket(self):
        """
        Over C{wss} (TLS with the gate's certificate, then WebSocket) too,
        and the echo reference runs over TLS.
        """
        outcome = yield self.run_(
            P2P, "--users", "4", "--transport", "wss", "--duration", "1", "--warmup", "0.3"
        )
        result = outcome.result
        self.assertClean(result, 4)
        self.assertEqual(result["transport"], "wss")
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertEqual(
            (result["reference"]["transport"], result["reference"]["errors"]), ("tls", 0)
        )
        self.assertGreater(result["reference"]["requests_per_s"], 0)

    @inlineCallbacks
    def test_fanoutTwoWorkers(self):
        """
        The group is created through the gate's HTTP API; every member, in
        either worker, receives the sender's messages (its own copy is not
        counted) and acks them; latencies come from both workers.
        """
        outcome = yield self.run_(
            Fanout,
            "--members",
            "7",
            "--workers",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--inflight",
            "2",
            "--sample-every",
            "1",
            "--no-reference",
        )
        result = outcome.result
        self.assertClean(result, 7)
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertGreater(result["sends_per_s"], 0)
        self.assertGreater(result["acks_per_s"], 0)
        self.assertEqual(result["members"], 7)
        self.assertIsNotNone(result["latency_ms"]["p99"])
        self.assertIn("group bench-fanout of 7 members created", self.err.getvalue())

    @inlineCallbacks
    def test_fanoutOpenLoopMemory(self):
        """
        The open loop sends at a fixed rate, here on the memory store.
        """
        outcome = yield self.run_(
            Fanout,
            "--members",
            "4",
            "--rate",
            "50",
            "--store",
            "memory",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--no-reference",
        )
        self.assertClean(outcome.result, 4)
        self.assertGreater(outcome.result["deliveries_per_s"], 0)
        self.assertEqual(outcome.result["mode"], "open loop 50.0 msg/s, even arrivals")
        self.assertIsNotNone(outcome.result["lateness_ms"]["max"])

    @inlineCallbacks
    def test_storm(self):
        """
        Dropped sessions all come back, re-authenticate with their last seq
        and receive the messages queued meanwhile.
        """
        outcome = yield self.run_(
            Storm,
            "--users",
            "8",
            "--drop",
            "4",
            "--backlog",
            "3",
            "--jitter",
            "0.05",
            "--no-reference",
        )
        result = outcome.result
        self.assertClean(result, 8)
        self.assertEqual((result["dropped"], result["recovered"]), (4, 4))
        self.assertGreater(result["reconnects_per_s"], 0)
        self.assertEqual(len(outcome.latencies["storm"]), 4)

    @inlineCallbacks
    def test_command(self):
        """
        C{python -m imserver.bench} prints the JSON result and writes it to
        C{--json}; a non-loopback target is refused with status 2.
        """
        path = FilePath(self.mktemp())
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            [
                "-m",
                "imserver.bench",
                "ping",
                "--users",
                "2",
                "--duration",
                "0.3",
                "--warmup",
                "0",
                "--no-reference",
                "--json",
                path.path,
            ]
            + UNPINNED,
            env=childEnvironment(),
            reactor=reactor,
        )
        self.assertEqual(status, 0, err)
        result = json.loads(out)
        self.assertEqual(result["scenario"], "ping")
        self.assertEqual(result["errors"], 0)
        self.assertEqual(json.loads(path.getContent()), result)
        out, err, status = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "imserver.bench", "ping", "--host", "192.0.2.1"],
            env=childEnvironment(),
            reactor=reactor,
        )
        self.assertEqual(status, 2)
        self.assertIn(b"not a loopback address", err)
