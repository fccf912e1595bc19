# -*- test-case-name: tests.test_protocol -*-
"""
The gate's session: one L{GateSession} per client connection, whatever
carries its frames (L{imserver.protocol.GateProtocol} over TCP, TLS and
PROXY-protocol listeners).

A connection moves through these states (docs/protocol.md draws them)::

    NEW --auth--> AUTHENTICATING --ok--> AUTHENTICATED
     |                 |  \\--fail--> closed (AUTH_FAILED / TOO_MANY_DEVICES)
     |                 v
     +--deadline--> closed (AUTH_TIMEOUT)

Before auth only the C{auth} method is accepted and frames are limited to
C{preauth_max_frame_length}.  Every connection, authenticated or not, is
swept for idleness by L{imserver.protocol.GateFactory.sweep}: there is no
per-connection timer on the idle path, only a timestamp written once per
read.
"""

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.logger import Logger
from zope.interface import implementer

from imserver import methods
from imserver.beforesend import SendOrder
from imserver.errors import (
    AlreadyAuthenticated,
    AuthFailed,
    BadRequest,
    NotAuthenticated,
    RateLimited,
    TooManyDevices,
    Unavailable,
)
from imserver.identifiers import validateDeviceId, validateGroupId, validateLength, validateUid
from imserver.interfaces import ISession
from imserver.limits import TokenBucket, peerHost
from imserver.paging import fitFrame, groupsPage, membersPage
from imserver.pb import im_pb2 as pb
from imserver.rpc import RPCDispatcher
from imserver.transport import socketTransport
from imserver.wire import ClosesWithError

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress, IDelayedCall
    from twisted.python.failure import Failure

    from imserver.protocol import GateFactory
    from imserver.rpc import Method, Notification
    from imserver.wire import EncodedMessage

NEW = "new"
AUTHENTICATING = "authenticating"
AUTHENTICATED = "authenticated"

_PLATFORMS = frozenset(pb.Platform.values())
#: Longest client_version of an auth request, in UTF-8 bytes.
MAX_CLIENT_VERSION = 64

#: Seconds before a session tries again to fetch its inbox after the store
#: was unavailable (the entries wait in the inbox meanwhile).
FETCH_RETRY_DELAY = 1.0

#: Methods accepted before auth has succeeded.
PREAUTH_METHODS = frozenset([methods.AUTH.name])


class Channel(Protocol):
    """
    What carries a L{GateSession}'s frames (L{imserver.protocol.GateProtocol}
    over TCP): the seam between the session and its transport.
    """

    #: The longest frame accepted from the client now (the session raises
    #: it at auth).
    maxFrameLength: int

    @property
    def peer(self) -> "IAddress":
        """
        The client's address, as the transport knows it now.
        """

    def writeFrame(self, data: bytes) -> None:
        """
        Write one serialized frame; nothing once the channel is closing.
        """

    def writeMessage(self, encoded: "EncodedMessage", seq: int, outgoing: bool) -> None:
        """
        Write the C{message} push of C{encoded} as inbox entry C{seq}.
        """

    def close(self) -> None:
        """
        Close the connection, within C{close_timeout} whatever the peer does.
        """

    def abort(self) -> None:
        """
        Drop the connection now.
        """

    def pauseReading(self) -> None:
        """
        Stop reading the client's frames (flow control).
        """

    def resumeReading(self) -> None:
        """
        Read the client's frames again.
        """


