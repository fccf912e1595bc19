# -*- test-case-name: tests.test_webhooks -*-
"""
Tests for the webhooks (L{imserver.webhooks}): the signature, the sender's
delivery rules and the presence events on a L{Clock}; the HTTP side
against a real receiver on loopback (L{tests.support.webhooks}); the
C{--webhook} options; every event end to end with the real service tree;
docs/api.md's examples and test vector; and the crash test, a C{twistd im}
process killed with C{kill -9} while it sends webhooks.
"""

import base64
import hashlib
import hmac
import json
import os
import random
import re
import stat
import time

from hypothesis import HealthCheck, given, settings as hypothesisSettings, strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import error, reactor
from twisted.internet.defer import (
    Deferred,
    TimeoutError,
    fail,
    gatherResults,
    inlineCallbacks,
    succeed,
)
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from imserver import tap
from imserver.auth import createSecretFile
from imserver.errors import Unavailable
from imserver.httpclient import trustRootFor
from imserver.interfaces import ISessionRegistry
from imserver.pb import im_pb2 as pb
from imserver.registry.memory import MemorySessionRegistry
from imserver.settings import Settings
from imserver.store.memory import MemoryMessageStore
from imserver.webhooks import events as ev, sender as senderModule
from imserver.webhooks.http import HTTPPoster
from imserver.webhooks.metrics import WebhookMetrics
from imserver.webhooks.presence import (
    EMBEDDED_LEDGER,
    PresenceNotifier,
    PresenceRegistry,
    gateOfSession,
)
from imserver.webhooks.sender import (
    FAILING_KEY_HELD,
    MAX_READS_PER_POLL,
    Answer,
    WebhookSender,
    failureReason,
)
from imserver.webhooks.service import parseEvents
from imserver.webhooks.signing import REPLAY_WINDOW, sign, verify

from tests.support import startServer, withoutSecretEnvironment
from tests.support.cluster import RedisTestMixin
from tests.support.webhooks import CLOSE, HANG, WebhookReceiver, slow
from tests.test_api import LiveApiTestCase

SECRET = b"4e1f0c8a9d2b7e6f3a5c1d8e9f0b2a4c6e8d0f1a3b5c7d9e1f2a4b6c8d0e2f4a"


class MaxRandom:
    """
    A random source whose C{uniform} always gives the upper bound, so a
    test knows the longest backoff.
    """

    def uniform(self, a, b):
        return b


def settings(**changes):
    """
    Settings for the sender's tests: small, round numbers.
    """
    values = dict(
        webhook_retry_initial=1.0,
        webhook_retry_max=8.0,
        webhook_concurrency=4,
        webhook_batch=10,
        webhook_window=50,
        webhook_poll_interval=0.2,
        webhook_retention=3600.0,
    )
    values.update(changes)
    return Settings().replace(**values)


def event(key, n, type=ev.MESSAGE_STORED):
    """
    An outbox event of C{key} whose data names it: C{{"key", "n"}}.
    """
    return ev.OutboxEvent(type, key, json.dumps({"key": key, "n": n}).encode("utf-8"))


class FakePoster:
    """
    Posts nothing: records each entry with a L{Deferred} the test fires.

    @ivar requests: C{[(entry, Deferred)]}, in the order posted.
    """

    def __init__(self):
        self.requests = []
        self.answered = []
        self.cancelled = []

    def post(self, entry):
        """
        Record C{entry}; the test answers.
        """
        d = Deferred(lambda d: self.cancelled.append(entry))
        self.requests.append((entry, d))
        return d

    def open(self):
        """
        The requests not answered yet.
        """
        return [(e, d) for e, d in self.requests if not d.called]

    def answer(self, status=200, key=None, retryAfter=None):
        """
        Answer every open request (of C{key}, if given) with C{status}.

        @return: how many were answered.
        """
        answered = 0
        for entry, d in self.open():
            if key is None or entry.key == key:
                self.answered.append((entry, status))
                d.callback(Answer(status, retryAfter))
                answered += 1
        return answered

    def fail(self, exception, key=None):
        """
        Fail every open request (of C{key}, if given) with C{exception}.
        """
        for entry, d in self.open():
            if key is None or entry.key == key:
                d.errback(Failure(exception))


def data(entry):
    """
    The C{(key, n)} of an entry made by L{event}.
    """
    value = json.loads(entry.data)
    return value["key"], value["n"]


class SenderTestCase(SynchronousTestCase):
    """
    A L{WebhookSender} on a memory store and a L{Clock}, posting to a
    L{FakePoster}.
    """

    def setUp(self):
        """
        A memory store on a L{Clock} well past the epoch, a L{FakePoster}, metrics.
        """
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemoryMessageStore(clock=self.clock)
        self.poster = FakePoster()
        self.metrics = WebhookMetrics(None, self.clock, lambda: self.store.outboxDropped)
        self.logged = []

    def sender(self, **changes):
        """
        A started sender, logging to C{self.logged}; stopped at cleanup.
        """
        sender = WebhookSender(
            self.store,
            self.poster.post,
            self.clock,
            settings(**changes),
            "gate-1",
            self.metrics,
            MaxRandom(),
        )
        sender.log = Logger(observer=self.logged.append)
        sender.start()
        self.addCleanup(sender.stop)
        return sender

    def record(self, *events, ageSeconds=0):
        """
        Put C{events} in the outbox, recorded C{ageSeconds} ago.
        """
        nowMs = int((self.clock.seconds() - ageSeconds) * 1000)
        self.successResultOf(self.store.enqueue(list(events), nowMs))

    def outbox(self):
        """
        The C{(key, n)} of every entry still in the outbox.
        """
        return [data(e) for e in self.successResultOf(self.store.pending(0, 1000))]

    def tick(self, seconds=0.2):
        """
        Let the clock run C{seconds} (a poll of the outbox at 0.2).
        """
        self.clock.advance(seconds)


class DeliveryTests(SenderTestCase):
    """
    Delivery: 2xx removes, in batches; order per key; concurrency.
    """

    def test_deliveredRemoved(self):
        """
        An event answered 2xx is counted delivered and removed from the
        outbox at the next poll; until then it is still there.
        """
        self.record(event("alice", 1))
        self.sender()
        [(entry, d)] = self.poster.requests
        self.assertEqual(data(entry), ("alice", 1))
        self.assertEqual(self.outbox(), [("alice", 1)])
        d.callback(Answer(204))
        self.assertEqual(self.metrics.deliveries, 1)
        self.tick()
        self.assertEqual(self.outbox(), [])
        self.assertEqual(self.metrics.queued[ev.MESSAGE_STORED], 1)

    def test_orderPerKey(self):
        """
        Only the oldest undelivered event of a key is in flight: the next
        one is sent once it is delivered; other keys go meanwhile.
        """
        self.record(event("alice", 1), event("alice", 2), event("bob", 1), event("alice", 3))
        self.sender()
        self.assertEqual(sorted(data(e) for e, _ in self.poster.open()), [("alice", 1), ("bob", 1)])
        self.poster.answer(200, key="alice")
        self.assertEqual([data(e) for e, _ in self.poster.open()], [("bob", 1), ("alice", 2)])
        self.poster.answer(200)
        self.poster.answer(200)
        self.assertEqual(
            [data(e) for e, _ in self.poster.requests],
            [("alice", 1), ("bob", 1), ("alice", 2), ("alice", 3)],
        )

    def test_concurrency(self):
        """
        At most C{webhook_concurrency} requests are in flight; the others
        go as answers come.
        """
        self.record(*[event("user{}".format(i), 1) for i in range(10)])
        self.sender(webhook_concurrency=3)
        self.assertEqual(len(self.poster.open()), 3)
        self.poster.answer(200)
        self.assertEqual(len(self.poster.open()), 3)
        for _ in range(5):
            self.poster.answer(200)
        self.assertEqual(len(self.poster.requests), 10)
        self.assertEqual(self.metrics.deliveries, 10)

    def test_newEventsPolled(self):
        """
        Events recorded while the sender runs are read at the next poll, or
        at once after L{WebhookSender.wake}.
        """
        sender = self.sender()
        self.record(event("alice", 1))
        self.assertEqual(self.poster.requests, [])
        self.tick()
        self.assertEqual(len(self.poster.requests), 1)
        self.record(event("bob", 1))
        sender.wake()
        self.clock.advance(0)
        self.assertEqual(len(self.poster.requests), 2)

    def test_windowBounded(self):
        """
        The sender holds at most C{webhook_window} events in memory; the
        rest is read as those are delivered.
        """
        self.record(*[event("alice", n) for n in range(1, 31)])
        sender = self.sender(webhook_window=5)
        self.assertEqual(len(sender._held), 5)
        for n in range(1, 31):
            self.assertEqual(self.poster.answer(200), 1, n)
            self.assertLessEqual(len(sender._held), 5)
            self.tick()
        self.assertEqual(
            [data(e) for e, _ in self.poster.requests], [("alice", n) for n in range(1, 31)]
        )
        self.assertEqual(self.outbox(), [])

    def test_removedInBatches(self):
        """
        Delivered ids are removed in one operation per poll, or as soon as
        C{webhook_batch} are waiting.
        """
        calls = []
        remove = self.store.remove
        self.patch(self.store, "remove", lambda ids: calls.append(list(ids)) or remove(ids))
        self.record(*[event("user{}".format(i), 1) for i in range(7)])
        self.sender(webhook_batch=5, webhook_concurrency=10)
        self.poster.answer(200)
        self.assertEqual([len(c) for c in calls], [5])
        self.tick()
        self.assertEqual([len(c) for c in calls], [5, 2])


