# -*- test-case-name: tests.test_webhooks -*-
"""
The webhook sender: delivers the events of the outbox
(L{imserver.interfaces.IOutbox}) to the app backend's URL, at least once
and in order per ordering key, off the gate's delivery path.

One sender per outbox: it sends only while it holds the outbox's claim
(L{IOutbox.claimOutbox}, renewed every L{CLAIM_INTERVAL}); in cluster mode
the gates sharing a Redis outbox take turns, and a gate that loses the
claim cancels its requests and forgets what it had read.

It reads the outbox in id order (L{IOutbox.pending}) into a bounded
in-memory I{window} of per-key queues.  Only the oldest undelivered event
of a key is ever in flight, so the events of one key reach the receiver in
the order they were recorded; up to C{webhook_concurrency} keys are in
flight at once.  A 2xx answer delivers the event: its id is removed from
the outbox (in batches).  Anything else (a timeout, a connection or TLS
error, any other status) is a failed attempt: that key waits, with capped
exponential backoff and full jitter, while the other keys go on.  A
failing key keeps at most L{FAILING_KEY_HELD} events in memory; the rest
are read again from the outbox once it recovers, so a key that fails for
hours does not fill the window and block the others.

Nothing is removed unless acknowledged, so after a restart (or a
C{kill -9}) what was pending is sent again: a receiver may see an event
id twice.  Retention (C{webhook_retention}) removes events older than it,
delivered or not, counting them.
"""

import collections
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from imserver.errors import Unavailable
from imserver.webhooks.events import OutboxEntry

#: Seconds between renewals of the outbox claim.
CLAIM_INTERVAL = 1.0
#: How long a claim lasts unless renewed, in ms: another gate's sender
#: takes over this long after the holder stopped renewing.
CLAIM_TTL_MS = 5000
#: Seconds between looks at the outbox's size (the gauges).
STATS_INTERVAL = 5.0
#: Seconds between retention passes over the outbox (also one at start).
EXPIRE_INTERVAL = 60.0
#: Seconds between two reads of the whole outbox from its start while idle:
#: a safety net for an entry made visible late.
SWEEP_INTERVAL = 60.0
#: The most events of a failing key held in memory.
FAILING_KEY_HELD = 10
#: The most reads of the outbox between two polls: a pass over a large
#: outbox (skipping the events of failing keys) goes on at the next poll
#: rather than keep the store busy.
MAX_READS_PER_POLL = 20
#: Seconds between two warnings about failing attempts.
FAILURE_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Answer:
    """
    The receiver's answer to one request.

    @ivar status: the HTTP status code.
    @ivar retryAfter: the seconds of its C{Retry-After} header, or L{None}.
    """

    status: int
    retryAfter: float | None = None


def failureReason(failure: Failure) -> str:
    """
    The C{reason} label of a request that failed without an answer.
    """
    if failure.check(TimeoutError, error.TimeoutError):
        return "timeout"
    from OpenSSL import SSL

    reasons = [failure]
    for nested in getattr(failure.value, "reasons", None) or ():
        reasons.append(nested)
    for reason in reasons:
        if isinstance(reason, Failure) and reason.check(SSL.Error):
            return "tls"
        if type(reason.value).__name__ == "VerificationError":
            return "tls"
    return "connection"


def answerReason(answer: Answer) -> str:
    """
    The C{reason} label of an answer that is not 2xx.
    """
    status = answer.status
    if status >= 500:
        return "http_5xx"
    if status == 429:
        return "http_429"
    if status >= 400:
        return "http_4xx"
    return "http_other"


