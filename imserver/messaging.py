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

#: Longest client_msg_id and content_type, in UTF-8 bytes.
MAX_CLIENT_MSG_ID = 64
MAX_CONTENT_TYPE = 64


def _bytesLength(text):
    return len(text.encode("utf-8"))


class Messenger:
    """
    Sends messages and transient signals.

    @ivar store: the L{IMessageStore}.
    @ivar registry: the L{ISessionRegistry}.
    """

    log = Logger()

    def __init__(self, store, registry, clock, settings):
        self.store = store
        self.registry = registry
        self.clock = clock
        self.settings = settings

    def nowMs(self):
        return int(self.clock.seconds() * 1000)

    def send(self, sender, request):
        """
        Store a 1:1 message from C{sender} (the authenticated uid, never a
        payload field) and tell the recipients' sessions.

        @type request: L{pb.SendRequest}
        @return: a L{Deferred} firing with a L{pb.SendResponse} once the
            message is durably in every inbox, or failing with an
            L{RPCError} (C{BAD_REQUEST}, C{MESSAGE_TOO_LARGE},
            C{UNAVAILABLE}).
        """
        try:
            validateUid(request.to)
        except ValueError as e:
            raise BadRequest("to: {}".format(e))
        if not request.client_msg_id:
            raise BadRequest("client_msg_id is empty")
        if _bytesLength(request.client_msg_id) > MAX_CLIENT_MSG_ID:
            raise BadRequest("client_msg_id is longer than 64 bytes")
        if _bytesLength(request.content_type) > MAX_CONTENT_TYPE:
            raise BadRequest("content_type is longer than 64 bytes")
        if len(request.body) > self.settings.max_message_body:
            raise MessageTooLarge(
                "body of {} bytes exceeds the limit of {}".format(
                    len(request.body), self.settings.max_message_body
                )
            )
        message = pb.Message(
            recipient=request.to, body=request.body, content_type=request.content_type
        )
        d = self.store.deliver(
            sender, request.client_msg_id, message, [request.to], self.nowMs()
        )
        d.addCallbacks(self._delivered, self.storeFailed, (sender,))
        return d

    def _delivered(self, delivery, sender):
        if not delivery.duplicate:
            self.publish(delivery)
        message = delivery.message
        return pb.SendResponse(
            message_id=message.id,
            server_time_ms=message.created_ms,
            seq=delivery.seqs[sender],
            duplicate=delivery.duplicate,
        )

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
        advanced.
        """
        message = delivery.message
        for uid, seq in delivery.seqs.items():
            entry = pb.InboxEntry(seq=seq, outgoing=uid == message.sender, message=message)
            self.registry.sessionsFor(uid).addCallback(_advance, entry)

    def typing(self, sender, to, active):
        """
        Forward a typing signal to the online sessions of C{to}; nothing is
        stored.
        """
        self.registry.sessionsFor(to).addCallback(_typing, sender, active)


def _advance(sessions, entry):
    for session in sessions:
        session.inboxAdvanced(entry)


def _typing(sessions, sender, active):
    for session in sessions:
        session.typing(sender, active)
