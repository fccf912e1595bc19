# -*- test-case-name: tests.test_metrics -*-
"""
IM-level Prometheus metrics of one gate process.

The hot paths (every frame, every push) only add to plain integer
attributes of L{GateMetrics}, and histograms are L{FastHistogram}s (a
bisect and two additions); they become Prometheus metrics when C{/metrics}
is scraped (L{GateMetrics.collect}), so counting costs no lock.
(C{prometheus_client}'s own C{Histogram.observe} takes a mutex per bucket
update: it cost 7 % of the gate's time in the p2p profile.)  Connection
gauges are computed at scrape time from the live connections.

Every gate has its own L{CollectorRegistry}, so tests and several gates in
one process never share counters.
"""

from bisect import bisect_left

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from imserver.beforesend import OUTCOMES as BEFORE_SEND_OUTCOMES
from imserver.pb import im_pb2 as pb

#: Auth failure reasons (label values of C{imserver_auth_failures_total}).
#: C{bad_token}: a refused v1 token or one of no known form;
#: C{token_too_long}: above C{--max-token-length}; C{jwt_*}: why a JWT was
#: refused (L{imserver.jwtauth.FAILURE_REASONS}).
AUTH_FAILURE_REASONS = (
    "bad_token",
    "bad_request",
    "too_many_devices",
    "timeout",
    "unavailable",
    "throttled",
    "token_too_long",
    "jwt_malformed",
    "jwt_algorithm",
    "jwt_unknown_key",
    "jwt_bad_signature",
    "jwt_expired",
    "jwt_not_yet_valid",
    "jwt_bad_claims",
)

#: Why a connection was refused at accept (label values).
REFUSAL_REASONS = ("max_connections", "max_connections_per_ip", "accept_rate")

#: Bounds (seconds) of the latency histograms: 0.5 ms to 10 s.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
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
)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)

#: (attribute, metric name, help) of the plain counters.
_COUNTERS = (
    ("framesReceived", "frames_received", "Frames read from clients."),
    ("framesSent", "frames_sent", "Frames written to clients."),
    ("bytesReceived", "bytes_received", "Bytes read from clients (after TLS)."),
    ("bytesSent", "bytes_sent", "Bytes written to clients (before TLS)."),
    (
        "messagesStored",
        "messages_stored",
        "Messages stored (sent by clients or pushed by the HTTP API), retries excluded.",
    ),
    ("messagesPushed", "messages_pushed", "Inbox entries pushed to sessions (message notifies)."),
    ("messagesAcked", "messages_acked", "Inbox entries acknowledged by sessions."),
    (
        "echoesSkipped",
        "echoes_skipped",
        "Own sends not pushed back to a no_echo session (its answer was its copy).",
    ),
    (
        "dedupHits",
        "dedup_hits",
        "Sends answered from the dedup record (a retry of a stored message).",
    ),
    ("idleCloses", "idle_closes", "Connections closed for the idle timeout."),
    ("rateLimited", "rate_limited", "Requests refused with RATE_LIMITED."),
    (
        "slowConsumerPauses",
        "slow_consumer_pauses",
        "Times a connection's full write buffer paused its pushes.",
    ),
    (
        "slowConsumerCloses",
        "slow_consumer_closes",
        "Connections closed with SLOW_CONSUMER (paused longer than the grace period).",
    ),
)


def labelled(name, help, label, counts, family=CounterMetricFamily):
    """
    A metric family with one label: a sample per C{(value, count)} of
    C{counts}.

    @param counts: a L{dict} (or iterable of pairs) of label value to count.
    @param family: L{CounterMetricFamily} or L{GaugeMetricFamily}.
    """
    metric = family(name, help, labels=[label])
    for value, count in counts.items() if isinstance(counts, dict) else counts:
        metric.add_metric([value], count)
    return metric


class FastHistogram:
    """
    A histogram updated without locks: observations come from one thread
    (the reactor's; L{GateMetrics.observeCommit}'s from the store's writer
    thread only).

    @ivar counts: observations per bucket (not cumulative), the last one
        for values above every bound.
    """

    __slots__ = ("name", "help", "bounds", "counts", "sum")

    def __init__(self, name, help, bounds):
        self.name = name
        self.help = help
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self):
        """
        @return: the cumulative C{(bound, count)} buckets, as
            C{HistogramMetricFamily} takes them.
        """
        buckets, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), list(self.counts)):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return buckets

    def family(self):
        """
        @return: the C{HistogramMetricFamily} (cumulative buckets).
        """
        return HistogramMetricFamily(
            self.name, self.help, buckets=self.buckets(), sum_value=self.sum
        )


class HistogramsByLabel:
    """
    One L{FastHistogram} per value of one label (made at its first
    observation), served as one family.

    @ivar histograms: C{{label value: FastHistogram}}.
    """

    def __init__(self, name, help, label, bounds):
        self.name = name
        self.help = help
        self.label = label
        self.bounds = tuple(bounds)
        self.histograms = {}

    def observe(self, value, seconds):
        histogram = self.histograms.get(value)
        if histogram is None:
            histogram = self.histograms[value] = FastHistogram(self.name, self.help, self.bounds)
        histogram.observe(seconds)

    def family(self):
        family = HistogramMetricFamily(self.name, self.help, labels=[self.label])
        for value, histogram in sorted(self.histograms.items()):
            family.add_metric([value], histogram.buckets(), histogram.sum)
        return family


