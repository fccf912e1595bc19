"""
The seams of imserver, as C{zope.interface} interfaces.

Each has an in-process implementation; cluster mode adds Redis ones.  Tests
run one suite against every implementation (see tests/test_registry.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from imserver.pb import im_pb2 as pb
    from imserver.store import Delivery
    from imserver.webhooks.events import OutboxEntry, OutboxEvent
    from imserver.wire import EncodedMessage

    #: A client address of a gate: C{(host, port, tls)}.
    Address = tuple[str, int, bool]


class IAuthenticator(Interface):
    """
    Decides whether a client may act as a uid.
    """

    def authenticate(uid: str, token: str) -> Deferred[str]:
        """
        Check C{token} for C{uid}.

        @type uid: L{str}
        @type token: L{str}
        @return: a L{Deferred} firing with the authenticated uid, or failing
            with L{imserver.errors.AuthFailed} (the same failure for every
            cause).
        """


class IJWTKeys(Interface):
    """
    The public keys that verify asymmetrically signed JWT client tokens
    (L{imserver.jwtauth}), kept current from their sources (a PEM file, a
    JWKS file or URL).
    """

    keys = Attribute(
        "The keys in use now: a L{tuple} of L{imserver.jwtauth.VerificationKey}"
        " (empty before the first successful read)."
    )

    def unknownKey() -> Deferred[None]:
        """
        A token needs a key that L{keys} lacks (an unknown C{kid}): read the
        sources again now, unless that was done too recently.

        @return: a L{Deferred} firing with L{None} once done (at once if
            nothing is read); it never fails, and cancelling it only stops
            waiting.
        """


class ISession(Interface):
    """
    One authenticated connection of one device of one user, as the registry
    and the logic see it.
    """

    uid = Attribute("The authenticated user id (L{str}).")
    deviceId = Attribute("The device id given at auth (L{str}).")
    platform = Attribute("The L{imserver.pb.im_pb2.Platform} given at auth.")
    sessionId = Attribute("Unique id of this session (L{str}).")
    gateId = Attribute("Id of the gate process holding the session (L{str}).")

    def kick(reason: pb.KickReason, message: str) -> None:
        """
        Tell the client why, then close the session.

        @param reason: a L{imserver.pb.im_pb2.KickReason}.
        @param message: detail for the client.
        """

    def inboxAdvanced(seq: int, outgoing: bool, encoded: EncodedMessage) -> None:
        """
        A new entry was committed to this session's user's inbox.  The
        session pushes it in seq order, after any backlog, within its
        unacknowledged window; or fetches it from the store later.

        @param seq: the entry's seq in this user's inbox.
        @param outgoing: whether the user sent it.
        @type encoded: L{imserver.wire.EncodedMessage} (shared by every
            recipient: the message is serialized once)
        """

    def typing(uid: str, active: bool, groupId: str) -> None:
        """
        Forward a transient typing signal from C{uid} (in C{groupId}, or
        to this user directly if it is empty).
        """

    def notice(frame: bytes) -> None:
        """
        Write a system notice: C{frame} is the encoded C{notice} NOTIFY
        frame, the same bytes for every session.
        """


class ISessionRegistry(Interface):
    """
    Maps users and their devices to the sessions that hold them.

    At most one session per (uid, device id): registering a second displaces
    the first.  Unregistering a session that was displaced has no effect, so
    a late close of an old connection never removes a newer login.
    """

    def register(session: ISession) -> Deferred[ISession | None]:
        """
        Register an authenticated L{ISession}.

        @return: a L{Deferred} firing with the L{ISession} it displaced (same
            uid and device id), which the caller kicks, or L{None}; or
            failing with L{imserver.errors.TooManyDevices} if the user
            already has the maximum number of other devices registered.
        """

    def unregister(session: ISession) -> Deferred[bool]:
        """
        Remove C{session} if, and only if, it is still the registered session
        for its uid and device id.

        @return: a L{Deferred} firing with L{True} if it was removed.
        """

    def sessionsFor(uid: str) -> Deferred[list[ISession]]:
        """
        @return: a L{Deferred} firing with a L{list} of the L{ISession}s
            registered for C{uid}, in no particular order.
        """

    def sessionsForMany(uids: Iterable[str]) -> Deferred[dict[str, list[ISession]]]:
        """
        One lookup for many users (a group message's recipients).

        @return: a L{Deferred} firing with C{{uid: [ISession, ...]}} for the
            uids in C{uids} that have sessions.
        """

    def count() -> Deferred[int]:
        """
        @return: a L{Deferred} firing with the number of registered sessions.
        """

    def broadcast(frame: bytes) -> Deferred[int]:
        """
        Have every other gate write the encoded notice C{frame} to all its
        sessions (this gate writes it to its own).

        @return: a L{Deferred} firing with the number of other gates that
            got it (0 with one gate process), or failing with
            L{imserver.errors.Unavailable} if none could be told.
        """


class IMessageStore(Interface):
    """
    Durable per-user inboxes.

    Each user has one inbox whose entries have a strictly increasing C{seq},
    never reused (not even after retention removed entries, nor after the
    store lost data); not necessarily dense, nor starting at 1.  A
    message body is stored once and referenced by every inbox it lands in.
    Every operation returns a L{Deferred}; a write's Deferred fires only
    once the write is durable.
    """

    def deliver(
        sender: str, clientMsgId: str, message: pb.Message, recipients: Iterable[str], nowMs: int
    ) -> Deferred[Delivery]:
        """
        Store C{message} once and append it to the inbox of every uid in
        C{recipients} and to the sender's own (marked outgoing), atomically.

        A group message (C{message.group_id} set) goes to every member of
        the group at commit time instead of C{recipients}, and only if the
        sender is a member.  The system sender (C{""}, HTTP API pushes) has
        no inbox of its own.

        Idempotent: if C{(sender, clientMsgId)} was delivered within the
        dedup window, nothing is stored and the original outcome returns.

        @param message: an L{imserver.pb.im_pb2.Message} template; the store
            sets C{id}, C{sender}, C{client_msg_id} and C{created_ms}.
        @return: a L{Deferred} firing with an L{imserver.store.Delivery}, or
            failing with L{imserver.errors.NotMember} (group message from a
            non-member, or no such group).
        """

    def fetch(uid: str, afterSeq: int, limit: int) -> Deferred[list[pb.InboxEntry]]:
        """
        @return: a L{Deferred} firing with a L{list} of at most C{limit}
            L{imserver.pb.im_pb2.InboxEntry}s of C{uid} with
            C{seq > afterSeq}, in seq order.
        """

    def head(uid: str) -> Deferred[int]:
        """
        @return: a L{Deferred} firing with the newest seq assigned in
            C{uid}'s inbox (0 if none).
        """

    def ack(cursors: Iterable[tuple[str, str, int]], nowMs: int) -> Deferred[int]:
        """
        Raise device cursors (never lower them), all in one write.

        @param cursors: an iterable of C{(uid, deviceId, seq)}.
        @return: a L{Deferred} firing with the number of cursors written.
        """

    def cursor(uid: str, deviceId: str) -> Deferred[int]:
        """
        @return: a L{Deferred} firing with the device's cursor (0 if none).
        """

    def trim(nowMs: int, maxAgeMs: int, maxCount: int) -> Deferred[int]:
        """
        Apply retention: remove entries older than C{maxAgeMs}; from inboxes
        holding more than C{maxCount} entries remove the oldest ones that
        every known device of the user has acknowledged; forget dedup keys
        older than the dedup window and cursors of devices not seen within
        C{maxAgeMs}.  An entry younger than C{maxAgeMs} that a device seen
        within C{maxAgeMs} has not acknowledged is never removed.

        @return: a L{Deferred} firing with the number of entries removed.
        """


class IGroupStore(Interface):
    """
    Groups and their members, durable with the messages (the message
    stores implement it too, so a group message's membership check and its
    fan-out happen in one transaction).

    Roles are L{imserver.pb.im_pb2.Role} values.  Every operation returns a
    L{Deferred}.
    """

    def createGroup(groupId: str, name: str, owner: str, nowMs: int) -> Deferred[pb.Group]:
        """
        Create a group with C{owner} as its only member (role C{ROLE_OWNER}).

        @return: a L{Deferred} firing with the new L{imserver.pb.im_pb2.Group}
            (role: owner), or failing with L{imserver.store.GroupExists}.
        """

    def deleteGroup(groupId: str) -> Deferred[bool]:
        """
        Delete a group and its memberships (messages already delivered stay
        in the inboxes).

        @return: a L{Deferred} firing with L{True}, or failing with
            L{imserver.store.GroupNotFound}.
        """

    def setMembers(
        groupId: str, members: Iterable[tuple[str, pb.Role]], maxSize: int, nowMs: int
    ) -> Deferred[list[str]]:
        """
        Add members, or change the role of existing ones, all or nothing.

        @param members: C{(uid, role)} pairs.
        @param maxSize: the group may not grow beyond this many members.
        @return: a L{Deferred} firing with the L{list} of uids that were
            not members before, or failing with
            L{imserver.store.GroupNotFound} or L{imserver.store.GroupFull}.
        """

    def removeMembers(groupId: str, uids: Iterable[str]) -> Deferred[list[str]]:
        """
        @return: a L{Deferred} firing with the L{list} of uids that were
            members and are not any more, or failing with
            L{imserver.store.GroupNotFound}.
        """

    def group(groupId: str) -> Deferred[pb.Group | None]:
        """
        @return: a L{Deferred} firing with the L{imserver.pb.im_pb2.Group}
            (role unset), or L{None} if there is no such group.
        """

    def members(groupId: str) -> Deferred[list[pb.Member]]:
        """
        @return: a L{Deferred} firing with the group's
            L{imserver.pb.im_pb2.Member}s ordered by uid, or failing with
            L{imserver.store.GroupNotFound}.
        """

    def groupsOf(uid: str) -> Deferred[list[pb.Group]]:
        """
        @return: a L{Deferred} firing with the L{imserver.pb.im_pb2.Group}s
            C{uid} is a member of (role: C{uid}'s), ordered by group id.
        """


class IOutbox(Interface):
    """
    The webhook outbox: events for the app backend, kept in the message
    store until the backend has acknowledged them, as durable as the
    messages (the events a store operation causes, C{message.stored} and
    C{group.changed}, are written in the same transaction as the change
    they report).  Bounded: beyond L{outboxLimit} entries a new event is
    not kept and L{outboxDropped} counts it; the message or change it
    reports is stored all the same.

    Entries are L{imserver.webhooks.events.OutboxEntry}s; ids increase in
    the order events were recorded.
    """

    outboxEvents = Attribute(
        "The event types the store records itself, in the transaction of the"
        " operation that causes them: a L{frozenset} drawn from"
        " C{message.stored} and C{group.changed}; empty (the default): none."
    )
    outboxLimit = Attribute("The most entries kept (L{int}).")
    outboxDropped = Attribute(
        "How many events were not kept because the outbox was full (L{int}, this process's count)."
    )

    def enqueue(events: Iterable[OutboxEvent], nowMs: int) -> Deferred[int]:
        """
        Keep C{events} (L{imserver.webhooks.events.OutboxEvent}s), in order,
        in one durable write.  An event with C{presence} set also records
        (C{user.online}) or forgets (C{user.offline}) that device as
        present on that gate.

        @return: a L{Deferred} firing with the number kept (the others did
            not fit).
        """

    def pending(afterId: int, limit: int) -> Deferred[list[OutboxEntry]]:
        """
        @return: a L{Deferred} firing with at most C{limit} entries with
            C{id > afterId}, in id order.
        """

    def remove(ids: Iterable[int]) -> Deferred[int]:
        """
        Forget delivered entries.

        @return: a L{Deferred} firing with the number removed.
        """

    def expire(beforeMs: int) -> Deferred[int]:
        """
        Remove the entries recorded before C{beforeMs} (retention).

        @return: a L{Deferred} firing with the number removed.
        """

    def outboxStats() -> Deferred[tuple[int, int | None]]:
        """
        @return: a L{Deferred} firing with C{(entries, oldest createdMs or
            None)}.
        """

    def claimOutbox(owner: str, ttlMs: int) -> Deferred[bool]:
        """
        Take or extend the right to send the outbox's events for C{ttlMs}:
        one sender per outbox.  Always granted by a store only one gate
        uses.

        @return: a L{Deferred} firing with L{True} if C{owner} holds it.
        """

    def presentOn(gateId: str) -> Deferred[list[tuple[str, str, str]]]:
        """
        @return: a L{Deferred} firing with the C{(uid, deviceId, sessionId)}
            last reported online on C{gateId} and not since offline.
        """


class IGateDirectory(Interface):
    """
    The live gates and the addresses clients reach them at: what the
    dispatcher of the HTTP API (C{GET /v1/gates}) hands out.

    An address is a C{(host, port, tls)} tuple: a host name or IP address
    (L{str}), a TCP port (L{int}) and whether clients speak TLS there
    (L{bool}).
    """

    def advertise(gateId: str, addresses: list[Address]) -> Deferred[None]:
        """
        Publish the client addresses of gate C{gateId}, replacing those it
        published before.

        @param addresses: a L{list} of C{(host, port, tls)}.
        @return: a L{Deferred} firing once published.
        """

    def withdraw(gateId: str) -> Deferred[None]:
        """
        Remove gate C{gateId} (it is stopping).

        @return: a L{Deferred} firing once removed.
        """

    def gates() -> Deferred[dict[str, list[Address]]]:
        """
        @return: a L{Deferred} firing with a L{dict} mapping the id of every
            live gate to its L{list} of C{(host, port, tls)}.
        """


class IGateBus(Interface):
    """
    Delivers notifications to the sessions another gate holds.  Every
    method queues and returns at once; delivery is best effort (a gate that
    is gone gets nothing, and its users find their messages in their
    inboxes when they resume).
    """

    receiver = Attribute(
        "The L{IBusReceiver} of this gate: what arrives on its own channel goes there."
    )

    def forward(gateId: str, uid: str, seq: int, outgoing: bool, encoded: EncodedMessage) -> None:
        """
        Tell gate C{gateId} that entry C{seq} of C{uid}'s inbox was
        committed.

        @type encoded: L{imserver.wire.EncodedMessage}: the same object for
            every recipient of one message, so it is carried once per gate.
        """

    def kick(
        gateId: str,
        uid: str,
        deviceId: str,
        sessionId: str,
        generation: int,
        reason: pb.KickReason,
        message: str,
    ) -> None:
        """
        Ask gate C{gateId} to kick session C{sessionId} if it still holds
        it with registration C{generation}.
        """

    def typing(gateId: str, toUid: str, fromUid: str, active: bool, groupId: str) -> None:
        """
        Forward a typing signal of C{fromUid} to the sessions of C{toUid}
        on gate C{gateId}.
        """

    def notice(gateId: str, sessionId: str, frame: bytes) -> None:
        """
        Have gate C{gateId} write the encoded notice C{frame} to session
        C{sessionId}.
        """

    def broadcast(frame: bytes) -> Deferred[int]:
        """
        Have every other gate write the encoded notice C{frame} to all its
        sessions, now (not queued).

        @return: a L{Deferred} firing with the number of other gates that
            got it, or failing with L{imserver.errors.Unavailable}.
        """


class IBusReceiver(Interface):
    """
    What a gate does with what the bus brings it (the cluster session
    registry, which knows this gate's sessions).
    """

    def forwardReceived(encoded: EncodedMessage, targets: Iterable[tuple[str, int, bool]]) -> None:
        """
        @type encoded: L{imserver.wire.EncodedMessage}
        @param targets: C{(uid, seq, outgoing)} tuples: call
            C{inboxAdvanced(seq, outgoing, encoded)} on every local session of
            each uid.
        """

    def kickReceived(
        uid: str,
        deviceId: str,
        sessionId: str,
        generation: int,
        reason: pb.KickReason,
        message: str,
    ) -> None:
        """
        Kick local session C{sessionId} if its generation is C{generation}.
        """

    def typingReceived(toUid: str, fromUid: str, active: bool, groupId: str) -> None:
        """
        Forward a typing signal to the local sessions of C{toUid}.
        """

    def noticeReceived(sessionId: str, frame: bytes) -> None:
        """
        Write C{frame} to local session C{sessionId}.
        """

    def broadcastReceived(frame: bytes) -> None:
        """
        Write C{frame} to every local session (another gate's broadcast).
        """
