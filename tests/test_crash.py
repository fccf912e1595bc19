# -*- test-case-name: tests.test_crash -*-
"""
The delivery crash test: real C{twistd im} processes, the real reconnecting
client (L{imserver.client.IMClient}), and faults.

Several users exchange messages while the test aborts client sockets at
random (about every L{DROP_INTERVAL} acknowledged messages) and C{kill -9}s
servers at given fractions of the run, restarting each on the same port
and data.  Three set-ups:

  - L{CrashTests}: one gate on SQLite, killed at L{KILL_AT}; at least
    L{MESSAGES} messages.
  - L{ClusterCrashTests}: L{CLUSTER_GATES} gates in cluster mode sharing one
    C{redis-server} with C{appendfsync always}; each client connects to the
    gates in turn (a new gate at every reconnect, as a client going down
    the dispatcher's list does); every gate and Redis (twice) are killed
    in turn (L{CLUSTER_FAULTS}); at least L{CLUSTER_MESSAGES} messages.
  - L{RedisClusterCrashTests}: the same on a real Redis Cluster (three
    primaries, a replica each: L{tests.support.rediscluster}), users on
    every primary; every gate and one primary are killed in turn
    (L{REDIS_CLUSTER_FAULTS}), the primary's replica is promoted and the
    killed node rejoins as a replica.  With C{--redis-wait-replicas 1}
    nothing acknowledged may be lost; without it the test measures what a
    failover loses (the asynchronous replication window).

Afterwards it checks the recorded history the way Jepsen does:

    - lost: acknowledged to the sender but missing from the recipient's
      (or the sender's own) inbox stream;
    - unexpected: delivered but never sent (or not as sent);
    - duplicates: one message delivered twice to one device, or one
      C{client_msg_id} stored as two messages (the client drops repeats of
      a seq, so any duplicate it hands over is a violation);
    - reordered: a recipient's stream not in strictly increasing seq (and,
      on SQLite, message id: the server's acceptance order; cluster mode
      hands out ids in blocks per gate, unique but not ordered), an
      acknowledged seq that is not where the message was delivered, or a
      message accepted before one its sender had already seen acknowledged
      (a lower seq in the sender's inbox; on SQLite also a lower id);
    - gaps: a stream that does not hold exactly the seqs of the inbox
      (C{1..head} on SQLite; in cluster mode seqs start above a floor and
      jump after a Redis restart, so the test reads the inbox from Redis).

Set C{$IMSERVER_CRASH_MESSAGES} for longer runs (every set-up sends at
least that many messages), and C{$IMSERVER_CRASH_SEED} to replay a run's
random choices (the timing of a live run is not reproducible).  Everything
listens and connects on 127.0.0.1 only.
"""

import os
import random
import signal
import time
from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.auth import mintToken
from imserver.client import IMClient
from imserver.errors import ConnectionClosedByPeer, RemoteError, RequestTimeout
from imserver.pb import im_pb2 as pb

from tests.support.live import withDeadline
from tests.support.redis import RedisServer, whenConnected
from tests.support.twistd import (
    HEARTBEAT_INTERVAL,
    IDLE_TIMEOUT,
    START_DEADLINE,
    TOLERATED,
    Gate,
    RotatingEndpoint,
    clusterGate,
    loggedTracebacks,
    newSecretFile,
)

#: Users exchanging messages (each one client, one device).
USERS = 6
#: C{$IMSERVER_CRASH_MESSAGES}: the least number of messages of each run.
_REQUESTED = int(os.environ.get("IMSERVER_CRASH_MESSAGES") or 0)
#: Messages sent in all in L{CrashTests} (at least).
MESSAGES = max(10000, _REQUESTED)
#: Messages sent in all in L{ClusterCrashTests} (at least).
CLUSTER_MESSAGES = max(10000, _REQUESTED)
#: Gate processes in L{ClusterCrashTests}.
CLUSTER_GATES = 3
#: The share of the sends that go to a group, where the test has groups.
GROUP_SHARE = 0.1
#: Sends each user has awaiting an answer at most.
IN_FLIGHT = 20
#: A random client socket is aborted after about every this many acks.
DROP_INTERVAL = 100
#: The server is killed (SIGKILL) when these fractions of the messages are
#: acknowledged, and restarted.
KILL_AT = (1.0 / 3, 2.0 / 3)
#: In cluster mode: what is killed (SIGKILL) and restarted when these
#: fractions of the messages are acknowledged: a gate index, or C{"redis"}.
CLUSTER_FAULTS = ((1.0 / 6, 0), (2.0 / 6, "redis"), (3.0 / 6, 1), (4.0 / 6, 2), (5.0 / 6, "redis"))
#: On a Redis Cluster: what is killed (SIGKILL) when these fractions of the
#: messages are acknowledged: a gate index (restarted), or C{"primary"}
#: (the primary of the first user's keys: its replica is promoted and the
#: killed node rejoins as a replica).
REDIS_CLUSTER_FAULTS = ((1.0 / 5, 0), (2.0 / 5, "primary"), (3.0 / 5, 1), (4.0 / 5, 2))
#: Seconds allowed for every send to be acknowledged, per 10,000 messages.
ACK_DEADLINE = 120.0
#: Seconds allowed, once every send is acknowledged, for every inbox to be
#: delivered completely.
CATCH_UP_DEADLINE = 30.0
#: The trial timeout: room for both deadlines, the starts and the cleanup.
TEST_TIMEOUT = 240.0
#: L{ACK_DEADLINE} and L{TEST_TIMEOUT} of L{RedisClusterCrashTests}.
REDIS_CLUSTER_ACK_DEADLINE = 60.0
REDIS_CLUSTER_TIMEOUT = 150.0
#: Violations described in a failure message, at most.
MAX_DETAILS = 20


def _scale(messages):
    """
    How many times longer than a 10,000-message run a run of C{messages}
    may take (at least 1).
    """
    return max(1.0, messages / 10000.0)


def sqliteGate(dataDir, args=()):
    """
    The L{Gate} of L{CrashTests}: SQLite in C{dataDir}, and C{args}.
    """
    return Gate(
        dataDir,
        [
            "--store",
            "sqlite",
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL),
            "--idle-timeout",
            str(IDLE_TIMEOUT),
        ]
        + list(args),
    )


def killSaver(gate):
    """
    C{kill -9} the SQLite saver process of C{gate} (C{--store-writer
    process}); the gate starts another at once.

    @return: a L{Deferred} firing with 0 (the gate itself stays up).
    """
    gatePid = gate.runs[-1].transport.pid
    with open("/proc/{0}/task/{0}/children".format(gatePid)) as f:
        [saver] = [int(pid) for pid in f.read().split()]
    os.kill(saver, signal.SIGKILL)
    gate.kills += 1
    return succeed(0.0)


class CrashableRedis:
    """
    A L{tests.support.redis.RedisServer} as the workload crashes it.

    @ivar kills: how often it was killed with SIGKILL.
    """

    def __init__(self, server):
        self.server = server
        self.kills = 0

    @inlineCallbacks
    def crash(self):
        """
        C{kill -9} Redis and start it again on its port and data.

        @return: a L{Deferred} firing with the seconds it was down.
        """
        started = time.monotonic()
        self.kills += 1
        yield self.server.kill()
        yield self.server.start()
        return time.monotonic() - started

    def output(self):
        """
        Nothing: Redis's log is not checked.
        """
        return ""


