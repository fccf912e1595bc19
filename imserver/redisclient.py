# -*- test-case-name: tests.test_redisclient -*-
"""
Redis connections for cluster mode, through txredisapi.

txredisapi is used as the design card says, with three things it does not
do by itself:

  - it connects through the reactor we are given (its own connection
    functions use the global one): L{connectRedis} builds the endpoint
    with the injected reactor and hands it to C{RedisFactory.startConnecting},
    and every protocol's reply timeouts run on the injected reactor too
    (Synapse's C{synapse/replication/tcp/redis.py} does the same);
  - C{rediss://} verifies the server's certificate and host name with
    C{optionsForClientTLS} (txredisapi's C{ssl_context_factory=True} does
    not verify);
  - a command while no connection is up fails at once with
    L{RedisUnavailable} instead of waiting in txredisapi's queue until
    Redis comes back: the gate answers C{UNAVAILABLE} and the client
    retries.

Values are bytes both ways (C{charset=None}, no number conversion), so
message bodies and protobuf blobs pass unchanged.
"""

import hashlib
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import ssl
from twisted.internet.defer import fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from imserver.errors import Unavailable

#: Default seconds before an unanswered Redis command fails.
DEFAULT_REPLY_TIMEOUT = 5.0


class RedisUnavailable(Unavailable):
    """
    Redis cannot be reached (no connection, or no answer in time): the
    operation was not done, or its outcome is unknown; retry later.
    """


