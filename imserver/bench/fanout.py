# -*- test-case-name: tests.test_bench -*-
"""
C{fanout}: one sender to a group of M online members.

The coordinator creates the group (C{--members} M, the users C{u0} ..
C{u<M-1>}) through the gate's HTTP API before anyone connects; the members
are spread over the workers like any users.  Member 0 sends to the group
over the real protocol (send -> store in M inboxes -> push to every member
-> ack), closed loop (C{--inflight} sends outstanding) or open loop at
C{--rate} sends per second, spaced as C{--arrivals} says (evenly by
default; L{imserver.bench.arrivals}).  Every other member is a lean client
(L{MemberClient}) that counts the pushes it receives and acks cumulatively
every C{--ack-every} entries, and once its stream has gone quiet for
L{ACK_INTERVAL}, as the protocol asks of a client batching its acks; the
gate's window (C{--max-unacked}, set to L{MAX_UNACKED}) never stalls.

Deliveries are the pushes the members receive (the sender's own copy
excluded).  The send time (in the open loop, the time the send was
scheduled for) is stamped in the body; the latency is from it to a member
receiving the push, for every C{--sample-every}-th entry of each member's
inbox.

    python -m imserver.bench fanout --members 1000 --duration 10
    python -m imserver.bench fanout --members 1000 --store memory --transport tls
"""

import struct

from google.protobuf.message import DecodeError
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python import usage

from imserver import methods
from imserver.bench.options import OpenLoopOptions, checkSending
from imserver.bench.scenario import LeanClient, Load, Scenario, userName
from imserver.bench.stats import latencySummary
from imserver.observe import OneShot
from imserver.pb import im_pb2 as pb
from imserver.transport import noDelay

#: The group's id.
GROUP = "bench-fanout"
#: The gate's C{--max-unacked}: the push window of every member.
MAX_UNACKED = 256
#: Seconds after which a member whose stream has gone quiet acks what it
#: has not acked yet (checked every this many seconds, so within twice it).
ACK_INTERVAL = 0.05
#: Members added per HTTP API call.
API_BATCH = 1000
#: The largest frame a member accepts (the gate's default limit).
MAX_FRAME = 64 * 1024

# The body starts with the send time, from time.perf_counter(): on Linux
# that is CLOCK_MONOTONIC, one clock for the whole system, so a member in
# another worker process than the sender reads the same clock.
_stamp = struct.Struct("!d")
_length = struct.Struct("!I")
#: How the gate encodes the start of every C{message} notify frame
#: (L{imserver.wire.EncodedMessage}): Frame.kind = NOTIFY, Frame.method
#: = "message", then Frame.body's tag.  Anything else is parsed in full.
_MESSAGE_PREFIX = b"\x08\x03\x1a\x07message\x22"


