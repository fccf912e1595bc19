# -*- test-case-name: tests.test_malformed -*-
"""
Build the seed corpus of C{fuzz/fuzz_gate.py} from the malformed-input
suite (tests/data/malformed/*.json): one file per distinct case input,
named by its SHA-1, each in three variants of the first byte
(C{fuzz/harness.py}): one read with the memory store, reads of 7 bytes, one
read with SQLite.  Cases that are not about framing (raw bytes to the TLS
port) are included too: they are just more odd bytes.  The web listener's
cases are not: their bytes (HTTP, WebSocket frames) are for another
protocol than the one the fuzz target reads.

    .venv/bin/python fuzz/build_corpus.py [DIRECTORY]    # default fuzz/corpus
"""

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fuzz.harness import NOW, SECRET, UID, makeInput  # noqa: E402
from tests.support.malformed import BuildContext, streamCases  # noqa: E402


def corpus():
    """
    @return: the seed inputs, distinct, in case order.
    """
    context = BuildContext(SECRET, NOW, UID)
    seen, inputs = set(), []
    for case in streamCases():
        payload = b"".join(value for step, value in case.steps(context) if step == "data")
        for chunk, sqlite in [(0, False), (7, False), (0, True)]:
            data = makeInput(case.state, payload, chunk, sqlite)
            if data not in seen:
                seen.add(data)
                inputs.append(data)
    return inputs


def main(argv):
    directory = argv[1] if len(argv) > 1 else os.path.join(HERE, "corpus")
    os.makedirs(directory, exist_ok=True)
    inputs = corpus()
    for data in inputs:
        with open(os.path.join(directory, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
    print("{} seed inputs in {}".format(len(inputs), directory))


if __name__ == "__main__":
    main(sys.argv)
