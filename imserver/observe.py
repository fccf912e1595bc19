# -*- test-case-name: tests.test_observe -*-
"""
L{OneShot}: a result that arrives once, for any number of waiters.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

_PENDING = object()


class OneShot:
    """
    An event that happens once (a connection closed, a port listening);
    each caller of L{when} gets its own L{Deferred} for it, before or after
    it happened.
    """

    def __init__(self):
        self.result = _PENDING
        self._waiters = []

    @property
    def fired(self):
        """
        Whether L{fire} was called.
        """
        return self.result is not _PENDING

    def fire(self, result):
        """
        Fire with C{result} (a L{Failure} fails the waiters); later calls are
        ignored.
        """
        if self.fired:
            return
        self.result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result)

    def when(self):
        """
        @return: a new L{Deferred} firing with the result.
        """
        if not self.fired:
            d = Deferred()
            self._waiters.append(d)
            return d
        if isinstance(self.result, Failure):
            return fail(self.result)
        return succeed(self.result)
