# -*- test-case-name: tests.test_bench -*-
"""
C{storm}: a reconnect storm.  N sessions are held; K of them (C{--drop})
lose their connection at once (the client aborts it), reconnect after a
small random delay, re-authenticate with the last seq they acknowledged
(as L{imserver.client.IMClient} does) and receive what they missed.  The
figure is the time until all K are back and caught up, and K divided by it.

With C{--backlog M}, each of the K first stops taking its messages (as if
its connection were already dead) while its partner sends it M, so M
messages wait for it in its inbox when it comes back.

    python -m imserver.bench storm --users 2000 --drop 1000 --backlog 5
"""

import random
import time

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.python import usage

from imserver import methods
from imserver.bench.options import BaseOptions
from imserver.bench.scenario import Load, Scenario, partner, userName
from imserver.bench.stats import latencySummary, mergeSorted, shares

#: The body of a backlog message.
BACKLOG_BODY = b"b" * 100


class StormOptions(BaseOptions):
    """
    The options of C{storm}.
    """

    longdesc = (
        "A reconnect storm: N sessions are held, --drop K of them lose their connection at once, "
        "reconnect, resume and receive what they missed (--backlog M messages each); reports the "
        "time until all K are back."
    )

    pairs = True
    optParameters = [
        ["drop", "k", None, "Connections dropped at once (default: half of --users).", int],
        [
            "backlog",
            None,
            0,
            "Messages queued for each dropped user while it is gone (sent by its partner).",
            int,
        ],
        [
            "jitter",
            None,
            0.2,
            "Largest random delay, in seconds, before a reconnect attempt.",
            float,
        ],
    ]

    def postOptions(self):
        BaseOptions.postOptions(self)
        if self["drop"] is None:
            self["drop"] = self["users"] // 2
        if not 1 <= self["drop"] <= self["users"]:
            raise usage.UsageError("--drop must be between 1 and --users")
        if not 0 <= self["backlog"] <= 1000:
            raise usage.UsageError("--backlog must be between 0 and 1000")
        if not 0 <= self["jitter"] <= 60:
            raise usage.UsageError("--jitter must be between 0 and 60")


class ResumingClient:
    """
    One user's session that survives a dropped connection as
    L{imserver.client.IMClient} does: it remembers the last seq it
    acknowledged, reconnects after a small random delay (again after each
    failed attempt), re-authenticates with that seq and so receives exactly
    what it missed.

    @ivar protocol: the current authenticated
        L{imserver.bench.scenario.SessionClient}, or L{None}.
    @ivar lastSeq: the last seq acknowledged.
    @ivar frozen: while true, messages pushed are ignored (neither
        remembered nor acknowledged), as if the connection were already
        dead: they wait in the inbox.
    """

    def __init__(self, load, index):
        self.load = load
        self.index = index
        self.uid = userName(index)
        self.protocol = None
        self.lastSeq = 0
        self.frozen = False
        self._headSeq = 0
        self._recovered = None
        self._retry = None

    def connect(self):
        """
        Connect and authenticate with L{lastSeq}.

        @return: a L{Deferred} firing once authenticated.
        """
        return self.load.connectSession(self.index, self.lastSeq).addCallback(self._authenticated)

    def _authenticated(self, protocol):
        if self.load.closing:
            protocol.transport.abortConnection()
            return
        self.protocol = protocol
        self._headSeq = protocol.session.head_seq
        self._checkRecovered()

    def notified(self, protocol, message):
        """
        A message was pushed on C{protocol}: remember and acknowledge it,
        unless frozen.
        """
        if self.frozen or protocol is not self.protocol:
            return
        if message.seq > self.lastSeq:
            self.lastSeq = message.seq
        protocol.ack(message.seq)
        self._checkRecovered()

    def drop(self):
        """
        Abort the connection now and start reconnecting.

        @return: a L{Deferred} firing once reconnected, re-authenticated and
            caught up with every message queued meanwhile.
        """
        self._recovered = Deferred()
        self.frozen = False
        protocol, self.protocol = self.protocol, None
        protocol.transport.abortConnection()
        self._scheduleAttempt()
        return self._recovered

    def lost(self, protocol):
        """
        C{protocol}'s connection was lost.  If it was the current one and
        not dropped on purpose, count an error and reconnect.
        """
        if protocol is self.protocol and not self.load.closing:
            self.protocol = None
            self.load.error("{} lost its connection".format(self.uid))
            self._scheduleAttempt()

    def close(self):
        """
        Stop reconnecting and abort the connection.

        @return: a L{Deferred} firing once it is closed.
        """
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self.protocol is None:
            return succeed(None)
        closed = self.protocol.whenClosed()
        self.protocol.transport.abortConnection()
        return closed

    def _scheduleAttempt(self):
        delay = self.load.random.uniform(0, self.load.config["jitter"])
        self._retry = self.load.reactor.callLater(delay, self._attempt)

    def _attempt(self):
        self._retry = None
        if not self.load.closing:
            self.connect().addErrback(self._failed)

    def _failed(self, failure):
        if not self.load.closing:
            self.load.add("retries")
            self._scheduleAttempt()

    def _checkRecovered(self):
        if (
            self._recovered is not None
            and self.protocol is not None
            and self.lastSeq >= self._headSeq
        ):
            recovered, self._recovered = self._recovered, None
            recovered.callback(None)


