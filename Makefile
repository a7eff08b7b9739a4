# FM Server developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch requirement installed before the project. 2.13.0 is the CPU build on the project's CI
# machines; on a CUDA box use e.g. `make install TORCH="torch --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: help install test corpus clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project with its test extra

test: $(STAMP)  ## set everything up (first run) and run the whole test suite
	$(PY) -m pytest

corpus: $(STAMP)  ## tokenize ../shared/data/bach_midi and print the corpus summary
	$(PY) -m model.data --midi_dir ../shared/data/bach_midi

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .cache
