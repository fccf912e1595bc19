# The two commands of the README: `make run` and `make test`.  Each makes its
# own virtualenv in .venv and installs the project into it first.  `make lint`
# checks the code (ruff, mypy); `make format` rewrites it to pass ruff.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
LINT_STAMP = $(VENV)/.installed-lint

.PHONY: run test test-fast lint format proto fuzz clean

# constraints.txt pins the tested version of every dependency.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode: a .pth entry for this folder, so twistd finds
	# twisted/plugins/imserver_plugin.py (the default editable mode hides it).
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]' \
	    --config-settings editable_mode=compat
	touch $(STAMP)

# The lint tools (setup.cfg extra `lint`), added to the same .venv.
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[lint]' \
	    --config-settings editable_mode=compat
	touch $(LINT_STAMP)

# make run also serves the chat page and the WebSocket endpoint for browsers
# (http://127.0.0.1:7481/); WEB=none turns that off, ARGS="--web ..." changes it.
WEB ?= tcp:7481:interface=127.0.0.1

run: $(STAMP)
	$(BIN)/twistd -n im --web $(WEB) $(ARGS)

test: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests

# The unit tests only, in a few seconds: the modules that open no socket,
# start no subprocess and need no Redis (StringTransport, Clock, memory
# reactor).  A module with any live test is not listed; `make test` runs all.
FAST_TESTS = tests.test_auth tests.test_client tests.test_delivery tests.test_docs \
	tests.test_framing tests.test_groups tests.test_identifiers tests.test_jsonframes tests.test_metrics \
	tests.test_observe tests.test_properties tests.test_protocol tests.test_rpc \
	tests.test_tap tests.test_tls tests.test_wire
test-fast: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) $(FAST_TESTS)

# ruff check, ruff format --check and mypy (configured in pyproject.toml):
# all three run, and the target fails if any of them does.
lint: $(LINT_STAMP)
	@status=0; \
	echo '== ruff check'; $(BIN)/ruff check . || status=1; \
	echo '== ruff format --check'; $(BIN)/ruff format --check --output-format concise . \
	    || status=1; \
	echo '== mypy'; $(BIN)/mypy || status=1; \
	exit $$status

# Rewrites the files: the fixable findings of ruff check (import order, ...)
# fixed, then everything formatted.  What is left, ruff check prints.
format: $(LINT_STAMP)
	$(BIN)/ruff check --fix --exit-zero .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=imserver/pb \
	    --pyi_out=imserver/pb proto/im.proto proto/bus.proto

# Fuzz the gate's decode + dispatch (fuzz/fuzz_gate.py) for FUZZ_SECONDS,
# seeded with the malformed-input suite; crashes go to fuzz/crashes/.
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -c 'import atheris' 2>/dev/null || \
	    $(BIN)/pip install --quiet -e '.[fuzz]' --config-settings editable_mode=compat
	$(BIN)/python fuzz/build_corpus.py fuzz/corpus
	mkdir -p fuzz/crashes
	$(BIN)/python fuzz/fuzz_gate.py fuzz/corpus -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=fuzz/crashes/ $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info .mypy_cache .ruff_cache
