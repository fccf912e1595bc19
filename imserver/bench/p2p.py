# -*- test-case-name: tests.test_bench -*-
"""
C{p2p}: 1:1 durable delivery.  Users are in pairs; the even one of each
pair sends to the odd one over the real protocol (send -> store -> push ->
ack), closed loop (C{--inflight} sends outstanding per sender) or open loop
at a fixed total C{--rate}, spaced as C{--arrivals} says (evenly by
default: each sender on its own evenly spaced schedule, the senders'
offsets spread; L{imserver.bench.arrivals}).

Both halves of a pair live in the same worker, so the send-to-deliver
latency is measured on one clock: the sender stamps C{time.perf_counter()}
into the body (in the open loop, the time the message was scheduled for,
so the client's own lateness is part of the latency), the receiver
subtracts it from its own.

    python -m imserver.bench p2p --users 400 --duration 10 --warmup 2
    python -m imserver.bench p2p --users 1000 --rate 2400 --transport tls
    python -m imserver.bench p2p --users 1000 --rate 2400 --arrivals poisson --seed 7
    python -m imserver.bench p2p --users 400 --transport wss
    python -m imserver.bench p2p --users 400 --duration 10 --before-send
    python -m imserver.bench p2p --users 400 --duration 10 --no-echo

With C{--no-echo} every session authenticates with C{no_echo}: a sender is
not pushed its own message back (its C{send} answer is its copy), so a
message is 4 frames instead of 6; C{echoes_per_s} (own messages pushed back
to their senders) shows it: about C{deliveries_per_s} without the flag, 0
with it.

With C{--before-send} the gate asks a before-send backend about every send
(C{--before-send URL}, docs/api.md): the bench starts an allow-all one
(L{imserver.bench.allowall}) on loopback, pinned with the gate, and reports
its CPU as C{before_send_backend_cpu_percent}.
"""

import struct

from twisted.internet.defer import inlineCallbacks

from imserver import methods
from imserver.bench.options import ALL_TRANSPORTS, OpenLoopOptions, checkSending
from imserver.bench.scenario import Load, Scenario, partner, userName
from imserver.bench.stats import latencySummary

_stamp = struct.Struct("!d")


class P2POptions(OpenLoopOptions):
    """
    The options of C{p2p}.
    """

    longdesc = (
        "1:1 durable delivery: users in pairs, the even one of each pair sending to the odd one "
        "over the real protocol (send -> store -> push -> ack), closed loop (--inflight sends "
        "outstanding per sender) or open loop at a total --rate, spaced as --arrivals says."
    )

    transports = ALL_TRANSPORTS

    pairs = True
    optFlags = [
        [
            "before-send",
            None,
            "Start an allow-all before-send backend on loopback (pinned with the gate) and "
            "give its URL to the gate's --before-send: every send is checked over HTTP.",
        ],
        [
            "no-echo",
            None,
            "Sessions authenticate with no_echo: a sender is not pushed its own message back "
            "(the send answer is its copy), 4 frames per message instead of 6.",
        ],
    ]
    optParameters = [
        ["inflight", None, 1, "Closed loop: sends outstanding per sender.", int],
        ["rate", None, 0.0, "Open loop: total sends per second (0: closed loop).", float],
        ["body", None, 100, "Message body bytes (at least 8: the timestamp).", int],
    ]

    def postOptions(self):
        OpenLoopOptions.postOptions(self)
        checkSending(self, _stamp.size)


class P2PLoad(Load):
    """
    Pairs of sessions, the even user of each sending to the odd one.
    """

    counters = ("connected", "sent", "delivered", "echoes", "errors")

    def __init__(self, reactor, spec, *args, **kwargs):
        Load.__init__(self, reactor, spec, *args, **kwargs)
        self._padding = b"x" * (self.config["body"] - _stamp.size)
        self._messages = 0
        self._senders = []
        self._turn = 0

    def connectOne(self, index):
        return self.connectSession(index, noEcho=self.config["noEcho"]).addCallback(
            self.clients.append
        )

    def notified(self, client, name, message):
        if name == methods.MESSAGE.name:
            if message.outgoing:
                self.add("echoes")  # a sender's own message pushed back to it
            else:
                self.add("delivered")
                self.record(self.now() - _stamp.unpack_from(message.message.body)[0])
        Load.notified(self, client, name, message)

    def on_start(self):
        self._senders = [client for client in self.clients if client.index % 2 == 0]
        if not self._senders:
            return
        if self.config["rate"]:
            self.startArrivals(self.config["rate"], self._sendNext)
        else:
            for sender in self._senders:
                for _ in range(self.config["inflight"]):
                    self.sendOne(sender, loop=True)

    def _sendNext(self, due):
        """
        Open loop: the next sender in turn sends the message due at C{due}.
        """
        senders = self._senders
        sender = senders[self._turn]
        self._turn = (self._turn + 1) % len(senders)
        self.sendOne(sender, loop=False, stamp=due)

    def sendOne(self, client, loop, stamp=None):
        """
        Send one message from C{client} to its partner; when answered, send
        the next if C{loop}.

        @param stamp: the time its latency is measured from, on L{now}'s
            clock (its due time in the open loop); now if L{None}.
        """
        if self.stopping or not client.connected:
            return
        self._messages += 1
        body = _stamp.pack(self.now() if stamp is None else stamp) + self._padding
        d = client.send(
            userName(partner(client.index)), body, "{}-{}".format(client.index, self._messages)
        )
        self.countSent(d, again=(lambda: self.sendOne(client, loop)) if loop else None)


class P2P(Scenario):
    """
    1:1 send -> store -> push -> ack.
    """

    name = "p2p"
    summary = "1:1 send -> store -> push -> ack, closed or open loop."
    Options = P2POptions
    Load = P2PLoad
    rates = ("sent", "delivered")
    ratios = {"deliveries_per_s": "requests_per_s"}

    def gateArguments(self):
        return ["--max-unacked", "1000"]

    def workerConfig(self, first, count):
        o = self.options
        return {
            "inflight": o["inflight"],
            "rate": o["rate"] * count / o["users"],
            "body": o["body"],
            "noEcho": o["no-echo"],
            **self.arrivalConfig(first),
        }

    @inlineCallbacks
    def drive(self, run):
        o = self.options
        result = yield run.connect()
        window = yield run.window()
        result.update(window.figures)
        result.update(
            {
                "mode": "open loop {} msg/s, {} arrivals".format(o["rate"], o["arrivals"])
                if o["rate"]
                else "closed loop, {} in flight per sender".format(o["inflight"]),
                "body_bytes": o["body"],
                "sends_acked_per_s": window.rate("sent"),
                "deliveries_per_s": window.rate("delivered"),
                "echoes_per_s": window.rate("echoes"),
                "latency_ms": latencySummary(window.latencies),
            }
        )
        if o["rate"]:
            result["arrivals"] = o["arrivals"]
        if o["no-echo"]:
            result["no_echo"] = True
        if o["before-send"]:
            result["before_send"] = "allow-all backend on loopback, pinned with the gate"
        return result
