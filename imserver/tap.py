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
DEFAULT_API = "tcp:7480:interface=127.0.0.1"


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
        ["store", None, None,
         "Message store: sqlite (durable, <data-dir>/messages.sqlite3; the "
         "default) or memory (lost on restart; tests and benchmarks). Not with "
         "--redis, whose store is Redis."],
        ["redis", None, None,
         "Cluster mode: redis://[user:password@]host[:port][/db], or rediss:// "
         "for TLS with a verified certificate. Sessions, messages and the gate "
         "bus are then in Redis, shared by every gate started with the same URL."],
        ["redis-ca", None, None,
         "PEM file of the CA (or self-signed certificate) that signs the "
         "rediss:// server's certificate (default: the system's trust store)."],
        ["api", None, DEFAULT_API,
         "Endpoint string of the HTTP API for the app backend (JSON, admin "
         "token); 'none' disables it. Never put it where clients can reach it."],
        ["admin-token-file", None, None,
         "File holding the HTTP API's bearer token (default: "
         "<data-dir>/admin-token, generated if absent)."],
    ] + _settingParameters()

    def __init__(self):
        usage.Options.__init__(self)
        self["listen"] = []
        self["advertise"] = []

    def opt_listen(self, description):
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "A Twisted endpoint string to accept clients on; repeatable (default: "
        + DEFAULT_LISTEN
        + "). ssl: endpoints use the hardened TLS profile and --tls-cert "
        "unless they name certKey=."
    )

    def opt_advertise(self, address):
        self["advertise"].append(address)

    opt_advertise.__doc__ = (
        "[tls:|tcp:]HOST:PORT where clients reach this gate, as the dispatcher "
        "(GET /v1/gates) lists it; repeatable. TLS unless tcp: is given. "
        "Default: the --listen addresses (the host name for a wildcard "
        "interface)."
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
        self.redisURL = None
        if self["redis"] is not None:
            self._clusterOptions()
        elif self["redis-ca"] is not None:
            raise usage.UsageError("--redis-ca goes with a rediss:// --redis")
        if self["store"] is None:
            self["store"] = "sqlite" if self.redisURL is None else "redis"
        elif self["store"] not in ("sqlite", "memory"):
            raise usage.UsageError(
                "--store is sqlite or memory (the Redis store comes with --redis)")
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
        if self["api"].lower() == "none":
            self["api"] = None
        else:
            try:
                splitDescription(self["api"])
            except ValueError as e:
                raise usage.UsageError("--api {}: {}".format(self["api"], e))
        try:
            self.advertised = [parseAdvertise(a) for a in self["advertise"]]
        except ValueError as e:
            raise usage.UsageError("--advertise: {}".format(e))


    def _clusterOptions(self):
        from imserver.redisclient import RedisURL
        from imserver.registry.redis import validateGateId

        try:
            self.redisURL = RedisURL.parse(self["redis"])
        except ValueError as e:
            # The URL may hold a password: say why, never repeat it.
            raise usage.UsageError(
                "--redis: not a redis:// or rediss:// URL: {}".format(
                    str(e).rpartition(": ")[2]))
        if self["store"] is not None:
            raise usage.UsageError(
                "--store does not go with --redis: in cluster mode messages are "
                "stored in Redis")
        if self["redis-ca"] is not None:
            if not self.redisURL.tls:
                raise usage.UsageError("--redis-ca goes with a rediss:// --redis")
            if not os.path.isfile(self["redis-ca"]):
                raise usage.UsageError("--redis-ca: no file {}".format(self["redis-ca"]))
        if self["gate-id"] is not None:
            try:
                validateGateId(self["gate-id"])
            except ValueError as e:
                raise usage.UsageError("--gate-id: {}".format(e))


def parseAdvertise(text):
    """
    Parse an C{--advertise} value: C{[tls:|ssl:|tcp:]HOST:PORT}, an IPv6
    host in brackets (C{[2001:db8::1]:7443}).  Without a prefix the
    address speaks TLS.

    @return: C{(host, port, tls)}
    @raise ValueError: if it is not of that form.
    """
    tls = True
    scheme, colon, rest = text.partition(":")
    if colon and scheme.lower() in ("tls", "ssl", "tcp") and rest:
        tls = scheme.lower() != "tcp"
        text = rest
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or not port.startswith(":"):
            raise ValueError("{!r} is not [IPV6]:PORT".format(text))
        port = port[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon or ":" in host:
            raise ValueError("{!r} is not HOST:PORT".format(text))
    if not host:
        raise ValueError("{!r} has no host".format(text))
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("{!r} has no valid port".format(text))
    return host, int(port), tls


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

    from prometheus_client import PlatformCollector, ProcessCollector

    from imserver.auth import TokenAuthenticator, loadSecret
    from imserver.endpoints import listenEndpoint
    from imserver.metrics import GateMetrics
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
    elif any(
        _needsDefaultCertificate(d)
        for d in options["listen"] + ([options["api"]] if options["api"] else [])
    ):
        certificate = ensureSelfSigned(dataDir)

    gateId = options["gate-id"] or "{}:{}".format(socket.gethostname(), os.getpid())
    metrics = GateMetrics()
    ProcessCollector(registry=metrics.registry)
    PlatformCollector(registry=metrics.registry)
    dedupWindowMs = int(settings.dedup_window * 1000)
    cluster = directory = None
    if options.redisURL is not None:
        cluster = _cluster(options, reactor, gateId, dedupWindowMs)
        registry, store, directory = cluster.registry, cluster.store, cluster.directory
    elif options["store"] == "memory":
        from imserver.store.memory import MemoryMessageStore

        registry = MemorySessionRegistry(maxDevices=settings.max_devices)
        store = MemoryMessageStore(dedupWindowMs)
    else:
        registry = MemorySessionRegistry(maxDevices=settings.max_devices)
        from imserver.store.sqlite import SQLiteMessageStore

        store = SQLiteMessageStore(
            dataDir.child("messages.sqlite3").path, reactor, dedupWindowMs,
            commitObserver=metrics.observeCommit,
        )
    factory = GateFactory(
        settings=settings,
        authenticator=TokenAuthenticator(secret, reactor),
        registry=registry,
        store=store,
        clock=reactor,
        gateId=gateId,
        metrics=metrics,
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
    if cluster is not None:
        # First to start (it starts connecting to Redis; until connected,
        # auths and sends answer UNAVAILABLE), last to stop (after the gate
        # drained its connections).
        cluster.setServiceParent(root)
    if IService.providedBy(store):
        store.setName("store")
        store.setServiceParent(root)
    RetentionService(
        store, reactor, settings, ready=cluster.whenReady if cluster is not None else None
    ).setServiceParent(root)
    gate = GateService(factory, endpoints)
    gate.setServiceParent(root)
    apiEndpoint = _addApi(
        options, root, gate, factory, secret, dataDir, certificate, reactor, directory
    )
    certificates = [
        endpoint.tlsOptions
        for endpoint in [e for _, e in endpoints] + [apiEndpoint]
        if getattr(endpoint, "tlsOptions", None) is not None
    ]
    if certificates:
        from imserver.service import CertificateReloadService

        CertificateReloadService(certificates, reactor).setServiceParent(root)
    return root


#: Seconds between lease refreshes in cluster mode: the sweep interval,
#: but at least this.
MIN_LEASE_INTERVAL = 0.5
#: A gate's lease lives this many refresh intervals: a gate that stopped
#: refreshing is dead for the others after about as long.
LEASE_INTERVALS = 3


def _cluster(options, reactor, gateId, dedupWindowMs):
    """
    The Redis side of a gate in cluster mode: connection, subscriber, bus,
    registry, store and directory, under one L{ClusterService} (nothing
    connects before it starts).
    """
    from imserver.bus.redis import RedisGateBus
    from imserver.redisclient import connectRedis, subscribeRedis
    from imserver.registry.redis import RedisGateDirectory, RedisSessionRegistry
    from imserver.service import ClusterService
    from imserver.store.redis import RedisMessageStore

    settings = options.settings
    url, caFile = options.redisURL, options["redis-ca"]
    try:
        connection = connectRedis(reactor, url, caFile, start=False)
    except Exception as e:  # an unreadable --redis-ca
        raise usage.UsageError("--redis-ca: {}".format(e))

    def subscribe(channels, onMessage):
        return subscribeRedis(reactor, url, channels, onMessage, caFile, start=False)

    bus = RedisGateBus(connection, subscribe, gateId, reactor)
    interval = max(settings.sweep_interval, MIN_LEASE_INTERVAL)
    registry = RedisSessionRegistry(
        connection, bus, reactor, gateId, maxDevices=settings.max_devices,
        leaseSeconds=LEASE_INTERVALS * interval,
    )
    store = RedisMessageStore(connection, reactor, dedupWindowMs)
    directory = RedisGateDirectory(connection)
    return ClusterService(connection, registry, bus, directory, store, reactor, interval)


def _addApi(options, root, gate, factory, secret, dataDir, certificate, reactor,
            directory=None):
    """
    Add the gate directory's advertiser to the gate (it advertises once the
    listeners listen, and withdraws when they stop) and, unless C{--api
    none}, the HTTP API to C{root} after the gate: stopped first, the API
    stops taking requests before the gate closes its connections.

    @return: the API's endpoint, or L{None} without one.
    """
    from imserver.api import MemoryGateDirectory, loadAdminToken, makeSite
    from imserver.endpoints import listenEndpoint
    from imserver.service import AdvertiseService, ApiService

    settings = factory.settings
    if directory is None:
        directory = MemoryGateDirectory()
    AdvertiseService(
        directory, factory.gateId, gate, options["listen"], options.advertised
    ).setServiceParent(gate)
    description = options["api"]
    if description is None:
        return None
    try:
        adminToken = loadAdminToken(dataDir, options["admin-token-file"])
    except ValueError as e:
        raise usage.UsageError("--admin-token-file: {}".format(e))
    try:
        endpoint = listenEndpoint(reactor, description, certificate, settings.listen_backlog)
    except (ValueError, OSError) as e:
        raise usage.UsageError("--api {}: {}".format(description, e))
    site = makeSite(factory, directory, secret, adminToken, reactor)
    ApiService(
        description, endpoint, site, reactor, settings.shutdown_grace
    ).setServiceParent(root)
    return endpoint