class RetryTests(SenderTestCase):
    """
    Failed attempts: capped exponential backoff with full jitter, per key.
    """

    def test_backoff(self):
        """
        Each failure of an event waits up to C{webhook_retry_initial}
        doubled per attempt, capped at C{webhook_retry_max} (the jitter
        here always takes the bound).
        """
        self.record(event("alice", 1))
        self.sender()
        waits = []
        for _ in range(6):
            [(entry, d)] = self.poster.open()
            d.callback(Answer(503))
            [call] = [
                c
                for c in self.clock.getDelayedCalls()
                if getattr(c.func, "__name__", None) == "_retry"
            ]
            waits.append(call.getTime() - self.clock.seconds())
            self.clock.advance(waits[-1])
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(self.metrics.failures["http_5xx"], 6)
        self.poster.answer(200)
        self.assertEqual(len(self.poster.requests), 7)
        self.assertEqual(self.metrics.deliveries, 1)

    def test_jitter(self):
        """
        The wait is drawn uniformly between 0 and the bound.
        """
        draws = []

        class Recording:
            def uniform(self, a, b):
                draws.append((a, b))
                return b / 2

        self.record(event("alice", 1))
        sender = self.sender()
        sender.random = Recording()
        self.poster.answer(500)
        self.assertEqual(draws, [(0, 1.0)])

    def test_failingKeyDoesNotBlockOthers(self):
        """
        While one key's event keeps failing, the others are delivered.
        """
        self.record(event("alice", 1), event("alice", 2), event("bob", 1), event("bob", 2))
        self.sender()
        self.poster.answer(500, key="alice")
        self.poster.answer(200, key="bob")
        self.poster.answer(200, key="bob")
        self.assertEqual(
            [data(e) for e, _ in self.poster.requests],
            [("alice", 1), ("bob", 1), ("bob", 2)],
        )
        self.tick()
        self.assertEqual(self.outbox(), [("alice", 1), ("alice", 2)])

    def test_statusesRetried(self):
        """
        5xx, 429, 408, any other 4xx, a redirect, a timeout and a
        connection error are all retried (nothing is dropped), each counted
        under its reason.
        """
        self.record(event("alice", 1))
        self.sender()
        for status in (500, 429, 408, 404, 301):
            self.poster.answer(status)
            self.clock.advance(10)
        self.poster.fail(TimeoutError())
        self.clock.advance(10)
        from twisted.internet.error import ConnectionRefusedError

        self.poster.fail(ConnectionRefusedError())
        self.clock.advance(10)
        self.poster.answer(200)
        self.assertEqual(
            {k: v for k, v in self.metrics.failures.items() if v},
            {
                "http_5xx": 1,
                "http_429": 1,
                "http_4xx": 2,
                "http_other": 1,
                "timeout": 1,
                "connection": 1,
            },
        )
        self.assertEqual(len(self.poster.requests), 8)
        self.assertEqual(self.metrics.deliveries, 1)

    def test_retryAfter(self):
        """
        A C{Retry-After} longer than the backoff is waited for (capped at
        C{webhook_retry_max}).
        """
        self.record(event("alice", 1))
        self.sender()
        self.poster.answer(429, retryAfter=5)
        self.clock.advance(4.9)
        self.assertEqual(self.poster.open(), [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.poster.open()), 1)
        self.poster.answer(503, retryAfter=3600)
        self.clock.advance(8)
        self.assertEqual(len(self.poster.open()), 1)

    def test_failingKeyHoldsFew(self):
        """
        A failing key keeps at most L{FAILING_KEY_HELD} events in memory,
        so a key with more events than the window fails without blocking
        the others; once it recovers, all of its events are delivered, in
        order.
        """
        self.record(*[event("alice", n) for n in range(1, 41)])
        self.record(*[event("bob", n) for n in range(1, 6)])
        sender = self.sender(webhook_window=30, webhook_batch=10)
        self.poster.answer(500, key="alice")
        self.tick()
        self.tick()
        # Bob's events come after alice's 40, beyond the window of 30.
        for _ in range(5):
            self.assertEqual(self.poster.answer(200, key="bob"), 1)
            self.tick()
        self.assertLessEqual(len(sender._queues["alice"]), FAILING_KEY_HELD)
        self.assertEqual(
            [data(e) for e, _ in self.poster.requests if e.key == "bob"],
            [("bob", n) for n in range(1, 6)],
        )
        # Alice recovers.
        self.clock.advance(1)
        for _ in range(40):
            self.assertEqual(self.poster.answer(200, key="alice"), 1)
            self.tick()
        alice = [
            data(e) for e, status in self.poster.answered if e.key == "alice" and status == 200
        ]
        self.assertEqual(alice, [("alice", n) for n in range(1, 41)])
        self.assertEqual(self.outbox(), [])

    def test_failingMidPassKeepsOrder(self):
        """
        A key that fails while a pass over the outbox is under way (its
        events beyond L{FAILING_KEY_HELD} let go) is read again before any
        of its later events is sent: the end of that pass does not forget
        it, even though the pass saw none of its events after the ones let
        go (they were held when the pass went by).
        """
        self.record(*[event("alice", n) for n in range(1, 21)])
        self.record(*[event("user{}".format(n), 1) for n in range(40)])
        self.sender(webhook_batch=1)
        # The first poll read alice's 20 (and no further: reads are
        # bounded per poll); her first event fails.
        self.assertEqual(self.poster.answer(500, key="alice"), 1)
        for _ in range(3):
            self.poster.answer(200)
            self.tick()
        self.record(*[event("alice", n) for n in range(21, 26)])
        for _ in range(80):
            self.poster.answer(200)
            self.tick()
        alice = [
            data(e) for e, status in self.poster.answered if e.key == "alice" and status == 200
        ]
        self.assertEqual(alice, [("alice", n) for n in range(1, 26)])
        self.assertEqual(self.outbox(), [])

    def test_recoveredKeyReadAgainDuringSlowReads(self):
        """
        A key that recovers is read again from its first event left behind
        at the next poll even when an outbox read is in flight then (a
        remote store's reads take longer than a poll interval, and other
        keys' steady traffic keeps a pass going): the rewind waits for that
        read's answer, not for the pass to reach the outbox's end.
        """
        self.record(*[event("alice", n) for n in range(1, 41)])
        self.record(*[event("user{}".format(n), 1) for n in range(3000)])
        pending = self.store.pending

        def slowPending(afterId, limit):
            entries = pending(afterId, limit)
            d = Deferred()
            self.clock.callLater(0.3, lambda: entries.chainDeferred(d))
            return d

        self.patch(self.store, "pending", slowPending)
        self.sender(webhook_window=30, webhook_batch=10, webhook_concurrency=30)
        self.tick(0.3)
        self.assertEqual(self.poster.answer(500, key="alice"), 1)
        self.clock.advance(1)  # alice's retry is due
        for _ in range(200):
            self.poster.answer(200)
            self.tick(0.1)
            if len([e for e, status in self.poster.answered if e.key == "alice"]) > 40:
                break
        alice = [
            data(e) for e, status in self.poster.answered if e.key == "alice" and status == 200
        ]
        self.assertEqual(alice, [("alice", n) for n in range(1, 41)])
        # Long before the pass over the 3,000 other events ends.
        self.assertLess(len([e for e, _ in self.poster.answered if e.key != "alice"]), 2000)

    def test_readsBounded(self):
        """
        A pass over an outbox full of a failing key's events (which are
        skipped) reads at most L{MAX_READS_PER_POLL} times per poll, and
        goes on at the next poll until it reaches the other keys' events.
        """
        self.record(*[event("alice", n) for n in range(1, 1001)])
        self.record(event("bob", 1))
        reads = []
        pending = self.store.pending
        self.patch(self.store, "pending", lambda *a: reads.append(a) or pending(*a))
        self.sender(webhook_window=30, webhook_batch=10)
        self.poster.answer(500, key="alice")
        counts = []
        while not any(e.key == "bob" for e, _ in self.poster.requests):
            before = len(reads)
            self.tick()
            counts.append(len(reads) - before)
            self.assertLess(len(counts), 10)
        self.assertEqual(max(counts), MAX_READS_PER_POLL)
        self.assertGreater(len(counts), 2)

    def test_failureLogged(self):
        """
        Failed attempts are logged as one warning per interval, not one per
        attempt.
        """
        self.record(*[event("user{}".format(i), 1) for i in range(5)])
        self.sender(webhook_concurrency=10)
        self.poster.answer(500)
        warnings = [e for e in self.logged if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["reason"], "http_5xx")
        self.clock.advance(10)
        self.poster.answer(500)
        warnings = [e for e in self.logged if e["log_level"] == LogLevel.warn]
        self.assertEqual(
            [formatEvent(w).split(";")[0] for w in warnings],
            [
                "webhook delivery failing: 1 failed attempt(s) since the last report",
                "webhook delivery failing: 5 failed attempt(s) since the last report",
            ],
        )


class ClaimTests(SenderTestCase):
    """
    The sender sends only while it holds the outbox's claim.
    """

    def test_claimLost(self):
        """
        On losing the claim the requests in flight are cancelled and the
        window forgotten; nothing is removed.  Holding it again, the sender
        sends the events again.
        """
        holds = [True]
        self.patch(self.store, "claimOutbox", lambda owner, ttl: succeed(holds[-1]))
        self.record(event("alice", 1))
        sender = self.sender()
        [(entry, d)] = self.poster.requests
        holds.append(False)
        self.clock.advance(1)
        self.assertFalse(sender.holding)
        self.assertEqual(self.poster.cancelled, [entry])
        self.assertEqual(self.outbox(), [("alice", 1)])
        self.record(event("alice", 2))
        self.clock.advance(5)
        self.assertEqual(len(self.poster.requests), 1)
        holds.append(True)
        self.clock.advance(1)
        self.assertEqual([data(e) for e, _ in self.poster.open()], [("alice", 1)])

    def test_notHeld(self):
        """
        A sender that never gets the claim reads nothing.
        """
        reads = []
        self.patch(self.store, "claimOutbox", lambda owner, ttl: succeed(False))
        self.patch(self.store, "pending", lambda *a: reads.append(a) or succeed([]))
        self.record(event("alice", 1))
        self.sender()
        self.clock.advance(10)
        self.assertEqual((reads, self.poster.requests), ([], []))

    def test_claimFails(self):
        """
        A claim that cannot be renewed (the store unavailable) stops the
        sending like a lost one.
        """
        results = [succeed(True)]
        self.patch(self.store, "claimOutbox", lambda owner, ttl: results[-1])
        self.record(event("alice", 1))
        sender = self.sender()
        results.append(fail(Unavailable("redis is down")))
        self.clock.advance(1)
        self.assertFalse(sender.holding)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_stop(self):
        """
        Stopping cancels the requests in flight, removes what was
        delivered and nothing else.
        """
        self.record(event("alice", 1), event("bob", 1))
        sender = self.sender()
        self.poster.answer(200, key="alice")
        [(bob, _)] = self.poster.open()
        self.successResultOf(sender.stop())
        self.assertEqual(self.poster.cancelled, [bob])
        self.assertEqual(self.outbox(), [("bob", 1)])
        self.clock.advance(10)
        self.assertEqual(len(self.poster.requests), 2)


class RetentionTests(SenderTestCase):
    """
    C{webhook_retention} and the outbox's bound.
    """

    def test_expired(self):
        """
        Events older than C{webhook_retention} are removed at start (and
        every minute), counted and logged; a held event that became too
        old is not sent again.
        """
        self.record(event("alice", 1), ageSeconds=4000)
        self.record(event("bob", 1), ageSeconds=3590)
        self.sender()
        self.assertEqual(self.metrics.expired, 1)
        [warning] = [e for e in self.logged if e["log_level"] == LogLevel.warn]
        self.assertIn("removed 1 undelivered event(s)", formatEvent(warning))
        self.assertEqual([data(e) for e, _ in self.poster.requests], [("bob", 1)])
        self.poster.answer(500)
        self.clock.advance(15)
        self.assertEqual(len(self.poster.requests), 1)
        self.clock.advance(60)
        self.assertEqual(self.metrics.expired, 2)
        self.assertEqual(self.outbox(), [])

    def test_full(self):
        """
        Events the store did not keep because the outbox was full are
        counted as dropped C{full}.
        """
        self.store.outboxLimit = 2
        self.store.outboxEvents = frozenset([ev.MESSAGE_STORED])
        self.record(event("a", 1), event("b", 1), event("c", 1))
        registry = CollectorRegistry()
        WebhookMetrics(registry, self.clock, lambda: self.store.outboxDropped)
        text = generate_latest(registry).decode("ascii")
        self.assertIn('imserver_webhook_events_dropped_total{reason="full"} 1.0', text)


