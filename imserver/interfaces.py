"""
The seams of imserver, as C{zope.interface} interfaces.

Each has an in-process implementation; cluster mode adds Redis ones.  Tests
run one suite against every implementation (see tests/test_registry.py).
"""

from zope.interface import Attribute, Interface


class IAuthenticator(Interface):
    """
    Decides whether a client may act as a uid.
    """

    def authenticate(uid, token):
        """
        Check C{token} for C{uid}.

        @type uid: L{str}
        @type token: L{str}
        @return: a L{Deferred} firing with the authenticated uid, or failing
            with L{imserver.errors.AuthFailed} (the same failure for every
            cause).
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

    def kick(reason, message):
        """
        Tell the client why, then close the session.

        @param reason: a L{imserver.pb.im_pb2.KickReason}.
        @param message: detail for the client.
        """


class ISessionRegistry(Interface):
    """
    Maps users and their devices to the sessions that hold them.

    At most one session per (uid, device id): registering a second displaces
    the first.  Unregistering a session that was displaced has no effect, so
    a late close of an old connection never removes a newer login.
    """

    def register(session):
        """
        Register an authenticated L{ISession}.

        @return: a L{Deferred} firing with the L{ISession} it displaced (same
            uid and device id), which the caller kicks, or L{None}; or
            failing with L{imserver.errors.TooManyDevices} if the user
            already has the maximum number of other devices registered.
        """

    def unregister(session):
        """
        Remove C{session} if, and only if, it is still the registered session
        for its uid and device id.

        @return: a L{Deferred} firing with L{True} if it was removed.
        """

    def sessionsFor(uid):
        """
        @return: a L{Deferred} firing with a L{list} of the L{ISession}s
            registered for C{uid}, in no particular order.
        """

    def count():
        """
        @return: a L{Deferred} firing with the number of registered sessions.
        """
