# -*- test-case-name: tests.test_bench -*-
"""
The in-run reference: the raw Twisted echo server of
L{imserver.bench.echo}, on the same transport as the scenario (plain TCP,
or TLS with the gate's certificate), pinned like the gate, driven by the
same workers with the same options.

It measures what Twisted itself costs on this machine, in this run: the
rate of connections (TCP, TLS and one round trip), the memory per idle
connection and, for scenarios measured over a window, round trips per
second with 100-byte payloads, one in flight per connection.  Scenario
figures are reported as ratios to it (C{ratio_to_reference}), which drift
much less with the machine than absolute figures.
"""

from twisted.internet.defer import inlineCallbacks

from imserver.bench.scenario import RoundTripLoad, Scenario
from imserver.bench.stats import latencySummary

#: The payload of every echo request.
PAYLOAD = b"e" * 100


class EchoLoad(RoundTripLoad):
    """
    Echo clients: the handshake is one echo round trip.
    """

    request = PAYLOAD

    def hello(self, index):
        return PAYLOAD

    def accept(self, data):
        return data == PAYLOAD


class Reference(Scenario):
    """
    The echo reference, run after the scenario with the same options.
    """

    name = "reference"
    Load = EchoLoad
    rates = ("connected", "requests")

    @inlineCallbacks
    def drive(self, run):
        idle = run.serverRss()
        result = yield run.connect()
        result["rss_per_idle_connection_kb"] = round(
            (run.serverRss() - idle) / max(1, result["connected"]) / 1024, 2
        )
        if "duration" in self.options:
            window = yield run.window()
            result.update(window.figures)
            result["requests_per_s"] = window.rate("requests")
            result["latency_ms"] = latencySummary(window.latencies)
        return result
