# Quick start: `make demo` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned to the CPU wheel first: any other torch request pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian's dataset-fashion-mnist (the embedded default data set)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

# The main job (issue 3): the DivQAT extraction study, quick preset (~14 min on a 2-core Xeon). `qrobust demo` is the
# shorter float -> 8-bit QAT -> int8 deployment demo.
demo: setup data
	$(VENV)/bin/qrobust run divqat --preset quick

test: setup data
	$(PY) -m pytest tests

bench: setup data
	$(PY) benchmarks/bench.py

# ruff, and the layers of docs/ARCHITECTURE.md (import-linter; contract in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) runs bench.json