class StormLoad(Load):
    """
    Resuming sessions, some of them dropped at once.
    """

    counters = ("connected", "queued", "recovered", "retries", "errors")

    def __init__(self, reactor, spec, *args, **kwargs):
        Load.__init__(self, reactor, spec, *args, **kwargs)
        # Deterministic delays, different in each worker.
        self.random = random.Random(self.first)
        self._byIndex = {}

    def connectOne(self, index):
        client = ResumingClient(self, index)

        def connected(_):
            self._byIndex[index] = client
            self.clients.append(client)

        return client.connect().addCallback(connected)

    def notified(self, protocol, name, message):
        client = self._byIndex.get(protocol.index)
        if name == methods.MESSAGE.name and client is not None:
            client.notified(protocol, message)

    def disconnected(self, protocol):
        client = self._byIndex.get(protocol.index)
        if client is not None:
            client.lost(protocol)

    def victims(self, count):
        """
        The first C{count} users of this worker (by index) that connected.
        """
        return sorted(self.clients, key=lambda client: client.index)[:count]

    def on_freeze(self, victims, backlog):
        """
        Freeze C{victims} users and have each one's partner send it
        C{backlog} messages.

        @return: a L{Deferred} firing once all are stored.
        """
        sends = []
        for client in self.victims(victims):
            client.frozen = True
            sender = self._byIndex.get(partner(client.index))
            if sender is None or sender.protocol is None:
                self.error("{} has no connected partner to queue messages".format(client.uid))
                continue
            for n in range(backlog):
                d = sender.protocol.send(
                    client.uid, BACKLOG_BODY, "backlog-{}-{}".format(client.index, n)
                )
                sends.append(d.addCallback(lambda _: self.add("queued")))
        return gatherResults(sends).addCallback(lambda _: {"queued": len(sends)})

    def on_drop(self, victims):
        """
        Drop the connections of C{victims} users at once.

        @return: a L{Deferred} firing once all have recovered, or after the
            timeout, with C{dropped}, C{recovered}, C{retries} and
            C{recovery_us}: each recovery's time since the drop (sorted).
        """
        dropping = [client for client in self.victims(victims) if client.protocol is not None]
        done = Deferred()
        times = []
        started = time.perf_counter()

        def finish():
            if timer.active():
                timer.cancel()
            if not done.called:
                times.sort()
                done.callback(
                    {
                        "dropped": len(dropping),
                        "recovered": len(times),
                        "retries": self.counts["retries"],
                        "recovery_us": times,
                    }
                )

        def recovered(_):
            times.append(int((time.perf_counter() - started) * 1e6))
            self.add("recovered")
            if len(times) == len(dropping):
                finish()

        timer = self.reactor.callLater(self.timeout, finish)
        for client in dropping:
            client.drop().addCallback(recovered)
        if not dropping:
            finish()
        return done

    def closeClient(self, client):
        """
        Stop C{client} reconnecting, and abort its connection.
        """
        return client.close()


class Storm(Scenario):
    """
    Drop K of N connections at once; time the recovery.
    """

    name = "storm"
    summary = "Drop K of N connections at once; time until all resumed with their backlog."
    Options = StormOptions
    Load = StormLoad
    rates = ("connected", "recovered")
    ratios = {"reconnects_per_s": "connect_per_s"}

    def workerConfig(self, first, count):
        return {"jitter": self.options["jitter"]}

    @inlineCallbacks
    def drive(self, run):
        o = self.options
        result = yield run.connect()
        victims = shares(o["drop"], [count for first, count in run.blocks])
        if o["backlog"]:
            run.phase = "queueing"
            yield run.tellEach("freeze", [{"victims": v, "backlog": o["backlog"]} for v in victims])
        run.phase = "storm"
        mark = run.usage()
        reports = yield run.tellEach(
            "drop", [{"victims": v} for v in victims], timeout=o["timeout"] + 10
        )
        figures = run.usageSince(mark)
        recovered = sum(report["recovered"] for report in reports)
        latencies = mergeSorted(report["recovery_us"] for report in reports)
        run.keepLatencies(latencies)
        result.update(figures)
        result.update(
            {
                "dropped": sum(report["dropped"] for report in reports),
                "backlog_per_user": o["backlog"],
                "recovered": recovered,
                "retries": sum(report["retries"] for report in reports),
                "reconnects_per_s": round(recovered / figures["seconds"], 1),
                "recovery_ms": latencySummary(latencies),
            }
        )
        return result
