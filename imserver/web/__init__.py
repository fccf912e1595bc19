# -*- test-case-name: tests.test_websocket -*-
"""
The gate's web listener (C{--web}): the WebSocket endpoint for browsers at
C{/ws} (L{imserver.web.websocket}), the chat page at C{/} and the
JavaScript client at C{/imserver.js}, served by C{twisted.web}.

It is a client-facing listener like C{--listen}, never the HTTP API (which
keeps its own port and bearer token).  What a browser-facing endpoint needs
on top of the gate's own limits:

  - admission at accept, before TLS and before any HTTP is read: the
    gate's C{max_connections}, C{max_connections_per_ip} and
    C{accept_rate}, counting the connections still in HTTP as well as the
    gate sessions (L{WebSite.refusal});
  - a bound on the HTTP part: C{web_request_timeout} from accept to the
    upgrade (or for plain page requests, the connection's whole life), and
    C{web_max_request_size} bytes of request line and headers;
  - the C{Origin} allow-list (L{imserver.web.websocket.OriginPolicy});
  - no token in a URL: auth is the first frame, as over TCP.
"""

from importlib import resources

from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import ProtocolWrapper
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import Data
from zope.interface import implementer

from imserver.limits import peerHost
from imserver.transport import noDelay
from imserver.web.websocket import GateWebSocketFactory, OriginPolicy

#: The files of the chat page and the JavaScript client, by URL path, with
#: their media types (package data in imserver/web/static).
STATIC_FILES = {
    b"": ("index.html", "text/html; charset=utf-8"),
    b"index.html": ("index.html", "text/html; charset=utf-8"),
    b"imserver.js": ("imserver.js", "text/javascript; charset=utf-8"),
    b"chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    b"chat.css": ("chat.css", "text/css; charset=utf-8"),
}

#: Headers of every page response: nothing from elsewhere, no framing by
#: other sites, no guessing of types.
_SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-cache",
}

#: The WebSocket refusal reasons counted in the metrics.
WEB_REFUSAL_REASONS = ("origin", "subprotocol", "not_websocket")


def staticFile(name):
    """
    The bytes of file C{name} of imserver/web/static.
    """
    return resources.files("imserver.web").joinpath("static", name).read_bytes()


class StaticPage(Data):
    """
    One file of the page, with the security headers.
    """

    def render_GET(self, request):
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return Data.render_GET(self, request)


@implementer(IResource)
class WebSocketUpgrade:
    """
    C{/ws}: hands the HTTP connection of an upgrade request over to a
    L{imserver.web.websocket.GateWebSocketProtocol}, which answers the
    handshake (as autobahn's C{WebSocketResource}, plus what a bounded
    listener needs: the HTTP deadline cancelled and the connection counted
    as the gate's from then on).
    """

    isLeaf = True

    def __init__(self, factory, site):
        self.factory = factory
        self.site = site

    def getChildWithDefault(self, name, request):
        return self

    def putChild(self, path, child):
        raise NotImplementedError("/ws has no children")

    def render(self, request):
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"no such resource\n"
        if request.clientproto != b"HTTP/1.1":
            request.setResponseCode(400)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"a WebSocket upgrade is an HTTP/1.1 request\n"
        channel = request.channel
        transport = channel.transport
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if transport is None or upgrade != b"websocket":
            self.site.refused("not_websocket")
            request.setResponseCode(426)
            request.setHeader(b"Upgrade", b"websocket")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"a WebSocket endpoint: open it with a WebSocket client\n"
        protocol = self.factory.buildProtocol(channel.acceptedFrom)
        channel.upgraded()
        channel.transport = None
        # The HTTP channel was the transport's producer, and paused it while
        # the request was served.
        transport.unregisterProducer()
        if isinstance(transport, ProtocolWrapper):  # TLS, PROXY header
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        IPushProducer(transport).resumeProducing()
        # The request again, for autobahn's handshake (twisted.web already
        # bounded and parsed it).
        lines = [request.method + b" " + request.uri + b" HTTP/1.1"]
        for name, values in request.requestHeaders.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")
        return NOT_DONE_YET