class FanoutOptions(OpenLoopOptions):
    """
    The options of C{fanout}.
    """

    longdesc = (
        "One sender to a group of --members online members (the group is made through the gate's "
        "HTTP API): send -> store in every inbox -> push to every member -> ack."
    )

    optParameters = [
        [
            "members",
            "m",
            1000,
            "Group members, the sender (member 0) included; one connection each.",
            int,
        ],
        ["users", "u", None, "The same as --members.", int],
        ["inflight", None, 8, "Closed loop: sends outstanding.", int],
        ["rate", None, 0.0, "Open loop: sends per second (0: closed loop).", float],
        ["body", None, 100, "Message body bytes (at least 8: the timestamp).", int],
        [
            "ack-every",
            None,
            16,
            "Members ack cumulatively every this many entries (and once their stream is quiet "
            "for {} ms); at most {}, half the gate's --max-unacked.".format(
                int(ACK_INTERVAL * 1000), MAX_UNACKED // 2
            ),
            int,
        ],
        [
            "sample-every",
            None,
            10,
            "Latency of every this-many-th entry of each member's inbox.",
            int,
        ],
    ]

    def postOptions(self):
        if self["users"] is not None:
            self["members"] = self["users"]
        self["users"] = self["members"]
        if self["members"] < 2:
            raise usage.UsageError("--members must be >= 2")
        OpenLoopOptions.postOptions(self)
        checkSending(self, _stamp.size)
        if not 1 <= self["ack-every"] <= MAX_UNACKED // 2:
            raise usage.UsageError("--ack-every must be between 1 and {}".format(MAX_UNACKED // 2))
        if self["sample-every"] < 1:
            raise usage.UsageError("--sample-every must be >= 1")


def ackFrame(seq):
    """
    The length-prefixed C{ack} notify frame for C{seq}.
    """
    frame = pb.Frame(
        kind=pb.NOTIFY, method=methods.ACK.name, body=pb.Ack(seq=seq).SerializeToString()
    ).SerializeToString()
    return _length.pack(len(frame)) + frame


class MemberClient(LeanClient, Protocol):
    """
    A group member that only receives: a pre-encoded C{auth}, then it
    counts the C{message} pushes and acks them cumulatively.

    It reads the frames itself, and decodes of a push only the prefix and
    the inbox seq, except for the entries it samples the latency of: the
    member must not be what limits the rate.

    @ivar ready: a L{Deferred} firing with this client once authenticated,
        or failing if the connection ends or the auth fails first.
    @ivar seq: the highest inbox seq received.
    @ivar acked: the highest seq acknowledged.
    @ivar fresh: whether entries came since the load's ack timer last
        looked: the stream is not quiet yet.
    """

    def __init__(self, load, index):
        self.load = load
        self.index = index
        self.label = "{}'s connection".format(userName(index))
        self.ready = Deferred()
        self.isReady = False
        self.seq = 0
        self.acked = 0
        self.fresh = False
        self._ackEvery = load.config["ackEvery"]
        self._sampleEvery = load.config["sampleEvery"]
        self._buffer = b""
        self._closed = OneShot()

    def connectionMade(self):
        noDelay(self.transport)
        hello = self.load.authFrame(self.index)
        self.transport.write(_length.pack(len(hello)) + hello)

    def dataReceived(self, data):
        buf = self._buffer + data if self._buffer else data
        end = len(buf)
        pos = 0
        received = 0
        while end - pos >= 4:
            size = _length.unpack_from(buf, pos)[0]
            if size > MAX_FRAME:
                self._fail("frame of {} bytes".format(size))
                return
            start = pos + 4
            if end - start < size:
                break
            pos = start + size
            if not buf.startswith(_MESSAGE_PREFIX, start) or not self.isReady:
                if not self._otherFrame(buf[start:pos]):
                    return
                continue
            # Skip Frame.body's length, then InboxEntry.seq (tag 0x08).
            i = start + len(_MESSAGE_PREFIX)
            while buf[i] & 0x80:
                i += 1
            i += 1
            body = i
            if buf[i] != 0x08:
                if not self._otherFrame(buf[start:pos]):
                    return
                continue
            i += 1
            seq = shift = 0
            while True:
                byte = buf[i]
                seq |= (byte & 0x7F) << shift
                i += 1
                if byte < 0x80:
                    break
                shift += 7
            if i + 1 < pos and buf[i] == 0x10 and buf[i + 1]:  # outgoing: not a delivery
                self._entry(seq)
                continue
            received += 1
            if seq % self._sampleEvery == 0:
                self._sample(buf[body:pos])
            self._entry(seq)
        self._buffer = buf[pos:]
        if received:
            self.load.counts["delivered"] += received
        if self.seq > self.acked:
            self.fresh = True
            self.load.ackLater(self)

    def _entry(self, seq):
        if seq > self.seq:
            self.seq = seq
        if self.seq - self.acked >= self._ackEvery:
            self.ack()

    def _sample(self, entryBytes):
        entry = pb.InboxEntry.FromString(entryBytes)
        load = self.load
        load.record(load.now() - _stamp.unpack_from(entry.message.body)[0])

    def _otherFrame(self, data):
        """
        A frame off the fast path: the answer to C{auth}, an error, or a
        push encoded otherwise.

        @return: whether the connection goes on.
        """
        try:
            frame = pb.Frame.FromString(data)
        except DecodeError:
            self._fail("a frame that does not parse: {!r}".format(data[:80]))
            return False
        if not self.isReady:
            if frame.kind == pb.RESPONSE and frame.seq == 1 and not frame.HasField("error"):
                self.isReady = True
                if not self.ready.called:  # else it timed out and is being aborted
                    self.ready.callback(self)
                return True
            self._fail("auth failed: {}".format(frame.error.message or frame))
            return False
        if frame.kind == pb.ERROR:
            self._fail(
                "the gate closed the connection: {} {}".format(
                    pb.ErrorCode.Name(frame.error.code), frame.error.message
                )
            )
            return False
        if frame.kind == pb.NOTIFY and frame.method == methods.MESSAGE.name:
            entry = pb.InboxEntry.FromString(frame.body)
            if not entry.outgoing:
                self.load.add("delivered")
                if entry.seq % self._sampleEvery == 0:
                    self._sample(frame.body)
            self._entry(entry.seq)
        return True

    def ack(self):
        """
        Acknowledge every entry received so far.
        """
        if self.seq > self.acked and self.connected:
            self.acked = self.seq
            self.transport.write(ackFrame(self.seq))
            self.load.add("acks")

    def _fail(self, reason):
        self.transport.abortConnection()
        if self.isReady:
            self.load.error("{}: {}".format(userName(self.index), reason))
        elif not self.ready.called:
            self.ready.errback(ValueError(reason))


class FanoutLoad(Load):
    """
    The members of one worker; the sender too in the worker holding
    member 0.
    """

    counters = ("connected", "sent", "delivered", "acks", "errors")

    def __init__(self, reactor, spec, *args, **kwargs):
        Load.__init__(self, reactor, spec, *args, **kwargs)
        self._padding = b"x" * (self.config["body"] - _stamp.size)
        self._messages = 0
        self._sender = None
        self._unacked = set()
        self._acking = LoopingCall(self._ackQuiet)
        self._acking.clock = reactor

    def connectOne(self, index):
        if index == 0:

            def connected(client):
                self._sender = client
                self.clients.append(client)

            return self.connectSession(index).addCallback(connected)
        return self.connectLean(index, MemberClient(self, index))

    def ackLater(self, client):
        """
        C{client} has entries it has not acked: the timer acks them once
        its stream is quiet, unless a later push does it first.
        """
        self._unacked.add(client)

    def _ackQuiet(self):
        """
        Ack the entries of every member that received nothing since the
        last tick; look again next tick at those that did.
        """
        unacked, self._unacked = self._unacked, set()
        for client in unacked:
            if client.fresh:
                client.fresh = False
                self._unacked.add(client)
            else:
                client.ack()

    def on_start(self):
        self._acking.start(ACK_INTERVAL, now=False)
        if self._sender is None:
            return
        if self.config["rate"]:
            self.startArrivals(self.config["rate"], lambda due: self.sendOne(False, due))
        else:
            for _ in range(self.config["inflight"]):
                self.sendOne(loop=True)

    def sendOne(self, loop, stamp=None):
        """
        Send one message to the group; when answered, send the next if
        C{loop}.

        @param stamp: the time its latency is measured from, on L{now}'s
            clock (its due time in the open loop); now if L{None}.
        """
        client = self._sender
        if self.stopping or not client.connected:
            return
        self._messages += 1
        body = _stamp.pack(self.now() if stamp is None else stamp) + self._padding
        d = client.send("", body, "fanout-{}".format(self._messages), groupId=self.config["group"])
        self.countSent(d, again=(lambda: self.sendOne(loop)) if loop else None)

    def on_close(self):
        if self._acking.running:
            self._acking.stop()
        return Load.on_close(self)


class Fanout(Scenario):
    """
    One sender to a group of M online members.
    """

    name = "fanout"
    summary = "One sender to a group of M online members (groups made through the HTTP API)."
    Options = FanoutOptions
    Load = FanoutLoad
    rates = ("sent", "delivered")
    # An echo round trip is the least a server does per frame it sends
    # (one read, one write); a delivery is one pushed frame and 1/ack-every
    # of an ack read, the per-message work shared by M - 1 pushes.  So
    # deliveries against echo round trips per second is the cost of a push
    # against Twisted's cheapest frame, on the same connections.
    ratios = {"deliveries_per_s": "requests_per_s", "connect_per_s": "connect_per_s"}
    usesApi = True

    def gateArguments(self):
        # The members send nothing but acks: no heartbeat, so no idle
        # timeout while they connect and wait.
        return [
            "--max-group-size",
            str(self.options["members"]),
            "--max-unacked",
            str(MAX_UNACKED),
            "--idle-timeout",
            "3600",
        ]

    def workerConfig(self, first, count):
        o = self.options
        return {
            "group": GROUP,
            "inflight": o["inflight"],
            "rate": o["rate"],
            "body": o["body"],
            "ackEvery": o["ack-every"],
            "sampleEvery": o["sample-every"],
            **self.arrivalConfig(first),
        }

    @inlineCallbacks
    def createGroup(self, run):
        """
        Create the group with every user in it, through the HTTP API.
        """
        members = self.options["members"]
        run.phase = "creating the group"
        yield run.callApi(
            b"POST",
            "/v1/groups",
            {"group_id": GROUP, "name": "im-bench fanout", "owner": userName(0)},
        )
        for first in range(1, members, API_BATCH):
            yield run.callApi(
                b"POST",
                "/v1/groups/{}/members".format(GROUP),
                {
                    "members": [
                        {"uid": userName(i)} for i in range(first, min(members, first + API_BATCH))
                    ]
                },
            )
        run.log("fanout: group {} of {:,} members created".format(GROUP, members))

    @inlineCallbacks
    def drive(self, run):
        o = self.options
        yield self.createGroup(run)
        result = yield run.connect()
        window = yield run.window()
        result.update(window.figures)
        sent = window.counts.get("sent", 0)
        delivered = window.rate("delivered")
        cpu = window.figures["server_cpu_percent"]
        result.update(
            {
                "mode": "open loop {} msg/s, {} arrivals".format(o["rate"], o["arrivals"])
                if o["rate"]
                else "closed loop, {} in flight".format(o["inflight"]),
                "members": o["members"],
                "body_bytes": o["body"],
                "ack_every": o["ack-every"],
                "sends_per_s": window.rate("sent"),
                "deliveries_per_s": delivered,
                "deliveries_per_send": round(window.counts.get("delivered", 0) / sent, 1)
                if sent
                else None,
                "deliveries_per_server_cpu_s": round(100 * delivered / cpu, 1) if cpu else None,
                "acks_per_s": window.rate("acks"),
                "latency_sample_every": o["sample-every"],
                "latency_ms": latencySummary(window.latencies),
            }
        )
        if o["rate"]:
            result["arrivals"] = o["arrivals"]
        return result
