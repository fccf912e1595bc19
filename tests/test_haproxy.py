# -*- test-case-name: tests.test_haproxy -*-
"""
Live test of TLS offload: a real C{haproxy} terminates TLS and passes
connections to an in-process gate on a C{haproxy:tcp:} listener with the
PROXY protocol (v1 and v2), and the real client talks to the gate through it.

Needs the C{haproxy} program (Debian package C{haproxy}): skipped without it,
a failure without it when C{$CI_REQUIRE_ALL} is C{1} (as in C{.ci/run}).
Uses the global reactor and real sockets on loopback only; haproxy runs in
the foreground as a child process and is killed at cleanup.
"""

import os
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from imserver import tap
from imserver.auth import mintToken
from imserver.client import ClientProtocol, connect
from imserver.tls import makeSelfSigned

from tests.support import killAtCleanup, requireDependency, requireExecutable, startServer
from tests.support.live import ConnectionWatch
from tests.support.websocket import JSON, connectWS

LISTEN = "haproxy:tcp:0:interface=127.0.0.1"
#: The source address of the client whose address the gate must see: all of
#: 127.0.0.0/8 is loopback on Linux, and haproxy connects to the gate from
#: 127.0.0.1.
CLIENT_HOST = "127.0.0.7"
#: Seconds haproxy has to accept connections on its frontend.
STARTUP_DEADLINE = 10.0

HAPROXY_CONFIG = """\
global
    maxconn 100

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend im_tls
    bind 127.0.0.1:{frontendPort} ssl crt {pem}
    default_backend gate

backend gate
    server gate 127.0.0.1:{gatePort} {sendProxy}
"""


