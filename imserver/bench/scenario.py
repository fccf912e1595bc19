# -*- test-case-name: tests.test_bench -*-
"""
What every scenario is made of.

A scenario is a L{Scenario} subclass, the coordinator's side (its options,
the gate's arguments, its phases), whose C{Load} is a L{Load} subclass, the
worker's side (the clients one worker process runs).  Both are listed once,
in L{imserver.bench.scenarios.SCENARIOS}.

Users are numbered 0 .. N - 1 across all workers; user C{i} is C{u<i>},
signs in as device L{DEVICE}, sends to its partner C{i ^ 1} (always in the
same worker), connects from source address C{i % len(sources)} to gate
L{gateOf}C{(i, len(ports))} (one gate unless C{--gates}).
"""

import gc
import random
import sys
import time

from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.task import Cooperator
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.filepath import FilePath

from imserver import __version__, methods
from imserver.auth import mintToken
from imserver.bench.arrivals import Arrivals, arrivalTimes
from imserver.bench.options import loopback
from imserver.bench.websocket import WebSocketClientEndpoint
from imserver.client import ClientProtocol
from imserver.observe import OneShot
from imserver.pb import im_pb2 as pb
from imserver.transport import noDelay

#: The device id of every bench session.
DEVICE = "bench"
#: Seconds a bench token is valid.
TOKEN_TTL = 24 * 3600


def userName(index):
    """
    The uid of user C{index}.
    """
    return "u{}".format(index)


