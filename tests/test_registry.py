"""
Tests for session registries: one suite, run against every implementation
of L{ISessionRegistry}.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imserver.errors import TooManyDevices
from imserver.interfaces import ISession, ISessionRegistry
from imserver.registry.memory import MemorySessionRegistry


@implementer(ISession)
class FakeSession:
    """
    A session that records kicks.
    """

    platform = 0
    gateId = "g"

    def __init__(self, uid, deviceId):
        self.uid = uid
        self.deviceId = deviceId
        self.sessionId = "{}/{}/{}".format(uid, deviceId, id(self))
        self.kicks = []

    def kick(self, reason, message):
        self.kicks.append(reason)


class RegistryTestsMixin:
    """
    The behaviour every L{ISessionRegistry} shares.  Subclasses provide
    C{makeRegistry(maxDevices)}.
    """

    def setUp(self):
        self.registry = self.makeRegistry(maxDevices=3)

    def result(self, d):
        return self.successResultOf(d)

    def test_interface(self):
        """
        The registry provides L{ISessionRegistry}.
        """
        verifyObject(ISessionRegistry, self.registry)

    def test_registerAndLookup(self):
        """
        Registered sessions are found by uid and counted.
        """
        a, b = FakeSession("alice", "phone"), FakeSession("alice", "laptop")
        self.assertIsNone(self.result(self.registry.register(a)))
        self.assertIsNone(self.result(self.registry.register(b)))
        self.result(self.registry.register(FakeSession("bob", "phone")))
        self.assertEqual(set(self.result(self.registry.sessionsFor("alice"))), {a, b})
        self.assertEqual(self.result(self.registry.sessionsFor("carol")), [])
        self.assertEqual(self.result(self.registry.count()), 3)

    def test_sessionsForMany(self):
        """
        One lookup for many uids returns the sessions of those that have
        any.
        """
        a, b = FakeSession("alice", "phone"), FakeSession("alice", "laptop")
        c = FakeSession("bob", "phone")
        for session in (a, b, c, FakeSession("dave", "phone")):
            self.result(self.registry.register(session))
        found = self.result(self.registry.sessionsForMany(["alice", "bob", "carol"]))
        self.assertEqual({uid: set(s) for uid, s in found.items()},
                         {"alice": {a, b}, "bob": {c}})

    def test_displace(self):
        """
        Registering the same uid and device again returns the displaced
        session; the count stays.
        """
        old, new = FakeSession("alice", "phone"), FakeSession("alice", "phone")
        self.result(self.registry.register(old))
        self.assertIs(self.result(self.registry.register(new)), old)
        self.assertEqual(self.result(self.registry.sessionsFor("alice")), [new])
        self.assertEqual(self.result(self.registry.count()), 1)

    def test_staleUnregister(self):
        """
        Unregistering a displaced session never removes the newer one.
        """
        old, new = FakeSession("alice", "phone"), FakeSession("alice", "phone")
        self.result(self.registry.register(old))
        self.result(self.registry.register(new))
        self.assertFalse(self.result(self.registry.unregister(old)))
        self.assertEqual(self.result(self.registry.sessionsFor("alice")), [new])
        self.assertTrue(self.result(self.registry.unregister(new)))
        self.assertEqual(self.result(self.registry.sessionsFor("alice")), [])
        self.assertEqual(self.result(self.registry.count()), 0)

    def test_unregisterUnknown(self):
        """
        Unregistering a session never registered is a no-op.
        """
        self.assertFalse(self.result(self.registry.unregister(FakeSession("x", "y"))))

    def test_maxDevices(self):
        """
        A new device beyond the limit fails with L{TooManyDevices}; an
        existing device may still re-register.
        """
        for device in "abc":
            self.result(self.registry.register(FakeSession("alice", device)))
        self.failureResultOf(self.registry.register(FakeSession("alice", "d")), TooManyDevices)
        self.assertIsNotNone(self.result(self.registry.register(FakeSession("alice", "a"))))
        self.assertEqual(self.result(self.registry.count()), 3)


class MemoryRegistryTests(RegistryTestsMixin, SynchronousTestCase):
    """
    L{MemorySessionRegistry}.
    """

    def makeRegistry(self, maxDevices):
        return MemorySessionRegistry(maxDevices=maxDevices)
