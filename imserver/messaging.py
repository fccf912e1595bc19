# -*- test-case-name: tests.test_delivery -*-
"""
Message semantics, independent of sockets: the gate (and later the HTTP
API) call L{Messenger}; it stores through an L{IMessageStore} and tells the
sessions of the recipients (found in the L{ISessionRegistry}) that their
inbox advanced.  The sessions push in order themselves.

With a before-send check (L{imserver.beforesend}), a client's C{send} is
stored only once the app backend allowed it (or replaced its body).
"""

from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.beforesend import REJECT, REPLACE, SendOrder
from imserver.errors import BadRequest, MessageTooLarge, NotMember, Rejected, RPCError, Unavailable
from imserver.identifiers import (
    validateClientMsgId,
    validateContentType,
    validateGroupId,
    validateUid,
)
from imserver.pb import im_pb2 as pb
from imserver.store import GroupNotFound
from imserver.wire import EncodedMessage

#: The group of L{Messenger.storedBefore}'s probe: no group can have this
#: id (a control character; L{validateGroupId} refuses it).
PROBE_GROUP = "\x00dedup probe"


class Messenger:
    """
    Sends messages and transient signals.

    @ivar store: the L{IMessageStore} (also an L{IGroupStore}).
    @ivar registry: the L{ISessionRegistry}.
    @ivar beforeSend: the L{imserver.beforesend.BeforeSendCheck} asked
        about every client C{send}, or L{None} (C{--before-send} unset).
    """

    log = Logger()

    def __init__(self, store, registry, clock, settings, metrics, beforeSend=None):
        self.store = store
        self.registry = registry
        self.clock = clock
        self.settings = settings
        self.metrics = metrics
        self.beforeSend = beforeSend

    def send(self, sender, request, deviceId="", order=None, origin=None):
        """
        Store a message from C{sender} (the authenticated uid, never a
        payload field) to a user or a group, and tell the recipients'
        sessions.

        With a before-send check the request is validated, then checked,
        then stored as the verdict says (L{_checked}), after the sends
        received before it in C{order}.

        @type request: L{pb.SendRequest}
        @param deviceId: the sending device, for the before-send check.
        @param order: the L{SendOrder} of the connection it came on (a
            send alone if L{None}).
        @param origin: the session it came on, if that session asked not to
            be pushed its own sends (C{no_echo}): told the sender's seq by
            C{sentHere(seq)} once it is stored, before anyone is pushed it.
        @return: a L{Deferred} firing with a L{pb.SendResponse} once the
            message is durably in every inbox, or failing with an
            L{RPCError} (C{NOT_MEMBER}, C{UNAVAILABLE}; with the check
            C{REJECTED} and C{RATE_LIMITED} too).
        @raise RPCError: C{BAD_REQUEST} or C{MESSAGE_TOO_LARGE} for an
            invalid request, before anything is stored or checked.
        """
        if request.to and request.group_id:
            raise BadRequest("set one of to and group_id, not both")
        check = self.beforeSend
        if check is None:
            d = self.storeMessage(
                sender,
                request.client_msg_id,
                request.body,
                request.content_type,
                to=request.to or None,
                groupId=request.group_id or None,
                origin=origin,
            )
            return d.addCallback(self._answer, sender)
        self.validate(
            request.client_msg_id,
            request.body,
            request.content_type,
            to=request.to or None,
            groupId=request.group_id or None,
        )
        if order is None:
            order = SendOrder()
        d = order.add(
            check.check(sender, deviceId, request), self._checked, sender, request, origin
        )
        return d.addCallback(self._answer, sender)

    def _checked(self, verdict, sender, request, origin=None):
        """
        Apply the before-send check's verdict (a L{Verdict}, or the
        L{Failure} of a refused check): store the message, as sent or with
        the backend's body; or refuse it, unless it is a retry of a message
        already stored (L{storedBefore}): a retry keeps the original's
        answer whatever the check says now.
        """
        if isinstance(verdict, Failure):
            return verdict
        clientMsgId = request.client_msg_id
        if verdict.result == REJECT:
            return self.storedBefore(sender, clientMsgId).addCallback(
                _originalOr, Rejected(verdict.message)
            )
        body, contentType = request.body, request.content_type
        if verdict.result == REPLACE:
            body = verdict.body
            if verdict.contentType is not None:
                contentType = verdict.contentType
        return self.storeMessage(
            sender,
            clientMsgId,
            body,
            contentType,
            to=request.to or None,
            groupId=request.group_id or None,
            origin=origin,
        )

    def storedBefore(self, sender, clientMsgId):
        """
        Find out, storing nothing, whether C{(sender, clientMsgId)} is
        within the dedup window.  The store has no lookup of its own: this
        asks it to deliver a message to L{PROBE_GROUP}, which does not
        exist.  L{IMessageStore.deliver} answers a known key with the
        original (before it looks at the group), and refuses an unknown one
        with L{NotMember} (nothing stored, the key not used up).

        @return: a L{Deferred} firing with the original's
            L{imserver.store.Delivery}, or L{None} if there is none; or
            failing with C{UNAVAILABLE} if the store fails.
        """
        d = self.store.deliver(
            sender,
            clientMsgId,
            pb.Message(group_id=PROBE_GROUP),
            [],
            int(self.clock.seconds() * 1000),
        )

        def found(delivery):
            if not delivery.duplicate:  # the group cannot exist: never
                self.log.error("the dedup probe stored message {id}", id=delivery.message.id)
                return None
            self.metrics.dedupHits += 1
            return delivery

        def notStored(failure):
            failure.trap(NotMember)
            return None

        return d.addCallbacks(found, notStored).addErrback(self.storeFailed)

    def _answer(self, delivery, sender):
        message = delivery.message
        return pb.SendResponse(
            message_id=message.id,
            server_time_ms=message.created_ms,
            seq=delivery.seqs[sender],
            duplicate=delivery.duplicate,
        )

    def storeMessage(
        self, sender, clientMsgId, body, contentType, to=None, uids=None, groupId=None, origin=None
    ):
        """
        Store a message to one user (C{to}), a list of users (C{uids}) or a
        group's members (C{groupId}): exactly one of them.  The gate's
        C{send} and the HTTP API both come here.

        @param sender: the uid it is sent as, or L{imserver.store.SYSTEM} (no sender
            inbox; a group message as the system needs no membership).
        @param clientMsgId: the idempotency key, per sender.
        @param origin: the sending session that asked not to be pushed its
            own sends (L{send}), or L{None}.
        @return: a L{Deferred} firing with the L{imserver.store.Delivery}
            once durable, or failing with an L{RPCError} (C{NOT_MEMBER},
            C{UNAVAILABLE}).
        @raise RPCError: C{BAD_REQUEST} or C{MESSAGE_TOO_LARGE} for an
            invalid message, before anything is stored.
        """
        self.validate(clientMsgId, body, contentType, to, uids, groupId)
        if to is not None:
            uids = [to]
        message = pb.Message(
            recipient=to or "", group_id=groupId or "", body=body, content_type=contentType
        )
        started = self.clock.seconds()
        d = self.store.deliver(sender, clientMsgId, message, uids or [], int(started * 1000))
        d.addCallbacks(self._delivered, self.storeFailed, (started, origin))
        return d

    def validate(self, clientMsgId, body, contentType, to=None, uids=None, groupId=None):
        """
        Check a message as L{storeMessage} does.

        @raise RPCError: C{BAD_REQUEST} or C{MESSAGE_TOO_LARGE}.
        """
        if sum(x is not None for x in (to, uids, groupId)) != 1:
            raise BadRequest("name exactly one of: to, a group")
        if to is not None:
            uids = [to]
        if uids is not None:
            if not uids:
                raise BadRequest("no recipients")
            for uid in uids:
                validateUid(uid, "recipient")
        else:
            validateGroupId(groupId)
        validateClientMsgId(clientMsgId)
        validateContentType(contentType)
        if len(body) > self.settings.max_message_body:
            raise MessageTooLarge(
                "body of {} bytes exceeds the limit of {}".format(
                    len(body), self.settings.max_message_body
                )
            )

    def _delivered(self, delivery, started, origin=None):
        metrics = self.metrics
        if delivery.duplicate:
            metrics.dedupHits += 1
        else:
            metrics.messagesStored += 1
            if origin is not None:
                # Before the publish: the sending session may then leave its
                # own entry out of its stream (the answer is its copy).
                origin.sentHere(delivery.seqs[delivery.message.sender])
            self.publish(delivery)
            metrics.sendToPush.observe(self.clock.seconds() - started)
        return delivery

    def storeFailed(self, failure):
        """
        Errback: turn an unexpected store failure into C{UNAVAILABLE}.
        """
        if failure.check(RPCError):
            return failure
        self.log.failure("the message store failed", failure)
        raise Unavailable("message storage is unavailable; retry later")

    def publish(self, delivery):
        """
        Tell every session of every recipient of C{delivery} that its inbox
        advanced: one registry lookup, one serialization.
        """
        encoded = EncodedMessage(delivery.message)
        seqs = delivery.seqs
        self.registry.sessionsForMany(list(seqs)).addCallback(
            self._advance, seqs, delivery.message.sender, encoded
        ).addErrback(self._announceFailed, delivery.message.id)

    def _advance(self, found, seqs, sender, encoded):
        for uid, sessions in found.items():
            self.announce(sessions, seqs[uid], uid == sender, encoded)

    def announce(self, sessions, seq, outgoing, encoded):
        """
        Tell C{sessions}, all of one user, that an entry was committed to
        the user's inbox: they push it, or fetch what comes before it.

        @param seq: the entry's seq in that inbox.
        @param outgoing: whether the user sent it (the sender's copy).
        @param encoded: the message's L{EncodedMessage}, shared by every
            recipient.
        """
        for session in sessions:
            session.inboxAdvanced(seq, outgoing, encoded)

    def announceNewest(self, uid, sessions):
        """
        Announce C{uid}'s newest inbox entry to C{sessions}, read from the
        store: those behind it fetch what they missed (a session already
        past it ignores it).  Cluster mode's catch-up after Redis returns.

        @return: a L{Deferred} firing with the number of entries announced
            (0 for an empty inbox, else 1).
        """
        store = self.store

        def announce(entries):
            for entry in entries:
                self.announce(sessions, entry.seq, entry.outgoing, EncodedMessage(entry.message))
            return len(entries)

        def newest(head):
            if head <= 0:
                return 0
            return store.fetch(uid, head - 1, 1).addCallback(announce)

        return store.head(uid).addCallback(newest)

    def _announceFailed(self, failure, messageId):
        # Nothing is lost: the sessions fetch the entries on their next
        # pump, ack or reconnect (in cluster mode, the catch-up after Redis
        # returns announces them).
        if failure.check(Unavailable):
            self.log.warn(
                "announcing message {id} postponed: {why}",
                id=messageId,
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("announcing message {id} failed", failure, id=messageId)

    def typing(self, sender, to, active, groupId=""):
        """
        Forward a typing signal to the online sessions of C{to}, or of the
        other members of C{groupId} if the sender is one; nothing is stored.
        """
        if not groupId:
            self.registry.sessionsFor(to).addCallback(_typing, sender, active, "").addErrback(
                lambda failure: self.log.failure("typing failed", failure)
            )
            return
        d = self.store.members(groupId)
        d.addCallback(self._groupTyping, sender, active, groupId)
        d.addErrback(lambda failure: failure.trap(GroupNotFound))
        d.addErrback(lambda failure: self.log.failure("group typing failed", failure))

    def _groupTyping(self, members, sender, active, groupId):
        uids = [m.uid for m in members]
        if sender not in uids:
            return
        uids.remove(sender)
        self.registry.sessionsForMany(uids).addCallback(
            lambda found: [
                _typing(sessions, sender, active, groupId) for sessions in found.values()
            ]
        ).addErrback(lambda failure: self.log.failure("group typing failed", failure))


def _originalOr(delivery, refusal):
    """
    C{delivery} if there is one, else raise C{refusal}.
    """
    if delivery is None:
        raise refusal
    return delivery


def _typing(sessions, sender, active, groupId):
    for session in sessions:
        session.typing(sender, active, groupId)
