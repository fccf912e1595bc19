# -*- test-case-name: tests.test_bench -*-
"""
C{python -m imserver.bench.micro}: the gate's own Python work per frame,
without sockets, kernel or client: what L{imserver.bench}'s scenarios
cannot separate from Twisted's I/O and the machine's noise.

A real L{GateFactory} (memory store and registry, a L{Clock}) and real
L{GateProtocol}s on transports that only count what is written; requests
are fed to C{dataReceived} as a client would send them, one frame per
read.  It reports the CPU time (C{time.process_time}) per unit, the median
of C{--repeat} rounds:

  - C{ping}: one C{ping} request answered (read, parse, dispatch, response
    encoded and written);
  - C{p2p}: one 1:1 message: the C{send} read and stored, the push to the
    recipient and to the sender's own session, the answer, and both acks;
  - C{fanout}: one delivery of a group message to C{--members} online
    members (the send, the store's fan-out, the registry lookup, a push
    per member, and an ack from each member every 16 entries), per member.

    python -m imserver.bench.micro
    python -m imserver.bench.micro --members 1000 --repeat 7 --json out.json

Deterministic work, so the figures move with the code, not with the load of
the machine (within a few percent); before/after comparisons of a hot-path
change run it against both trees (C{PYTHONPATH}).
"""

import json
import random
import statistics
import sys
import time

from twisted.internet.task import Clock
from twisted.python import usage

from imserver import commandline
from imserver.auth import TokenAuthenticator, mintToken
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.protocol import GateFactory
from imserver.registry.memory import MemorySessionRegistry
from imserver.settings import Settings
from imserver.store.memory import MemoryMessageStore

_SECRET = b"m" * 32
_ACK_EVERY = 16


class CountingTransport:
    """
    The least a gate connection needs of its transport: writes are counted,
    not kept.
    """

    disconnecting = False

    def __init__(self):
        self.written = 0
        self.writes = 0

    def write(self, data):
        self.written += len(data)
        self.writes += 1

    def writeSequence(self, data):
        for item in data:
            self.write(item)

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def loseConnection(self):
        pass

    abortConnection = loseConnection

    def getPeer(self):
        return None

    def getHost(self):
        return None


def _request(seq, method, message):
    return encodeFrame(
        pb.Frame(kind=pb.REQUEST, seq=seq, method=method, body=message.SerializeToString())
    )


def _ack(seq):
    return encodeFrame(
        pb.Frame(kind=pb.NOTIFY, method="ack", body=pb.Ack(seq=seq).SerializeToString())
    )


class Gate:
    """
    A gate factory on a L{Clock} with helpers to connect sessions.
    """

    def __init__(self, **settings):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        defaults = dict(
            request_rate=1e9, request_burst=10**9, max_unacked=256, max_group_size=100_000
        )
        defaults.update(settings)
        self.settings = Settings(**defaults)
        self.store = MemoryMessageStore()
        self.factory = GateFactory(
            settings=self.settings,
            authenticator=TokenAuthenticator(_SECRET, self.clock),
            registry=MemorySessionRegistry(maxDevices=self.settings.max_devices),
            store=self.store,
            clock=self.clock,
            gateId="micro",
            rng=random.Random(1),
        )

    def session(self, uid, noEcho=False):
        """
        An authenticated session of C{uid} (with C{no_echo} if C{noEcho}).

        @return: C{(protocol, transport)}
        """
        protocol = self.factory.buildProtocol(None)
        transport = CountingTransport()
        protocol.makeConnection(transport)
        token = mintToken(_SECRET, uid, 3600, self.clock.seconds())
        protocol.dataReceived(
            _request(
                1,
                "auth",
                pb.AuthRequest(
                    uid=uid, token=token, device_id="d", platform=pb.DESKTOP, no_echo=noEcho
                ),
            )
        )
        if protocol.session.state != "authenticated":
            raise RuntimeError("auth failed for {}".format(uid))
        return protocol, transport


def _cpu(function, units):
    """
    CPU seconds per unit of C{function()} doing C{units} units.
    """
    started = time.process_time()
    function()
    return (time.process_time() - started) / units


def _check(transport, writes, what):
    """
    Make sure the work measured was the work meant (not an error path).
    """
    if transport.writes != writes:
        raise RuntimeError(
            "{}: {} frames written, expected {}".format(what, transport.writes, writes)
        )


def measurePing(count):
    gate = Gate()
    protocol, transport = gate.session("u0")
    frames = [_request(2 + (i % 1000), "ping", pb.PingRequest()) for i in range(count)]
    received = protocol.dataReceived

    def run():
        for frame in frames:
            received(frame)

    before = transport.writes
    cpu = _cpu(run, count)
    _check(transport, before + count, "ping")
    return cpu