class GateMetrics:
    """
    The counters and histograms of one gate.

    @ivar registry: the L{CollectorRegistry} C{/metrics} serves.
    """

    def __init__(self, registry=None):
        self.registry = registry if registry is not None else CollectorRegistry()
        for attribute, _, _ in _COUNTERS:
            setattr(self, attribute, 0)
        self.authFailures = dict.fromkeys(AUTH_FAILURE_REASONS, 0)
        self.kicks = dict.fromkeys(pb.KickReason.keys()[1:], 0)
        self.connectionsRefused = dict.fromkeys(REFUSAL_REASONS, 0)
        self.beforeSendChecks = dict.fromkeys(BEFORE_SEND_OUTCOMES, 0)
        self._connections = ()
        self._closing = ()
        self._web = None
        self._beforeSend = None
        self.ackRoundTrip = FastHistogram(
            "imserver_ack_round_trip_seconds",
            "From pushing an entry to a session to its ack.",
            LATENCY_BUCKETS,
        )
        self.sendToPush = FastHistogram(
            "imserver_send_to_push_seconds",
            "From a send arriving to its recipients' pushes (storing included).",
            LATENCY_BUCKETS,
        )
        self.commitBatch = FastHistogram(
            "imserver_store_commit_batch_size",
            "Operations committed per store transaction (group commit).",
            _BATCH_BUCKETS,
        )
        self.commitSeconds = FastHistogram(
            "imserver_store_commit_seconds",
            "Time of one store transaction, commit (fsync) included.",
            LATENCY_BUCKETS,
        )
        self.beforeSendSeconds = FastHistogram(
            "imserver_before_send_seconds",
            "From a send arriving to the before-send check's verdict (queue included).",
            LATENCY_BUCKETS,
        )
        self._histograms = (
            self.ackRoundTrip,
            self.sendToPush,
            self.commitBatch,
            self.commitSeconds,
            self.beforeSendSeconds,
        )
        self.registry.register(self)

    def watch(self, connections, closing=()):
        """
        Compute the connection gauges from C{connections} (the gate's live
        L{imserver.protocol.GateProtocol}s) and C{closing} (those the gate
        closed whose socket has not closed yet) at each scrape.
        """
        self._connections = connections
        self._closing = closing

    def watchWeb(self, site):
        """
        Also report the web listener's (L{imserver.web.WebSite}): its HTTP
        connections not upgraded yet and its refused WebSocket upgrades.
        """
        self._web = site

    def watchBeforeSend(self, check):
        """
        Also report the before-send check's (L{imserver.beforesend}) sends
        waiting for a verdict.
        """
        self._beforeSend = check

    def observeCommit(self, size, seconds):
        """
        Record one store transaction; safe to call from the store's thread.
        """
        self.commitBatch.observe(size)
        self.commitSeconds.observe(seconds)

    def describe(self):
        # Names only: registering must not run collect() (no connections yet).
        return [CounterMetricFamily("imserver_" + name, help) for _, name, help in _COUNTERS]

    def collect(self):
        for histogram in self._histograms:
            yield histogram.family()
        for attribute, name, help in _COUNTERS:
            yield CounterMetricFamily("imserver_" + name, help, value=getattr(self, attribute))
        yield labelled(
            "imserver_auth_failures",
            "Failed authentications by reason.",
            "reason",
            self.authFailures,
        )
        yield labelled(
            "imserver_kicks",
            "Sessions kicked, by reason.",
            "reason",
            [(reason.lower(), count) for reason, count in self.kicks.items()],
        )
        yield labelled(
            "imserver_connections_refused",
            "Connections closed at accept, before TLS, by reason.",
            "reason",
            self.connectionsRefused,
        )
        yield labelled(
            "imserver_before_send_checks",
            "Before-send checks by outcome: allow, reject, replace, timeout, error"
            " (connection, status, malformed answer), queue_full.",
            "result",
            self.beforeSendChecks,
        )
        if self._beforeSend is not None:
            yield GaugeMetricFamily(
                "imserver_before_send_pending",
                "Sends waiting for the before-send check's verdict (in flight and queued).",
                value=self._beforeSend.pending,
            )
        web = self._web
        if web is not None:
            yield GaugeMetricFamily(
                "imserver_web_http_connections",
                "Connections of the --web listener still in HTTP (page requests, "
                "WebSocket upgrades under way).",
                value=len(web.http),
            )
            yield labelled(
                "imserver_websocket_upgrades_refused",
                "WebSocket upgrade requests refused, by reason.",
                "reason",
                web.refusedUpgrades,
            )
        states = {"new": 0, "authenticating": 0, "authenticated": 0}
        backlog = unacked = 0
        for connection in list(self._connections):
            states[connection.state] += 1
            if connection.state == "authenticated":
                backlog += connection.backlog
                unacked += connection.unackedCount()
        yield labelled(
            "imserver_connections",
            "Open client connections by state.",
            "state",
            states,
            GaugeMetricFamily,
        )
        yield GaugeMetricFamily(
            "imserver_connections_closing",
            "Connections the gate closed whose socket is not closed yet (each for at"
            " most close_timeout).",
            value=len(self._closing),
        )
        yield GaugeMetricFamily(
            "imserver_inbox_backlog",
            "Inbox entries not yet acknowledged by the connected sessions of their users.",
            value=backlog,
        )
        yield GaugeMetricFamily(
            "imserver_pushes_unacked",
            "Entries pushed to connected sessions and not yet acknowledged.",
            value=unacked,
        )
