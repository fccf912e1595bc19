# -*- test-case-name: tests.test_malformed -*-
"""
The gate under fuzzing, without atheris: feed bytes to one
L{imserver.protocol.GateProtocol} over a L{StringTransport}, in connection
state NEW or AUTHENTICATED, and check what it did.

L{runInput} is the whole target; C{fuzz/fuzz_gate.py} hands it atheris's
inputs, C{tests/test_malformed.py} the malformed suite's and the saved
crashes of C{fuzz/regressions/}.

The first byte of an input picks the state (bit 0: 0 NEW, 1 AUTHENTICATED),
the message store (bit 1: 0 the memory store, 1 SQLite in memory, not
threaded) and how the rest is cut into reads (bits 2-7: 0 for one read,
else reads of that many bytes), so the fuzzer explores both stores and
reassembly too.  The rest is what the client sends.

Properties checked (any violation raises L{GateFault}):

  - C{dataReceived} never raises;
  - nothing is logged as a failure (an C{INTERNAL} answer is a bug too);
  - everything written is a sequence of well-formed frames: RESPONSEs with
    a non-zero seq, ERRORs with an error code, NOTIFYs named;
  - the connection is closed only after an ERROR frame, a fatal error
    RESPONSE (C{AUTH_FAILED}, C{TOO_MANY_DEVICES}, C{RATE_LIMITED}) or an
    ERROR frame from the client; an ERROR frame is always followed by the
    close and by nothing else;
  - C{connectionLost} afterwards does not raise.
"""

import random
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from imserver.auth import TokenAuthenticator, mintToken
from imserver.framing import encodeFrame
from imserver.metrics import GateMetrics
from imserver.pb import im_pb2 as pb
from imserver.protocol import AUTHENTICATED, GateFactory
from imserver.registry.memory import MemorySessionRegistry
from imserver.settings import Settings
from imserver.store.memory import MemoryMessageStore
from imserver.store.sqlite import SQLiteMessageStore

#: The secret, clock and user of every run; the seed corpus is built with
#: the same ones, so its valid tokens are valid here.
SECRET = b"fuzz-secret-fuzz-secret-fuzz-sec"
NOW = 1_700_000_000
UID = "fuzzer"
#: Entries in the fuzzed user's inbox before the input (so acks have room).
BACKLOG = 3
#: A group the fuzzed user is in, and one it is not in.
GROUP, OTHER_GROUP = "team", "others"

_FATAL_RESPONSES = frozenset([pb.AUTH_FAILED, pb.TOO_MANY_DEVICES, pb.RATE_LIMITED])


#: Bugs found and reported, not fixed yet: name -> (a predicate on a
#: written frame, a predicate on a logged failure event) saying what the
#: bug explains (either may be L{None}).  Tolerated unless C{strict}, so
#: fuzzing goes on past them; fuzz/regressions/NAME holds an input for
#: each, and tests/test_malformed.py checks that each still fails strictly.
#: Fixed so far: rate-limited-seq-0 (the seq is now checked before the
#: request rate) and sqlite-uint64-overflow (fetch after any uint64 is an
#: empty page); their inputs stay in fuzz/regressions as regression cases.
KNOWN_BUGS = {}
_SETTINGS = Settings()
_METRICS = GateMetrics()


class GateFault(AssertionError):
    """
    The gate broke one of the fuzzing properties.
    """


class _Failures:
    """
    Collects the failures logged while an input runs.
    """

    def __init__(self):
        self.failures = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event):
        if event.get("log_failure") is not None:
            self.failures.append(event)


_failures = _Failures()


def _gate(sqlite):
    clock = Clock()
    clock.advance(NOW)
    if sqlite:
        store = SQLiteMessageStore(":memory:", None, threaded=False)
        store.startService()
    else:
        store = MemoryMessageStore()
    factory = GateFactory(
        settings=_SETTINGS,
        authenticator=TokenAuthenticator(SECRET, clock),
        registry=MemorySessionRegistry(maxDevices=_SETTINGS.max_devices),
        store=store,
        clock=clock,
        gateId="fuzz",
        rng=random.Random(0),
        metrics=_METRICS,
    )
    nowMs = NOW * 1000
    for i in range(BACKLOG):
        store.deliver("peer", "b{}".format(i), pb.Message(recipient=UID, body=b"x"), [UID], nowMs)
    factory.groups.create(GROUP, "Team", UID, nowMs)
    factory.groups.create(OTHER_GROUP, "Others", "peer", nowMs)
    return factory, clock, store


