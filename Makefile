# The two commands of the README: `make run` and `make test`.  Each makes its
# own virtualenv in .venv and installs the project into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test proto fuzz clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode: a .pth entry for this folder, so twistd finds
	# twisted/plugins/imserver_plugin.py (the default editable mode hides it).
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n im $(ARGS)

test: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests

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
	rm -rf $(VENV) _trial_temp build *.egg-info
