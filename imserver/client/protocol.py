# -*- test-case-name: tests.test_client -*-
"""
One connection to a gate: L{ClientProtocol} (auth, heartbeat, requests and
notifications), L{clientEndpoint} and L{connect}.

The connection is TLS with certificate and hostname verification
(service_identity) unless C{tls=False} is asked for explicitly.  After auth
the client sends a C{ping} whenever it has sent nothing for the heartbeat
interval the server gave it, and drops the connection when a ping is not
answered within that interval.
"""

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from imserver import __version__, methods
from imserver.errors import RequestTimeout
from imserver.observe import OneShot
from imserver.pb import im_pb2 as pb
from imserver.rpc import RPCProtocol
from imserver.transport import noDelay


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
        self._closed = OneShot()

    #: Called with this protocol once connected, if set.
    onConnected = None
    #: Called with this protocol as soon as the connection is lost, before
    #: outstanding requests fail, if set.
    onDisconnected = None

    def connectionMade(self):
        noDelay(self.transport)
        self._lastSent = self._seconds()
        if self.onConnected is not None:
            self.onConnected(self)

    def writeFrame(self, data):
        RPCProtocol.writeFrame(self, data)
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

    def authenticate(
        self, uid, token, deviceId, platform=pb.DESKTOP, lastSeq=0, timeout=None, noEcho=False
    ):
        """
        Send C{auth}; on success start heartbeating.

        @param noEcho: ask the server not to push this connection's own
            sends back to it when their answers can be its copies
            (C{AuthRequest.no_echo}, docs/protocol.md section 6.1).

        @return: a L{Deferred} firing with the L{pb.AuthResponse}.
        """
        request = pb.AuthRequest(
            uid=uid,
            token=token,
            device_id=deviceId,
            platform=platform,
            last_seq=lastSeq,
            client_version="imserver.client/" + __version__,
            no_echo=noEcho,
        )
        return self.callRemote(methods.AUTH, request, timeout).addCallback(self._authenticated)

    def _authenticated(self, response):
        self.session = response
        if response.max_frame_length:
            # The server's frames are bounded by its own limit.
            self.maxFrameLength = response.max_frame_length
        self.heartbeatInterval = response.heartbeat_interval_ms / 1000.0
        if self.heartbeatInterval > 0:
            self._scheduleHeartbeat(self.heartbeatInterval)
        return response

    def ping(self, timeout=None):
        """
        @return: a L{Deferred} firing with the L{pb.PingResponse}.
        """
        return self.callRemote(methods.PING, pb.PingRequest(), timeout)

    def send(self, to, body, clientMsgId, contentType="", timeout=None, groupId=""):
        """
        Send one message to C{to}, or with C{to=""} to the group C{groupId}
        (no retries here; see L{imserver.client.IMClient} for those).

        @return: a L{Deferred} firing with the L{pb.SendResponse} once the
            server has stored it.
        """
        request = pb.SendRequest(
            to=to,
            group_id=groupId,
            client_msg_id=clientMsgId,
            body=body,
            content_type=contentType,
        )
        return self.callRemote(methods.SEND, request, timeout)

    def groups(self, timeout=None):
        """
        @return: a L{Deferred} firing with the L{pb.Group}s this user is in.
        """
        return self.callRemote(methods.GROUPS, pb.GroupsRequest(), timeout).addCallback(
            lambda response: list(response.groups)
        )

    def members(self, groupId, timeout=None):
        """
        @return: a L{Deferred} firing with the L{pb.Member}s of a group this
            user is in (else failing with C{NOT_MEMBER}).
        """
        return self.callRemote(
            methods.MEMBERS, pb.MembersRequest(group_id=groupId), timeout
        ).addCallback(lambda response: list(response.members))

    def leave(self, groupId, timeout=None):
        """
        Leave a group.

        @return: a L{Deferred} firing with L{None}.
        """
        return self.callRemote(
            methods.LEAVE, pb.LeaveRequest(group_id=groupId), timeout
        ).addCallback(lambda response: None)

    def sync(self, afterSeq=0, limit=0, timeout=None):
        """
        @return: a L{Deferred} firing with a L{pb.SyncResponse}.
        """
        return self.callRemote(
            methods.SYNC, pb.SyncRequest(after_seq=afterSeq, limit=limit), timeout
        )

    def ack(self, seq):
        """
        Tell the server this device has every inbox entry up to C{seq}.
        """
        self.sendNotify(methods.ACK, pb.Ack(seq=seq))

    def sendTyping(self, to, active=True, groupId=""):
        """
        Tell C{to} (if online), or with C{to=""} the other members of
        C{groupId}, that this user is typing.
        """
        self.sendNotify(methods.TYPING, pb.Typing(uid=to, active=active, group_id=groupId))

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

    @methods.MESSAGE.handler
    def _message(self, entry):
        self._deliver(methods.MESSAGE.name, entry)

    @methods.TYPING.handler
    def _typing(self, typing):
        self._deliver(methods.TYPING.name, typing)

    @methods.NOTICE.handler
    def _notice(self, notice):
        self._deliver(methods.NOTICE.name, notice)

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
        return self._closed.when()

    def connectionLost(self, reason):
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self.onDisconnected is not None:
            self.onDisconnected(self)
        RPCProtocol.connectionLost(self, reason)
        self._closed.fire(self._peerError or reason.value)


def clientEndpoint(
    reactor, host, port, tls=True, caFile=None, trustRoot=None, hostname=None, timeout=10
):
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


def connect(
    reactor,
    host,
    port,
    uid,
    token,
    deviceId,
    platform=pb.DESKTOP,
    lastSeq=0,
    onNotify=None,
    tls=True,
    caFile=None,
    trustRoot=None,
    hostname=None,
    timeout=10.0,
):
    """
    Connect to a gate and authenticate.

    @return: a L{Deferred} firing with an authenticated L{ClientProtocol},
        or failing (TLS verification error, L{imserver.errors.RemoteError}
        with C{AUTH_FAILED}, timeout, ...), in which case the connection is
        closed.
    """
    endpoint = clientEndpoint(reactor, host, port, tls, caFile, trustRoot, hostname, timeout)
    protocol = ClientProtocol(reactor, onNotify, requestTimeout=timeout)
    d = connectProtocol(endpoint, protocol)

    def authenticate(protocol):
        return protocol.authenticate(uid, token, deviceId, platform, lastSeq).addCallbacks(
            lambda _: protocol, lambda f: _closeThenFail(protocol, f)
        )

    return d.addCallback(authenticate)


def _closeThenFail(protocol, failure):
    return protocol.close().addCallback(lambda _: failure)
