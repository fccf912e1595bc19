# -*- test-case-name: tests.test_tap -*-
"""
C{twistd im}: options and the service tree of one gate process.

With no options it runs on its embedded defaults: TLS on 127.0.0.1:7443
with a self-signed certificate, and a secret, generated into
C{./imserver-data} on first start.

A mistake on the command line stops C{twistd im} with one line on standard
error naming the option and what to do, exit status 1 and no traceback
(L{imserver.service.StartupError}): L{Options} checks every option, then
the files it names and the data directory (L{imserver.startup}), before
L{makeService} creates anything there.  A listener that cannot listen (a
port in use) stops it the same way, before the message store opens its
database.  Cluster mode's side of the tree is in L{imserver.cluster}.
"""

import math
import os
import socket

from twisted.application.service import IService
from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver import __version__
from imserver.datadir import DEFAULT_DATA_DIR, MESSAGES_FILE_NAME
from imserver.settings import Settings, optionName, settingFields
from imserver.startup import checkFiles, checkRedisCA, needsDefaultCertificate

DEFAULT_LISTEN = "ssl:7443:interface=127.0.0.1"
DEFAULT_API = "tcp:7480:interface=127.0.0.1"
#: The web listener of `make run` (off unless --web is given).
DEFAULT_WEB = "tcp:7481:interface=127.0.0.1"


def _settingParameters():
    return [
        [optionName(f.name)[2:], None, f.default, f.metadata["help"], _coerceSetting(f)]
        for f in settingFields()
    ]


