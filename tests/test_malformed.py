# -*- test-case-name: tests.test_malformed -*-
"""
The malformed-input suite: every case of C{tests/data/malformed/*.json}
against one real gate, in this process, on loopback.

The gate is the service tree of C{twistd im} (L{imserver.tap.makeService})
with a C{tcp:} and an C{ssl:} listener, a C{--web} listener and C{--api
none}.  Each case opens its own connection (raw bytes over TCP, over
verified TLS, or over a WebSocket after an upgrade, hand-built frames and
all), optionally authenticates, sends its bytes, and must see the outcome
its data file names within one second: an ERROR frame with a code and a
clean close (over WebSocket, the close frame of the code section 17.5
gives), an error RESPONSE for a seq, a clean close with no frame, an HTTP
refusal of the upgrade, or the connection kept open and still answering a
C{ping}.  Meanwhile two canary pairs of real clients send messages to each
other without a pause: one over TLS (L{imserver.client}), one over
WebSocket (an C{imserver.v1.json} client sending to an
C{imserver.v1.proto} one, L{tests.support.websocket}); after every batch of
cases each canary must complete a round trip within a second, and at the
end every canary message must have arrived once and in order.
docs/security.md describes the suite.

The data format is described in L{tests.support.malformed}, which loads
the cases and builds their bytes.
"""

import builtins
import json
import os
import struct
import time
from dataclasses import dataclass, field
from functools import partial

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from twisted.internet import reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import tap
from imserver.auth import loadSecret, mintToken
from imserver.client import connect
from imserver.datadir import CERT_FILE_NAME
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb

from tests.support import serverEnvironment, startServer, withoutSecretEnvironment
from tests.support.live import waitFor
from tests.support.malformed import (
    WEB_LISTENERS,
    BuildContext,
    Case,
    encodeFrameSpec,
    encodeWire,
    loadCases,
    streamCases,
)
from tests.support.websocket import (
    JSON,
    OPCODES,
    PROTO,
    acceptValue,
    clientFrame,
    connectWS,
    parseResponseHead,
    readServerFrame,
    upgradeRequest,
)

#: Seconds a case has for its outcome once its bytes are written.
OUTCOME_DEADLINE = 1.0
#: Seconds for setting a case up (connect, TLS, auth) and tearing it down.
SETUP_DEADLINE = 5.0
#: Cases run at the same time.
BATCH = 8
#: The seq of the ping the runner sends to check a connection still answers.
PROBE_SEQ = 0x7FFF0001
#: Seconds between two canary messages.
CANARY_INTERVAL = 0.02

_PUSHES = frozenset(["message", "typing", "notice"])
#: The subprotocol the runner's upgrade offers, by listener.
_SUBPROTOCOLS = {"ws": PROTO, "ws-json": JSON}
# -- the runner ----------------------------------------------------------------


class CaseFailed(AssertionError):
    """
    A case did not get the outcome its data names.
    """


class RawClient(Protocol):
    """
    Sends a case's bytes and records what comes back: the bytes, the frames
    they hold, and how the connection ended.

    @ivar frames: the frames received so far.
    @ivar problems: what arrived that is not frames (reading stops at the
        first).
    @ivar reason: the reason the connection was lost, or L{None}.
    """

    def __init__(self):
        self.data = b""
        self.frames = []
        self.problems = []
        self.reason = None
        self.closedAt = None
        self._offset = 0
        self._watchers = []

    def dataReceived(self, data):
        self.data += data
        while not self.problems and len(self.data) - self._offset >= 4:
            (length,) = struct.unpack_from("!I", self.data, self._offset)
            if length > 1 << 20:
                self._problem("a length prefix of {}".format(length))
                break
            end = self._offset + 4 + length
            if len(self.data) < end:
                break
            self._frameReceived(self.data[self._offset + 4 : end])
            self._offset = end
        self._changed()

    def _problem(self, what):
        self.problems.append(what)

    def _frameReceived(self, data):
        frame = pb.Frame()
        try:
            frame.ParseFromString(data)
        except DecodeError:
            self._problem("a frame that does not parse: {!r}".format(data[:40]))
        else:
            self.frames.append(frame)

    def sendRequest(self, seq, method, body):
        """
        Send a request (a frame the runner builds itself).

        @param body: the request message.
        """
        frame = pb.Frame(kind=pb.REQUEST, seq=seq, method=method, body=body.SerializeToString())
        self.transport.write(encodeFrame(frame))

    def received(self):
        """
        Descriptions of what was received, for the report.
        """
        return [describe(f) for f in self.frames] + self.problems

    def connectionLost(self, reason):
        self.reason = reason
        self.closedAt = reactor.seconds()
        self._changed()

    def _changed(self):
        for check, d in list(self._watchers):
            if not d.called and check():
                self._watchers.remove((check, d))
                d.callback(None)

    def until(self, check, seconds, what):
        """
        @return: a L{Deferred} firing once C{check()} is true, or failing
            with L{CaseFailed} after C{seconds}.
        """
        if check():
            return succeed(None)
        d = Deferred()
        entry = (check, d)
        self._watchers.append(entry)

        def expired():
            if entry in self._watchers:
                self._watchers.remove(entry)
                d.errback(CaseFailed("no {} within {} s".format(what, seconds)))

        timer = reactor.callLater(seconds, expired)
        return d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])

    def relevant(self):
        """
        The frames received, server pushes left out.
        """
        return [f for f in self.frames if not (f.kind == pb.NOTIFY and f.method in _PUSHES)]


