# -*- test-case-name: tests.test_tap -*-
"""
C{twistd im}: options and the service tree of one gate process.

With no options it runs on its embedded defaults: TLS on 127.0.0.1:7443
with a self-signed certificate, and a secret, generated into
C{./imserver-data} on first start.
"""

import os
import socket

from twisted.application.service import IService
from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver import __version__
from imserver.settings import Settings, optionName, settingFields

DEFAULT_LISTEN = "ssl:7443:interface=127.0.0.1"
DEFAULT_DATA_DIR = "imserver-data"


def _settingParameters():
    return [
        [optionName(f.name)[2:], None, f.default, f.metadata["help"], f.type]
        for f in settingFields()
    ]


class Options(usage.Options):
    """
    Command-line options of C{twistd im}.  Every field of
    L{imserver.settings.Settings} is an option too.
    """

    synopsis = "[options]"
    longdesc = (
        "Run an imserver gate. With no options: TLS on "
        + DEFAULT_LISTEN
        + " with a self-signed certificate generated into the data directory."
    )

    optParameters = [
        ["data-dir", "d", DEFAULT_DATA_DIR,
         "Directory for the secret, the self-signed certificate and the message "
         "database."],
        ["secret-file", None, None,
         "File holding the token-signing secret (default: $IMSERVER_SECRET, "
         "else <data-dir>/secret, generated if absent)."],
        ["tls-cert", None, None,
         "PEM certificate for ssl: endpoints (default: self-signed in the data dir)."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["gate-id", None, None, "Name of this gate process (default: host:pid)."],
        ["store", None, "sqlite",
         "Message store: sqlite (durable, <data-dir>/messages.sqlite3) or memory "
         "(lost on restart; tests and benchmarks)."],
    ] + _settingParameters()

    def __init__(self):
        usage.Options.__init__(self)
        self["listen"] = []

    def opt_listen(self, description):
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "A Twisted endpoint string to accept clients on; repeatable (default: "
        + DEFAULT_LISTEN
        + "). ssl: endpoints use the hardened TLS profile and --tls-cert "
        "unless they name certKey=."
    )

    def opt_version(self):
        """
        Print the version and exit.
        """
        print("imserver", __version__)
        raise SystemExit(0)

    def postOptions(self):
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["store"] not in ("sqlite", "memory"):
            raise usage.UsageError("--store is sqlite or memory")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        values = {f.name: self[optionName(f.name)[2:]] for f in settingFields()}
        try:
            self.settings = Settings(**values)
        except ValueError as e:
            raise usage.UsageError(str(e))
        from imserver.endpoints import splitDescription

        for description in self["listen"]:
            try:
                splitDescription(description)
            except ValueError as e:
                raise usage.UsageError("--listen {}: {}".format(description, e))


def _needsDefaultCertificate(description):
    from imserver.endpoints import splitDescription

    args, kwargs = splitDescription(description)
    return args[0].lower() == "ssl" and not (
        "certKey" in kwargs or "privateKey" in kwargs
    )


def requireUpb():
    """
    Refuse to run on the pure-Python protobuf backend, which is an order of
    magnitude slower.

    @raise RuntimeError: if protobuf's backend is not upb.
    """
    from google.protobuf.internal import api_implementation

    backend = api_implementation.Type()
    if backend != "upb":
        raise RuntimeError(
            "imserver needs the upb protobuf backend, not {!r}: install the "
            "protobuf wheel for this platform and unset "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION".format(backend)
        )


def makeService(options, reactor=None):
    """
    Build the service tree of one gate process.

    @param options: parsed L{Options}.
    @param reactor: the reactor; the global one if L{None} (twistd).
    @rtype: L{MultiService}
    """
    if reactor is None:
        from twisted.internet import reactor
    requireUpb()

    from imserver.auth import TokenAuthenticator, loadSecret
    from imserver.endpoints import listenEndpoint
    from imserver.protocol import GateFactory
    from imserver.registry.memory import MemorySessionRegistry
    from imserver.service import GateService, RetentionService, ServerService
    from imserver.tls import ensureSelfSigned

    settings = options.settings
    dataDir = FilePath(options["data-dir"])
    if not dataDir.exists():
        dataDir.makedirs()
    secretFile = options["secret-file"]
    secret = loadSecret(dataDir, FilePath(secretFile) if secretFile else None)

    certificate = None
    if options["tls-cert"] is not None:
        certificate = (FilePath(options["tls-cert"]), FilePath(options["tls-key"]))
    elif any(_needsDefaultCertificate(d) for d in options["listen"]):
        certificate = ensureSelfSigned(dataDir)

    gateId = options["gate-id"] or "{}:{}".format(socket.gethostname(), os.getpid())
    registry = MemorySessionRegistry(maxDevices=settings.max_devices)
    dedupWindowMs = int(settings.dedup_window * 1000)
    if options["store"] == "memory":
        from imserver.store.memory import MemoryMessageStore

        store = MemoryMessageStore(dedupWindowMs)
    else:
        from imserver.store.sqlite import SQLiteMessageStore

        store = SQLiteMessageStore(
            dataDir.child("messages.sqlite3").path, reactor, dedupWindowMs
        )
    factory = GateFactory(
        settings=settings,
        authenticator=TokenAuthenticator(secret, reactor),
        registry=registry,
        store=store,
        clock=reactor,
        gateId=gateId,
    )
    endpoints = []
    for description in options["listen"]:
        try:
            endpoint = listenEndpoint(
                reactor, description, certificate, settings.listen_backlog
            )
        except (ValueError, OSError) as e:
            raise usage.UsageError("--listen {}: {}".format(description, e))
        endpoints.append((description, endpoint))

    root = ServerService()
    root.setName("imserver")
    if IService.providedBy(store):
        store.setName("store")
        store.setServiceParent(root)
    RetentionService(store, reactor, settings).setServiceParent(root)
    GateService(factory, endpoints).setServiceParent(root)
    return root
