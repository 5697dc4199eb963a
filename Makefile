# GhostVis: the two commands a newcomer needs are `make demo` and `make test`.
# Everything is installed into ./.venv; nothing touches the system Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch + torchvision pair to install (scripts/setup.sh picks one per CPU architecture when empty).
TORCH_SPEC ?=
STAMP  := $(VENV)/.ghostvis-setup

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py rustbpe/Cargo.toml rustbpe/src/lib.rs scripts/setup.sh scripts/build_rustbpe.sh
	PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/setup.sh
	touch $@

demo: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/demo.sh

test: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash scripts/test.sh

clean:
	rm -rf $(VENV) rustbpe/target runs/demo
