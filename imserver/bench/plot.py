# -*- test-case-name: tests.test_bench -*-
"""
Charts of a run (C{--plot DIR}), as PNG files: the latency CDF of the
scenario and the reference, and their throughput over time from the
progress samples.

matplotlib is imported only here, only when charts are asked for: it is
the C{bench} extra (C{pip install imserver[bench]}).
"""

from twisted.python.filepath import FilePath

#: The most points drawn per CDF curve.
_CDF_POINTS = 2000


def cdfPoints(sortedValues, points=_CDF_POINTS):
    """
    Points of the empirical CDF of sorted values, thinned to at most about
    C{points}, the last value always included.

    @return: C{(values, fractions)}, two lists.
    """
    count = len(sortedValues)
    step = max(1, count // points)
    indexes = list(range(0, count, step))
    if indexes and indexes[-1] != count - 1:
        indexes.append(count - 1)
    return [sortedValues[i] for i in indexes], [(i + 1) / count for i in indexes]


def writeCharts(directory, outcome):
    """
    Write the charts of C{outcome} into C{directory} (created if needed).

    @type outcome: L{imserver.bench.coordinator.Outcome}
    @return: the L{FilePath}s written.
    """
    from matplotlib.figure import Figure

    directory = FilePath(directory)
    if not directory.exists():
        directory.makedirs()
    name = outcome.result["scenario"]
    written = []

    latencies = {label: values for label, values in outcome.latencies.items() if values}
    if latencies:
        figure = Figure(figsize=(8, 5))
        axes = figure.add_subplot()
        for label, values in latencies.items():
            xs, ys = cdfPoints(values)
            axes.plot([x / 1000.0 for x in xs], ys, label=label)
        axes.set_xscale("log")
        axes.set_xlabel("milliseconds")
        axes.set_ylabel("fraction at or below")
        axes.set_title("im-bench {}: latency CDF".format(name))
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
        written.append(_save(figure, directory.child("{}-latency-cdf.png".format(name))))

    timelines = {label: samples for label, samples in outcome.timelines.items() if samples}
    if timelines:
        figure = Figure(figsize=(8, 3 * len(timelines)))
        for row, (label, samples) in enumerate(timelines.items(), 1):
            axes = figure.add_subplot(len(timelines), 1, row)
            times = [seconds for seconds, rates in samples]
            for counter in samples[0][1]:
                axes.plot(times, [rates[counter] for seconds, rates in samples], label=counter)
            axes.set_title(label)
            axes.set_xlabel("seconds")
            axes.set_ylabel("per second")
            axes.grid(True, alpha=0.3)
            axes.legend()
        figure.suptitle("im-bench {}: throughput".format(name))
        figure.tight_layout()
        written.append(_save(figure, directory.child("{}-throughput.png".format(name))))
    return written


def _save(figure, path):
    figure.savefig(path.path, dpi=100)
    return path