@implementer(ISession)
class GateSession(RPCDispatcher, ClosesWithError):
    """
    One client connection's session: the connection state machine, auth,
    request dispatch, the delivery pump, acks and flow control.  It knows
    no transport: its C{channel} (L{imserver.protocol.GateProtocol} for
    TCP) hands it frames and carries its frames.

    @ivar state: L{NEW}, L{AUTHENTICATING} or L{AUTHENTICATED}.
    @ivar lastHeard: reactor time of the last read from the client (the
        channel writes it).
    @ivar acceptedFrom: the address the connection was accepted from.
    """

    log = Logger()
    uid: str | None = None
    deviceId: str | None = None
    platform: pb.Platform = pb.PLATFORM_UNSPECIFIED
    heartbeatInterval: float | None = None
    _inRegistry = False
    #: The code of the ERROR frame the session closed with, if it did (a
    #: WebSocket channel closes with 4000 + it).
    errorCode: "pb.ErrorCode | None" = None
    #: Why the session was kicked, if it was (its C{user.offline} webhook
    #: says C{kicked}).
    kickedFor: "pb.KickReason | None" = None
    # Delivery state, per connection, set at auth.  Class defaults keep the
    # per-instance dict small until then.
    _delivering = False
    _sent = 0  # highest seq pushed on this connection
    _acked = 0  # highest seq the client acknowledged
    _unacked: "collections.deque[int] | None" = None  # seqs pushed, not acknowledged yet
    _fetchRetry: "IDelayedCall | None" = None  # the pump after a store outage
    _head = 0  # highest seq known to exist in the inbox
    _fetching = False
    _lastTyping = float("-inf")
    _typingActive = False
    _pushedAt: float | None = None  # when a push went into an empty window (ack timing)
    _pushedSeq = 0
    _requests: TokenBucket | None = None  # of requests, from the first request on
    _refusedInARow = 0
    _pausedAt: float | None = None  # reactor time writes filled the buffer; None: flowing
    _sendOrder: SendOrder | None = None  # sends waiting for the before-send check
    _noEcho = False  # the client asked not to be pushed its own sends
    _echoesSkipped: "set[int] | None" = None  # own entries left out, to be answered so
    # Bound in __init__ to the channel's own methods.  (The ignore: mypy
    # holds an attribute incompatible with the method the bases declare.)
    writeFrame: Callable[[bytes], None]  # type: ignore[assignment]
    _writeMessage: Callable[["EncodedMessage", int, bool], None]

    def __init__(self, factory: "GateFactory", channel: Channel, acceptedFrom: "IAddress") -> None:
        """
        @param channel: what carries this session's frames: C{writeFrame},
            C{writeMessage(encoded, seq, outgoing)} (a message push, from an
            L{imserver.wire.EncodedMessage}), C{close} (bounded), C{abort},
            C{pauseReading}, C{resumeReading}, C{peer} and a writable
            C{maxFrameLength}.
        """
        RPCDispatcher.__init__(self, factory.clock)
        # GateFactory is not annotated yet: what comes of its seams
        # (authenticator, registry, store, messenger, groups) is Any, hence
        # the no-any-return ignores on the Deferreds returned from them.
        self.factory = factory
        self.channel = channel
        #: Write one serialized frame (from L{imserver.wire}): the channel's
        #: own method, which writes nothing once the session closed it (a
        #: bound method here saves a call per frame on the push path).
        self.writeFrame = channel.writeFrame
        self._writeMessage = channel.writeMessage
        self.acceptedFrom = acceptedFrom
        self.state = NEW
        self.connectionId = factory.nextConnectionId()
        self.sessionId = "{}/{}".format(factory.gateId, self.connectionId)
        self.gateId = factory.gateId
        self.requestTimeout = factory.settings.request_timeout
        channel.maxFrameLength = factory.settings.preauth_max_frame_length
        self._seconds = factory.clock.seconds
        self._metrics = factory.metrics
        self._authTimer: IDelayedCall | None = None
        self.lastHeard = self._seconds()

    def __repr__(self) -> str:
        return "<GateSession {} {} {}>".format(self.connectionId, self.state, self.uid)

    @property
    def peer(self) -> "IAddress":
        """
        The client's address, as the channel knows it now (behind a
        C{haproxy:} listener, the source address of the PROXY header once
        it has been read).
        """
        return self.channel.peer

    @property
    def delivering(self) -> bool:
        """
        Whether the session takes pushes now: authenticated, its auth
        answer written, not closing and not paused by flow control.
        """
        return self._delivering and not self._closing and self._pausedAt is None

    @property
    def pausedSince(self) -> float | None:
        """
        The reactor time flow control paused the session, or L{None}.
        """
        return self._pausedAt

    @property
    def backlog(self) -> int:
        """
        Inbox entries known to exist that the client has not acknowledged.
        """
        return max(0, self._head - self._acked)

    def start(self) -> None:
        """
        The connection is open: count it and start the auth deadline.
        """
        self.factory.connectionOpened(self)
        self._authTimer = self.clock.callLater(
            self.factory.settings.auth_timeout, self._authTimedOut
        )
        self.log.debug("connection {conn} from {peer}", conn=self.connectionId, peer=self.peer)

    def requestAdmitted(self, seq: int) -> bool:
        requests = self._requests
        if requests is None:
            settings = self.factory.settings
            requests = self._requests = TokenBucket(
                settings.request_rate, settings.request_burst, self.clock
            )
        if requests.take():
            if self._refusedInARow:
                self._refusedInARow = 0
            return True
        self._metrics.rateLimited += 1
        self._refusedInARow += 1
        if self._refusedInARow >= self.factory.settings.rate_limit_close:
            self.closeWithError(pb.RATE_LIMITED, "too many requests; closing", seq)
        else:
            self._sendError(
                seq,
                RateLimited(
                    "more than {} requests per second".format(self.factory.settings.request_rate)
                ),
            )
        return False

    # -- flow control (the channel's write buffer) ---------------------------

    def pauseProducing(self) -> None:
        """
        The client is not reading fast enough: stop pushing (entries stay in
        the inbox) and stop reading its requests until the buffer drains.
        """
        if self._pausedAt is None:
            self._pausedAt = self._seconds()
            self._metrics.slowConsumerPauses += 1
            self.channel.pauseReading()

    def resumeProducing(self) -> None:
        """
        The client's buffer drained: read and push again.
        """
        if self._pausedAt is not None:
            self._pausedAt = None
            self.channel.resumeReading()
            self._pump()

    def closeWithError(self, code: pb.ErrorCode, message: str, seq: int = 0) -> None:
        if not self._closing:
            self.errorCode = code
        ClosesWithError.closeWithError(self, code, message, seq)

    def close(self) -> None:
        """
        Close the connection: the session ends now (unregistered, no longer
        counted as open, its address's slot freed), the connection within
        C{close_timeout} whatever the peer does (the channel's bounded
        close).  Idempotent.
        """
        if not self._closing:
            self._closing = True
            self._cancelFetchRetry()
            self.factory.connectionClosing(self)
            self._leaveRegistry()
            self.channel.close()

    def _cancelFetchRetry(self) -> None:
        if self._fetchRetry is not None and self._fetchRetry.active():
            self._fetchRetry.cancel()
        self._fetchRetry = None

    def connectionLost(self, reason: "Failure") -> None:
        """
        The channel's connection is gone: cancel the timers, leave the
        registry, fail what is outstanding, stop counting it.
        """
        if self._authTimer is not None and self._authTimer.active():
            self._authTimer.cancel()
        self._authTimer = None
        self._cancelFetchRetry()
        self._leaveRegistry()
        RPCDispatcher.connectionLost(self, reason)
        self.factory.connectionClosed(self)
        self.log.debug(
            "connection {conn} ({uid}) closed: {reason}",
            conn=self.connectionId,
            uid=self.uid,
            reason=reason.getErrorMessage(),
        )

    # -- dispatch -----------------------------------------------------------

    def locateResponder(self, name: str) -> "tuple[Method, Callable[..., Any]]":
        if self.state != AUTHENTICATED and name not in PREAUTH_METHODS:
            raise NotAuthenticated("authenticate first")
        return RPCDispatcher.locateResponder(self, name)

    def locateNotificationHandler(
        self, name: str
    ) -> "tuple[Notification, Callable[..., Any]] | None":
        if self.state != AUTHENTICATED:
            return None
        return RPCDispatcher.locateNotificationHandler(self, name)

    # -- auth ------------------------------------------------------------------

    @methods.AUTH.responder
    def auth(self, request: pb.AuthRequest) -> "Deferred[pb.AuthResponse]":
        if self.state != NEW:
            raise AlreadyAuthenticated(
                "auth was already {}".format("done" if self.state == AUTHENTICATED else "requested")
            )
        try:
            validateUid(request.uid)
            validateDeviceId(request.device_id)
            validateLength("client_version", request.client_version, MAX_CLIENT_VERSION)
            if request.platform not in _PLATFORMS:
                raise BadRequest("unknown platform {}".format(request.platform))
        except BadRequest:
            self._metrics.authFailures["bad_request"] += 1
            raise
        if not self.factory.authThrottle.allowed(peerHost(self.peer), request.uid):
            self._metrics.authFailures["throttled"] += 1
            raise RateLimited("too many failed auths; retry later", fatal=True)
        self.state = AUTHENTICATING
        d = self.factory.authenticator.authenticate(request.uid, request.token)
        d.addCallback(self._authenticated, request)
        d.addErrback(self._authFailed, request)
        return d  # type: ignore[no-any-return]

    def _authenticated(
        self, uid: str, request: pb.AuthRequest
    ) -> "pb.AuthResponse | Deferred[pb.AuthResponse]":
        if self._closing:
            # Closed (auth deadline, shutdown) while the token was checked:
            # nothing to register, and the answer goes nowhere.
            return pb.AuthResponse()
        self.uid = uid
        self.deviceId = request.device_id
        self.platform = request.platform
        return self.factory.registry.register(self).addCallback(self._registered, request)  # type: ignore[no-any-return]

    def _registered(
        self, displaced: ISession | None, request: pb.AuthRequest
    ) -> "Deferred[pb.AuthResponse]":
        self._inRegistry = True
        if displaced is not None:
            # The registry already holds this session in its place, so the
            # old one is kicked even if this connection closes right now.
            displaced.kick(pb.REPLACED, "the same device signed in again")
        # Registered first, head read second: any entry committed after the
        # read is announced to this session (inboxAdvanced), so none is
        # missed between the two.
        return (  # type: ignore[no-any-return]
            self.factory.store.head(self.uid)
            .addErrback(self.factory.messenger.storeFailed)
            .addCallback(self._ready, request)
        )

    def _ready(self, head: int, request: pb.AuthRequest) -> pb.AuthResponse:
        if self._closing:
            # Closed (auth deadline, shutdown) while registering or reading
            # the head: leave no session behind.
            self._leaveRegistry()
            self.state = NEW
            return pb.AuthResponse()
        if request.last_seq > head:
            self.log.warn(
                "connection {conn}: {uid}/{device} claims last_seq {claimed} beyond"
                " the inbox head {head}",
                conn=self.connectionId,
                uid=self.uid,
                device=self.deviceId,
                claimed=request.last_seq,
                head=head,
            )
        start = min(request.last_seq, head)
        self._head = max(self._head, head)
        self._sent = self._acked = start
        settings = self.factory.settings
        heartbeatInterval = settings.heartbeat_interval * (
            1.0 - settings.heartbeat_jitter * self.factory.random.random()
        )
        response = pb.AuthResponse(
            heartbeat_interval_ms=int(heartbeatInterval * 1000),
            idle_timeout_ms=int(settings.idle_timeout * 1000),
            server_time_ms=int(self._seconds() * 1000),
            session_id=self.sessionId,
            max_frame_length=settings.max_frame_length,
            head_seq=self._head,
            max_message_body=settings.max_message_body,
            max_unacked=settings.max_unacked,
            no_echo=request.no_echo,
        )
        self._noEcho = request.no_echo
        self._authTimer.cancel()  # type: ignore[union-attr]  # running till now
        self._authTimer = None
        self.state = AUTHENTICATED
        self.heartbeatInterval = heartbeatInterval
        self.channel.maxFrameLength = settings.max_frame_length
        self.log.info(
            "connection {conn} from {peer} authenticated as {uid} device {device}"
            " ({platform}, {version!r})",
            conn=self.connectionId,
            peer=self.peer,
            uid=self.uid,
            device=self.deviceId,
            platform=pb.Platform.Name(self.platform),
            version=request.client_version,
        )
        self._persistAck()
        return response

    def responseSent(self, method: "Method", response: "Message") -> None:
        if method is methods.AUTH and self.state == AUTHENTICATED:
            # The client has its auth response; now the backlog, in order.
            self._delivering = True
            self._pump()

    def _leaveRegistry(self) -> None:
        if self._inRegistry:
            self._inRegistry = False
            self.factory.registry.unregister(self).addErrback(
                lambda f: self.log.failure(
                    "unregistering connection {conn} failed", f, conn=self.connectionId
                )
            )

    def _authFailed(self, failure: "Failure", request: pb.AuthRequest) -> "Failure":
        refused = failure.check(AuthFailed) is not None
        if refused:
            # Which check refused the token: for the metrics and the log
            # only, the client gets the same AUTH_FAILED whatever it is.
            reason = getattr(failure.value, "reason", "bad_token")
            if reason not in self._metrics.authFailures:
                reason = "bad_token"
        elif failure.check(TooManyDevices):
            reason = "too_many_devices"
        else:
            reason = "unavailable"
        self._metrics.authFailures[reason] += 1
        if refused:
            self.factory.authThrottle.failed(peerHost(self.peer), request.uid)
        self.log.info(
            "connection {conn} from {peer} failed auth: {why} ({reason})",
            conn=self.connectionId,
            peer=self.peer,
            reason=reason,
            why=failure.getErrorMessage(),
        )
        self._leaveRegistry()
        self.uid = self.deviceId = None
        self.state = NEW
        return failure

    def _authTimedOut(self) -> None:
        self._authTimer = None
        self._metrics.authFailures["timeout"] += 1
        self.closeWithError(pb.AUTH_TIMEOUT, "no auth within the deadline")

    # -- heartbeat ---------------------------------------------------------

    @methods.PING.responder
    def ping(self, request: pb.PingRequest) -> pb.PingResponse:
        return pb.PingResponse(server_time_ms=int(self._seconds() * 1000))

    # -- messages ----------------------------------------------------------

    @methods.SEND.responder
    def send(self, request: pb.SendRequest) -> "Deferred[pb.SendResponse]":
        messenger = self.factory.messenger
        origin = self if self._noEcho else None
        if messenger.beforeSend is None:
            d = messenger.send(self.uid, request, origin=origin)
        else:
            # Checked by the app backend first, yet stored in the order received.
            if self._sendOrder is None:
                self._sendOrder = SendOrder()
            d = messenger.send(self.uid, request, self.deviceId, self._sendOrder, origin=origin)
        if origin is not None:
            d.addCallback(self._echoAnswered)
        return d  # type: ignore[no-any-return]

    def sentHere(self, seq: int) -> None:
        """
        A send of this connection (with C{no_echo}) was stored as entry
        C{seq} of the user's inbox, and is about to be answered.  If that
        entry is next in this connection's stream, leave it out: every
        entry before it was pushed already, so the answer, written after
        them, is the client's copy of it (C{SendResponse.echo_skipped}).
        Otherwise it is pushed in its turn, as for any client.
        """
        if seq > self._head:
            self._head = seq
        if seq == self._sent + 1 and self._delivering and not self._closing:
            self._sent = seq
            if self._echoesSkipped is None:
                self._echoesSkipped = set()
            self._echoesSkipped.add(seq)
            self._metrics.echoesSkipped += 1

    def _echoAnswered(self, response: pb.SendResponse) -> pb.SendResponse:
        skipped = self._echoesSkipped
        if skipped and response.seq in skipped and not response.duplicate:
            skipped.discard(response.seq)
            response.echo_skipped = True
        return response

    @methods.SYNC.responder
    def sync(self, request: pb.SyncRequest) -> "Deferred[pb.SyncResponse]":
        page = self.factory.settings.sync_page_size
        limit = min(request.limit or page, page)
        store = self.factory.store
        d = store.fetch(self.uid, request.after_seq, limit)

        def withHead(entries: list[pb.InboxEntry]) -> "Deferred[pb.SyncResponse]":
            kept, _ = fitFrame(entries, self.factory.settings.max_frame_length)
            return store.head(self.uid).addCallback(synced, kept)  # type: ignore[no-any-return]

        def synced(head: int, kept: list[pb.InboxEntry]) -> pb.SyncResponse:
            # What the client can now ack (and so skip) reaches this head.
            if head > self._head:
                self._head = head
            return pb.SyncResponse(entries=kept, head_seq=head)

        return d.addCallback(withHead).addErrback(self.factory.messenger.storeFailed)  # type: ignore[no-any-return]

    @methods.ACK.handler
    def _ackReceived(self, ack: pb.Ack) -> None:
        seq = ack.seq
        if seq > max(self._sent, self._head):
            self.closeWithError(
                pb.BAD_ACK,
                "ack for seq {} beyond the inbox head {}".format(seq, self._head),
            )
            return
        if seq > self._acked:
            metrics = self._metrics
            unacked = self._unacked
            if unacked is not None:
                # Seqs need not be dense (cluster mode jumps over a floor):
                # the window counts pushes, not seq distance.
                while unacked and unacked[0] <= seq:
                    unacked.popleft()
                    metrics.messagesAcked += 1
                if not unacked:
                    self._unacked = None
            if self._pushedAt is not None and seq >= self._pushedSeq:
                metrics.ackRoundTrip.observe(self._seconds() - self._pushedAt)
                self._pushedAt = None
            self._acked = seq
            if seq > self._sent:
                # The client has these (through sync): push from after them.
                self._sent = seq
            self._persistAck()
            self._pump()

    @methods.TYPING.handler
    def _typingReceived(self, message: pb.Typing) -> None:
        # Rate-limited, except that a stop right after a start always goes
        # through (else the peer would see "typing" until it expires).
        now = self._seconds()
        stopping = not message.active and self._typingActive
        if not stopping and now - self._lastTyping < 1.0 / self.factory.settings.typing_rate:
            return
        try:
            if message.group_id:
                validateGroupId(message.group_id)
            else:
                validateUid(message.uid)
        except BadRequest:
            return
        self._lastTyping = now
        self._typingActive = message.active
        self.factory.messenger.typing(self.uid, message.uid, message.active, message.group_id)

    # -- groups --------------------------------------------------------------

    @methods.GROUPS.responder
    def groups(self, request: pb.GroupsRequest) -> "Deferred[pb.GroupsResponse]":
        return (  # type: ignore[no-any-return]
            self.factory.groups.groupsOf(self.uid)
            .addCallback(groupsPage, request, self.factory.settings)
            .addErrback(self.factory.messenger.storeFailed)
        )

    @methods.MEMBERS.responder
    def members(self, request: pb.MembersRequest) -> "Deferred[pb.MembersResponse]":
        return (  # type: ignore[no-any-return]
            self.factory.groups.membersFor(request.group_id, self.uid)
            .addCallback(membersPage, request, self.factory.settings)
            .addErrback(self.factory.messenger.storeFailed)
        )

    @methods.LEAVE.responder
    def leave(self, request: pb.LeaveRequest) -> "Deferred[pb.LeaveResponse]":
        return (  # type: ignore[no-any-return]
            self.factory.groups.leave(request.group_id, self.uid)
            .addCallback(lambda _: pb.LeaveResponse())
            .addErrback(self.factory.messenger.storeFailed)
        )

    def _pump(self) -> None:
        """
        Push what the inbox holds beyond what was pushed, in seq order,
        while the unacknowledged window has room: one fetch at a time.
        """
        if self._fetching or self._closing or not self._delivering or self._pausedAt is not None:
            return
        settings = self.factory.settings
        room = settings.max_unacked - self.unackedCount()
        if room <= 0 or self._sent >= self._head:
            return
        self._fetching = True
        self.factory.store.fetch(
            self.uid, self._sent, min(room, settings.sync_page_size)
        ).addCallbacks(self._fetched, self._fetchFailed)

    def _fetched(self, entries: list[pb.InboxEntry]) -> None:
        self._fetching = False
        if self._closing:
            return
        if entries:
            for entry in entries:
                if self._pausedAt is not None:
                    break  # the rest waits in the inbox for resumeProducing
                if entry.seq > self._sent:
                    self._countPush(entry.seq)
                    self.sendNotify(methods.MESSAGE, entry)
        else:
            # Everything up to the head was removed by retention.
            self._sent = self._head
        self._pump()

    def _fetchFailed(self, failure: "Failure") -> None:
        self._fetching = False
        if self._closing:
            return
        if failure.check(Unavailable):
            # Nothing is lost: the entries wait in the inbox.  Keep the
            # connection and try again shortly.
            self.log.warn(
                "the inbox of {uid} is unavailable for connection {conn}; retrying",
                uid=self.uid,
                conn=self.connectionId,
            )
            # One retry at a time: a fetch started meanwhile (new entries
            # announced) that fails too leaves the pending one in charge.
            if self._fetchRetry is None or not self._fetchRetry.active():
                self._fetchRetry = self.clock.callLater(FETCH_RETRY_DELAY, self._retryFetch)
            return
        self.log.failure(
            "fetching the inbox of {uid} for connection {conn} failed",
            failure,
            uid=self.uid,
            conn=self.connectionId,
        )
        # Unexpected: make the client reconnect (and resume) rather than
        # stall silently.
        self.closeWithError(pb.UNAVAILABLE, "message storage is unavailable")

    def _retryFetch(self) -> None:
        self._fetchRetry = None
        self._pump()

    def unackedCount(self) -> int:
        """
        @return: how many entries were pushed on this connection and not
            acknowledged yet.
        """
        return 0 if self._unacked is None else len(self._unacked)

    def _countPush(self, seq: int) -> None:
        """
        Account for pushing entry C{seq}.
        """
        unacked = self._unacked
        if unacked is None:
            unacked = self._unacked = collections.deque()
            if self._pushedAt is None:
                self._pushedAt = self._seconds()
                self._pushedSeq = seq
        unacked.append(seq)
        self._sent = seq
        self._metrics.messagesPushed += 1

    def _persistAck(self) -> None:
        """
        Have the device's cursor written with the next batch of cursors
        (L{GateFactory.flushCursors}); acks do not each cost a write.  Also
        done at auth, so every device that connects has a cursor and
        retention keeps what it has not acknowledged.
        """
        self.factory.cursorAdvanced(self.uid, self.deviceId, self._acked)

    # -- ISession ----------------------------------------------------------

    def inboxAdvanced(self, seq: int, outgoing: bool, encoded: "EncodedMessage") -> None:
        if seq > self._head:
            self._head = seq
        if not self._delivering or seq <= self._sent:
            return
        unacked = self._unacked
        if (
            seq == self._sent + 1
            and not self._fetching
            and self._pausedAt is None
            and not self._closing
            and (unacked is None or len(unacked) < self.factory.settings.max_unacked)
        ):
            self._countPush(seq)
            self._writeMessage(encoded, seq, outgoing)
        else:
            self._pump()

    def typing(self, uid: str, active: bool, groupId: str) -> None:
        # Transient: not for a connection that is not reading its pushes.
        if self._delivering and self._pausedAt is None:
            self.sendNotify(methods.TYPING, pb.Typing(uid=uid, active=active, group_id=groupId))

    def notice(self, frame: bytes) -> None:
        if self._delivering and self._pausedAt is None:
            self.writeFrame(frame)

    def kick(self, reason: pb.KickReason, message: str) -> None:
        if self._closing:
            return
        self._metrics.kicks[pb.KickReason.Name(reason)] += 1
        self.log.info(
            "kicking connection {conn} ({uid}): {reason}",
            conn=self.connectionId,
            uid=self.uid,
            reason=pb.KickReason.Name(reason),
        )
        self.sendNotify(methods.KICKED, pb.Kicked(reason=reason, message=message))
        self.kickedFor = reason
        self.close()


