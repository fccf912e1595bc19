# -*- test-case-name: tests.test_bus -*-
"""
The gate bus over Redis pub/sub.

Each gate subscribes to its own channel (C{im:bus:<gate id>}) and to the
broadcast channel (L{imserver.bus.BROADCAST_CHANNEL}) on a connection of
its own (L{imserver.redisclient.RedisSubscriber}, which subscribes again
after every reconnect).  What this gate has for other
gates is queued per target gate and flushed once per reactor pass: one
C{PUBLISH} per gate per pass carrying a L{bus_pb2.Batch} with every item
for it.  A push names the message once and lists its targets (uid, seq,
outgoing), so a group message costs one PUBLISH per gate that holds
members, not one per member.

Nothing depends on a notification arriving: the entries are in the inboxes
already (a session that missed one gets it with its next push, ack or
resume), which is why a batch that cannot be published while Redis is down
is only kept for a retry after the reconnect, up to a bound.
"""

from google.protobuf.message import DecodeError
from twisted.internet.defer import DeferredList
from twisted.logger import Logger
from zope.interface import implementer

from imserver.bus import BROADCAST_CHANNEL, channelOf
from imserver.interfaces import IGateBus
from imserver.metrics import LATENCY_BUCKETS, FastHistogram
from imserver.pb import bus_pb2
from imserver.redisclient import RedisUnavailable
from imserver.wire import EncodedMessage

#: A gate's batch is published at once (not at the end of the pass) when the
#: message bytes it carries exceed this: big fan-out bursts go out as several
#: PUBLISHes instead of one huge one (Redis drops subscribers whose output
#: buffer grows past client-output-buffer-limit pubsub, 32 MB by default).
MAX_BATCH_BYTES = 512 * 1024

#: Batches kept while Redis is unreachable, published again once it is back.
MAX_RETRY_BATCHES = 1000


class _Outgoing:
    """
    What one target gate gets at the next flush.
    """

    __slots__ = ("batch", "pushes", "typings", "size")

    def __init__(self, source):
        self.batch = bus_pb2.Batch(source_gate=source)
        # EncodedMessage -> (its bus_pb2.Push in the batch, uids targeted)
        self.pushes = {}
        # (to, from, active, group) already queued: the target gate gives
        # one signal to every session of the user it holds.
        self.typings = set()
        self.size = 0