@dataclass(frozen=True)
class RedisURL:
    """
    Where and how to reach Redis: C{redis://[user:password@]host[:port][/db]}
    or C{rediss://...} for TLS.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str = None
    password: str = None
    tls: bool = False

    @classmethod
    def parse(cls, text):
        """
        @raise ValueError: if C{text} is not such a URL.
        """
        parts = urlsplit(text)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("{!r}: the scheme must be redis:// or rediss://".format(text))
        if not parts.hostname:
            raise ValueError("{!r}: no host".format(text))
        if parts.query or parts.fragment:
            raise ValueError("{!r}: no query or fragment allowed".format(text))
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("{!r}: bad port".format(text))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError("{!r}: the path is the database number".format(text))
        return cls(
            host=parts.hostname,
            port=port,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "rediss",
        )

    def __str__(self):
        # Never the password: this goes to logs.
        user = "{}@".format(self.username) if self.username else ""
        return "{}://{}{}:{}/{}".format(
            "rediss" if self.tls else "redis", user, self.host, self.port, self.db
        )


class _Factory(txredisapi.RedisFactory):
    """
    txredisapi's factory, with reply timeouts on our reactor and
    connection events reported to the L{RedisConnection}.
    """

    def __init__(self, connection, url, replyTimeout):
        txredisapi.RedisFactory.__init__(
            self, uuid=str(url), dbid=url.db or None, poolsize=1, isLazy=True,
            charset=None, password=url.password, replyTimeout=replyTimeout,
            convertNumbers=False, username=url.username,
        )
        self.connection = connection

    def buildProtocol(self, addr):
        protocol = txredisapi.RedisFactory.buildProtocol(self, addr)
        protocol.callLater = self.connection.reactor.callLater
        return protocol

    def addConnection(self, conn):
        txredisapi.RedisFactory.addConnection(self, conn)
        if conn in self.pool:
            self.connection._connected(conn)

    def delConnection(self, conn):
        txredisapi.RedisFactory.delConnection(self, conn)
        self.connection._disconnected()


class RedisConnection:
    """
    One (re)connecting Redis connection.

    @ivar url: the L{RedisURL}.
    @ivar onConnect: callables run (with no argument) each time a
        connection becomes usable, the first time and after every
        reconnect: re-register sessions, resubscribe, ...
    @ivar onDisconnect: callables run each time the connection is lost.
    """

    log = Logger()

    def __init__(self, reactor, url, factory):
        self.reactor = reactor
        self.url = url
        self.onConnect = []
        self.onDisconnect = []
        self._factory = factory
        self._up = False

    @property
    def connected(self):
        """
        Whether a connection is up now.
        """
        return self._up

    def _connected(self, conn):
        if not self._up:
            self._up = True
            self.log.info("connected to Redis at {url}", url=str(self.url))
            for callback in list(self.onConnect):
                self._run(callback)

    def _disconnected(self):
        if self._up and not self._factory.size:
            self._up = False
            self.log.warn("lost the connection to Redis at {url}", url=str(self.url))
            for callback in list(self.onDisconnect):
                self._run(callback)

    def _run(self, callback):
        try:
            callback()
        except Exception:
            self.log.failure("Redis connection callback {cb!r} failed", cb=callback)

    def execute(self, *command):
        """
        Run one Redis command.

        @return: a L{Deferred} firing with the reply (bulk strings as
            bytes, status replies such as C{OK} as L{str}, integers, lists,
            L{None}), or failing with L{RedisUnavailable} (no connection,
            or no reply in time) or C{txredisapi.ResponseError}.
        """
        if not self._up:
            return fail(RedisUnavailable("Redis is unavailable"))
        return self._factory.handler.execute_command(*command).addErrback(_unavailable)

    def script(self, source):
        """
        @return: a L{Script} for C{source}, run on this connection.
        """
        return Script(self, source)

    def publish(self, channel, message):
        """
        @return: a L{Deferred} firing with the number of subscribers that
            got C{message}.
        """
        return self.execute("PUBLISH", channel, message)

    def disconnect(self):
        """
        Stop reconnecting and close the connection.

        @return: a L{Deferred} firing once closed.
        """
        self.onConnect = []
        self.onDisconnect = []
        return self._factory.disconnect()


def _unavailable(failure):
    failure.trap(txredisapi.ConnectionError)  # TimeoutError is one too
    raise RedisUnavailable("Redis is unavailable: {}".format(failure.getErrorMessage()))


class Script:
    """
    A Lua script, run with C{EVALSHA} and sent in full (C{EVAL}) only when
    Redis does not know it yet (first use, or after a restart or
    C{SCRIPT FLUSH}).
    """

    def __init__(self, connection, source):
        self.connection = connection
        self.source = source.encode("utf-8") if isinstance(source, str) else source
        self.sha = hashlib.sha1(self.source).hexdigest()

    def __call__(self, keys=(), args=()):
        """
        @return: a L{Deferred} firing with the script's reply.
        """
        keys, args = list(keys), list(args)
        d = self.connection.execute("EVALSHA", self.sha, len(keys), *(keys + args))

        def noScript(failure):
            failure.trap(txredisapi.ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self.connection.execute("EVAL", self.source, len(keys), *(keys + args))

        return d.addErrback(noScript)


def clientTLSOptions(url, caFile=None):
    """
    TLS options verifying the Redis server's certificate for C{url.host}.

    @param caFile: PEM file of the CA (or self-signed certificate) to trust
        instead of the platform's trust store.
    """
    if caFile is not None:
        trustRoot = ssl.Certificate.loadPEM(FilePath(caFile).getContent())
    else:
        trustRoot = ssl.platformTrust()
    return ssl.optionsForClientTLS(url.host, trustRoot=trustRoot)


def connectRedis(reactor, url, caFile=None, replyTimeout=DEFAULT_REPLY_TIMEOUT,
                 connectTimeout=5.0):
    """
    Start a (re)connecting connection to Redis through C{reactor}.

    @type url: L{RedisURL}
    @param caFile: for C{rediss://}, see L{clientTLSOptions}.
    @rtype: L{RedisConnection}
    """
    endpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=connectTimeout)
    if url.tls:
        endpoint = wrapClientTLS(clientTLSOptions(url, caFile), endpoint)
    connection = RedisConnection(reactor, url, None)
    factory = connection._factory = _Factory(connection, url, replyTimeout)
    factory.startConnecting(endpoint)
    return connection