class WebSocketRawClient(RawClient):
    """
    A L{RawClient} of the web listener: reads the answer to an upgrade
    request, then the gate's WebSocket frames (docs/protocol.md section
    17): the frames of its messages, decoded as the subprotocol the gate
    chose, and its close code.  It answers the gate's close frame (the
    closing handshake) unless told not to, and its pings.

    @ivar status: the HTTP status of the answer to the upgrade, or L{None}.
    @ivar subprotocol: the subprotocol the gate chose.
    @ivar closeCode: the code of the gate's close frame (L{None} before it;
        C{0} for one without a code).
    @ivar problems: what the gate sent that RFC 6455 or section 17 forbids.
    """

    status = None
    subprotocol = None
    closeCode = None

    def __init__(self, replyToClose=True):
        RawClient.__init__(self)
        self._replyToClose = replyToClose
        self._fragments = None

    def upgrade(self, request, seconds):
        """
        Write an upgrade request.

        @return: a L{Deferred} firing once it is answered (or the
            connection is lost), or failing after C{seconds}.
        """
        self.transport.write(request)
        return self.until(
            lambda: self.status is not None or self.reason is not None or self.problems,
            seconds,
            "answer to the upgrade",
        )

    def dataReceived(self, data):
        self.data += data
        if self.status is None and not self.problems:
            try:
                head = parseResponseHead(self.data)
            except ValueError as e:
                self._problem(str(e))
                head = None
            if head is not None:
                self.status, headers, self._offset = head
                if self.status == 101:
                    protocol = headers.get(b"sec-websocket-protocol", b"")
                    self.subprotocol = protocol.decode("latin-1")
                    if headers.get(b"sec-websocket-accept") != acceptValue():
                        self._problem("a 101 without the right Sec-WebSocket-Accept")
        while self.status == 101 and not self.problems:
            read = readServerFrame(self.data, self._offset)
            if read is None:
                break
            frame, self._offset = read
            self._wsFrameReceived(frame)
        self._changed()

    def _wsFrameReceived(self, frame):
        if self.closeCode is not None:
            self._problem("a frame after the close frame")
        elif frame.masked or frame.rsv:
            self._problem("a masked frame, or reserved bits")
        elif frame.opcode == OPCODES["close"]:
            self.closeCode = int.from_bytes(frame.payload[:2], "big")
            if self._replyToClose:
                self.transport.write(clientFrame(OPCODES["close"], frame.payload[:2]))
        elif frame.opcode == OPCODES["ping"]:
            self.transport.write(clientFrame(OPCODES["pong"], frame.payload))
        elif frame.opcode == OPCODES["pong"]:
            pass
        elif (frame.opcode == OPCODES["continuation"]) != (self._fragments is not None):
            self._problem("opcode {} out of place".format(frame.opcode))
        elif not frame.fin:
            self._fragments = (self._fragments or [frame.opcode]) + [frame.payload]
        elif self._fragments is not None:
            opcode, *payloads = self._fragments + [frame.payload]
            self._fragments = None
            self._messageReceived(opcode, b"".join(payloads))
        else:
            self._messageReceived(frame.opcode, frame.payload)

    def _messageReceived(self, opcode, payload):
        if self.subprotocol == JSON and opcode == OPCODES["text"]:
            try:
                value = json.loads(payload.decode("utf-8"))
                body = value.pop("body", None)
                frame = json_format.ParseDict(value, pb.Frame())
            except (ValueError, AttributeError, json_format.ParseError) as e:
                self._problem("not a frame in the JSON form: {}".format(e))
                return
            if body is None and frame.kind == pb.RESPONSE and not frame.HasField("error"):
                self._problem("a RESPONSE without body or error: {!r}".format(payload[:80]))
            self.frames.append(frame)
        elif self.subprotocol == PROTO and opcode == OPCODES["binary"] and payload:
            self._frameReceived(payload)
        else:
            self._problem("opcode {} on {}: {!r}".format(opcode, self.subprotocol, payload[:40]))

    def sendRequest(self, seq, method, body):
        if self.subprotocol == JSON:
            frame = {"kind": "REQUEST", "seq": seq, "method": method}
            frame["body"] = json_format.MessageToDict(body)
            self.transport.write(clientFrame(OPCODES["text"], json.dumps(frame).encode("utf-8")))
        else:
            frame = pb.Frame(kind=pb.REQUEST, seq=seq, method=method, body=body.SerializeToString())
            self.transport.write(clientFrame(OPCODES["binary"], frame.SerializeToString()))

    def received(self):
        refused = ["HTTP {}".format(self.status)] if self.status not in (None, 101) else []
        close = ["close {}".format(self.closeCode)] if self.closeCode is not None else []
        return refused + [describe(f) for f in self.frames] + close + self.problems


