# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{imserver.metrics}: the IM metrics move when their events happen.
"""

from types import SimpleNamespace

from prometheus_client import generate_latest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imserver.metrics import GateMetrics
from imserver.pb import im_pb2 as pb

from tests.support import documentedMetrics, servedMetrics
from tests.support.frames import written
from tests.support.gate import DeliveryHarness


def sample(metrics, name, **labels):
    """
    The value of one sample of C{metrics}' registry.
    """
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0 if value is None else value


class GateMetricsTests(SynchronousTestCase):
    """
    Counters, gauges and histograms of a gate under traffic.
    """

    def setUp(self):
        self.gate = DeliveryHarness(self)
        self.metrics = self.gate.factory.metrics

    def test_ownRegistry(self):
        """
        Every gate has its own registry: two gates never share counts.
        """
        self.assertIsNot(GateMetrics().registry, self.metrics.registry)

    def test_connections(self):
        """
        Open connections are counted by state at scrape time.
        """
        self.gate.connect()
        self.gate.login("alice")
        self.assertEqual(sample(self.metrics, "imserver_connections", state="new"), 1)
        self.assertEqual(sample(self.metrics, "imserver_connections", state="authenticated"), 1)

    def test_authFailures(self):
        """
        Failed auths are counted by reason.
        """
        for request in [
            pb.AuthRequest(uid="alice", device_id="phone", token="v1.0.bad"),
            pb.AuthRequest(uid="", device_id="phone"),
        ]:
            protocol, _ = self.gate.connect()
            self.gate.request(protocol, "auth", request)
            protocol.connectionLost(Failure(ConnectionDone()))
        self.gate.connect()
        self.gate.clock.advance(self.gate.settings.auth_timeout)
        for reason in ["bad_token", "bad_request", "timeout"]:
            self.assertEqual(
                sample(self.metrics, "imserver_auth_failures_total", reason=reason), 1, reason
            )

    def test_messages(self):
        """
        A send counts as stored, its pushes (recipient and the sender's own
        copy) as pushed, acks as acked; a retry as a dedup hit; frames and
        bytes both ways; send-to-push and ack round-trip are observed.
        """
        alice, aliceT, _, _ = self.gate.login("alice")
        bob, bobT, _, _ = self.gate.login("bob")
        self.gate.send(alice, "bob", "m1")
        self.gate.send(alice, "bob", "m1")
        self.gate.clock.advance(0.25)
        self.gate.ack(bob, 1)
        m = self.metrics
        self.assertEqual(sample(m, "imserver_messages_stored_total"), 1)
        self.assertEqual(sample(m, "imserver_dedup_hits_total"), 1)
        self.assertEqual(sample(m, "imserver_messages_pushed_total"), 2)
        self.assertEqual(sample(m, "imserver_messages_acked_total"), 1)
        self.assertEqual(sample(m, "imserver_send_to_push_seconds_count"), 1)
        self.assertEqual(sample(m, "imserver_ack_round_trip_seconds_count"), 1)
        self.assertEqual(sample(m, "imserver_ack_round_trip_seconds_sum"), 0.25)
        self.assertEqual(sample(m, "imserver_pushes_unacked"), 1)  # alice's own copy
        self.assertEqual(sample(m, "imserver_inbox_backlog"), 1)
        # 2 auths + 2 sends + 1 ack in; 2 auth responses + 2 send responses +
        # 2 pushes out.
        self.assertEqual(sample(m, "imserver_frames_received_total"), 5)
        self.assertEqual(sample(m, "imserver_frames_sent_total"), 6)
        self.assertGreater(sample(m, "imserver_bytes_sent_total"), 0)
        self.assertGreater(sample(m, "imserver_bytes_received_total"), 0)
        written(aliceT), written(bobT)

    def test_kicksAndIdle(self):
        """
        Kicks are counted by reason; idle closes are counted.
        """
        old, _, _, _ = self.gate.login("alice")
        self.gate.login("alice")
        old.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(sample(self.metrics, "imserver_kicks_total", reason="replaced"), 1)
        self.gate.clock.advance(self.gate.settings.idle_timeout)
        self.gate.factory.sweep()
        self.assertEqual(sample(self.metrics, "imserver_idle_closes_total"), 1)

    def test_commit(self):
        """
        Store transactions are observed by size and time.
        """
        self.metrics.observeCommit(12, 0.002)
        self.assertEqual(sample(self.metrics, "imserver_store_commit_batch_size_sum"), 12)
        self.assertEqual(sample(self.metrics, "imserver_store_commit_seconds_count"), 1)

    def test_histogramBuckets(self):
        """
        Histograms expose cumulative buckets, the count and the sum; a value
        on a bound counts in that bound's bucket.
        """
        for value in [0.0005, 0.003, 0.003, 100.0]:
            self.metrics.sendToPush.observe(value)
        m = self.metrics
        name = "imserver_send_to_push_seconds_bucket"
        self.assertEqual(sample(m, name, le="0.0005"), 1)
        self.assertEqual(sample(m, name, le="0.0025"), 1)
        self.assertEqual(sample(m, name, le="0.005"), 3)
        self.assertEqual(sample(m, name, le="10.0"), 3)
        self.assertEqual(sample(m, name, le="+Inf"), 4)
        self.assertEqual(sample(m, "imserver_send_to_push_seconds_count"), 4)
        self.assertAlmostEqual(sample(m, "imserver_send_to_push_seconds_sum"), 100.0065)

    def test_exposition(self):
        """
        The registry renders in the Prometheus text format.
        """
        text = generate_latest(self.metrics.registry).decode()
        self.assertIn("# TYPE imserver_messages_stored_total counter", text)
        self.assertIn('imserver_connections{state="authenticated"} 0.0', text)

    def test_documented(self):
        """
        Every family a gate serves is in docs/api.md's table, and every
        family of the table but those of cluster mode and of options is
        served.
        """
        self.metrics.watchWeb(SimpleNamespace(http=set(), refusedUpgrades={"origin": 0}))
        self.metrics.watchBeforeSend(SimpleNamespace(pending=0))
        served = servedMetrics(self.metrics.registry)
        documented = documentedMetrics()
        self.assertEqual(served - documented, set(), "served, not in docs/api.md")
        optional = {
            m
            for m in documented
            if m.startswith(
                ("imserver_webhook_", "imserver_redis_", "imserver_bus_", "imserver_retention_")
            )
        }
        optional |= {"imserver_store_rollbacks", "imserver_store_restarts"}
        self.assertEqual(documented - optional - served, set(), "in docs/api.md, not served")
