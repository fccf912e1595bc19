# -*- test-case-name: tests.test_registry,tests.test_bus -*-
"""
The sessions of other gates, as the cluster registry's lookups return them
(L{imserver.registry.redis.RedisSessionRegistry}): their L{ISession}
methods go over the gate bus (L{imserver.interfaces.IGateBus}) to the gate
that holds them.
"""

from zope.interface import implementer

from imserver.interfaces import ISession


@implementer(ISession)
class RemoteSession:
    """
    A session another gate holds, as a lookup finds it: its attributes, and
    the L{ISession} methods, which go over the gate bus to that gate.

    @ivar generation: its registration's generation (a kick names it, so
        the owner kicks only the registration that was looked up).
    """

    __slots__ = ("uid", "deviceId", "platform", "sessionId", "gateId", "generation", "_bus")

    def __init__(self, bus, uid, deviceId, platform, sessionId, gateId, generation):
        self._bus = bus
        self.uid = uid
        self.deviceId = deviceId
        self.platform = platform
        self.sessionId = sessionId
        self.gateId = gateId
        self.generation = generation

    def __repr__(self):
        return "<RemoteSession {} {}/{} on {} gen {}>".format(
            self.sessionId, self.uid, self.deviceId, self.gateId, self.generation
        )

    def __eq__(self, other):
        if not isinstance(other, RemoteSession):
            return NotImplemented
        return (self.gateId, self.sessionId, self.generation) == (
            other.gateId,
            other.sessionId,
            other.generation,
        )

    def __hash__(self):
        return hash((self.gateId, self.sessionId, self.generation))

    def kick(self, reason, message):
        self._bus.kick(
            self.gateId, self.uid, self.deviceId, self.sessionId, self.generation, reason, message
        )

    def inboxAdvanced(self, seq, outgoing, encoded):
        self._bus.forward(self.gateId, self.uid, seq, outgoing, encoded)

    def typing(self, uid, active, groupId):
        self._bus.typing(self.gateId, self.uid, uid, active, groupId)

    def notice(self, frame):
        self._bus.notice(self.gateId, self.sessionId, frame)
