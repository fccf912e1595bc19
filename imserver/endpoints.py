# -*- test-case-name: tests.test_endpoints -*-
"""
Listening endpoints from Twisted endpoint strings, with the gate's defaults.

Any string L{serverFromString} understands works (C{tcp:}, C{tcp6:},
C{unix:}, C{systemd:}, C{haproxy:...}).  Two things differ from plain
Twisted:

  - C{ssl:} endpoints always get the hardened TLS profile of
    L{imserver.tls}; C{privateKey=}/C{certKey=}/C{extraCertChain=} name PEM
    files as in Twisted, and default to the server's configured certificate.
  - C{backlog} defaults to the C{listen_backlog} setting (4096) instead of
    Twisted's 50, which overflows under reconnect bursts.
"""

from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.python.filepath import FilePath

from imserver import tls

_BACKLOG_TYPES = frozenset(["tcp", "tcp6", "unix", "ssl"])
_SSL_KEYWORDS = frozenset(
    ["port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"]
)


def splitDescription(description):
    """
    Split an endpoint description into positional and keyword arguments,
    with Twisted's rules: C{:} separates, C{=} names, C{\\} escapes.

    @rtype: C{(list, dict)}
    """
    args, kwargs = [], {}
    current, parts, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if escaped:
        raise ValueError("endpoint description ends with a backslash")
    parts.append("".join(current))
    for index, part in enumerate(parts):
        # Twisted only treats '=' as naming in arguments after the type.
        name, eq, value = part.partition("=")
        if index and eq:
            kwargs[name] = value
        else:
            args.append(part)
    return args, kwargs


def listenEndpoint(reactor, description, certificate, backlog):
    """
    Make a server endpoint from C{description}.

    @param reactor: the reactor to listen with.
    @param description: a Twisted endpoint string.
    @param certificate: C{(certPath, keyPath)} L{FilePath}s used by C{ssl:}
        endpoints that name none, or L{None} if there is no default.
    @param backlog: listen backlog for endpoints that do not set one.
    @rtype: L{IStreamServerEndpoint}
    @raise ValueError: if the description is invalid.
    """
    args, kwargs = splitDescription(description)
    kind = args[0].lower()
    if "ssl" in (a.lower() for a in args[1:]):
        raise ValueError(
            "ssl: inside another endpoint type is not supported; terminate TLS "
            "in the proxy and use haproxy:tcp:..., or listen on ssl: directly"
        )
    if kind == "ssl":
        return _sslEndpoint(reactor, args[1:], kwargs, certificate, backlog)
    # Twisted matches built-in types case-sensitively and plugins
    # case-insensitively; we accept any case for all.
    description = kind + description[len(args[0]):]
    if kind in _BACKLOG_TYPES and "backlog" not in kwargs:
        description += ":backlog={}".format(backlog)
    return serverFromString(reactor, description)


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
    options = tls.serverOptions(
        certPath.getContent(),
        keyPath.getContent(),
        FilePath(chain).getContent() if chain else None,
    )
    return SSL4ServerEndpoint(
        reactor,
        int(kwargs["port"]),
        options,
        backlog=int(kwargs.get("backlog", backlog)),
        interface=kwargs.get("interface", ""),
    )
