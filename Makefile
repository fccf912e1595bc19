# The two commands of the README: `make run` and `make test`.  Each makes its
# own virtualenv in .venv and installs the project into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test proto clean

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

clean:
	rm -rf $(VENV) _trial_temp build *.egg-info
