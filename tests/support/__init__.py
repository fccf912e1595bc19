# -*- test-case-name: tests -*-
"""
Helpers shared by the tests.

This package holds every harness more than one test module uses; a harness
only one module needs stays in that module.  Here: the environment of a gate
under test, the real service tree started in the test's process, the
cleanup of child processes, free ports, and the programs some tests need
(skipped when missing, except in CI).  The submodules:

  - L{tests.support.frames}: reading back the frames written to a
    L{twisted.internet.testing.StringTransport};
  - L{tests.support.gate}: a gate factory on a L{twisted.internet.task.Clock}
    and C{StringTransport}s (L{tests.support.gate.GateHarness},
    L{tests.support.gate.DeliveryHarness});
  - L{tests.support.live}: waiting on a live reactor: events
    (L{tests.support.live.Changes}), connections closing
    (L{tests.support.live.ConnectionWatch}), and bounded polling where
    there is no event;
  - L{tests.support.redis}: a real C{redis-server} and Redis connections;
  - L{tests.support.rediscluster}: a real six-node Redis Cluster (three
    primaries, three replicas), with failover and slot migration;
  - L{tests.support.cluster}: fake sessions and the Redis side of fake
    gates, on a real C{redis-server};
  - L{tests.support.twistd}: real C{twistd im} gate processes;
  - L{tests.support.webhooks}: a webhook receiver on loopback whose
    answers a test chooses, checking every signature;
  - L{tests.support.malformed}: the data format of the malformed-input
    suite (C{tests/data/malformed}), shared with C{fuzz/}.
"""

import os
import re
import shutil
import socket

from twisted.internet.error import ProcessExitedAlready
from twisted.python.filepath import FilePath
from twisted.trial.unittest import FailTest, SkipTest

from imserver import tap
from imserver.auth import SECRET_ENV
from imserver.spawn import childEnvironment


def freePort(host="127.0.0.1"):
    """
    A TCP port free on C{host} right now (the OS's choice; another process
    may take it before it is used, so a caller that binds it later retries
    with another one).
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def startServer(testCase, options):
    """
    Start the real service tree (what C{twistd im} runs) for C{options}
    on the global reactor; it is stopped at cleanup unless the test already
    stopped it.

    @param options: parsed L{imserver.tap.Options}.
    @return: the root service.
    """
    from twisted.internet import reactor

    root = tap.makeService(options, reactor)
    root.startService()
    testCase.addCleanup(lambda: root.stopService() if root.running else None)
    return root


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


#: The environment variable that turns a missing test dependency outside
#: Python (a program such as C{haproxy} or C{redis-server}) from a skip into
#: a failure.  C{.ci/run} sets it to C{1}, so CI cannot pass by skipping.
REQUIRE_ALL_ENV = "CI_REQUIRE_ALL"

#: Directories searched for programs after C{$PATH}: Debian installs daemons
#: such as C{haproxy} in C{/usr/sbin}, which is not on a user's C{$PATH}.
SBIN_DIRECTORIES = ("/usr/local/sbin", "/usr/sbin", "/sbin")

#: The environment variable that replaces L{SBIN_DIRECTORIES} (a
#: C{$PATH}-style list; empty: none).  C{.ci/run} empties it for its run with
#: the outside programs hidden, so that they are not found there either.
SBIN_ENV = "IMSERVER_TEST_SBIN"


def requireDependency(available, what):
    """
    Skip the calling test if something it needs outside Python is missing,
    or fail it if C{$CI_REQUIRE_ALL} is C{1}.  Call it from C{setUp} or a
    test method.

    @param available: whether the dependency is there.
    @param what: what is missing and how to get it, for the message (for
        example C{"haproxy (Debian package haproxy)"}).
    @raise SkipTest: if C{available} is false.
    @raise FailTest: instead, if C{$CI_REQUIRE_ALL} is C{1}.
    """
    if available:
        return
    if os.environ.get(REQUIRE_ALL_ENV) == "1":
        raise FailTest(
            "{} is required: ${}=1 makes a missing dependency a failure".format(
                what, REQUIRE_ALL_ENV
            )
        )
    raise SkipTest(
        "{} not found (with ${}=1, as in CI, this is a failure)".format(what, REQUIRE_ALL_ENV)
    )


def requireExecutable(name, what=None):
    """
    Find the program C{name} on C{$PATH} or in L{SBIN_DIRECTORIES}; skip
    the calling test if it is missing (fail it under C{$CI_REQUIRE_ALL}, see
    L{requireDependency}).

    @param what: the missing dependency, for the message (default: C{name}).
    @return: the program's path.
    """
    sbin = os.environ.get(SBIN_ENV)
    extra = SBIN_DIRECTORIES if sbin is None else [d for d in sbin.split(os.pathsep) if d]
    path = os.pathsep.join([os.environ.get("PATH", os.defpath)] + list(extra))
    found = shutil.which(name, path=path)
    requireDependency(found is not None, what or name)
    return found


def documentedMetrics():
    """
    The metric family names docs/api.md lists under C{GET /metrics} (each
    table row's backquoted C{imserver_*} names, without labels, and
    without C{_total}, which the families' names do not carry).

    @rtype: L{set} of L{str}
    """
    text = FilePath(__file__).parent().parent().parent().child("docs").child("api.md")
    section = text.getContent().decode("utf-8").split("### `GET /metrics`", 1)[1]
    section = section.split("\n### ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `imserver_"):
            first = line.split("|")[1]
            for name in re.findall(r"`(imserver_[a-z_]+)", first):
                names.add(name[: -len("_total")] if name.endswith("_total") else name)
    return names


def servedMetrics(registry):
    """
    The C{imserver_*} family names C{registry} serves.

    @rtype: L{set} of L{str}
    """
    return {m.name for m in registry.collect() if m.name.startswith("imserver_")}
