# The two set-up commands of the README. Both install torch 2.13.0 first so that pip
# does not pull a CUDA build on a CPU-only machine (on a GPU machine, install your torch first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-dev demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .

install-dev:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"

demo: install
	thruput demo

test: install-dev
	$(PYTHON) -m pytest -q