class MetricsTests(SenderTestCase):
    """
    The webhook metrics as C{/metrics} serves them.
    """

    def test_exposition(self):
        """
        Every webhook metric is exposed, with the outbox's size and the age
        of its oldest event read at the last look.
        """
        registry = CollectorRegistry()
        self.metrics = WebhookMetrics(registry, self.clock, lambda: self.store.outboxDropped)
        self.record(event("alice", 1), ageSeconds=30)
        self.sender()
        self.poster.answer(200)
        self.record(event("bob", 1), ageSeconds=12)
        self.clock.advance(5)
        text = generate_latest(registry).decode("ascii")
        for line in [
            'imserver_webhook_events_queued_total{type="message.stored"} 2.0',
            "imserver_webhook_deliveries_total 1.0",
            'imserver_webhook_attempts_failed_total{reason="timeout"} 0.0',
            'imserver_webhook_events_dropped_total{reason="expired"} 0.0',
            "imserver_webhook_outbox_events 1.0",
            "imserver_webhook_oldest_pending_seconds 17.0",
            "imserver_webhook_requests_in_flight 1.0",
            'imserver_webhook_delivery_seconds_bucket{le="+Inf"} 1.0',
            "imserver_webhook_delivery_seconds_sum 30.0",
        ]:
            self.assertIn(line, text)


class FakeSession:
    """
    What the presence notifier reads of a session.
    """

    def __init__(self, uid, deviceId, n, platform=pb.IOS, gateId="gate-1"):
        self.uid = uid
        self.deviceId = deviceId
        self.platform = platform
        self.sessionId = "{}/{}".format(gateId, n)
        self.gateId = gateId
        self.kickedFor = None
        self.kicks = []

    def kick(self, reason, message):
        self.kicks.append(reason)