@implementer(IGateBus)
class RedisGateBus:
    """
    The gate bus of one gate.

    @ivar receiver: the L{imserver.interfaces.IBusReceiver} for what arrives.
    @ivar subscriber: the L{imserver.redisclient.RedisSubscriber} of this
        gate's channel.
    @ivar published: PUBLISH commands sent (for tests and metrics).
    @ivar received: batches received.
    @ivar lag: L{FastHistogram} of the seconds from a batch's publication
        (by the other gate's clock) to its arrival here.
    """

    log = Logger()

    def __init__(self, connection, subscribe, gateId, reactor):
        """
        @param connection: the L{imserver.redisclient.RedisConnection}
            PUBLISHes go through.
        @param subscribe: called as C{subscribe(channels, onMessage)},
            returns a L{imserver.redisclient.RedisSubscriber} that is not
            started yet (L{start} starts it).
        @param reactor: for C{callLater(0)} (the flush).
        """
        self.connection = connection
        self.gateId = gateId
        self.reactor = reactor
        self.channel = channelOf(gateId)
        self.receiver = None
        self.subscriber = subscribe([self.channel, BROADCAST_CHANNEL], self._received)
        self.published = 0
        self.received = 0
        self.lag = FastHistogram(
            "imserver_bus_lag_seconds",
            "From a gate bus batch's publication (the sending gate's clock) to its arrival.",
            LATENCY_BUCKETS,
        )
        self._outgoing = {}
        self._flushCall = None
        self._retry = []
        self._inflight = set()
        self._warned = False
        connection.onConnect.append(self._republish)

    @property
    def subscribed(self):
        """
        Whether this gate's channel is subscribed now.
        """
        return self.subscriber.subscribed

    def start(self):
        """
        Start the subscriber connection.
        """
        self.subscriber.start()

    def ping(self):
        """
        Check the subscriber connection (see
        L{imserver.redisclient.RedisSubscriber.ping}).
        """
        return self.subscriber.ping()

    def stop(self):
        """
        Publish what is queued, wait for the PUBLISHes in flight, then close
        the subscriber connection.

        @return: a L{Deferred} firing when done.
        """
        self.flush()
        if self._retry:
            self.log.warn(
                "{n} bus batches were never published (Redis unavailable); "
                "their entries wait in the inboxes",
                n=len(self._retry),
            )
            self._retry = []
        d = DeferredList(list(self._inflight), consumeErrors=True)
        return d.addBoth(lambda _: self.subscriber.disconnect())

    # -- sending ------------------------------------------------------------

    def _queue(self, gateId):
        outgoing = self._outgoing.get(gateId)
        if outgoing is None:
            outgoing = self._outgoing[gateId] = _Outgoing(self.gateId)
            if self._flushCall is None:
                self._flushCall = self.reactor.callLater(0, self.flush)
        return outgoing

    def forward(self, gateId, uid, seq, outgoing, encoded):
        queued = self._queue(gateId)
        entry = queued.pushes.get(encoded)
        if entry is None:
            item = queued.batch.items.add()
            item.push.message = encoded.data
            entry = queued.pushes[encoded] = (item.push, set())
            queued.size += len(encoded.data)
        pushed, uids = entry
        if uid in uids:
            # Another device of the same user on that gate: the gate
            # announces the entry to all of the user's sessions it holds.
            return
        uids.add(uid)
        pushed.targets.add(uid=uid, seq=seq, outgoing=outgoing)
        if queued.size > MAX_BATCH_BYTES:
            self._flushGate(gateId)

    def kick(self, gateId, uid, deviceId, sessionId, generation, reason, message):
        item = self._queue(gateId).batch.items.add()
        kick = item.kick
        kick.uid = uid
        kick.device_id = deviceId
        kick.session_id = sessionId
        kick.generation = generation
        kick.reason = reason
        kick.message = message

    def typing(self, gateId, toUid, fromUid, active, groupId):
        queued = self._queue(gateId)
        key = (toUid, fromUid, active, groupId)
        if key in queued.typings:
            return  # another device of the same user on that gate
        queued.typings.add(key)
        item = queued.batch.items.add()
        typing = item.typing
        typing.to_uid = toUid
        typing.from_uid = fromUid
        typing.active = active
        typing.group_id = groupId

    def notice(self, gateId, sessionId, frame):
        queued = self._queue(gateId)
        item = queued.batch.items.add()
        item.notice.session_id = sessionId
        item.notice.frame = frame
        queued.size += len(frame)
        if queued.size > MAX_BATCH_BYTES:
            self._flushGate(gateId)

    def broadcast(self, frame):
        """
        Publish C{frame} to every other gate at once (not at the end of the
        pass: the caller waits for the answer).

        @return: a L{Deferred} firing with the number of other gates
            subscribed to broadcasts that got it, or failing with
            L{imserver.redisclient.RedisUnavailable} (then no gate got it;
            it is not kept for a retry, the caller says so).
        """
        batch = bus_pb2.Batch(source_gate=self.gateId, sent_ms=self._nowMs())
        batch.items.add().broadcast.frame = frame
        self.published += 1
        d = self.connection.publish(BROADCAST_CHANNEL, batch.SerializeToString())
        self._inflight.add(d)
        d.addBoth(self._landed, d)
        # This gate's own subscription gets it too (and skips it).
        return d.addCallback(lambda receivers: max(0, receivers - (1 if self.subscribed else 0)))

    def flush(self):
        """
        Publish everything queued: one PUBLISH per target gate.  Runs once
        per reactor pass in which something was queued.
        """
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        outgoing, self._outgoing = self._outgoing, {}
        nowMs = self._nowMs()
        for gateId, queued in outgoing.items():
            queued.batch.sent_ms = nowMs
            self._publish(gateId, queued.batch.SerializeToString())

    def _flushGate(self, gateId):
        queued = self._outgoing.pop(gateId)
        queued.batch.sent_ms = self._nowMs()
        self._publish(gateId, queued.batch.SerializeToString())

    def _nowMs(self):
        return int(self.reactor.seconds() * 1000)

    def _publish(self, gateId, data):
        self.published += 1
        d = self.connection.publish(channelOf(gateId), data)
        self._inflight.add(d)
        d.addBoth(self._landed, d)
        d.addCallbacks(self._published, self._publishFailed, (gateId,), None, (gateId, data))

    def _landed(self, result, d):
        self._inflight.discard(d)
        return result

    def _published(self, receivers, gateId):
        self._warned = False
        if not receivers:
            # The gate is gone, or between two subscriptions: its sessions
            # find the entries in their inboxes (it catches up when it
            # subscribes again).
            self.log.debug("gate {gate} is not subscribed to the bus", gate=gateId)

    def _publishFailed(self, failure, gateId, data):
        if not failure.check(RedisUnavailable):
            self.log.failure("publishing to gate {gate} failed", failure, gate=gateId)
            return
        if not self._warned:
            self._warned = True
            self.log.warn(
                "cannot publish on the gate bus ({why}); retrying once Redis is back",
                why=failure.getErrorMessage(),
            )
        if len(self._retry) < MAX_RETRY_BATCHES:
            self._retry.append((gateId, data))

    def _republish(self):
        retry, self._retry = self._retry, []
        if retry:
            self.log.info("publishing {n} bus batches kept while Redis was away", n=len(retry))
        for gateId, data in retry:
            self._publish(gateId, data)

    # -- receiving -------------------------------------------------------------

    def _received(self, channel, data):
        try:
            batch = bus_pb2.Batch.FromString(data)
        except DecodeError:
            self.log.warn(
                "dropped an unparsable bus message of {n} bytes on {channel}",
                n=len(data),
                channel=channel.decode("utf-8", "replace"),
            )
            return
        self.received += 1
        if batch.sent_ms:
            self.lag.observe(max(0.0, self.reactor.seconds() - batch.sent_ms / 1000.0))
        receiver = self.receiver
        if channel == BROADCAST_CHANNEL and batch.source_gate == self.gateId:
            return  # this gate wrote it to its own sessions
        for item in batch.items:
            kind = item.WhichOneof("item")
            try:
                if kind == "push":
                    push = item.push
                    receiver.forwardReceived(
                        EncodedMessage.fromBytes(push.message),
                        [(t.uid, t.seq, t.outgoing) for t in push.targets],
                    )
                elif kind == "kick":
                    kick = item.kick
                    receiver.kickReceived(
                        kick.uid,
                        kick.device_id,
                        kick.session_id,
                        kick.generation,
                        kick.reason,
                        kick.message,
                    )
                elif kind == "typing":
                    typing = item.typing
                    receiver.typingReceived(
                        typing.to_uid, typing.from_uid, typing.active, typing.group_id
                    )
                elif kind == "notice":
                    receiver.noticeReceived(item.notice.session_id, item.notice.frame)
                elif kind == "broadcast":
                    receiver.broadcastReceived(item.broadcast.frame)
            except Exception:
                self.log.failure(
                    "handling a {kind} from gate {gate} failed", kind=kind, gate=batch.source_gate
                )
