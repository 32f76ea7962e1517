# Two commands (see README):
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv if needed and run the whole test suite (what CI runs)
#   make book   build the course as a static website (book/_build/html)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: on the course machines a CPU wheel of this version lies on disk, and an unpinned
# torch would pull a multi-GB CUDA build. Any torch >= 2.4 works with the code: override with TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
LAB_PORT ?= 8888
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test book clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$*]"
	touch $@

lab: $(VENV)/.installed-lessons
	$(BIN)/jupyter lab --port=$(LAB_PORT) --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/lessons $(ALLOW_ROOT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# The rendered book (book/README.md): a static site in book/_build/html, built offline from the stored outputs.
book: $(VENV)/.installed-book
	$(BIN)/python book/build.py

clean-venv:
	rm -rf $(VENV)