class WebhookSender:
    """
    Sends the outbox's events; see the module.

    @ivar holding: whether this sender holds the outbox's claim now.
    @ivar running: between L{start} and L{stop}.
    """

    log = Logger()

    def __init__(
        self,
        outbox: Any,
        post: Callable[[OutboxEntry], "Deferred[Answer]"],
        clock: Any,
        settings: Any,
        owner: str,
        metrics: Any,
        rng: Any = None,
    ) -> None:
        """
        @param outbox: the L{imserver.interfaces.IOutbox} (the store).
        @param post: sends one entry: returns a L{Deferred} firing with the
            L{Answer}, or failing (timeout, connection); cancelling it
            abandons the request (L{imserver.webhooks.http.HTTPPoster}).
        @param clock: an C{IReactorTime}.
        @param settings: the L{imserver.settings.Settings}.
        @param owner: this gate's id, for the claim.
        @param metrics: the L{imserver.webhooks.metrics.WebhookMetrics}.
        @param rng: a L{random.Random} for the backoff's jitter.
        """
        self.outbox = outbox
        self.post = post
        self.clock = clock
        self.settings = settings
        self.owner = owner
        self.metrics = metrics
        metrics.inFlight = lambda: len(self._inFlight)
        self.random = rng if rng is not None else _random.SystemRandom()
        self.window = settings.webhook_window
        self.batch = settings.webhook_batch
        self.concurrency = settings.webhook_concurrency
        self.running = False
        self.holding = False
        # The window: per key, its events read and not delivered, in id
        # order (the head is the one in flight or waiting to be retried).
        self._queues: dict[str, collections.deque[OutboxEntry]] = {}
        self._held: set[int] = set()
        # Keys whose head may be sent now, each once.
        self._ready: collections.deque[str] = collections.deque()
        self._readySet: set[str] = set()
        self._inFlight: dict[str, Deferred[Any]] = {}
        self._failures: dict[str, int] = {}  # key -> failed attempts of its head
        self._retries: dict[str, Any] = {}  # key -> IDelayedCall of its retry
        # Keys with events in the outbox beyond those held, from this id on.
        self._behind: dict[str, int] = {}
        # Delivered, not removed from the outbox yet; removing; and removed
        # while a read was in flight (that read may still return them).
        self._delivered: list[int] = []
        self._removing: set[int] = set()
        self._forgetAfterRead: list[int] = []
        self._cursor = 0  # the id after which the next read starts
        self._reading = False
        self._rereadDue = False  # a reread of the keys behind waits for a read
        self._inRead = False
        self._readAgain = False
        self._reads = 0  # reads since the last poll
        self._caughtUp = False
        self._passStart: int | None = None
        self._passSeen: set[str] = set()
        self._lastSweep = 0.0
        self._counted = 0  # highest id counted in metrics.queued
        self._generation = 0  # changes when the window is dropped
        self._wakeCall: Any = None
        self._dispatching = False
        self._removals: set[Deferred[None]] = set()
        self._failedSinceLog = 0
        self._lastFailureLog: float | None = None
        self._failing = False
        self._statsReported = 0
        self._loops = []
        for function, interval in [
            (self._claim, CLAIM_INTERVAL),
            (self._tick, settings.webhook_poll_interval),
            (self._expire, EXPIRE_INTERVAL),
            (self._stats, STATS_INTERVAL),
        ]:
            loop = LoopingCall(function)
            loop.clock = clock
            self._loops.append((loop, interval))

    def __repr__(self) -> str:
        return "<WebhookSender {} held={} in_flight={}>".format(
            "holding" if self.holding else "idle", len(self._held), len(self._inFlight)
        )

    # -- life ---------------------------------------------------------------

    def start(self) -> None:
        """
        Start claiming the outbox, and sending while it is held.
        """
        if self.running:
            return
        self.running = True
        for loop, interval in self._loops:
            loop.start(interval, now=True)

    def stop(self) -> "Deferred[None]":
        """
        Stop sending: the requests in flight are cancelled and the window
        dropped; nothing is removed from the outbox but what was delivered.

        @return: a L{Deferred} firing once the removal of the delivered
            events was written (or failed, which is logged).
        """
        self.running = False
        for loop, _ in self._loops:
            if loop.running:
                loop.stop()
        if self._wakeCall is not None and self._wakeCall.active():
            self._wakeCall.cancel()
        self._wakeCall = None
        self._release()
        self._flushRemoved()
        return gatherResults(list(self._removals)).addCallback(lambda _: None)

    def _release(self) -> None:
        """
        Forget the window and cancel everything in flight (the claim was
        lost, or the sender stops).
        """
        self.holding = False
        self._generation += 1
        inFlight, self._inFlight = self._inFlight, {}
        for d in inFlight.values():
            d.cancel()
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()
        self._queues.clear()
        self._held.clear()
        self._ready.clear()
        self._readySet.clear()
        self._failures.clear()
        self._behind.clear()
        self._rewind(0)
        self._reading = False
        self._rereadDue = False

    def wake(self) -> None:
        """
        Read the outbox soon: events were just recorded (by the presence
        notifier).  Several calls in one reactor turn make one read.
        """
        if self.running and self.holding and self._wakeCall is None:
            self._wakeCall = self.clock.callLater(0, self._woken)

    def _woken(self) -> None:
        self._wakeCall = None
        self._caughtUp = False
        self._read()

    # -- the claim ------------------------------------------------------------

    def _claim(self) -> "Deferred[None]":
        generation = self._generation

        def claimed(holding: bool) -> None:
            if not self.running:
                return
            if holding and not self.holding and generation == self._generation:
                self.holding = True
                self.log.info("sending webhook events: {owner} holds the outbox", owner=self.owner)
                self._read()
            elif not holding and self.holding:
                self.log.info("webhook outbox claimed by another gate: not sending")
                self._release()

        def failed(failure: Failure) -> None:
            if self.holding:
                self.log.warn(
                    "cannot renew the webhook outbox claim ({why}): not sending",
                    why=failure.getErrorMessage(),
                )
                self._release()
            elif not failure.check(Unavailable):
                self.log.failure("claiming the webhook outbox failed", failure)

        d = self.outbox.claimOutbox(self.owner, CLAIM_TTL_MS)
        return d.addCallbacks(claimed, failed)

    # -- reading the outbox ------------------------------------------------------

    def _tick(self) -> None:
        if not self.holding:
            return
        self._flushRemoved()
        now = self.clock.seconds()
        if self._behind:
            if self._reading:
                # After the read in flight: its answer moves the cursor.
                self._rereadDue = True
            else:
                self._rereadBehind()
        if not self._queues and not self._reading and now - self._lastSweep >= SWEEP_INTERVAL:
            self._lastSweep = now
            self._rewind(0)
        self._caughtUp = False
        self._reads = 0
        self._read()

    def _rereadBehind(self) -> None:
        """
        Keys that recovered get their events left behind read again: the
        pass starts again before the first of them.
        """
        self._rereadDue = False
        due = [i for key, i in self._behind.items() if not self._capped(key)]
        if due and min(due) - 1 < self._cursor:
            self._rewind(min(due) - 1)

    def _rewind(self, cursor: int) -> None:
        """
        Read the outbox again from after C{cursor}: a new pass.
        """
        self._cursor = cursor
        self._passStart = None
        self._caughtUp = False

    def _room(self) -> int:
        return self.window - len(self._held)

    def _read(self) -> None:
        """
        Read the outbox from the cursor while the window has room, one read
        at a time, until caught up with its end.
        """
        if self._inRead:
            self._readAgain = True
            return
        self._inRead = True
        try:
            while True:
                self._readAgain = False
                if self._reading or not self.holding or not self.running or self._caughtUp:
                    return
                room = self._room()
                if room <= 0 or self._reads >= MAX_READS_PER_POLL:
                    return
                self._reads += 1
                limit = min(room, self.batch)
                self._reading = True
                start = self._cursor
                if self._passStart is None:
                    self._passStart = start
                    self._passSeen = set()
                generation = self._generation
                self.outbox.pending(start, limit).addCallbacks(
                    self._readDone,
                    self._readFailed,
                    callbackArgs=(start, limit, generation),
                    errbackArgs=(generation,),
                )
                if not self._readAgain:
                    return
        finally:
            self._inRead = False

    def _readFailed(self, failure: Failure, generation: int) -> None:
        if generation != self._generation:
            return
        self._reading = False
        self._forgetRemoved()
        if failure.check(Unavailable):
            self.log.warn(
                "cannot read the webhook outbox ({why}); retrying",
                why=failure.getErrorMessage(),
            )
        else:
            self.log.failure("reading the webhook outbox failed", failure)

    def _readDone(
        self, entries: list[OutboxEntry], start: int, limit: int, generation: int
    ) -> None:
        if generation != self._generation:
            return
        self._reading = False
        cutoff = self._cutoffMs()
        skippedKeys: set[str] = set()
        behindKeys = self._behind
        for entry in entries:
            if entry.id > self._cursor:
                self._cursor = entry.id
            if entry.id in self._held or entry.id in self._removing:
                continue
            if entry.createdMs < cutoff:
                continue  # retention removes it
            key = entry.key
            behind = behindKeys.get(key)
            if behind is not None:
                self._passSeen.add(key)
                if start >= behind:
                    # Events of this key before this one are not held:
                    # this one waits until those are read again.
                    continue
            if self._capped(key):
                if key not in skippedKeys:
                    skippedKeys.add(key)
                    behindKeys[key] = entry.id
                    self._passSeen.add(key)
                continue
            if behind is not None:
                del behindKeys[key]
            self._hold(entry)
        self._forgetRemoved()
        if len(entries) < limit:
            self._caughtUp = True
            # A pass over the outbox's end that found nothing of a key
            # waiting for a reread: that key has nothing left there.
            passStart = self._passStart
            if passStart is not None:
                for key, behind in list(behindKeys.items()):
                    if behind > passStart and key not in self._passSeen:
                        del behindKeys[key]
            self._passStart = None
        if self._rereadDue:
            self._rereadBehind()
        self._dispatch()
        if not self._caughtUp:
            self._read()

    def _capped(self, key: str) -> bool:
        """
        Whether no more events of C{key} are held: it is failing and holds
        L{FAILING_KEY_HELD} already.
        """
        queue = self._queues.get(key)
        return key in self._failures and queue is not None and len(queue) >= FAILING_KEY_HELD

    def _hold(self, entry: OutboxEntry) -> None:
        if entry.id > self._counted:
            self._counted = entry.id
            queued = self.metrics.queued
            queued[entry.type] = queued.get(entry.type, 0) + 1
        queue = self._queues.get(entry.key)
        self._held.add(entry.id)
        if queue is None:
            self._queues[entry.key] = collections.deque([entry])
            self._makeReady(entry.key)
        else:
            queue.append(entry)

    def _makeReady(self, key: str) -> None:
        if key not in self._readySet:
            self._readySet.add(key)
            self._ready.append(key)

    def _cutoffMs(self) -> int:
        return int((self.clock.seconds() - self.settings.webhook_retention) * 1000)

    # -- sending ---------------------------------------------------------------

    def _dispatch(self) -> None:
        """
        Send the heads of ready keys while fewer than
        C{webhook_concurrency} requests are in flight.
        """
        if self._dispatching:
            return  # an answer came at once: the loop below goes on
        self._dispatching = True
        try:
            self._dispatchLoop()
        finally:
            self._dispatching = False

    def _dispatchLoop(self) -> None:
        cutoff = None
        while self._ready and len(self._inFlight) < self.concurrency and self.holding:
            key = self._ready.popleft()
            self._readySet.discard(key)
            queue = self._queues.get(key)
            if not queue or key in self._inFlight or key in self._retries:
                continue
            if cutoff is None:
                cutoff = self._cutoffMs()
            while queue and queue[0].createdMs < cutoff:
                # Too old: retention removes it from the outbox.
                self._held.discard(queue.popleft().id)
                self._failures.pop(key, None)
            if not queue:
                del self._queues[key]
                continue
            self._send(key, queue[0])

    def _send(self, key: str, entry: OutboxEntry) -> None:
        generation = self._generation
        try:
            d = self.post(entry)
        except Exception:
            d = Deferred()
            d.errback(Failure())
        self._inFlight[key] = d
        d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(key, entry, generation),
            errbackArgs=(key, entry, generation),
        )

    def _answered(self, answer: Answer, key: str, entry: OutboxEntry, generation: int) -> None:
        if generation != self._generation:
            return
        del self._inFlight[key]
        if 200 <= answer.status < 300:
            self._deliveredOne(key, entry)
        else:
            self._attemptFailed(key, entry, answerReason(answer), answer.retryAfter)
            self.log.debug(
                "webhook {event} ({type}) answered {status}",
                event=entry.eventId,
                type=entry.type,
                status=answer.status,
            )
        self._dispatch()

    def _failed(self, failure: Failure, key: str, entry: OutboxEntry, generation: int) -> None:
        if generation != self._generation or failure.check(CancelledError):
            return
        del self._inFlight[key]
        self._attemptFailed(key, entry, failureReason(failure), None, failure.getErrorMessage())
        self._dispatch()

    def _deliveredOne(self, key: str, entry: OutboxEntry) -> None:
        metrics = self.metrics
        metrics.deliveries += 1
        metrics.delivery.observe(max(0.0, self.clock.seconds() - entry.createdMs / 1000.0))
        queue = self._queues[key]
        queue.popleft()
        self._held.discard(entry.id)
        self._removing.add(entry.id)
        self._delivered.append(entry.id)
        if self._failures.pop(key, None) is not None and self._failing:
            self._recovered()
        if queue:
            self._makeReady(key)
        else:
            del self._queues[key]
        if len(self._delivered) >= self.batch:
            self._flushRemoved()

    def _attemptFailed(
        self,
        key: str,
        entry: OutboxEntry,
        reason: str,
        retryAfter: float | None,
        detail: str | None = None,
    ) -> None:
        settings = self.settings
        self.metrics.failures[reason] = self.metrics.failures.get(reason, 0) + 1
        attempts = self._failures[key] = self._failures.get(key, 0) + 1
        exponential = settings.webhook_retry_initial * 2.0 ** min(attempts - 1, 60)
        ceiling = min(settings.webhook_retry_max, exponential)
        delay = self.random.uniform(0, ceiling)
        if retryAfter is not None:
            delay = max(delay, min(retryAfter, settings.webhook_retry_max))
        self._retries[key] = self.clock.callLater(delay, self._retry, key)
        # A failing key holds few events: the others go on reading.
        queue = self._queues[key]
        if len(queue) > FAILING_KEY_HELD:
            dropped = [queue.pop() for _ in range(len(queue) - FAILING_KEY_HELD)]
            for dropped_entry in dropped:
                self._held.discard(dropped_entry.id)
            self._behind[key] = dropped[-1].id
            if self._passStart is not None:
                # The pass under way went by those events while they were
                # held: it must not conclude at its end that the key has
                # nothing left to read again.
                self._passSeen.add(key)
            self._caughtUp = False
        self._logFailure(entry, reason, detail)

    def _retry(self, key: str) -> None:
        del self._retries[key]
        if key in self._queues:
            self._makeReady(key)
            self._dispatch()

    def _logFailure(self, entry: OutboxEntry, reason: str, detail: str | None) -> None:
        self._failedSinceLog += 1
        now = self.clock.seconds()
        if self._lastFailureLog is not None and now - self._lastFailureLog < FAILURE_LOG_INTERVAL:
            return
        self.log.warn(
            "webhook delivery failing: {count} failed attempt(s) since the last report;"
            " the last: {event} ({type}): {reason}{detail}; retrying with backoff",
            count=self._failedSinceLog,
            event=entry.eventId,
            type=entry.type,
            reason=reason,
            detail=": " + detail if detail else "",
        )
        self._failing = True
        self._lastFailureLog = now
        self._failedSinceLog = 0

    def _recovered(self) -> None:
        if not self._failures:
            self._failing = False
            self._lastFailureLog = None
            self.log.info("webhook deliveries succeed again")

    # -- removing delivered events ------------------------------------------------

    def _flushRemoved(self) -> "Deferred[None]":
        if not self._delivered:
            return succeed(None)
        ids, self._delivered = self._delivered, []

        def removed(_: object) -> None:
            if self._reading:
                self._forgetAfterRead.extend(ids)
            else:
                self._removing.difference_update(ids)

        def failed(failure: Failure) -> None:
            # Kept for the next flush; a restart sends them again.
            self._delivered.extend(ids)
            if failure.check(Unavailable):
                self.log.warn(
                    "cannot remove delivered webhook events ({why}); retrying",
                    why=failure.getErrorMessage(),
                )
            else:
                self.log.failure("removing delivered webhook events failed", failure)

        d = self.outbox.remove(ids).addCallbacks(removed, failed)
        self._removals.add(d)
        d.addBoth(self._removalDone, d)
        return d

    def _removalDone(self, result: object, d: "Deferred[None]") -> object:
        self._removals.discard(d)
        return result

    def _forgetRemoved(self) -> None:
        if self._forgetAfterRead:
            self._removing.difference_update(self._forgetAfterRead)
            self._forgetAfterRead = []

    # -- retention and gauges ---------------------------------------------------

    def _expire(self) -> "Deferred[None] | None":
        if not self.holding:
            return None

        def expired(count: int) -> None:
            if count:
                self.metrics.expired += count
                self.log.warn(
                    "webhook retention removed {count} undelivered event(s) older than"
                    " {seconds:.0f} s",
                    count=count,
                    seconds=self.settings.webhook_retention,
                )

        def failed(failure: Failure) -> None:
            if failure.check(Unavailable):
                self.log.warn("webhook retention postponed: {why}", why=failure.getErrorMessage())
            else:
                self.log.failure("webhook retention failed", failure)

        d = self.outbox.expire(self._cutoffMs())
        return d.addCallbacks(expired, failed)

    def _stats(self) -> "Deferred[None]":
        def looked(stats: tuple[int, int | None]) -> None:
            self.metrics.outboxEntries, self.metrics.oldestMs = stats

        def failed(failure: Failure) -> None:
            if not failure.check(Unavailable):
                self.log.failure("reading the webhook outbox's size failed", failure)

        d = self.outbox.outboxStats()
        return d.addCallbacks(looked, failed)
