# -*- test-case-name: tests.test_bench -*-
"""
When an open-loop load sends: the arrival process (C{--arrivals}) and the
clock that follows it.

An arrival process is an endless iterator of due times, increasing, in
seconds on the clock the load stamps its messages with
(C{time.perf_counter}, which is C{CLOCK_MONOTONIC} on Linux: one clock for
every process of the machine):

  - L{evenTimes}: evenly spaced.  A worker sends round-robin over its
    senders, so each sender is on an evenly spaced schedule of its own, the
    senders' offsets spread evenly over the interval: the aggregate is
    smooth, as if every connection had its own timer, for the cost of one.
  - L{poissonTimes}: exponential gaps with the same mean rate, from a
    seeded generator.
  - L{burstTimes}: every L{BURST_TICK}, as many as are due: the bench's
    original 10 ms ticker, kept for comparison.

L{Arrivals} sends each message once its due time has come, and the load
measures latency from that due time (the time the message was scheduled),
not from when the client got around to sending it: a client running late
shows its lateness in the latency, and the lateness itself (actual send
time minus due time) is recorded too.
"""

import math
import time
from collections.abc import Callable, Iterator
from random import Random

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: The C{--arrivals} kinds, the default first.
KINDS = ("even", "poisson", "burst")
#: Seconds between two bursts of C{burst} arrivals.
BURST_TICK = 0.01
#: The shortest wait, in seconds, between two wakes of L{Arrivals}: above
#: 1 / TICK messages per second, the messages that come due meanwhile go out
#: together at the next wake (their lateness recorded), so the client never
#: wakes more often than this for its open loop.
TICK = 0.0001
#: The longest, in seconds, a wake goes on sending before it lets the
#: reactor run: a client behind its schedule sends its backlog in slices
#: this long, reading its sockets in between.
BUSY = 0.01


def evenTimes(rate: float, start: float, phase: float = 0.0) -> Iterator[float]:
    """
    Evenly spaced arrivals: the times C{(k + phase) / rate} for every whole
    C{k}, from the first at or after C{start}.

    The grid is anchored at time 0 of the clock, not at C{start}, so
    workers that share the clock and each take a phase of C{first / users}
    (their share of the users before them) interleave their arrivals
    whenever each of them starts: the aggregate stays evenly spaced.

    @param rate: arrivals per second, > 0.
    @param phase: in [0, 1), as a fraction of the interval.
    """
    k = math.ceil(start * rate - phase)
    while True:
        yield (k + phase) / rate
        k += 1


def poissonTimes(rate: float, start: float, rng: Random) -> Iterator[float]:
    """
    Poisson arrivals: independent exponential gaps of mean C{1 / rate},
    from C{start}.

    @param rng: the generator drawing the gaps (seeded, for runs that can
        be repeated).
    """
    t = start
    draw = rng.expovariate
    while True:
        t += draw(rate)
        yield t


def burstTimes(rate: float, start: float, tick: float = BURST_TICK) -> Iterator[float]:
    """
    Bursts: at C{start + tick}, C{start + 2 * tick}, ..., as many arrivals
    as C{rate} has made due since the last burst (the fraction carried
    over), all with the burst's time.
    """
    perTick = rate * tick
    carry = 0.0
    ticks = 0
    while True:
        ticks += 1
        carry += perTick
        while carry >= 1:
            carry -= 1
            yield start + ticks * tick


def arrivalTimes(
    kind: str, rate: float, start: float, phase: float = 0.0, rng: Random | None = None
) -> Iterator[float]:
    """
    The arrival process C{kind} (one of L{KINDS}).

    @param phase: for C{even} (L{evenTimes}).
    @param rng: for C{poisson} (L{poissonTimes}); a generator seeded with 0
        if L{None}.
    @raise ValueError: for an unknown kind.
    """
    if kind == "even":
        return evenTimes(rate, start, phase)
    if kind == "poisson":
        return poissonTimes(rate, start, Random(0) if rng is None else rng)
    if kind == "burst":
        return burstTimes(rate, start)
    raise ValueError("unknown arrivals {!r}".format(kind))


class Arrivals:
    """
    An open loop's clock: calls C{fire(due)} for each due time of an
    arrival process, once that time has come.

    At most one timer is pending, whatever the rate: each wake sends every
    message due by then, oldest first, each one's lateness (C{now()} just
    before sending, minus its due time) passed to C{late} first, then
    schedules the next wake for the next due time, but no sooner than
    C{tick} later.  A wake sends only what was due when it began, and for
    at most C{busy} seconds, so a client that cannot keep up falls behind
    (its lateness grows, and its CPU shows it) but goes on reading its
    sockets.
    """

    def __init__(
        self,
        clock: IReactorTime,
        times: Iterator[float],
        fire: Callable[[float], object],
        late: Callable[[float], object],
        now: Callable[[], float] = time.perf_counter,
        tick: float = TICK,
        busy: float = BUSY,
    ) -> None:
        """
        @param clock: schedules the wakes.
        @param times: the due times (L{arrivalTimes}), on C{now}'s clock.
        @param fire: sends one message, given its due time.
        @param late: records a lateness, in seconds.
        @param now: the clock of C{times}.
        @param tick: the shortest wait between two wakes.
        @param busy: the longest a wake sends for.
        """
        self._clock = clock
        self._times = times
        self._fire = fire
        self._late = late
        self._now = now
        self._tick = tick
        self._busy = busy
        self._due = 0.0
        self._call: IDelayedCall | None = None
        self.running = False

    def start(self) -> None:
        """
        Start sending.
        """
        self.running = True
        self._due = next(self._times)
        self._schedule(0.0)

    def stop(self) -> None:
        """
        Stop sending; the pending wake is cancelled.
        """
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, shortest: float) -> None:
        """
        Wake at the next due time, but no sooner than C{shortest} from now.
        """
        delay = max(self._due - self._now(), shortest)
        self._call = self._clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._call = None
        now, fire, late, times = self._now, self._fire, self._late, self._times
        due = self._due
        woke = sending = now()
        until = woke + self._busy
        while due <= woke and sending < until and self.running:
            late(sending - due)
            fire(due)
            due = next(times)
            sending = now()
        self._due = due
        if self.running:
            self._schedule(self._tick)
