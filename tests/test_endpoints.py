# -*- test-case-name: tests.test_endpoints -*-
"""
Tests for L{imserver.endpoints}: descriptions with a C{haproxy:} wrapper, and
the client address a gate sees through it; C{reusePort=} (one port shared
by several listeners).

The plain C{tcp:} and C{ssl:} cases are in L{tests.test_tls}.
"""

import socket

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import tls
from imserver.endpoints import ReusePortEndpoint, listenEndpoint, splitDescription
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.protocol import NEW

from tests.support.frames import readFrames
from tests.support.gate import GateHarness

#: The address the proxy connects to the gate from.
PROXY_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
#: The client address the proxy sends in its PROXY header.
CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 51000)
PROXY_V1_HEADER = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 7000\r\n"


class SplitTests(SynchronousTestCase):
    """
    L{splitDescription} follows Twisted's escaping rules.
    """

    def test_escapedEquals(self):
        """
        An escaped C{=} is part of a positional argument, as in Twisted; an
        unescaped one names a keyword argument, after the type only.
        """
        self.assertEqual(splitDescription(r"unix:/run/a\=b"), (["unix", "/run/a=b"], {}))
        self.assertEqual(splitDescription("unix:a=b=c"), (["unix"], {"a": "b=c"}))
        self.assertEqual(splitDescription("x=y:z"), (["x=y", "z"], {}))

    def test_escapedBackslash(self):
        """
        An escaped backslash is a backslash, and does not escape what
        follows it.
        """
        self.assertEqual(splitDescription("unix:a\\\\:b=c"), (["unix", "a\\"], {"b": "c"}))


