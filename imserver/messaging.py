# -*- test-case-name: tests.test_delivery -*-
"""
Message semantics, independent of sockets: the gate (and later the HTTP
API) call L{Messenger}; it stores through an L{IMessageStore} and tells the
sessions of the recipients (found in the L{ISessionRegistry}) that their
inbox advanced.  The sessions push in order themselves.
"""

from twisted.logger import Logger

from imserver.auth import validateUid
from imserver.errors import BadRequest, MessageTooLarge, RPCError, Unavailable
from imserver.pb import im_pb2 as pb
from imserver.store import GroupNotFound
from imserver.wire import EncodedMessage

#: Longest client_msg_id and content_type, in UTF-8 bytes.
MAX_CLIENT_MSG_ID = 64
MAX_CONTENT_TYPE = 64



def _bytesLength(text):
    return len(text.encode("utf-8"))


class Messenger:
    """
    Sends messages and transient signals.

    @ivar store: the L{IMessageStore} (also an L{IGroupStore}).
    @ivar registry: the L{ISessionRegistry}.
    """

    log = Logger()

    def __init__(self, store, registry, clock, settings, metrics):
        self.store = store
        self.registry = registry
        self.clock = clock
        self.settings = settings
        self.metrics = metrics

    def send(self, sender, request):
        """
        Store a message from C{sender} (the authenticated uid, never a
        payload field) to a user or a group, and tell the recipients'
        sessions.

        @type request: L{pb.SendRequest}
        @return: a L{Deferred} firing with a L{pb.SendResponse} once the
            message is durably in every inbox, or failing with an
            L{RPCError} (C{NOT_MEMBER}, C{UNAVAILABLE}).
        @raise RPCError: C{BAD_REQUEST} or C{MESSAGE_TOO_LARGE} for an
            invalid request, before anything is stored.
        """
        if request.to and request.group_id:
            raise BadRequest("set one of to and group_id, not both")
        d = self.storeMessage(
            sender,
            request.client_msg_id,
            request.body,
            request.content_type,
            to=request.to or None,
            groupId=request.group_id or None,
        )
        return d.addCallback(self._answer, sender)

    def _answer(self, delivery, sender):
        message = delivery.message
        return pb.SendResponse(
            message_id=message.id,
            server_time_ms=message.created_ms,
            seq=delivery.seqs[sender],
            duplicate=delivery.duplicate,
        )

    def storeMessage(self, sender, clientMsgId, body, contentType, to=None, uids=None,
                     groupId=None):
        """
        Store a message to one user (C{to}), a list of users (C{uids}) or a
        group's members (C{groupId}): exactly one of them.  The gate's
        C{send} and the HTTP API both come here.

        @param sender: the uid it is sent as, or L{imserver.store.SYSTEM} (no sender
            inbox; a group message as the system needs no membership).
        @param clientMsgId: the idempotency key, per sender.
        @return: a L{Deferred} firing with the L{imserver.store.Delivery}
            once durable, or failing with an L{RPCError} (C{NOT_MEMBER},
            C{UNAVAILABLE}).
        @raise RPCError: C{BAD_REQUEST} or C{MESSAGE_TOO_LARGE} for an
            invalid message, before anything is stored.
        """
        if sum(x is not None for x in (to, uids, groupId)) != 1:
            raise BadRequest("name exactly one of: to, a group")
        if to is not None:
            uids = [to]
        if uids is not None:
            if not uids:
                raise BadRequest("no recipients")
            for uid in uids:
                try:
                    validateUid(uid)
                except ValueError as e:
                    raise BadRequest("recipient: {}".format(e))
        else:
            try:
                validateUid(groupId)
            except ValueError as e:
                raise BadRequest("group_id: {}".format(e))
        if not clientMsgId:
            raise BadRequest("client_msg_id is empty")
        if _bytesLength(clientMsgId) > MAX_CLIENT_MSG_ID:
            raise BadRequest("client_msg_id is longer than 64 bytes")
        if _bytesLength(contentType) > MAX_CONTENT_TYPE:
            raise BadRequest("content_type is longer than 64 bytes")
        if len(body) > self.settings.max_message_body:
            raise MessageTooLarge(
                "body of {} bytes exceeds the limit of {}".format(
                    len(body), self.settings.max_message_body
                )
            )
        message = pb.Message(
            recipient=to or "", group_id=groupId or "", body=body, content_type=contentType
        )
        started = self.clock.seconds()
        d = self.store.deliver(sender, clientMsgId, message, uids or [], int(started * 1000))
        d.addCallbacks(self._delivered, self.storeFailed, (started,))
        return d

    def _delivered(self, delivery, started):
        metrics = self.metrics
        if delivery.duplicate:
            metrics.dedupHits += 1
        else:
            metrics.messagesStored += 1
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
            _advance, seqs, delivery.message.sender, encoded
        ).addErrback(self._announceFailed, delivery.message.id)

    def _announceFailed(self, failure, messageId):
        # Nothing is lost: the sessions fetch the entries on their next
        # pump, ack or reconnect (in cluster mode, the catch-up after Redis
        # returns announces them).
        if failure.check(Unavailable):
            self.log.warn("announcing message {id} postponed: {why}",
                          id=messageId, why=failure.getErrorMessage())
        else:
            self.log.failure("announcing message {id} failed", failure, id=messageId)

    def typing(self, sender, to, active, groupId=""):
        """
        Forward a typing signal to the online sessions of C{to}, or of the
        other members of C{groupId} if the sender is one; nothing is stored.
        """
        if not groupId:
            self.registry.sessionsFor(to).addCallback(
                _typing, sender, active, ""
            ).addErrback(lambda failure: self.log.failure("typing failed", failure))
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
            lambda found: [_typing(sessions, sender, active, groupId)
                           for sessions in found.values()]
        ).addErrback(lambda failure: self.log.failure("group typing failed", failure))


def _advance(found, seqs, sender, encoded):
    for uid, sessions in found.items():
        seq = seqs[uid]
        outgoing = uid == sender
        for session in sessions:
            session.inboxAdvanced(seq, outgoing, encoded)


def _typing(sessions, sender, active, groupId):
    for session in sessions:
        session.typing(sender, active, groupId)
