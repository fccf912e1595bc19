# -*- test-case-name: tests.test_bench -*-
"""
C{im-bench}: the imserver load generator.

This release has the C{p2p} scenario: N users in pairs, each sending to its
partner over the real protocol (send -> store -> push -> ack), closed loop
(C{--inflight} sends outstanding per user) or open loop at a fixed total
C{--rate}.  It starts its own C{twistd im} (pinned to C{--server-cpu} when
C{taskset} exists), runs the clients in this process (pinned to
C{--client-cpu}), and prints a JSON result: deliveries per second,
send-to-deliver latency percentiles, server CPU and RSS.

    python -m imserver.bench p2p --users 400 --duration 10

Only loopback addresses are ever used; every run is bounded by
C{--duration} and stops by itself.
"""

import json
import os
import shutil
import struct
import sys
import tempfile
import time

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver.spawn import spawnTwistd

_stamp = struct.Struct("!d")


class P2POptions(usage.Options):
    optParameters = [
        ["users", "u", 400, "Connections (users), in sender/receiver pairs.", int],
        ["duration", "d", 10.0, "Seconds measured, after the warm-up.", float],
        ["warmup", None, 2.0, "Seconds run before measuring.", float],
        ["inflight", None, 1, "Closed loop: sends outstanding per user.", int],
        ["rate", None, 0.0, "Open loop: total sends per second (0: closed loop).", float],
        ["body", None, 100, "Message body bytes.", int],
        ["transport", None, "tcp", "tcp or tls."],
        ["store", None, "sqlite", "Server store: sqlite or memory."],
        ["server-cpu", None, "0", "CPU to pin the server to ('' for none)."],
        ["client-cpu", None, "1", "CPU to pin this process to ('' for none)."],
        ["json", None, None, "Also write the result to this file."],
    ]

    def postOptions(self):
        if self["users"] < 2 or self["users"] % 2:
            raise usage.UsageError("--users must be an even number >= 2")
        if self["transport"] not in ("tcp", "tls"):
            raise usage.UsageError("--transport is tcp or tls")
        if self["duration"] <= 0 or self["duration"] > 600:
            raise usage.UsageError("--duration must be in (0, 600]")


class Options(usage.Options):
    synopsis = "SCENARIO [options]"
    subCommands = [["p2p", None, P2POptions, "1:1 send -> deliver -> ack."]]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("name a scenario: p2p")


def _cpuSeconds(pid):
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _rssBytes(pid):
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(sortedValues, fraction):
    """
    The C{fraction} percentile (nearest rank) of sorted values.
    """
    if not sortedValues:
        return None
    index = min(len(sortedValues) - 1, max(0, int(round(fraction * len(sortedValues))) - 1))
    return sortedValues[index]