class HAProxyDescriptionTests(SynchronousTestCase):
    """
    L{listenEndpoint} with C{haproxy:} descriptions: the wrapped endpoint
    gets the default backlog, C{ssl:} inside is refused, and types match in
    any case.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = object()

    def listen(self, description, backlog=4096):
        """
        Listen on C{description} with L{listenEndpoint} and the memory
        reactor.
        """
        endpoint = listenEndpoint(self.reactor, description, None, backlog)
        endpoint.listen(self.factory)

    def assertWrapped(self, factory):
        """
        Assert that C{factory} is the PROXY protocol wrapper of ours.
        """
        self.assertIsInstance(factory, HAProxyWrappingFactory)
        self.assertIs(factory.wrappedFactory, self.factory)

    def test_tcpBacklog(self):
        """
        C{haproxy:tcp:} listens through the PROXY wrapper, with the default
        backlog and the interface asked for.
        """
        self.listen("haproxy:tcp:7000:interface=127.0.0.1")
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, backlog, interface), (7000, 4096, "127.0.0.1"))
        self.assertWrapped(factory)

    def test_tcpBacklogSetting(self):
        """
        The default is the backlog given (the C{listen_backlog} setting).
        """
        self.listen("haproxy:tcp:7000", backlog=77)
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual(backlog, 77)

    def test_tcp6Backlog(self):
        """
        C{haproxy:tcp6:} gets the default backlog too.
        """
        self.listen(r"haproxy:tcp6:7000:interface=\:\:1")
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, backlog, interface), (7000, 4096, "::1"))
        self.assertWrapped(factory)

    def test_unixBacklog(self):
        """
        C{haproxy:unix:} gets the default backlog too.
        """
        self.listen("haproxy:unix:/run/imserver/gate.sock")
        [(address, factory, backlog, mode, wantPID)] = self.reactor.unixServers
        self.assertEqual((address, backlog), ("/run/imserver/gate.sock", 4096))
        self.assertWrapped(factory)

    def test_explicitBacklogKept(self):
        """
        A C{backlog=} in the description wins, wherever it is after the
        wrapper's type (Twisted passes every keyword to the wrapped
        endpoint).
        """
        self.listen("haproxy:tcp:7000:backlog=10")
        self.listen("haproxy:backlog=11:tcp:7001")
        self.assertEqual([s[2] for s in self.reactor.tcpServers], [10, 11])

    def test_anyCase(self):
        """
        The wrapper's type and the wrapped type match in any case (Twisted
        alone would refuse C{TCP} inside C{haproxy:}), and the backlog is
        still set.
        """
        self.listen("HAProxy:TCP:7000:interface=127.0.0.1")
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, backlog, interface), (7000, 4096, "127.0.0.1"))
        self.assertWrapped(factory)

    def test_valuesKeepTheirCase(self):
        """
        Only the types are lower-cased: a path keeps its case and escapes.
        """
        self.listen(r"HAPROXY:UNIX:/run/Gate\:1.sock")
        [(address, factory, backlog, mode, wantPID)] = self.reactor.unixServers
        self.assertEqual(address, "/run/Gate:1.sock")

    def test_sslRefused(self):
        """
        C{ssl:} inside C{haproxy:}, in any case, is refused with a message
        pointing to C{haproxy:tcp:}, and nothing listens.
        """
        for description in ["haproxy:ssl:7443", "HAPROXY:SSL:7443", "haproxy:Ssl:port=7443"]:
            error = self.assertRaises(
                ValueError, listenEndpoint, self.reactor, description, None, 4096
            )
            self.assertIn("haproxy:tcp:", str(error))
        self.assertEqual(self.reactor.tcpServers + self.reactor.sslServers, [])

    def test_nothingWrapped(self):
        """
        C{haproxy} without an endpoint to wrap is a L{ValueError} saying so.
        """
        for description in ["haproxy", "HAPROXY:backlog=5"]:
            error = self.assertRaises(
                ValueError, listenEndpoint, self.reactor, description, None, 4096
            )
            self.assertIn("needs an endpoint to wrap", str(error))

    def test_badArguments(self):
        """
        A missing or an unknown argument of the wrapped endpoint is a
        L{ValueError} (Twisted raises L{TypeError}), so C{twistd im} reports
        it as a usage error.
        """
        for description in ["haproxy:tcp", "haproxy:tcp:7000:bogus=1", "tcp:7000:bogus=1"]:
            self.assertRaises(ValueError, listenEndpoint, self.reactor, description, None, 4096)


class ProxiedPeerTests(SynchronousTestCase):
    """
    A gate behind a C{haproxy:} listener sees and logs the client's address
    from the PROXY header, not the proxy's.
    """

    def setUp(self):
        self.gate = GateHarness(self)
        reactor = MemoryReactorClock()
        listenEndpoint(reactor, "haproxy:tcp:7000:interface=127.0.0.1", None, 4096).listen(
            self.gate.factory
        )
        [(port, self.wrappingFactory, backlog, interface)] = reactor.tcpServers
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def accept(self):
        """
        Accept a connection from the proxy.

        @return: C{(wrapper, transport, protocol)}: the PROXY protocol
            wrapper, the transport under it, and the gate's protocol.
        """
        wrapper = self.wrappingFactory.buildProtocol(PROXY_ADDRESS)
        transport = StringTransport(peerAddress=PROXY_ADDRESS)
        wrapper.makeConnection(transport)
        [protocol] = self.gate.factory.connections
        return wrapper, transport, protocol

    def authFrame(self, token=None):
        """
        An C{auth} request frame for alice.
        """
        request = pb.AuthRequest(
            uid="alice",
            device_id="phone",
            token=self.gate.token("alice") if token is None else token,
        )
        return encodeFrame(
            pb.Frame(kind=pb.REQUEST, seq=1, method="auth", body=request.SerializeToString())
        )

    def logged(self, text):
        """
        The log events whose format contains C{text}.
        """
        return [e for e in self.events if text in e.get("log_format", "")]

    def test_peerFromHeader(self):
        """
        Until the PROXY header has been read the peer is the proxy; after
        it, the client address of the header, which the auth log line
        shows.  The header and the first frame may come in one read.
        """
        wrapper, transport, protocol = self.accept()
        self.assertEqual(protocol.peer, PROXY_ADDRESS)
        wrapper.dataReceived(PROXY_V1_HEADER + self.authFrame())
        self.assertEqual(protocol.peer, CLIENT_ADDRESS)
        [frame] = readFrames(transport.value())
        self.assertFalse(frame.HasField("error"), frame.error)
        [event] = self.logged("authenticated as")
        self.assertEqual((event["uid"], event["peer"]), ("alice", CLIENT_ADDRESS))

    def test_failedAuthLogged(self):
        """
        A failed auth is logged with the client address of the header.
        """
        wrapper, transport, protocol = self.accept()
        wrapper.dataReceived(PROXY_V1_HEADER)
        wrapper.dataReceived(self.authFrame(token="v1.0.nope"))
        [event] = self.logged("failed auth")
        self.assertEqual(event["peer"], CLIENT_ADDRESS)

    def test_unixListener(self):
        """
        Behind C{haproxy:unix:} too, the peer is the header's client.
        """
        reactor = MemoryReactorClock()
        listenEndpoint(reactor, "haproxy:unix:/run/gate.sock", None, 4096).listen(self.gate.factory)
        [(address, factory, backlog, mode, wantPID)] = reactor.unixServers
        wrapper = factory.buildProtocol(UNIXAddress(None))
        wrapper.makeConnection(StringTransport(peerAddress=UNIXAddress(None)))
        wrapper.dataReceived(PROXY_V1_HEADER)
        [protocol] = self.gate.factory.connections
        self.assertEqual(protocol.peer, CLIENT_ADDRESS)

    def test_noHeader(self):
        """
        A connection that does not start with a PROXY header is closed by
        the wrapper before the gate reads anything.
        """
        wrapper, transport, protocol = self.accept()
        wrapper.dataReceived(self.authFrame())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.state, NEW)
        self.assertEqual(transport.value(), b"")


class ReusePortDescriptionTests(SynchronousTestCase):
    """
    C{reusePort=} in descriptions: a L{ReusePortEndpoint} (the socket bound
    here, handed to the reactor with C{adoptStreamPort}) for C{tcp:},
    C{tcp6:}, C{ssl:} and C{haproxy:tcp:}; refused elsewhere.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = Factory.forProtocol(Protocol)

    def listen(self, description, certificate=None):
        """
        Listen on C{description} with L{listenEndpoint} and the memory
        reactor.

        @return: the C{(fileno, family, factory)} the reactor was handed.
        """
        endpoint = listenEndpoint(self.reactor, description, certificate, 4096)
        self.successResultOf(endpoint.listen(self.factory))
        [adopted] = self.reactor.adoptedPorts
        self.assertEqual(self.reactor.tcpServers + self.reactor.sslServers, [])
        return adopted

    def test_tcp(self):
        """
        C{tcp:...:reusePort=yes} binds an IPv4 socket on the interface and
        port, with the default backlog, and hands it to the reactor.
        """
        endpoint = listenEndpoint(
            self.reactor, "tcp:0:interface=127.0.0.1:reusePort=yes", None, 4096
        )
        self.assertIsInstance(endpoint.endpoint, ReusePortEndpoint)
        self.assertEqual(
            (endpoint.endpoint.port, endpoint.endpoint.interface, endpoint.endpoint.backlog),
            (0, "127.0.0.1", 4096),
        )
        fileno, family, factory = self.listen("tcp:0:interface=127.0.0.1:reusePort=yes")
        self.assertEqual(family, socket.AF_INET)

    def test_tcp6(self):
        """
        C{tcp6:} makes an IPv6 socket, and takes only an IPv6 interface.
        """
        fileno, family, factory = self.listen(r"tcp6:0:interface=\:\:1:reusePort=yes")
        self.assertEqual(family, socket.AF_INET6)
        self.assertRaises(
            ValueError,
            listenEndpoint,
            self.reactor,
            "tcp6:0:interface=127.0.0.1:reusePort=yes",
            None,
            4096,
        )

    def test_values(self):
        """
        C{yes}, C{true} and C{1} ask for it, in any case; C{no}, C{false}
        and C{0} leave a plain Twisted listener; anything else is refused.
        """
        for value in ["yes", "True", "1"]:
            endpoint = listenEndpoint(self.reactor, "tcp:7000:reusePort=" + value, None, 4096)
            self.assertIsInstance(endpoint.endpoint, ReusePortEndpoint)
        for value in ["no", "FALSE", "0"]:
            endpoint = listenEndpoint(
                self.reactor, "tcp:7000:reusePort={}:backlog=9".format(value), None, 4096
            )
            self.successResultOf(endpoint.listen(self.factory))
        self.assertEqual([(s[0], s[2]) for s in self.reactor.tcpServers], [(7000, 9)] * 3)
        self.assertRaises(
            ValueError, listenEndpoint, self.reactor, "tcp:7000:reusePort=maybe", None, 4096
        )

    def test_haproxy(self):
        """
        Inside C{haproxy:} the shared socket listens through the PROXY
        protocol wrapper.
        """
        fileno, family, factory = self.listen("haproxy:tcp:0:reusePort=yes:interface=127.0.0.1")
        self.assertIsInstance(factory, HAProxyWrappingFactory)

    def test_ssl(self):
        """
        C{ssl:} takes it too, and keeps its TLS.
        """
        certificate = tls.ensureSelfSigned(FilePath(self.mktemp()))
        fileno, family, factory = self.listen(
            "ssl:0:interface=127.0.0.1:reusePort=yes", certificate
        )
        self.assertIsInstance(factory, TLSMemoryBIOFactory)

    def test_refused(self):
        """
        Other endpoint types, and other keywords of C{tcp:} than Twisted's
        C{port}, C{interface} and C{backlog}, are refused with it.
        """
        for description in [
            "unix:/run/gate.sock:reusePort=yes",
            "haproxy:unix:/run/gate.sock:reusePort=yes",
            "tcp:0:reusePort=yes:timeout=3",
            "tcp:reusePort=yes",
            "tcp:1:2:reusePort=yes",
        ]:
            self.assertRaises(ValueError, listenEndpoint, self.reactor, description, None, 4096)


