"""
Tests for the help and version of imserver's own commands
(L{imserver.commandline}): C{python -m imserver} (L{imserver.__main__})
and its subcommands, C{im-bench} and its scenarios, C{python -m
imserver.bench.micro}.

The options classes are driven directly, with standard output replaced;
three tests run C{python -m imserver} in a subprocess, as a user would.
"""

import os
import re
import sys
from io import StringIO

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver import __main__ as imserverMain, __version__, commandline
from imserver.bench import cli as benchCli, echo, micro
from imserver.bench.scenarios import SCENARIOS
from imserver.spawn import childEnvironment

#: The repository's folder (holding imserver/ and the plugin folder twisted/).
ROOT = FilePath(__file__).parent().parent()

#: Epytext markup, which has no place in a --help text.
EPYTEXT = re.compile(r"\b[BCILU]\{|@(param|return|type|ivar)\b")


def _run(options, argv):
    """
    Parse C{argv} with C{options} as a command would, catching the exit.

    @return: C{(exit code, standard output)}.
    """
    out = StringIO()
    stdout, sys.stdout = sys.stdout, out
    try:
        options.parseOptions(argv)
    except SystemExit as e:
        return e.code, out.getvalue()
    finally:
        sys.stdout = stdout
    raise AssertionError("{!r} did not exit".format(argv))


class CommandsMixin:
    """
    Every command and subcommand, as C{(name, options factory, argv prefix)}.
    """

    def commands(self):
        """
        @return: C{(name, options factory, argv prefix)} of every command.
        """
        commands = [
            ("python -m imserver", imserverMain.Options, []),
            ("python -m imserver chat", imserverMain.Options, ["chat"]),
            ("python -m imserver token", imserverMain.Options, ["token"]),
            ("im-bench", benchCli.Options, []),
            ("python -m imserver.bench.micro", micro.Options, []),
            ("im-bench echo-server", echo.EchoServerOptions, []),
        ]
        for name in SCENARIOS:
            commands.append(("im-bench " + name, benchCli.Options, [name]))
        return commands


class VersionTests(SynchronousTestCase, CommandsMixin):
    """
    C{--version} prints imserver's version, not Twisted's.
    """

    def test_version(self):
        """
        Every command and subcommand prints C{imserver <version>} and exits
        with status 0.
        """
        for name, options, prefix in self.commands():
            status, out = _run(options(), prefix + ["--version"])
            self.assertEqual((status, out), (0, "imserver {}\n".format(__version__)), name)

    def test_versionDocumented(self):
        """
        C{--help} describes C{--version} as imserver's.
        """
        for name, options, prefix in self.commands():
            status, out = _run(options(), prefix + ["--help"])
            self.assertIn("Display imserver's version", out, name)
            self.assertNotIn("Twisted version", out, name)


