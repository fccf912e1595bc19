# -*- test-case-name: tests.test_endpoints,tests.test_tls -*-
"""
Listening endpoints from Twisted endpoint strings, with the gate's defaults.

Any string L{serverFromString} understands works (C{tcp:}, C{tcp6:},
C{unix:}, C{systemd:}, C{haproxy:...}).  Three things differ from plain
Twisted:

  - C{ssl:} endpoints always get the hardened TLS profile of
    L{imserver.tls}; C{privateKey=}/C{certKey=}/C{extraCertChain=} name PEM
    files as in Twisted, and default to the server's configured certificate.
    An C{ssl:} inside a wrapper (C{haproxy:ssl:...}) is refused.
  - C{backlog} defaults to the C{listen_backlog} setting (4096) instead of
    Twisted's 50, which overflows under reconnect bursts; also for the
    endpoint a C{haproxy:} wrapper listens with (C{haproxy:tcp:...},
    C{haproxy:unix:...}).
  - Endpoint types, the wrapped ones included, match in any case.
  - C{tcp:}, C{tcp6:} and C{ssl:} (also inside C{haproxy:}) take
    C{reusePort=yes}: the socket is bound with C{SO_REUSEPORT}, so several
    gate processes of one host can listen on one port and the kernel
    spreads new connections over them (L{ReusePortEndpoint}).
"""

import socket

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imserver import tls
from imserver.limits import AdmissionFactory
from imserver.transport import batchedListening

_BACKLOG_TYPES = frozenset(["tcp", "tcp6", "unix", "ssl"])
#: Types whose remaining arguments describe the endpoint they wrap.
_WRAPPER_TYPES = frozenset(["haproxy"])
_SSL_KEYWORDS = frozenset(
    ["port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"]
)
#: The keyword that asks for C{SO_REUSEPORT}, and the types that take it.
REUSE_PORT = "reusePort"
_REUSE_PORT_TYPES = frozenset(["tcp", "tcp6", "ssl"])
_TCP_KEYWORDS = frozenset(["port", "interface", "backlog"])
_TRUE = frozenset(["yes", "true", "1"])
_FALSE = frozenset(["no", "false", "0"])


def _rawParts(description):
    """
    Split C{description} on its unescaped colons, keeping the escapes.

    @rtype: L{list} of L{str}
    @raise ValueError: if the description ends with a lone backslash.
    """
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if escaped:
        raise ValueError("endpoint description ends with a backslash")
    parts.append("".join(current))
    return parts


def _unescapePart(raw):
    """
    @param raw: one part of L{_rawParts}.
    @return: C{(text, eq)}: the part without its escapes, and the index in
        C{text} of its first unescaped C{=} (L{None} if it has none).
    """
    text, eq, escaped = [], None, False
    for ch in raw:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
            continue
        elif ch == "=" and eq is None:
            eq = len(text)
        text.append(ch)
    return "".join(text), eq


def _parseParts(parts):
    """
    Positional and keyword arguments of raw parts, with Twisted's rules: the
    first unescaped C{=} of a part after the first names it.

    @return: C{(args, kwargs, positions)}: C{positions[i]} is the index in
        C{parts} of C{args[i]}.
    """
    args, kwargs, positions = [], {}, []
    for index, part in enumerate(parts):
        text, eq = _unescapePart(part)
        if index and eq is not None:
            kwargs[text[:eq]] = text[eq + 1 :]
        else:
            args.append(text)
            positions.append(index)
    return args, kwargs, positions


def splitDescription(description):
    """
    Split an endpoint description into positional and keyword arguments,
    with Twisted's rules: C{:} separates, C{=} names, C{\\} escapes.

    @rtype: C{(list, dict)}
    @raise ValueError: if the description ends with a lone backslash.
    """
    args, kwargs, _ = _parseParts(_rawParts(description))
    return args, kwargs


