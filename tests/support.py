"""
Helpers shared by the tests: the environment of a gate under test, and the
cleanup of child processes.
"""

import os

from twisted.internet.error import ProcessExitedAlready

from imserver.auth import SECRET_ENV
from imserver.spawn import childEnvironment


def withoutSecretEnvironment(testCase):
    """
    Remove C{$IMSERVER_SECRET} from the environment for the duration of
    C{testCase}, so the secret comes from the data directory.
    """
    saved = os.environ.pop(SECRET_ENV, None)
    if saved is not None:
        testCase.addCleanup(os.environ.__setitem__, SECRET_ENV, saved)


def serverEnvironment():
    """
    The environment for a gate under test: ours, without C{$IMSERVER_SECRET}
    (so the secret is the data directory's), with our C{sys.path} so a
    subprocess finds imserver and its twistd plugin wherever it runs.
    """
    env = childEnvironment()
    env.pop(SECRET_ENV, None)
    return env


def killAtCleanup(testCase, process, transport):
    """
    At the cleanup of C{testCase}, kill (SIGKILL) the child process of
    C{transport} if it is still running, and wait until it has ended.

    @param process: its protocol, with an C{ended} L{Deferred} that fires
        once the process has ended.
    """

    def kill():
        if process.ended.called:
            return None
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        return process.ended

    testCase.addCleanup(kill)
