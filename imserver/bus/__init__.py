"""
The gate bus (cluster mode): how one gate tells another about a session it
holds.  A message stored for a user whose session is on another gate is
announced on that gate's channel; a login displacing a session on another
gate kicks it there; typing signals and notices travel the same way.

C{redis}: Redis pub/sub, one channel per gate (L{channelOf}), one PUBLISH
per target gate per reactor pass, and one channel every gate listens to,
L{BROADCAST_CHANNEL}, for the app backend's broadcast notices.  One-node mode needs no bus: the
in-process registry hands out the sessions themselves.

Its two seams, L{imserver.interfaces.IGateBus} and
L{imserver.interfaces.IBusReceiver}, are declared with the others.
"""

#: Prefix of every gate's channel.
CHANNEL_PREFIX = "im:bus:"

#: The channel of broadcasts, to which every gate subscribes: under
#: L{CHANNEL_PREFIX} (so an ACL allowing C{im:bus:*} allows it), named by
#: no gate (a gate id cannot contain C{|}).
BROADCAST_CHANNEL = b"im:bus:|all"


def channelOf(gateId):
    """
    The channel gate C{gateId} subscribes to.

    @rtype: L{bytes}
    """
    return (CHANNEL_PREFIX + gateId).encode("utf-8")
