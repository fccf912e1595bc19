"""
The gate bus (cluster mode): how one gate tells another about a session it
holds.  A message stored for a user whose session is on another gate is
announced on that gate's channel; a login displacing a session on another
gate kicks it there; typing signals and notices travel the same way.

C{redis}: Redis pub/sub, one channel per gate (L{channelOf}), one PUBLISH
per target gate per reactor pass.  One-node mode needs no bus: the
in-process registry hands out the sessions themselves.

The two seams are declared here, next to their only implementation, until
L{imserver.interfaces} takes them in.
"""

from zope.interface import Attribute, Interface

#: Prefix of every gate's channel.
CHANNEL_PREFIX = "im:bus:"


def channelOf(gateId):
    """
    The channel gate C{gateId} subscribes to.

    @rtype: L{bytes}
    """
    return (CHANNEL_PREFIX + gateId).encode("utf-8")


class IGateBus(Interface):
    """
    Delivers notifications to the sessions another gate holds.  Every
    method queues and returns at once; delivery is best effort (a gate that
    is gone gets nothing, and its users find their messages in their
    inboxes when they resume).
    """

    receiver = Attribute(
        "The L{IBusReceiver} of this gate: what arrives on its own channel "
        "goes there."
    )

    def push(gateId, uid, seq, outgoing, push):
        """
        Tell gate C{gateId} that entry C{seq} of C{uid}'s inbox was
        committed.

        @type push: L{imserver.messaging.MessagePush}: the same object for
            every recipient of one message, so it is carried once per gate.
        """

    def kick(gateId, uid, deviceId, sessionId, generation, reason, message):
        """
        Ask gate C{gateId} to kick session C{sessionId} if it still holds
        it with registration C{generation}.
        """

    def typing(gateId, toUid, fromUid, active, groupId):
        """
        Forward a typing signal of C{fromUid} to the sessions of C{toUid}
        on gate C{gateId}.
        """

    def notice(gateId, sessionId, frame):
        """
        Have gate C{gateId} write the encoded notice C{frame} to session
        C{sessionId}.
        """


class IBusReceiver(Interface):
    """
    What a gate does with what the bus brings it (the cluster session
    registry, which knows this gate's sessions).
    """

    def pushReceived(push, targets):
        """
        @type push: L{imserver.messaging.MessagePush}
        @param targets: C{(uid, seq, outgoing)} tuples: call
            C{inboxAdvanced(seq, outgoing, push)} on every local session of
            each uid.
        """

    def kickReceived(uid, deviceId, sessionId, generation, reason, message):
        """
        Kick local session C{sessionId} if its generation is C{generation}.
        """

    def typingReceived(toUid, fromUid, active, groupId):
        """
        Forward a typing signal to the local sessions of C{toUid}.
        """

    def noticeReceived(sessionId, frame):
        """
        Write C{frame} to local session C{sessionId}.
        """
