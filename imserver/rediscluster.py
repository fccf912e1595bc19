# -*- test-case-name: tests.test_rediscluster -*-
"""
Redis Cluster through txredisapi, which has no cluster client: a thin
slot-aware layer over one L{imserver.redisclient.RedisConnection} per
primary, with the interface of a C{RedisConnection} (C{execute}, C{script},
C{publish}, C{onConnect}, C{onDisconnect}, C{connected}, C{start},
C{disconnect}), so that the store, the registry and the bus can use either.

  - URL: C{redis://[user:password@]h1:p1,h2:p2,h3:p3/0?cluster=yes} (or
    C{rediss://}, TLS to every node as in L{imserver.redisclient}); the
    hosts are seeds, the credentials apply to every node; database 0 only
    (L{parseRedisURL}, L{ClusterURL}).
  - Routing: a command goes to the primary owning the slot of its keys
    (L{keySlot}: CRC16 mod 16384 of the key or its hash tag, L{commandKeys}: where
    the keys are in a command); keys of several slots are refused before
    anything is sent (L{CrossSlotError}, C{CROSSSLOT}); a command with no
    key goes to any primary; C{SCRIPT} and C{FLUSHALL}/C{FLUSHDB} go to
    every primary; C{SCAN} walks the primaries one after the other behind
    one cursor.
  - The slot map comes from C{CLUSTER SLOTS} (not C{CLUSTER SHARDS}: it
    answers from Redis 3.0 on, managed offerings included, and is exactly
    the ranges -> primary we need; what C{SHARDS} adds, replicas' health
    and offsets, serves replica reads, which we do not do).  It is read at
    start from a seed, again after a C{MOVED} (that slot is updated at once;
    the full read is rate-limited to one per L{MIN_REFRESH_INTERVAL}), after
    a primary's connection is lost, and every L{DEGRADED_REFRESH_INTERVAL}
    while some primary is unreachable.  C{ASK} sends C{ASKING} and the
    command to the named node, the map unchanged.  At most
    L{MAX_REDIRECTIONS} per command.
  - Failover: while a dead primary's slots have no live owner, their
    commands fail at once with L{RedisUnavailable} (no connection), and
    work again by themselves once the map names the promoted replica (a
    command sent to a node whose connection is not up yet fails at once
    too: the caller retries, as with one Redis).
  - Replicas are not used, for reads either: a replica may lag, and the
    callers read what they just wrote.
  - Pub/sub: classic C{PUBLISH} is broadcast to every node of the cluster,
    so L{ClusterConnection.publish} uses any primary and the subscriber
    (L{subscribeCluster}) any one seed, moving to the next when its node
    dies.
"""

import binascii
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import txredisapi
from twisted.internet.defer import fail, gatherResults, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imserver.redisclient import (
    DEFAULT_REPLY_TIMEOUT,
    RedisSubscriber,
    RedisUnavailable,
    RedisURL,
    Script,
    connectRedis,
    redisEndpoint,
)

#: The number of hash slots of a Redis Cluster.
SLOTS = 16384

#: Redirections (C{MOVED}, C{ASK}) followed for one command before it fails
#: with L{RedisUnavailable}: a slot moving twice during one command is
#: already rare.
MAX_REDIRECTIONS = 5

#: Seconds at least between two reads of the slot map (C{MOVED}s during a
#: resharding come in bursts: the moved slot is fixed at once, the full
#: read once).
MIN_REFRESH_INTERVAL = 0.5

#: Seconds between two reads of the slot map while a primary is
#: unreachable: how soon after a failover the promoted replica is used.
DEGRADED_REFRESH_INTERVAL = 0.5

#: Commands without a key: sent to any primary.
KEYLESS = frozenset("CLUSTER COMMAND ECHO INFO LASTSAVE PING PUBLISH TIME".split())

#: Commands sent to every primary (each has its own scripts and keys); the
#: reply is the first primary's (C{WAIT}: the list of every primary's).
EVERY_PRIMARY = frozenset(["FLUSHALL", "FLUSHDB", "SCRIPT", "WAIT"])