class CrashablePrimary:
    """
    The primary of a slot of a L{tests.support.rediscluster.RedisCluster},
    as the workload crashes it: killed, its replica promoted, the killed
    node back as a replica.

    @ivar kills: how often a primary was killed with SIGKILL.
    @ivar failovers: how often a replica was promoted in its place.
    """

    def __init__(self, cluster, slot):
        self.cluster = cluster
        self.slot = slot
        self.kills = 0
        self.failovers = 0

    @inlineCallbacks
    def crash(self):
        """
        C{kill -9} the primary of the slot, wait until every node says its
        replica serves the slot, start the killed node again and wait until
        it has synced as that replica's replica.

        @return: a L{Deferred} firing with the seconds until then.
        """
        started = time.monotonic()
        self.kills += 1
        node = yield self.cluster.killPrimaryOf(self.slot)
        yield self.cluster.waitForFailover(self.slot)
        self.failovers += 1
        yield self.cluster.rejoin(node)
        return time.monotonic() - started

    def output(self):
        """
        Nothing: Redis's log is not checked.
        """
        return ""


@inlineCallbacks
def _connected(url):
    """
    @return: a L{Deferred} firing with a connection to the Redis (or the
        cluster) at C{url}, once connected.
    """
    from imserver.redisclient import connectRedis
    from imserver.rediscluster import ClusterURL, connectCluster, parseRedisURL

    parsed = parseRedisURL(url)
    if isinstance(parsed, ClusterURL):
        connection = connectCluster(reactor, parsed)
    else:
        connection = connectRedis(reactor, parsed)
    try:
        yield withDeadline(whenConnected(connection), START_DEADLINE, "connecting to Redis")
    except BaseException:
        yield connection.disconnect()
        raise
    return connection


@inlineCallbacks
def redisInboxes(url, uids):
    """
    Read the inboxes of C{uids} straight from Redis (one, or a cluster).

    @param url: the C{redis://} URL (C{?cluster=yes} for a cluster).
    @return: a L{Deferred} firing with C{{uid: {seq: (message id,
        outgoing)}}}.
    """
    from imserver.redisclient import userKey

    connection = yield _connected(url)
    try:
        inboxes = {}
        for uid in uids:
            members = yield connection.execute("ZRANGE", userKey(uid, "inbox"), 0, -1)
            inboxes[uid] = {}
            for member in members:
                # seq:message id:outgoing (0 or 1):created ms
                seq, messageId, outgoing = member.split(b":")[:3]
                inboxes[uid][int(seq)] = (int(messageId), outgoing == b"1")
    finally:
        yield connection.disconnect()
    return inboxes


@inlineCallbacks
def createGroups(url, groups):
    """
    Create C{groups} (C{{group id: [member, ...]}}, the first the owner)
    in the Redis (or cluster) at C{url}, through the store.
    """
    from imserver.store.redis import RedisMessageStore

    connection = yield _connected(url)
    try:
        store = RedisMessageStore(connection, reactor)
        nowMs = int(time.time() * 1000)
        for groupId, members in groups.items():
            yield store.createGroup(groupId, groupId, members[0], nowMs)
            others = [(uid, pb.ROLE_MEMBER) for uid in members[1:]]
            yield store.setMembers(groupId, others, len(members), nowMs)
    finally:
        yield connection.disconnect()


def storedLost(history, inboxes):
    """
    The acknowledged messages the store no longer has: missing from the
    recipient's inbox or (as outgoing) from the sender's, as C{inboxes}
    (from L{redisInboxes}) have them; whether delivered before or not.

    @return: a L{list} of L{Sent}.
    """
    held = {
        uid: {(messageId, outgoing) for messageId, outgoing in inbox.values()}
        for uid, inbox in inboxes.items()
    }
    return [
        sent
        for sent in history.sends.values()
        if sent.response is not None
        and not (
            all((sent.response.message_id, False) in held.get(uid, ()) for uid in sent.recipients)
            and (sent.response.message_id, True) in held.get(sent.sender, ())
        )
    ]


@dataclass
class Sent:
    """
    One message handed to L{IMClient.send}.

    @ivar floorId: the highest message id acknowledged to the sender when
        this one was sent: the server accepted this one later, so its id
        must be higher (where ids are ordered).
    @ivar floorSeq: the highest seq in the sender's inbox acknowledged to
        it when this one was sent: this one's must be higher.
    @ivar response: the L{pb.SendResponse} once acknowledged.
    @ivar groupId: for a group message (C{to} empty), the group.
    @ivar members: for a group message, its recipients: the members but
        the sender.
    """

    sender: str
    to: str
    counter: int
    clientMsgId: str
    body: bytes
    floorId: int
    floorSeq: int = 0
    response: object = None
    groupId: str = ""
    members: tuple = ()

    @property
    def recipients(self):
        """
        Who must get it: the members but the sender, or C{to}.
        """
        return self.members if self.groupId else (self.to,)


@dataclass
class Counts:
    """
    The outcome of L{History.check}.
    """

    sent: int = 0
    acked: int = 0
    delivered: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicates: int = 0
    reordered: int = 0
    gaps: int = 0
    details: list = field(default_factory=list)

    def violation(self, kind, description):
        """
        Count one violation of C{kind} and remember its description.
        """
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.details) < MAX_DETAILS:
            self.details.append("{}: {}".format(kind, description))


