# -*- test-case-name: tests.test_imclient,tests.test_client -*-
"""
L{IMClient}: a client session that survives disconnects (pending sends,
resume from the last seq, acks, reconnection with backoff) over a
L{imserver.client.protocol.ClientProtocol} per connection.
"""

import collections
import random
import uuid

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from imserver import methods
from imserver.client.protocol import ClientProtocol, clientEndpoint
from imserver.errors import RemoteError, RequestTimeout
from imserver.observe import OneShot
from imserver.pb import im_pb2 as pb

#: Error codes after which a send is given up (the request itself is wrong).
_FINAL_SEND_ERRORS = frozenset(
    [pb.BAD_REQUEST, pb.MESSAGE_TOO_LARGE, pb.UNKNOWN_METHOD, pb.NOT_MEMBER, pb.REJECTED]
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
        ackEvery=None,
        ackDelay=0.05,
        noEcho=False,
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
        @param ackEvery: with C{autoAck}, acknowledge at once when this many
            entries are unacknowledged (default: a quarter of the push
            window the server announced at auth, at least 1); acks are
            cumulative, so one covers them all.
        @param ackDelay: with C{autoAck}, acknowledge what is left
            unacknowledged once no new entry came for this many seconds
            (0: acknowledge every entry at once, as before).
        @param noEcho: this client's own sends reach the application only
            as the results of L{send}, never through C{onMessage}: the
            server is asked not to push them back (C{no_echo}), and those it
            pushes all the same (its answer could not be the copy, or after
            a reconnect) are recognised, counted as received and acked, and
            not handed to C{onMessage}.  Other devices' messages of the
            same user still come through C{onMessage} (C{outgoing} true).
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
        self.ackEvery = ackEvery
        self.ackDelay = ackDelay
        self.noEcho = noEcho
        # With noEcho: seqs above lastSeq of sends this client was answered,
        # whose entries the server may still push (not handed on then).
        self._ownSeqs = set()
        # Entries handed to the application but not acknowledged on the
        # current connection, and the quiet-interval timer.
        self._unacked = 0
        self._ackCall = None
        self._ackThreshold = ackEvery or 1
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
        until L{start} is called again (which sends them), or until their
        C{maxSendAge} runs out (L{RequestTimeout}): their expiry timers go
        on running.

        @return: a L{Deferred} firing when disconnected.
        """
        self._flushAck()
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
                self.uid, token, self.deviceId, self.platform, self.lastSeq, noEcho=self.noEcho
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
        if self.ackEvery is None:
            self._ackThreshold = max(1, response.max_unacked // 4)
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
            # The next auth resumes after lastSeq: an ack not sent is not
            # needed there.
            self._cancelAck()
        if protocol.kicked is not None:
            self._giveUp(protocol.kicked)

    # -- messages -------------------------------------------------------------

    def send(self, to, body, contentType="", clientMsgId=None, groupId=""):
        """
        Send a message to C{to}, or with C{to=""} to the group C{groupId};
        retried with the same C{client_msg_id} until the server answers.

        @return: a L{Deferred} firing with the L{pb.SendResponse}, or
            failing with L{RemoteError} if the server refuses the message
            itself (C{BAD_REQUEST}, C{MESSAGE_TOO_LARGE}, C{NOT_MEMBER},
            C{REJECTED}: the app backend's before-send check), or with
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
        if self.noEcho and response.seq > self.lastSeq:
            if response.echo_skipped:
                # Every entry before it came first, on this connection: the
                # answer is the entry, received (and acked in its turn).
                self.lastSeq = response.seq
                self._forgetOwn()
                if self.protocol is not None:
                    self._entryHandled(self.protocol)
            else:
                self._ownSeqs.add(response.seq)
        pending = self._pending.pop(clientMsgId, None)
        if pending is not None:
            pending.expiry.cancel()
            pending.result.callback(response)

    def _forgetOwn(self):
        """
        Forget the own seqs at or below L{lastSeq}: passed.
        """
        if self._ownSeqs:
            self._ownSeqs = {seq for seq in self._ownSeqs if seq > self.lastSeq}

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
        self._cancelAck()
        if self.protocol is not None:
            self.protocol.ack(self.lastSeq if seq is None else seq)

    def _cancelAck(self):
        self._unacked = 0
        if self._ackCall is not None:
            if self._ackCall.active():
                self._ackCall.cancel()
            self._ackCall = None

    def _flushAck(self):
        """
        Send the coalesced ack now, if one is due.
        """
        if self._unacked:
            self.ack()

    def _entryHandled(self, protocol):
        """
        An entry was handed to the application (or was a duplicate): ack
        now if C{ackEvery} are waiting, else once the stream is quiet for
        C{ackDelay}.
        """
        if not (self.autoAck and protocol.connected and protocol is self.protocol):
            return
        self._unacked += 1
        if self._unacked >= self._ackThreshold or self.ackDelay <= 0:
            self.ack()
        elif self._ackCall is None:
            self._ackCall = self.clock.callLater(self.ackDelay, self._ackQuiet)
        else:
            self._ackCall.reset(self.ackDelay)

    def _ackQuiet(self):
        self._ackCall = None
        self._flushAck()

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
                # Seen before: acked again (cumulatively, with the next
                # ack) so the window moves.
                self._entryHandled(protocol)
                return
            self.lastSeq = message.seq
            if self.noEcho and self._isOwn(message):
                # Already the application's, as a send's result.
                self._forgetOwn()
            elif self.onMessage is not None:
                self.onMessage(message)
            self._entryHandled(protocol)
        elif self.onNotify is not None:
            self.onNotify(name, message)

    def _isOwn(self, entry):
        """
        Whether C{entry} is one of this client's sends: answered (its seq),
        or pushed before its answer (its C{client_msg_id} is pending).
        """
        return entry.outgoing and (
            entry.seq in self._ownSeqs or entry.message.client_msg_id in self._pending
        )


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
