# -*- test-case-name: tests.test_tap -*-
"""
Tests for the C{twistd im} plugin, its options and service tree
(L{imserver.tap}), and the C{python -m imserver token} command
(L{imserver.__main__}).

Everything here is deterministic: the service tree is built and started on
a L{MemoryReactorClock}, so nothing listens on a real socket.
"""

import gc
import os
import stat
import sys
import time
from io import StringIO

from google.protobuf.internal import api_implementation
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from imserver import tap
from imserver.__main__ import main
from imserver.auth import loadSecret, verifyToken
from imserver.datadir import (
    CERT_FILE_NAME,
    KEY_FILE_NAME,
    MESSAGES_FILE_NAME,
    SECRET_FILE_NAME,
)
from imserver.protocol import GateFactory
from imserver.service import GateService, ListenerService, ServerService
from imserver.settings import Settings, optionName, settingFields
from imserver.tls import makeSelfSigned

from tests.support import withoutSecretEnvironment

SSL_LISTEN = "ssl:0:interface=127.0.0.1"
TCP_LISTEN = "tcp:0:interface=127.0.0.1"


def _mode(path):
    """
    The permission bits of the file at C{path} (a L{FilePath}).
    """
    return stat.S_IMODE(os.stat(path.path).st_mode)


class PluginTests(SynchronousTestCase):
    """
    The C{im} plugin is found by twistd's plugin discovery.
    """

    def test_found(self):
        """
        L{getPlugins} finds exactly one L{IServiceMaker} with tapname C{im},
        whose options and service maker are those of L{imserver.tap}.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "im"]
        self.assertEqual(len(makers), 1)
        [maker] = makers
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)


class OptionsTests(SynchronousTestCase):
    """
    Parsing of L{tap.Options}.
    """

    def parse(self, *argv):
        """
        Parse C{argv} with fresh L{tap.Options}.

        @return: the parsed options.
        """
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        """
        With no arguments the gate listens on the embedded default, uses
        C{imserver-data} and the default L{Settings}.
        """
        options = self.parse()
        self.assertEqual(options["listen"], ["ssl:7443:interface=127.0.0.1"])
        self.assertEqual(options["listen"], [tap.DEFAULT_LISTEN])
        self.assertEqual(options["data-dir"], "imserver-data")
        self.assertIsNone(options["tls-cert"])
        self.assertIsNone(options["tls-key"])
        self.assertIsNone(options["secret-file"])
        self.assertIsNone(options["gate-id"])
        self.assertEqual(options.settings, Settings())

    def test_listenRepeated(self):
        """
        Every C{--listen} is kept, in command-line order, and none of them
        is the default.
        """
        options = self.parse(
            "--listen", "tcp:7000", "--listen", SSL_LISTEN, "--listen", "tcp6:7001"
        )
        self.assertEqual(options["listen"], ["tcp:7000", SSL_LISTEN, "tcp6:7001"])

    def test_listenNotShared(self):
        """
        The C{--listen} list belongs to one L{tap.Options} instance.
        """
        self.parse("--listen", "tcp:7000")
        self.assertEqual(self.parse()["listen"], [tap.DEFAULT_LISTEN])

    def test_maxFrameLength(self):
        """
        C{--max-frame-length} sets L{Settings.max_frame_length}, as an
        integer, and leaves the other settings at their defaults.
        """
        settings = self.parse("--max-frame-length", "100000").settings
        self.assertEqual(settings.max_frame_length, 100000)
        self.assertIsInstance(settings.max_frame_length, int)
        self.assertEqual(settings, Settings(max_frame_length=100000))

    def test_maxFrameLengthBelowPreauthDefault(self):
        """
        A C{--max-frame-length} below the default pre-auth limit (4096) and
        message body limit (32 KiB) needs both lowered with it.
        """
        self.assertRaises(UsageError, self.parse, "--max-frame-length", "1000")
        self.assertRaises(
            UsageError,
            self.parse,
            "--max-frame-length",
            "1000",
            "--preauth-max-frame-length",
            "1000",
        )
        settings = self.parse(
            "--max-frame-length",
            "2000",
            "--preauth-max-frame-length",
            "1000",
            "--max-message-body",
            "976",
        ).settings
        self.assertEqual(
            (settings.max_frame_length, settings.preauth_max_frame_length), (2000, 1000)
        )

    def test_everySettingIsAnOption(self):
        """
        Every field of L{Settings} is an option named after it that sets it,
        coerced to the field's type.
        """
        for f in settingFields():
            value = f.default + 1 if f.type is int else f.default / 2
            settings = self.parse(optionName(f.name), str(value)).settings
            self.assertEqual(getattr(settings, f.name), value, f.name)
            self.assertIsInstance(getattr(settings, f.name), f.type, f.name)
            self.assertEqual(settings, Settings(**{f.name: value}), f.name)

    def test_settingNotANumber(self):
        """
        A setting that is not a number is a L{UsageError}; so is a fraction
        for an integer setting.
        """
        self.assertRaises(UsageError, self.parse, "--max-frame-length", "lots")
        self.assertRaises(UsageError, self.parse, "--max-frame-length", "1.5")
        self.assertRaises(UsageError, self.parse, "--idle-timeout", "soon")

    def test_settingBelowMinimum(self):
        """
        A setting below its minimum is a L{UsageError} naming the option.
        """
        e = self.assertRaises(UsageError, self.parse, "--max-devices", "0")
        self.assertIn("--max-devices", str(e))

    def test_idleTimeoutNotAboveHeartbeat(self):
        """
        C{--idle-timeout} must exceed C{--heartbeat-interval}.
        """
        e = self.assertRaises(
            UsageError,
            self.parse,
            "--idle-timeout",
            "30",
            "--heartbeat-interval",
            "30",
        )
        self.assertIn("--idle-timeout", str(e))
        self.assertRaises(
            UsageError,
            self.parse,
            "--idle-timeout",
            "10",
            "--heartbeat-interval",
            "20",
        )

    def test_tlsCertWithoutKey(self):
        """
        C{--tls-cert} and C{--tls-key} go together.
        """
        certPEM, keyPEM = makeSelfSigned()
        cert, key = FilePath(self.mktemp()), FilePath(self.mktemp())
        cert.setContent(certPEM)
        key.setContent(keyPEM)
        self.assertRaises(UsageError, self.parse, "--tls-cert", cert.path)
        self.assertRaises(UsageError, self.parse, "--tls-key", key.path)
        options = self.parse("--tls-cert", cert.path, "--tls-key", key.path)
        self.assertEqual((options["tls-cert"], options["tls-key"]), (cert.path, key.path))

    def test_heartbeatJitterTooLarge(self):
        """
        C{--heartbeat-jitter} above 0.9 is refused.
        """
        e = self.assertRaises(UsageError, self.parse, "--heartbeat-jitter", "0.95")
        self.assertIn("--heartbeat-jitter", str(e))

    def test_preauthFrameLargerThanFrame(self):
        """
        C{--preauth-max-frame-length} must not exceed C{--max-frame-length}.
        """
        self.assertRaises(UsageError, self.parse, "--preauth-max-frame-length", "70000")
        self.assertRaises(
            UsageError,
            self.parse,
            "--max-frame-length",
            "1000",
            "--preauth-max-frame-length",
            "1001",
        )

    def test_listenUnterminatedEscape(self):
        """
        A C{--listen} description ending in a backslash is a L{UsageError}
        at parse time.
        """
        e = self.assertRaises(UsageError, self.parse, "--listen", "tcp:7000\\")
        self.assertIn("--listen", str(e))


class MakeServiceTests(SynchronousTestCase):
    """
    L{tap.makeService} builds the service tree of one gate on the reactor
    it is given.
    """

    def setUp(self):
        """
        A fresh data directory and memory reactor per test.
        """
        self.dataDir = FilePath(self.mktemp())
        self.reactor = MemoryReactorClock()
        withoutSecretEnvironment(self)

    def options(self, *listen, extra=()):
        """
        Parsed L{tap.Options} using this test's data directory, listening
        on C{listen}, with the memory store (the SQLite store's writer
        thread needs a running reactor) unless C{extra} names one.
        """
        argv = ["--data-dir", self.dataDir.path] + list(extra)
        if "--api" not in extra:
            argv += ["--api", "none"]
        if "--store" not in extra:
            argv += ["--store", "memory"]
        for description in listen:
            argv += ["--listen", description]
        options = tap.Options()
        options.parseOptions(argv)
        return options

    def makeService(self, *listen, extra=()):
        """
        Call L{tap.makeService} on the memory reactor.
        """
        return tap.makeService(self.options(*listen, extra=extra), reactor=self.reactor)

    def test_freezeHeapUnderTwistd(self):
        """
        The root freezes the heap when built for C{twistd} (no reactor
        given), not when given a reactor (tests, embedding).
        """
        self.assertFalse(self.makeService("tcp:0").freezeHeap)
        self.assertTrue(tap.makeService(self.options("tcp:0")).freezeHeap)

    def start(self, root):
        """
        Start C{root}, and stop it at cleanup.
        """
        root.startService()
        self.addCleanup(lambda: self.successResultOf(root.stopService()))

    def test_tree(self):
        """
        The root is a L{MultiService} named C{imserver} holding a
        L{GateService} named C{gate}, which holds one L{ListenerService} per
        C{--listen}, in order, sharing one L{GateFactory}.
        """
        root = self.makeService(SSL_LISTEN, TCP_LISTEN)
        self.assertIsInstance(root, MultiService)
        self.assertEqual(root.name, "imserver")
        gate = root.getServiceNamed("gate")
        self.assertIsInstance(gate, GateService)
        self.assertEqual(
            list(root),
            [root.getServiceNamed("retention"), gate, root.getServiceNamed("certificates")],
        )
        self.assertIsInstance(gate.factory, GateFactory)
        self.assertEqual(len(gate.listeners), 2)
        for listener, description in zip(gate.listeners, [SSL_LISTEN, TCP_LISTEN]):
            self.assertIsInstance(listener, ListenerService)
            self.assertEqual(listener.name, "listen " + description)
            self.assertIs(listener.factory, gate.factory)
            self.assertIs(gate.getServiceNamed("listen " + description), listener)
        self.assertIs(gate.factory.clock, self.reactor)
        self.assertEqual(gate.factory.settings, Settings())

    def test_settingsReachTheFactory(self):
        """
        The parsed settings are the ones the gate uses.
        """
        root = self.makeService(TCP_LISTEN, extra=["--max-devices", "3"])
        factory = root.getServiceNamed("gate").factory
        self.assertEqual(factory.settings.max_devices, 3)
        self.assertEqual(factory.registry.maxDevices, 3)

    def test_logicSharesTheSeams(self):
        """
        The L{imserver.messaging.Messenger} and L{imserver.groups.Groups}
        that C{makeService} gives the factory work on its store, registry,
        settings and metrics.
        """
        factory = self.makeService(TCP_LISTEN).getServiceNamed("gate").factory
        messenger, groups = factory.messenger, factory.groups
        self.assertIs(messenger.store, factory.store)
        self.assertIs(messenger.registry, factory.registry)
        self.assertIs(messenger.settings, factory.settings)
        self.assertIs(messenger.metrics, factory.metrics)
        self.assertIs(groups.store, factory.store)
        self.assertIs(groups.settings, factory.settings)

    def test_gateId(self):
        """
        C{--gate-id} names the gate; by default it is host:pid.
        """
        root = self.makeService(TCP_LISTEN, extra=["--gate-id", "gate-7"])
        self.assertEqual(root.getServiceNamed("gate").factory.gateId, "gate-7")
        root = self.makeService(TCP_LISTEN)
        self.assertTrue(
            root.getServiceNamed("gate").factory.gateId.endswith(":{}".format(os.getpid()))
        )

    def test_generatesCertificateAndSecret(self):
        """
        With an C{ssl:} listener and no C{--tls-cert}, the data directory
        gets a self-signed certificate, its key (mode 0600) and the secret
        (mode 0600).
        """
        self.makeService(SSL_LISTEN)
        cert = self.dataDir.child(CERT_FILE_NAME)
        key = self.dataDir.child(KEY_FILE_NAME)
        secret = self.dataDir.child(SECRET_FILE_NAME)
        self.assertIn(b"-----BEGIN CERTIFICATE-----", cert.getContent())
        self.assertIn(b"PRIVATE KEY-----", key.getContent())
        self.assertEqual(_mode(key), 0o600)
        self.assertEqual(_mode(secret), 0o600)
        self.assertGreaterEqual(len(secret.getContent().strip()), 16)

    def test_reusesCertificateAndSecret(self):
        """
        A second L{tap.makeService} on the same data directory keeps the
        certificate, key and secret made by the first.
        """
        names = [CERT_FILE_NAME, KEY_FILE_NAME, SECRET_FILE_NAME]
        self.makeService(SSL_LISTEN)
        before = [self.dataDir.child(name).getContent() for name in names]
        self.makeService(SSL_LISTEN)
        after = [self.dataDir.child(name).getContent() for name in names]
        self.assertEqual(before, after)

    def test_noCertificateWithoutSSL(self):
        """
        Without an C{ssl:} listener no certificate is generated (the secret
        still is).
        """
        self.makeService(TCP_LISTEN)
        self.assertFalse(self.dataDir.child(CERT_FILE_NAME).exists())
        self.assertFalse(self.dataDir.child(KEY_FILE_NAME).exists())
        self.assertTrue(self.dataDir.child(SECRET_FILE_NAME).exists())

    def test_listenBacklogDefault(self):
        """
        Started, the service listens with a backlog of 4096 on every
        endpoint that sets none, on the interface and port asked for.
        """
        root = self.makeService(SSL_LISTEN, TCP_LISTEN)
        self.start(root)
        gate = root.getServiceNamed("gate").factory
        # ssl: is TCP with TLS around the gate, and admission around that.
        [(tlsPort, tlsFactory, backlog, interface), (port, factory, _, _)] = self.reactor.tcpServers
        self.assertEqual((tlsPort, backlog, interface), (0, 4096, "127.0.0.1"))
        self.assertIsInstance(tlsFactory.wrapped, TLSMemoryBIOFactory)
        self.assertIs(tlsFactory.wrapped.wrappedFactory, gate)
        self.assertEqual(self.reactor.sslServers, [])
        self.assertIs(factory.wrapped, gate)
        self.assertEqual(port, 0)

    def test_listenBacklogSetting(self):
        """
        C{--listen-backlog} changes the default backlog.
        """
        self.start(self.makeService(TCP_LISTEN, extra=["--listen-backlog", "77"]))
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual(backlog, 77)

    def test_listenBacklogExplicit(self):
        """
        A C{backlog=} in the endpoint description wins over the default.
        """
        self.start(self.makeService("tcp:0:interface=127.0.0.1:backlog=10"))
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual(backlog, 10)

    def test_addresses(self):
        """
        Once started, L{GateService.addresses} gives the listening addresses
        in endpoint order.
        """
        root = self.makeService(SSL_LISTEN, "tcp:7001:interface=127.0.0.1")
        gate = root.getServiceNamed("gate")
        d = gate.addresses()
        self.assertNoResult(d)
        self.start(root)
        self.assertEqual([a.port for a in self.successResultOf(d)], [0, 7001])

    def test_stopLeavesNoTimers(self):
        """
        Stopping the service stops the idle sweep: no delayed call is left on
        the reactor.
        """
        root = self.makeService(TCP_LISTEN)
        root.startService()
        self.assertTrue(self.reactor.getDelayedCalls())
        self.successResultOf(root.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_invalidListen(self):
        """
        An endpoint description no parser knows is a L{UsageError} naming
        the C{--listen}.
        """
        e = self.assertRaises(UsageError, self.makeService, "bogus:1")
        self.assertIn("bogus:1", str(e))

    def test_invalidSSLListen(self):
        """
        An C{ssl:} description with an option the hardened profile does not
        support is a L{UsageError}.
        """
        self.assertRaises(UsageError, self.makeService, "ssl:0:method=SSLv3")

    def test_missingCertificateFile(self):
        """
        A C{--tls-cert} that does not exist is a L{UsageError} naming it,
        before the data directory is created.
        """
        missing = FilePath(self.mktemp())
        e = self.assertRaises(
            UsageError,
            self.makeService,
            SSL_LISTEN,
            extra=["--tls-cert", missing.path, "--tls-key", missing.path],
        )
        self.assertIn("--tls-cert " + missing.path, str(e))
        self.assertFalse(self.dataDir.exists())


class RequireUpbTests(SynchronousTestCase):
    """
    L{tap.requireUpb} refuses the slow protobuf backends.
    """

    def test_upb(self):
        """
        The installed backend is upb, so the check passes.
        """
        self.assertEqual(api_implementation.Type(), "upb")
        self.assertIsNone(tap.requireUpb())

    def test_python(self):
        """
        With the pure-Python backend it raises L{RuntimeError} naming it.
        """
        self.patch(api_implementation, "Type", lambda: "python")
        e = self.assertRaises(RuntimeError, tap.requireUpb)
        self.assertIn("'python'", str(e))

    def test_makeServiceChecks(self):
        """
        L{tap.makeService} checks the backend before touching the data
        directory.
        """
        self.patch(api_implementation, "Type", lambda: "python")
        dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(["--data-dir", dataDir.path])
        self.assertRaises(RuntimeError, tap.makeService, options, reactor=MemoryReactorClock())
        self.assertFalse(dataDir.exists())


class TokenCommandTests(SynchronousTestCase):
    """
    C{python -m imserver token}.
    """

    def setUp(self):
        """
        No secret in the environment, stderr captured, a fresh data
        directory.
        """
        withoutSecretEnvironment(self)
        self.stderr = StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.dataDir = FilePath(self.mktemp())

    def test_token(self):
        """
        It prints one token, valid for the uid under the data directory's
        secret, and only for that uid.
        """
        loadSecret(self.dataDir, environ={})
        out = StringIO()
        status = main(["token", "--uid", "alice", "--data-dir", self.dataDir.path], out=out)
        self.assertEqual(status, 0)
        self.assertTrue(out.getvalue().endswith("\n"))
        [token] = out.getvalue().splitlines()
        secret = loadSecret(self.dataDir, environ={})
        self.assertEqual(_mode(self.dataDir.child(SECRET_FILE_NAME)), 0o600)
        now = time.time()
        self.assertTrue(verifyToken(secret, "alice", token, now))
        self.assertFalse(verifyToken(secret, "bob", token, now))
        self.assertEqual(self.stderr.getvalue(), "")

    def test_webURL(self):
        """
        C{web-url} prints the chat page's address with the uid and a valid
        token in its fragment (never sent to the server), on make run's
        web listener unless C{--url} names another.
        """
        from urllib.parse import parse_qs, urlsplit

        loadSecret(self.dataDir, environ={})
        for args, base in [
            ([], "http://127.0.0.1:7481/"),
            (["--url", "https://chat.example.com/im/"], "https://chat.example.com/im/"),
        ]:
            out = StringIO()
            status = main(
                ["web-url", "--uid", "alice b", "--data-dir", self.dataDir.path] + args, out=out
            )
            self.assertEqual(status, 0)
            url = out.getvalue().strip()
            self.assertEqual(url.split("#")[0], base)
            fragment = parse_qs(urlsplit(url).fragment)
            self.assertEqual(fragment["uid"], ["alice b"])
            secret = loadSecret(self.dataDir, environ={})
            self.assertTrue(verifyToken(secret, "alice b", fragment["token"][0], time.time()))
        status = main(
            ["web-url", "--uid", "a", "--data-dir", self.dataDir.path, "--url", "ftp://x/"],
            out=StringIO(),
        )
        self.assertEqual(status, 2)

    def test_sameSecretAsServer(self):
        """
        A token minted from the data directory of a gate verifies with the
        secret that gate generated.
        """
        options = tap.Options()
        options.parseOptions(
            ["--data-dir", self.dataDir.path, "--listen", TCP_LISTEN, "--api", "none"]
        )
        tap.makeService(options, reactor=MemoryReactorClock())
        secret = self.dataDir.child(SECRET_FILE_NAME).getContent().strip()
        out = StringIO()
        main(["token", "--uid", "alice", "--data-dir", self.dataDir.path], out=out)
        self.assertTrue(verifyToken(secret, "alice", out.getvalue().strip(), time.time()))

    def test_noSecretNoToken(self):
        """
        Without a secret in the data directory it fails and generates none:
        a token signed by a new secret would be refused by the gate.
        """
        out = StringIO()
        status = main(["token", "--uid", "alice", "--data-dir", self.dataDir.path], out=out)
        self.assertEqual(status, 1)
        self.assertEqual(out.getvalue(), "")
        self.assertIn("no secret", self.stderr.getvalue())
        self.assertFalse(self.dataDir.child(SECRET_FILE_NAME).exists())

    def test_ttl(self):
        """
        C{--ttl} bounds the token's validity.
        """
        loadSecret(self.dataDir, environ={})
        out = StringIO()
        status = main(
            ["token", "--uid", "alice", "--ttl", "60", "--data-dir", self.dataDir.path],
            out=out,
        )
        self.assertEqual(status, 0)
        token = out.getvalue().strip()
        secret = loadSecret(self.dataDir, environ={})
        now = time.time()
        self.assertTrue(verifyToken(secret, "alice", token, now))
        self.assertFalse(verifyToken(secret, "alice", token, now + 120))

    def test_missingUid(self):
        """
        Without C{--uid} it prints the usage and returns 2.
        """
        out = StringIO()
        status = main(["token", "--data-dir", self.dataDir.path], out=out)
        self.assertEqual(status, 2)
        self.assertEqual(out.getvalue(), "")
        self.assertIn("--uid is required", self.stderr.getvalue())

    def test_noCommand(self):
        """
        Without a command it returns 2.
        """
        self.assertEqual(main([], out=StringIO()), 2)
        self.assertIn("name a command", self.stderr.getvalue())


class SettingsBoundsTests(SynchronousTestCase):
    """
    Settings sent to clients in 32-bit fields are bounded.
    """

    def test_uint32Milliseconds(self):
        """
        Intervals whose milliseconds do not fit 32 bits are refused, so an
        C{AuthResponse} can always be built.
        """
        for args in (
            ["--heartbeat-interval", "5e6", "--idle-timeout", "6e6"],
            ["--idle-timeout", "4294968"],
        ):
            options = tap.Options()
            self.assertRaises(UsageError, options.parseOptions, args)


class StoreChoiceTests(SynchronousTestCase):
    """
    C{--store}.
    """

    def setUp(self):
        withoutSecretEnvironment(self)

    def test_sqliteDefault(self):
        """
        By default the durable SQLite store lives in the data directory and
        is the first service to start (the last to stop).
        """
        from imserver.store.sqlite import SQLiteMessageStore

        dataDir = FilePath(self.mktemp())
        options = tap.Options()
        options.parseOptions(["--data-dir", dataDir.path, "--listen", TCP_LISTEN])
        root = tap.makeService(options, reactor=MemoryReactorClock())
        store = root.getServiceNamed("store")
        self.assertIsInstance(store, SQLiteMessageStore)
        self.assertEqual(store.path, dataDir.child(MESSAGES_FILE_NAME).path)
        self.assertIs(list(root)[0], store)
        self.assertIs(root.getServiceNamed("gate").factory.store, store)
        self.assertEqual(store.walAutocheckpoint, 10000)

    def test_storeWriter(self):
        """
        C{--store-writer process} runs the SQLite store's writer in a
        process of its own; C{thread} (the default) in the gate; anything
        else, or C{process} with another store, is a usage error.
        """
        for args, process in (([], False), (["--store-writer", "process"], True)):
            options = tap.Options()
            options.parseOptions(["--data-dir", self.mktemp(), "--listen", TCP_LISTEN] + args)
            root = tap.makeService(options, reactor=MemoryReactorClock())
            self.assertIs(root.getServiceNamed("store").process, process)
        for args in (
            ["--store-writer", "fork"],
            ["--store", "memory", "--store-writer", "process"],
        ):
            self.assertRaises(
                UsageError,
                tap.Options().parseOptions,
                ["--data-dir", self.mktemp(), "--listen", TCP_LISTEN] + args,
            )

    def test_walAutocheckpoint(self):
        """
        C{--store-wal-autocheckpoint} reaches the SQLite store.
        """
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.mktemp(),
                "--listen",
                TCP_LISTEN,
                "--store-wal-autocheckpoint",
                "2000",
            ]
        )
        root = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual(root.getServiceNamed("store").walAutocheckpoint, 2000)

    def test_everySettingDocumented(self):
        """
        docs/configuration.md has a row for every setting's option.
        """
        doc = (
            FilePath(__file__)
            .parent()
            .parent()
            .child("docs")
            .child("configuration.md")
            .getContent()
            .decode("utf-8")
        )
        missing = [
            optionName(f.name)
            for f in settingFields()
            if "| `{}` |".format(optionName(f.name)) not in doc
        ]
        self.assertEqual(missing, [])

    def test_unknownStore(self):
        """
        An unknown store is a usage error; so is naming the Redis store
        without C{--redis}.
        """
        for store in ["mysql", "redis"]:
            self.assertRaises(UsageError, tap.Options().parseOptions, ["--store", store])

    def test_maxUnackedBounded(self):
        """
        C{--max-unacked} is sent to clients in a 32-bit field and bounded
        well inside it.
        """
        options = tap.Options()
        self.assertRaises(UsageError, options.parseOptions, ["--max-unacked", "1000001"])
        options = tap.Options()
        options.parseOptions(["--max-unacked", "1000000"])
        self.assertEqual(options.settings.max_unacked, 1000000)


class FreezeHeapTests(SynchronousTestCase):
    """
    The root service freezes the heap at start under C{twistd} only.
    """

    def test_freeze(self):
        """
        With C{freezeHeap}, starting collects and freezes (C{gc.freeze});
        without it, neither.
        """
        calls = []
        self.patch(gc, "collect", lambda: calls.append("collect"))
        self.patch(gc, "freeze", lambda: calls.append("freeze"))
        root = ServerService()
        root.startService()
        self.assertEqual(calls, [])
        root.stopService()
        root = ServerService()
        root.freezeHeap = True
        root.startService()
        self.assertEqual(calls, ["collect", "freeze"])
        root.stopService()
