# -*- test-case-name: tests.test_startup -*-
"""
Start-up mistakes as a user makes them: C{twistd -n im} with a wrong option,
a file it cannot use or a port already taken ends with one line on standard
error naming the option and what to do, exit status 1, no traceback, and
nothing created in the data directory (L{imserver.service.StartupError}).

L{StartupMistakeTests} runs the virtualenv's C{twistd} in a child process,
its working directory a temporary one, on loopback only, each run bounded
by L{DEADLINE}; the other tests check the same pieces in this process.
"""

import errno
import os
import sys
from io import StringIO

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError, ProcessTerminated
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.python.filepath import FilePath
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from imserver.service import ListenerService, ServerService, StartupError
from imserver.spawn import NotListening, spawnServer
from imserver.tls import makeSelfSigned

from tests.support import killAtCleanup, serverEnvironment

#: The virtualenv's C{twistd}, as a user runs it.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: Seconds a C{twistd} that is to stop at start may take (it takes about
#: one); one still running then is killed and the test fails.
DEADLINE = 60
SECRET = b"0123456789abcdef0123456789abcdef\n"
LOOPBACK = "tcp:0:interface=127.0.0.1"


class StartupMistakeTests(TestCase):
    """
    C{twistd -n im} with a mistake stops at once: exit status 1, one line
    on stderr starting with the option at fault, no C{Traceback} in its
    output, the data directory as it was, and no pidfile left behind.
    """

    def setUp(self):
        """
        A working directory with a secret file in it; the data directory
        is C{data} there, not created.
        """
        self.cwd = FilePath(self.mktemp())
        self.cwd.makedirs()
        self.dataDir = self.cwd.child("data")
        self.secret = self.cwd.child("secret")
        self.secret.setContent(SECRET)

    def state(self):
        """
        What the data directory holds: L{None} if it does not exist, the
        content of a file, else the sorted paths under it.
        """
        if not self.dataDir.exists():
            return None
        if not self.dataDir.isdir():
            return self.dataDir.getContent()
        return sorted(p.path for p in self.dataDir.walk())

    @inlineCallbacks
    def assertStops(self, option, *args):
        """
        Run C{twistd -n im --data-dir <data> *args} and check that it stops
        as a start-up mistake must.

        @param option: what the line on stderr starts with.
        @return: a L{Deferred} firing with that line.
        """
        before = self.state()
        argv = [TWISTD, "-n", "im", "--data-dir", self.dataDir.path] + list(args)
        process = spawnServer(reactor, argv, path=self.cwd.path, env=serverEnvironment())
        killAtCleanup(self, process, process.transport)
        # Listening is not what is waited for (one listener of several may).
        process.listening.addErrback(lambda f: f.trap(NotListening))
        reason = yield process.whenEnded().addTimeout(DEADLINE, reactor)
        output = process.text()
        self.assertIsInstance(reason, ProcessTerminated, output)
        self.assertEqual(reason.exitCode, 1, output)
        self.assertNotIn("Traceback", output)
        lines = process.errors.decode("utf-8", "replace").splitlines()
        self.assertEqual(len(lines), 1, output)
        [line] = lines
        self.assertTrue(line.startswith(option), line)
        self.assertEqual(self.state(), before)
        self.assertFalse(self.cwd.child("twistd.pid").exists())
        return line

    def takePort(self):
        """
        Listen on a loopback port for the duration of the test.

        @return: its number.
        """
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_listenPortInUse(self):
        """
        A C{--listen} port in use names the option, the address and the
        reason; the message store has not created its database.
        """
        port = self.takePort()
        self.dataDir.makedirs()
        listen = "tcp:{}:interface=127.0.0.1".format(port)
        line = yield self.assertStops(
            "--listen " + listen,
            "--listen",
            listen,
            "--api",
            "none",
            "--secret-file",
            self.secret.path,
        )
        self.assertEqual(
            line,
            "--listen {}: cannot listen on 127.0.0.1:{}: Address already in use; stop "
            "the program using that port or choose another one".format(listen, port),
        )

    @inlineCallbacks
    def test_apiPortInUse(self):
        """
        An C{--api} port in use names C{--api}.
        """
        port = self.takePort()
        self.dataDir.makedirs()
        api = "tcp:{}:interface=127.0.0.1".format(port)
        line = yield self.assertStops(
            "--api " + api,
            "--listen",
            LOOPBACK,
            "--api",
            api,
            "--admin-token-file",
            self.secret.path,
            "--secret-file",
            self.secret.path,
        )
        self.assertIn("Address already in use", line)

    @inlineCallbacks
    def test_missingCertificate(self):
        """
        A C{--tls-cert} that does not exist names C{--tls-cert} (not
        C{--listen}), and nothing is created: no data directory, no secret.
        """
        missing = self.cwd.child("missing.pem").path
        line = yield self.assertStops(
            "--tls-cert " + missing,
            "--listen",
            "ssl:0:interface=127.0.0.1",
            "--tls-cert",
            missing,
            "--tls-key",
            missing,
        )
        self.assertIn("No such file", line)

    @inlineCallbacks
    def test_keyNotOfCertificate(self):
        """
        A C{--tls-key} that is not the key of C{--tls-cert} names both.
        """
        cert, key = self.cwd.child("cert.pem"), self.cwd.child("key.pem")
        cert.setContent(makeSelfSigned()[0])
        key.setContent(makeSelfSigned()[1])
        line = yield self.assertStops(
            "--tls-cert " + cert.path, "--tls-cert", cert.path, "--tls-key", key.path
        )
        self.assertIn("--tls-key " + key.path, line)

    @inlineCallbacks
    def test_dataDirIsAFile(self):
        """
        A data directory that is a file names C{--data-dir}.
        """
        self.dataDir.setContent(b"not a directory")
        line = yield self.assertStops("--data-dir " + self.dataDir.path)
        self.assertIn("not a directory", line)

    @inlineCallbacks
    def test_dataDirCannotBeCreated(self):
        """
        A data directory under a file names C{--data-dir}.
        """
        self.dataDir.setContent(b"a file")
        self.dataDir = self.dataDir.child("data")
        yield self.assertStops("--data-dir " + self.dataDir.path)

    @inlineCallbacks
    def test_dataDirNotWritable(self):
        """
        A data directory this user cannot write names C{--data-dir}.
        """
        if os.geteuid() == 0:
            raise SkipTest("root writes anywhere (DataDirCheckTests covers this)")
        self.dataDir.makedirs()
        self.dataDir.chmod(0o500)
        self.addCleanup(self.dataDir.chmod, 0o700)
        line = yield self.assertStops("--data-dir " + self.dataDir.path)
        self.assertIn("cannot write", line)

    @inlineCallbacks
    def test_adminTokenFileMissing(self):
        """
        An C{--admin-token-file} that cannot be read names the option, not
        a "secret file".
        """
        missing = self.cwd.child("missing").path
        line = yield self.assertStops(
            "--admin-token-file " + missing, "--admin-token-file", missing
        )
        self.assertNotIn("secret", line)

    @inlineCallbacks
    def test_adminTokenFileTooShort(self):
        """
        An C{--admin-token-file} holding too short a token names the option.
        """
        short = self.cwd.child("short")
        short.setContent(b"short\n")
        yield self.assertStops("--admin-token-file " + short.path, "--admin-token-file", short.path)

    @inlineCallbacks
    def test_secretFileMissing(self):
        """
        A C{--secret-file} that cannot be read names the option.
        """
        missing = self.cwd.child("missing").path
        yield self.assertStops("--secret-file " + missing, "--secret-file", missing)

    @inlineCallbacks
    def test_settingNotANumber(self):
        """
        A setting that is not a number names the option and the value.
        """
        line = yield self.assertStops("--max-connections lots", "--max-connections", "lots")
        self.assertIn("whole number", line)

    @inlineCallbacks
    def test_settingZero(self):
        """
        A limit of zero names the option and its minimum.
        """
        line = yield self.assertStops("--max-connections", "--max-connections", "0")
        self.assertIn("at least 1", line)

    @inlineCallbacks
    def test_settingNegative(self):
        """
        A negative time names the option.
        """
        yield self.assertStops("--auth-timeout", "--auth-timeout", "-1")

    @inlineCallbacks
    def test_badListen(self):
        """
        A C{--listen} description no endpoint takes names it.
        """
        yield self.assertStops("--listen ssl:abc", "--listen", "ssl:abc")

    @inlineCallbacks
    def test_badApi(self):
        """
        An C{--api} description no endpoint takes names it.
        """
        yield self.assertStops("--api bogus:1", "--api", "bogus:1")

    @inlineCallbacks
    def test_badRedis(self):
        """
        A bad C{--redis} URL names the option, not the password in it.
        """
        line = yield self.assertStops("--redis", "--redis", "redis://u:s3cret@h:port")
        self.assertNotIn("s3cret", line)

    @inlineCallbacks
    def test_unknownOption(self):
        """
        An unknown option is one line too, pointing at C{--help}.
        """
        line = yield self.assertStops("option --bogus", "--bogus")
        self.assertIn("--help", line)


