"""
The gate bus (cluster mode): how one gate tells another about a session it
holds.  A message stored for a user whose session is on another gate is
announced on that gate's channel; a login displacing a session on another
gate kicks it there; typing signals and notices travel the same way.

C{redis}: Redis pub/sub, one channel per gate (L{channelOf}), one PUBLISH
per target gate per reactor pass.  One-node mode needs no bus: the
in-process registry hands out the sessions themselves.

Its two seams, L{imserver.interfaces.IGateBus} and
L{imserver.interfaces.IBusReceiver}, are declared with the others.
"""

#: Prefix of every gate's channel.
CHANNEL_PREFIX = "im:bus:"


def channelOf(gateId):
    """
    The channel gate C{gateId} subscribes to.

    @rtype: L{bytes}
    """
    return (CHANNEL_PREFIX + gateId).encode("utf-8")