#: Commands whose arguments are all keys.
ALL_KEYS = frozenset(
    "DEL EXISTS MGET PFCOUNT PFMERGE SDIFF SDIFFSTORE SINTER SINTERSTORE SUNION SUNIONSTORE"
    " TOUCH UNLINK WATCH".split()
)

#: Commands whose first two arguments are keys.
TWO_KEYS = frozenset("COPY LMOVE RENAME RENAMENX RPOPLPUSH SMOVE".split())

#: Commands whose keys follow a key count in argument 2.
NUMKEYS = frozenset("EVAL EVALSHA EVALSHA_RO EVAL_RO FCALL FCALL_RO".split())


def crc16(data):
    """
    CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the hash of
    the Redis Cluster specification: C{crc16(b"123456789") == 0x31C3}.
    """
    return binascii.crc_hqx(data, 0)


def _bytes(value):
    # As txredisapi encodes an argument.
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, float):
        return format(value, "f").encode()
    return str(value).encode("utf-8")


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def keySlot(key):
    """
    The hash slot of C{key}: only the hash tag is hashed if there is one
    (what is after the first left brace, up to the first right brace after
    it, if that is not empty).

    @type key: L{bytes} or L{str}
    @rtype: L{int}
    """
    key = _bytes(key)
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


_slotTags: list[str] = []


def slotTag(slot):
    """
    A hash tag of slot C{slot}: C{s:<n>} for the smallest C{n} whose tag
    hashes to C{slot}, for keys that must live in a given slot (the store's
    and the registry's per-slot keys).  The table of all 16384 is made at
    the first call (a fraction of a second).
    """
    if not _slotTags:
        tags = [""] * SLOTS
        missing, n = SLOTS, 0
        while missing:
            tag = "s:%d" % (n,)
            found = keySlot(tag)
            if not tags[found]:
                tags[found] = tag
                missing -= 1
            n += 1
        _slotTags[:] = tags
    return _slotTags[slot]


def byPrimary(connection, items, slotOf):
    """
    C{items} grouped by the primary serving their slot (C{slotOf(item)}) in
    C{connection}'s slot map, each group in their order: one call per
    primary.  An item whose slot the map does not place yet goes in a
    group of its slot (its call then fails as it would alone).

    @type connection: L{ClusterConnection}
    @return: a L{list} of L{list}s.
    """
    groups = {}
    addressOf = connection.addressOf
    for item in items:
        slot = slotOf(item)
        groups.setdefault(addressOf(slot) or slot, []).append(item)
    return list(groups.values())


def _name(value):
    return _text(value).upper()


def commandKeys(command):
    """
    The keys of C{command} (name and arguments): none for L{KEYLESS},
    the arguments of L{ALL_KEYS}, every other one of C{MSET}, the counted
    ones of L{NUMKEYS}, the first two of L{TWO_KEYS}; otherwise argument 1,
    right for every single-key command (an unknown key-less command is sent
    to some primary, which answers it as well as any other).
    """
    name = _name(command[0])
    if name in KEYLESS or name in EVERY_PRIMARY or name == "SCAN":
        return []
    if name in ALL_KEYS:
        return list(command[1:])
    if name in ("MSET", "MSETNX"):
        return list(command[1::2])
    if name in NUMKEYS:
        return list(command[3 : 3 + int(command[2])])
    if name in TWO_KEYS:
        return list(command[1:3])
    return list(command[1:2])


class CrossSlotError(txredisapi.ResponseError):
    """
    The keys of one command or script hash to different slots, which a
    Redis Cluster refuses (C{CROSSSLOT}); found before sending it.  Give
    the keys one hash tag.
    """


def commandSlot(command):
    """
    @return: the slot of C{command}'s keys, or L{None} if it has none.
    @raise CrossSlotError: if they are in several slots.
    """
    slot, first = None, None
    for key in commandKeys(command):
        other = keySlot(key)
        if slot is None:
            slot, first = other, key
        elif other != slot:
            raise CrossSlotError(
                "CROSSSLOT the keys of {} are in different slots ({!r}: {}, {!r}: {});"
                " give them one {{hash tag}}".format(_name(command[0]), first, slot, key, other)
            )
    return slot