def _canBind(host):
    """
    Whether a TCP socket can be bound to C{host}.
    """
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def _freePort():
    """
    A TCP port of 127.0.0.1 that was free a moment ago (haproxy cannot
    report the port of a C{bind ...:0}).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HAProxyProcess(ProcessProtocol):
    """
    One run of C{haproxy -db}: collects its output and tells when it has
    ended.

    @ivar output: everything it wrote so far.
    @ivar ended: a L{Deferred} firing with the reason once it has ended.
    """

    def __init__(self):
        self.output = b""
        self.ended = Deferred()

    def outReceived(self, data):
        """
        Collect stdout and stderr.
        """
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        """
        Fire L{ended}.
        """
        self.ended.callback(reason.value)


class _Probe(Protocol):
    """
    A connection that only tells when it is closed.
    """

    def __init__(self):
        self.closed = Deferred()

    def connectionLost(self, reason):
        self.closed.callback(None)


class HAProxyOffloadTests(TestCase):
    """
    haproxy terminates TLS and speaks the PROXY protocol to a gate on a
    C{haproxy:tcp:} listener; the gate sees and logs the clients' own
    addresses.
    """

    timeout = 30

    @inlineCallbacks
    def setUp(self):
        """
        Start the gate in process on a C{haproxy:tcp:} loopback listener,
        with a fresh data directory, a secret file and the memory store; stop
        it at cleanup.  Make the certificate haproxy will serve.
        """
        self.haproxy = requireExecutable("haproxy", "haproxy (Debian package haproxy)")
        requireDependency(
            _canBind(CLIENT_HOST),
            "a bindable {} (all of 127.0.0.0/8 is loopback on Linux)".format(CLIENT_HOST),
        )
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.secret = os.urandom(32).hex().encode("ascii")
        secretFile = self.directory.child("secret")
        secretFile.setContent(self.secret)
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.directory.child("data").path,
                "--secret-file",
                secretFile.path,
                "--store",
                "memory",
                "--listen",
                LISTEN,
                "--web",
                LISTEN,
                "--api",
                "none",
            ]
        )
        root = startServer(self, options)
        gate = root.getServiceNamed("gate")
        self.factory = gate.factory
        self.watch = ConnectionWatch(self, self.factory)
        [address] = yield gate.addresses()
        self.gatePort = address.port
        self.webPort = (yield gate.web.whenListening()).getHost().port

        self.certPEM, keyPEM = makeSelfSigned()
        self.pem = self.directory.child("haproxy.pem")
        self.pem.setContent(self.certPEM + keyPEM)
        self.pem.chmod(0o600)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    @inlineCallbacks
    def startHAProxy(self, sendProxy, gatePort=None):
        """
        Start C{haproxy -db} with a TLS frontend on a free loopback port and
        the gate as its only server, reached with C{sendProxy}; kill it at
        cleanup.  Wait until the frontend accepts connections.

        @param sendProxy: C{"send-proxy"} (PROXY v1) or C{"send-proxy-v2"}.
        @return: a L{Deferred} firing with the frontend port.
        """
        port = _freePort()
        config = self.directory.child("haproxy-{}.cfg".format(sendProxy))
        config.setContent(
            HAPROXY_CONFIG.format(
                frontendPort=port,
                pem=self.pem.path,
                gatePort=self.gatePort if gatePort is None else gatePort,
                sendProxy=sendProxy,
            ).encode("ascii")
        )
        process = HAProxyProcess()
        transport = reactor.spawnProcess(
            process,
            self.haproxy,
            [self.haproxy, "-db", "-f", config.path],
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
        killAtCleanup(self, process, transport)
        yield self.waitUntilAccepting(port, process)
        return port

    @inlineCallbacks
    def waitUntilAccepting(self, port, process):
        """
        Try to connect to C{port} until it accepts, giving up after
        L{STARTUP_DEADLINE} seconds or when C{process} ends.
        """
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1)
        deadline = reactor.seconds() + STARTUP_DEADLINE
        while True:
            if process.ended.called:
                self.fail(
                    "haproxy ended before accepting:\n" + process.output.decode("utf-8", "replace")
                )
            try:
                probe = yield connectProtocol(endpoint, _Probe())
            except ConnectError:
                if reactor.seconds() > deadline:
                    self.fail(
                        "haproxy did not accept on port {} within {}s:\n{}".format(
                            port, STARTUP_DEADLINE, process.output.decode("utf-8", "replace")
                        )
                    )
                yield deferLater(reactor, 0.05, lambda: None)
            else:
                probe.transport.loseConnection()
                yield probe.closed
                return

    def token(self, uid):
        """
        A token for C{uid} valid for a minute, signed with the gate's secret.
        """
        return mintToken(self.secret, uid, 60, time.time())

    def closeAtCleanup(self, client):
        """
        Close C{client} at cleanup, before haproxy is killed.

        @return: C{client}
        """
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def connectFrom(self, host, port, uid, deviceId, onNotify=None):
        """
        Connect from C{host} to haproxy's frontend on C{port} with the
        client protocol, over TLS verifying haproxy's certificate for
        C{localhost}, and authenticate.

        @return: a L{Deferred} firing with the authenticated
            L{ClientProtocol}.
        """
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(self.certPEM)),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10, bindAddress=(host, 0)),
        )
        client = yield connectProtocol(endpoint, ClientProtocol(reactor, onNotify))
        self.closeAtCleanup(client)
        yield client.authenticate(uid, self.token(uid), deviceId)
        return client

    def serverSession(self, uid):
        """
        The gate's open connection of C{uid}.
        """
        [protocol] = [p for p in self.factory.connections if p.uid == uid]
        return protocol

    @inlineCallbacks
    def assertOffloaded(self, sendProxy):
        """
        Through haproxy with C{sendProxy}: alice (from L{CLIENT_HOST}) and
        bob (with L{imserver.client.connect}) authenticate over verified
        TLS, ping, and alice's message reaches bob; the gate sees and logs
        each client's own address and port, not haproxy's; everything
        closes on both sides.
        """
        port = yield self.startHAProxy(sendProxy)
        received = Deferred()

        def onNotify(name, message):
            """
            Fire C{received} with bob's first pushed message.
            """
            if name == "message" and not received.called:
                received.callback(message)

        alice = yield self.connectFrom(CLIENT_HOST, port, "alice", "laptop")
        caFile = self.directory.child("ca.pem")
        caFile.setContent(self.certPEM)
        bob = yield connect(
            reactor,
            "127.0.0.1",
            port,
            uid="bob",
            token=self.token("bob"),
            deviceId="phone",
            onNotify=onNotify,
            caFile=caFile.path,
            hostname="localhost",
        )
        self.closeAtCleanup(bob)
        yield alice.ping()
        yield bob.ping()
        sent = yield alice.send("bob", b"hello through haproxy", "m-1")
        entry = yield received
        self.assertEqual(
            (entry.message.id, entry.message.sender, entry.message.body),
            (sent.message_id, "alice", b"hello through haproxy"),
        )

        for client, uid in [(alice, "alice"), (bob, "bob")]:
            clientAddress = client.transport.getHost()
            server = self.serverSession(uid)
            self.assertEqual(server.peer, clientAddress)
            # Under the PROXY wrapper, the connection comes from haproxy.
            proxySide = server.channel.transport.transport.getPeer()
            self.assertNotEqual(proxySide, clientAddress)
            [event] = [
                e
                for e in self.events
                if "authenticated as" in e.get("log_format", "") and e["uid"] == uid
            ]
            self.assertEqual(event["peer"], clientAddress)
        self.assertEqual(alice.transport.getHost().host, CLIENT_HOST)

        yield alice.close()
        yield bob.close()
        yield self.watch.whenAllClosed()
        self.assertEqual(self.factory.connections, set())

    def test_proxyV1(self):
        """
        With C{send-proxy} (PROXY protocol v1, text).
        """
        return self.assertOffloaded("send-proxy")

    @inlineCallbacks
    def test_webSocket(self):
        """
        A browser's wss:// through haproxy's TLS frontend to a C{--web
        haproxy:tcp:} listener: the upgrade and the session work through
        the PROXY wrapper, and the gate sees the browser's own address.
        """
        port = yield self.startHAProxy("send-proxy-v2", self.webPort)
        caFile = self.directory.child("ca.pem")
        caFile.setContent(self.certPEM)
        browser = yield connectWS(
            port,
            [JSON],
            origin="https://localhost:{}".format(port),
            host="127.0.0.1",
            tlsHost="localhost",
            caFile=caFile.path,
            bindAddress=(CLIENT_HOST, 0),
        )
        response = yield browser.call(
            "auth", {"uid": "alice", "token": self.token("alice"), "deviceId": "web"}
        )
        self.assertNotIn("error", response)
        self.assertEqual(self.serverSession("alice").peer, browser.transport.getHost())
        self.assertEqual(browser.transport.getHost().host, CLIENT_HOST)
        browser.sendClose(1000)
        yield browser.closed
        yield self.watch.whenAllClosed()

    def test_proxyV2(self):
        """
        With C{send-proxy-v2} (PROXY protocol v2, binary).
        """
        return self.assertOffloaded("send-proxy-v2")