class _Accepted(Protocol):
    def connectionMade(self):
        self.factory.accepted.append(self)


class ReusePortLiveTests(TestCase):
    """
    L{ReusePortEndpoint}s on the real reactor, on 127.0.0.1.
    """

    def factory(self):
        factory = Factory.forProtocol(_Accepted)
        factory.accepted = []
        return factory

    @inlineCallbacks
    def listen(self, port, factory, reusePort=True):
        description = "tcp:{}:interface=127.0.0.1".format(port)
        if reusePort:
            description += ":reusePort=yes"
        listening = yield listenEndpoint(reactor, description, None, 50).listen(factory)
        self.addCleanup(listening.stopListening)
        return listening

    @inlineCallbacks
    def connect(self, port, count):
        """
        Open and close C{count} connections to C{port}, one after another.
        """
        for _i in range(count):
            protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                Factory.forProtocol(Protocol)
            )
            lost = Deferred()
            protocol.connectionLost = lambda reason, lost=lost: lost.callback(None)
            protocol.transport.loseConnection()
            yield lost

    @inlineCallbacks
    def test_sharedPort(self):
        """
        Two listeners share one port: the option is set on both sockets,
        and connections reach both (40 in a row all hashing to one socket
        would be a 1 in 2**39 chance).  Once one stops listening, every
        new connection reaches the other.
        """
        first, second = self.factory(), self.factory()
        port = yield self.listen(0, first)
        number = port.getHost().port
        other = yield self.listen(number, second)
        for listening in (port, other):
            self.assertEqual(listening.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        yield self.connect(number, 40)
        self.assertEqual(len(first.accepted) + len(second.accepted), 40)
        self.assertTrue(first.accepted and second.accepted)

        yield port.stopListening()
        before = len(second.accepted)
        yield self.connect(number, 10)
        self.assertEqual(len(second.accepted), before + 10)

    @inlineCallbacks
    def test_notShared(self):
        """
        A port held by a listener without the option cannot be shared, and
        one held with it cannot be taken without it.
        """
        plain = yield self.listen(0, self.factory(), reusePort=False)
        yield self.assertFailure(
            self.listen(plain.getHost().port, self.factory()), CannotListenError
        )
        shared = yield self.listen(0, self.factory())
        yield self.assertFailure(
            self.listen(shared.getHost().port, self.factory(), reusePort=False), CannotListenError
        )

    @inlineCallbacks
    def test_addressInUse(self):
        """
        A bind error fails the listen with L{CannotListenError}.
        """
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        endpoint = ReusePortEndpoint(reactor, holder.getsockname()[1], "127.0.0.1")
        failure = yield self.assertFailure(endpoint.listen(self.factory()), CannotListenError)
        self.assertEqual(failure.port, holder.getsockname()[1])
