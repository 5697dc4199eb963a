# GhostVis: the two commands a newcomer needs are `make demo` and `make test`.
# Everything is installed into ./.venv; nothing touches the system Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build is enough for the demo and the tests; on a GPU box use e.g. TORCH_SPEC="torch==2.11.0".
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.ghostvis-setup

.PHONY: setup demo test bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml rustbpe/Cargo.toml rustbpe/src/lib.rs scripts/setup.sh scripts/build_rustbpe.sh
	PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/setup.sh
	touch $@

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/test.sh

clean:
	rm -rf $(VENV) rustbpe/target runs/demo