@dataclass(frozen=True)
class ClusterURL:
    """
    Where and how to reach a Redis Cluster:
    C{redis://[user:password@]host:port,host:port/0?cluster=yes}.

    @ivar seeds: the C{(host, port)} of the nodes to ask for the slot map
        first (the others are found from it).
    """

    seeds: tuple
    username: str | None = None
    password: str | None = None
    tls: bool = False
    db: int = 0

    def node(self, host, port):
        """
        @return: the L{RedisURL} of the node at C{host}, C{port}, with this
            URL's credentials and TLS.
        """
        return RedisURL(host, port, 0, self.username, self.password, self.tls)

    def __str__(self):
        # Never the password: this goes to logs.
        user = "{}@".format(self.username) if self.username else ""
        hosts = ",".join(
            "[{}]:{}".format(h, p) if ":" in h else "{}:{}".format(h, p) for h, p in self.seeds
        )
        return "{}://{}{}/0?cluster=yes".format("rediss" if self.tls else "redis", user, hosts)


def parseRedisURL(text):
    """
    Parse a single Redis's URL (see L{RedisURL.parse}) or a cluster's
    (C{?cluster=yes}, see L{ClusterURL}).

    @rtype: L{RedisURL} or L{ClusterURL}
    @raise ValueError: if C{text} is neither (several hosts without
        C{cluster=yes}, a database other than 0 in a cluster, a query
        parameter other than C{cluster}, ...).
    """
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("{!r}: the scheme must be redis:// or rediss://".format(text))
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError("{!r}: bad query".format(text))
    names = [name for name, _ in params]
    if set(names) - {"cluster"} or len(names) != len(set(names)):
        raise ValueError("{!r}: the only query parameter is cluster=yes|no, once".format(text))
    cluster = dict(params).get("cluster", "no")
    if cluster not in ("yes", "no"):
        raise ValueError("{!r}: cluster must be yes or no".format(text))
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if cluster == "no":
        if "," in hosts:
            raise ValueError("{!r}: several hosts need ?cluster=yes".format(text))
        return RedisURL.parse(urlunsplit(parts._replace(query="")))
    if parts.fragment:
        raise ValueError("{!r}: no fragment allowed".format(text))
    path = parts.path.strip("/")
    if path and (not path.isdigit() or int(path) != 0):
        raise ValueError("{!r}: a Redis Cluster has database 0 only".format(text))
    seeds = []
    for item in hosts.split(","):
        try:
            seed = urlsplit("//" + item)
            port = seed.port or 6379
        except ValueError:
            raise ValueError("{!r}: bad host or port {!r}".format(text, item))
        if not seed.hostname:
            raise ValueError("{!r}: no host in {!r}".format(text, item))
        seeds.append((seed.hostname, port))
    username, colon, password = userinfo.partition(":")
    return ClusterURL(
        seeds=tuple(dict.fromkeys(seeds)),
        username=unquote(username) or None,
        password=unquote(password) if colon else None,
        tls=parts.scheme == "rediss",
    )