class PresenceTests(SynchronousTestCase):
    """
    L{PresenceNotifier}: presence events, coalescing, restarts.
    """

    def setUp(self):
        """
        A memory store on a L{Clock} well past the epoch.
        """
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemoryMessageStore(clock=self.clock)
        self.metrics = WebhookMetrics(None, self.clock)
        self.woken = []

    def notifier(self, window=5.0, ledger=None, types=(ev.USER_ONLINE, ev.USER_OFFLINE)):
        """
        A started L{PresenceNotifier} of gate C{gate-1} on the memory store.
        """
        notifier = PresenceNotifier(
            self.store,
            self.clock,
            "gate-1",
            window,
            self.metrics,
            types,
            ledger=ledger,
            wake=lambda: self.woken.append(True),
        )
        self.successResultOf(notifier.start())
        return notifier

    def events(self):
        """
        C{(type, session_id, reason)} of every event in the outbox.
        """
        found = []
        for entry in self.successResultOf(self.store.pending(0, 1000)):
            value = json.loads(entry.data)
            found.append((entry.type, value["session_id"], value.get("reason")))
        return found

    def test_onlineOffline(self):
        """
        A registration is reported online at once, with the session's
        device, platform, gate and session; its end is reported offline
        after the flap window.
        """
        notifier = self.notifier()
        alice = FakeSession("alice", "phone", 1)
        notifier.online(alice)
        [entry] = self.successResultOf(self.store.pending(0, 10))
        self.assertEqual((entry.type, entry.key), (ev.USER_ONLINE, "alice"))
        self.assertEqual(
            json.loads(entry.data),
            {
                "uid": "alice",
                "device_id": "phone",
                "platform": "ios",
                "gate_id": "gate-1",
                "session_id": "gate-1/1",
            },
        )
        self.assertTrue(self.woken)
        self.assertEqual(
            self.successResultOf(self.store.presentOn("gate-1")),
            [("alice", "phone", "gate-1/1")],
        )
        notifier.offline(alice)
        self.clock.advance(4.9)
        self.assertEqual(len(self.events()), 1)
        self.clock.advance(0.1)
        self.assertEqual(
            self.events(),
            [(ev.USER_ONLINE, "gate-1/1", None), (ev.USER_OFFLINE, "gate-1/1", "closed")],
        )
        self.assertEqual(self.successResultOf(self.store.presentOn("gate-1")), [])

    def test_flapCoalesced(self):
        """
        A device back within the window is reported neither offline nor
        online again; its eventual offline names the session of its first
        online, which the ledger forgets.
        """
        notifier = self.notifier()
        first = FakeSession("alice", "phone", 1)
        second = FakeSession("alice", "phone", 2)
        notifier.online(first)
        notifier.offline(first)
        self.clock.advance(3)
        notifier.online(second)
        self.clock.advance(10)
        self.assertEqual(self.events(), [(ev.USER_ONLINE, "gate-1/1", None)])
        self.assertEqual(self.metrics.coalesced, 1)
        notifier.offline(second)
        self.clock.advance(5)
        self.assertEqual(
            self.events(),
            [(ev.USER_ONLINE, "gate-1/1", None), (ev.USER_OFFLINE, "gate-1/1", "closed")],
        )
        self.assertEqual(self.successResultOf(self.store.presentOn("gate-1")), [])

    def test_replacedCoalesced(self):
        """
        The same device signing in again on this gate (the registry
        displaces the old session) is a flap: nothing is reported, and the
        old session's late end changes nothing.
        """
        notifier = self.notifier()
        registry = PresenceRegistry(MemorySessionRegistry(), notifier)
        first = FakeSession("alice", "phone", 1)
        second = FakeSession("alice", "phone", 2)
        self.successResultOf(registry.register(first))
        self.assertIs(self.successResultOf(registry.register(second)), first)
        self.assertFalse(self.successResultOf(registry.unregister(first)))
        self.clock.advance(10)
        self.assertEqual(self.events(), [(ev.USER_ONLINE, "gate-1/1", None)])
        self.assertTrue(self.successResultOf(registry.unregister(second)))
        self.clock.advance(5)
        self.assertEqual(self.events()[-1], (ev.USER_OFFLINE, "gate-1/1", "closed"))

    def test_noWindow(self):
        """
        With no flap window an offline is written at once, and a
        replacement is an offline (kicked) and an online.
        """
        notifier = self.notifier(window=0)
        first = FakeSession("alice", "phone", 1)
        second = FakeSession("alice", "phone", 2)
        notifier.online(first)
        notifier.online(second)
        notifier.offline(second)
        self.assertEqual(
            self.events(),
            [
                (ev.USER_ONLINE, "gate-1/1", None),
                (ev.USER_OFFLINE, "gate-1/1", "kicked"),
                (ev.USER_ONLINE, "gate-1/2", None),
                (ev.USER_OFFLINE, "gate-1/2", "closed"),
            ],
        )

    def test_kicked(self):
        """
        A session that was kicked (the API, or a login on another gate) is
        reported offline with the reason C{kicked}.
        """
        notifier = self.notifier(window=0)
        registry = PresenceRegistry(MemorySessionRegistry(), notifier)
        alice = FakeSession("alice", "phone", 1)
        self.successResultOf(registry.register(alice))
        alice.kickedFor = pb.ADMIN
        self.successResultOf(registry.unregister(alice))
        self.assertEqual(self.events()[-1], (ev.USER_OFFLINE, "gate-1/1", "kicked"))

    def test_otherDevicesIndependent(self):
        """
        Devices are coalesced each on its own: another device's online does
        not cancel a held offline.
        """
        notifier = self.notifier()
        phone = FakeSession("alice", "phone", 1)
        laptop = FakeSession("alice", "laptop", 2)
        notifier.online(phone)
        notifier.offline(phone)
        notifier.online(laptop)
        self.clock.advance(5)
        self.assertEqual(
            self.events(),
            [
                (ev.USER_ONLINE, "gate-1/1", None),
                (ev.USER_ONLINE, "gate-1/2", None),
                (ev.USER_OFFLINE, "gate-1/1", "closed"),
            ],
        )

    def test_restart(self):
        """
        At start, the devices a previous run left online (C{kill -9}) are
        reported offline with C{gate_restarted}, before anything of this
        run; in embedded mode whatever the gate id of that run.
        """
        old = PresenceNotifier(
            self.store, self.clock, "host:111", 5.0, self.metrics, ledger=EMBEDDED_LEDGER
        )
        self.successResultOf(old.start())
        old.online(FakeSession("alice", "phone", 1, gateId="host:111"))
        old.online(FakeSession("bob", "laptop", 2, gateId="host:111"))
        # killed: nothing more from it.
        leftovers = Deferred()
        self.patch(self.store, "presentOn", lambda gate: leftovers)
        new = PresenceNotifier(
            self.store, self.clock, "host:222", 5.0, self.metrics, ledger=EMBEDDED_LEDGER
        )
        d = new.start()
        new.online(FakeSession("alice", "phone", 3, gateId="host:222"))
        self.assertEqual(len(self.events()), 2)
        leftovers.callback([("alice", "phone", "host:111/1"), ("bob", "laptop", "host:111/2")])
        self.successResultOf(d)
        [_, _, aliceOff, bobOff, aliceOn] = self.successResultOf(self.store.pending(0, 10))
        self.assertEqual(
            [json.loads(e.data) for e in (aliceOff, bobOff)],
            [
                {
                    "uid": "alice",
                    "device_id": "phone",
                    "gate_id": "host:111",
                    "session_id": "host:111/1",
                    "reason": "gate_restarted",
                },
                {
                    "uid": "bob",
                    "device_id": "laptop",
                    "gate_id": "host:111",
                    "session_id": "host:111/2",
                    "reason": "gate_restarted",
                },
            ],
        )
        self.assertEqual(json.loads(aliceOn.data)["session_id"], "host:222/3")
        del self.store.presentOn
        self.assertEqual(
            self.successResultOf(self.store.presentOn(EMBEDDED_LEDGER)),
            [("alice", "phone", "host:222/3")],
        )

    def test_clusterLedger(self):
        """
        In cluster mode the ledger is kept under the gate id.
        """
        notifier = self.notifier()
        notifier.online(FakeSession("alice", "phone", 1))
        self.assertEqual(
            self.successResultOf(self.store.presentOn("gate-1")), [("alice", "phone", "gate-1/1")]
        )
        self.assertEqual(self.successResultOf(self.store.presentOn(EMBEDDED_LEDGER)), [])

    def test_stopFlushes(self):
        """
        Stopping writes the held offlines (and those of sessions still
        registered) at once.
        """
        notifier = self.notifier()
        alice = FakeSession("alice", "phone", 1)
        bob = FakeSession("bob", "phone", 2)
        notifier.online(alice)
        notifier.online(bob)
        notifier.offline(alice)
        self.successResultOf(notifier.stop())
        self.assertEqual(
            sorted(self.events()),
            sorted(
                [
                    (ev.USER_ONLINE, "gate-1/1", None),
                    (ev.USER_ONLINE, "gate-1/2", None),
                    (ev.USER_OFFLINE, "gate-1/1", "closed"),
                    (ev.USER_OFFLINE, "gate-1/2", "closed"),
                ]
            ),
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        notifier.online(FakeSession("carol", "phone", 3))
        self.assertEqual(len(self.events()), 4)

    def test_filter(self):
        """
        With only C{user.online} wanted, no offline is written and no
        ledger kept (nothing would ever remove its rows).
        """
        notifier = self.notifier(types=[ev.USER_ONLINE])
        alice = FakeSession("alice", "phone", 1)
        notifier.online(alice)
        notifier.offline(alice)
        self.clock.advance(10)
        self.assertEqual(self.events(), [(ev.USER_ONLINE, "gate-1/1", None)])
        self.assertEqual(self.successResultOf(self.store.presentOn("gate-1")), [])

    def test_storeRefuses(self):
        """
        Events the store refuses are written again later, in order, before
        the ones that came meanwhile.
        """
        notifier = self.notifier(window=0)
        enqueue = self.store.enqueue
        refusing = [True]

        def maybe(events, nowMs):
            if refusing[-1]:
                return fail(Unavailable("down"))
            return enqueue(events, nowMs)

        self.patch(self.store, "enqueue", maybe)
        alice = FakeSession("alice", "phone", 1)
        notifier.online(alice)
        notifier.offline(alice)
        notifier.online(FakeSession("alice", "phone", 2))
        self.clock.advance(1)
        self.assertEqual(self.events(), [])
        refusing.append(False)
        self.clock.advance(1)
        self.assertEqual(
            self.events(),
            [
                (ev.USER_ONLINE, "gate-1/1", None),
                (ev.USER_OFFLINE, "gate-1/1", "closed"),
                (ev.USER_ONLINE, "gate-1/2", None),
            ],
        )

    def test_registry(self):
        """
        L{PresenceRegistry} provides L{ISessionRegistry} and passes every
        call to the registry it wraps.
        """
        inner = MemorySessionRegistry(maxDevices=1)
        registry = PresenceRegistry(inner, self.notifier())
        verifyObject(ISessionRegistry, registry)
        alice = FakeSession("alice", "phone", 1)
        self.successResultOf(registry.register(alice))
        self.assertEqual(self.successResultOf(registry.sessionsFor("alice")), [alice])
        self.assertEqual(self.successResultOf(registry.count()), 1)
        self.assertEqual(
            self.successResultOf(registry.sessionsForMany(["alice"])), {"alice": [alice]}
        )
        self.assertEqual(registry.maxDevices, 1)
        self.failureResultOf(registry.register(FakeSession("alice", "laptop", 2)))
        self.assertEqual(len(self.events()), 1)

    def test_gateOfSession(self):
        """
        A session id's gate is what precedes its last C{/}.
        """
        self.assertEqual(gateOfSession("host.example:42/17"), "host.example:42")
        self.assertEqual(gateOfSession("a/b/3"), "a/b")


class SigningTests(SynchronousTestCase):
    """
    The signature, computed as docs/api.md says.
    """

    def test_independent(self):
        """
        L{sign} is C{v1=} and the hex HMAC-SHA256 of the timestamp, a full
        stop and the body, as C{hmac} computes it.
        """
        body = b'{"id":"evt_1","type":"user.online"}'
        expected = hmac.new(SECRET, b"1767225600." + body, hashlib.sha256).hexdigest()
        self.assertEqual(sign(SECRET, 1767225600, body), "v1=" + expected)

    def test_verify(self):
        """
        L{verify} accepts the signature within the replay window and
        refuses a changed body, a wrong secret, a stale or future
        timestamp and garbage.
        """
        body = b"{}"
        signature = sign(SECRET, 1000, body)
        self.assertTrue(verify(SECRET, b"1000", signature.encode("ascii"), body, 1000))
        self.assertTrue(verify(SECRET, "1000", signature, body, 1000 + REPLAY_WINDOW))
        self.assertFalse(verify(SECRET, "1000", signature, body, 1001 + REPLAY_WINDOW))
        self.assertFalse(verify(SECRET, "1000", signature, body, 999 - REPLAY_WINDOW))
        self.assertFalse(verify(SECRET, "1000", signature, b"{ }", 1000))
        self.assertFalse(verify(SECRET[1:], "1000", signature, body, 1000))
        self.assertFalse(verify(SECRET, "1e3", signature, body, 1000))
        self.assertFalse(verify(SECRET, "1000", "v1=zz", body, 1000))


def _checkEvents(testCase, received, secret):
    """
    Assert that every request in C{received} was signed, and its headers
    agree with its body.
    """
    for r in received:
        testCase.assertTrue(r.signed, r.headers)
        testCase.assertEqual(r.headers[b"x-im-event-id"].decode(), r.event["id"])
        testCase.assertEqual(r.headers[b"x-im-event-type"].decode(), r.event["type"])
        testCase.assertEqual(r.headers[b"content-type"], b"application/json")
        testCase.assertEqual(
            r.headers[b"x-im-signature"],
            b"v1="
            + hmac.new(secret, r.headers[b"x-im-timestamp"] + b"." + r.body, hashlib.sha256)
            .hexdigest()
            .encode(),
        )


def _entry(n=1, key="alice", type=ev.USER_ONLINE):
    """
    An outbox entry, as the store would hand it over.
    """
    return ev.OutboxEntry(
        n,
        "evt_test_{}".format(n),
        type,
        key,
        1767225600000,
        json.dumps({"uid": key, "n": n}).encode("utf-8"),
    )


class PosterTests(TestCase):
    """
    L{HTTPPoster} against a real receiver on loopback.
    """

    timeout = 20

    @inlineCallbacks
    def poster(self, behaviour=None, certificate=None, trust=None, timeout=5.0):
        """
        Start a receiver and make a poster to it, closed at cleanup.

        @return: a L{Deferred} firing with C{(poster, receiver)}.
        """
        receiver = WebhookReceiver(SECRET, behaviour)
        yield receiver.start(self, certificate=certificate)
        poster = HTTPPoster(reactor, receiver.url.encode("ascii"), SECRET, timeout, 4, trust)
        self.addCleanup(poster.close)
        return poster, receiver

    @inlineCallbacks
    def test_signed(self):
        """
        An event is POSTed as its envelope, with its id and type, the time
        and the signature (checked here from the documented recipe) in the
        headers; the answer's status comes back.
        """
        poster, receiver = yield self.poster()
        before = int(time.time())
        answer = yield poster.post(_entry())
        self.assertEqual(answer, Answer(200, None))
        [received] = receiver.received
        _checkEvents(self, [received], SECRET)
        self.assertEqual(received.body, ev.envelope(_entry()))
        self.assertEqual(
            received.event,
            {
                "id": "evt_test_1",
                "type": "user.online",
                "created_ms": 1767225600000,
                "data": {"uid": "alice", "n": 1},
            },
        )
        self.assertTrue(before <= int(received.headers[b"x-im-timestamp"]) <= time.time())
        self.assertTrue(received.headers[b"user-agent"].startswith(b"imserver/"))

    @inlineCallbacks
    def test_persistent(self):
        """
        Requests one after another share one connection.
        """
        poster, receiver = yield self.poster()
        for n in range(3):
            yield poster.post(_entry(n))
        self.assertEqual((len(receiver.received), receiver.connections), (3, 1))

    @inlineCallbacks
    def test_status(self):
        """
        Any status is handed back as it is (the sender decides).
        """
        statuses = iter([503, 404, 204])
        poster, receiver = yield self.poster(lambda r: next(statuses))
        answers = []
        for n in range(3):
            answers.append((yield poster.post(_entry(n))).status)
        self.assertEqual(answers, [503, 404, 204])

    @inlineCallbacks
    def test_timeout(self):
        """
        A receiver that does not answer within the timeout: the attempt
        fails with L{TimeoutError}, reason C{timeout}.
        """
        poster, receiver = yield self.poster(lambda r: HANG, timeout=0.2)
        failure = yield self.assertFailure(poster.post(_entry()), TimeoutError)
        self.assertEqual(failureReason(Failure(failure)), "timeout")

    @inlineCallbacks
    def test_slowBody(self):
        """
        An answer slower than the timeout fails too.
        """
        poster, receiver = yield self.poster(lambda r: slow(0.5), timeout=0.2)
        yield self.assertFailure(poster.post(_entry()), TimeoutError)

    @inlineCallbacks
    def test_closed(self):
        """
        A receiver that closes the connection without answering: reason
        C{connection}.
        """
        poster, receiver = yield self.poster(lambda r: CLOSE)
        try:
            yield poster.post(_entry())
        except Exception:
            reason = failureReason(Failure())
        else:
            self.fail("the post succeeded")
        self.assertEqual(reason, "connection")

    @inlineCallbacks
    def test_refused(self):
        """
        Nothing listening: reason C{connection}.
        """
        from tests.support import freePort

        poster = HTTPPoster(
            reactor,
            "http://127.0.0.1:{}/hook".format(freePort()).encode("ascii"),
            SECRET,
            5.0,
            1,
        )
        self.addCleanup(poster.close)
        try:
            yield poster.post(_entry())
        except Exception:
            reason = failureReason(Failure())
        else:
            self.fail("the post succeeded")
        self.assertEqual(reason, "connection")

    @inlineCallbacks
    def test_httpsVerified(self):
        """
        An https:// receiver whose certificate C{--webhook-ca} trusts gets
        the event; one signed by no trusted CA fails, reason C{tls}.
        """
        from imserver.tls import makeSelfSigned

        certificate = makeSelfSigned()
        caFile = FilePath(self.mktemp())
        caFile.setContent(certificate[0])
        poster, receiver = yield self.poster(
            certificate=certificate, trust=trustRootFor(caFile.path)
        )
        answer = yield poster.post(_entry())
        self.assertEqual(answer.status, 200)
        other = FilePath(self.mktemp())
        other.setContent(makeSelfSigned()[0])
        untrusting = HTTPPoster(
            reactor, receiver.url.encode("ascii"), SECRET, 5.0, 1, trustRootFor(other.path)
        )
        self.addCleanup(untrusting.close)
        try:
            yield untrusting.post(_entry())
        except Exception:
            reason = failureReason(Failure())
        else:
            self.fail("the post succeeded")
        self.assertEqual(reason, "tls")
        self.assertEqual(len(receiver.received), 1)

    def test_retryAfter(self):
        """
        C{Retry-After} in seconds is read; a date or garbage is not.
        """
        from twisted.web.http_headers import Headers

        from imserver.webhooks.http import _retryAfter

        self.assertEqual(_retryAfter(Headers({b"Retry-After": [b"120"]})), 120.0)
        self.assertIsNone(
            _retryAfter(Headers({b"Retry-After": [b"Wed, 21 Oct 2015 07:28:00 GMT"]}))
        )
        self.assertIsNone(_retryAfter(Headers()))


#: Settings of the gates of the live tests: quick polls, retries and
#: coalescing.
LIVE_ARGS = [
    "--presence-flap-window",
    "0.3",
    "--webhook-poll-interval",
    "0.05",
    "--webhook-retry-initial",
    "0.05",
    "--webhook-retry-max",
    "0.5",
    "--webhook-timeout",
    "2",
]


def byType(events, eventType):
    """
    The events of C{eventType}, in order.
    """
    return [e for e in events if e["type"] == eventType]


class EndToEndTests(LiveApiTestCase):
    """
    The real service tree (SQLite store, HTTP API, plain TCP listener) in
    this process, sending webhooks to a receiver on loopback; clients are
    the real IM client, groups are made through the HTTP API.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        """
        Start the receiver, then the gate (SQLite store) sending webhooks to it.
        """
        self.secretFile = FilePath(self.mktemp())
        createSecretFile(self.secretFile)
        self.receiver = WebhookReceiver(self.secretFile.getContent().strip())
        yield self.receiver.start(self)
        self.extraArgs = [
            "--store",
            "sqlite",
            "--webhook",
            self.receiver.url,
            "--webhook-secret-file",
            self.secretFile.path,
        ] + LIVE_ARGS
        yield LiveApiTestCase.setUp(self)

    def delivered(self, predicate, what):
        """
        @return: a L{Deferred} firing once C{predicate(events)} holds for
            the events answered 2xx (each id once), with those events.
        """
        d = self.receiver.until(lambda: predicate(self.receiver.firstReceipts()), 20, what)
        return d.addCallback(lambda _: self.receiver.firstReceipts())

    @inlineCallbacks
    def test_everyEvent(self):
        """
        Each event type arrives signed, in its documented form: a session's
        online and offline (closed, kicked), a message sent by a client and
        one pushed by the API, a group's creation, members added and
        removed, and deletion.  A user's events are in order.
        """
        alice, _ = yield self.connectClient("alice", "laptop", platform=pb.IOS)
        bob, _ = yield self.connectClient("bob", "phone")
        sent = yield alice.send("bob", b"hi bob", clientMsgId="m-1")
        group = {"group_id": "g1", "name": "G", "owner": "alice"}
        yield self.ok("POST", "/v1/groups", group, status=201)
        yield self.ok("POST", "/v1/groups/g1/members", {"members": [{"uid": "bob"}]})
        yield self.ok("DELETE", "/v1/groups/g1/members/bob")
        yield self.ok("DELETE", "/v1/groups/g1")
        yield self.push({"to": "bob", "text": "from the backend"})
        yield alice.close()
        yield self.ok("POST", "/v1/users/bob/kick", {})

        def complete(events):
            return len(byType(events, ev.USER_OFFLINE)) == 2 and len(events) >= 10

        events = yield self.delivered(complete, "every event delivered")
        _checkEvents(self, [r for r in self.receiver.received if r.ok], self.receiver.secret)
        self.assertEqual(
            [(e["type"], e["data"].get("uid")) for e in events if e["type"].startswith("user.")],
            [
                ("user.online", "alice"),
                ("user.online", "bob"),
                ("user.offline", "alice"),
                ("user.offline", "bob"),
            ],
        )
        onlines = byType(events, ev.USER_ONLINE)
        self.assertEqual(
            onlines[0]["data"],
            {
                "uid": "alice",
                "device_id": "laptop",
                "platform": "ios",
                "gate_id": "gate-1",
                "session_id": alice.session.session_id,
            },
        )
        offlines = byType(events, ev.USER_OFFLINE)
        self.assertEqual(
            [(e["data"]["session_id"], e["data"]["reason"]) for e in offlines],
            [(alice.session.session_id, "closed"), (bob.session.session_id, "kicked")],
        )
        [stored, pushed] = byType(events, ev.MESSAGE_STORED)
        self.assertEqual(
            stored["data"],
            {
                "message_id": str(sent.message_id),
                "client_msg_id": "m-1",
                "sender": "alice",
                "to": "bob",
                "body": base64.b64encode(b"hi bob").decode("ascii"),
                "content_type": "",
                "created_ms": stored["data"]["created_ms"],
                "recipients": ["bob"],
            },
        )
        self.assertEqual((pushed["data"]["sender"], pushed["data"]["recipients"]), ("", ["bob"]))
        self.assertEqual(
            [(e["data"]["change"], e["data"]["uids"]) for e in byType(events, ev.GROUP_CHANGED)],
            [
                ("created", ["alice"]),
                ("members_added", ["bob"]),
                ("members_removed", ["bob"]),
                ("deleted", []),
            ],
        )
        # alice's events (her key) in the order they happened.
        self.assertEqual(
            [e["type"] for e in events if e["data"].get("uid", e["data"].get("sender")) == "alice"],
            ["user.online", "message.stored", "user.offline"],
        )
        for e in events:
            self.assertLessEqual(e["created_ms"], time.time() * 1000)

    @inlineCallbacks
    def test_receiverDownThenBack(self):
        """
        While the receiver is down (nothing listening) the events wait;
        once it is back they all arrive, each user's in order.
        """
        yield self.receiver.stop()
        port = self.receiver.port
        clients = {}
        for uid in ("alice", "bob", "carol"):
            clients[uid], _ = yield self.connectClient(uid)
        sent = {uid: [] for uid in clients}
        for n in range(10):
            for uid, client in clients.items():
                response = yield client.send("dave", b"x", clientMsgId="{}-{}".format(uid, n))
                sent[uid].append(response.message_id)
        yield deferLater(reactor, 0.5, lambda: None)
        failures = self.root.getServiceNamed("webhooks").sender.metrics.failures
        self.assertGreater(failures["connection"], 0)
        yield self.receiver.start(self, port)

        def complete(events):
            return len(byType(events, ev.MESSAGE_STORED)) == 30

        events = yield self.delivered(complete, "every message.stored delivered")
        for uid, ids in sent.items():
            self.assertEqual(
                [
                    int(e["data"]["message_id"])
                    for e in byType(events, ev.MESSAGE_STORED)
                    if e["data"]["sender"] == uid
                ],
                ids,
            )

    @inlineCallbacks
    def test_orderUnderFailures(self):
        """
        With a receiver that fails a third of the requests (5xx, timeouts,
        closed connections, slow answers the sender gave up on), every
        message arrives, and each sender's messages arrive first in the
        order they were stored, while several senders are in flight.
        """
        rng = random.Random(7)

        def flaky(received):
            draw = rng.random()
            if draw < 0.1:
                return 503
            if draw < 0.15:
                return CLOSE
            if draw < 0.2:
                return 404
            if draw < 0.25:
                return slow(2.5)  # beyond --webhook-timeout: sent again
            if draw < 0.3:
                return slow(0.2)
            return 200

        self.receiver.behaviour = flaky
        users = ["user{}".format(i) for i in range(6)]
        clients = {}
        for uid in users:
            clients[uid], _ = yield self.connectClient(uid)
        responses = yield gatherResults(
            [
                clients[uid].send(users[(i + 1) % 6], b"m", clientMsgId="{}-{}".format(uid, n))
                for n in range(15)
                for i, uid in enumerate(users)
            ]
        )
        self.assertEqual(len(responses), 90)

        def complete(events):
            return len(byType(events, ev.MESSAGE_STORED)) == 90

        events = yield self.delivered(complete, "every message.stored delivered")
        for uid in users:
            ids = [
                int(e["data"]["message_id"])
                for e in byType(events, ev.MESSAGE_STORED)
                if e["data"]["sender"] == uid
            ]
            self.assertEqual(ids, sorted(ids))
            self.assertEqual(len(ids), 15)
        answers = {r.answer for r in self.receiver.received}
        self.assertTrue({503, 404, CLOSE} <= answers, answers)
        self.assertGreater(len(self.receiver.delivered()), len(events) - 1)


class OptionsTests(SynchronousTestCase):
    """
    The C{--webhook} options and the service tree they make.
    """

    def setUp(self):
        """
        No secret from the environment; a data directory.
        """
        withoutSecretEnvironment(self)
        self.dataDir = FilePath(self.mktemp())

    def parse(self, *args):
        """
        Parse C{args} after a data directory, a listener and the memory store.
        """
        options = tap.Options()
        options.parseOptions(
            ["--data-dir", self.dataDir.path, "--listen", "tcp:0", "--store", "memory"] + list(args)
        )
        return options

    def test_off(self):
        """
        Without C{--webhook} there is no webhook service, the store records
        no event and the sessions' registry is the plain one.
        """
        root = tap.makeService(self.parse(), MemoryReactorClock())
        self.assertNotIn("webhooks", [s.name for s in root])
        self.assertEqual(root.getServiceNamed("gate").factory.store.outboxEvents, frozenset())
        self.assertIsInstance(root.getServiceNamed("gate").factory.registry, MemorySessionRegistry)
        self.assertFalse(self.dataDir.child("webhook-secret").exists())

    def test_on(self):
        """
        With C{--webhook} the webhook service runs after the store and
        before the gate; the store records the in-transaction events of
        C{--webhook-events}, up to C{--outbox-max-events}; the secret is
        generated (mode 0600) into the data directory.
        """
        options = self.parse(
            "--webhook",
            "https://backend.example/hooks?x=1",
            "--webhook-events",
            "user.online, message.stored",
            "--outbox-max-events",
            "500",
        )
        root = tap.makeService(options, MemoryReactorClock())
        names = [s.name for s in root]
        self.assertLess(names.index("webhooks"), names.index("gate"))
        store = root.getServiceNamed("gate").factory.store
        self.assertEqual(store.outboxEvents, frozenset([ev.MESSAGE_STORED]))
        self.assertEqual(store.outboxLimit, 500)
        service = root.getServiceNamed("webhooks")
        self.assertEqual(service.notifier.eventTypes, frozenset([ev.USER_ONLINE]))
        self.assertEqual(service.notifier.ledger, EMBEDDED_LEDGER)
        self.assertIsInstance(root.getServiceNamed("gate").factory.registry, PresenceRegistry)
        secret = self.dataDir.child("webhook-secret")
        self.assertEqual(stat.S_IMODE(os.stat(secret.path).st_mode), 0o600)
        self.assertEqual(len(secret.getContent().strip()), 64)

    def test_storeStoppedAfter(self):
        """
        In the SQLite set-up the webhook service is started after the store
        and stopped before it, after the gate.
        """
        options = tap.Options()
        options.parseOptions(
            ["--data-dir", self.dataDir.path, "--listen", "tcp:0", "--webhook", "http://h/"]
        )
        root = tap.makeService(options, MemoryReactorClock())
        names = [s.name for s in root]
        self.assertEqual(names.index("webhooks"), names.index("store") + 1)
        self.assertLess(names.index("webhooks"), names.index("gate"))

    def test_noPresence(self):
        """
        Without presence events nothing wraps the registry.
        """
        root = tap.makeService(
            self.parse("--webhook", "http://h/", "--webhook-events", "group.changed"),
            MemoryReactorClock(),
        )
        self.assertIsNone(root.getServiceNamed("webhooks").notifier)
        self.assertIsInstance(root.getServiceNamed("gate").factory.registry, MemorySessionRegistry)

    def test_secretFile(self):
        """
        C{--webhook-secret-file} is used instead of the data directory's;
        one that is missing or too short is refused.
        """
        secretFile = FilePath(self.mktemp())
        secretFile.setContent(b"x" * 20 + b"\n")
        options = self.parse("--webhook", "http://h/", "--webhook-secret-file", secretFile.path)
        tap.makeService(options, MemoryReactorClock())
        self.assertFalse(self.dataDir.child("webhook-secret").exists())
        secretFile.setContent(b"short")
        self.assertRaises(
            UsageError,
            self.parse,
            "--webhook",
            "http://h/",
            "--webhook-secret-file",
            secretFile.path,
        )
        self.assertRaises(
            UsageError,
            self.parse,
            "--webhook",
            "http://h/",
            "--webhook-secret-file",
            self.mktemp(),
        )

    def test_badOptions(self):
        """
        A URL that is not http(s), holds credentials or has no host, an
        unknown event type, and the other C{--webhook-*} options without
        C{--webhook} are usage errors naming the option.
        """
        for args, option in [
            (["--webhook", "ftp://h/"], "--webhook"),
            (["--webhook", "http://user:pw@h/"], "--webhook"),
            (["--webhook", "http:///x"], "--webhook"),
            (["--webhook", "h:80"], "--webhook"),
            (
                ["--webhook", "http://h/", "--webhook-events", "user.online,typing"],
                "--webhook-events",
            ),
            (["--webhook", "http://h/", "--webhook-events", ","], "--webhook-events"),
            (["--webhook-events", "user.online"], "--webhook-events"),
            (["--webhook-ca", "ca.pem"], "--webhook-ca"),
            (["--webhook", "http://h/", "--webhook-ca", "ca.pem"], "--webhook-ca"),
            (["--webhook-retry-initial", "10", "--webhook-retry-max", "5"], "--webhook-retry"),
        ]:
            e = self.assertRaises(UsageError, self.parse, *args)
            self.assertIn(option, str(e), args)
        self.assertNotIn(
            "pw", str(self.assertRaises(UsageError, self.parse, "--webhook", "http://user:pw@h/"))
        )

    def test_webhookCA(self):
        """
        C{--webhook-ca} must be a readable PEM certificate.
        """
        from imserver.tls import makeSelfSigned

        caFile = FilePath(self.mktemp())
        caFile.setContent(b"not a certificate")
        self.assertRaises(
            UsageError, self.parse, "--webhook", "https://h/", "--webhook-ca", caFile.path
        )
        caFile.setContent(makeSelfSigned()[0])
        options = self.parse("--webhook", "https://h/", "--webhook-ca", caFile.path)
        tap.makeService(options, MemoryReactorClock())

    def test_notLoaded(self):
        """
        A gate without C{--webhook} does not import the sender, the HTTP
        client side or the presence notifier.
        """
        import subprocess
        import sys

        code = (
            "import sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from imserver import tap\n"
            "o = tap.Options()\n"
            "o.parseOptions(['--data-dir', sys.argv[1], '--store', 'memory',"
            " '--listen', 'tcp:0', '--api', 'none'])\n"
            "tap.makeService(o, MemoryReactorClock())\n"
            "print(sorted(m for m in sys.modules if m.startswith('imserver.webhooks.')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.mktemp()], check=True, capture_output=True, text=True
        ).stdout
        self.assertEqual(out.strip(), "['imserver.webhooks.events', 'imserver.webhooks.service']")

    def test_parseEvents(self):
        """
        The default is every event type; a list is trimmed.
        """
        self.assertEqual(parseEvents(None), frozenset(ev.EVENT_TYPES))
        self.assertEqual(
            parseEvents(" user.offline ,group.changed"),
            frozenset([ev.USER_OFFLINE, ev.GROUP_CHANGED]),
        )


#: Messages sent in L{CrashTests} (C{$IMSERVER_CRASH_MESSAGES} for more).
CRASH_MESSAGES = max(2000, int(os.environ.get("IMSERVER_CRASH_MESSAGES") or 0))
#: When the gate is killed (SIGKILL) and restarted, as fractions of the
#: messages acknowledged.
CRASH_KILL_AT = (1.0 / 3, 2.0 / 3)


class CrashTests(TestCase):
    """
    The Jepsen-style check of the webhooks: a C{twistd im} gate process on
    SQLite, sending webhooks to a receiver in this process that fails a
    tenth of the requests, is killed with C{kill -9} and restarted while
    clients send messages (and lose their sockets now and then).
    """

    timeout = 240

    @inlineCallbacks
    def test_kill9(self):
        """
        Every message the gate acknowledged to its sender has a
        C{message.stored} event received (at least once); each sender's
        first receipts are in the order its messages were stored; every
        C{user.online} has a C{user.offline} for its session, those of the
        killed runs with the reason C{gate_restarted}; every request was
        signed; the gate logged no traceback.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint

        from tests.support.live import withDeadline
        from tests.support.twistd import (
            HEARTBEAT_INTERVAL,
            IDLE_TIMEOUT,
            Gate,
            loggedTracebacks,
            newSecretFile,
        )
        from tests.test_crash import USERS, History, Workload, _seed

        started = time.monotonic()
        seed = _seed()
        rng = random.Random(seed)
        failures = random.Random(seed + 1)
        secretFile = newSecretFile(self)
        receiver = WebhookReceiver(
            secretFile.getContent().strip(),
            lambda received: 503 if failures.random() < 0.1 else 200,
        )
        yield receiver.start(self)
        dataDir = FilePath(self.mktemp())
        dataDir.makedirs()
        gate = Gate(
            dataDir,
            [
                "--store",
                "sqlite",
                "--heartbeat-interval",
                str(HEARTBEAT_INTERVAL),
                "--idle-timeout",
                str(IDLE_TIMEOUT),
                "--webhook",
                receiver.url,
                "--webhook-secret-file",
                secretFile.path,
            ]
            + LIVE_ARGS,
        )
        self.addCleanup(gate.stop)
        users = ["user{}".format(i) for i in range(USERS)]
        history = History(users)
        workload = Workload(
            history, rng, users, CRASH_MESSAGES, [(at, "gate", gate.crash) for at in CRASH_KILL_AT]
        )
        self.addCleanup(workload.stop)
        port = yield gate.start()
        workload.connect(
            gate.secret(), lambda i: TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        )
        yield withDeadline(workload.run(), 180, "every send acknowledged")
        yield workload.stop()

        acked = {
            sent.response.message_id: sent
            for sent in history.sends.values()
            if sent.response is not None
        }

        def state():
            events = receiver.firstReceipts()
            stored = [e for e in events if e["type"] == ev.MESSAGE_STORED]
            onlines = {e["data"]["session_id"] for e in events if e["type"] == ev.USER_ONLINE}
            offlines = {e["data"]["session_id"] for e in events if e["type"] == ev.USER_OFFLINE}
            return events, stored, onlines, offlines

        def complete():
            _, stored, onlines, offlines = state()
            return set(acked) <= {int(e["data"]["message_id"]) for e in stored} and (
                onlines == offlines
            )

        try:
            yield receiver.until(complete, 60, "every event delivered")
        finally:
            yield gate.stop()
        events, stored, onlines, offlines = state()
        storedIds = [int(e["data"]["message_id"]) for e in stored]
        reasons = [e["data"]["reason"] for e in events if e["type"] == ev.USER_OFFLINE]
        print(
            "\nwebhook crash test: acked={} message.stored={} (requests {}, answered 2xx {})"
            " sessions={} offline reasons={} kills={} seconds={:.1f} seed={}".format(
                len(acked),
                len(stored),
                len(receiver.received),
                len(receiver.delivered()),
                len(onlines),
                {r: reasons.count(r) for r in sorted(set(reasons))},
                gate.kills,
                time.monotonic() - started,
                seed,
            )
        )
        self.assertEqual(gate.kills, len(CRASH_KILL_AT))
        self.assertEqual(len(acked), CRASH_MESSAGES)
        self.assertEqual(sorted(storedIds), sorted(acked))
        for uid in users:
            ids = [int(e["data"]["message_id"]) for e in stored if e["data"]["sender"] == uid]
            self.assertEqual(ids, sorted(ids), "the messages of {} out of order".format(uid))
        for e in stored:
            sent = acked[int(e["data"]["message_id"])]
            self.assertEqual(
                (e["data"]["sender"], e["data"]["to"], e["data"]["client_msg_id"]),
                (sent.sender, sent.to, sent.clientMsgId),
            )
            self.assertEqual(base64.b64decode(e["data"]["body"]), sent.body)
        self.assertEqual(onlines, offlines)
        self.assertIn("gate_restarted", reasons)
        self.assertTrue(all(r.signed for r in receiver.received))
        self.assertGreater(len(receiver.received), len(receiver.delivered()))
        self.assertEqual(loggedTracebacks(gate.output()), [])


DOCS = FilePath(__file__).parent().parent().child("docs")
_FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def webhooksSection():
    """
    The "Webhooks" section of docs/api.md, its subsections included.
    """
    text = DOCS.child("api.md").getContent().decode("utf-8")
    start = text.index("\n## Webhooks\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def documentedExamples():
    """
    The bodies docs/api.md and docs/openapi.yaml show, in their order, made
    by the code: a user.online, a message.stored, a group.changed and a
    user.offline, ids 41 to 44 of the store C{9f86d081884c7d65}.
    """
    made = [
        (
            ev.userOnline("alice", "phone", pb.IOS, "gate-1", "gate-1/17"),
            1767225600123,
        ),
        (
            ev.messageStored(
                pb.Message(
                    id=1001,
                    sender="alice",
                    recipient="bob",
                    client_msg_id="5b0c7d1e",
                    body=b"hello bob",
                    content_type="text/plain",
                    created_ms=1767225601200,
                ),
                ["bob", "alice"],
            ),
            1767225601207,
        ),
        (ev.groupChanged("team", ev.MEMBERS_ADDED, ["bob", "carol"]), 1767225660310),
        (ev.userOffline("alice", "phone", "gate-1", "gate-1/17", "closed"), 1767225930456),
    ]
    return [
        ev.envelope(
            ev.OutboxEntry(n, ev.eventId("9f86d081884c7d65", n), e.type, e.key, createdMs, e.data)
        )
        for n, (e, createdMs) in enumerate(made, 41)
    ]


class DocumentationTests(SynchronousTestCase):
    """
    docs/api.md and docs/openapi.yaml say what the code does: the example
    bodies, the signature's test vector, the receiver example, the
    metrics.
    """

    def setUp(self):
        """
        The Webhooks section of docs/api.md.
        """
        self.section = webhooksSection()

    def blocks(self, language):
        """
        The fenced blocks of C{language} in the Webhooks section.
        """
        return [body for lang, body in _FENCED.findall(self.section) if lang == language]

    def test_examples(self):
        """
        The JSON examples are the code's bodies, byte for byte.
        """
        self.assertEqual(
            [b.strip().encode("utf-8") for b in self.blocks("json")], documentedExamples()
        )

    def test_eventTypes(self):
        """
        The section has a subsection per event type, and the first table
        names every type.
        """
        for eventType in ev.EVENT_TYPES:
            self.assertIn("#### `{}`".format(eventType), self.section)
            self.assertIn("| `{}` |".format(eventType), self.section)

    def test_testVector(self):
        """
        The test vector's signature is the code's and the documented
        recipe's, over the first example.
        """
        [vector] = [b for b in self.blocks("text") if b.startswith("secret")]
        fields = dict(line.split(None, 1) for line in vector.strip().splitlines())
        secret = fields["secret"].encode("ascii")
        timestamp = fields["timestamp"].encode("ascii")
        body = fields["body"].encode("utf-8")
        self.assertEqual(body, documentedExamples()[0])
        self.assertEqual(fields["signature"], sign(secret, int(timestamp), body))
        mac = hmac.new(secret, timestamp + b"." + body, hashlib.sha256).hexdigest()
        self.assertEqual(fields["signature"], "v1=" + mac)
        self.assertIn("**5 minutes** (300 s)", self.section)
        self.assertEqual(REPLAY_WINDOW, 300)

    def test_receiverExample(self):
        """
        The receiver example accepts the test vector, and refuses it with
        another body or once the replay window has passed.
        """
        [code] = self.blocks("python")
        [vector] = [b for b in self.blocks("text") if b.startswith("secret")]
        fields = dict(line.split(None, 1) for line in vector.strip().splitlines())
        namespace = {}
        exec(code, namespace)
        verified = namespace["verified"]
        now = [int(fields["timestamp"]) + 299]
        self.patch(namespace["time"], "time", lambda: now[0])
        headers = {"X-IM-Timestamp": fields["timestamp"], "X-IM-Signature": fields["signature"]}
        secret = fields["secret"].encode("ascii")
        body = fields["body"].encode("utf-8")
        self.assertTrue(verified(secret, headers, body))
        self.assertFalse(verified(secret, headers, body + b" "))
        now[0] += 2
        self.assertFalse(verified(secret, headers, body))

    def test_openapi(self):
        """
        docs/openapi.yaml has a webhook per event type, whose example is
        the code's.
        """
        import yaml

        document = yaml.safe_load(DOCS.child("openapi.yaml").getContent())
        self.assertEqual(sorted(document["webhooks"]), sorted(ev.EVENT_TYPES))
        examples = {json.loads(body)["type"]: json.loads(body) for body in documentedExamples()}
        for eventType, item in document["webhooks"].items():
            body = item["post"]["requestBody"]["content"]["application/json"]
            self.assertEqual(body["example"], examples[eventType])
            self.assertEqual(item["post"]["security"], [])

    def test_metrics(self):
        """
        Every webhook metric is in the table of C{GET /metrics}.
        """
        text = DOCS.child("api.md").getContent().decode("utf-8")
        registry = CollectorRegistry()
        WebhookMetrics(registry, Clock())
        names = {
            family.name + ("_total" if family.type == "counter" else "")
            for family in registry.collect()
        }
        self.assertEqual(len(names), 9)
        for name in names:
            self.assertRegex(text, r"\| `{}(\{{\w+\}})?` \|".format(name))

    def test_settingsAndOptions(self):
        """
        docs/configuration.md describes every C{--webhook} option and the
        webhook settings.
        """
        text = DOCS.child("configuration.md").getContent().decode("utf-8")
        for option in ["--webhook", "--webhook-events", "--webhook-secret-file", "--webhook-ca"]:
            self.assertRegex(text, r"\| `{}[=`]".format(option))
        self.assertIn("## Webhooks (`--webhook`)", text)


def _who(event):
    """
    The user an event is about: its uid, or its sender.
    """
    return event["data"].get("uid") or event["data"].get("sender")


class ClusterTests(RedisTestMixin, TestCase):
    """
    Two gates in this process sharing one C{redis-server} (cluster mode)
    and one webhook receiver: both record events in the shared outbox, one
    sends them, the other takes over when it stops.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self):
        """
        Start Redis, the receiver and two gates sharing both.
        """
        yield self.startRedis()
        self.secretFile = FilePath(self.mktemp())
        createSecretFile(self.secretFile)
        self.webhookSecretFile = FilePath(self.mktemp())
        createSecretFile(self.webhookSecretFile)
        self.receiver = WebhookReceiver(self.webhookSecretFile.getContent().strip())
        yield self.receiver.start(self)
        self.a = yield self.startGate("gate-a")
        self.b = yield self.startGate("gate-b")

    @inlineCallbacks
    def startGate(self, gateId):
        """
        Start a gate in cluster mode with webhooks; wait until it is ready.

        @return: its root service, with C{port}.
        """
        options = tap.Options()
        options.parseOptions(
            [
                "--data-dir",
                self.mktemp(),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--api",
                "none",
                "--gate-id",
                gateId,
                "--redis",
                self.server.url,
                "--secret-file",
                self.secretFile.path,
                "--webhook",
                self.receiver.url,
                "--webhook-secret-file",
                self.webhookSecretFile.path,
            ]
            + LIVE_ARGS
        )
        root = startServer(self, options)
        yield root.getServiceNamed("cluster").whenReady()
        [address] = yield root.getServiceNamed("gate").addresses()
        root.port = address.port
        return root

    @inlineCallbacks
    def connect(self, root, uid, deviceId="phone"):
        """
        Connect and authenticate a client to the gate of C{root}; closed at
        cleanup.

        @return: a L{Deferred} firing with the L{ClientProtocol}.
        """
        from imserver.auth import loadSecret, mintToken
        from imserver.client import connect

        secret = loadSecret(secretFile=self.secretFile, environ={})
        client = yield connect(
            reactor,
            "127.0.0.1",
            root.port,
            uid=uid,
            token=mintToken(secret, uid, 60, time.time()),
            deviceId=deviceId,
            tls=False,
        )
        self.addCleanup(client.close)
        return client

    def senders(self):
        """
        The webhook senders of gate A and gate B.
        """
        return [root.getServiceNamed("webhooks").sender for root in (self.a, self.b)]

    @inlineCallbacks
    def test_twoGates(self):
        """
        Events recorded by either gate are sent by the one holding the
        outbox, in order per user; a login of the same device on the other
        gate is reported offline (C{kicked}) by the first; when the sending
        gate stops, the other one takes over.
        """
        alice = yield self.connect(self.a, "alice")
        bob = yield self.connect(self.b, "bob")
        yield alice.send("bob", b"a to b", "m-1")
        yield bob.send("alice", b"b to a", "m-2")
        yield self.connect(self.b, "alice")
        yield alice.whenClosed()

        def delivered(test):
            return self.receiver.until(lambda: test(self.receiver.firstReceipts()), 20)

        yield delivered(lambda events: len(events) >= 6)
        events = self.receiver.firstReceipts()
        self.assertEqual(
            sorted((e["type"], _who(e), e["data"].get("reason")) for e in events),
            sorted(
                [
                    ("user.online", "alice", None),
                    ("user.online", "bob", None),
                    ("message.stored", "alice", None),
                    ("message.stored", "bob", None),
                    ("user.online", "alice", None),
                    ("user.offline", "alice", "kicked"),
                ]
            ),
        )
        [kicked] = byType(events, ev.USER_OFFLINE)
        self.assertEqual(
            (kicked["data"]["gate_id"], kicked["data"]["session_id"]),
            ("gate-a", alice.session.session_id),
        )
        holding = [sender.holding for sender in self.senders()]
        self.assertEqual(sorted(holding), [False, True])
        _checkEvents(self, [r for r in self.receiver.received if r.ok], self.receiver.secret)

        # The sending gate stops; the other takes the outbox over.
        holder = [self.a, self.b][holding.index(True)]
        other = [self.a, self.b][holding.index(False)]
        yield holder.stopService()
        yield self.connect(other, "carol")
        yield delivered(lambda events: any(e["data"].get("uid") == "carol" for e in events))
        self.assertTrue(other.getServiceNamed("webhooks").sender.holding)


#: The answers a property schedule gives: statuses, and failures without an
#: answer.
_CONNECTION_FAILED = "connection failed"
_TIMED_OUT = "timed out"
_ANSWERS = (500, 429, _CONNECTION_FAILED, _TIMED_OUT, 200)


class _TestOutbox:
    """
    The outbox of L{SenderPropertyTests}: the memory store, counting its
    reads; if C{maxDelay}, its reads and removals answer late, as a remote
    store's do: a read sees the outbox as it is when asked and answers
    after a random delay of up to C{maxDelay} seconds on C{clock}; a
    removal happens when it answers, after such a delay.

    @ivar reads: how many reads were asked for.
    """

    def __init__(self, store, clock, rng, maxDelay):
        self.store = store
        self.clock = clock
        self.random = rng
        self.maxDelay = maxDelay
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self.store, name)

    def _later(self, call):
        if not self.maxDelay:
            return call()
        d = Deferred()
        self.clock.callLater(self.random.uniform(0, self.maxDelay), lambda: call().chainDeferred(d))
        return d

    def pending(self, afterId, limit):
        self.reads += 1
        entries = self.store.pending(afterId, limit)
        return self._later(lambda: entries)

    def remove(self, ids):
        ids = list(ids)
        return self._later(lambda: self.store.remove(ids))


@st.composite
def _schedules(draw):
    """
    A random sender configuration and schedule of steps for
    L{SenderPropertyTests}: C{(config, steps)}.

    The steps: C{("record", [key, ...])} records one event per key listed
    (a key's events are numbered from 1 in recording order);
    C{("recordRuns", [(key, count), ...])} records runs of events of one
    key;
    C{("answer", status, key)} answers every open request (of C{key}, or
    all if L{None}); C{("answerByKey", {key: status})} answers every open
    request, those of the keys not listed 200; C{("answerOne", index,
    status)} answers one open request; C{("advance", seconds)};
    C{("wake",)}.  A status is one of L{_ANSWERS}; a 429 carries a
    C{Retry-After} of 3 s.
    """
    keyCount = draw(st.integers(3, 6), label="keys")
    keys = ["k{}".format(i) for i in range(keyCount)]
    config = dict(
        webhook_window=draw(st.integers(5, 50), label="window"),
        webhook_batch=draw(st.integers(1, 10), label="batch"),
        webhook_concurrency=draw(st.integers(1, 8), label="concurrency"),
        seed=draw(st.integers(0, 2**32 - 1), label="jitter seed"),
        storeDelay=draw(st.sampled_from([0, 0, 0.05, 0.5]), label="store delay"),
        sweeps=draw(st.booleans(), label="sweeps"),
    )
    # Mixes of events draw from some keys only: the others come in runs
    # (more than FAILING_KEY_HELD, up to beyond the window) with nothing of
    # theirs recorded for a while after.
    mixed = draw(st.lists(st.sampled_from(keys), min_size=1, unique=True), label="mixed keys")
    key = st.sampled_from(keys)
    answer = st.sampled_from(_ANSWERS)
    recordRuns = st.tuples(
        st.just("recordRuns"),
        st.lists(st.tuples(key, st.integers(1, 30)), min_size=1, max_size=3),
        st.booleans(),
    )
    recordMix = st.tuples(
        st.just("record"),
        st.lists(st.sampled_from(mixed), min_size=1, max_size=30),
        st.booleans(),
    )
    answerAll = st.tuples(st.just("answer"), answer, st.none() | key)
    answerByKey = st.tuples(st.just("answerByKey"), st.dictionaries(key, answer, min_size=1))
    answerOne = st.tuples(st.just("answerOne"), st.integers(0, 7), answer)
    advance = st.tuples(st.just("advance"), st.integers(50, 5000).map(lambda ms: ms / 1000))
    # Answers and advances more often than recordings, so the sender does
    # not fall ever further behind.
    step = st.one_of(
        recordRuns,
        recordMix,
        answerAll,
        answerAll,
        answerByKey,
        answerByKey,
        answerOne,
        advance,
        advance,
        st.just(("wake",)),
    )
    steps = draw(st.lists(step, min_size=20, max_size=60), label="steps")
    return config, steps


class SenderPropertyTests(SenderTestCase):
    """
    Random schedules of recordings, answers (2xx, 5xx, 429, failures
    without an answer) and clock advances, with random window, batch and
    concurrency, a store answering at once or late, with or without the
    sweep; then the receiver answers 200 until the outbox is empty.

    Every event is delivered at least once, and none is posted again once
    delivered (no restart here); per key, only the oldest undelivered event
    is ever posted, so first deliveries are in order; at most
    C{webhook_concurrency} requests are open at once; at most
    L{MAX_READS_PER_POLL} reads between two polls; the window and a
    failing key's share of it stay bounded; no event is forgotten; with a
    store answering at once, the drain is never idle long; nothing is left
    in the sender at the end.

    Deterministic (C{derandomize}): a failure shows the shrunk
    configuration and schedule, and a C{@reproduce_failure} blob.
    """

    #: The most rounds of "answer everything 200 until nothing is open,
    #: let 0.5 s pass" allowed to empty the outbox once the schedule is
    #: over, with a store that answers at once; a slow one gets more.
    DRAIN_ROUNDS = 2000
    #: The longest the sender may go without a request open while the
    #: outbox is not empty once every answer is 200, in seconds: the
    #: longest backoff (C{webhook_retry_max}, 8) and a few polls.
    IDLE_LIMIT = 20.0

    def _post(self, entry):
        """
        L{FakePoster.post}, checking first that every earlier event of the
        entry's key was delivered and that the concurrency holds.  The
        sender takes an exception from C{post} for a failed attempt, so
        what is wrong is noted in C{self.violations}, checked by the test.
        """
        key, n = data(entry)
        if (key, n) in self.delivered:
            self.violations.append(
                "posted {} {} at {} again after it was delivered".format(
                    key, n, self.clock.seconds()
                )
            )
        missing = [m for m in range(1, n) if (key, m) not in self.delivered]
        if missing:
            self.violations.append(
                "posted {} {} at {} before {} was delivered".format(
                    key, n, self.clock.seconds(), missing
                )
            )
        d = self.poster.post(entry)
        self.requests[d] = entry
        openCount = len(self.requests)
        if openCount > self.concurrency:
            self.violations.append(
                "{} requests open, concurrency {}".format(openCount, self.concurrency)
            )
        return d

    def _answer(self, requests, answer, retryAfter=None):
        """
        Answer C{requests} (C{(entry, Deferred)}) still open with
        C{answer}: a status, or a failure without one.  A first 2xx of an
        event is noted before the sender sees it.
        """
        for entry, d in requests:
            if self.requests.pop(d, None) is None:
                continue
            if retryAfter is None and answer == 429:
                retryAfter = 3
            if answer == _CONNECTION_FAILED:
                d.errback(Failure(error.ConnectionRefusedError()))
            elif answer == _TIMED_OUT:
                d.errback(Failure(TimeoutError()))
            else:
                if 200 <= answer < 300:
                    value = data(entry)
                    if value not in self.delivered:
                        self.delivered.add(value)
                        self.firstDeliveries.append(value)
                self.poster.answered.append((entry, answer))
                d.callback(Answer(answer, retryAfter))

    def _checkInvariants(self, sender, where):
        """
        Nothing wrong was posted or read (C{self.violations}); the window
        holds at most C{webhook_window} events, a failing key at most
        L{FAILING_KEY_HELD}; no event of the outbox is forgotten.
        """
        self.assertEqual(self.violations, [], where)
        self.assertLessEqual(len(sender._held), sender.window, where)
        for key in sender._failures:
            self.assertLessEqual(len(sender._queues.get(key, ())), FAILING_KEY_HELD, where)
        # Every event in the outbox will be sent without the sweep's help:
        # it is held or being removed, or after the cursor, or at or after
        # the id its key is to be read again from.  (This looks inside the
        # sender: it fails when an event is forgotten, not only later when
        # that shows as an event out of order or never delivered.)
        held, removing, cursor, behind = (
            sender._held,
            sender._removing,
            sender._cursor,
            sender._behind,
        )
        for entry in self.successResultOf(self.store.pending(0, 10**9)):
            if entry.id > cursor:
                break
            if (
                entry.id in held
                or entry.id in removing
                or behind.get(entry.key, entry.id + 1) <= entry.id
            ):
                continue
            self.fail("{}: {} {} (id {}) forgotten".format(where, *data(entry), entry.id))

    def _open(self):
        """
        The requests not answered yet, C{[(entry, Deferred)]} in the order
        posted.
        """
        return [(entry, d) for d, entry in self.requests.items()]

    def _outboxSize(self):
        return self.successResultOf(self.store.outboxStats())[0]

    def _elapse(self, seconds):
        """
        Let C{seconds} pass, running every call at its time, also those
        scheduled meanwhile (L{Clock.advance} runs those only at its end):
        a chain of slow reads goes on as it would in real time.
        """
        end = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(max(0, min(due) - self.clock.seconds()))
        self.clock.advance(max(0, end - self.clock.seconds()))

    def test_deliveredInOrder(self):
        """
        Every event is delivered, per key in recording order, within the
        concurrency, whatever the answers and their timing.
        """
        tick = WebhookSender._tick

        def countingTick(sender):
            # A poll: the reads since the previous one are bounded.
            if self.testOutbox.reads > MAX_READS_PER_POLL:
                self.violations.append("{} reads between two polls".format(self.testOutbox.reads))
            self.testOutbox.reads = 0
            return tick(sender)

        self.patch(WebhookSender, "_tick", countingTick)
        try:
            self._deliveredInOrder()
        except Exception as e:
            # Hypothesis adds the shrunk example to the exception's notes,
            # which trial does not show.
            notes = getattr(e, "__notes__", None)
            if not notes:
                raise
            raise self.failureException("{}\n\n{}".format(e, "\n".join(notes))) from e

    @hypothesisSettings(
        max_examples=200,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(_schedules())
    def _deliveredInOrder(self, schedule):
        """
        One example of L{test_deliveredInOrder}.
        """
        config, steps = schedule
        config = dict(config)
        seed = config.pop("seed")
        storeDelay = config.pop("storeDelay")
        sweeps = config.pop("sweeps")
        # A fresh harness per example (setUp runs once per test method).
        SenderTestCase.setUp(self)
        self.delivered = set()
        self.firstDeliveries = []
        self.violations = []
        self.requests = {}  # Deferred -> entry, of the open requests
        self.concurrency = config["webhook_concurrency"]
        self.testOutbox = outbox = _TestOutbox(
            self.store, self.clock, random.Random(seed + 1), storeDelay
        )
        sender = WebhookSender(
            outbox,
            self._post,
            self.clock,
            settings(**config),
            "gate-1",
            self.metrics,
            random.Random(seed),
        )
        sender.log = Logger(observer=self.logged.append)
        sweepInterval = senderModule.SWEEP_INTERVAL
        if not sweeps:
            # The memory store makes every event visible at once: the
            # sweep, a safety net for events made visible late, is never
            # needed to find one.
            senderModule.SWEEP_INTERVAL = float("inf")
        sender.start()
        try:
            recorded = {}
            for index, step in enumerate(steps):
                kind = step[0]
                if kind in ("record", "recordRuns"):
                    if kind == "record":
                        keys = step[1]
                    else:
                        keys = [key for key, count in step[1] for _ in range(count)]
                    events = []
                    for key in keys:
                        recorded[key] = recorded.get(key, 0) + 1
                        events.append(event(key, recorded[key]))
                    self.record(*events)
                    if step[2]:
                        sender.wake()
                        self.clock.advance(0)
                elif kind == "answer":
                    _, answer, key = step
                    requests = [(e, d) for e, d in self._open() if key in (None, e.key)]
                    self._answer(requests, answer)
                elif kind == "answerByKey":
                    for entry, d in self._open():
                        self._answer([(entry, d)], step[1].get(entry.key, 200))
                elif kind == "answerOne":
                    _, which, answer = step
                    requests = self._open()
                    if requests:
                        self._answer([requests[which % len(requests)]], answer)
                elif kind == "advance":
                    self._elapse(step[1])
                else:
                    sender.wake()
                    self.clock.advance(0)
                self._checkInvariants(sender, "step {}: {!r}".format(index, step))

            # Every answer is 200 from now on.  With a store that answers at
            # once, the sender is never idle long with events in the
            # outbox: the longest backoff, then polls, not the sweep.  (A
            # slow store may take that long to read the outbox: a key that
            # recovers is read again once the pass under way is over.)
            rounds = self.DRAIN_ROUNDS + int(8 * storeDelay * sum(recorded.values()))
            idleSince = self.clock.seconds()
            for _ in range(rounds):
                if not self._outboxSize() and not self._open():
                    break
                if self._open() or storeDelay:
                    idleSince = self.clock.seconds()
                self.assertLessEqual(
                    self.clock.seconds() - idleSince, self.IDLE_LIMIT, "idle while draining"
                )
                while self._open():
                    self._answer(self._open(), 200)
                self._elapse(0.5)
                self._checkInvariants(sender, "draining")
            self.assertEqual(self._outboxSize(), 0, "not drained")
            # Nothing is left behind in the sender either.
            self._elapse(2)
            self.assertEqual(
                (
                    sender._queues,
                    sender._held,
                    sender._inFlight,
                    sender._retries,
                    sender._failures,
                    sender._behind,
                ),
                ({}, set(), {}, {}, {}, {}),
            )

            expected = {(key, n) for key, count in recorded.items() for n in range(1, count + 1)}
            self.assertEqual(self.delivered, expected)
            for key, count in recorded.items():
                self.assertEqual(
                    [n for k, n in self.firstDeliveries if k == key],
                    list(range(1, count + 1)),
                    key,
                )
        finally:
            senderModule.SWEEP_INTERVAL = sweepInterval
            stopped = sender.stop()
            self._elapse(1)
            self.successResultOf(stopped)
