# -*- test-case-name: tests.test_properties -*-
"""
Property tests of delivery: a hypothesis state machine over send, read,
ack, drop connection, vanish (the client goes away and the gate does not
notice), resume, store progress and restart gate, checking that no
acknowledged message is lost, every recipient sees its inbox in order and
without a gap, and no message becomes visible twice.

The harness is deterministic: in-memory transports (L{StringTransport}), a
L{Clock}, and the real SQLite store (L{SQLiteMessageStore}, not threaded)
in a temporary directory behind L{SteppedStore}, which holds every store
operation until the machine lets it run, so requests really are in
progress while connections drop and the gate restarts.  "Restart gate"
throws the whole gate away (factory, registry, connections, the operations
not yet run or run but not yet answered: the machine chooses whether the
pending ones were committed before the crash) and builds a new one over the
same database file.

Each client device behaves as docs/protocol.md section 16 says: it keeps
the last inbox seq it processed, authenticates with it, drops entries at or
below it, acks cumulatively, and re-sends every unanswered send with the
same C{client_msg_id} after each auth.

The default suite runs a reduced count.  The long job (docs/security.md)::

    IMSERVER_PROPERTY_EXAMPLES=200 IMSERVER_PROPERTY_STEPS=50 \\
        .venv/bin/trial tests.test_properties

A failure prints the shrunk sequence of steps and a
C{@reproduce_failure} blob that replays it.
"""

import collections
import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.auth import TokenAuthenticator, mintToken
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.protocol import GateFactory
from imserver.registry.memory import MemorySessionRegistry
from imserver.settings import Settings
from imserver.store.sqlite import SQLiteMessageStore

from tests.support.frames import readFrames

#: Examples and steps per example in the default suite; the environment
#: variables raise them for the long job.
EXAMPLES = int(os.environ.get("IMSERVER_PROPERTY_EXAMPLES") or 20)
STEPS = int(os.environ.get("IMSERVER_PROPERTY_STEPS") or 30)

SECRET = b"property-test-secret-0123456789ab"
USERS = ("alice", "bob", "carol")
#: (uid, device id, no_echo) of every client device: two of them take their
#: own sends' answers as their copies (AuthRequest.no_echo).
DEVICES = (
    ("alice", "phone", False),
    ("alice", "laptop", True),
    ("bob", "phone", False),
    ("carol", "phone", True),
)
#: Small windows and pages, so the limits are reached within a few steps.
SETTINGS = dict(max_unacked=3, sync_page_size=2)
#: Rounds of "run the store, reconnect, read, ack" allowed to settle.
SETTLE_ROUNDS = 200


class SteppedStore:
    """
    Holds every call to the wrapped store until L{run} lets it through, in
    the order of the calls, as the SQLite writer thread would answer them.
    """

    def __init__(self, store):
        self.store = store
        self.queue = collections.deque()

    def __getattr__(self, name):
        method = getattr(self.store, name)

        def call(*args):
            d = Deferred()
            self.queue.append((method, args, d))
            return d

        return call

    def run(self, count=None):
        """
        Run up to C{count} held operations (all with L{None}), firing their
        L{Deferred}s; operations they cause are queued behind.

        @return: how many ran.
        """
        ran = 0
        while self.queue and (count is None or ran < count):
            method, args, d = self.queue.popleft()
            method(*args).chainDeferred(d)
            ran += 1
        return ran

    def crash(self, committed):
        """
        Forget the held operations, as a crash does: run them first without
        answering (C{committed}), or not at all.
        """
        held, self.queue = self.queue, collections.deque()
        if committed:
            for method, args, _d in held:
                method(*args).addErrback(lambda f: None)