class History:
    """
    What was sent, acknowledged and delivered, per user; and the check.

    @ivar sends: C{{(sender, client_msg_id): Sent}}.
    @ivar streams: C{{uid: [InboxEntry]}}, in the order the user's client
        handed them over.
    """

    def __init__(self, users, idsOrdered=True):
        """
        @param idsOrdered: whether message ids follow the server's
            acceptance order (one gate), so streams are checked for it.
        """
        self.idsOrdered = idsOrdered
        self.sends = {}
        self.streams = {uid: [] for uid in users}
        self._waiting = {uid: [] for uid in users}

    def recordSend(self, sent):
        """
        Record a message about to be sent.
        """
        self.sends[(sent.sender, sent.clientMsgId)] = sent

    def recordDelivery(self, uid, entry):
        """
        Record an inbox entry the client of C{uid} handed over, and wake
        those waiting for it.
        """
        self.streams[uid].append(entry)
        waiting = self._waiting[uid]
        for item in list(waiting):
            seq, d = item
            if entry.seq >= seq:
                waiting.remove(item)
                d.callback(entry.seq)

    def whenDelivered(self, uid, seq):
        """
        @return: a L{Deferred} firing once C{uid} has been handed an entry
            with a seq of at least C{seq}.
        """
        stream = self.streams[uid]
        if seq == 0 or (stream and stream[-1].seq >= seq):
            return succeed(seq)
        waiting = self._waiting[uid]

        def cancel(d):
            if (seq, d) in waiting:
                waiting.remove((seq, d))

        d = Deferred(cancel)
        waiting.append((seq, d))
        return d

    def expectedDeliveries(self):
        """
        How many deliveries the sends make: one per recipient (a group
        message one per member but the sender).
        """
        return sum(len(sent.recipients) for sent in self.sends.values())

    def check(self, inboxes):
        """
        Check the history.

        @param inboxes: C{{uid: seqs}}, the seqs of each inbox as the
            server has them: an L{int} head for C{1..head}, or a L{set} (or
            a L{dict} keyed by seq); the streams of users missing from it
            are not checked for gaps.
        @rtype: L{Counts}
        """
        counts = Counts()
        counts.sent = len(self.sends)
        # uid -> ids of the messages in its stream, incoming and outgoing.
        incoming = {uid: set() for uid in self.streams}
        outgoing = {uid: {} for uid in self.streams}
        for uid, stream in sorted(self.streams.items()):
            self._checkStream(uid, stream, inboxes.get(uid), counts, incoming, outgoing)
        for sent in self.sends.values():
            if sent.response is None:
                continue
            counts.acked += 1
            messageId = sent.response.message_id
            missing = [uid for uid in sent.recipients if messageId not in incoming[uid]]
            for uid in missing:
                counts.violation(
                    "lost",
                    "{} -> {} ({}, id {}) acked, not delivered".format(
                        sent.sender, uid, sent.clientMsgId, messageId
                    ),
                )
            if not missing and messageId not in outgoing[sent.sender]:
                counts.violation(
                    "lost",
                    "{} ({}, id {}) acked, missing from the sender's stream".format(
                        sent.sender, sent.clientMsgId, messageId
                    ),
                )
            elif not missing and outgoing[sent.sender][messageId] != sent.response.seq:
                counts.violation(
                    "reordered",
                    "{} ({}) acked with seq {}, delivered to the sender at seq {}".format(
                        sent.sender,
                        sent.clientMsgId,
                        sent.response.seq,
                        outgoing[sent.sender][messageId],
                    ),
                )
            if sent.response.seq <= sent.floorSeq:
                counts.violation(
                    "reordered",
                    "{} ({}) got seq {}, not above {} acked before it was sent".format(
                        sent.sender, sent.clientMsgId, sent.response.seq, sent.floorSeq
                    ),
                )
            elif self.idsOrdered and messageId <= sent.floorId:
                counts.violation(
                    "reordered",
                    "{} ({}) got id {}, not above {} acked before it was sent".format(
                        sent.sender, sent.clientMsgId, messageId, sent.floorId
                    ),
                )
        return counts

    def _checkStream(self, uid, stream, inbox, counts, incoming, outgoing):
        previousSeq = previousId = 0
        seenIds = {}
        stored = {}
        for entry in stream:
            message = entry.message
            where = "{} seq {} (id {}, {} {})".format(
                uid, entry.seq, message.id, message.sender, message.client_msg_id
            )
            if entry.seq <= previousSeq:
                counts.violation("reordered", "{} after seq {}".format(where, previousSeq))
            elif self.idsOrdered and message.id <= previousId:
                counts.violation("reordered", "{} after id {}".format(where, previousId))
            previousSeq = max(previousSeq, entry.seq)
            previousId = max(previousId, message.id)
            if message.id in seenIds:
                counts.violation(
                    "duplicates",
                    "{} already delivered at seq {}".format(where, seenIds[message.id]),
                )
                continue
            seenIds[message.id] = entry.seq
            key = (message.sender, message.client_msg_id)
            if key in stored:
                counts.violation(
                    "duplicates", "{} already stored as id {}".format(where, stored[key])
                )
                continue
            stored[key] = message.id
            sent = self.sends.get(key)
            if sent is not None and sent.groupId:
                mine = uid == message.sender if entry.outgoing else uid in sent.members
                asSent = message.group_id == sent.groupId and not message.recipient
            else:
                owner = message.sender if entry.outgoing else message.recipient
                mine = uid == owner
                asSent = sent is not None and sent.to == message.recipient
            if sent is None or not mine or not asSent or sent.body != message.body:
                counts.violation(
                    "unexpected",
                    "{} was not sent ({})".format(
                        where, "unknown" if sent is None else "not as sent"
                    ),
                )
                continue
            if sent.response is not None and sent.response.message_id != message.id:
                counts.violation(
                    "duplicates", "{} acked as id {}".format(where, sent.response.message_id)
                )
                continue
            if entry.outgoing:
                outgoing[uid][message.id] = entry.seq
            else:
                incoming[uid].add(message.id)
                counts.delivered += 1
        if inbox is None:
            return
        seqs = {entry.seq for entry in stream}
        if isinstance(inbox, int):
            expected, where = set(range(1, inbox + 1)), "head {}".format(inbox)
        else:
            expected = set(inbox)
            where = "inbox of {} entries up to {}".format(len(expected), max(expected, default=0))
        for seq in sorted(expected - seqs):
            counts.violation("gaps", "{} never got seq {} ({})".format(uid, seq, where))
        for seq in sorted(seqs - expected):
            counts.violation("gaps", "{} got seq {} not in its inbox ({})".format(uid, seq, where))


