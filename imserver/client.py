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

import collections
import random
import uuid

from twisted.application.internet import ClientService
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from imserver import __version__, methods
from imserver.errors import RemoteError, RequestTimeout
from imserver.observe import OneShot
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
        self._closed = OneShot()

    #: Called with this protocol once connected, if set.
    onConnected = None
    #: Called with this protocol as soon as the connection is lost, before
    #: outstanding requests fail, if set.
    onDisconnected = None

    def connectionMade(self):
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

    def authenticate(self, uid, token, deviceId, platform=pb.DESKTOP, lastSeq=0, timeout=None):
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
        (no retries here; see L{IMClient} for those).

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


#: Error codes after which a send is given up (the request itself is wrong).
_FINAL_SEND_ERRORS = frozenset(
    [pb.BAD_REQUEST, pb.MESSAGE_TOO_LARGE, pb.UNKNOWN_METHOD, pb.NOT_MEMBER]
)
#: Error codes after which reconnecting is pointless.
_FINAL_AUTH_ERRORS = frozenset([pb.AUTH_FAILED, pb.BAD_REQUEST])


def fullJitterBackoff(initialDelay=0.5, maxDelay=30.0, rng=random):
    """
    A L{ClientService} retry policy: capped exponential backoff with full
    jitter, uniform in C{[0, min(maxDelay, initialDelay * 2**attempt)]}, so
    a crowd of clients dropped at once does not come back at once.
    """

    def policy(attempt):
        return rng.uniform(0, min(maxDelay, initialDelay * 2 ** min(attempt, 32)))

    return policy