def matchFrames(specs, frames):
    """
    Match C{frames} against C{specs} in order.

    @return: C{(complete, error)}: whether every spec is satisfied by a
        prefix of C{frames} (C{complete} is then the number of frames
        used), and a description of the first mismatch, or L{None}.
    """
    position = 0
    for _index, spec in enumerate(specs):
        low, high = spec.count
        matched = 0
        while matched < high and position < len(frames) and spec.matches(frames[position]):
            matched += 1
            position += 1
        if matched < low:
            if position < len(frames):
                return None, "expected {}, got {}".format(spec, describe(frames[position]))
            return None, None
    return position, None


def describe(frame):
    """
    A short description of a received frame, for failure messages.
    """
    text = "{} seq {}".format(
        pb.Kind.Name(frame.kind) if frame.kind in pb.Kind.values() else frame.kind, frame.seq
    )
    if frame.method:
        text += " " + frame.method
    if frame.HasField("error"):
        code = frame.error.code
        text += " " + (pb.ErrorCode.Name(code) if code in pb.ErrorCode.values() else str(code))
        text += " {!r}".format(frame.error.message[:80])
    return text


class Canary:
    """
    Two real clients, C{canary-NAME-a} sending to C{canary-NAME-b} without
    pause, both acking everything they are pushed.

    @ivar name: which pair this is, in the uids and the failures.
    @ivar roundTrips: messages sent, acknowledged and received.
    @ivar received: the C{client_msg_id}s received, in order.
    @ivar errors: what went wrong, if anything.
    """

    def __init__(self, name, connectSender, connectReceiver):
        """
        @param connectSender: called as C{connect(uid, onNotify)}, returns
            a L{Deferred} firing with an authenticated client (C{send},
            C{ack} and C{close} as in L{imserver.client.ClientProtocol});
            C{connectReceiver} too.
        """
        self.name = name
        self._connectSender = connectSender
        self._connectReceiver = connectReceiver
        self.roundTrips = 0
        self.errors = []
        self.received = []
        self.latencies = []
        self._running = False
        self._arrivals = {}
        self._waiters = []
        self._stopped = None

    @inlineCallbacks
    def start(self):
        self._to = "canary-{}-b".format(self.name)
        self.receiver = yield self._connectReceiver(self._to, self._onReceiverNotify)
        self.sender = yield self._connectSender(
            "canary-{}-a".format(self.name), self._onSenderNotify
        )
        self._running = True
        self._stopped = self._loop()

    def _onReceiverNotify(self, name, message):
        if name == "message":
            self.receiver.ack(message.seq)
            self.received.append(message.message.client_msg_id)
            d = self._arrivals.pop(message.message.client_msg_id, None)
            if d is not None:
                d.callback(None)

    def _onSenderNotify(self, name, message):
        if name == "message":
            self.sender.ack(message.seq)

    @inlineCallbacks
    def _loop(self):
        counter = 0
        while self._running:
            counter += 1
            clientMsgId = "canary-{}".format(counter)
            arrived = self._arrivals[clientMsgId] = Deferred()
            started = reactor.seconds()
            try:
                yield self.sender.send(self._to, b"%d" % counter, clientMsgId, timeout=2)
                yield withDeadline(arrived, 2, "canary message")
            except Exception as e:
                self.errors.append(
                    "canary {} stopped after {} round trips: {!r}".format(
                        self.name, self.roundTrips, e
                    )
                )
                self._running = False
                break
            self.latencies.append(reactor.seconds() - started)
            self.roundTrips += 1
            waiters, self._waiters = self._waiters, []
            for since, d in waiters:
                if started >= since:
                    d.callback(None)
                else:
                    self._waiters.append((since, d))
            yield deferLater(reactor, CANARY_INTERVAL, lambda: None)
        waiters, self._waiters = self._waiters, []
        for _since, d in waiters:
            d.errback(CaseFailed(self.errors[-1] if self.errors else "canary stopped"))

    def summary(self):
        """
        The round trips and their latency, for the report.
        """
        latencies = sorted(self.latencies) or [0.0]
        return {
            "roundTrips": self.roundTrips,
            "medianLatency": round(latencies[len(latencies) // 2], 4),
            "maxLatency": round(latencies[-1], 4),
        }

    def nextRoundTrip(self, seconds):
        """
        @return: a L{Deferred} firing once a round trip that started after
            this call has completed, or failing after C{seconds}.
        """
        if not self._running:
            return fail(CaseFailed(self.errors[-1] if self.errors else "canary stopped"))
        d = Deferred()
        self._waiters.append((reactor.seconds(), d))
        return withDeadline(d, seconds, "canary round trip")

    @inlineCallbacks
    def stop(self):
        self._running = False
        if self._stopped is not None:
            yield self._stopped
        yield self.sender.close()
        yield self.receiver.close()


class WebSocketCanaryClient:
    """
    A canary client over WebSocket: a L{WSClient} of either subprotocol,
    with what L{Canary} uses of L{imserver.client.ClientProtocol}.
    """

    def __init__(self, client, onNotify):
        """
        @param onNotify: called as C{onNotify(name, message)} for each
            C{message} push.
        """
        self.client = client
        self._onNotify = onNotify
        client.onNotify = self._notified

    def _body(self, message):
        # A body as the subprotocol carries it (section 17.3, 17.4).
        return json_format.MessageToDict(message) if self.client.json else message

    def _read(self, item, message):
        if self.client.json:
            return json_format.ParseDict(item.get("body", {}), message)
        message.ParseFromString(item.body)
        return message

    def _notified(self, item):
        if self.client.methodOf(item) == "message":
            self._onNotify("message", self._read(item, pb.InboxEntry()))

    @inlineCallbacks
    def call(self, method, request, response, timeout):
        """
        Send a request and read its response into C{response}.
        """
        item = yield self.client.call(method, self._body(request), timeout)
        if self.client.json:
            error = item.get("error")
        else:
            error = item.error if item.HasField("error") else None
        if error:
            raise CaseFailed("{} refused: {}".format(method, error))
        return self._read(item, response)

    def send(self, to, body, clientMsgId, timeout):
        request = pb.SendRequest(to=to, body=body, client_msg_id=clientMsgId)
        return self.call("send", request, pb.SendResponse(), timeout)

    def ack(self, seq):
        self.client.notify("ack", self._body(pb.Ack(seq=seq)))

    def close(self):
        if self.client.state != self.client.STATE_CLOSED:
            self.client.sendClose(1000)
        return self.client.closed


@inlineCallbacks
def withDeadline(d, seconds, what):
    """
    Wait for C{d}, failing with L{CaseFailed} after C{seconds}.
    """
    try:
        result = yield d.addTimeout(seconds, reactor)
    except (TimeoutError, CancelledError):
        raise CaseFailed("no {} within {} s".format(what, seconds))
    return result


class ServerWatch:
    """
    The gate's side of each case's connection, found by its two ports,
    and a way to wait until the gate holds no connection.
    """

    def __init__(self, testCase, factory):
        self.factory = factory
        self.byPort = {}
        self._emptyWaiters = []
        self._closeWaiters = {}
        opened, closed = factory.connectionOpened, factory.connectionClosed

        def connectionOpened(protocol):
            opened(protocol)
            # The client's port alone is not unique: connections to the two
            # listeners may share a local port.
            key = (
                getattr(protocol.acceptedFrom, "port", None),
                protocol.channel.transport.getHost().port,
            )
            self.byPort[key] = protocol

        def connectionClosed(protocol):
            closed(protocol)
            d = self._closeWaiters.pop(protocol, None)
            if d is not None:
                d.callback(None)
            if not factory.connections and not factory.closing:
                waiters, self._emptyWaiters = self._emptyWaiters, []
                for d in waiters:
                    d.callback(None)

        testCase.patch(factory, "connectionOpened", connectionOpened)
        testCase.patch(factory, "connectionClosed", connectionClosed)

    def isOpen(self, port):
        """
        Whether the gate holds the connection from C{port}: the client's
        port and the gate's.
        """
        protocol = self.byPort.get(port)
        return protocol is not None and self._held(protocol)

    def _held(self, protocol):
        # Open, or closed by the gate with its socket not closed yet.
        return protocol in self.factory.connections or protocol in self.factory.closing

    def whenClosed(self, port):
        """
        @return: a L{Deferred} firing once the gate no longer holds the
            connection from C{port}.
        """
        protocol = self.byPort.get(port)
        if protocol is None or not self._held(protocol):
            return succeed(None)
        d = self._closeWaiters.get(protocol)
        if d is None:
            d = self._closeWaiters[protocol] = Deferred()
        result = Deferred()
        d.addBoth(lambda r: (result.callback(None), r)[1])
        return result

    def whenEmpty(self):
        """
        @return: a L{Deferred} firing once the gate holds no connection.
        """
        if not self.factory.connections and not self.factory.closing:
            return succeed(None)
        d = Deferred()
        self._emptyWaiters.append(d)
        return d


@dataclass
class Outcome:
    """
    What happened in one case.

    @ivar error: why it failed, or L{None}.
    @ivar seconds: from its last byte written to its outcome.
    @ivar frames: descriptions of what was received (L{RawClient.received}).
    """

    case: Case
    error: str = None
    seconds: float = 0.0
    frames: list = field(default_factory=list)


class MalformedInputTests(TestCase):
    """
    Every case of the data files against one live gate, with a canary
    session carrying on throughout.
    """

    timeout = 180

    @inlineCallbacks
    def setUp(self):
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.dataDir.path,
                "--api",
                "none",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--listen",
                "ssl:0:interface=127.0.0.1",
                "--web",
                "tcp:0:interface=127.0.0.1",
                # The gate closes a WebSocket whose client does not answer
                # its close frame after this (docs/protocol.md section
                # 17.5): within a case's deadline.  Not shorter: every close
                # is bounded by it, and a reactor stalled longer than it
                # under load (8 cases at once, a busy CI machine) would turn
                # a clean TCP close into an abort.
                "--close-timeout",
                "0.5",
                # Every case comes from 127.0.0.1; the failed-auth throttle per
                # address (tests/test_limits.py) would refuse the later ones.
                "--auth-failure-burst",
                "1000000",
            ]
        )
        self.root = startServer(self, options)
        self.gate = self.root.getServiceNamed("gate")
        self.factory = self.gate.factory
        tcpAddress, sslAddress = yield self.gate.addresses()
        web = yield self.gate.web.whenListening()
        self.ports = {"tcp": tcpAddress.port, "ssl": sslAddress.port, "web": web.getHost().port}
        self.site = self.gate.web.factory
        self.caFile = self.dataDir.child(CERT_FILE_NAME).path
        self.trustRoot = Certificate.loadPEM(FilePath(self.caFile).getContent())
        self.secret = loadSecret(self.dataDir, environ=serverEnvironment())
        self.watch = ServerWatch(self, self.factory)

    def connectCanary(self, uid, onNotify):
        """
        Connect and authenticate a canary client over verified TLS.
        """
        token = mintToken(self.secret, uid, 3600, time.time())
        return connect(
            reactor,
            "localhost",
            self.ports["ssl"],
            uid=uid,
            token=token,
            deviceId="canary",
            caFile=self.caFile,
            onNotify=onNotify,
        )

    @inlineCallbacks
    def connectWebSocketCanary(self, subprotocol, uid, onNotify):
        """
        Connect and authenticate a canary client over WebSocket, offering
        C{subprotocol}.
        """
        client = yield connectWS(self.ports["web"], [subprotocol], timeout=SETUP_DEADLINE)
        canary = WebSocketCanaryClient(client, onNotify)
        auth = pb.AuthRequest(
            uid=uid,
            token=mintToken(self.secret, uid, 3600, time.time()),
            device_id="canary",
            platform=pb.WEB,
        )
        yield canary.call("auth", auth, pb.AuthResponse(), SETUP_DEADLINE)
        return canary

    def endpoint(self, listener):
        """
        A client endpoint to one of the gate's listeners (TLS verified
        against the gate's certificate for C{ssl}).
        """
        port = self.ports[
            "ssl" if listener == "ssl-raw" else "web" if listener in WEB_LISTENERS else listener
        ]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        if listener == "ssl":
            endpoint = wrapClientTLS(
                optionsForClientTLS("localhost", trustRoot=self.trustRoot), endpoint
            )
        return endpoint

    @inlineCallbacks
    def runCase(self, case):
        """
        Run one case on a connection of its own.

        @return: a L{Deferred} firing with its L{Outcome}.
        """
        outcome = Outcome(case)
        if case.listener in WEB_LISTENERS:
            client = WebSocketRawClient(replyToClose=case.client != "noCloseReply")
        else:
            client = RawClient()
        try:
            yield withDeadline(
                connectProtocol(self.endpoint(case.listener), client), SETUP_DEADLINE, "connection"
            )
            if case.listener in _SUBPROTOCOLS:
                yield self._upgrade(client, _SUBPROTOCOLS[case.listener])
            yield self._play(case, client, outcome)
        except CaseFailed as e:
            outcome.error = str(e)
        except Exception as e:
            outcome.error = "runner error: {!r}".format(e)
        outcome.frames = client.received()
        if client.transport is not None and client.reason is None:
            client.transport.loseConnection()
            try:
                yield client.until(
                    lambda: client.reason is not None, SETUP_DEADLINE, "close at cleanup"
                )
            except CaseFailed:
                client.transport.abortConnection()
        return outcome

    @inlineCallbacks
    def _upgrade(self, client, subprotocol):
        yield client.upgrade(upgradeRequest(protocols=[subprotocol]), SETUP_DEADLINE)
        self._checkUpgrade(client, 101, subprotocol)

    @inlineCallbacks
    def _play(self, case, client, outcome):
        uid = "case-{}".format(case.index)
        context = BuildContext(self.secret, time.time(), uid)
        port = (client.transport.getHost().port, client.transport.getPeer().port)
        if case.state == "authenticated":
            yield self._authenticate(client, context)
        expect = case.expect
        for step, value in case.steps(context):
            if step == "upgrade":
                yield client.upgrade(value, OUTCOME_DEADLINE)
                if client.status != 101:
                    break
            elif step == "pause":
                yield deferLater(reactor, value, lambda: None)
            elif step == "await":
                yield client.until(
                    lambda value=value: len(client.relevant()) >= value or client.reason,
                    OUTCOME_DEADLINE,
                    "{} frames before sending on".format(value),
                )
            elif client.reason is None:
                client.transport.write(value)
        if case.client == "halfClose":
            client.transport.loseWriteConnection()
        started = reactor.seconds()
        if case.listener == "web":
            self._checkUpgrade(client, expect.status or 101, expect.subprotocol)
            if expect.status is not None:
                if expect.then == "closed":
                    yield client.until(lambda: client.reason is not None, OUTCOME_DEADLINE, "close")
                outcome.seconds = reactor.seconds() - started
                return
        ranged = any(spec.count[0] != spec.count[1] for spec in expect.frames)
        if expect.then == "closed":
            yield client.until(lambda: client.reason is not None, OUTCOME_DEADLINE, "close")
            outcome.seconds = reactor.seconds() - started
            if expect.tls:
                # Only TLS records: an alert (21), or handshake records (22)
                # of a handshake the client then abandoned.
                if client.data and client.data[:1] not in (b"\x15", b"\x16"):
                    raise CaseFailed("received {!r}, not TLS".format(client.data[:40]))
                if expect.alert is not None and not (
                    len(client.data) == 7
                    and client.data[:1] == b"\x15"
                    and client.data[6] == expect.alert
                ):
                    raise CaseFailed(
                        "received {}, not alert {}".format(client.data.hex(), expect.alert)
                    )
                return
            self._matchAll(expect, client.relevant(), client)
            if case.listener in WEB_LISTENERS:
                # The closing handshake is the clean close: once it is
                # done the gate drops TCP (autobahn aborts it), or it aborts
                # a client that does not answer after close_timeout.
                if client.closeCode != expect.closeCode():
                    raise CaseFailed(
                        "close code {}, expected {}".format(client.closeCode, expect.closeCode())
                    )
            elif not client.reason.check(ConnectionDone):
                raise CaseFailed("not a clean close: {}".format(client.reason.value))
            # Over TLS the client has answered the gate's close_notify; the
            # gate closes its socket when that answer arrives.
            yield withDeadline(
                self.watch.whenClosed(port), OUTCOME_DEADLINE, "close of the gate's side"
            )
            return
        if ranged:
            # Only synchronous requests (ping) use counts: their answers
            # come in order, so the probe's answer comes after all of them.
            self._sendProbe(client)
        else:
            yield self._expectFrames(client, expect)
            self._sendProbe(client)

        def answered():
            return client.reason is not None or any(f.seq == PROBE_SEQ for f in client.relevant())

        yield client.until(
            answered,
            OUTCOME_DEADLINE,
            "answer to the probe ping (after {})".format([describe(f) for f in client.relevant()]),
        )
        outcome.seconds = reactor.seconds() - started
        frames = client.relevant()
        probe = frames[-1] if frames and frames[-1].seq == PROBE_SEQ else None
        if probe is None:
            raise CaseFailed("closed ({}), expected open".format(client.reason.value))
        self._matchAll(expect, frames[:-1], client)
        got = pb.ErrorCode.Name(probe.error.code) if probe.HasField("error") else "ok"
        if got not in (expect.probe, "RATE_LIMITED"):
            raise CaseFailed("the probe ping got {}, expected {}".format(got, expect.probe))
        if not self.watch.isOpen(port):
            raise CaseFailed("the gate no longer holds the connection")

    def _checkUpgrade(self, client, status, subprotocol):
        # The answer to an upgrade request: its status and, for a 101, the
        # subprotocol chosen (any if None).
        if client.status != status:
            got = "HTTP {}".format(client.status) if client.status else "no answer"
            raise CaseFailed(
                "the upgrade got {} ({}), expected HTTP {}".format(
                    got, client.received() or client.reason, status
                )
            )
        if subprotocol not in (None, client.subprotocol):
            raise CaseFailed(
                "the upgrade chose {}, expected {}".format(client.subprotocol, subprotocol)
            )

    @inlineCallbacks
    def _authenticate(self, client, context):
        auth = pb.AuthRequest(
            uid=context.uid, device_id="d", token=context.token("valid", context.uid)
        )
        client.sendRequest(1, "auth", auth)
        yield client.until(lambda: client.frames or client.reason, SETUP_DEADLINE, "auth response")
        if not client.frames or client.frames[0].HasField("error"):
            raise CaseFailed(
                "auth failed: {}".format(
                    describe(client.frames[0]) if client.frames else client.reason
                )
            )
        client.frames = []

    def _sendProbe(self, client):
        if client.reason is None:
            client.sendRequest(PROBE_SEQ, "ping", pb.PingRequest())

    def _matchAll(self, expect, frames, client):
        used, error = matchFrames(expect.frames, frames)
        if error is None and used is not None and used < len(frames):
            error = "unexpected {}".format([describe(f) for f in frames[used:]])
        elif error is None and used is None:
            error = "missing frames"
        if error is None and client.problems:
            error = "; ".join(client.problems)
        if error is not None:
            raise CaseFailed(
                "{}; expected {}; got {}".format(
                    error, expect, [describe(f) for f in frames] or "nothing"
                )
            )

    def _expectFrames(self, client, expect):
        def check():
            used, error = matchFrames(expect.frames, client.relevant())
            return (
                used is not None
                or error is not None
                or client.reason is not None
                or client.problems
            )

        return client.until(check, OUTCOME_DEADLINE, "expected frames ({})".format(expect))

    @inlineCallbacks
    def test_cases(self):
        """
        Every case gets its documented outcome within a second, the gate
        keeps serving (its listeners accept, the canary's messages flow
        throughout, and no connection is left behind), and nothing is
        logged as an error.
        """
        cases = loadCases()
        canaries = [
            Canary("tls", self.connectCanary, self.connectCanary),
            # Both subprotocols, each way of the gate's WebSocket transport.
            Canary(
                "ws",
                partial(self.connectWebSocketCanary, JSON),
                partial(self.connectWebSocketCanary, PROTO),
            ),
        ]
        for canary in canaries:
            yield canary.start()
        failures, outcomes, known = [], [], []
        started = time.monotonic()
        for first in range(0, len(cases), BATCH):
            batch = cases[first : first + BATCH]
            results = yield DeferredList([self.runCase(case) for case in batch], consumeErrors=True)
            for ok, outcome in results:
                if not ok:
                    failures.append("runner crashed: {}".format(outcome.getTraceback()))
                    continue
                outcomes.append(outcome)
                if outcome.error is None and outcome.seconds > OUTCOME_DEADLINE:
                    outcome.error = "took {:.2f} s".format(outcome.seconds)
                if outcome.case.knownBug is not None:
                    # Reported, not failed.  Whether a known bug of the
                    # TCP session still reproduces is checked
                    # deterministically by FuzzHarnessTests.test_regressions;
                    # here timing (the rate limiter's refill) may hide one.
                    known.append(outcome)
                    continue
                if outcome.error is not None:
                    failures.append(
                        "{} ({}): {}\n    expected {}; received {}".format(
                            outcome.case.title,
                            outcome.case.source,
                            outcome.error,
                            outcome.case.expect,
                            outcome.frames,
                        )
                    )
            results = yield DeferredList(
                [canary.nextRoundTrip(OUTCOME_DEADLINE) for canary in canaries],
                consumeErrors=True,
            )
            stopped = [f.value for ok, f in results if not ok]
            failures.extend("canary after batch {}: {}".format(first // BATCH, e) for e in stopped)
            if stopped:
                break
        elapsed = time.monotonic() - started
        self.writeReport(outcomes, canaries, elapsed)
        # What the known bugs log is expected; anything else logged as an
        # error still fails the test.
        for name in sorted(
            {name for outcome in known for name in outcome.case.knownBug.get("logs", [])}
        ):
            self.flushLoggedErrors(getattr(builtins, name))
        for canary in canaries:
            yield canary.stop()
            failures.extend(canary.errors)
            expected = ["canary-{}".format(i + 1) for i in range(len(canary.received))]
            if canary.received != expected:
                failures.append(
                    "canary {} messages out of order or repeated: {}".format(
                        canary.name, canary.received[:20]
                    )
                )
        try:
            yield withDeadline(self.watch.whenEmpty(), OUTCOME_DEADLINE, "empty gate")
        except CaseFailed:
            failures.append(
                "connections left on the gate: {}".format(
                    sorted(repr(p) for p in self.factory.connections)
                )
            )
        try:
            yield waitFor(lambda: not self.site.http, OUTCOME_DEADLINE)
        except AssertionError:
            failures.append("HTTP connections left on the web listener: {}".format(self.site.http))
        if failures:
            self.fail(
                "{} of {} cases failed:\n{}".format(len(failures), len(cases), "\n".join(failures))
            )
        for canary in canaries:
            self.assertGreater(canary.roundTrips, len(cases) // BATCH, canary.name)

    def writeReport(self, outcomes, canaries, elapsed):
        """
        Write a summary (cases per kind, timings, canaries) as JSON beside
        the test's data directory, or to C{$IMSERVER_MALFORMED_REPORT}.
        """
        kinds, knownBugs = {}, []
        for outcome in outcomes:
            entry = kinds.setdefault(outcome.case.kind, {"cases": 0, "failed": 0, "slowest": 0.0})
            entry["cases"] += 1
            entry["failed"] += outcome.error is not None
            entry["slowest"] = round(max(entry["slowest"], outcome.seconds), 4)
            if outcome.case.knownBug is not None:
                knownBugs.append(
                    {
                        "case": outcome.case.title,
                        "documented": str(outcome.case.expect),
                        "got": outcome.error or "as documented: fixed?",
                        "lastFrames": outcome.frames[-3:],
                        "bug": outcome.case.knownBug["description"],
                    }
                )
        report = {
            "cases": len(outcomes),
            "kinds": kinds,
            "seconds": round(elapsed, 2),
            "knownBugs": knownBugs,
            "slowest": sorted(
                ((round(o.seconds, 4), o.case.title) for o in outcomes), reverse=True
            )[:5],
            "canaries": {canary.name: canary.summary() for canary in canaries},
        }
        path = (
            os.environ.get("IMSERVER_MALFORMED_REPORT")
            or self.dataDir.sibling("malformed-report.json").path
        )
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


class DataTests(SynchronousTestCase):
    """
    The data files themselves.
    """

    def test_size(self):
        """
        At least 200 cases of at least 15 kinds, with distinct titles.
        """
        cases = loadCases()
        self.assertGreaterEqual(len(cases), 200)
        self.assertGreaterEqual(len({case.kind for case in cases}), 15)
        titles = [case.title for case in cases]
        self.assertEqual(
            len(titles), len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)
        )

    def test_buildable(self):
        """
        Every case's bytes can be built.
        """
        context = BuildContext(b"s" * 32, 1_700_000_000, "u")
        for case in loadCases():
            steps = case.steps(context)
            self.assertTrue(any(step in ("data", "upgrade") for step, _ in steps), case.title)

    def test_paddedFrame(self):
        """
        C{padTo} makes a frame of exactly that many bytes that still parses
        as the same frame.
        """
        context = BuildContext(b"s" * 32, 0, "u")
        for size in (20, 127, 128, 129, 4096, 16384, 65536):
            data = encodeFrameSpec(
                {"kind": "REQUEST", "seq": 3, "method": "ping", "padTo": size}, context
            )
            self.assertEqual(len(data), size)
            frame = pb.Frame.FromString(data)
            self.assertEqual((frame.kind, frame.seq, frame.method), (pb.REQUEST, 3, "ping"))

    def test_wire(self):
        """
        The raw wire encoder writes what protobuf writes.
        """
        context = BuildContext(b"s" * 32, 0, "u")
        self.assertEqual(
            encodeWire([[1, "varint", 1], [2, "varint", 300], [3, "bytes", "ping"]], context),
            pb.Frame(kind=pb.REQUEST, seq=300, method="ping").SerializeToString(),
        )


class FuzzHarnessTests(SynchronousTestCase):
    """
    The fuzzing harness (fuzz/harness.py) on the suite's inputs and on the
    inputs that once crashed the fuzz target (fuzz/regressions/).
    """

    def test_malformedCases(self):
        """
        Every case's bytes (of the gate's own listeners), in its state,
        with both stores, in one read and in reads of 7 bytes, keeps every
        property the fuzz target checks.
        """
        from fuzz.harness import NOW, SECRET, UID, GateFault, makeInput, runInput

        context = BuildContext(SECRET, NOW, UID)
        faults = []
        for case in streamCases():
            payload = b"".join(v for step, v in case.steps(context) if step == "data")
            for chunk, sqlite in [(0, False), (7, False), (0, True)]:
                try:
                    runInput(makeInput(case.state, payload, chunk, sqlite))
                except GateFault as e:
                    faults.append(
                        "{} (chunk {}, sqlite {}): {}".format(case.title, chunk, sqlite, e)
                    )
        self.assertEqual(faults, [])
        # The known bug "sqlite-uint64-overflow" logs this (see above).
        self.flushLoggedErrors(OverflowError)

    def test_regressions(self):
        """
        Every saved crash input passes now; those of a known bug still
        fail in strict mode (remove the bug's C{KNOWN_BUGS} entry once it is
        fixed), and every known bug has its input.
        """
        from fuzz.harness import KNOWN_BUGS, GateFault, runInput

        directory = FilePath(__file__).parent().sibling("fuzz").child("regressions")
        names = set()
        for path in directory.children():
            names.add(path.basename())
            data = path.getContent()
            runInput(data)
            if path.basename() in KNOWN_BUGS:
                self.assertRaises(GateFault, runInput, data, True)
        self.assertEqual(set(KNOWN_BUGS) - names, set())
        self.flushLoggedErrors(OverflowError)
