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
message bodies and protobuf blobs pass unchanged; replies are parsed by
C{hiredis} (a dependency: txredisapi uses it when installed; its own parser
takes a reactor pass per bulk string of a reply), so status replies are
bytes too.  Commands go straight to the connected protocol, not through
txredisapi's connection pool (one connection, nothing to wait for).

Cluster mode's pub/sub (the gate bus) has its own connection,
L{RedisSubscriber} (L{subscribeRedis}), which subscribes again after every
reconnect (txredisapi does not).

Key names: every key of one user carries the same hash tag, L{userTag}, so
a sharded Redis keeps a user's keys on one shard (the message store's keys
are in L{imserver.store.redis.keys}).
"""

import collections
import hashlib
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from imserver.errors import Unavailable
from imserver.metrics import LATENCY_BUCKETS, HistogramsByLabel

#: Default seconds before an unanswered Redis command fails.
DEFAULT_REPLY_TIMEOUT = 5.0

#: Reconnection backoff (seconds): the first retry, and the cap.  The cap is
#: low so a gate is back within a few seconds of Redis (txredisapi's own cap
#: is 10 s); an attempt at a Redis that is down costs one refused connect.
RECONNECT_INITIAL_DELAY = 0.2
RECONNECT_MAX_DELAY = 2.0


def userTag(uid):
    """
    The hash tag (the part between C{{}} and C{}}) of every Redis key of
    user C{uid}: C{u:} and the hex of its UTF-8 bytes.  Hex cannot contain
    C{{}, C{}} or C{:}, so no uid can end the tag early or make two users'
    keys collide, and Redis Cluster (or any sharding on the tag) keeps one
    user's keys on one shard.

    @type uid: L{str}
    @rtype: L{str}
    """
    return "u:" + uid.encode("utf-8").hex()


def userKey(uid, name):
    """
    The key C{im:{u:<hex>}:<name>} of user C{uid} (see L{userTag}).
    """
    return "im:{" + userTag(uid) + "}:" + name


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


def encodeCommand(args, encodeValue):
    """
    A command in RESP, as txredisapi's C{_build_command} makes it, in a
    fraction of its time (one C{%} per argument instead of a C{bytearray}
    grown token by token): bytes as they are, text as UTF-8, integers in
    decimal, anything else as C{encodeValue} (txredisapi's) makes it.

    @rtype: L{bytes}
    """
    parts = [b"*%d\r\n" % (len(args),)]
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            data = arg
        elif kind is str:
            data = arg.encode("utf-8")
        elif kind is int:
            data = b"%d" % (arg,)
        else:
            data = encodeValue(arg)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _RedisProtocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol (hiredis's parser) with a lean command path: a
    command is encoded by L{encodeCommand} and written, its L{Deferred}
    queued; each reply fires the oldest.  No C{DeferredQueue}, and one
    timer for the reply timeout of all the commands in flight (txredisapi
    makes a C{DelayedCall} and three Deferreds per command): no reply to
    the oldest command within C{replyTimeout} fails them all with
    C{txredisapi.TimeoutError} and drops the connection, as txredisapi does.
    Transactions and pipelines (not used here) keep txredisapi's path.
    """

    def __init__(self, *args, **kwargs):
        txredisapi.RedisProtocol.__init__(self, *args, **kwargs)
        self._inFlight = collections.deque()
        self._timer = None

    def _build_command(self, *args, **kwargs):
        return encodeCommand(args, self._encode_value)

    def execute_command(self, *args, **kwargs):
        if self.inTransaction or self.inMulti or self.pipelining:
            return txredisapi.RedisProtocol.execute_command(self, *args, **kwargs)
        if self.connected == 0:
            raise txredisapi.ConnectionError("Not connected")
        self.transport.write(encodeCommand(args, self._encode_value))
        d = Deferred()
        self._inFlight.append((d, self.factory.owner.reactor.seconds()))
        if self._timer is None and self.replyTimeout:
            self._timer = self.callLater(self.replyTimeout, self._checkTimeout)
        return d

    def replyReceived(self, reply):
        if not self._inFlight:
            return txredisapi.RedisProtocol.replyReceived(self, reply)
        d, _ = self._inFlight.popleft()
        if isinstance(reply, Exception):
            d.errback(reply)
        else:
            d.callback(reply)

    def _checkTimeout(self):
        self._timer = None
        if not self._inFlight:
            return
        oldest = self._inFlight[0][1]
        left = oldest + self.replyTimeout - self.factory.owner.reactor.seconds()
        if left > 0:
            self._timer = self.callLater(left, self._checkTimeout)
            return
        self._failAll(
            txredisapi.TimeoutError(
                "Not received Redis response in {} seconds".format(self.replyTimeout)
            )
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def _failAll(self, error):
        inFlight, self._inFlight = self._inFlight, collections.deque()
        for d, _ in inFlight:
            d.errback(error)

    def connectionLost(self, why):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        txredisapi.RedisProtocol.connectionLost(self, why)
        self._failAll(txredisapi.ConnectionError("Lost connection"))


class _Factory(txredisapi.RedisFactory):
    """
    txredisapi's factory as we use it: bytes both ways, reply timeouts on
    our reactor, connection events reported to its owner (a
    L{RedisConnection} or a L{RedisSubscriber}: C{reactor},
    C{_connected(conn)}, C{_disconnected(conn)}), and reconnecting even
    after a refused auth.

    txredisapi stops reconnecting for good when Redis refuses the
    credentials (wrong password, unknown user); we keep trying with the
    usual backoff (they may be fixed on the Redis side, during a password
    rotation), and say why it fails.
    """

    log = Logger()
    initialDelay = RECONNECT_INITIAL_DELAY
    maxDelay = RECONNECT_MAX_DELAY

    def __init__(self, owner, url, replyTimeout, dbid=None, protocol=None):
        txredisapi.RedisFactory.__init__(
            self,
            uuid=str(url),
            dbid=dbid,
            poolsize=1,
            isLazy=True,
            charset=None,
            password=url.password,
            replyTimeout=replyTimeout,
            convertNumbers=False,
            username=url.username,
        )
        self.protocol = protocol if protocol is not None else _RedisProtocol
        self.owner = owner

    def buildProtocol(self, addr):
        protocol = txredisapi.RedisFactory.buildProtocol(self, addr)
        protocol.callLater = self.owner.reactor.callLater
        return protocol

    def addConnection(self, conn):
        txredisapi.RedisFactory.addConnection(self, conn)
        if conn in self.pool:
            self.owner._connected(conn)

    def delConnection(self, conn):
        txredisapi.RedisFactory.delConnection(self, conn)
        self.owner._disconnected(conn)

    def stopTrying(self):
        if self.disconnectCalled:
            return txredisapi.RedisFactory.stopTrying(self)
        return succeed(None)

    def connectionError(self, why):
        # Never the password: Redis's own message only ("WRONGPASS ...").
        self.log.error(
            "Redis at {url} refused the connection: {why}; retrying", url=self.uuid, why=why
        )


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

    def __init__(self, reactor, url, factory, endpoint=None):
        self.reactor = reactor
        self.url = url
        self.onConnect = []
        self.onDisconnect = []
        #: A L{CommandStats} the commands are timed and counted in, or
        #: L{None} (tests).
        self.stats = None
        self._factory = factory
        self._endpoint = endpoint
        self._up = False
        self._protocol = None

    def start(self):
        """
        Start connecting (once; L{connectRedis} does it unless told not
        to).
        """
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            self._factory.startConnecting(endpoint)

    @property
    def connected(self):
        """
        Whether a connection is up now.
        """
        return self._up

    def _connected(self, conn):
        self._protocol = conn
        if not self._up:
            self._up = True
            self.log.info("connected to Redis at {url}", url=str(self.url))
            for callback in list(self.onConnect):
                self._run(callback)

    def _disconnected(self, conn):
        if conn is self._protocol:
            self._protocol = None
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

    def execute(self, *command, label=None):
        """
        Run one Redis command.

        @param label: what L{stats} counts it as (default: the command's
            name; a L{Script} gives its name).
        @return: a L{Deferred} firing with the reply (bulk strings as
            bytes, status replies such as C{OK} as bytes too, integers, lists,
            L{None}), or failing with L{RedisUnavailable} (no connection,
            no reply in time, or a "not now" error such as C{LOADING}; see
            L{RETRYABLE_ERRORS}) or C{txredisapi.ResponseError}.
        """
        stats = self.stats
        protocol = self._protocol
        if protocol is None or not protocol.connected:
            if stats is not None:
                stats.failed(label or command[0], "unavailable")
            return fail(RedisUnavailable("Redis is unavailable"))
        # Straight to the protocol (one connection: no pool to wait for).
        d = protocol.execute_command(*command)
        if stats is not None:
            d.addBoth(stats.observe, label or command[0], self.reactor.seconds())
        return d.addErrback(_unavailable)

    def script(self, source, name=None):
        """
        @param name: what L{stats} counts its calls as.
        @return: a L{Script} for C{source}, run on this connection.
        """
        return Script(self, source, name)

    def waitReplicas(self, replicas, timeoutMs, keys=None):
        """
        C{WAIT}: until C{replicas} replicas have every write sent on this
        connection so far, or C{timeoutMs}.

        @param keys: ignored (one Redis: every key is on it).
        @return: a L{Deferred} firing with how many have them.
        """
        return self.execute("WAIT", replicas, timeoutMs)

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
        self._endpoint = None
        return self._factory.disconnect()


#: Redis error replies that mean "not now" (loading its data, a script
#: running too long, a failover, out of memory...): the command was not
#: run; they fail with L{RedisUnavailable} like a lost connection.
RETRYABLE_ERRORS = frozenset(
    [
        "LOADING",
        "BUSY",
        "MISCONF",
        "OOM",
        "READONLY",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
        "NOTREADY",
    ]
)


#: The error of a Redis Cluster node when a script touches a key of a slot
#: it does not serve (the slot moved, or is migrating and the key is gone):
#: not run here, or not completed; retryable as L{RETRYABLE_ERRORS}.
NON_LOCAL_KEY = "ERR Script attempted to access a non local key"


def retryableError(message):
    """
    @return: whether the error reply C{message} says "not now" (see
        L{RETRYABLE_ERRORS}, L{NON_LOCAL_KEY}).
    """
    return message.split(" ", 1)[0] in RETRYABLE_ERRORS or message.startswith(NON_LOCAL_KEY)


def _unavailable(failure):
    error = failure.trap(txredisapi.ConnectionError, txredisapi.ResponseError)
    if error is txredisapi.ResponseError:
        message = str(failure.value)
        if not retryableError(message):
            return failure
        raise RedisUnavailable("Redis refused: {}".format(message))
    # A lost connection; TimeoutError (no reply in time) is one too.
    raise RedisUnavailable("Redis is unavailable: {}".format(failure.getErrorMessage()))


class Script:
    """
    A Lua script, run with C{EVALSHA} and sent in full (C{EVAL}) only when
    Redis does not know it yet (first use, or after a restart or
    C{SCRIPT FLUSH}).
    """

    def __init__(self, connection, source, name=None):
        self.connection = connection
        self.source = source.encode("utf-8") if isinstance(source, str) else source
        self.sha = hashlib.sha1(self.source).hexdigest()
        self.name = name or "EVALSHA"

    def __call__(self, keys=(), args=()):
        """
        @return: a L{Deferred} firing with the script's reply.
        """
        keys, args = list(keys), list(args)
        label = self.name
        d = self.connection.execute("EVALSHA", self.sha, len(keys), *(keys + args), label=label)

        def noScript(failure):
            failure.trap(txredisapi.ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self.connection.execute(
                "EVAL", self.source, len(keys), *(keys + args), label=label
            )

        return d.addErrback(noScript)


class CommandStats:
    """
    The latency and the failures of the commands of a gate's Redis
    connections, by command name (a script by its name), for
    C{/metrics} (L{imserver.cluster.ClusterMetrics}).

    @ivar seconds: L{imserver.metrics.HistogramsByLabel}: from sending a
        command to its reply reaching the gate's code.
    @ivar errors: C{{(command, kind): count}}; kind C{unavailable} (no
        connection, no reply in time, a "not now" error), C{noscript}
        (a script sent again in full: Redis restarted or was flushed), or
        C{error} (any other error reply).
    """

    def __init__(self, clock):
        self.clock = clock
        self.seconds = HistogramsByLabel(
            "imserver_redis_command_seconds",
            "Redis commands from sending to the reply, by command (a Lua script by its name).",
            "command",
            LATENCY_BUCKETS,
        )
        self.errors = {}

    def observe(self, result, label, start):
        self.seconds.observe(label, self.clock.seconds() - start)
        if isinstance(result, Failure):
            self.failed(label, _failureKind(result))
        return result

    def failed(self, label, kind):
        key = (label, kind)
        self.errors[key] = self.errors.get(key, 0) + 1


def _failureKind(failure):
    if not failure.check(txredisapi.ResponseError):
        return "unavailable"
    message = str(failure.value)
    if retryableError(message):
        return "unavailable"
    code = message.split(" ", 1)[0]
    return "noscript" if code == "NOSCRIPT" else "error"


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


def redisEndpoint(reactor, url, caFile, connectTimeout):
    """
    The client endpoint of the Redis at C{url} (a L{RedisURL}): TCP, wrapped
    in verified TLS for C{rediss://}.
    """
    endpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=connectTimeout)
    if url.tls:
        endpoint = wrapClientTLS(clientTLSOptions(url, caFile), endpoint)
    return endpoint


def connectRedis(
    reactor, url, caFile=None, replyTimeout=DEFAULT_REPLY_TIMEOUT, connectTimeout=5.0, start=True
):
    """
    Start a (re)connecting connection to Redis through C{reactor}.

    @type url: L{RedisURL}
    @param caFile: for C{rediss://}, see L{clientTLSOptions}.
    @param start: if false, connecting starts at L{RedisConnection.start}
        (a service tree built now and started later).
    @rtype: L{RedisConnection}
    """
    connection = RedisConnection(
        reactor, url, None, redisEndpoint(reactor, url, caFile, connectTimeout)
    )
    connection._factory = _Factory(connection, url, replyTimeout, dbid=url.db or None)
    if start:
        connection.start()
    return connection


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.owner._message(channel, message)


class RedisSubscriber:
    """
    One (re)connecting pub/sub connection, subscribed to C{channels}: it
    sends C{SUBSCRIBE} again on every new connection, which txredisapi does
    not do.  Messages published while it was not subscribed are lost (Redis
    pub/sub keeps nothing): C{onSubscribe} tells when to catch up.

    @ivar onSubscribe: callables run (with no argument) each time the
        subscription is in place: the first time and after every reconnect.
    @ivar onUnsubscribe: callables run each time the connection is lost
        while subscribed.
    """

    log = Logger()

    def __init__(self, reactor, url, channels, onMessage, endpoint, replyTimeout):
        self.reactor = reactor
        self.url = url
        self.channels = list(channels)
        self.onMessage = onMessage
        self.onSubscribe = []
        self.onUnsubscribe = []
        self._endpoint = endpoint
        self._factory = _Factory(self, url, replyTimeout, protocol=_SubscriberProtocol)
        self._protocol = None
        self._subscribed = False

    @property
    def subscribed(self):
        """
        Whether the subscription is in place now.
        """
        return self._subscribed

    def start(self):
        """
        Start connecting (once).
        """
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            self._factory.startConnecting(endpoint)

    def _connected(self, protocol):
        self._protocol = protocol
        protocol.subscribe(self.channels).addCallbacks(
            self._subscribedOn, self._subscribeFailed, (protocol,), None, (protocol,)
        )

    def _subscribedOn(self, reply, protocol):
        if protocol is not self._protocol or self._subscribed:
            return
        self._subscribed = True
        self.log.info(
            "subscribed to {channels} at {url}",
            channels=", ".join(_text(c) for c in self.channels),
            url=str(self.url),
        )
        for callback in list(self.onSubscribe):
            _run(self.log, callback)

    def _subscribeFailed(self, failure, protocol):
        self.log.warn(
            "subscribing at {url} failed ({why}); reconnecting",
            url=str(self.url),
            why=failure.getErrorMessage(),
        )
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def _disconnected(self, protocol):
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._subscribed:
            self._subscribed = False
            self.log.warn("lost the subscriber connection to Redis at {url}", url=str(self.url))
            for callback in list(self.onUnsubscribe):
                _run(self.log, callback)

    def _message(self, channel, message):
        try:
            self.onMessage(channel, message)
        except Exception:
            self.log.failure("handling a message on {channel} failed", channel=_text(channel))

    def ping(self):
        """
        Check the connection: C{PING} (answered even while subscribed); no
        answer within the reply timeout drops the connection, which then
        reconnects and subscribes again.  A silently dead connection would
        otherwise look subscribed forever.

        @return: a L{Deferred} firing with L{True} if the ping was answered,
            L{False} if not (or if not connected).
        """
        protocol = self._protocol
        if protocol is None or not self._subscribed:
            return succeed(False)
        try:
            d = protocol.execute_command("PING")
        except txredisapi.ConnectionError:
            return succeed(False)

        def failed(failure):
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            return False

        return d.addCallbacks(lambda _: True, failed)

    def disconnect(self):
        """
        Stop reconnecting and close the connection.

        @return: a L{Deferred} firing once closed.
        """
        self.onSubscribe = []
        self.onUnsubscribe = []
        self._endpoint = None
        return self._factory.disconnect()


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _run(log, callback):
    try:
        callback()
    except Exception:
        log.failure("Redis callback {cb!r} failed", cb=callback)


def subscribeRedis(
    reactor,
    url,
    channels,
    onMessage,
    caFile=None,
    replyTimeout=DEFAULT_REPLY_TIMEOUT,
    connectTimeout=5.0,
    start=True,
):
    """
    A (re)connecting subscriber to C{channels} through C{reactor}.

    @param onMessage: called with C{(channel, message)}, both L{bytes}, for
        every message published on one of the channels.
    @param start: if false, connecting starts at L{RedisSubscriber.start}.
    @rtype: L{RedisSubscriber}
    """
    subscriber = RedisSubscriber(
        reactor,
        url,
        channels,
        onMessage,
        redisEndpoint(reactor, url, caFile, connectTimeout),
        replyTimeout,
    )
    if start:
        subscriber.start()
    return subscriber