class Workload:
    """
    Drives the clients: every user sends to random other users, keeping up
    to L{IN_FLIGHT} sends unanswered, until C{total} are sent; and injects
    the faults (socket drops, crashes) as acks come in.

    @ivar clients: C{{uid: IMClient}}.
    @ivar acked: sends answered so far.
    @ivar drops: client sockets aborted.
    @ivar resent: acks marked C{duplicate}: a send the server had stored
        before (its answer lost with a connection or a crash) was sent
        again and not stored twice.
    @ivar downtimes: seconds each crash took until its process was back.

    Sends are held back a little past the next fault's fraction until that
    fault has struck: a slow recovery from the previous one (a failover)
    does not let the run end before every fault, and each strikes under
    load.
    """

    def __init__(self, history, rng, users, total, faults, groups=None, groupShare=0.0):
        """
        @param faults: C{(fraction, name, crash)}: when C{fraction} of
            C{total} are acknowledged, C{crash()} is called (no two at
            once), which returns a L{Deferred} firing with the downtime
            once the process it killed is back.
        @param groups: C{{group id: [member, ...]}}, groups that exist
            (none by default).
        @param groupShare: the share of the sends of a member of a group
            that go to one of its groups.
        """
        self.groups = groups or {}
        self.groupShare = groupShare
        self.history = history
        self.rng = rng
        self.users = users
        self.total = total
        self.faults = list(faults)
        self.clients = {}
        self.acked = 0
        self.drops = 0
        self.resent = 0
        self.downtimes = []
        self._quota = {}
        for i, uid in enumerate(users):
            self._quota[uid] = total // len(users) + (1 if i < total % len(users) else 0)
        self._sentCount = {uid: 0 for uid in users}
        self._sentTotal = 0
        self._inFlight = {uid: 0 for uid in users}
        self._highestAckedId = {uid: 0 for uid in users}
        self._highestAckedSeq = {uid: 0 for uid in users}
        self._crashing = None
        # Connections aborted: the client lets go of one a moment later.
        self._aborted = set()
        self._done = Deferred()

    def connect(self, secret, endpointFor):
        """
        Make and start a client per user.

        @param endpointFor: called with each user's index, returns the
            client endpoint of its L{IMClient}.
        """
        rng = self.rng
        for i, uid in enumerate(self.users):
            client = IMClient(
                reactor,
                None,
                None,
                uid,
                mintToken(secret, uid, 3600, time.time()),
                "crash",
                onMessage=lambda entry, uid=uid: self.history.recordDelivery(uid, entry),
                endpoint=endpointFor(i),
                retryPolicy=lambda attempt: 0.05 + rng.random() * 0.05,
            )
            client.whenStopped().addCallback(self._gaveUp, uid)
            self.clients[uid] = client
            client.start()

    def stop(self):
        """
        Stop every client.

        @return: a L{Deferred} firing once they are disconnected.
        """
        return gatherResults([client.stop() for client in self.clients.values()])

    def run(self):
        """
        Start sending.

        @return: a L{Deferred} firing once every send is acknowledged (and no
            crash is in progress), or failing with the first problem.
        """
        for uid in self.users:
            self._fill(uid)
        return self._done

    def _fail(self, failure):
        if not self._done.called:
            self._done.errback(failure)

    def _gaveUp(self, reason, uid):
        self._fail(
            Failure(AssertionError("the client of {} stopped reconnecting: {}".format(uid, reason)))
        )

    def _fill(self, uid):
        limit = self._sendLimit()
        while (
            self._inFlight[uid] < IN_FLIGHT
            and self._sentCount[uid] < self._quota[uid]
            and self._sentTotal < limit
        ):
            self._sendOne(uid)

    def _fillAll(self):
        for uid in self.users:
            self._fill(uid)

    def _sendLimit(self):
        """
        How many sends may be made before the next fault strikes: one full
        window (every user's L{IN_FLIGHT}) past its fraction.
        """
        struck = len(self.downtimes) + (self._crashing is not None)
        if struck >= len(self.faults):
            return self.total
        return self.faults[struck][0] * self.total + IN_FLIGHT * len(self.users)

    def _sendOne(self, uid):
        counter = self._sentCount[uid] = self._sentCount[uid] + 1
        self._sentTotal += 1
        groupId, members = "", ()
        mine = sorted(g for g, group in self.groups.items() if uid in group)
        if mine and self.rng.random() < self.groupShare:
            groupId = self.rng.choice(mine)
            members = tuple(m for m in self.groups[groupId] if m != uid)
            to = ""
        else:
            to = self.rng.choice([u for u in self.users if u != uid])
        clientMsgId = "{}-{}".format(uid, counter)
        sent = Sent(
            sender=uid,
            to=to,
            counter=counter,
            clientMsgId=clientMsgId,
            body="{}:{}:{}".format(uid, counter, clientMsgId).encode("ascii"),
            floorId=self._highestAckedId[uid],
            floorSeq=self._highestAckedSeq[uid],
            groupId=groupId,
            members=members,
        )
        self.history.recordSend(sent)
        self._inFlight[uid] += 1
        d = self.clients[uid].send(to, sent.body, clientMsgId=clientMsgId, groupId=groupId)
        d.addCallbacks(self._acknowledged, self._sendFailed, (sent,), None, (sent,))

    def _acknowledged(self, response, sent):
        sent.response = response
        uid = sent.sender
        self._inFlight[uid] -= 1
        self.acked += 1
        if response.duplicate:
            self.resent += 1
        if response.message_id > self._highestAckedId[uid]:
            self._highestAckedId[uid] = response.message_id
        if response.seq > self._highestAckedSeq[uid]:
            self._highestAckedSeq[uid] = response.seq
        self._injectFaults()
        self._fill(uid)
        self._checkDone()

    def _sendFailed(self, failure, sent):
        self._fail(
            Failure(
                AssertionError(
                    "send {} of {} failed: {}".format(
                        sent.clientMsgId, sent.sender, failure.getErrorMessage()
                    )
                )
            )
        )

    def _checkDone(self):
        if self.acked == self.total and self._crashing is None and not self._done.called:
            self._done.callback(self.acked)

    def _injectFaults(self):
        if self.rng.random() < 1.0 / DROP_INTERVAL:
            self.dropOne()
        self._crashIfDue()

    def _crashIfDue(self):
        crashes = len(self.downtimes)
        if (
            self._crashing is None
            and crashes < len(self.faults)
            and self.acked >= self.faults[crashes][0] * self.total
        ):
            crashing = self._crashing = self.faults[crashes][2]()
            # The sends held back for it may go.
            self._fillAll()
            crashing.addCallbacks(self._restarted, self._fail)

    def _restarted(self, downtime):
        self._crashing = None
        self.downtimes.append(downtime)
        self._crashIfDue()
        self._fillAll()
        self._checkDone()

    def dropOne(self):
        """
        Abort the connection of a random connected client, if there is one.
        """
        connected = [
            client.protocol
            for uid, client in sorted(self.clients.items())
            if client.protocol is not None and client.protocol not in self._aborted
        ]
        if connected:
            protocol = self.rng.choice(connected)
            self._aborted.add(protocol)
            protocol.transport.abortConnection()
            self.drops += 1

    @inlineCallbacks
    def head(self, uid):
        """
        Ask the server (through the client of C{uid}) for the inbox head of
        C{uid}, again on a new connection if the connection drops meanwhile.

        @return: a L{Deferred} firing with the head seq.
        """
        client = self.clients[uid]
        while True:
            protocol = yield client.whenConnected()
            try:
                response = yield protocol.sync(afterSeq=client.lastSeq, limit=1)
            except RequestTimeout:
                continue
            except RemoteError as e:
                if e.code != pb.RATE_LIMITED:
                    raise
                # The connection's request bucket is empty (its client's
                # re-sends after a crash come in bursts): as the protocol
                # says, slow down and ask again.
                yield deferLater(reactor, 0.5, lambda: None)
                continue
            except (ConnectionClosed, ConnectionClosedByPeer):
                # The request fails while the connection is being closed,
                # before the client lets go of it: wait for the close to
                # finish, or whenConnected hands out the same protocol again
                # (and this loop would spin without yielding).
                yield protocol.whenClosed()
                continue
            return response.head_seq

    def describe(self):
        """
        The state of every client, for a failure message.
        """
        lines = [
            "acked {} of {}; crashes {} of {} (one in progress: {})".format(
                self.acked,
                self.total,
                len(self.downtimes),
                len(self.faults),
                self._crashing is not None,
            )
        ]
        for uid, client in sorted(self.clients.items()):
            lines.append(
                "{}: sent {}/{}, pending {}, lastSeq {}, connected {}".format(
                    uid,
                    self._sentCount[uid],
                    self._quota[uid],
                    client.pendingCount(),
                    client.lastSeq,
                    client.protocol is not None,
                )
            )
        return "\n".join(lines)


