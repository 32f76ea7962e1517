# Two main commands (see README; `make help` lists everything):
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv if needed and run the whole test suite (what CI runs)
#   make book   build the course as a static website (book/_build/html)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: an unpinned torch from PyPI on Linux is a multi-GB CUDA build. On the course
# machines a CPU wheel of this version lies on disk. Any torch >= 2.4 works with the code:
# `make lab TORCH_SPEC=torch==2.5.1 CONSTRAINTS=` (the constraints pin the tested 2.13.0).
TORCH_SPEC ?= torch==2.13.0
# PyTorch's package index for the torch install only, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
# for the CPU-only build on a Linux laptop. Passed as --index-url (not --extra-index-url), so that pip takes
# torch from that index alone: with an extra index, PyPI's CUDA build of the same version stays a candidate.
TORCH_INDEX ?=
# Versions CI tested, for the packages whose behaviour the course depends on; empty: no pins.
CONSTRAINTS ?= constraints.txt
TRAIN_ARGS ?=
LAB_PORT ?= 8888
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
PIP := $(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: help lab test train book clean-venv

help:
	@echo "make lab         create $(VENV), install the course (extra 'lessons'), open JupyterLab on port $(LAB_PORT)"
	@echo "make test        create $(VENV) if needed, install extra 'test', run the whole test suite (as CI)"
	@echo "make train       train the lessons' tiny DeepSeek on the CPU with a progress bar (python -m refimpl.train)"
	@echo "make book        build the course as a static website into book/_build/html (offline)"
	@echo "make clean-venv  delete $(VENV)"
	@echo
	@echo "variables (make lab NAME=value), with their values now:"
	@echo "  PYTHON       $(PYTHON): the Python that creates the venv (>= 3.10)"
	@echo "  VENV         $(VENV)"
	@echo "  TORCH_SPEC   $(TORCH_SPEC): the torch installed first"
	@echo "  TORCH_INDEX  '$(TORCH_INDEX)': PyTorch's index for torch, e.g. https://download.pytorch.org/whl/cpu"
	@echo "  CONSTRAINTS  '$(CONSTRAINTS)': pip constraints with the tested versions; empty for none"
	@echo "  TRAIN_ARGS   '$(TRAIN_ARGS)': e.g. TRAIN_ARGS='--steps 100 --gamma 0.01'"
	@echo "  LAB_PORT     $(LAB_PORT)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) -e ".[$*]"
	touch $@

lab: $(VENV)/.installed-lessons
	$(BIN)/jupyter lab --port=$(LAB_PORT) --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/lessons $(ALLOW_ROOT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# The rendered book (book/README.md): a static site in book/_build/html, built offline from the stored outputs.
book: $(VENV)/.installed-book
	$(BIN)/python book/build.py

train: $(VENV)/.installed-lessons
	$(BIN)/python -m refimpl.train $(TRAIN_ARGS)

clean-venv:
	rm -rf $(VENV)