def authFrame(seq=1):
    """
    The encoded C{auth} request of L{UID} that succeeds in a run.
    """
    request = pb.AuthRequest(uid=UID, device_id="fuzz", token=mintToken(SECRET, UID, 3600, NOW))
    return encodeFrame(
        pb.Frame(kind=pb.REQUEST, seq=seq, method="auth", body=request.SerializeToString())
    )


def makeInput(state, payload, chunk=0, sqlite=False):
    """
    An input for L{runInput}.

    @param state: C{"new"} or C{"authenticated"}.
    @param chunk: bytes per read, 0 for one read (at most 63).
    @param sqlite: whether the gate uses the SQLite store.
    """
    return bytes([(chunk << 2) | (sqlite << 1) | (state == "authenticated")]) + payload


def _frames(data):
    frames, offset = [], 0
    while offset < len(data):
        if len(data) - offset < 4:
            raise GateFault("the gate wrote a partial length prefix: {!r}".format(data[offset:]))
        (length,) = struct.unpack_from("!I", data, offset)
        body = data[offset + 4 : offset + 4 + length]
        if len(body) != length:
            raise GateFault("the gate wrote a partial frame")
        frame = pb.Frame()
        frame.ParseFromString(body)
        frames.append(frame)
        offset += 4 + length
    return frames


def runInput(data, strict=False):
    """
    Run one input; raise L{GateFault} if the gate misbehaves.

    @param strict: whether the L{KNOWN_BUGS} count too.
    @return: the frames the gate wrote in answer, for tests.
    """
    if not data:
        return []
    authenticated = data[0] & 1
    sqlite = data[0] & 2
    chunk = data[0] >> 2
    payload = data[1:]
    del _failures.failures[:]
    factory, clock, store = _gate(sqlite)
    try:
        return _run(
            factory, clock, authenticated, chunk, payload, () if strict else KNOWN_BUGS.values()
        )
    finally:
        if sqlite:
            store.stopService()


def _unexplained(tolerated):
    return [
        event
        for event in _failures.failures
        if not any(known is not None and known(event) for _, known in tolerated)
    ]


def _run(factory, clock, authenticated, chunk, payload, tolerated):
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    if authenticated:
        protocol.dataReceived(authFrame())
        if protocol.session.state != AUTHENTICATED:
            raise GateFault(
                "the harness could not authenticate: {}".format(_frames(transport.value()))
            )
        transport.clear()
    try:
        if chunk:
            for start in range(0, len(payload), chunk):
                protocol.dataReceived(payload[start : start + chunk])
        else:
            protocol.dataReceived(payload)
    except Exception as e:
        raise GateFault("dataReceived raised {!r}".format(e)) from e
    failures = _unexplained(tolerated)
    if failures:
        raise GateFault(
            "the gate logged a failure: {}".format(failures[0]["log_failure"].getTraceback())
        )
    frames = _checkWritten(protocol, transport, tolerated)
    try:
        protocol.connectionLost(Failure(ConnectionDone()))
    except Exception as e:
        raise GateFault("connectionLost raised {!r}".format(e)) from e
    clock.advance(3600)
    failures = _unexplained(tolerated)
    if failures:
        raise GateFault(
            "the gate logged a failure after the close: {}".format(
                failures[0]["log_failure"].getTraceback()
            )
        )
    return frames


def _checkWritten(protocol, transport, tolerated):
    frames = _frames(transport.value())
    for index, frame in enumerate(frames):
        if any(known is not None and known(frame) for known, _ in tolerated):
            continue
        if frame.kind == pb.RESPONSE:
            if frame.seq == 0:
                raise GateFault("a RESPONSE with seq 0: {}".format(frame))
            if frame.HasField("error") and frame.error.code in (
                pb.INTERNAL,
                pb.ERROR_CODE_UNSPECIFIED,
            ):
                raise GateFault("an error response {}".format(frame))
        elif frame.kind == pb.ERROR:
            if not frame.HasField("error") or frame.error.code == pb.ERROR_CODE_UNSPECIFIED:
                raise GateFault("an ERROR frame without a code: {}".format(frame))
            if index != len(frames) - 1:
                raise GateFault("frames written after an ERROR frame: {}".format(frames))
            if not transport.disconnecting:
                raise GateFault("an ERROR frame, but the connection stays")
        elif frame.kind == pb.NOTIFY:
            if not frame.method:
                raise GateFault("a NOTIFY without a name")
        else:
            raise GateFault("a frame of kind {}".format(frame.kind))
    if transport.disconnecting:
        last = frames[-1] if frames else None
        explained = (
            protocol.session._peerError is not None
            or last is not None
            and last.kind == pb.ERROR
            or last is not None
            and last.kind == pb.RESPONSE
            and last.error.code in _FATAL_RESPONSES
        )
        if not explained:
            raise GateFault("closed without an error: {}".format(frames))
    return frames