class CrashTestMixin:
    """
    Runs a L{Workload} to its end and checks its L{History}.

    @ivar ackDeadline: seconds allowed for every send to be acknowledged,
        per 10,000 messages.
    """

    ackDeadline = ACK_DEADLINE

    @inlineCallbacks
    def runAndCheck(
        self,
        workload,
        history,
        readInboxes,
        processes,
        started,
        seed,
        tolerated=(),
        lossTolerated=False,
        summary=None,
    ):
        """
        Run C{workload} (its clients connected), wait until every client has
        its whole inbox, print the counts, and fail on any violation, any
        send not acknowledged or not delivered, or any traceback in the
        servers' output.

        @param readInboxes: called with C{{uid: head}} once every client
            caught up; returns (a L{Deferred} of) the C{inboxes} for
            L{History.check}.
        @param processes: C{{name: Gate}} (anything with C{kills} and
            C{output()}), whose outputs are checked and shown on failure.
        @param tolerated: compiled patterns of logged tracebacks that are
            known and not counted as errors (L{TOLERATED}).
        @param lossTolerated: whether acknowledged messages may be lost (a
            failover without C{WAIT}): then lost ones, not delivered ones
            and gaps are counted and printed, not failed on.
        @param summary: called with the C{inboxes} (empty if they were not
            read) once the run is over; returns C{{name: value}}, more
            fields of the printed line.
        @return: a L{Deferred} firing with the L{Counts}.
        """
        users = workload.users
        scale = _scale(workload.total)
        problems = []
        try:
            yield withDeadline(workload.run(), self.ackDeadline * scale, "every send acknowledged")
        except Exception as e:
            problems.append(str(e))
        # Once every send is acknowledged nothing changes the inboxes: wait
        # until each client has been handed its inbox up to the head.  The
        # counts are taken and printed even if this (or the sending) failed.
        heads = {}

        @inlineCallbacks
        def catchUp(uid):
            heads[uid] = yield workload.head(uid)
            yield history.whenDelivered(uid, heads[uid])

        results = yield DeferredList(
            [
                withDeadline(catchUp(uid), CATCH_UP_DEADLINE, "the catch-up of " + uid)
                for uid in users
            ],
            consumeErrors=True,
        )
        problems.extend(
            "{} (head {}, delivered up to {})".format(
                result.getErrorMessage(), heads.get(uid), workload.clients[uid].lastSeq
            )
            for uid, (ok, result) in zip(users, results)
            if not ok
        )
        inboxes = {}
        if not problems:
            inboxes = yield readInboxes(heads)

        counts = history.check(inboxes)
        extra = summary(inboxes) if summary is not None else {}
        tracebacks = [
            (name, found)
            for name, process in sorted(processes.items())
            for found in loggedTracebacks(process.output())
        ]
        logged = [
            "{} logged:\n{}".format(name, found)
            for name, found in tracebacks
            if not any(pattern.search(found) for pattern in tolerated)
        ]
        print(
            "\ncrash test: sent={c.sent} acked={c.acked} delivered={c.delivered}"
            " lost={c.lost} unexpected={c.unexpected} duplicates={c.duplicates}"
            " reordered={c.reordered} kills={kills} socket_drops={drops}"
            " seconds={seconds:.1f} gaps={c.gaps} resent_after_store={resent}"
            " downtime={downtime} tolerated_errors={tolerated}{extra} seed={seed}".format(
                c=counts,
                drops=workload.drops,
                resent=workload.resent,
                kills="+".join(
                    "{}:{}".format(name, p.kills) for name, p in sorted(processes.items())
                ),
                downtime="+".join("{:.1f}".format(t) for t in workload.downtimes),
                seconds=time.monotonic() - started,
                seed=seed,
                tolerated=len(tracebacks) - len(logged),
                extra="".join(" {}={}".format(name, value) for name, value in extra.items()),
            )
        )
        outputs = "".join(
            "=== {} ===\n{}".format(name, p.output()[-20000:])
            for name, p in sorted(processes.items())
        )
        if problems:
            self.fail(
                "{}\nseed {}, heads {}\n{}\n{}\n{}".format(
                    "\n".join(problems),
                    seed,
                    heads,
                    workload.describe(),
                    "\n".join(counts.details),
                    outputs,
                )
            )
        kinds = ("lost", "unexpected", "duplicates", "reordered", "gaps")
        if lossTolerated:
            kinds = ("unexpected", "duplicates", "reordered")
        self.assertEqual(
            {kind: getattr(counts, kind) for kind in kinds},
            dict.fromkeys(kinds, 0),
            "violations, seed {}:\n{}".format(seed, "\n".join(counts.details)),
        )
        total = workload.total
        self.assertEqual((counts.sent, counts.acked), (total, total))
        if not lossTolerated:
            self.assertEqual(counts.delivered, history.expectedDeliveries())
        self.assertEqual(len(workload.downtimes), len(workload.faults))
        self.assertGreater(workload.drops, 0)
        if logged:
            self.fail(
                "{} errors logged, seed {}:\n{}".format(
                    len(logged), seed, "\n".join(logged[:MAX_DETAILS])
                )
            )
        return counts

    def clusterGates(self, redisURL, args=()):
        """
        L{CLUSTER_GATES} gates in cluster mode on C{redisURL} sharing one
        secret, with request limits the workload does not reach and C{args};
        not started yet, stopped at the test's cleanup.

        @return: a L{list} of L{Gate}s.
        """
        secretFile = newSecretFile(self)
        gates = []
        for i in range(CLUSTER_GATES):
            dataDir = FilePath(self.mktemp())
            dataDir.makedirs()
            gate = clusterGate(
                dataDir,
                redisURL,
                "gate-{}".format(i),
                secretFile,
                args=["--request-rate", "1000", "--request-burst", "1000"] + list(args),
            )
            self.addCleanup(gate.stop)
            gates.append(gate)
        return gates

    @inlineCallbacks
    def runOnGates(
        self,
        gates,
        faults,
        others,
        history,
        readInboxes,
        started,
        seed,
        groups=None,
        groupShare=0.0,
        **kwargs,
    ):
        """
        Start C{gates}, connect a client per user of C{history}, each to the
        next gate at every (re)connect, and run L{CLUSTER_MESSAGES} messages
        with C{faults} through L{runAndCheck}; check every process was
        killed as often as C{faults} say.

        @param faults: C{(fraction, target)}: a gate's index, or a name in
            C{others}.
        @param others: C{{name: process}}, the other processes to crash
            (with C{crash()}, C{kills} and C{output()}).
        @param readInboxes: called with no argument, returns (a L{Deferred}
            of) the C{inboxes} for L{History.check}.
        @param groups: for the L{Workload}: the groups (created already).
        @param groupShare: for the L{Workload}.
        @param kwargs: for L{runAndCheck}.
        @return: a L{Deferred} firing with the L{Counts}.
        """
        processes = {"gate-{}".format(i): gate for i, gate in enumerate(gates)}
        processes.update(others)
        named = [
            (at, target if target in others else "gate-{}".format(target)) for at, target in faults
        ]
        users = list(history.streams)
        workload = Workload(
            history,
            random.Random(seed),
            users,
            CLUSTER_MESSAGES,
            [(at, name, processes[name].crash) for at, name in named],
            groups,
            groupShare,
        )
        self.addCleanup(workload.stop)
        yield gatherResults([gate.start() for gate in gates])
        workload.connect(gates[0].secret(), lambda i: RotatingEndpoint(gates, first=i))
        counts = yield self.runAndCheck(
            workload,
            history,
            lambda heads: readInboxes(),
            processes,
            started,
            seed,
            TOLERATED,
            **kwargs,
        )
        targets = [name for at, name in named]
        self.assertEqual(
            {name: process.kills for name, process in processes.items()},
            {name: targets.count(name) for name in processes},
        )
        return counts