class Device:
    """
    A client device, as docs/protocol.md section 16 describes it.

    @ivar lastSeq: the highest inbox seq processed.
    @ivar stream: every entry processed, in order.
    @ivar pending: C{{client_msg_id: SendRequest}} not answered yet.
    @ivar noEcho: whether it authenticates with C{no_echo}, taking an answer
        with C{echo_skipped} as its entry, in its place in the stream.
    """

    def __init__(self, machine, uid, deviceId, noEcho=False):
        self.machine = machine
        self.uid = uid
        self.deviceId = deviceId
        self.noEcho = noEcho
        self.lastSeq = 0
        self.stream = []
        self.pending = collections.OrderedDict()
        self.protocol = self.transport = None
        self.authed = False
        self._requests = {}
        self._seq = 0

    def __repr__(self):
        return "{}/{}".format(self.uid, self.deviceId)

    @property
    def connected(self):
        return self.protocol is not None

    def connect(self, factory):
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.machine.serverSide.append(self.protocol)
        self._requests = {}
        self._call(
            "auth",
            pb.AuthRequest(
                uid=self.uid,
                device_id=self.deviceId,
                last_seq=self.lastSeq,
                token=mintToken(SECRET, self.uid, 3600, self.machine.clock.seconds()),
                no_echo=self.noEcho,
            ),
        )

    def _call(self, method, request, clientMsgId=None):
        self._seq += 1
        self._requests[self._seq] = (method, clientMsgId)
        self.protocol.dataReceived(
            encodeFrame(
                pb.Frame(
                    kind=pb.REQUEST, seq=self._seq, method=method, body=request.SerializeToString()
                )
            )
        )

    def send(self, clientMsgId, request):
        self.pending[clientMsgId] = request
        if self.authed:
            self._transmit(clientMsgId)

    def _transmit(self, clientMsgId):
        self._call("send", self.pending[clientMsgId], clientMsgId)

    def ack(self):
        if self.authed:
            self.protocol.dataReceived(
                encodeFrame(
                    pb.Frame(
                        kind=pb.NOTIFY,
                        method="ack",
                        body=pb.Ack(seq=self.lastSeq).SerializeToString(),
                    )
                )
            )

    def forget(self):
        """
        The connection is gone for this device (whatever the gate knows).
        """
        self.protocol = self.transport = None
        self.authed = False
        self._requests = {}

    def read(self):
        """
        Handle everything the gate has written, in order.

        @return: whether anything was read.
        """
        if not self.connected:
            return False
        data = self.transport.value()
        self.transport.clear()
        for frame in readFrames(data):
            self._frame(frame)
            if not self.connected:
                break
        if self.connected and self.transport.disconnecting:
            # The gate closed the connection (kicked, error): it is gone
            # once the transport has written everything.
            protocol = self.protocol
            self.forget()
            self.machine.lose(protocol)
        return bool(data)

    def _frame(self, frame):
        machine = self.machine
        if frame.kind == pb.RESPONSE:
            method, clientMsgId = self._requests.pop(frame.seq)
            if method == "auth":
                assert not frame.HasField("error"), "auth refused: {}".format(frame.error)
                response = pb.AuthResponse.FromString(frame.body)
                assert response.head_seq >= self.lastSeq, (
                    "{}: the gate's inbox head {} is below the seq {} this device processed:"
                    " acknowledged data lost".format(self, response.head_seq, self.lastSeq)
                )
                assert response.no_echo == self.noEcho, response
                self.authed = True
                for clientMsgId in list(self.pending):
                    self._transmit(clientMsgId)
            elif method == "send":
                if frame.HasField("error"):
                    # Only retryable answers are possible here.
                    assert frame.error.code == pb.UNAVAILABLE, frame.error
                    return
                response = pb.SendResponse.FromString(frame.body)
                machine.sendAcked(self, clientMsgId, response)
                request = self.pending.pop(clientMsgId, None)
                if response.echo_skipped:
                    assert self.noEcho, "{}: echo_skipped without no_echo".format(self)
                    assert not response.duplicate and request is not None, response
                    # The answer is the entry, in its place in the stream.
                    self._process(
                        pb.InboxEntry(
                            seq=response.seq,
                            outgoing=True,
                            message=pb.Message(
                                id=response.message_id,
                                sender=self.uid,
                                recipient=request.to,
                                client_msg_id=clientMsgId,
                                body=request.body,
                                created_ms=response.server_time_ms,
                            ),
                        )
                    )
        elif frame.kind == pb.NOTIFY and frame.method == "message":
            entry = pb.InboxEntry.FromString(frame.body)
            if entry.seq <= self.lastSeq:
                machine.repeats += 1
                return
            self._process(entry)
        elif frame.kind == pb.ERROR and frame.error.code in (pb.AUTH_TIMEOUT, pb.IDLE_TIMEOUT):
            # Time passed (tick) with the auth or the connection idle; the
            # gate closes the connection and the device reconnects later.
            pass
        else:
            raise AssertionError("{}: unexpected frame {}".format(self, frame))

    def _process(self, entry):
        assert entry.seq == self.lastSeq + 1, "{}: got seq {} after {}: a gap".format(
            self, entry.seq, self.lastSeq
        )
        self.stream.append(entry)
        self.lastSeq = entry.seq