def listenEndpoint(reactor, description, certificate, backlog):
    """
    Make a server endpoint from C{description}.

    @param reactor: the reactor to listen with.
    @param description: a Twisted endpoint string.
    @param certificate: C{(certPath, keyPath)} L{FilePath}s used by C{ssl:}
        endpoints that name none, or L{None} if there is no default.
    @param backlog: listen backlog for endpoints that do not set one,
        wrapped ones included.
    @rtype: L{IStreamServerEndpoint}
    @raise ValueError: if the description is invalid.
    """
    parts = _rawParts(description)
    args, kwargs, positions = _parseParts(parts)
    # The endpoints listen through it: TCP connections write once per
    # reactor pass (imserver.transport.BatchedServer); the gate's own
    # layers (TLS, admission) keep the reactor itself.
    listening = batchedListening(reactor)
    if "ssl" in (a.lower() for a in args[1:]):
        raise ValueError(
            "ssl: inside another endpoint type is not supported; terminate TLS "
            "in the proxy and use haproxy:tcp:..., or listen on ssl: directly"
        )
    # A wrapper passes the rest of the description (keywords included, in
    # any position) to the endpoint it wraps: the backlog of
    # haproxy:tcp:7000 is tcp's.
    depth = 0
    while args[depth].lower() in _WRAPPER_TYPES:
        if depth + 1 == len(args):
            raise ValueError(
                "{}: needs an endpoint to wrap, as in haproxy:tcp:7000".format(args[depth].lower())
            )
        depth += 1
    kind = args[depth].lower()
    reusePort = _reusePort(parts, kwargs, kind)
    if kind == "ssl":
        return _sslEndpoint(reactor, args[1:], kwargs, certificate, backlog, reusePort, listening)
    if reusePort:
        endpoint = _reusePortEndpoint(listening, kind, args[depth + 1 :], kwargs, backlog)
        if depth:
            endpoint = proxyEndpoint(endpoint)
        return GateEndpoint(endpoint, reactor, perPeer=depth == 0)
    # Twisted matches built-in types case-sensitively and plugins
    # case-insensitively; we accept any case for all.
    for index in positions[: depth + 1]:
        parts[index] = parts[index].lower()
    if kind in _BACKLOG_TYPES and "backlog" not in kwargs:
        parts.append("backlog={}".format(backlog))
    try:
        endpoint = serverFromString(listening, ":".join(parts))
    except TypeError as e:
        # A parser called with a missing or an unknown argument.
        raise ValueError(str(e))
    # Behind a PROXY-protocol wrapper the accepted peer is the proxy.
    return GateEndpoint(endpoint, reactor, perPeer=depth == 0)


def _reusePort(parts, kwargs, kind):
    """
    Take the C{reusePort=} keyword out of C{parts} and C{kwargs}.

    @return: whether it asks for C{SO_REUSEPORT}.
    @raise ValueError: if its value is not a boolean, the endpoint type
        does not take it, or the platform has no C{SO_REUSEPORT}.
    """
    if REUSE_PORT not in kwargs:
        return False
    if kind not in _REUSE_PORT_TYPES:
        raise ValueError("reusePort= goes with tcp:, tcp6: and ssl: listeners")
    value = kwargs.pop(REUSE_PORT).lower()
    parts[:] = [parts[0]] + [part for part in parts[1:] if _keyword(part) != REUSE_PORT]
    if value not in _TRUE | _FALSE:
        raise ValueError("reusePort= is yes or no, not {!r}".format(value))
    if value in _FALSE:
        return False
    if getattr(socket, "SO_REUSEPORT", None) is None:
        raise ValueError("reusePort=: this platform has no SO_REUSEPORT")
    return True


def _keyword(part):
    """
    The keyword a raw part names, or L{None} for a positional one.
    """
    text, eq = _unescapePart(part)
    return None if eq is None else text[:eq]


def _reusePortEndpoint(reactor, kind, args, kwargs, backlog):
    """
    The L{ReusePortEndpoint} of a C{tcp:} or C{tcp6:} description.
    """
    unknown = set(kwargs) - _TCP_KEYWORDS
    if unknown:
        raise ValueError(
            "unsupported {}: option(s) with reusePort=: {}".format(kind, ", ".join(sorted(unknown)))
        )
    if args:
        if "port" in kwargs or len(args) > 1:
            raise ValueError("{}: takes one port".format(kind))
        kwargs["port"] = args[0]
    if "port" not in kwargs:
        raise ValueError("{}: needs a port".format(kind))
    interface = kwargs.get("interface", "::" if kind == "tcp6" else "")
    if kind == "tcp6" and not isIPv6Address(interface):
        raise ValueError("tcp6: needs an IPv6 interface, not {!r}".format(interface))
    return ReusePortEndpoint(
        reactor, int(kwargs["port"]), interface, int(kwargs.get("backlog", backlog))
    )