class BoundedHTTPChannel(http.HTTPChannel):
    """
    An HTTP connection of the web listener: at most C{web_request_timeout}
    seconds from accept (a page's requests, or until its WebSocket upgrade;
    a slow client cannot stretch it by trickling bytes) and at most
    C{web_max_request_size} bytes of request line and headers.
    """

    maxHeaders = 100
    _deadline = None
    _counted = False

    def connectionMade(self):
        site = self.site
        self.totalHeadersSize = site.settings.web_max_request_size
        http.HTTPChannel.connectionMade(self)
        noDelay(self.transport)
        self.acceptedFrom = self.transport.getPeer()
        site.httpOpened(self)
        self._counted = True
        self._deadline = site.clock.callLater(site.settings.web_request_timeout, self._expired)

    def _expired(self):
        self._deadline = None
        if self.transport is not None:
            self.transport.abortConnection()

    def upgraded(self):
        """
        The connection is a WebSocket now: no longer HTTP.
        """
        self.setTimeout(None)
        self._stop()

    def _stop(self):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self._counted:
            self._counted = False
            self.site.httpClosed(self)

    def connectionLost(self, reason):
        self._stop()
        http.HTTPChannel.connectionLost(self, reason)


class WebSite(Site):
    """
    The web listener's site: the page, the JavaScript client and the
    WebSocket endpoint; admission over the gate's and its own connections.

    @ivar gate: the L{imserver.protocol.GateFactory}.
    @ivar http: the L{BoundedHTTPChannel}s not upgraded yet.
    """

    protocol = BoundedHTTPChannel  # type: ignore[assignment]  # HTTP/1.1 only
    noisy = False

    def __init__(self, gate, origins, clock):
        self.gate = gate
        self.settings = gate.settings
        self.clock = clock
        self.http = set()
        self._perHost = {}
        self.refusedUpgrades = dict.fromkeys(WEB_REFUSAL_REASONS, 0)
        gate.metrics.watchWeb(self)
        root = Resource()
        for path, (name, mediaType) in STATIC_FILES.items():
            root.putChild(path, StaticPage(staticFile(name), mediaType))
        self.websocket = GateWebSocketFactory(gate, origins, self.refused)
        root.putChild(b"ws", WebSocketUpgrade(self.websocket, self))
        Site.__init__(self, root, reactor=clock)
        self.timeOut = self.settings.web_request_timeout

    @property
    def metrics(self):
        return self.gate.metrics

    def log(self, request):
        # No access log: page loads are noise in the gate's log, and the
        # sessions log what matters (connection, auth, close).
        pass

    def refused(self, reason):
        self.refusedUpgrades[reason] += 1

    def refusal(self, host):
        """
        Whether a new connection from C{host} is refused, and why (see
        L{imserver.protocol.GateFactory.refusal}): connections still in
        HTTP count as the gate's.
        """
        return self.gate.refusal(host, len(self.http), self._perHost.get(host, 0))

    def httpOpened(self, channel):
        self.http.add(channel)
        host = peerHost(channel.acceptedFrom)
        self._perHost[host] = self._perHost.get(host, 0) + 1

    def httpClosed(self, channel):
        self.http.discard(channel)
        host = peerHost(channel.acceptedFrom)
        left = self._perHost.get(host, 1) - 1
        if left:
            self._perHost[host] = left
        else:
            self._perHost.pop(host, None)


def makeWebSite(gate, origins=(), allowLoopback=True, clock=None):
    """
    The site of a C{--web} listener.

    @param origins: origins allowed beside the page's own and loopback (see
        L{OriginPolicy}).
    """
    return WebSite(gate, OriginPolicy(origins, allowLoopback), clock or gate.clock)
