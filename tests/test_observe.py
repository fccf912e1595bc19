# -*- test-case-name: tests.test_observe -*-
"""
Tests for L{imserver.observe.OneShot}.
"""

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.observe import OneShot


class OneShotTests(SynchronousTestCase):
    """
    L{OneShot}.
    """

    def test_beforeAndAfter(self):
        """
        Waiters from before and after the event each get the result.
        """
        event = OneShot()
        early = event.when()
        self.assertNoResult(early)
        event.fire("done")
        self.assertEqual(self.successResultOf(early), "done")
        self.assertEqual(self.successResultOf(event.when()), "done")

    def test_onlyFirst(self):
        """
        Only the first C{fire} counts.
        """
        event = OneShot()
        event.fire(1)
        event.fire(2)
        self.assertEqual(self.successResultOf(event.when()), 1)

    def test_failure(self):
        """
        A L{Failure} fails every waiter, before and after.
        """
        event = OneShot()
        early = event.when()
        event.fire(Failure(ValueError("x")))
        self.failureResultOf(early, ValueError)
        self.failureResultOf(event.when(), ValueError)

    def test_fired(self):
        """
        C{fired} tells whether it happened, even with a L{None} result.
        """
        event = OneShot()
        self.assertFalse(event.fired)
        event.fire(None)
        self.assertTrue(event.fired)