class DeliveryMachine(RuleBasedStateMachine):
    """
    Send, read, ack, drop, vanish, reconnect, run the store, restart the
    gate; no acknowledged loss, per-recipient order, no visible duplicate.
    """

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="imserver-properties-")
        self.path = os.path.join(self.directory, "messages.sqlite3")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.settings = Settings(**SETTINGS)
        self.devices = [Device(self, uid, device, noEcho) for uid, device, noEcho in DEVICES]
        #: (sender, client_msg_id) -> the first SendResponse.
        self.acked = {}
        #: (sender, client_msg_id) -> (to, body, the highest message id
        #: acknowledged to the sender when it was sent).
        self.sent = {}
        self.repeats = 0
        self.restarts = 0
        self.counter = 0
        self.serverSide = []
        self.failures = []
        globalLogPublisher.addObserver(self._observe)
        self.store = None
        self._startGate()

    def _observe(self, event):
        if event.get("log_failure") is not None:
            self.failures.append(event["log_failure"])

    def _startGate(self):
        self.store = SQLiteMessageStore(
            self.path, None, int(self.settings.dedup_window * 1000), threaded=False
        )
        self.store.startService()
        self.stepped = SteppedStore(self.store)
        self.factory = GateFactory(
            settings=self.settings,
            authenticator=TokenAuthenticator(SECRET, self.clock),
            registry=MemorySessionRegistry(maxDevices=self.settings.max_devices),
            store=self.stepped,
            clock=self.clock,
            gateId="property",
            rng=random.Random(0),
        )
        self.serverSide = []

    def lose(self, protocol):
        """
        The gate's side of a connection is closed (by the reactor, in a real
        gate, once its transport is done).
        """
        if protocol in self.factory.connections or protocol in self.factory.closing:
            protocol.connectionLost(Failure(ConnectionDone()))

    def _reap(self):
        # Connections the gate closed but nobody reads (vanished clients)
        # are closed by the reactor in a real gate.
        for protocol in list(self.serverSide):
            if protocol in self.factory.closing:
                if not any(d.protocol is protocol for d in self.devices):
                    self.lose(protocol)

    def sendAcked(self, device, clientMsgId, response):
        key = (device.uid, clientMsgId)
        first = self.acked.get(key)
        if first is None:
            self.acked[key] = response
        else:
            assert (response.message_id, response.seq) == (first.message_id, first.seq), (
                "{} acknowledged twice differently: {} and {}".format(key, first, response)
            )

    # -- rules ----------------------------------------------------------------

    @initialize()
    def everyoneOnline(self):
        """
        Start with every device connected and authenticated.
        """
        for device in self.devices:
            device.connect(self.factory)
        self.flow()

    @rule(
        index=st.integers(0, len(DEVICES) - 1),
        to=st.sampled_from(USERS),
        size=st.integers(0, 20),
        wait=st.booleans(),
    )
    def send(self, index, to, size, wait):
        """
        Send a message (at once if authenticated, else after the next
        auth); with C{wait}, let the store answer and read the response.
        """
        device = self.devices[index]
        self.counter += 1
        clientMsgId = "m{}".format(self.counter)
        body = b"%d:" % self.counter + b"x" * size
        floor = max(
            (r.message_id for (s, _), r in self.acked.items() if s == device.uid), default=0
        )
        self.sent[(device.uid, clientMsgId)] = (to, body, floor)
        device.send(clientMsgId, pb.SendRequest(to=to, client_msg_id=clientMsgId, body=body))
        if wait:
            self.stepped.run()
            device.read()
        self._reap()

    @rule(index=st.integers(0, len(DEVICES) - 1), wait=st.booleans())
    def connect(self, index, wait):
        """
        Connect and authenticate with the last seq processed; with C{wait},
        let the store answer and read the auth response (and what follows).
        """
        device = self.devices[index]
        if not device.connected:
            device.connect(self.factory)
            if wait:
                self.stepped.run()
                device.read()
        self._reap()

    @rule()
    def flow(self):
        """
        Everything in progress completes: the store answers, and every
        connected device reads and acks.
        """
        self.stepped.run()
        for device in self.devices:
            device.read()
            device.ack()
        self.stepped.run()
        self._reap()

    @rule(index=st.integers(0, len(DEVICES) - 1), ack=st.booleans())
    def read(self, index, ack):
        device = self.devices[index]
        device.read()
        if ack:
            device.ack()
        self._reap()

    @rule(count=st.integers(1, 8))
    def runStore(self, count):
        self.stepped.run(count)
        self._reap()

    @rule(index=st.integers(0, len(DEVICES) - 1))
    def drop(self, index):
        """
        The connection breaks; the gate notices.
        """
        device = self.devices[index]
        if device.connected:
            protocol = device.protocol
            device.forget()
            self.lose(protocol)
        self._reap()

    @rule(index=st.integers(0, len(DEVICES) - 1))
    def vanish(self, index):
        """
        The client goes away (a phone losing its network); the gate keeps
        the connection until the same device signs in again.
        """
        device = self.devices[index]
        device.forget()
        self._reap()

    @rule(committed=st.booleans())
    def restart(self, committed):
        """
        The gate process dies (its pending store operations were committed
        or not) and starts again on the same database.
        """
        self.restarts += 1
        self.stepped.crash(committed)
        for device in self.devices:
            device.forget()
        self.store.stopService()
        self._startGate()

    @rule()
    def tick(self):
        """
        A second passes: cursors are flushed, the idle sweep runs.
        """
        self.clock.advance(1)
        self.factory.flushCursors()
        self.factory.sweep()
        self._reap()

    # -- invariants -----------------------------------------------------------

    def _inbox(self, uid):
        return self.store.fetch(uid, 0, 1_000_000).result

    @invariant()
    def nothingLogged(self):
        assert not self.failures, "the gate logged a failure: {}".format(
            self.failures[0].getTraceback()
        )

    @invariant()
    def streamsInOrder(self):
        for device in self.devices:
            seqs = [entry.seq for entry in device.stream]
            assert seqs == list(range(1, len(seqs) + 1)), "{}: {}".format(device, seqs)
            ids = [entry.message.id for entry in device.stream]
            assert ids == sorted(set(ids)), "{}: message ids {} repeat or go back".format(
                device, ids
            )

    @invariant()
    def storedAsSeen(self):
        """
        Every entry a device processed is the one the store holds at that
        seq (a restart never hands a seq to another message), and every
        acknowledged send is in the store, in every recipient's inbox and at
        the acknowledged seq in the sender's, exactly once.
        """
        inboxes = {uid: {e.seq: e for e in self._inbox(uid)} for uid in USERS}
        for device in self.devices:
            inbox = inboxes[device.uid]
            for entry in device.stream:
                stored = inbox.get(entry.seq)
                assert stored is not None and stored.message.id == entry.message.id, (
                    "{}: seq {} was message {}, the store now says {}".format(
                        device, entry.seq, entry.message.id, stored
                    )
                )
        stored = collections.defaultdict(set)
        for _uid, inbox in inboxes.items():
            for entry in inbox.values():
                message = entry.message
                stored[(message.sender, message.client_msg_id)].add(message.id)
        for key, ids in stored.items():
            assert len(ids) == 1, "{} stored as several messages: {}".format(key, ids)
        for (sender, clientMsgId), response in self.acked.items():
            to = self.sent[(sender, clientMsgId)][0]
            own = inboxes[sender].get(response.seq)
            assert own is not None and own.message.id == response.message_id, (
                "acknowledged {} is not at seq {} of {}".format(clientMsgId, response.seq, sender)
            )
            assert any(e.message.id == response.message_id for e in inboxes[to].values()), (
                "acknowledged {} is not in the inbox of {}".format(clientMsgId, to)
            )

    # -- the end ----------------------------------------------------------------

    def settle(self):
        """
        Let everything finish: run the store, reconnect every device, read
        and ack, until nothing moves.
        """
        for _ in range(SETTLE_ROUNDS):
            moved = self.stepped.run() > 0
            for device in self.devices:
                if not device.connected:
                    device.connect(self.factory)
                    moved = True
                if device.read():
                    moved = True
                device.ack()
            self._reap()
            if not moved and not self.stepped.queue:
                return
        raise AssertionError("delivery did not settle in {} rounds".format(SETTLE_ROUNDS))

    def checkFinal(self):
        """
        After settling: every send was acknowledged (retries with the same
        C{client_msg_id} got through); every device has its whole inbox, in
        order; every acknowledged message reached its recipient's devices
        and its sender's, where it sits at the acknowledged seq; every entry
        is a message that was sent, as sent; a message accepted after
        another was acknowledged to its sender has a higher id.
        """
        for device in self.devices:
            assert not device.pending, "{}: sends never acknowledged: {}".format(
                device, list(device.pending)
            )
            inbox = self._inbox(device.uid)
            assert [e.message.id for e in device.stream] == [e.message.id for e in inbox], (
                "{} has {} of the inbox {}".format(
                    device, [e.seq for e in device.stream], [e.seq for e in inbox]
                )
            )
        assert set(self.acked) == set(self.sent), "sends not acknowledged: {}".format(
            set(self.sent) - set(self.acked)
        )
        for device in self.devices:
            seen = {entry.message.id: entry for entry in device.stream}
            for (sender, clientMsgId), response in self.acked.items():
                to, body, floor = self.sent[(sender, clientMsgId)]
                assert response.message_id > floor, (
                    "{} accepted after message {} was acknowledged, but has id {}".format(
                        clientMsgId, floor, response.message_id
                    )
                )
                if device.uid == sender:
                    entry = seen.get(response.message_id)
                    assert entry is not None and entry.seq == response.seq and entry.outgoing, (
                        "{} lacks its own {} at seq {}".format(device, clientMsgId, response.seq)
                    )
                elif device.uid == to:
                    assert response.message_id in seen, "{} lacks {} from {}".format(
                        device, clientMsgId, sender
                    )
            for entry in device.stream:
                message = entry.message
                to, body, floor = self.sent[(message.sender, message.client_msg_id)]
                assert (message.recipient, message.body) == (to, body), (
                    "{}: {} is not as sent".format(device, message)
                )
                assert device.uid in (message.sender, to)

    def teardown(self):
        try:
            if not self.failures:
                self.settle()
                self.checkFinal()
                self.nothingLogged()
        finally:
            globalLogPublisher.removeObserver(self._observe)
            self.store.stopService()
            shutil.rmtree(self.directory, ignore_errors=True)


class DeliveryPropertyTests(SynchronousTestCase):
    """
    The delivery state machine, with the counts of the environment.
    """

    def test_delivery(self):
        """
        No acknowledged message is lost, each inbox is seen in order with
        no gap, and no message is seen twice, whatever the order of sends,
        reads, acks, dropped and vanished connections, store progress and
        gate restarts.
        """
        run_state_machine_as_test(
            DeliveryMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                print_blob=True,
                suppress_health_check=list(HealthCheck),
            ),
        )