class P2PRun:
    """
    One p2p run against a spawned server.
    """

    def __init__(self, reactor, options, out=sys.stderr):
        self.reactor = reactor
        self.options = options
        self.out = out
        self.clients = []
        self.latencies = []
        self.delivered = 0
        self.acked = 0
        self.measuring = False
        self.stopping = False
        self.errors = 0

    def spawnServer(self, dataDir):
        o = self.options
        imArgs = ["--data-dir", dataDir, "--store", o["store"], "--max-unacked", "1000"]
        if o["transport"] == "tls":
            imArgs += ["--listen", "ssl:0:interface=127.0.0.1"]
        else:
            imArgs += ["--listen", "tcp:0:interface=127.0.0.1"]
        self.server = spawnTwistd(self.reactor, imArgs, cpu=o["server-cpu"])
        return self.server.listening

    @inlineCallbacks
    def run(self):
        from imserver.auth import loadSecret, mintToken
        from imserver.client import ClientProtocol, clientEndpoint
        from twisted.internet.endpoints import connectProtocol

        o = self.options
        if o["client-cpu"] != "" and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {int(o["client-cpu"])})
        dataDir = tempfile.mkdtemp(prefix="im-bench-")
        try:
            port = yield self.spawnServer(dataDir)
            secret = loadSecret(FilePath(dataDir), create=False)
            tls = o["transport"] == "tls"
            caFile = os.path.join(dataDir, "tls-cert.pem") if tls else None
            now = self.reactor.seconds()
            connecting = []
            for i in range(o["users"]):
                uid = "u{}".format(i)
                protocol = ClientProtocol(self.reactor, requestTimeout=30)
                protocol.uid = uid
                protocol.peer = "u{}".format(i ^ 1)
                protocol.counter = 0
                protocol.onNotify = self._notifier(protocol)
                endpoint = clientEndpoint(self.reactor, "127.0.0.1", port, tls=tls,
                                          caFile=caFile, hostname="localhost")
                d = connectProtocol(endpoint, protocol)
                d.addCallback(lambda p, uid=uid: p.authenticate(
                    uid, mintToken(secret, uid, 3600, now), "bench").addCallback(lambda _: p))
                connecting.append(d)
                if len(connecting) % 200 == 0:
                    yield gatherResults(connecting[-200:])
            self.clients = yield gatherResults(connecting)
            self.log("{} users connected; warming up {} s".format(len(self.clients), o["warmup"]))
            self.start()
            yield self.sleep(o["warmup"])
            self.measuring = True
            cpu0, t0 = _cpuSeconds(self.server.pid), time.perf_counter()
            yield self.sleep(o["duration"])
            self.measuring = False
            cpu1, t1 = _cpuSeconds(self.server.pid), time.perf_counter()
            rss = _rssBytes(self.server.pid)
            self.stopping = True
            result = self.result(t1 - t0, cpu1 - cpu0, rss)
        finally:
            self.stopping = True
            for p in self.clients:
                if p.connected:
                    p.transport.abortConnection()
            if getattr(self, "server", None) is not None and self.server.pid:
                try:
                    self.server.transport.signalProcess("TERM")
                except Exception:
                    pass
                yield self.server.ended
            shutil.rmtree(dataDir, ignore_errors=True)
        return result

    def sleep(self, seconds):
        d = Deferred()
        self.reactor.callLater(seconds, d.callback, None)
        return d

    def log(self, text):
        self.out.write("im-bench: {}\n".format(text))
        self.out.flush()

    def _notifier(self, protocol):
        perf = time.perf_counter

        def onNotify(name, entry):
            if name != "message":
                return
            if not entry.outgoing:
                if self.measuring:
                    self.delivered += 1
                    self.latencies.append(perf() - _stamp.unpack_from(entry.message.body)[0])
            protocol.ack(entry.seq)

        return onNotify

    def start(self):
        o = self.options
        senders = self.clients[0::2]
        if o["rate"] > 0:
            from twisted.internet.task import LoopingCall

            tick = 0.01
            perTick = o["rate"] * tick
            state = {"carry": 0.0, "next": 0}

            def burst():
                if self.stopping:
                    loop.stop()
                    return
                state["carry"] += perTick
                while state["carry"] >= 1:
                    state["carry"] -= 1
                    sender = senders[state["next"] % len(senders)]
                    state["next"] += 1
                    self.sendOne(sender, loop=False)

            loop = LoopingCall(burst)
            loop.clock = self.reactor
            loop.start(tick)
        else:
            for sender in senders:
                for _ in range(o["inflight"]):
                    self.sendOne(sender)

    def sendOne(self, protocol, loop=True):
        if self.stopping or not protocol.connected:
            return
        protocol.counter += 1
        body = _stamp.pack(time.perf_counter()) + b"x" * max(0, self.options["body"] - 8)
        d = protocol.send(protocol.peer, body, "{}-{}".format(protocol.uid, protocol.counter))

        def sent(response):
            if self.measuring:
                self.acked += 1
            if loop:
                self.sendOne(protocol)

        def failed(failure):
            if not self.stopping:
                self.errors += 1
                self.log("send failed: {}".format(failure.getErrorMessage()))

        d.addCallbacks(sent, failed)

    def result(self, seconds, cpu, rss):
        o = self.options
        latencies = sorted(self.latencies)
        ms = lambda v: None if v is None else round(v * 1000, 3)
        return {
            "scenario": "p2p",
            "users": o["users"],
            "transport": o["transport"],
            "store": o["store"],
            "mode": "open loop {} msg/s".format(o["rate"]) if o["rate"] else
                    "closed loop, {} in flight per sender".format(o["inflight"]),
            "body_bytes": o["body"],
            "seconds": round(seconds, 3),
            "sends_acked_per_s": round(self.acked / seconds, 1),
            "deliveries_per_s": round(self.delivered / seconds, 1),
            "latency_ms": {
                "p50": ms(percentile(latencies, 0.50)),
                "p99": ms(percentile(latencies, 0.99)),
                "p999": ms(percentile(latencies, 0.999)),
                "max": ms(latencies[-1] if latencies else None),
            },
            "server_cpu_percent": round(100 * cpu / seconds, 1),
            "server_rss_mb": round(rss / 2**20, 1),
            "errors": self.errors,
        }


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write("{}\n{}\n".format(options, e))
        return 2
    from twisted.internet.task import react

    sub = options.subOptions
    outcome = {}

    def go(reactor):
        return P2PRun(reactor, sub).run().addCallback(
            lambda result: outcome.__setitem__("result", result)
        )

    try:
        react(lambda r: go(r).addCallback(lambda _: None), [])
    except SystemExit as e:
        if e.code:
            return e.code
    result = outcome["result"]
    text = json.dumps(result, indent=2)
    print(text)
    if sub["json"]:
        FilePath(sub["json"]).setContent(text.encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
