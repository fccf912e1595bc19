# -*- test-case-name: tests.test_webhooks -*-
"""
The webhook metrics of one gate, a collector registered in the gate's own
L{prometheus_client.CollectorRegistry} beside L{imserver.metrics.GateMetrics}
(so C{/metrics} serves both).  Like those, counting is adding to plain
attributes; the families are made when C{/metrics} is scraped.
"""

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from imserver.metrics import FastHistogram, labelled
from imserver.webhooks.events import EVENT_TYPES

#: Why an attempt failed (label values of
#: C{imserver_webhook_attempts_failed_total}).
FAILURE_REASONS = ("timeout", "connection", "tls", "http_5xx", "http_429", "http_4xx", "http_other")

#: Why events were dropped (C{imserver_webhook_events_dropped_total}).
DROP_REASONS = ("full", "expired")

#: From an event's recording to its delivery: up to a day.
_DELIVERY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
)


class WebhookMetrics:
    """
    The webhook counters, histogram and gauges of one gate.

    @ivar queued: C{{event type: count}} of the events read from the outbox
        into the sender's queue (each once per process, a retry is not
        counted again).
    @ivar deliveries: requests answered 2xx.
    @ivar failures: C{{reason: count}} of the attempts that failed.
    @ivar expired: events removed from the outbox by retention, undelivered.
    @ivar presenceDropped: presence events not written because the store
        refused the earlier ones for too long (counted as C{full}).
    @ivar coalesced: offline/online pairs not reported (a device back
        within C{presence_flap_window}).
    @ivar delivery: L{FastHistogram} of the seconds from an event's
        recording to its successful delivery.
    @ivar outboxEntries: the outbox's size at the last look.
    @ivar oldestMs: the C{createdMs} of its oldest entry then, or L{None}.
    """

    def __init__(self, registry: Any, clock: Any, dropped: Callable[[], int] = lambda: 0) -> None:
        """
        @param registry: the gate's L{prometheus_client.CollectorRegistry}
            (L{imserver.metrics.GateMetrics.registry}), or L{None} to
            register nowhere (tests).
        @param clock: an C{IReactorTime}: the oldest entry's age is
            computed at scrape time.
        @param dropped: returns how many events the store did not keep
            because the outbox was full (its C{outboxDropped}).
        """
        self.clock = clock
        self._dropped = dropped
        self.queued = dict.fromkeys(EVENT_TYPES, 0)
        self.deliveries = 0
        self.failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.expired = 0
        self.presenceDropped = 0
        self.coalesced = 0
        self.inFlight: Callable[[], int] = lambda: 0
        self.delivery = FastHistogram(
            "imserver_webhook_delivery_seconds",
            "From a webhook event's recording to its delivery (2xx).",
            _DELIVERY_BUCKETS,
        )
        self.outboxEntries = 0
        self.oldestMs: int | None = None
        if registry is not None:
            registry.register(self)

    def describe(self) -> list[Any]:
        return [
            CounterMetricFamily("imserver_webhook_deliveries", "Webhook events delivered (2xx).")
        ]

    def collect(self) -> Iterator[Any]:
        yield self.delivery.family()
        yield labelled(
            "imserver_webhook_events_queued",
            "Webhook events read from the outbox into the sender's queue, by type.",
            "type",
            self.queued,
        )
        yield CounterMetricFamily(
            "imserver_webhook_deliveries",
            "Webhook events delivered (answered 2xx).",
            value=self.deliveries,
        )
        yield labelled(
            "imserver_webhook_attempts_failed",
            "Webhook requests that failed and will be retried, by reason.",
            "reason",
            self.failures,
        )
        yield labelled(
            "imserver_webhook_events_dropped",
            "Webhook events never delivered: not kept (outbox full) or removed undelivered"
            " by --webhook-retention.",
            "reason",
            {"full": self._dropped() + self.presenceDropped, "expired": self.expired},
        )
        yield CounterMetricFamily(
            "imserver_webhook_presence_coalesced",
            "Offline/online pairs of one device not reported (back within --presence-flap-window).",
            value=self.coalesced,
        )
        yield GaugeMetricFamily(
            "imserver_webhook_outbox_events",
            "Events in the webhook outbox (recorded, not yet delivered).",
            value=self.outboxEntries,
        )
        oldest = 0.0
        if self.oldestMs is not None:
            oldest = max(0.0, self.clock.seconds() - self.oldestMs / 1000.0)
        yield GaugeMetricFamily(
            "imserver_webhook_oldest_pending_seconds",
            "Age of the oldest event in the webhook outbox (0 when empty).",
            value=oldest,
        )
        yield GaugeMetricFamily(
            "imserver_webhook_requests_in_flight",
            "Webhook requests sent and not answered yet.",
            value=self.inFlight(),
        )