class ClusterConnection:
    """
    A Redis Cluster: one L{imserver.redisclient.RedisConnection} per
    primary, made when the slot map names it and closed when it leaves the
    map, and commands sent to the primary of their slot.

    @ivar url: the L{ClusterURL}.
    @ivar onConnect: callables run (with no argument) each time the
        cluster becomes usable: the slot map is known and every primary
        owning slots has a live connection.
    @ivar onDisconnect: callables run each time it stops being usable (a
        primary's connection is lost).  Commands for the other primaries'
        slots still run meanwhile.
    @ivar redirections: the C{MOVED} and C{ASK} redirections followed, by
        kind.
    @ivar refreshes: the reads of the slot map.
    """

    log = Logger()

    def __init__(self, reactor, url, connectNode):
        """
        @param connectNode: called with C{(host, port)}, returns a started
            connection to that node (a L{RedisConnection}).
        """
        self.reactor = reactor
        self.url = url
        self.onConnect = []
        self.onDisconnect = []
        self._name = str(url)
        self.redirections = {"MOVED": 0, "ASK": 0}
        self.refreshes = 0
        self._stats = None
        self._connectNode = connectNode
        # slot -> (host, port) of its primary; None before the first map.
        self._slots = None
        self._owners = frozenset()
        self._nodes = {}
        self._closing = set()
        # Nodes whose connection was lost and has not come back.
        self._lost = set()
        self._up = False
        self._started = self._stopped = False
        self._refreshing = self._again = False
        self._lastRefresh = None
        self._timer = None
        self._turn = 0

    @property
    def connected(self):
        """
        Whether the slot map is known and every primary in it is connected.
        """
        return self._up

    def start(self):
        """
        Start: read the slot map from the seeds, connect to the primaries
        (once; L{connectCluster} does it unless told not to).
        """
        if not self._started and not self._stopped:
            self._started = True
            self._refresh()

    @property
    def stats(self):
        """
        The L{imserver.redisclient.CommandStats} every node's commands are
        timed and counted in, or L{None}.  A redirected command counts as
        an C{error} on the node that redirected it.
        """
        return self._stats

    @stats.setter
    def stats(self, stats):
        self._stats = stats
        for node in self._nodes.values():
            node.stats = stats

    @property
    def primaries(self):
        """
        The C{(host, port)} of every primary in the slot map, sorted.
        """
        return sorted(self._owners)

    def addressOf(self, slot):
        """
        @return: the C{(host, port)} of the primary of C{slot} in the map,
            or L{None}.
        """
        return None if self._slots is None else self._slots[slot]

    # -- nodes and the slot map ------------------------------------------------

    def _node(self, address):
        node = self._nodes.get(address)
        if node is None:
            self.log.info(
                "{url}: connecting to node {node}", url=self._name, node=_address(address)
            )
            node = self._nodes[address] = self._connectNode(*address)
            node.stats = self._stats
            node.onConnect.append(lambda: self._nodeChanged(address))
            node.onDisconnect.append(lambda: self._nodeChanged(address, lost=True))
        return node

    def _forget(self, address):
        self.log.info("{url}: closing node {node}", url=self._name, node=_address(address))
        d = self._nodes.pop(address).disconnect()
        self._closing.add(d)

        def closed(result):
            self._closing.discard(d)
            if isinstance(result, Failure):
                self.log.failure("{url}: closing {node}", result, url=self._name, node=address)

        d.addBoth(closed)

    def _nodeChanged(self, address, lost=False):
        self._update()
        if lost:
            self._lost.add(address)
        elif address in self._lost:
            # Back after a loss: after a failover it is a replica now,
            # which only a fresh map says.
            self._lost.discard(address)
            self._scheduleRefresh()
        if self._slots is None or (lost and address in self._owners):
            self._scheduleRefresh()

    def _update(self):
        up = (
            not self._stopped
            and bool(self._owners)
            and all(self._nodes[a].connected for a in self._owners)
        )
        if up == self._up:
            return
        self._up = up
        if up:
            self.log.info("{url}: every primary is connected", url=self._name)
            callbacks = self.onConnect
            if self._timer is not None and not self._again:
                # No more reads while degraded.
                self._timer.cancel()
                self._timer = None
        else:
            self.log.warn(
                "{url}: primaries unreachable: {nodes}",
                url=self._name,
                nodes=", ".join(
                    _address(a) for a in sorted(self._owners) if not self._nodes[a].connected
                ),
            )
            callbacks = self.onDisconnect
            self._scheduleRefresh()
        for callback in list(callbacks):
            try:
                callback()
            except Exception:
                self.log.failure("Redis cluster callback {cb!r} failed", cb=callback)

    def _scheduleRefresh(self, delay=0.0):
        """
        Read the slot map in C{delay} seconds, or later: at most once per
        L{MIN_REFRESH_INTERVAL}, and never twice at once.
        """
        if self._stopped or not self._started:
            return
        now = self.reactor.seconds()
        at = now + delay
        if self._lastRefresh is not None:
            at = max(at, self._lastRefresh + MIN_REFRESH_INTERVAL)
        if self._timer is not None:
            if self._timer.getTime() <= at:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(at - now, self._refresh)

    def _refresh(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._stopped:
            return
        if self._refreshing:
            self._again = True
            return
        candidates = [address for address, node in self._nodes.items() if node.connected]
        if not candidates:
            # Nobody to ask (yet): the seeds, and a node coming up asks.
            for seed in self.url.seeds:
                self._node(seed)
            self._scheduleRefresh(DEGRADED_REFRESH_INTERVAL)
            return
        self._refreshing, self._again = True, False
        self._lastRefresh = self.reactor.seconds()
        self.refreshes += 1
        d = self._askSlots(candidates)
        d.addCallback(self._apply).addErrback(self._refreshFailed).addBoth(self._refreshed)

    def _askSlots(self, addresses):
        address, rest = addresses[0], addresses[1:]
        node = self._nodes.get(address)
        if node is None:
            d = fail(RedisUnavailable("node {} left meanwhile".format(_address(address))))
        else:
            d = node.execute("CLUSTER", "SLOTS").addCallback(lambda reply: (address, reply))
        if rest:
            d.addErrback(lambda _: self._askSlots(rest))
        return d

    def _apply(self, answer):
        if self._stopped:
            return
        asked, reply = answer
        slots = [None] * SLOTS
        for entry in reply:
            start, end, primary = entry[0], entry[1], entry[2]
            # No endpoint (None or ""): the node asked, at that port.
            host = _text(primary[0]) if primary[0] else asked[0]
            if host != "?":
                slots[start : end + 1] = [(host, int(primary[1]))] * (end - start + 1)
        owners = frozenset(slots) - {None}
        if not owners:
            raise RedisUnavailable("no slot is served")
        if owners != self._owners:
            self.log.info(
                "{url}: slot map from {node}: primaries {primaries}",
                url=self._name,
                node=_address(asked),
                primaries=", ".join(_address(a) for a in sorted(owners)),
            )
        self._slots, self._owners = slots, owners
        for address in owners:
            self._node(address)
        for address in list(self._nodes):
            if address not in owners:
                self._forget(address)
        self._update()

    def _refreshFailed(self, failure):
        if failure.check(RedisUnavailable, txredisapi.ResponseError):
            self.log.warn(
                "{url}: cannot read the slot map: {why}",
                url=self._name,
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("{url}: reading the slot map failed", failure, url=self._name)

    def _refreshed(self, _):
        self._refreshing = False
        if self._again:
            self._scheduleRefresh()
        elif not self._up:
            self._scheduleRefresh(DEGRADED_REFRESH_INTERVAL)

    # -- commands --------------------------------------------------------------

    def execute(self, *command, label=None):
        """
        Run one Redis command on the primary of its keys' slot (see
        L{commandKeys}), following C{MOVED} and C{ASK}.

        @param label: what L{stats} counts it as (default: the command's
            name; a L{Script} gives its name).

        @return: a L{Deferred} firing with the reply (as
            L{RedisConnection.execute}), or failing with L{RedisUnavailable}
            (no connection to the slot's primary, no reply in time,
            C{CLUSTERDOWN}, C{TRYAGAIN}, too many redirections...),
            L{CrossSlotError}, or C{txredisapi.ResponseError}.
        """
        label = label or command[0]
        name = _name(command[0])
        try:
            if self._stopped:
                raise RedisUnavailable("the Redis cluster connection is closed")
            if name == "SCAN":
                return self._scan(command, label)
            if name in EVERY_PRIMARY:
                return self._everyPrimary(command, label)
            slot = commandSlot(command)
            return self._send(command, label, slot, MAX_REDIRECTIONS)
        except (RedisUnavailable, CrossSlotError) as e:
            # Never sent: counted here, as a connection counts its own.
            if self._stats is not None:
                kind = "unavailable" if isinstance(e, RedisUnavailable) else "error"
                self._stats.failed(label, kind)
            return fail()

    def _send(self, command, label, slot, redirections, address=None, asking=False):
        node = self._node(address or self._route(slot))
        if asking:
            # On the same connection, just before: it allows that command.
            node.execute("ASKING").addErrback(lambda _: None)
        d = node.execute(*command, label=label)
        return d.addErrback(self._redirected, command, label, slot, redirections, node)

    def _route(self, slot):
        if self._slots is None:
            raise RedisUnavailable("the slot map of {} is not known yet".format(self.url))
        if slot is None:
            live = sorted(a for a in self._owners if self._nodes[a].connected)
            if not live:
                raise RedisUnavailable("no primary of {} is connected".format(self.url))
            self._turn += 1
            return live[self._turn % len(live)]
        address = self._slots[slot]
        if address is None:
            raise RedisUnavailable("no node of {} serves slot {}".format(self.url, slot))
        return address

    def _redirected(self, failure, command, label, slot, redirections, via):
        failure.trap(txredisapi.ResponseError)
        kind, _, rest = str(failure.value).partition(" ")
        if kind not in ("MOVED", "ASK"):
            return failure
        try:
            slotText, target = rest.split()
            host, _, port = target.rpartition(":")
            movedSlot, address = int(slotText), (host or via.url.host, int(port))
        except ValueError:
            return failure
        if redirections <= 0:
            raise RedisUnavailable(
                "{} still redirected after {} redirections".format(
                    _name(command[0]), MAX_REDIRECTIONS
                )
            )
        self.redirections[kind] += 1
        self.log.debug(
            "{url}: {kind} slot {slot} to {node}",
            url=self._name,
            kind=kind,
            slot=movedSlot,
            node=_address(address),
        )
        if self._stopped:
            raise RedisUnavailable("the Redis cluster connection is closed")
        if kind == "ASK":
            return self._send(command, label, slot, redirections - 1, address, asking=True)
        if self._slots is not None:
            self._slots[movedSlot] = address
            if address not in self._owners:
                self._owners |= {address}
                self._node(address)
                self._update()
        self._scheduleRefresh()
        return self._send(command, label, slot, redirections - 1, address)

    def waitReplicas(self, replicas, timeoutMs, keys=None):
        """
        C{WAIT}: until C{replicas} replicas of each primary have every
        write this client sent it so far, or C{timeoutMs}; on the primaries
        of C{keys}' slots, or on every primary.  A node that refuses (it is
        a replica now: a failover the map does not show yet) makes the map
        read again and fails with L{RedisUnavailable}.

        @return: a L{Deferred} firing with the fewest replicas that have
            them, over those primaries.
        """
        if keys is None:
            d = self.execute("WAIT", replicas, timeoutMs)
        else:
            try:
                addresses = sorted({self._route(keySlot(key)) for key in keys})
            except RedisUnavailable:
                return fail()
            d = gatherResults(
                [self._node(a).execute("WAIT", replicas, timeoutMs) for a in addresses],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure)

        def refused(failure):
            failure.trap(txredisapi.ResponseError)
            self._scheduleRefresh()
            raise RedisUnavailable("WAIT refused: {}".format(failure.getErrorMessage()))

        return d.addCallbacks(min, refused)

    def _everyPrimary(self, command, label):
        if not self._owners:
            raise RedisUnavailable("no primary of {} is known".format(self.url))
        d = gatherResults(
            [self._nodes[a].execute(*command, label=label) for a in sorted(self._owners)],
            consumeErrors=True,
        )
        every = _name(command[0]) == "WAIT"
        return d.addCallbacks(
            lambda replies: replies if every else replies[0], lambda f: f.value.subFailure
        )

    def _scan(self, command, label):
        """
        C{SCAN} of every primary in turn, behind one cursor
        C{"<host>:<port>:<cursor of that node>"} (C{0} at the start and the
        end).  Like C{SCAN} itself, a key moved or a primary replaced during
        the scan may be missed or returned twice.
        """
        owners = sorted(self._owners)
        if not owners:
            raise RedisUnavailable("no primary of {} is known".format(self.url))
        cursor = _text(command[1]) if len(command) > 1 else "0"
        if cursor == "0":
            address, nodeCursor = owners[0], "0"
        else:
            try:
                host, port, nodeCursor = cursor.rsplit(":", 2)
                address = (host, int(port))
            except ValueError:
                return fail(txredisapi.ResponseError("ERR invalid cursor {!r}".format(cursor)))
            if address not in self._owners:
                later = [a for a in owners if a > address]
                if not later:
                    return succeed([b"0", []])
                address, nodeCursor = later[0], "0"

        def advance(reply):
            nextCursor, keys = reply
            if _text(nextCursor) != "0":
                return [b"%s:%d:%s" % (address[0].encode(), address[1], _bytes(nextCursor)), keys]
            later = [a for a in sorted(self._owners) if a > address]
            if not later:
                return [b"0", keys]
            return [b"%s:%d:0" % (later[0][0].encode(), later[0][1]), keys]

        d = self._nodes[address].execute("SCAN", nodeCursor, *command[2:], label=label)
        return d.addCallback(advance)

    def script(self, source, name=None):
        """
        @param name: what L{stats} counts its calls as.
        @return: a L{Script} for C{source}: C{EVALSHA}, and C{EVAL} where
            the primary of its keys (any primary if none) does not know it
            yet; each primary has its own script cache.
        """
        return Script(self, source, name)

    def publish(self, channel, message):
        """
        Publish on any primary: classic pub/sub is broadcast to every node
        of the cluster.

        @return: a L{Deferred} firing with the number of subscribers that
            got C{message} on that node (those subscribed on other nodes
            are not counted).
        """
        return self.execute("PUBLISH", channel, message)

    def disconnect(self):
        """
        Stop, and close every node's connection.

        @return: a L{Deferred} firing once they are closed.
        """
        self._stopped = True
        self._up = False
        self.onConnect = []
        self.onDisconnect = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for address in list(self._nodes):
            self._forget(address)
        return gatherResults(list(self._closing), consumeErrors=True).addCallback(lambda _: None)


def _address(address):
    return "{}:{}".format(*address)


def connectCluster(
    reactor, url, caFile=None, replyTimeout=DEFAULT_REPLY_TIMEOUT, connectTimeout=5.0, start=True
):
    """
    A connection to the Redis Cluster at C{url} through C{reactor}, as
    L{imserver.redisclient.connectRedis} for one Redis.

    @type url: L{ClusterURL}
    @param caFile: for C{rediss://}, see L{clientTLSOptions}; the nodes'
        certificates are checked against the host names the cluster gives
        (C{cluster-preferred-endpoint-type hostname}, or IP addresses in
        the certificates).
    @param replyTimeout: seconds before an unanswered command fails, which
        bounds how long a command for a dead primary can wait.
    @param start: if false, connecting starts at L{ClusterConnection.start}.
    @rtype: L{ClusterConnection}
    """

    def connectNode(host, port):
        return connectRedis(reactor, url.node(host, port), caFile, replyTimeout, connectTimeout)

    cluster = ClusterConnection(reactor, url, connectNode)
    if start:
        cluster.start()
    return cluster


@implementer(IStreamClientEndpoint)
class _RoundRobinEndpoint:
    """
    An endpoint connecting to each of C{endpoints} in turn: every
    reconnection tries the next one.
    """

    def __init__(self, endpoints):
        self._endpoints = list(endpoints)
        self._next = 0

    def connect(self, protocolFactory):
        endpoint = self._endpoints[self._next % len(self._endpoints)]
        self._next += 1
        return endpoint.connect(protocolFactory)


class ClusterSubscriber(RedisSubscriber):
    """
    A L{RedisSubscriber} on one node of a cluster at a time: the seeds in
    turn, the next one after the connection to a node is lost (classic
    pub/sub reaches every node, replicas included).  Give several seeds:
    with one, a dead seed is not replaced.
    """

    @property
    def node(self):
        """
        The C{(host, port)} of the node subscribed on now, or L{None}.
        """
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return None
        peer = protocol.transport.getPeer()
        return (peer.host, peer.port)


def subscribeCluster(
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
    A (re)connecting subscriber to C{channels} of the cluster at C{url}, as
    L{imserver.redisclient.subscribeRedis} for one Redis.

    @type url: L{ClusterURL}
    @param onMessage: called with C{(channel, message)}, both L{bytes}.
    @param start: if false, connecting starts at L{ClusterSubscriber.start}.
    @rtype: L{ClusterSubscriber}
    """
    endpoint = _RoundRobinEndpoint(
        [
            redisEndpoint(reactor, url.node(host, port), caFile, connectTimeout)
            for host, port in url.seeds
        ]
    )
    subscriber = ClusterSubscriber(reactor, url, channels, onMessage, endpoint, replyTimeout)
    if start:
        subscriber.start()
    return subscriber