def gateOf(index, gates):
    """
    The gate (of C{gates}) user C{index} connects to: pair C{k}'s even user
    to gate C{k % gates}, its odd user to the next one, so that with
    several gates every pair spans two gates and the senders (the even
    users, in C{p2p}) are spread over all of them.
    """
    return (index // 2 + (index & 1)) % gates


def partner(index):
    """
    The user C{index} sends to (and hears from): its pair's other half.
    """
    return index ^ 1


def requestFrame(seq, method, request):
    """
    A request frame, serialized (the length prefix excluded): what lean
    clients send pre-encoded.

    @param method: an L{imserver.rpc.Method}.
    """
    return pb.Frame(
        kind=pb.REQUEST, seq=seq, method=method.name, body=request.SerializeToString()
    ).SerializeToString()


def settleHeap():
    """
    Move everything alive now (the connections and their state, made while
    connecting) out of the garbage collector's reach (C{gc.freeze}): a
    worker holding thousands of connections otherwise stops for a full
    collection over all of them (tens of ms, measured) in the middle of the
    measurement, and its lateness shows up as the gate's latency.
    """
    gc.collect()
    gc.freeze()


class Scenario:
    """
    The coordinator's side of a scenario.

    @cvar name: the subcommand.
    @cvar summary: one line for C{--help}.
    @cvar Options: its L{imserver.bench.options.BaseOptions} subclass.
    @cvar Load: its L{Load} subclass, run in each worker.
    @cvar rates: the counters shown (and plotted) as rates per second.
    @cvar ratios: C{{result key: reference key}}: the figures reported as a
        ratio to the echo reference.
    @cvar usesApi: whether the gate serves its HTTP API (on a free loopback
        port), for L{imserver.bench.coordinator.Coordinator.callApi}.
    @ivar options: the parsed options.
    """

    name = None
    summary = None
    Options = None
    Load = None
    rates = ()
    ratios = {}
    usesApi = False

    def __init__(self, options):
        self.options = options

    def gateArguments(self):
        """
        @return: arguments for C{twistd im} beyond the data directory, store
            and listener.
        """
        return []

    def workerConfig(self, first, count):
        """
        @param first: the first user of a worker.
        @param count: how many users it runs.
        @return: the scenario's settings for that worker's L{Load} (JSON).
        """
        return {}

    def arrivalConfig(self, first):
        """
        The open loop's settings for the worker whose users start at
        C{first}, for L{Load.startArrivals}: C{arrivals} and C{seed} (the
        options), and C{phase}, C{first / users}: where the worker's evenly
        spaced arrivals sit among the other workers', so that they
        interleave (exactly when the workers' rates are equal).
        """
        o = self.options
        return {"arrivals": o["arrivals"], "seed": o["seed"], "phase": first / o["users"]}

    def drive(self, run):
        """
        Run the phases against the servers and workers of C{run}.

        @param run: the L{imserver.bench.coordinator.Coordinator}, its
            workers loaded with L{Load} and its server started.
        @return: a L{Deferred} firing with the scenario's result fields.
        """
        raise NotImplementedError()


class SessionClient(ClientProtocol):
    """
    A bench user's session on the real client protocol (the library's
    L{ClientProtocol}, its heartbeat included), reporting to its load:
    C{load.notified(client, name, message)} for each notification and
    C{load.disconnected(client)} when the connection is lost.

    @ivar index: its user.
    """

    def __init__(self, load, index):
        ClientProtocol.__init__(
            self, load.reactor, onNotify=self._notified, requestTimeout=load.timeout
        )
        self.load = load
        self.index = index
        self.onDisconnected = load.disconnected

    def _notified(self, name, message):
        self.load.notified(self, name, message)


class Load:
    """
    The worker's side of a scenario: the clients of users C{first} ..
    C{first + count - 1}.  The coordinator's command C{X} calls C{on_X};
    results are JSON.

    @cvar counters: the counters, in display order.
    @ivar counts: C{{counter: total so far}}, sent to the coordinator as
        progress.
    @ivar latencies: latencies in microseconds, recorded while measuring.
    @ivar lateness: how late the open loop sent each message (microseconds
        after its due time), recorded while measuring.
    @ivar now: the clock of latencies and of the open loop's due times
        (C{time.perf_counter}: one clock for every process of the machine).
    @ivar clients: the connected clients.
    @ivar stopping: true once traffic is to stop.
    @ivar closing: true once the connections are being closed on purpose.
    """

    _arrivals = None

    counters = ("connected", "errors")
    #: Errors written to stderr; later ones are only counted.
    loggedErrors = 5
    #: The protocol of L{connectSession}.
    Client = SessionClient

    def __init__(self, reactor, spec, err=sys.stderr):
        """
        @param spec: from the coordinator: C{target} (C{host}, C{port},
            C{ports}: every gate's, C{tls}, C{ca}, C{websocket}),
            C{sources}, C{first}, C{count}, C{secret} (hex, for the gate),
            C{connectWindow}, C{timeout} and the scenario's C{config}.
        @raise usage.UsageError: if the target or a source address is not a
            loopback address.
        """
        target = spec["target"]
        self.reactor = reactor
        self.err = err
        self.host = loopback(target["host"], "target")
        self.ports = target.get("ports") or [target["port"]]
        self.port = self.ports[0]
        #: Users connected by the last C{connect}, per gate (C{ports}).
        self.perGate = [0] * len(self.ports)
        self.sources = [None if s is None else loopback(s, "source") for s in spec["sources"]]
        self.first = spec["first"]
        self.count = spec["count"]
        self.connectWindow = spec["connectWindow"]
        self.timeout = spec["timeout"]
        self.config = spec["config"]
        self.secret = bytes.fromhex(spec["secret"]) if spec.get("secret") else None
        self._tls = None
        if target["tls"]:
            trustRoot = ssl.Certificate.loadPEM(FilePath(target["ca"]).getContent())
            # One context for every connection of this worker.
            self._tls = ssl.optionsForClientTLS("localhost", trustRoot=trustRoot)
        #: Whether connections are WebSockets (on TCP, or on TLS).
        self.websocket = bool(target.get("websocket"))
        self.counts = dict.fromkeys(self.counters, 0)
        self.latencies = []
        self.lateness = []
        self.now = time.perf_counter
        self.clients = []
        self.measuring = self.stopping = self.closing = False
        self._mark = {}

    # -- helpers for subclasses ----------------------------------------------

    def endpoint(self, index):
        """
        A client endpoint to the target for user C{index} (its gate's port),
        bound to its source address, wrapped in TLS if the target is TLS,
        then in a WebSocket if it is one (the client protocol still reads
        and writes length-prefixed frames: L{imserver.bench.websocket}).
        """
        source = self.sources[index % len(self.sources)]
        bind = None if source is None else (source, 0)
        kind = TCP6ClientEndpoint if ":" in self.host else TCP4ClientEndpoint
        port = self.ports[gateOf(index, len(self.ports))]
        endpoint = kind(self.reactor, self.host, port, self.timeout, bind)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls, endpoint)
        if self.websocket:
            endpoint = WebSocketClientEndpoint(
                self.reactor, endpoint, self.host, port, self.timeout
            )
        return endpoint

    def token(self, uid):
        """
        A token for C{uid}, signed with the gate's secret.
        """
        return mintToken(self.secret, uid, TOKEN_TTL, self.reactor.seconds())

    def authFrame(self, index, seq=1):
        """
        The C{auth} request of user C{index}, pre-encoded for a lean client
        (L{requestFrame}).
        """
        uid = userName(index)
        return requestFrame(
            seq,
            methods.AUTH,
            pb.AuthRequest(
                uid=uid,
                token=self.token(uid),
                device_id=DEVICE,
                platform=pb.DESKTOP,
                client_version="im-bench/" + __version__,
            ),
        )

    def connectSession(self, index, lastSeq=0, noEcho=False):
        """
        Connect a L{SessionClient} for user C{index} and authenticate.

        @return: a L{Deferred} firing with the client once authenticated
            (its C{session} is the L{AuthResponse}); on failure the
            connection is aborted.
        """
        uid = userName(index)

        def authenticate(client):
            d = client.authenticate(uid, self.token(uid), DEVICE, lastSeq=lastSeq, noEcho=noEcho)
            return d.addCallbacks(lambda response: client, self._abortFailed, None, None, (client,))

        client = self.Client(self, index)
        return connectProtocol(self.endpoint(index), client).addCallback(authenticate)

    def connectLean(self, index, client):
        """
        Connect a L{LeanClient} for user C{index} and append it to
        L{clients} once its handshake is answered (within the timeout).

        @return: a L{Deferred} firing then.
        """

        def notReady(failure):
            if client.connected:
                client.transport.abortConnection()
            return failure

        d = connectProtocol(self.endpoint(index), client)
        d.addCallback(lambda client: client.ready.addTimeout(self.timeout, self.reactor))
        return d.addCallbacks(self.clients.append, notReady)

    @staticmethod
    def _abortFailed(failure, protocol):
        if protocol.connected:
            protocol.transport.abortConnection()
        return failure

    def add(self, name, by=1):
        """
        Add to a counter.
        """
        self.counts[name] += by

    def record(self, seconds):
        """
        Record a latency, if measuring.
        """
        if self.measuring:
            self.latencies.append(int(seconds * 1e6))

    def recordLateness(self, seconds):
        """
        Record how late the open loop sent a message, if measuring.
        """
        if self.measuring:
            self.lateness.append(int(seconds * 1e6))

    def notified(self, client, name, message):
        """
        A L{SessionClient} was notified: messages are acknowledged.
        """
        if name == methods.MESSAGE.name:
            client.ack(message.seq)

    def disconnected(self, client):
        """
        A L{SessionClient} lost its connection: an error, unless it was
        never authenticated (its connection attempt failed, counted as
        such) or the load is closing.
        """
        if client.session is not None and not self.closing:
            self.error("{} lost its connection".format(userName(client.index)))

    def error(self, message):
        """
        Count an error; write the first few to stderr.
        """
        self.counts["errors"] += 1
        if self.counts["errors"] <= self.loggedErrors:
            self.err.write("im-bench worker: {}\n".format(message))
            self.err.flush()

    # -- commands ------------------------------------------------------------

    def connectOne(self, index):
        """
        Connect user C{index} and append its client to L{clients}.

        @return: a L{Deferred} firing once it is ready.
        """
        raise NotImplementedError()

    def on_connect(self):
        """
        Connect every user, at most C{connectWindow} attempts in progress at
        once.

        @return: a L{Deferred} firing with C{connected}, C{failed} and
            C{gates}: how many connected to each gate.
        """
        failed = []
        self.perGate = [0] * len(self.ports)

        def connected(_, index):
            self.add("connected")
            self.perGate[gateOf(index, len(self.ports))] += 1

        def attempt(index):
            def connectFailed(failure):
                failed.append(index)
                self.error("connecting {}: {}".format(userName(index), failure.getErrorMessage()))

            return self.connectOne(index).addCallbacks(
                connected, connectFailed, callbackArgs=(index,)
            )

        attempts = (attempt(i) for i in range(self.first, self.first + self.count))
        cooperator = Cooperator(scheduler=lambda step: self.reactor.callLater(0, step))
        lanes = max(1, min(self.connectWindow, self.count))
        done = gatherResults([cooperator.coiterate(attempts) for _ in range(lanes)])
        done.addCallback(lambda _: settleHeap())
        return done.addCallback(
            lambda _: {
                "connected": self.counts["connected"],
                "failed": len(failed),
                "gates": self.perGate,
            }
        )

    def on_start(self):
        """
        Start the traffic (none by default).
        """

    def on_measure(self):
        """
        Start a measurement window: latencies from now on, counters from
        their values now.
        """
        self._mark = dict(self.counts)
        self.latencies = []
        self.lateness = []
        self.measuring = True

    def on_report(self):
        """
        End the measurement window.

        @return: C{counts} (what each counter gained in the window),
            C{latencies_us} (sorted) and, with an open loop, C{lateness_us}
            (sorted).
        """
        self.measuring = False
        self.latencies.sort()
        window = {name: value - self._mark.get(name, 0) for name, value in self.counts.items()}
        report = {"counts": window, "latencies_us": self.latencies}
        if self._arrivals is not None:
            self.lateness.sort()
            report["lateness_us"] = self.lateness
        return report

    def startArrivals(self, rate, fire):
        """
        Open loop: call C{fire(due)} C{rate} times per second on average
        until L{on_stop}, spaced as the config's C{arrivals} says
        (L{imserver.bench.arrivals}; C{phase} places even arrivals among
        the other workers', C{seed} and this worker's first user seed
        Poisson ones).  C{due} is the message's scheduled time on L{now}'s
        clock, the time its latency is measured from; how late it was sent
        is recorded (L{recordLateness}).
        """
        config = self.config
        rng = random.Random("{}:{}".format(config.get("seed", 0), self.first))
        times = arrivalTimes(
            config.get("arrivals", "even"), rate, self.now(), config.get("phase", 0.0), rng
        )
        self._arrivals = Arrivals(self.reactor, times, fire, self.recordLateness, self.now)
        self._arrivals.start()

    def countSent(self, d, counter="sent", again=None):
        """
        Count the send of C{d} in C{counter} once answered, then call
        C{again} (a closed loop's next send); count a failure as an error.
        """

        def sent(response):
            self.add(counter)
            if again is not None:
                again()

        def failed(failure):
            if not self.closing:
                self.error("{} failed: {}".format(counter, failure.getErrorMessage()))

        d.addCallbacks(sent, failed)

    def on_stop(self):
        """
        Stop the traffic (and the open loop); outstanding requests still
        complete.
        """
        self.stopping = True
        if self._arrivals is not None:
            self._arrivals.stop()

    def on_close(self):
        """
        Stop the traffic and abort every connection.

        @return: a L{Deferred} firing with the final counters once all are
            closed.
        """
        self.on_stop()
        self.closing = True
        return gatherResults([self.closeClient(c) for c in self.clients]).addCallback(
            lambda _: dict(self.counts)
        )

    def closeClient(self, client):
        """
        Abort one client's connection.

        @return: a L{Deferred} firing once it is closed.
        """
        closed = client.whenClosed()
        if client.connected:
            client.transport.abortConnection()
        return closed