def measureP2P(count, noEcho=False):
    """
    CPU per 1:1 message: the send, its answer, the push and its ack, and
    (unless C{noEcho}: the sender authenticated with C{no_echo}) the
    sender's own copy pushed back and acked.
    """
    gate = Gate()
    sender, senderTransport = gate.session("alice", noEcho)
    recipient, recipientTransport = gate.session("bob")
    before = senderTransport.writes, recipientTransport.writes
    sends = [
        _request(2 + i, "send", pb.SendRequest(to="bob", client_msg_id=str(i), body=b"x" * 100))
        for i in range(count)
    ]
    # Own copies and pushes land at seqs 1, 2, ...: each side acks each.
    acks = [_ack(i + 1) for i in range(count)]

    def run():
        for send, ack in zip(sends, acks):
            sender.dataReceived(send)
            recipient.dataReceived(ack)
            sender.dataReceived(ack)

    def runNoEcho():
        for send, ack in zip(sends, acks):
            sender.dataReceived(send)
            recipient.dataReceived(ack)

    cpu = _cpu(runNoEcho if noEcho else run, count)
    # The sender: answers and (with the echo) its own copies; the
    # recipient: pushes.
    _check(senderTransport, before[0] + (1 if noEcho else 2) * count, "p2p sender")
    _check(recipientTransport, before[1] + count, "p2p recipient")
    return cpu


def measureFanout(members, messages):
    gate = Gate()
    store = gate.store
    store.createGroup("g", "micro", "m0", 0)
    store.setMembers(
        "g", [("m{}".format(i), pb.ROLE_MEMBER) for i in range(1, members)], members, 0
    )
    connected = [gate.session("m{}".format(i)) for i in range(members)]
    sessions = [protocol for protocol, _ in connected]
    sender, others = sessions[0], sessions[1:]
    before = connected[-1][1].writes
    sends = [
        _request(2 + i, "send", pb.SendRequest(group_id="g", client_msg_id=str(i), body=b"x" * 100))
        for i in range(messages)
    ]

    def run():
        for i, send in enumerate(sends):
            sender.dataReceived(send)
            if (i + 1) % _ACK_EVERY == 0:
                ack = _ack(i + 1)
                for session in sessions:
                    session.dataReceived(ack)

    cpu = _cpu(run, messages * len(others))
    _check(connected[-1][1], before + messages, "fanout member")
    return cpu


class Options(commandline.Options):
    """
    The options of C{python -m imserver.bench.micro}.
    """

    synopsis = "Usage: python -m imserver.bench.micro [options]"
    longdesc = (
        "The gate's own Python work per frame, without sockets, kernel or client:"
        " real gate protocols (memory store and registry) on transports that only"
        " count what is written. Prints the CPU time per ping, per 1:1 message (with and"
        " without no_echo) and"
        " per group delivery to one member, the median of --repeat rounds, as JSON."
    )
    optParameters = [
        ["pings", None, 100_000, "Pings per round.", int],
        ["messages", None, 20_000, "1:1 messages per round.", int],
        ["members", None, 1000, "Members of the fan-out group.", int],
        ["group-messages", None, 64, "Group messages per round.", int],
        ["repeat", None, 5, "Rounds; the median is reported.", int],
        ["json", None, None, "Also write the result to this file."],
    ]

    def postOptions(self):
        for name in ("pings", "messages", "members", "group-messages", "repeat"):
            if self[name] < 1 or (name == "members" and self[name] < 2):
                raise usage.UsageError("--{} is too small".format(name))
        if self["group-messages"] % _ACK_EVERY:
            raise usage.UsageError("--group-messages must be a multiple of 16")


def run(config, out=sys.stdout):
    """
    Measure, print the JSON result and return it.
    """
    rounds = {
        "ping_us": [],
        "p2p_message_us": [],
        "p2p_no_echo_message_us": [],
        "fanout_delivery_us": [],
    }
    for _ in range(config["repeat"]):
        rounds["ping_us"].append(measurePing(config["pings"]) * 1e6)
        rounds["p2p_message_us"].append(measureP2P(config["messages"]) * 1e6)
        rounds["p2p_no_echo_message_us"].append(measureP2P(config["messages"], noEcho=True) * 1e6)
        rounds["fanout_delivery_us"].append(
            measureFanout(config["members"], config["group-messages"]) * 1e6
        )
    result = {
        "python": sys.version.split()[0],
        "members": config["members"],
        "repeat": config["repeat"],
    }
    for name, values in rounds.items():
        result[name] = round(statistics.median(values), 3)
        result[name + "_rounds"] = [round(v, 3) for v in values]
    text = json.dumps(result, indent=2)
    out.write(text + "\n")
    if config["json"]:
        with open(config["json"], "w") as f:
            f.write(text + "\n")
    return result


def main(argv=None):
    config = Options()
    try:
        config.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write("{}\n{}\n".format(config, e))
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
