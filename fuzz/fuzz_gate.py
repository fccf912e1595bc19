# -*- test-case-name: tests.test_malformed -*-
"""
atheris target: decode and dispatch of client bytes by the gate, in
connection state NEW or AUTHENTICATED (fuzz/harness.py says what is
checked).

    .venv/bin/pip install -e '.[fuzz]'      # atheris
    make fuzz FUZZ_SECONDS=300              # seed corpus + a 5-minute run

or by hand::

    .venv/bin/python fuzz/build_corpus.py fuzz/corpus
    .venv/bin/python fuzz/fuzz_gate.py fuzz/corpus -max_total_time=300 \\
        -artifact_prefix=fuzz/crashes/

A crash is written to C{fuzz/crashes/crash-<sha1>}; replay it with
C{.venv/bin/python fuzz/fuzz_gate.py fuzz/crashes/crash-<sha1>}, then copy
it into C{fuzz/regressions/} (tests/test_malformed.py runs every file
there) or turn it into a case of tests/data/malformed/.
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["imserver"]):
    from imserver import auth, framing, groups, limits, messaging, protocol, rpc
    from imserver.store import memory, sqlite

#: Imported above to be instrumented (coverage feedback) before use.
INSTRUMENTED = (auth, framing, groups, limits, messaging, protocol, rpc, memory, sqlite)

with atheris.instrument_imports(include=["fuzz"]):
    from fuzz.harness import runInput


#: C{IMSERVER_FUZZ_STRICT=1}: the known bugs (fuzz/harness.py) count as
#: crashes too.
STRICT = os.environ.get("IMSERVER_FUZZ_STRICT") == "1"


def TestOneInput(data):
    runInput(data, STRICT)


def main():
    # Events reach the harness's observer only: a logged failure is a crash
    # (or a known bug), not output.
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