def _sslEndpoint(reactor, args, kwargs, certificate, backlog, reusePort=False, listening=None):
    unknown = set(kwargs) - _SSL_KEYWORDS
    if unknown:
        raise ValueError("unsupported ssl: option(s) {}".format(", ".join(sorted(unknown))))
    if args:
        if "port" in kwargs or len(args) > 1:
            raise ValueError("ssl: takes one port")
        kwargs["port"] = args[0]
    if "port" not in kwargs:
        raise ValueError("ssl: needs a port")
    keyFile = kwargs.get("privateKey")
    certFile = kwargs.get("certKey", keyFile)
    if certFile is None:
        if certificate is None:
            raise ValueError("ssl: needs certKey= and privateKey=")
        certPath, keyPath = certificate
    else:
        certPath = FilePath(certFile)
        keyPath = FilePath(keyFile if keyFile is not None else certFile)
    chain = kwargs.get("extraCertChain")
    options = tls.ReloadableServerOptions(certPath, keyPath, FilePath(chain) if chain else None)
    port, interface = int(kwargs["port"]), kwargs.get("interface", "")
    backlog = int(kwargs.get("backlog", backlog))
    if listening is None:
        listening = reactor
    if reusePort:
        endpoint = ReusePortEndpoint(listening, port, interface, backlog)
    else:
        endpoint = TCP4ServerEndpoint(listening, port, backlog=backlog, interface=interface)
    return GateEndpoint(endpoint, reactor, tlsOptions=options)


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP listener whose socket gets C{SO_REUSEPORT} before it is bound
    (C{reusePort=yes}): processes of one user may then listen on the same
    address and port at once, and the kernel spreads new connections over
    their sockets (Linux: by a hash of each connection's addresses and
    ports).  Twisted's C{tcp:} endpoint has no such option, so this one
    makes, binds and listens on the socket itself and hands it to the
    reactor (C{IReactorSocket.adoptStreamPort}); the result is an ordinary
    Twisted TCP port.

    @ivar port: the port number (0: one the system picks).
    @ivar interface: the address to bind, C{""} for every IPv4 address; an
        IPv6 address makes an IPv6 socket.
    @ivar backlog: the listen queue length.
    """

    def __init__(self, reactor, port, interface="", backlog=50):
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory):
        """
        @return: a L{Deferred} firing with the L{IListeningPort}, or failing
            with L{CannotListenError}.
        """
        family = socket.AF_INET6 if isIPv6Address(self.interface) else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            return fail(CannotListenError(self.interface, self.port, e))
        try:
            # As Twisted's own TCP ports do on POSIX, then the one we add.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            # The reactor's port uses a duplicate of the descriptor.
            return succeed(self.reactor.adoptStreamPort(sock.fileno(), family, protocolFactory))
        except OSError as e:
            return fail(CannotListenError(self.interface, self.port, e))
        finally:
            sock.close()


@implementer(IStreamServerEndpoint)
class GateEndpoint:
    """
    A listening endpoint that puts the gate's own layers around the factory
    it listens with: TLS (for C{ssl:}, the hardened options of
    L{imserver.tls}) and, outside it, admission
    (L{imserver.limits.AdmissionFactory}) for a factory with a
    C{refusal(host)} method (the gate's; not the HTTP API's), so a
    connection over the limits is closed at accept, before any TLS work.

    @ivar endpoint: the endpoint that listens (C{tcp:}, C{haproxy:...}).
    @ivar tlsOptions: the L{tls.ReloadableServerOptions}, or L{None} for no
        TLS.
    @ivar perPeer: whether the accepted peer is the client (so the
        per-address limit applies).
    """

    def __init__(self, endpoint, reactor, tlsOptions=None, perPeer=True):
        self.endpoint = endpoint
        self.reactor = reactor
        self.tlsOptions = tlsOptions
        self.perPeer = perPeer

    def listen(self, factory):
        wrapped = factory
        if self.tlsOptions is not None:
            wrapped = TLSMemoryBIOFactory(self.tlsOptions, False, factory, clock=self.reactor)
        if getattr(factory, "refusal", None) is not None:
            wrapped = AdmissionFactory(factory, wrapped, self.perPeer)
        return self.endpoint.listen(wrapped)
