"""
Smoke test of C{im-bench}: a very short p2p run against a real spawned gate,
so the benchmark keeps working.  It asserts that traffic flowed, never how
fast (timings belong in docs/performance.md, not in tests).
"""

import io

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imserver.bench import P2POptions, P2PRun, percentile


class PercentileTests(SynchronousTestCase):
    """
    L{percentile}.
    """

    def test_nearestRank(self):
        """
        Nearest-rank percentiles of sorted values; L{None} for no values.
        """
        values = list(range(1, 101))
        self.assertEqual(percentile(values, 0.5), 50)
        self.assertEqual(percentile(values, 0.99), 99)
        self.assertEqual(percentile(values, 1.0), 100)
        self.assertIsNone(percentile([], 0.5))


class P2PSmokeTests(TestCase):
    """
    A one-second p2p run.
    """

    timeout = 60

    @inlineCallbacks
    def test_p2p(self):
        """
        Messages flow from senders to receivers through a spawned gate and
        the result reports them, with latency percentiles and no errors.
        """
        options = P2POptions()
        options.parseOptions(["--users", "8", "--duration", "1", "--warmup", "0.3",
                              "--server-cpu", "", "--client-cpu", ""])
        result = yield P2PRun(reactor, options, out=io.StringIO()).run()
        self.assertGreater(result["deliveries_per_s"], 0)
        self.assertEqual(result["errors"], 0)
        self.assertIsNotNone(result["latency_ms"]["p99"])
        self.assertGreater(result["server_rss_mb"], 0)
