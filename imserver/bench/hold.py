# -*- test-case-name: tests.test_bench -*-
"""
C{hold}: N authenticated connections that heartbeat as the client library
does, and nothing else (unless C{--seed-profile}: each client also sends
500 bytes to its partner once a minute, spread as C{--arrivals} says,
evenly by default).

Reports how fast they connect (TCP, TLS and C{auth}), the gate's memory per
connection (its RSS after holding minus its RSS before connecting, divided
by N) and its CPU while holding them for C{--duration}.

    python -m imserver.bench hold --users 18000 --transport tls --duration 60
    python -m imserver.bench hold --users 4000 --transport ws --duration 3
"""

from twisted.internet.defer import inlineCallbacks
from twisted.python import usage

from imserver import methods
from imserver.bench.options import ALL_TRANSPORTS, OpenLoopOptions
from imserver.bench.scenario import Load, Scenario, SessionClient, partner, userName

#: The body of a seed-profile message.
SEED_BODY = b"s" * 500


class HoldOptions(OpenLoopOptions):
    """
    The options of C{hold}.
    """

    longdesc = (
        "N authenticated connections that heartbeat as the client library does: how fast they "
        "connect, the gate's memory per connection and its CPU while holding them for --duration."
    )

    transports = ALL_TRANSPORTS

    optParameters = [
        [
            "heartbeat",
            None,
            30.0,
            "The gate's heartbeat interval in seconds (its idle timeout is 3 times that).",
            float,
        ],
        [
            "seed-period",
            None,
            60.0,
            "With --seed-profile: seconds between two messages of a client.",
            float,
        ],
    ]
    optFlags = [
        [
            "seed-profile",
            None,
            "Each client also sends 500 bytes to its partner once per "
            "--seed-period, spread as --arrivals says.",
        ],
    ]

    def postOptions(self):
        OpenLoopOptions.postOptions(self)
        if self["heartbeat"] < 0.01:
            raise usage.UsageError("--heartbeat must be at least 0.01")
        if self["seed-period"] <= 0:
            raise usage.UsageError("--seed-period must be > 0")
        if self["seed-profile"] and self["users"] % 2:
            raise usage.UsageError("--seed-profile needs an even number of --users (pairs)")


class HeldClient(SessionClient):
    """
    A held session: counts its heartbeat pings.
    """

    def ping(self, timeout=None):
        self.load.add("pings")
        return SessionClient.ping(self, timeout)


class HoldLoad(Load):
    """
    Held sessions; with a seed period, each sends to its partner once per
    period on average, all of them spread over it (L{Load.startArrivals}).
    """

    counters = ("connected", "pings", "seeded", "delivered", "errors")
    Client = HeldClient
    _next = 0

    def connectOne(self, index):
        return self.connectSession(index).addCallback(self.clients.append)

    def notified(self, client, name, message):
        if name == methods.MESSAGE.name and not message.outgoing:
            self.add("delivered")
        Load.notified(self, client, name, message)

    def on_start(self):
        period = self.config["seedPeriod"]
        if period and self.clients:
            self.startArrivals(len(self.clients) / period, self._seed)

    def _seed(self, due):
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        if not client.connected:
            return
        d = client.send(
            userName(partner(client.index)),
            SEED_BODY,
            "seed-{}-{}".format(client.index, self._next),
        )
        self.countSent(d, counter="seeded")


class Hold(Scenario):
    """
    Hold N heartbeating connections.
    """

    name = "hold"
    summary = "N authenticated heartbeating connections: connect rate, RSS and CPU per connection."
    Options = HoldOptions
    Load = HoldLoad
    rates = ("connected", "pings", "delivered")
    ratios = {
        "connect_per_s": "connect_per_s",
        "rss_per_connection_kb": "rss_per_idle_connection_kb",
    }

    def gateArguments(self):
        interval = self.options["heartbeat"]
        return ["--heartbeat-interval", repr(interval), "--idle-timeout", repr(3 * interval)]

    def workerConfig(self, first, count):
        return {
            "seedPeriod": self.options["seed-period"] if self.options["seed-profile"] else 0,
            **self.arrivalConfig(first),
        }

    @inlineCallbacks
    def drive(self, run):
        before = run.serverRss()
        result = yield run.connect()
        window = yield run.window()
        result.update(window.figures)
        result["rss_per_connection_kb"] = round(
            (window.serverRss - before) / max(1, result["connected"]) / 1024, 2
        )
        result["heartbeat_s"] = self.options["heartbeat"]
        result["pings_per_s"] = window.rate("pings")
        if self.options["seed-profile"]:
            result["arrivals"] = self.options["arrivals"]
            result["seed_messages_per_s"] = window.rate("seeded")
            result["deliveries_per_s"] = window.rate("delivered")
        return result