def _seed():
    """
    The seed of a run: C{$IMSERVER_CRASH_SEED}, else a random one.
    """
    return int(os.environ.get("IMSERVER_CRASH_SEED") or random.randrange(2**32))


class CrashTests(CrashTestMixin, TestCase):
    """
    Exactly-once, in-order delivery across socket drops and crashes of a
    gate on SQLite.
    """

    timeout = TEST_TIMEOUT * _scale(MESSAGES)
    #: More options of the gate.
    gateArgs: "tuple[str, ...]" = ()
    #: Whether its SQLite saver process is killed too, halfway.
    killsSaver = False

    @inlineCallbacks
    def test_crash(self):
        """
        L{MESSAGES} messages among L{USERS} users, with client sockets
        aborted about every L{DROP_INTERVAL} acks and the server killed
        with SIGKILL and restarted at L{KILL_AT}: none acknowledged is lost,
        none delivered was not sent, none is delivered twice, every inbox
        stream is in order with no gap.
        """
        started = time.monotonic()
        seed = _seed()
        rng = random.Random(seed)
        dataDir = FilePath(self.mktemp())
        dataDir.makedirs()
        gate = sqliteGate(dataDir, self.gateArgs)
        self.addCleanup(gate.stop)
        users = ["user{}".format(i) for i in range(USERS)]
        history = History(users)
        faults = [(at, "gate", gate.crash) for at in KILL_AT]
        if self.killsSaver:
            faults.insert(1, (0.5, "saver", lambda: killSaver(gate)))
        workload = Workload(history, rng, users, MESSAGES, faults)
        self.addCleanup(workload.stop)

        port = yield gate.start()
        workload.connect(
            gate.secret(), lambda i: TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        )
        yield self.runAndCheck(workload, history, succeed, {"gate": gate}, started, seed)
        self.assertEqual(gate.kills, len(faults))
        self.assertEqual(len([run for run in gate.runs if run.port is not None]), len(KILL_AT) + 1)


class SaverCrashTests(CrashTests):
    """
    L{CrashTests} with the SQLite writer in a process of its own
    (C{--store-writer process}): the gate killed twice (its saver then
    finishes alone and a new gate's saver waits for it), and the saver
    itself killed once in between (the gate fails what it held as
    C{UNAVAILABLE}, its clients retry, and it starts another saver).
    """

    gateArgs = ("--store-writer", "process")
    killsSaver = True


class ClusterCrashTests(CrashTestMixin, TestCase):
    """
    Exactly-once, in-order delivery in cluster mode across socket drops,
    crashes of gates and a crash of Redis (C{appendfsync always}: nothing
    acknowledged may be lost).
    """

    timeout = TEST_TIMEOUT * _scale(CLUSTER_MESSAGES)

    @inlineCallbacks
    def test_crash(self):
        """
        L{CLUSTER_MESSAGES} messages among L{USERS} users (L{GROUP_SHARE} of
        them to a group of all of them) connected to
        L{CLUSTER_GATES} gates sharing one C{redis-server}; each client
        connects to the next gate at every reconnect; client sockets are
        aborted about every L{DROP_INTERVAL} acks; each gate and Redis
        (twice) are killed with SIGKILL and restarted at L{CLUSTER_FAULTS}: none
        acknowledged is lost, none delivered was not sent, none is
        delivered twice, every inbox stream is in order and holds exactly
        the inbox's seqs.
        """
        started = time.monotonic()
        seed = _seed()
        redis = CrashableRedis(RedisServer(self, reactor, appendfsync="always"))
        yield redis.server.start()
        users = ["user{}".format(i) for i in range(USERS)]
        groups = {"crash-group": users}
        yield createGroups(redis.server.url, groups)
        yield self.runOnGates(
            self.clusterGates(redis.server.url),
            CLUSTER_FAULTS,
            {"redis": redis},
            History(users, idsOrdered=False),
            lambda: redisInboxes(redis.server.url, users),
            started,
            seed,
            groups=groups,
            groupShare=GROUP_SHARE,
        )


