# -*- test-case-name: tests.test_bench -*-
"""
The bench's arithmetic, free of I/O: percentiles, summing what the workers
report, rates between progress samples, the progress line, splitting users
over workers, and ratios to the reference.
"""

import heapq


def percentile(sortedValues, fraction):
    """
    The C{fraction} percentile (nearest rank) of sorted values.

    @return: one of the values, or L{None} if there are none.
    """
    if not sortedValues:
        return None
    index = min(len(sortedValues) - 1, max(0, int(round(fraction * len(sortedValues))) - 1))
    return sortedValues[index]


def latencySummary(sortedMicroseconds):
    """
    Percentiles of latencies.

    @param sortedMicroseconds: sorted latencies, in microseconds.
    @return: C{{"p50", "p99", "p999", "max"}} in milliseconds, each L{None}
        if there are no latencies.
    """

    def ms(value):
        return None if value is None else round(value / 1000.0, 3)

    values = sortedMicroseconds
    return {
        "p50": ms(percentile(values, 0.50)),
        "p99": ms(percentile(values, 0.99)),
        "p999": ms(percentile(values, 0.999)),
        "max": ms(values[-1] if values else None),
    }


def latenessSummary(sortedMicroseconds):
    """
    Percentiles of an open loop's lateness (actual send time minus
    scheduled time).

    @param sortedMicroseconds: sorted latenesses, in microseconds.
    @return: C{{"p50", "p99", "max"}} in milliseconds, each L{None} if
        there are none.
    """
    summary = latencySummary(sortedMicroseconds)
    del summary["p999"]
    return summary


def mergeSorted(lists):
    """
    Merge sorted lists (one per worker) into one sorted L{list}.
    """
    return list(heapq.merge(*lists))


def sumCounts(countsList):
    """
    Add up counters.

    @param countsList: an iterable of C{{name: number}} (one per worker).
    @return: C{{name: total}}, names in first-seen order.
    """
    total = {}
    for counts in countsList:
        for name, value in counts.items():
            total[name] = total.get(name, 0) + value
    return total


def ratesBetween(earlier, later):
    """
    Per-second rates of counters between two samples of one process.

    @param earlier: C{(seconds, counts)}.
    @param later: C{(seconds, counts)}, taken after C{earlier}.
    @return: C{{name: per second}} for every counter of C{later}; all zero
        if no time passed.
    """
    (t0, counts0), (t1, counts1) = earlier, later
    elapsed = t1 - t0
    if elapsed <= 0:
        return dict.fromkeys(counts1, 0.0)
    return {name: (value - counts0.get(name, 0)) / elapsed for name, value in counts1.items()}


def formatProgress(label, phase, elapsed, totals, rates, rateNames):
    """
    The one-line progress display.

    @param label: the scenario (or C{reference}).
    @param phase: what the run is doing (C{connecting}, C{measuring}, ...).
    @param elapsed: seconds since the run started.
    @param totals: C{{counter: total}}.
    @param rates: C{{counter: per second}}.
    @param rateNames: the counters shown with their rate.
    @rtype: L{str}
    """
    parts = []
    for name, total in totals.items():
        if name in rateNames:
            parts.append("{} {:,} ({:,.0f}/s)".format(name, total, rates.get(name, 0.0)))
        else:
            parts.append("{} {:,}".format(name, total))
    return "im-bench {} {:>4.0f}s {}: {}".format(label, elapsed, phase, "  ".join(parts))


def evenBlocks(users, workers):
    """
    Split users 0 .. C{users} - 1 into one block per worker, as even as
    possible, every block but the last of an even size so a sender/receiver
    pair (C{2k}, C{2k + 1}) is always in one worker.

    @return: a L{list} of C{(first, count)}.
    """
    pairs, odd = divmod(users, 2)
    base, extra = divmod(pairs, workers)
    blocks, first = [], 0
    for index in range(workers):
        count = 2 * (base + (index < extra))
        if index == workers - 1:
            count += odd
        blocks.append((first, count))
        first += count
    return blocks


def shares(total, weights):
    """
    Split C{total} in proportion to C{weights} (largest remainder first).

    @param weights: non-negative numbers, not all zero.
    @return: a L{list} of integers, one per weight, adding up to C{total},
        none above its weight when C{total} is at most their sum.
    """
    whole = sum(weights)
    exact = [total * weight / whole for weight in weights]
    result = [int(value) for value in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - result[i], reverse=True)
    for index in order[: total - sum(result)]:
        result[index] += 1
    return result


def ratiosTo(result, reference, pairs):
    """
    A scenario's figures divided by the reference's.

    @param pairs: C{{result key: reference key}}.
    @return: C{{result key: ratio}} for each pair both sides have (and the
        reference's is not zero), rounded to 3 decimals.
    """
    ratios = {}
    for key, referenceKey in pairs.items():
        value, base = result.get(key), reference.get(referenceKey)
        if value is not None and base:
            ratios[key] = round(value / base, 3)
    return ratios
