# -*- test-case-name: tests.test_tap -*-
"""
C{twistd im}: options and the service tree of one gate process.

With no options it runs on its embedded defaults: TLS on 127.0.0.1:7443
with a self-signed certificate, and a secret, generated into
C{./imserver-data} on first start.

A mistake on the command line stops C{twistd im} with one line on standard
error naming the option and what to do, exit status 1 and no traceback
(L{imserver.service.StartupError}): L{Options} checks every option, the
files it names and the data directory before L{makeService} creates
anything there.  A listener that cannot listen (a port in use) stops it
the same way, before the message store opens its database.
"""

import math
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
                "{} {}: not {}; give one such as {}".format(option, text, what, f.default))
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
                "--store is sqlite or memory (the Redis store comes with --redis)")
        if (self["tls-cert"] is None) != (self["tls-key"] is None):
            raise usage.UsageError(
                "--tls-cert and --tls-key go together: give both, or neither for "
                "the self-signed certificate")
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
            raise usage.UsageError(
                "--advertise: {}; give [tls:|tcp:]HOST:PORT".format(e))
        # The files and the directory last, once the options themselves
        # are known to be right; makeService creates nothing before this.
        self._checkFiles()

    def _checkFiles(self):
        """
        Check the files the options name and the data directory: what
        L{makeService} reads can be read and used, what it creates can be
        created.  Nothing is written.

        @raise usage.UsageError: naming the option, if not.
        """
        from imserver.api import ADMIN_TOKEN_FILE_NAME
        from imserver.auth import MIN_SECRET_LENGTH, SECRET_ENV, SECRET_FILE_NAME
        from imserver.tls import CERT_FILE_NAME, KEY_FILE_NAME

        dataDir = FilePath(self["data-dir"])
        described = [("--listen", d) for d in self["listen"]]
        if self["api"] is not None:
            described.append(("--api", self["api"]))
        selfSigned = self["tls-cert"] is None and any(
            _needsDefaultCertificate(d) for _, d in described)
        # The files of the data directory makeService reads, with what to
        # do if one cannot be used, and what it writes there.
        reads, writes = [], []
        if self["secret-file"] is None and not os.environ.get(SECRET_ENV):
            reads.append((SECRET_FILE_NAME,
                          "fix it, delete it to have a new one generated (tokens signed "
                          "with the old one stop working), or give --secret-file"))
        if self["api"] is not None and self["admin-token-file"] is None:
            reads.append((ADMIN_TOKEN_FILE_NAME,
                          "fix it, or delete it to have a new one generated"))
        for name, remedy in reads:
            if not dataDir.child(name).exists():
                writes.append(name)
        if selfSigned and not (dataDir.child(CERT_FILE_NAME).exists()
                               and dataDir.child(KEY_FILE_NAME).exists()):
            writes.append(CERT_FILE_NAME)
        if self["store"] == "sqlite":
            writes.append("the message database")
        _checkDataDir(dataDir, writes)

        for name, remedy in reads:
            if name not in writes:
                _readSecret("--data-dir", dataDir.child(name), remedy)
        if self["secret-file"] is not None:
            _readSecret("--secret-file", FilePath(self["secret-file"]))
        elif (os.environ.get(SECRET_ENV)
              and len(os.environ[SECRET_ENV].strip()) < MIN_SECRET_LENGTH):
            raise usage.UsageError(
                "${}: shorter than {} bytes; set a longer secret, or unset it to use "
                "<data-dir>/{}".format(SECRET_ENV, MIN_SECRET_LENGTH, SECRET_FILE_NAME))
        if self["api"] is not None and self["admin-token-file"] is not None:
            _readSecret("--admin-token-file", FilePath(self["admin-token-file"]),
                        "or leave the option out to have one generated in the data "
                        "directory")
        certificate = None
        if self["tls-cert"] is not None:
            certificate = (FilePath(self["tls-cert"]), FilePath(self["tls-key"]))
            _checkCertificate(*certificate)
        elif selfSigned:
            certificate = _selfSignedForCheck(dataDir)
        _checkEndpoints(described, certificate, self.settings.listen_backlog)

    def _clusterOptions(self):
        from imserver.redisclient import RedisURL
        from imserver.registry.redis import validateGateId

        try:
            self.redisURL = RedisURL.parse(self["redis"])
        except ValueError as e:
            # The URL may hold a password: say why, never repeat it.
            raise usage.UsageError(
                "--redis: not a redis:// or rediss:// URL: {}; give "
                "redis://[user:password@]host[:port][/db], or rediss://... for "
                "TLS".format(str(e).rpartition(": ")[2]))
        if self["store"] is not None:
            raise usage.UsageError(
                "--store does not go with --redis: in cluster mode messages are "
                "stored in Redis")
        if self["redis-ca"] is not None:
            if not self.redisURL.tls:
                raise usage.UsageError("--redis-ca goes with a rediss:// --redis")
            _checkRedisCA(self.redisURL, self["redis-ca"])
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