@implementer(IStreamServerEndpoint)
class TakenEndpoint:
    """
    An endpoint whose port is in use.

    @ivar listens: how many times it was asked to listen.
    """

    def __init__(self):
        self.listens = 0

    def listen(self, factory):
        self.listens += 1
        error = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        return fail(CannotListenError("127.0.0.1", 7443, error))


class ListenerStartTests(SynchronousTestCase):
    """
    L{ListenerService} listens once, when twistd starts the privileged
    part of the services or else at L{ListenerService.startService}, and a
    port it cannot listen on is a L{StartupError}.
    """

    def test_startupError(self):
        """
        L{StartupError} ends a process as L{SystemExit} does, its message
        printed and exit status 1, and is an L{Exception} for twistd's
        clean-up and for callers.
        """
        e = StartupError("--listen x: wrong")
        self.assertIsInstance(e, SystemExit)
        self.assertIsInstance(e, Exception)
        self.assertEqual(e.code, "--listen x: wrong")
        self.assertEqual(str(e), "--listen x: wrong")

    def test_portInUse(self):
        """
        A port in use is a L{StartupError} from
        L{ListenerService.privilegedStartService} naming the option, the
        description, the address, the reason and the remedy.
        """
        service = ListenerService("tcp:7443:interface=127.0.0.1", TakenEndpoint(), Factory())
        e = self.assertRaises(StartupError, service.privilegedStartService)
        self.assertEqual(
            str(e),
            "--listen tcp:7443:interface=127.0.0.1: cannot listen on 127.0.0.1:7443: "
            "Address already in use; stop the program using that port or choose "
            "another one",
        )
        self.failureResultOf(service.whenListening(), CannotListenError)

    def test_apiPortInUse(self):
        """
        Without L{ListenerService.privilegedStartService},
        L{ListenerService.startService} raises it, naming the given option.
        """
        service = ListenerService("tcp:7480", TakenEndpoint(), Factory(), option="--api")
        e = self.assertRaises(StartupError, service.startService)
        self.assertTrue(str(e).startswith("--api tcp:7480: cannot listen on 127.0.0.1:7443:"))

    def test_listensOnce(self):
        """
        Listening in L{ListenerService.privilegedStartService}, it does not
        listen again in L{ListenerService.startService}; after a stop, it
        listens again.
        """
        memory = MemoryReactor()
        service = ListenerService("tcp:7000", TCP4ServerEndpoint(memory, 7000), Factory())
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(memory.tcpServers), 1)
        self.successResultOf(service.whenListening())
        service.stopService()
        service.startService()
        self.assertEqual(len(memory.tcpServers), 2)

    def test_rootWritesStandardError(self):
        """
        Under twistd, which has redirected C{sys.stderr} into its log, the
        root service writes the L{StartupError} from the privileged start to
        the process's own standard error too.
        """
        original, redirected = StringIO(), StringIO()
        self.patch(sys, "__stderr__", original)
        self.patch(sys, "stderr", redirected)
        root = ServerService()
        ListenerService("tcp:7443", TakenEndpoint(), Factory()).setServiceParent(root)
        e = self.assertRaises(StartupError, root.privilegedStartService)
        self.assertEqual(original.getvalue(), str(e) + "\n")
        self.assertEqual(redirected.getvalue(), "")