class HelpTests(SynchronousTestCase, CommandsMixin):
    """
    C{--help} is plain text with a usage line naming the real commands.
    """

    def test_plainText(self):
        """
        No help text has epytext markup (from a module docstring, which
        L{twisted.python.usage.Options} shows when a class has no
        C{longdesc}), whatever module runs as C{__main__}; each starts with
        C{Usage:}.
        """
        self.patch(sys.modules["__main__"], "__doc__", "C{python -m something}.")
        for name, options, prefix in self.commands():
            status, out = _run(options(), prefix + ["--help"])
            self.assertEqual(status, 0, name)
            self.assertIsNone(EPYTEXT.search(out), (name, out))
            self.assertTrue(out.startswith("Usage: " + name), (name, out[:80]))

    def test_base(self):
        """
        L{commandline.Options} has an empty C{longdesc} of its own.
        """
        self.patch(sys.modules["__main__"], "__doc__", "C{python -m something}.")
        status, out = _run(commandline.Options(), ["--help"])
        self.assertNotIn("something", out)

    def test_imserverCommands(self):
        """
        C{python -m imserver --help} names its commands in the usage line
        and lists them; a command's help has the usage line of the command.
        """
        status, out = _run(imserverMain.Options(), ["--help"])
        self.assertTrue(
            out.startswith("Usage: python -m imserver (chat | token | web-url) [options]\n"), out
        )
        self.assertRegex(out, r"\n    chat +Chat with another user")
        self.assertRegex(out, r"\n    token +Mint a client token")
        self.assertRegex(out, r"\n    web-url +Print the chat page's address")
        self.assertNotIn("COMMAND [options]", out)
        status, out = _run(imserverMain.Options(), ["chat", "--help"])
        self.assertTrue(out.startswith("Usage: python -m imserver chat --uid UID "), out)

    def test_benchScenarios(self):
        """
        C{im-bench --help} names every scenario in the usage line; a
        scenario's help describes it.
        """
        status, out = _run(benchCli.Options(), ["--help"])
        self.assertTrue(
            out.startswith("Usage: im-bench ({}) [options]\n".format(" | ".join(SCENARIOS))), out
        )
        for name in SCENARIOS:
            status, out = _run(benchCli.Options(), [name, "--help"])
            self.assertTrue(out.startswith("Usage: im-bench {} [options]".format(name)), out)
            description = out.rstrip().split("\n\n")[-1]
            self.assertGreater(len(description), 40, (name, out))

    def test_usageError(self):
        """
        A usage error shows the usage of the command it is about, then the
        error, and exits with status 2.
        """
        stderr = StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(imserverMain.main(["token"]), 2)
        text = stderr.getvalue()
        self.assertTrue(text.startswith("Usage: python -m imserver token --uid UID"), text)
        self.assertTrue(text.endswith("\npython -m imserver: --uid is required\n"), text)


class SubprocessTests(TestCase):
    """
    C{python -m imserver} run as a user runs it.
    """

    timeout = 60

    def runPython(self, *args, **kwargs):
        """
        Run C{python args} in the repository's folder.

        @return: a L{Deferred} firing with C{(out, err, status)}.
        """
        return getProcessOutputAndValue(
            sys.executable, args, env=childEnvironment(), path=ROOT.path, reactor=reactor, **kwargs
        )

    def test_help(self):
        """
        C{python -m imserver --help} is plain text and exits with status 0.
        """

        def check(result):
            out, err, status = result
            out = out.decode("utf-8")
            self.assertEqual(status, 0, err)
            self.assertTrue(
                out.startswith("Usage: python -m imserver (chat | token | web-url)"), out
            )
            self.assertIsNone(EPYTEXT.search(out), out)

        return self.runPython("-m", "imserver", "--help").addCallback(check)

    def test_version(self):
        """
        C{python -m imserver --version} prints imserver's version.
        """

        def check(result):
            out, err, status = result
            self.assertEqual((out, status), ("imserver {}\n".format(__version__).encode(), 0), err)

        return self.runPython("-m", "imserver", "--version").addCallback(check)

    def test_withoutTwisted(self):
        """
        A Python without Twisted, run in the repository's folder (where the
        plugin folder C{twisted/} would pass for an empty Twisted), says to
        use the virtualenv's Python instead of failing with C{No module
        named 'twisted.python'}; status 1.  (C{-S} leaves site-packages,
        and C{-E} C{$PYTHONPATH}, so Twisted, out of C{sys.path}.)
        """
        self.assertTrue(ROOT.child("twisted").child("plugins").isdir())
        self.assertFalse(ROOT.child("twisted").child("__init__.py").exists())

        def check(result):
            out, err, status = result
            err = err.decode("utf-8")
            self.assertEqual(status, 1, err)
            self.assertIn("cannot import Twisted", err)
            self.assertIn(".venv/bin/python -m imserver", err)
            self.assertNotIn("Traceback", err)

        return self.runPython("-E", "-S", "-m", "imserver", "--help").addCallback(check)


if os.name != "posix":  # pragma: no cover
    SubprocessTests.skip = "POSIX only"