def _reason(error):
    """
    Why C{error} happened, as a clause: for an L{OSError} without its
    C{[Errno n]} and path, without a final full stop.
    """
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return (str(error) or type(error).__name__).rstrip(". ")


def _readSecret(option, path, remedy=None):
    """
    Check that the secret (or admin token) file at C{path} can be read and
    is long enough.

    @param option: what to name in the message: the option giving the
        file, or C{--data-dir} for a file in the data directory.
    @param remedy: what to do about it; by default, give a readable file.
    @raise usage.UsageError: if not.
    """
    from imserver.auth import MIN_SECRET_LENGTH

    head = "{} {}".format(option, path.path)
    if option == "--data-dir":
        head = "--data-dir {}: {}".format(path.parent().path, path.basename())
    if remedy is None:
        remedy = "give a readable file holding at least {} bytes".format(MIN_SECRET_LENGTH)
    elif remedy.startswith("or "):
        remedy = "give a readable file holding at least {} bytes, {}".format(
            MIN_SECRET_LENGTH, remedy)
    try:
        content = path.getContent()
    except OSError as e:
        raise usage.UsageError("{}: cannot read it ({}); {}".format(head, _reason(e), remedy))
    if len(content.strip()) < MIN_SECRET_LENGTH:
        raise usage.UsageError("{}: holds fewer than {} bytes; {}".format(
            head, MIN_SECRET_LENGTH, remedy))


def _checkDataDir(dataDir, writes):
    """
    Check that the data directory is a directory, or can be created, and
    that this user can write into it if something is to be written.

    @type dataDir: L{FilePath}
    @param writes: what is to be written there (for the message); empty if
        nothing.
    @raise usage.UsageError: naming C{--data-dir}, if not.
    """
    head = "--data-dir {}".format(dataDir.path)
    if dataDir.exists():
        if not dataDir.isdir():
            raise usage.UsageError(
                "{}: not a directory; give a directory (it is created if missing)".format(
                    head))
        if writes and not os.access(dataDir.path, os.W_OK | os.X_OK):
            raise usage.UsageError(
                "{}: this user cannot write to it (for {}); give it write permission, "
                "or give another directory".format(head, ", ".join(writes)))
        return
    ancestor = dataDir.parent()
    while not ancestor.exists() and ancestor.parent() != ancestor:
        ancestor = ancestor.parent()
    if not ancestor.isdir():
        raise usage.UsageError(
            "{}: cannot be created, {} is not a directory; give another directory".format(
                head, ancestor.path))
    if not os.access(ancestor.path, os.W_OK | os.X_OK):
        raise usage.UsageError(
            "{}: cannot be created, this user cannot write to {}; create it, or give "
            "another directory".format(head, ancestor.path))


def _checkCertificate(certPath, keyPath):
    """
    Check that C{--tls-cert} and C{--tls-key} can be read and go together.

    @raise usage.UsageError: naming the option at fault, if not.
    """
    from imserver.tls import serverOptions

    contents = []
    for option, path, what in [("--tls-cert", certPath, "PEM certificate"),
                               ("--tls-key", keyPath, "PEM private key")]:
        try:
            contents.append(path.getContent())
        except OSError as e:
            raise usage.UsageError("{} {}: cannot read it ({}); give the {} file".format(
                option, path.path, _reason(e), what))
    try:
        serverOptions(*contents)
    except ValueError as e:
        raise usage.UsageError(
            "--tls-cert {} with --tls-key {}: {}; give a PEM certificate and its "
            "unencrypted private key".format(certPath.path, keyPath.path, _reason(e)))


class _NotWrittenYet:
    """
    Stands for a file of the self-signed certificate that
    L{imserver.tls.ensureSelfSigned} will write at start, while the
    endpoint descriptions are checked (L{imserver.tls.ReloadableServerOptions}
    reads only C{getContent} and C{path}).
    """

    def __init__(self, path, content):
        self.path = path
        self._content = content

    def getContent(self):
        return self._content