class IMClient:
    """
    A client session that survives disconnects.

    It reconnects by itself (capped exponential backoff with full jitter),
    re-authenticates with the last inbox seq it has handed to the
    application so the server resumes right after it, hands every message
    to C{onMessage} once (duplicates are recognised by seq and dropped),
    acknowledges it after C{onMessage} returns (unless C{autoAck} is
    false: then call L{ack}), and re-sends unanswered messages with the same
    C{client_msg_id} after a reconnect, so a message is stored once however
    often it is sent.

    It stops reconnecting when the token is refused or the session is
    kicked; L{whenStopped} fires then, with the reason.

    @ivar lastSeq: the highest inbox seq handed to the application.
    @ivar protocol: the current authenticated L{ClientProtocol}, or L{None}.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        host,
        port,
        uid,
        token,
        deviceId,
        onMessage=None,
        onNotify=None,
        lastSeq=0,
        autoAck=True,
        platform=pb.DESKTOP,
        tls=True,
        caFile=None,
        trustRoot=None,
        hostname=None,
        requestTimeout=10.0,
        retryPolicy=None,
        endpoint=None,
        maxSendAge=3600.0,
    ):
        """
        @param token: the token, or a callable returning it (or a Deferred
            of it), asked again before each connection.
        @param onMessage: called with each new L{pb.InboxEntry}, in seq
            order, once.
        @param onNotify: called as C{onNotify(name, message)} for other
            notifications (C{typing}, C{kicked}).
        @param endpoint: a client endpoint to use instead of C{host}/C{port}
            (tests).
        @param maxSendAge: seconds a send is retried before it fails with
            L{RequestTimeout}; keep it well below the server's dedup window
            (24 h by default), past which a retry would store a copy.
        """
        self.clock = reactor
        self.uid = uid
        self.deviceId = deviceId
        self.platform = platform
        self.onMessage = onMessage
        self.onNotify = onNotify
        self.lastSeq = lastSeq
        self.autoAck = autoAck
        self.requestTimeout = requestTimeout
        self.maxSendAge = maxSendAge
        self.protocol = None
        self.stopReason = None
        self._token = token
        self._pending = collections.OrderedDict()
        # clientMsgId -> IDelayedCall of a retransmission on this connection
        self._retransmits = {}
        self._stopped = OneShot()
        self._nextConnection = OneShot()
        if endpoint is None:
            endpoint = clientEndpoint(
                reactor, host, port, tls, caFile, trustRoot, hostname, requestTimeout
            )
        policy = retryPolicy or fullJitterBackoff()
        self._authFailures = 0
        self._service = ClientService(
            endpoint,
            _ProtocolFactory(self),
            # ClientService counts failed connections only; refused auths
            # (UNAVAILABLE, TOO_MANY_DEVICES, ...) back off too.
            retryPolicy=lambda attempt: policy(attempt + self._authFailures),
            clock=reactor,
        )

    # -- life ---------------------------------------------------------------

    def start(self):
        """
        Start connecting (and keep connected).
        """
        self._service.startService()

    def stop(self):
        """
        Disconnect and stop reconnecting.  Unanswered sends stay pending
        (their Deferreds do not fire) until L{start} is called again.

        @return: a L{Deferred} firing when disconnected.
        """
        retransmits, self._retransmits = self._retransmits, {}
        for call in retransmits.values():
            if call.active():
                call.cancel()
        return self._service.stopService()

    def whenConnected(self):
        """
        @return: a L{Deferred} firing with the L{ClientProtocol} once
            connected and authenticated.
        """
        if self.protocol is not None:
            return succeed(self.protocol)
        return self._nextConnection.when()

    def whenStopped(self):
        """
        @return: a L{Deferred} firing with the reason when this client gives
            up by itself (token refused, kicked).
        """
        return self._stopped.when()

    def _giveUp(self, reason):
        if self.stopReason is not None:
            return
        self.stopReason = reason
        self.log.warn(
            "{uid}/{device} stops reconnecting: {reason}",
            uid=self.uid,
            device=self.deviceId,
            reason=reason,
        )
        self._service.stopService()
        self._stopped.fire(reason)

    def _connected(self, protocol):
        """
        A new connection is up: authenticate on it.  A refusal that another
        attempt cannot cure stops the service (from its connected state, so
        it closes the connection itself); anything else drops the connection
        and the retry policy reconnects.
        """
        token = self._token() if callable(self._token) else self._token
        d = maybeDeferred(lambda: token)
        d.addCallback(
            lambda token: protocol.authenticate(
                self.uid, token, self.deviceId, self.platform, self.lastSeq
            )
        )
        d.addCallbacks(self._authenticated, self._authFailed, (protocol,), None, (protocol,))

    def _authenticated(self, response, protocol):
        if response.head_seq < self.lastSeq:
            # The server's inbox is behind what we have seen (it lost or
            # restored data): follow it, or its new entries would look like
            # duplicates.
            self.log.warn(
                "server inbox head {head} is below our last seq {last}; following it",
                head=response.head_seq,
                last=self.lastSeq,
            )
            self.lastSeq = response.head_seq
        self.protocol = protocol
        self._authFailures = 0
        for clientMsgId in list(self._pending):
            self._transmit(clientMsgId)
        connected, self._nextConnection = self._nextConnection, OneShot()
        connected.fire(protocol)

    def _authFailed(self, failure, protocol):
        if failure.check(RemoteError) and failure.value.code in _FINAL_AUTH_ERRORS:
            self._giveUp(failure.value)
        elif protocol.connected:
            self._authFailures += 1
            self.log.info("auth failed ({why}); reconnecting", why=failure.getErrorMessage())
            protocol.transport.abortConnection()

    def _connectionLost(self, protocol):
        if protocol is self.protocol:
            self.protocol = None
        if protocol.kicked is not None:
            self._giveUp(protocol.kicked)

    # -- messages -------------------------------------------------------------

    def send(self, to, body, contentType="", clientMsgId=None, groupId=""):
        """
        Send a message to C{to}, or with C{to=""} to the group C{groupId};
        retried with the same C{client_msg_id} until the server answers.

        @return: a L{Deferred} firing with the L{pb.SendResponse}, or
            failing with L{RemoteError} if the server refuses the message
            itself (C{BAD_REQUEST}, C{MESSAGE_TOO_LARGE}, C{NOT_MEMBER}), or with
            L{RequestTimeout} if it is not answered within C{maxSendAge}
            (connected or not).
        """
        clientMsgId = clientMsgId or uuid.uuid4().hex
        request = pb.SendRequest(
            to=to,
            group_id=groupId,
            client_msg_id=clientMsgId,
            body=body,
            content_type=contentType,
        )
        pending = self._pending[clientMsgId] = _PendingSend(
            request, self.clock.callLater(self.maxSendAge, self._expire, clientMsgId)
        )
        if self.protocol is not None:
            self._transmit(clientMsgId)
        return pending.result

    def _expire(self, clientMsgId):
        pending = self._pending.pop(clientMsgId, None)
        if pending is not None:
            pending.result.errback(
                RequestTimeout(
                    "message {} not answered within {} s".format(clientMsgId, self.maxSendAge)
                )
            )

    def _transmit(self, clientMsgId):
        protocol = self.protocol
        protocol.callRemote(
            methods.SEND, self._pending[clientMsgId].request, self.requestTimeout
        ).addCallbacks(self._sent, self._sendFailed, (clientMsgId,), None, (clientMsgId, protocol))

    def _sent(self, response, clientMsgId):
        pending = self._pending.pop(clientMsgId, None)
        if pending is not None:
            pending.expiry.cancel()
            pending.result.callback(response)

    def _sendFailed(self, failure, clientMsgId, protocol):
        pending = self._pending.get(clientMsgId)
        if pending is None:
            return
        if failure.check(RemoteError) and failure.value.code in _FINAL_SEND_ERRORS:
            del self._pending[clientMsgId]
            pending.expiry.cancel()
            pending.result.errback(failure)
            return
        if failure.check(RemoteError, RequestTimeout) and protocol is self.protocol:
            # UNAVAILABLE, INTERNAL or no answer yet: try again shortly on
            # this connection; the client_msg_id makes it safe.
            self._retransmits[clientMsgId] = self.clock.callLater(
                1.0, self._retransmit, clientMsgId, protocol
            )
        # Connection gone: re-sent after the next auth.

    def _retransmit(self, clientMsgId, protocol):
        self._retransmits.pop(clientMsgId, None)
        if clientMsgId in self._pending and protocol is self.protocol:
            self._transmit(clientMsgId)

    def pendingCount(self):
        """
        @return: how many sends await an answer.
        """
        return len(self._pending)

    def ack(self, seq=None):
        """
        Acknowledge every entry up to C{seq} (default: L{lastSeq}).
        """
        if self.protocol is not None:
            self.protocol.ack(self.lastSeq if seq is None else seq)

    def sendTyping(self, to, active=True, groupId=""):
        """
        Tell C{to}, or with C{to=""} the other members of C{groupId}, that
        this user is typing (C{active}) or stopped, on the current
        connection.  Best effort: never queued, and limited by the server
        (docs/protocol.md, section 7.4, C{typing}).

        @return: whether it was sent (L{False} while not connected).
        """
        protocol = self.protocol
        if protocol is None or not protocol.connected:
            return False
        protocol.sendTyping(to, active, groupId)
        return True

    def _notified(self, protocol, name, message):
        if name == methods.MESSAGE.name:
            if message.seq <= self.lastSeq:
                # Seen before: ack again (cumulative) so the window moves.
                if self.autoAck and protocol.connected:
                    protocol.ack(message.seq)
                return
            self.lastSeq = message.seq
            if self.onMessage is not None:
                self.onMessage(message)
            if self.autoAck and protocol.connected:
                protocol.ack(message.seq)
        elif self.onNotify is not None:
            self.onNotify(name, message)


class _PendingSend:
    """
    A send awaiting its answer: the request (re-sent as is), the
    L{Deferred} the caller holds, and the L{maxSendAge} timer.
    """

    __slots__ = ("request", "result", "expiry")

    def __init__(self, request, expiry):
        self.request = request
        self.result = Deferred()
        self.expiry = expiry


class _ProtocolFactory(Factory):
    """
    Builds a L{ClientProtocol} per connection for an L{IMClient}.
    """

    noisy = False

    def __init__(self, client):
        self.client = client

    def buildProtocol(self, addr):
        client = self.client
        protocol = ClientProtocol(client.clock, requestTimeout=client.requestTimeout)
        protocol.onNotify = lambda name, message: client._notified(protocol, name, message)
        protocol.onDisconnected = client._connectionLost
        protocol.onConnected = client._connected
        return protocol
