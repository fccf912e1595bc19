# -*- test-case-name: tests.test_bench -*-
"""
C{ping}: RPC round trips through the gate's request dispatch (the C{ping}
method), one in flight per connection.  Its ratio to the echo reference,
which does the same round trips with no protocol at all, is the key figure:
what imserver's framing, protobuf and RPC layers cost on top of Twisted.

The clients are as lean as the reference's (L{RoundTripClient}): one
pre-encoded C{auth} frame, then the same pre-encoded C{ping} frame (seq 2)
again and again, which the protocol allows as each is answered before the
next is sent.  So both runs spend the same client work per round trip.

    python -m imserver.bench ping --users 100 --duration 10
    python -m imserver.bench ping --users 100 --duration 10 --transport ws
"""

from google.protobuf.message import DecodeError
from twisted.internet.defer import inlineCallbacks

from imserver import methods
from imserver.bench.options import ALL_TRANSPORTS, WindowOptions
from imserver.bench.scenario import RoundTripLoad, Scenario, requestFrame
from imserver.bench.stats import latencySummary
from imserver.pb import im_pb2 as pb


class PingOptions(WindowOptions):
    """
    The options of C{ping}: the common ones.
    """

    longdesc = (
        "RPC round trips through the gate's request dispatch (the ping method), one in flight per "
        "connection; its ratio to the echo reference is what imserver's framing, protobuf and RPC "
        "layers cost on top of Twisted."
    )

    transports = ALL_TRANSPORTS


class PingLoad(RoundTripLoad):
    """
    Lean gate clients doing C{ping} round trips.
    """

    request = requestFrame(2, methods.PING, pb.PingRequest())

    def hello(self, index):
        return self.authFrame(index)

    def accept(self, data):
        try:
            frame = pb.Frame.FromString(data)
        except DecodeError:
            return False
        return frame.kind == pb.RESPONSE and not frame.HasField("error")


class Ping(Scenario):
    """
    C{ping} round trips.
    """

    name = "ping"
    summary = "RPC round trips (ping), one in flight per connection."
    Options = PingOptions
    Load = PingLoad
    rates = ("requests",)
    ratios = {"requests_per_s": "requests_per_s", "connect_per_s": "connect_per_s"}

    def gateArguments(self):
        # The lean clients send no heartbeat; they are never idle once
        # started, but a large connect phase may outlast the default.
        return ["--idle-timeout", "3600"]

    @inlineCallbacks
    def drive(self, run):
        result = yield run.connect()
        window = yield run.window()
        result.update(window.figures)
        result["requests_per_s"] = window.rate("requests")
        result["latency_ms"] = latencySummary(window.latencies)
        return result
