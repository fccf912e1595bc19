# -*- test-case-name: tests.test_handshakes -*-
"""
C{python -m imserver.bench.handshakes}: TLS handshakes against a real gate,
full and resumed with a ticket.
"""

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from imserver.bench import handshakes


class HandshakesTests(TestCase):
    timeout = 60

    def test_smoke(self):
        """
        A short run: every handshake offering the last ticket resumes, and
        the gate's CPU is measured for both kinds.
        """

        def check(result):
            self.assertEqual(result["handshakes"], {"full": 4, "resumed": 4})
            self.assertEqual(result["resumed"], 4)
            self.assertEqual(set(result["gate_cpu_us_per_handshake"]), {"full", "resumed"})

        # Blocking sockets and a child process: off the reactor thread.
        return threads.deferToThread(handshakes.run, 4, 2, "").addCallback(check)