class LeanClient:
    """
    What the bench's lean clients (pre-encoded frames, no client library)
    share: a C{ready} L{Deferred} fired by the subclass once its handshake
    is answered, and the end of the connection.  Subclasses set
    C{load}, C{ready}, C{isReady} and C{_closed} (a L{OneShot}).
    """

    #: Names the client in error messages.
    label = "connection"

    def whenClosed(self):
        """
        @return: a L{Deferred} firing once the connection is closed.
        """
        return self._closed.when()

    def connectionLost(self, reason):
        self.connected = 0
        if not self.ready.called:
            self.ready.errback(reason)
        elif self.isReady and not self.load.closing:
            self.load.error("{} lost: {}".format(self.label, reason.getErrorMessage()))
        self._closed.fire(None)


class RoundTripClient(LeanClient, Int32StringReceiver):
    """
    One connection doing round trips of a pre-encoded request, one in
    flight: the clients of the C{ping} scenario and of the echo reference.
    Frames are 4-byte big-endian lengths and a body, as on the gate.

    The first request, C{hello}, is a handshake (C{auth} on the gate): its
    answer makes the connection ready.  The load decides which answers are
    good (L{RoundTripLoad.accept}).

    @ivar ready: a L{Deferred} firing with this client once the hello is
        answered, or failing if the connection ends first.
    """

    MAX_LENGTH = 64 * 1024

    def __init__(self, load, hello):
        self.load = load
        self.hello = hello
        self.ready = Deferred()
        self.isReady = False
        self._sentAt = 0.0
        self._closed = OneShot()

    def connectionMade(self):
        noDelay(self.transport)
        self.sendString(self.hello)

    def stringReceived(self, data):
        load = self.load
        if not load.accept(data):
            reason = "unexpected answer {!r}".format(data[:80])
            self.transport.abortConnection()
            if self.isReady:
                load.error(reason)
            elif not self.ready.called:
                self.ready.errback(ValueError(reason))
            return
        if not self.isReady:
            if not self.ready.called:  # else it timed out and is being aborted
                self.isReady = True
                self.ready.callback(self)
            return
        load.answered(time.perf_counter() - self._sentAt)
        if not load.stopping:
            self.next()

    def next(self):
        """
        Send the load's request.
        """
        self._sentAt = time.perf_counter()
        self.sendString(self.load.request)


class RoundTripLoad(Load):
    """
    A load of L{RoundTripClient}s, each doing one round trip after another
    once started.

    @ivar request: the L{bytes} of each request, framing excluded.
    """

    counters = ("connected", "requests", "errors")
    request = b""

    def hello(self, index):
        """
        @return: the handshake request of user C{index}.
        """
        raise NotImplementedError()

    def accept(self, data):
        """
        @return: whether C{data} (a frame body) is a good answer.
        """
        raise NotImplementedError()

    def connectOne(self, index):
        return self.connectLean(index, RoundTripClient(self, self.hello(index)))

    def answered(self, seconds):
        """
        One round trip done in C{seconds}.
        """
        self.counts["requests"] += 1
        self.record(seconds)

    def on_start(self):
        for client in self.clients:
            client.next()