def _selfSignedForCheck(dataDir):
    """
    The certificate to check the C{ssl:} endpoint descriptions with when
    they use the self-signed one: the data directory's if it is there, else
    one made in memory (it is not written).

    @raise usage.UsageError: naming C{--data-dir}, if the one there cannot
        be used.
    """
    from cryptography import x509

    from imserver.tls import (
        CERT_FILE_NAME,
        KEY_FILE_NAME,
        makeSelfSigned,
        serverOptions,
    )

    certPath, keyPath = dataDir.child(CERT_FILE_NAME), dataDir.child(KEY_FILE_NAME)
    if not (certPath.exists() and keyPath.exists()):
        certPEM, keyPEM = makeSelfSigned()
        return _NotWrittenYet(certPath.path, certPEM), _NotWrittenYet(keyPath.path, keyPEM)
    try:
        serverOptions(certPath.getContent(), keyPath.getContent())
        # As ensureSelfSigned reads it to see when it expires.
        x509.load_pem_x509_certificate(certPath.getContent())
    except (OSError, ValueError) as e:
        raise usage.UsageError(
            "--data-dir {}: its self-signed certificate cannot be used ({}); delete {} "
            "and {} to have new ones generated, or give --tls-cert and --tls-key".format(
                dataDir.path, _reason(e), CERT_FILE_NAME, KEY_FILE_NAME))
    return certPath, keyPath


#: What to give instead of a wrong endpoint description, per option.
_ENDPOINT_EXAMPLES = {
    "--listen": "an endpoint string such as ssl:7443 or tcp:7000:interface=127.0.0.1",
    "--api": "an endpoint string such as tcp:7480:interface=127.0.0.1, or none",
}


def _checkEndpoints(described, certificate, backlog):
    """
    Build the endpoint of every C{--listen} and C{--api} to check it, and
    drop it: nothing listens, and building one needs no reactor.

    @param described: C{(option, description)} pairs.
    @param certificate: for L{imserver.endpoints.listenEndpoint}.
    @raise usage.UsageError: naming the option, if one cannot be built.
    """
    from imserver.endpoints import listenEndpoint, splitDescription

    for option, description in described:
        try:
            listenEndpoint(None, description, certificate, backlog)
        except (ValueError, TypeError, LookupError, OSError) as e:
            # Endpoint parsers, plugins included, raise more than ValueError:
            # an OSError for a certKey= file, an IndexError for a systemd:
            # index beyond the descriptors passed.
            if isinstance(e, OSError) and e.filename:
                raise usage.UsageError("{} {}: cannot read {} ({}); give a file this "
                                       "user can read".format(option, description,
                                                              e.filename, _reason(e)))
            raise usage.UsageError("{} {}: {}; give {}".format(
                option, description, _reason(e), _ENDPOINT_EXAMPLES[option]))
        # A UNIX socket is made at start, in a directory that must be there.
        args, kwargs = splitDescription(description)
        kinds = [a.lower() for a in args]
        while kinds and kinds[0] == "haproxy":
            kinds, args = kinds[1:], args[1:]
        if kinds and kinds[0] == "unix":
            address = kwargs.get("address", args[1] if len(args) > 1 else "")
            directory = FilePath(address).parent()
            if not directory.isdir():
                raise usage.UsageError(
                    "{} {}: no directory {} for the socket; create it, or give "
                    "another path".format(option, description, directory.path))


def _checkRedisCA(url, caFile):
    """
    Check that C{--redis-ca} can be read and holds a PEM certificate.

    @raise usage.UsageError: naming it, if not.
    """
    from OpenSSL import SSL, crypto

    from imserver.redisclient import clientTLSOptions

    remedy = ("give the PEM file of the CA (or self-signed certificate) that signs the "
              "Redis server's certificate")
    try:
        clientTLSOptions(url, caFile)
    except OSError as e:
        raise usage.UsageError("--redis-ca {}: cannot read it ({}); {}".format(
            caFile, _reason(e), remedy))
    except (SSL.Error, crypto.Error, ValueError) as e:
        raise usage.UsageError("--redis-ca {}: not a PEM certificate ({}); {}".format(
            caFile, e, remedy))


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

    Only here, once L{Options} has checked everything, are the data
    directory and the files generated into it created.

    @param options: parsed L{Options}.
    @param reactor: the reactor; the global one if L{None} (twistd).
    @rtype: L{MultiService}
    @raise StartupError: if something L{Options} checked changed since
        (a file removed, a disk full).
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
            _needsDefaultCertificate(d)
            for d in options["listen"] + ([options["api"]] if options["api"] else [])
        ):
            certificate = ensureSelfSigned(dataDir)
    except (OSError, ValueError) as e:
        raise StartupError("--data-dir {}: {}".format(dataDir.path, e))

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
            raise StartupError("--listen {}: {}".format(description, e))
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
    from imserver.service import ClusterService, StartupError
    from imserver.store.redis import RedisMessageStore

    settings = options.settings
    url, caFile = options.redisURL, options["redis-ca"]
    try:
        connection = connectRedis(reactor, url, caFile, start=False)
    except Exception as e:  # an unreadable --redis-ca
        raise StartupError("--redis-ca {}: {}".format(caFile, e))

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
    ApiService(
        description, endpoint, site, reactor, settings.shutdown_grace
    ).setServiceParent(root)
    return endpoint
