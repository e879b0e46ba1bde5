# `make demo`: set up .venv and train the default model with DiffQ (a few minutes on 2 CPU cores).
# `make test`: set up .venv and run the test suite, one test file per worker on every core (pytest-xdist).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0  # the CPU wheel; a bare `torch` would pull a CUDA build
	$(PY) -m pip install --quiet -e ".[dev,onnx,cli,sweep]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m qat_lightning.train

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile

bench: setup
	$(PY) benchmarks/step_overhead.py
