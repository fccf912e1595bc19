# -*- test-case-name: tests.test_bench -*-
"""
The C{im-bench SCENARIO} command: parse the options, run the coordinator,
write the result.
"""

import json
import sys

from twisted.python import usage
from twisted.python.filepath import FilePath

from imserver import commandline
from imserver.bench import runReactor
from imserver.bench.coordinator import Coordinator
from imserver.bench.processes import BenchError
from imserver.bench.scenarios import SCENARIOS


class Options(commandline.Options):
    """
    The options of C{im-bench}: a scenario and its options.
    """

    longdesc = (
        "The imserver load generator: runs a scenario against its own gate, then a "
        "raw Twisted echo server as the reference, and prints a JSON result. "
        "'im-bench SCENARIO --help' lists a scenario's options "
        "(im-bench is also 'python -m imserver.bench')."
    )
    subCommands = [
        [name, None, scenario.Options, scenario.summary] for name, scenario in SCENARIOS.items()
    ]

    def getSynopsis(self):
        """
        C{Usage: im-bench (fanout | hold | ...) [options]}; just the command
        name once a scenario is chosen (its usage line follows).
        """
        if getattr(self, "subCommand", None) is not None:
            return "Usage: im-bench"
        return "Usage: im-bench ({}) [options]".format(" | ".join(SCENARIOS))

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("name a scenario: {}".format(", ".join(SCENARIOS)))


def writeReport(options, outcome, out, err=sys.stderr):
    """
    Write the result of a run as JSON to C{out} and to C{--json}, and the
    charts into C{--plot}.

    @param options: the scenario's options.
    @type outcome: L{imserver.bench.coordinator.Outcome}
    """
    text = json.dumps(outcome.result, indent=2)
    out.write(text + "\n")
    if options["json"]:
        FilePath(options["json"]).setContent(text.encode("utf-8") + b"\n")
    if options["plot"]:
        from imserver.bench.plot import writeCharts

        for path in writeCharts(options["plot"], outcome):
            err.write("im-bench: wrote {}\n".format(path.path))


def main(argv):
    """
    Run the scenario named in C{argv}.

    @return: the exit status: 0, 1 if the run failed, 2 for bad options.
    """
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        shown = getattr(options, "subOptions", options)
        sys.stderr.write("{}\nim-bench: {}\n".format(shown, e))
        return 2
    scenario = SCENARIOS[options.subCommand](options.subOptions)
    outcome = []

    def failed(failure):
        if failure.check(BenchError):
            sys.stderr.write("im-bench: {}\n".format(failure.getErrorMessage()))
        else:
            failure.printTraceback(sys.stderr)

    runReactor(
        lambda reactor: Coordinator(reactor, scenario).run().addCallbacks(outcome.append, failed)
    )
    if not outcome:
        return 1
    writeReport(options.subOptions, outcome[0], sys.stdout)
    return 0