def _coerceSetting(f):
    """
    The function turning the text of a setting's option into the field's
    type.  It raises a L{usage.UsageError} naming the option (for a
    L{ValueError} L{usage.Options} would say only "Parameter type
    enforcement failed"); infinities and NaN are refused, as no limit
    takes them.
    """
    option = optionName(f.name)
    what = "a whole number" if f.type is int else "a number"

    def coerce(text):
        try:
            value = f.type(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise usage.UsageError(
                "{} {}: not {}; give one such as {}".format(option, text, what, f.default)
            )
        return value

    return coerce


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
        [
            "data-dir",
            "d",
            DEFAULT_DATA_DIR,
            "Directory for the secret, the self-signed certificate and the message database.",
        ],
        [
            "secret-file",
            None,
            None,
            "File holding the token-signing secret (default: $IMSERVER_SECRET, "
            "else <data-dir>/secret, generated if absent).",
        ],
        [
            "tls-cert",
            None,
            None,
            "PEM certificate for ssl: endpoints (default: self-signed in the data dir).",
        ],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["gate-id", None, None, "Name of this gate process (default: host:pid)."],
        [
            "store",
            None,
            None,
            "Message store: sqlite (durable, <data-dir>/" + MESSAGES_FILE_NAME + "; the "
            "default) or memory (lost on restart; tests and benchmarks). Not with "
            "--redis, whose store is Redis.",
        ],
        [
            "store-writer",
            None,
            "thread",
            "SQLite store: where its writer runs: thread (a thread of the gate, sharing "
            "its core) or process (a child process, the saver, which can run on "
            "another core).",
        ],
        [
            "redis",
            None,
            None,
            "Cluster mode: redis://[user:password@]host[:port][/db], or rediss:// "
            "for TLS with a verified certificate. Sessions, messages and the gate "
            "bus are then in Redis, shared by every gate started with the same URL.",
        ],
        [
            "redis-ca",
            None,
            None,
            "PEM file of the CA (or self-signed certificate) that signs the "
            "rediss:// server's certificate (default: the system's trust store).",
        ],
        [
            "api",
            None,
            DEFAULT_API,
            "Endpoint string of the HTTP API for the app backend (JSON, admin "
            "token); 'none' disables it. Never put it where clients can reach it.",
        ],
        [
            "web",
            None,
            None,
            "Endpoint string of the web listener for browsers: WebSocket at /ws "
            "(wss:// for ssl:), the chat page at /, the JavaScript client at "
            "/imserver.js (make run: " + DEFAULT_WEB + "); default none.",
        ],
        [
            "before-send",
            None,
            None,
            "URL (http:// or https://) of the app backend's before-send check: POSTed "
            "every client send before it is stored, to allow, reject or replace it "
            "(docs/api.md); default none.",
        ],
        [
            "before-send-failure",
            None,
            "closed",
            "When the before-send check fails (timeout, connection, status, malformed "
            "answer): closed refuses the send UNAVAILABLE, open stores it unchecked.",
        ],
        [
            "before-send-ca",
            None,
            None,
            "PEM file of the CA (or self-signed certificate) that signs the https:// "
            "--before-send server's certificate (default: the system's trust store).",
        ],
        [
            "admin-token-file",
            None,
            None,
            "File holding the HTTP API's bearer token (default: "
            "<data-dir>/admin-token, generated if absent).",
        ],
        [
            "jwt-public-key",
            None,
            None,
            "PEM file of the public key(s) (or certificates) verifying RS*, PS*, ES* "
            "and EdDSA JWT client tokens.",
        ],
        [
            "jwks",
            None,
            None,
            "JWKS of the public keys verifying RS*, PS*, ES* and EdDSA JWT client "
            "tokens: a file, or an https:// URL (http:// to loopback only), "
            "refreshed every --jwks-refresh-interval.",
        ],
        [
            "jwt-algorithms",
            None,
            None,
            "Comma-separated JWT algorithms accepted (default: HS256,HS384,HS512, "
            "keyed with the secret, plus every asymmetric one with --jwt-public-key "
            "or --jwks). Never none.",
        ],
        ["jwt-audience", None, None, "Require JWTs to have this aud (audience)."],
        ["jwt-issuer", None, None, "Require JWTs to have this iss (issuer)."],
        [
            "webhook",
            None,
            None,
            "URL (http:// or https://) the app backend receives webhook events at "
            "(signed POSTs: docs/api.md, Webhooks); default none: no events.",
        ],
        [
            "webhook-events",
            None,
            None,
            "Comma-separated webhook events to send, from user.online, user.offline, "
            "message.stored, group.changed (default: all).",
        ],
        [
            "webhook-secret-file",
            None,
            None,
            "File holding the key of the webhook signatures (default: "
            "<data-dir>/webhook-secret, generated if absent).",
        ],
        [
            "webhook-ca",
            None,
            None,
            "PEM file of the CA (or self-signed certificate) that signs the https:// "
            "--webhook receiver's certificate (default: the system's trust store).",
        ],
    ] + _settingParameters()

    def __init__(self):
        usage.Options.__init__(self)
        self["listen"] = []
        self["advertise"] = []
        self["web-origin"] = []

    def opt_listen(self, description):
        self["listen"].append(description)

    opt_listen.__doc__ = (
        "A Twisted endpoint string to accept clients on; repeatable (default: "
        + DEFAULT_LISTEN
        + "). ssl: endpoints use the hardened TLS profile and --tls-cert "
        "unless they name certKey=."
    )

    def opt_web_origin(self, origin):
        self["web-origin"].append(origin)

    opt_web_origin.__doc__ = (
        "An origin (https://app.example.com) whose pages may open WebSockets "
        "on --web, beside the page's own origin and loopback; repeatable; * "
        "allows any origin."
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

    def parseOptions(self, options=None):
        """
        Parse and check the command line.

        @raise usage.UsageError: if something is wrong with it.
        @raise StartupError: instead, when parsed as twistd's C{im}
            subcommand (L{parent} is twistd's options): twistd would print
            every option's help above a L{usage.UsageError}, so the one
            line saying what is wrong is lost at the end of a page.
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            from imserver.service import StartupError

            message = str(e)
            if message.startswith("option "):
                # getopt's: an unknown option, or one without its value.
                message += "; twistd im --help lists the options"
            raise StartupError(message) from None

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
                "--store is sqlite or memory (the Redis store comes with --redis)"
            )
        if self["store-writer"] not in ("thread", "process"):
            raise usage.UsageError("--store-writer is thread or process")
        if self["store-writer"] == "process" and self["store"] != "sqlite":
            raise usage.UsageError("--store-writer process is for the SQLite store")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError(
                "--tls-cert and --tls-key go together: give both, or neither for "
                "the self-signed certificate"
            )
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
        if self["web"] is not None and self["web"].lower() == "none":
            self["web"] = None
        if self["web"] is not None:
            try:
                splitDescription(self["web"])
            except ValueError as e:
                raise usage.UsageError("--web {}: {}".format(self["web"], e))
        from imserver.web.websocket import OriginPolicy

        for origin in self["web-origin"]:
            if origin != "*":
                try:
                    OriginPolicy.normalise(origin)
                except ValueError as e:
                    raise usage.UsageError(
                        "--web-origin: {}; give scheme://host[:port] or *".format(e)
                    )
        try:
            self.advertised = [parseAdvertise(a) for a in self["advertise"]]
        except ValueError as e:
            raise usage.UsageError("--advertise: {}; give [tls:|tcp:]HOST:PORT".format(e))
        from imserver.beforesend import checkOptions

        checkOptions(self)
        from imserver.webhooks.service import checkOptions as checkWebhookOptions

        checkWebhookOptions(self)
        # The files and the directory last, once the options themselves
        # are known to be right; makeService creates nothing before this.
        checkFiles(self)
        self._jwtOptions()

    def _jwtOptions(self):
        from imserver.jwtauth import parseJWTOptions

        try:
            self.jwt = parseJWTOptions(
                self["jwt-public-key"],
                self["jwks"],
                self["jwt-algorithms"],
                self["jwt-audience"],
                self["jwt-issuer"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e))

    def _clusterOptions(self):
        from imserver.rediscluster import parseRedisURL
        from imserver.registry.redis import validateGateId

        try:
            self.redisURL = parseRedisURL(self["redis"])
        except ValueError as e:
            # The URL may hold a password: say why, never repeat it.
            raise usage.UsageError(
                "--redis: not a redis:// or rediss:// URL: {}; give "
                "redis://[user:password@]host[:port][/db], rediss://... for TLS, or "
                "redis://host:port,host:port,.../0?cluster=yes for a Redis "
                "Cluster".format(str(e).rpartition(": ")[2])
            )
        if self["store"] is not None:
            raise usage.UsageError(
                "--store does not go with --redis: in cluster mode messages are stored in Redis"
            )
        if self["redis-ca"] is not None:
            if not self.redisURL.tls:
                raise usage.UsageError("--redis-ca goes with a rediss:// --redis")
            checkRedisCA(self.redisURL, self["redis-ca"])
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

    Only here, once L{Options} has checked everything, are the data
    directory and the files generated into it created.

    @param options: parsed L{Options}.
    @param reactor: the reactor; the global one if L{None} (twistd).
    @rtype: L{MultiService}
    @raise StartupError: if something L{Options} checked changed since
        (a file removed, a disk full).
    """
    underTwistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    requireUpb()

    from prometheus_client import PlatformCollector, ProcessCollector

    from imserver.auth import loadSecret, makeAuthenticator
    from imserver.endpoints import listenEndpoint
    from imserver.groups import Groups
    from imserver.messaging import Messenger
    from imserver.metrics import GateMetrics
    from imserver.protocol import GateFactory
    from imserver.registry.memory import MemorySessionRegistry
    from imserver.service import (
        GateService,
        RetentionService,
        ServerService,
        StartupError,
    )
    from imserver.tls import ensureSelfSigned

    settings = options.settings
    dataDir = FilePath(options["data-dir"])
    secretFile = options["secret-file"]
    try:
        if not dataDir.exists():
            dataDir.makedirs()
        secret = loadSecret(dataDir, FilePath(secretFile) if secretFile else None)
        certificate = None
        if options["tls-cert"] is not None:
            certificate = (FilePath(options["tls-cert"]), FilePath(options["tls-key"]))
        elif any(
            needsDefaultCertificate(d)
            for d in options["listen"]
            + [d for d in (options["api"], options["web"]) if d is not None]
        ):
            certificate = ensureSelfSigned(dataDir)
    except (OSError, ValueError) as e:
        raise StartupError("--data-dir {}: {}".format(dataDir.path, e))

    gateId = options["gate-id"] or "{}:{}".format(socket.gethostname(), os.getpid())
    metrics = GateMetrics()
    ProcessCollector(registry=metrics.registry)
    PlatformCollector(registry=metrics.registry)
    dedupWindowMs = int(settings.dedup_window * 1000)
    seams = directory = None
    if options.redisURL is not None:
        from imserver.cluster import clusterSeams

        seams = clusterSeams(
            reactor, options.redisURL, options["redis-ca"], gateId, settings, dedupWindowMs
        )
        registry, store, directory = seams.registry, seams.store, seams.directory
    elif options["store"] == "memory":
        from imserver.store.memory import MemoryMessageStore

        registry = MemorySessionRegistry(maxDevices=settings.max_devices)
        store = MemoryMessageStore(dedupWindowMs, clock=reactor)
    else:
        registry = MemorySessionRegistry(maxDevices=settings.max_devices)
        from imserver.store.sqlite import SQLiteMessageStore

        store = SQLiteMessageStore(
            dataDir.child(MESSAGES_FILE_NAME).path,
            reactor,
            dedupWindowMs,
            commitObserver=metrics.observeCommit,
            clock=reactor,
            commitDelay=settings.store_commit_delay,
            walAutocheckpoint=settings.store_wal_autocheckpoint,
            process=options["store-writer"] == "process",
        )
    from imserver.beforesend import fromOptions as beforeSendFromOptions

    beforeSend, beforeSendService = beforeSendFromOptions(options, reactor, settings, metrics)
    messenger = Messenger(store, registry, reactor, settings, metrics, beforeSend)
    authenticator, jwtKeys = makeAuthenticator(
        secret, reactor, settings, getattr(options, "jwt", None)
    )
    from imserver.webhooks.service import fromOptions as webhooksFromOptions

    webhooks = webhooksFromOptions(
        options, store, reactor, gateId, metrics.registry, dataDir, embedded=seams is None
    )
    sessionRegistry = registry if webhooks is None else webhooks.wrapRegistry(registry)
    factory = GateFactory(
        settings=settings,
        authenticator=authenticator,
        registry=sessionRegistry,
        store=store,
        clock=reactor,
        gateId=gateId,
        metrics=metrics,
        messenger=messenger,
        groups=Groups(store, settings),
    )
    endpoints = []
    for description in options["listen"]:
        try:
            endpoint = listenEndpoint(reactor, description, certificate, settings.listen_backlog)
        except (ValueError, OSError) as e:
            raise StartupError("--listen {}: {}".format(description, e))
        endpoints.append((description, endpoint))

    root = ServerService()
    root.setName("imserver")
    root.freezeHeap = underTwistd
    cluster = None
    if seams is not None:
        from imserver.cluster import ClusterMetrics, ClusterService

        cluster = ClusterService(
            seams.connection, registry, seams.bus, directory, messenger, reactor, seams.interval
        )
        # First to start (it starts connecting to Redis; until connected,
        # auths and sends answer UNAVAILABLE), last to stop (after the gate
        # drained its connections).
        cluster.setServiceParent(root)
    if IService.providedBy(store):
        store.setName("store")
        store.setServiceParent(root)
    if webhooks is not None:
        # After the store, before the gate: it stops once the gate has
        # closed its sessions (their offlines written), before the store.
        if cluster is not None:
            webhooks.service.ready = cluster.whenReady
        webhooks.service.setServiceParent(root)
    retention = RetentionService(store, reactor, settings)
    if cluster is not None:
        retention.ready = cluster.whenReady
        retention.lease = seams.retentionLease
        retention.shards = seams.retentionShards
    retention.setServiceParent(root)
    if cluster is not None:
        ClusterMetrics(metrics.registry, seams, retention)
    if beforeSendService is not None:
        # Stopped after the gate: sends arriving while it closes its
        # connections are still checked.
        beforeSendService.setServiceParent(root)
    gate = GateService(factory, endpoints)
    gate.setServiceParent(root)
    webEndpoint = _addWeb(options, gate, factory, certificate, reactor)
    apiEndpoint = _addApi(
        options, root, gate, factory, secret, dataDir, certificate, reactor, directory
    )
    certificates = [
        endpoint.tlsOptions
        for endpoint in [e for _, e in endpoints] + [apiEndpoint, webEndpoint]
        if getattr(endpoint, "tlsOptions", None) is not None
    ]
    if certificates:
        from imserver.service import CertificateReloadService

        CertificateReloadService(
            certificates, reactor, settings.tls_ticket_rotation
        ).setServiceParent(root)
    if jwtKeys is not None:
        # After the certificates' service: its SIGHUP handler is chained.
        jwtKeys.setServiceParent(root)
    return root


def _addWeb(options, gate, factory, certificate, reactor):
    """
    Add the web listener (C{--web}) to the gate's listeners: its
    connections are the gate's, closed with them at shutdown.

    @return: its endpoint, or L{None} without one.
    """
    from imserver.endpoints import listenEndpoint
    from imserver.service import StartupError, WebService
    from imserver.web import makeWebSite

    description = options["web"]
    if description is None:
        return None
    try:
        endpoint = listenEndpoint(
            reactor, description, certificate, factory.settings.listen_backlog
        )
    except (ValueError, OSError) as e:
        raise StartupError("--web {}: {}".format(description, e))
    site = makeWebSite(factory, options["web-origin"], clock=reactor)
    listener = WebService(description, endpoint, site)
    listener.setServiceParent(gate)
    gate.web = listener
    return endpoint


def _addApi(options, root, gate, factory, secret, dataDir, certificate, reactor, directory=None):
    """
    Add the gate directory's advertiser to the gate (it advertises once the
    listeners listen, and withdraws when they stop) and, unless C{--api
    none}, the HTTP API to C{root} after the gate: stopped first, the API
    stops taking requests before the gate closes its connections.

    @return: the API's endpoint, or L{None} without one.
    """
    from imserver.api import MemoryGateDirectory, loadAdminToken, makeSite
    from imserver.endpoints import listenEndpoint
    from imserver.service import AdvertiseService, ApiService, StartupError

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
    except (OSError, ValueError) as e:
        raise StartupError("--admin-token-file: {}".format(e))
    try:
        endpoint = listenEndpoint(reactor, description, certificate, settings.listen_backlog)
    except (ValueError, OSError) as e:
        raise StartupError("--api {}: {}".format(description, e))
    site = makeSite(factory, directory, secret, adminToken, reactor)
    ApiService(description, endpoint, site, reactor, settings.shutdown_grace).setServiceParent(root)
    return endpoint
