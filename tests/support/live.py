# -*- test-case-name: tests.test_cluster,tests.test_e2e,tests.test_registry -*-
"""
Waiting on the live reactor: for an event where there is one
(L{Changes}, L{ConnectionWatch}, L{withDeadline}), by polling with a
deadline where there is none (L{waitFor}).
"""

from twisted.internet import reactor
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from imserver.protocol import AUTHENTICATED


def withDeadline(d, seconds, what):
    """
    Fail C{d} with a L{TimeoutError} naming C{what} if it has not fired
    within C{seconds}.
    """

    def timedOut(failure):
        failure.trap(TimeoutError, CancelledError)
        raise TimeoutError("{} did not happen within {:.0f}s".format(what, seconds))

    return d.addTimeout(seconds, reactor).addErrback(timedOut)


class Changes:
    """
    Wakes a test when something it watches changes, instead of polling: the
    test calls L{changed} from the callback that changes the state (a
    client's C{onNotify} or C{onMessage}, ...), and L{until} fires the first
    time a predicate holds, checked at once and after every change.
    """

    def __init__(self, clock=reactor):
        """
        @param clock: where the deadlines of L{until} run.
        """
        self.clock = clock
        self._waiters = []

    def changed(self):
        """
        The watched state changed: fire the waiters whose predicate holds
        now (or fail those whose predicate raises).  They fire at the next
        turn of the reactor, not inside the caller's callback, so a test
        resumes as it would after a poll: on a clean stack.
        """
        for entry in list(self._waiters):
            predicate, d, timer = entry
            if entry not in self._waiters:
                continue
            try:
                done = predicate()
            except Exception:
                self._waiters.remove(entry)
                timer.cancel()
                self.clock.callLater(0, d.errback, Failure())
                continue
            if done:
                self._waiters.remove(entry)
                timer.cancel()
                self.clock.callLater(0, d.callback, None)

    def until(self, predicate, timeout, what=None):
        """
        @param what: what C{predicate} checks, for the failure (default:
            its C{repr}).
        @return: a L{Deferred} firing once C{predicate()} is true, or
            failing with L{AssertionError} if it is still false after
            C{timeout} seconds.
        """
        try:
            if predicate():
                return succeed(None)
        except Exception:
            return fail()
        d = Deferred()

        def expired():
            self._waiters.remove(entry)
            d.errback(
                AssertionError(
                    "still false after {} s: {}".format(timeout, what or repr(predicate))
                )
            )

        entry = (predicate, d, self.clock.callLater(timeout, expired))
        self._waiters.append(entry)
        return d


class ConnectionWatch:
    """
    Watches the server side of a L{imserver.protocol.GateFactory}: records
    every protocol it builds and tells when it has no connection left.

    @ivar built: every L{GateProtocol} built, in order.
    """

    def __init__(self, testCase, factory):
        self.factory = factory
        self.built = []
        self._waiters = []
        self._buildProtocol = factory.buildProtocol
        self._connectionClosed = factory.connectionClosed
        testCase.patch(factory, "buildProtocol", self.buildProtocol)
        testCase.patch(factory, "connectionClosed", self.connectionClosed)

    def buildProtocol(self, addr):
        """
        Build and record a protocol with the factory's own method.
        """
        protocol = self._buildProtocol(addr)
        self.built.append(protocol)
        return protocol

    def connectionClosed(self, protocol):
        """
        Let the factory forget C{protocol}, then wake the waiters if it was
        the last connection.
        """
        self._connectionClosed(protocol)
        if not self.factory.connections and not self.factory.closing:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def whenAllClosed(self):
        """
        @return: a L{Deferred} firing once the server has no open connection
            (at once if it has none now).
        """
        if not self.factory.connections and not self.factory.closing:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d

    def authenticated(self):
        """
        @return: the built protocols that ever completed auth.
        """
        return [
            p for p in self.built if p.session.state == AUTHENTICATED or p.session.uid is not None
        ]


def waitFor(predicate, timeout=5.0, interval=0.01):
    """
    Poll C{predicate} on the reactor until it is true: for state that
    changes with no event a test can wait on (prefer L{Changes}, or the
    code's own Deferreds and callbacks, where there is one).

    @return: a L{Deferred} firing once it is, or failing after C{timeout}
        seconds.
    """

    @inlineCallbacks
    def poll():
        deadline = reactor.seconds() + timeout
        while not predicate():
            if reactor.seconds() > deadline:
                raise AssertionError("still false after {} s: {!r}".format(timeout, predicate))
            yield deferLater(reactor, interval, lambda: None)

    return poll()
