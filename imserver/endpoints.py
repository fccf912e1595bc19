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
"""

from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from zope.interface import implementer

from imserver import tls
from imserver.limits import AdmissionFactory

_BACKLOG_TYPES = frozenset(["tcp", "tcp6", "unix", "ssl"])
#: Types whose remaining arguments describe the endpoint they wrap.
_WRAPPER_TYPES = frozenset(["haproxy"])
_SSL_KEYWORDS = frozenset(
    ["port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"]
)


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
            kwargs[text[:eq]] = text[eq + 1:]
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
                "{}: needs an endpoint to wrap, as in haproxy:tcp:7000".format(
                    args[depth].lower())
            )
        depth += 1
    kind = args[depth].lower()
    if kind == "ssl":
        return _sslEndpoint(reactor, args[1:], kwargs, certificate, backlog)
    # Twisted matches built-in types case-sensitively and plugins
    # case-insensitively; we accept any case for all.
    for index in positions[:depth + 1]:
        parts[index] = parts[index].lower()
    if kind in _BACKLOG_TYPES and "backlog" not in kwargs:
        parts.append("backlog={}".format(backlog))
    try:
        endpoint = serverFromString(reactor, ":".join(parts))
    except TypeError as e:
        # A parser called with a missing or an unknown argument.
        raise ValueError(str(e))
    # Behind a PROXY-protocol wrapper the accepted peer is the proxy.
    return GateEndpoint(endpoint, reactor, perPeer=depth == 0)


def _sslEndpoint(reactor, args, kwargs, certificate, backlog):
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
    options = tls.ReloadableServerOptions(
        certPath, keyPath, FilePath(chain) if chain else None
    )
    endpoint = TCP4ServerEndpoint(
        reactor,
        int(kwargs["port"]),
        backlog=int(kwargs.get("backlog", backlog)),
        interface=kwargs.get("interface", ""),
    )
    return GateEndpoint(endpoint, reactor, tlsOptions=options)


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
