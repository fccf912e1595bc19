"""
Fuzzing the gate with atheris: C{fuzz_gate.py} (the target), C{harness.py}
(what it runs and checks, importable without atheris), C{build_corpus.py}
(the seed corpus from tests/data/malformed), C{regressions/} (inputs that
once crashed it).  docs/security.md has the commands.
"""
