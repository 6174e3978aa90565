# Developer and CI entry points (.ci/run calls `make test`).
#
#   make venv        .venv with torch 2.13.0 (CPU wheel) and pima-hpc[mpi,tune,test,umap], editable
#   make test        the whole test suite (the Slurm tests need tools/ci/slurm_up.sh first)
#   make run         train on the bundled digits data (configs/digits.yaml)
#   make slurm-up    start the single-node Slurm cluster of tools/ci/ (make slurm-down stops it)
#
# The venv is rebuilt only when setup.py changes or the stamp is gone (`make clean-venv`).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
VENV_STAMP := $(VENV)/.pima-hpc-installed

.PHONY: help venv test run slurm-up slurm-down clean-venv

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

venv: $(VENV_STAMP)

# torch first and pinned: the project's range (torch>=2.1,<2.14) is then already satisfied, so
# the second install does not replace the CPU build with the registry's newest CUDA build.
$(VENV_STAMP): setup.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(VENV)/bin/python -m pip install --quiet -e '.[mpi,tune,test,umap]'
	@touch $@

test: $(VENV_STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests

run: $(VENV_STAMP)
	$(VENV)/bin/pima train configs/digits.yaml

slurm-up:
	tools/ci/slurm_up.sh

slurm-down:
	tools/ci/slurm_down.sh

clean-venv:
	rm -rf $(VENV)