class SocketChannel:
    """
    What the gate's channels (L{imserver.protocol.GateProtocol} over TCP,
    L{imserver.web.websocket.GateWebSocketProtocol} over WebSocket) do
    alike with the socket under them: start their session and relay the
    socket's flow control to it (as the socket's streaming producer), pause
    and resume reading the client, abort, and cancel the bounded close's
    timer.
    """

    #: The channel's L{GateSession}, once it has one.
    session: "GateSession | None" = None
    connectionId: Any
    transport: Any
    _closeTimer: "IDelayedCall | None" = None

    def startSession(self, gate: "GateFactory", acceptedFrom: "IAddress") -> None:
        """
        The connection is the gate's now (accepted, or upgraded): start its
        session, and have the socket's write buffer pause the session's
        pushes beyond C{write_buffer_high} instead of growing without bound.
        """
        socket = socketTransport(self.transport)
        if socket is not None:
            socket.bufferSize = gate.settings.write_buffer_high
        self.session = session = GateSession(gate, cast(Channel, self), acceptedFrom)
        self.connectionId = session.connectionId
        self.transport.registerProducer(self, True)
        session.start()

    # -- IPushProducer: the socket's write buffer ----------------------------

    def pauseProducing(self) -> None:
        if self.session is not None:
            self.session.pauseProducing()

    def resumeProducing(self) -> None:
        if self.session is not None:
            self.session.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # -- what the session asks of its channel ---------------------------------

    def abort(self) -> None:
        """
        Abort the connection at once (the shutdown's last resort).
        """
        self.transport.abortConnection()

    def pauseReading(self) -> None:
        """
        Stop reading the client (flow control).
        """
        socket = socketTransport(self.transport)
        if socket is not None:
            socket.pauseProducing()

    def resumeReading(self) -> None:
        """
        Read the client again.
        """
        socket = socketTransport(self.transport)
        if socket is not None:
            socket.resumeProducing()

    def cancelCloseTimer(self) -> None:
        """
        The connection is gone: its bounded close has nothing left to abort.
        """
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._closeTimer = None