class DataDirCheckTests(SynchronousTestCase):
    """
    As twistd's C{im} subcommand, the options refuse a data directory this
    user cannot write with a L{StartupError} naming C{--data-dir}, before
    anything is written (checked here, as root may write anywhere).
    """

    def test_notWritable(self):
        """
        An existing data directory that cannot be written is refused.
        """
        dataDir = FilePath(self.mktemp())
        dataDir.makedirs()
        access = os.access
        self.patch(os, "access", lambda path, mode: path != dataDir.path and access(path, mode))
        e = self.assertRaises(
            StartupError, ServerOptions().parseOptions, ["im", "--data-dir", dataDir.path]
        )
        self.assertTrue(
            str(e).startswith("--data-dir {}: this user cannot write".format(dataDir.path)), str(e)
        )
        self.assertEqual(dataDir.listdir(), [])

    def test_cannotCreate(self):
        """
        A data directory whose parent cannot be written is refused.
        """
        parent = FilePath(self.mktemp())
        parent.makedirs()
        access = os.access
        self.patch(os, "access", lambda path, mode: path != parent.path and access(path, mode))
        dataDir = parent.child("data")
        e = self.assertRaises(
            StartupError, ServerOptions().parseOptions, ["im", "--data-dir", dataDir.path]
        )
        self.assertIn("cannot be created", str(e))
        self.assertFalse(dataDir.exists())