class RedisClusterCrashTests(CrashTestMixin, TestCase):
    """
    Delivery in cluster mode on a real Redis Cluster (three primaries, a
    replica each) across socket drops, crashes of gates and a primary's
    crash and failover: exactly once and in order with
    C{--redis-wait-replicas 1}; without it, what the failover loses is
    measured.
    """

    # A run takes 15 to 20 s on two cores: a stuck one fails within the
    # CI budget.
    ackDeadline = REDIS_CLUSTER_ACK_DEADLINE
    timeout = REDIS_CLUSTER_TIMEOUT * _scale(CLUSTER_MESSAGES)

    def test_crash(self):
        """
        L{CLUSTER_MESSAGES} messages among L{USERS} users whose keys are on
        all three primaries (L{GROUP_SHARE} of them to a group of all of
        them), connected to L{CLUSTER_GATES} gates with
        C{--redis-wait-replicas 1}; each client connects to the next gate at
        every reconnect; client sockets are aborted about every
        L{DROP_INTERVAL} acks; each gate is killed with SIGKILL and
        restarted, and the primary of a user's keys killed, its replica
        promoted and the node back as a replica, at L{REDIS_CLUSTER_FAULTS}:
        none acknowledged is lost, none delivered was not sent, none is
        delivered twice, every inbox stream is in order and holds exactly
        the inbox's seqs.
        """
        return self.crashOnCluster(waitReplicas=1)

    def test_failoverCaveat(self):
        """
        The run of L{test_crash} without C{--redis-wait-replicas}: a
        message acknowledged by a primary that died before its replica had
        it is lost (the documented caveat), so lost messages (and the gaps
        they leave) are counted and printed, not failed on; none delivered
        was not sent, none is delivered twice, every stream is in order.
        """
        return self.crashOnCluster(waitReplicas=0)

    @inlineCallbacks
    def crashOnCluster(self, waitReplicas):
        """
        The run of L{test_crash}, with C{--redis-wait-replicas
        waitReplicas}; acknowledged messages may be lost if it is 0.
        """
        from imserver.redisclient import userTag
        from imserver.rediscluster import keySlot

        from tests.support.rediscluster import RedisCluster, usersOnPrimaries

        started = time.monotonic()
        seed = _seed()
        cluster = RedisCluster(self, reactor)
        yield cluster.start()
        infos = yield cluster.clusterNodes(cluster.nodes[0])
        primaries = [info.slots for info in infos if "master" in info.flags and info.slots]
        self.assertEqual(len(primaries), 3)
        perPrimary = usersOnPrimaries(primaries, USERS // len(primaries), "user")
        users = [uid for together in zip(*perPrimary) for uid in together]
        primary = CrashablePrimary(cluster, keySlot("{" + userTag(users[0]) + "}"))
        history = History(users, idsOrdered=False)
        # One group of every user (on all three primaries).
        groups = {"crash-group": users}
        yield createGroups(cluster.url, groups)
        yield self.runOnGates(
            self.clusterGates(cluster.url, ["--redis-wait-replicas", str(waitReplicas)]),
            REDIS_CLUSTER_FAULTS,
            {"primary": primary},
            history,
            lambda: redisInboxes(cluster.url, users),
            started,
            seed,
            groups=groups,
            groupShare=GROUP_SHARE,
            lossTolerated=not waitReplicas,
            summary=lambda inboxes: {
                "group_sends": sum(1 for sent in history.sends.values() if sent.groupId),
                "wait_replicas": waitReplicas,
                "failovers": primary.failovers,
                "stored_lost": len(storedLost(history, inboxes)) if inboxes else "?",
            },
        )
        self.assertEqual(primary.failovers, 1)


def _entry(seq, messageId, sender, recipient, counter, outgoing=False, body=None):
    """
    An inbox entry as the server would deliver message C{counter} of
    C{sender} to C{recipient}.
    """
    clientMsgId = "{}-{}".format(sender, counter)
    if body is None:
        body = "{}:{}:{}".format(sender, counter, clientMsgId).encode("ascii")
    return pb.InboxEntry(
        seq=seq,
        outgoing=outgoing,
        message=pb.Message(
            id=messageId, sender=sender, recipient=recipient, body=body, client_msg_id=clientMsgId
        ),
    )


class HistoryCheckTests(SynchronousTestCase):
    """
    L{History.check} finds each kind of violation in a small history of
    two messages from alice to bob (ids 1 and 2, alice's seqs 1 and 2,
    bob's seqs 1 and 2).
    """

    def history(self, floorIds=(0, 0), floorSeqs=(0, 0), idsOrdered=True):
        """
        A history with both messages sent and acknowledged, nothing
        delivered yet.
        """
        history = History(["alice", "bob"], idsOrdered)
        for counter, floorId, floorSeq in zip((1, 2), floorIds, floorSeqs):
            clientMsgId = "alice-{}".format(counter)
            history.recordSend(
                Sent(
                    sender="alice",
                    to="bob",
                    counter=counter,
                    clientMsgId=clientMsgId,
                    body="alice:{}:{}".format(counter, clientMsgId).encode("ascii"),
                    floorId=floorId,
                    floorSeq=floorSeq,
                    response=pb.SendResponse(message_id=counter, seq=counter),
                )
            )
        return history

    def deliver(self, history, bob, alice=None):
        """
        Record C{bob}'s stream and C{alice}'s (default: her two outgoing
        copies in order).
        """
        if alice is None:
            alice = [_entry(1, 1, "alice", "bob", 1, True), _entry(2, 2, "alice", "bob", 2, True)]
        for entry in alice:
            history.recordDelivery("alice", entry)
        for entry in bob:
            history.recordDelivery("bob", entry)

    def assertCounts(self, counts, **expected):
        """
        Assert the violation counts: those named in C{expected}, the others
        zero.
        """
        kinds = ("lost", "unexpected", "duplicates", "reordered", "gaps")
        self.assertEqual(
            {kind: getattr(counts, kind) for kind in kinds},
            {kind: expected.get(kind, 0) for kind in kinds},
            counts.details,
        )

    def test_clean(self):
        """
        A complete, ordered history has no violation.
        """
        history = self.history()
        self.deliver(history, [_entry(1, 1, "alice", "bob", 1), _entry(2, 2, "alice", "bob", 2)])
        counts = history.check({"alice": 2, "bob": 2})
        self.assertCounts(counts)
        self.assertEqual((counts.sent, counts.acked, counts.delivered), (2, 2, 2))

    def groupHistory(self):
        """
        A history of one group message from alice to the group C{g} of
        alice, bob and carol, acknowledged (id 3, alice's seq 1).
        """
        history = History(["alice", "bob", "carol"], idsOrdered=False)
        history.recordSend(
            Sent(
                sender="alice",
                to="",
                counter=1,
                clientMsgId="alice-1",
                body=b"alice:1:alice-1",
                floorId=0,
                response=pb.SendResponse(message_id=3, seq=1),
                groupId="g",
                members=("bob", "carol"),
            )
        )
        return history

    def groupEntry(self, seq, outgoing=False):
        entry = _entry(seq, 3, "alice", "", 1, outgoing)
        entry.message.group_id = "g"
        return entry

    def test_groupClean(self):
        """
        A group message in every member's stream (the sender's as its
        outgoing copy) is clean: one delivery per member but the sender.
        """
        history = self.groupHistory()
        history.recordDelivery("alice", self.groupEntry(1, outgoing=True))
        history.recordDelivery("bob", self.groupEntry(1))
        history.recordDelivery("carol", self.groupEntry(1))
        counts = history.check({"alice": 1, "bob": 1, "carol": 1})
        self.assertCounts(counts)
        self.assertEqual((counts.acked, counts.delivered), (1, 2))
        self.assertEqual(history.expectedDeliveries(), 2)

    def test_groupLostAtOneMember(self):
        """
        A group message missing from one member's stream is lost there;
        one delivered to a user who is not a recipient is unexpected.
        """
        history = self.groupHistory()
        history.recordDelivery("alice", self.groupEntry(1, outgoing=True))
        history.recordDelivery("bob", self.groupEntry(1))
        self.assertCounts(history.check({"alice": 1, "bob": 1}), lost=1)
        outsider = self.groupHistory()
        outsider.sends[("alice", "alice-1")].members = ("bob",)
        outsider.recordDelivery("alice", self.groupEntry(1, outgoing=True))
        outsider.recordDelivery("bob", self.groupEntry(1))
        outsider.recordDelivery("carol", self.groupEntry(1))
        self.assertCounts(outsider.check({"alice": 1, "bob": 1, "carol": 1}), unexpected=1)

    def test_lost(self):
        """
        An acknowledged message missing from the recipient's stream is lost
        (and its seq a gap when the head covers it).
        """
        history = self.history()
        self.deliver(history, [_entry(1, 1, "alice", "bob", 1)])
        self.assertCounts(history.check({"alice": 2, "bob": 2}), lost=1, gaps=1)

    def test_lostOutgoing(self):
        """
        An acknowledged message missing from its sender's stream is lost.
        """
        history = self.history()
        self.deliver(
            history,
            [_entry(1, 1, "alice", "bob", 1), _entry(2, 2, "alice", "bob", 2)],
            [_entry(1, 1, "alice", "bob", 1, True)],
        )
        self.assertCounts(history.check({"alice": 1, "bob": 2}), lost=1)

    def test_unexpected(self):
        """
        An entry never sent, or not as sent, is unexpected.
        """
        history = self.history()
        self.deliver(
            history,
            [
                _entry(1, 1, "alice", "bob", 1),
                _entry(2, 2, "alice", "bob", 2),
                _entry(3, 3, "alice", "bob", 3),
                _entry(4, 4, "carol", "bob", 1),
                _entry(5, 5, "alice", "bob", 1, body=b"forged"),
            ],
        )
        # The forged body reuses alice-1, already delivered as id 1: that
        # is a second message for one client_msg_id, a duplicate.
        self.assertCounts(history.check({"alice": 2, "bob": 5}), unexpected=2, duplicates=1)

    def test_duplicateId(self):
        """
        One message id delivered at two seqs is a duplicate.
        """
        history = self.history()
        self.deliver(
            history,
            [
                _entry(1, 1, "alice", "bob", 1),
                _entry(2, 2, "alice", "bob", 2),
                _entry(3, 2, "alice", "bob", 2),
            ],
        )
        self.assertCounts(history.check({"alice": 2, "bob": 3}), duplicates=1, reordered=1)

    def test_storedTwice(self):
        """
        One client_msg_id stored as a second message is a duplicate.
        """
        history = self.history()
        self.deliver(
            history,
            [
                _entry(1, 1, "alice", "bob", 1),
                _entry(2, 2, "alice", "bob", 2),
                _entry(3, 3, "alice", "bob", 2),
            ],
        )
        self.assertCounts(history.check({"alice": 2, "bob": 3}), duplicates=1)

    def test_seqOrder(self):
        """
        A stream whose seqs go back is reordered.
        """
        history = self.history()
        self.deliver(history, [_entry(2, 2, "alice", "bob", 2), _entry(1, 1, "alice", "bob", 1)])
        self.assertCounts(history.check({"alice": 2, "bob": 2}), reordered=1)

    def test_idOrder(self):
        """
        A stream whose message ids go back while its seqs go up is not in
        the server's acceptance order.
        """
        history = self.history()
        self.deliver(history, [_entry(1, 2, "alice", "bob", 2), _entry(2, 1, "alice", "bob", 1)])
        self.assertCounts(history.check({"alice": 2, "bob": 2}), reordered=1)

    def test_ackedSeq(self):
        """
        A message delivered to its sender at another seq than the ack said
        is reordered.
        """
        history = self.history()
        self.deliver(
            history,
            [_entry(1, 1, "alice", "bob", 1), _entry(2, 2, "alice", "bob", 2)],
            [_entry(1, 1, "alice", "bob", 1, True), _entry(3, 2, "alice", "bob", 2, True)],
        )
        self.assertCounts(history.check({"alice": 3, "bob": 2}), reordered=1, gaps=1)

    def test_causalOrder(self):
        """
        A message given an id below one acknowledged before it was sent is
        reordered.
        """
        history = self.history(floorIds=(0, 5))
        self.deliver(history, [_entry(1, 1, "alice", "bob", 1), _entry(2, 2, "alice", "bob", 2)])
        self.assertCounts(history.check({"alice": 2, "bob": 2}), reordered=1)

    def test_causalSeqOrder(self):
        """
        A message given a seq in its sender's inbox at or below one
        acknowledged before it was sent is reordered, even where ids are
        not ordered.
        """
        history = self.history(floorSeqs=(0, 2), idsOrdered=False)
        self.deliver(history, [_entry(1, 1, "alice", "bob", 1), _entry(2, 2, "alice", "bob", 2)])
        self.assertCounts(history.check({"alice": 2, "bob": 2}), reordered=1)

    def test_idsNotOrdered(self):
        """
        Where ids are only unique (cluster mode: blocks per gate), a stream
        whose ids go back while its seqs go up is in order, and so is a
        message given an id below one acknowledged before it was sent;
        where they are ordered, both are reordered.
        """
        for idsOrdered, reordered in [(False, 0), (True, 3)]:
            # alice-1 got id 2, alice-2 (sent after alice-1's ack) id 1.
            history = self.history(floorIds=(0, 2), floorSeqs=(0, 1), idsOrdered=idsOrdered)
            history.sends[("alice", "alice-1")].response.message_id = 2
            history.sends[("alice", "alice-2")].response.message_id = 1
            self.deliver(
                history,
                [_entry(1, 2, "alice", "bob", 1), _entry(2, 1, "alice", "bob", 2)],
                [_entry(1, 2, "alice", "bob", 1, True), _entry(2, 1, "alice", "bob", 2, True)],
            )
            self.assertCounts(history.check({"alice": 2, "bob": 2}), reordered=reordered)

    def test_inboxSeqs(self):
        """
        Given the inbox's seqs as a set (cluster mode: they start above a
        floor and jump), a stream must hold exactly those.
        """
        history = self.history()
        self.deliver(
            history,
            [_entry(1001, 1, "alice", "bob", 1), _entry(5001, 2, "alice", "bob", 2)],
            [_entry(1001, 1, "alice", "bob", 1, True), _entry(5002, 2, "alice", "bob", 2, True)],
        )
        history.sends[("alice", "alice-1")].response.seq = 1001
        history.sends[("alice", "alice-2")].response.seq = 5002
        self.assertCounts(history.check({"alice": {1001, 5002}, "bob": {1001, 5001}}))
        self.assertCounts(history.check({"alice": {1001, 5002}, "bob": {1001, 1002, 5001}}), gaps=1)
        self.assertCounts(history.check({"alice": {1001, 5002}, "bob": {5001}}), gaps=1)

    def test_gapBeyondHead(self):
        """
        A seq beyond the head the server reports is a gap too.
        """
        history = self.history()
        self.deliver(history, [_entry(1, 1, "alice", "bob", 1), _entry(2, 2, "alice", "bob", 2)])
        self.assertCounts(history.check({"alice": 2, "bob": 1}), gaps=1)

    def test_whenDelivered(self):
        """
        L{History.whenDelivered} fires once the stream reaches the seq; at
        once if it has.
        """
        history = self.history()
        d = history.whenDelivered("bob", 2)
        history.recordDelivery("bob", _entry(1, 1, "alice", "bob", 1))
        self.assertNoResult(d)
        history.recordDelivery("bob", _entry(2, 2, "alice", "bob", 2))
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(self.successResultOf(history.whenDelivered("bob", 1)), 1)
        self.assertEqual(self.successResultOf(history.whenDelivered("alice", 0)), 0)

    def test_storedLost(self):
        """
        L{storedLost} names the acknowledged messages missing from the
        recipient's inbox or, as outgoing, from the sender's, as Redis has
        them (C{{seq: (message id, outgoing)}}).
        """
        history = self.history()
        alice = {1: (1, True), 2: (2, True)}
        self.assertEqual(
            storedLost(history, {"alice": alice, "bob": {1: (1, False), 2: (2, False)}}), []
        )
        lost = storedLost(history, {"alice": alice, "bob": {1: (1, False), 2: (2, True)}})
        self.assertEqual([sent.clientMsgId for sent in lost], ["alice-2"])
        lost = storedLost(history, {"alice": {2: (2, True)}, "bob": {1: (1, False), 2: (2, False)}})
        self.assertEqual([sent.clientMsgId for sent in lost], ["alice-1"])
