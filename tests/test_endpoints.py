"""
Tests for L{imserver.endpoints}: descriptions with a C{haproxy:} wrapper, and
the client address a gate sees through it.

The plain C{tcp:} and C{ssl:} cases are in L{tests.test_tls}.
"""

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from imserver.endpoints import listenEndpoint, splitDescription
from imserver.framing import encodeFrame
from imserver.pb import im_pb2 as pb
from imserver.protocol import NEW

from tests.test_framing import readFrames
from tests.test_protocol import GateHarness

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
            self.assertRaises(
                ValueError, listenEndpoint, self.reactor, description, None, 4096
            )


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
            uid="alice", device_id="phone",
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
        listenEndpoint(reactor, "haproxy:unix:/run/gate.sock", None, 4096).listen(
            self.gate.factory
        )
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
