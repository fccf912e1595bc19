# -*- test-case-name: tests.test_registry -*-
"""
The in-process session registry and gate directory, for a single gate
process.
"""

from twisted.internet.defer import fail, succeed
from zope.interface import implementer

from imserver.errors import TooManyDevices
from imserver.interfaces import IGateDirectory, ISessionRegistry


@implementer(ISessionRegistry)
class MemorySessionRegistry:
    """
    Sessions by uid, then by device id, in dictionaries.

    @ivar maxDevices: sessions allowed per uid.
    """

    def __init__(self, maxDevices=10):
        self.maxDevices = maxDevices
        self._byUid = {}
        self._count = 0

    def register(self, session):
        devices = self._byUid.get(session.uid)
        if devices is None:
            devices = self._byUid[session.uid] = {}
        displaced = devices.get(session.deviceId)
        if displaced is None and len(devices) >= self.maxDevices:
            return fail(
                TooManyDevices(
                    "{} devices are already connected; the limit is {}".format(
                        len(devices), self.maxDevices
                    )
                )
            )
        devices[session.deviceId] = session
        if displaced is None:
            self._count += 1
        return succeed(displaced)

    def unregister(self, session):
        devices = self._byUid.get(session.uid)
        if devices is None or devices.get(session.deviceId) is not session:
            return succeed(False)
        del devices[session.deviceId]
        if not devices:
            del self._byUid[session.uid]
        self._count -= 1
        return succeed(True)

    def sessionsFor(self, uid):
        return succeed(list(self._byUid.get(uid, {}).values()))

    def sessionsForMany(self, uids):
        get = self._byUid.get
        return succeed({uid: list(devices.values()) for uid in uids if (devices := get(uid))})

    def count(self):
        return succeed(self._count)

    def broadcast(self, frame):
        return succeed(0)  # no other gate


@implementer(IGateDirectory)
class MemoryGateDirectory:
    """
    The gates of one process (so, this gate): a dictionary.  The API's
    dispatcher route (C{GET /v1/gates}) reads it in embedded mode.
    """

    def __init__(self):
        self._gates = {}

    def advertise(self, gateId, addresses):
        self._gates[gateId] = [tuple(a) for a in addresses]
        return succeed(None)

    def withdraw(self, gateId):
        self._gates.pop(gateId, None)
        return succeed(None)

    def gates(self):
        return succeed({gateId: list(a) for gateId, a in self._gates.items()})
