# -*- test-case-name: tests.test_client -*-
"""
The imserver client library.

    from imserver.client import connect

    client = yield connect(reactor, "chat.example.com", 7443,
                           uid="alice", token=token, deviceId="laptop",
                           caFile="ca.pem", onNotify=print)
    yield client.ping()
    yield client.close()

The connection is TLS with certificate and hostname verification
(service_identity) unless C{tls=False} is asked for explicitly.  After auth
the client sends a C{ping} whenever it has sent nothing for the heartbeat
interval the server gave it, and drops the connection when a ping is not
answered within that interval.
"""

from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from imserver import __version__, methods
from imserver.errors import RequestTimeout
from imserver.pb import im_pb2 as pb
from imserver.rpc import RPCProtocol


class ClientProtocol(RPCProtocol):
    """
    The client side of one connection.

    @ivar session: the L{pb.AuthResponse} once authenticated, else L{None}.
    @ivar kicked: the L{pb.Kicked} notify if the server kicked this session.
    @ivar onNotify: called as C{onNotify(name, message)} for every
        notification from the server, or L{None}.
    """

    log = Logger()

    def __init__(self, clock, onNotify=None, requestTimeout=10.0):
        RPCProtocol.__init__(self, clock)
        self.onNotify = onNotify
        self.requestTimeout = requestTimeout
        self.session = None
        self.kicked = None
        self.heartbeatInterval = None
        self._seconds = clock.seconds
        self._lastSent = 0.0
        self._heartbeat = None
        self._closedWaiters = []
        self._lostReason = None

    def connectionMade(self):
        self._lastSent = self._seconds()

    def sendFrame(self, frame):
        RPCProtocol.sendFrame(self, frame)
        self._lastSent = self._seconds()

    # -- requests -----------------------------------------------------------

    def call(self, method, request, timeout=None):
        """
        Call C{method} on the server.

        @param method: an L{imserver.rpc.Method}.
        @return: a L{Deferred} with the response message; see
            L{RPCProtocol.callRemote} for the failures.
        """
        return self.callRemote(method, request, timeout)

    def authenticate(self, uid, token, deviceId, platform=pb.DESKTOP, lastSeq=0,
                     timeout=None):
        """
        Send C{auth}; on success start heartbeating.

        @return: a L{Deferred} firing with the L{pb.AuthResponse}.
        """
        request = pb.AuthRequest(
            uid=uid,
            token=token,
            device_id=deviceId,
            platform=platform,
            last_seq=lastSeq,
            client_version="imserver.client/" + __version__,
        )
        return self.callRemote(methods.AUTH, request, timeout).addCallback(
            self._authenticated
        )

    def _authenticated(self, response):
        self.session = response
        self.heartbeatInterval = response.heartbeat_interval_ms / 1000.0
        if self.heartbeatInterval > 0:
            self._scheduleHeartbeat(self.heartbeatInterval)
        return response

    def ping(self, timeout=None):
        """
        @return: a L{Deferred} firing with the L{pb.PingResponse}.
        """
        return self.callRemote(methods.PING, pb.PingRequest(), timeout)

    # -- heartbeat ------------------------------------------------------------

    @methods.PING.responder
    def _pingReceived(self, request):
        return pb.PingResponse(server_time_ms=int(self._seconds() * 1000))

    def _scheduleHeartbeat(self, delay):
        self._heartbeat = self.clock.callLater(delay, self._beat)

    def _beat(self):
        self._heartbeat = None
        idle = self._seconds() - self._lastSent
        interval = self.heartbeatInterval
        if idle < interval:
            self._scheduleHeartbeat(interval - idle)
            return
        self.ping(timeout=interval).addErrback(self._pingFailed)
        self._scheduleHeartbeat(interval)

    def _pingFailed(self, failure):
        if failure.check(RequestTimeout) and self.connected:
            self.log.warn("server did not answer a ping in time; dropping the connection")
            self.transport.abortConnection()
        return None

    # -- notifications ------------------------------------------------------

    @methods.KICKED.handler
    def _kicked(self, message):
        self.kicked = message
        self.log.info(
            "kicked by the server: {reason} {detail}",
            reason=pb.KickReason.Name(message.reason)
            if message.reason in pb.KickReason.values()
            else message.reason,
            detail=message.message,
        )
        self._deliver(methods.KICKED.name, message)

    def _deliver(self, name, message):
        if self.onNotify is not None:
            self.onNotify(name, message)

    # -- closing --------------------------------------------------------------

    def close(self):
        """
        Close the connection.

        @return: a L{Deferred} firing when it is closed.
        """
        d = self.whenClosed()
        if self.connected:
            self.transport.loseConnection()
        return d

    def whenClosed(self):
        """
        @return: a L{Deferred} firing once the connection is closed, with
            the exception that closed it (L{ConnectionDone} for a clean
            close, L{imserver.errors.ConnectionClosedByPeer} after an ERROR
            frame).
        """
        if self._lostReason is not None:
            return succeed(self._lostReason)
        d = Deferred()
        self._closedWaiters.append(d)
        return d

    def connectionLost(self, reason):
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        RPCProtocol.connectionLost(self, reason)
        self._lostReason = self._peerError or reason.value
        waiters, self._closedWaiters = self._closedWaiters, []
        for d in waiters:
            d.callback(self._lostReason)


def clientEndpoint(reactor, host, port, tls=True, caFile=None, trustRoot=None,
                   hostname=None, timeout=10):
    """
    An endpoint to a gate.

    @param tls: L{False} for a plaintext C{tcp:} listener (loopback testing).
    @param caFile: path of PEM CA certificate(s) to trust instead of the
        platform's trust store (for a self-signed gate certificate, the
        certificate itself).
    @param trustRoot: an L{ssl.IOpenSSLTrustRoot}, instead of C{caFile}.
    @param hostname: the name to verify the certificate against (default:
        C{host}).
    """
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if not tls:
        return endpoint
    if trustRoot is None:
        if caFile is not None:
            trustRoot = ssl.Certificate.loadPEM(FilePath(caFile).getContent())
        else:
            trustRoot = ssl.platformTrust()
    options = ssl.optionsForClientTLS(hostname or host, trustRoot=trustRoot)
    return wrapClientTLS(options, endpoint)


def connect(reactor, host, port, uid, token, deviceId, platform=pb.DESKTOP,
            lastSeq=0, onNotify=None, tls=True, caFile=None, trustRoot=None,
            hostname=None, timeout=10.0):
    """
    Connect to a gate and authenticate.

    @return: a L{Deferred} firing with an authenticated L{ClientProtocol},
        or failing (TLS verification error, L{imserver.errors.RemoteError}
        with C{AUTH_FAILED}, timeout, ...), in which case the connection is
        closed.
    """
    endpoint = clientEndpoint(
        reactor, host, port, tls, caFile, trustRoot, hostname, timeout
    )
    protocol = ClientProtocol(reactor, onNotify, requestTimeout=timeout)
    d = connectProtocol(endpoint, protocol)

    def authenticate(protocol):
        return protocol.authenticate(uid, token, deviceId, platform, lastSeq).addCallbacks(
            lambda _: protocol, lambda f: _closeThenFail(protocol, f)
        )

    return d.addCallback(authenticate)


def _closeThenFail(protocol, failure):
    return protocol.close().addCallback(lambda _: failure)
