# FM Server developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch requirement installed before the project, and the wheel index it comes from (empty: pip's
# configured index). 2.13.0 is the CPU build on the project's CI machines; on a CUDA box use e.g.
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cu130` (torch 2.13 is built for CUDA 12.6
# and 13.0). A torch already importable in $(VENV) is kept.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# The project's extras, comma-separated; the Docker image installs with EXTRAS= (no test tools).
EXTRAS ?= test
TORCH_STAMP := $(VENV)/.torch
STAMP := $(VENV)/.installed
# Debian packages the tests drive for real: a JACK server with its dummy backend (MIDI ports), headless
# Chromium (browser page), fluidsynth and a small General MIDI soundfont (audio renders), docker-compose
# v1 (validates the compose files without a Docker engine), and Redis and HAProxy (the scale-out
# deployment, run as processes by tests/cluster_harness.py).
APT_TEST_PACKAGES ?= jackd2 chromium fluidsynth timgm6mb-soundfont docker-compose redis-server haproxy
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: help torch install serve test test-deps corpus clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	touch $(TORCH_STAMP)

$(STAMP): $(TORCH_STAMP) pyproject.toml Makefile
	$(PY) -m pip install --quiet -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $(STAMP)

torch: $(TORCH_STAMP)  ## create .venv and install torch only (the Docker image caches this step)

install: $(STAMP)  ## create .venv and install the project with its extras (EXTRAS=test)

serve: $(STAMP)  ## set up (first run) and start the server with the shipped checkpoint
	$(PY) -m server --host $(HOST) --port $(PORT)

test-deps:  ## install the Debian packages the tests need (only those missing; uses sudo when not root)
	@missing=""; for p in $(APT_TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: $(STAMP) test-deps  ## set everything up (first run) and run the whole test suite
	$(PY) -m pytest

corpus: $(STAMP)  ## tokenize ../shared/data/bach_midi and print the corpus summary
	$(PY) -m model.corpus --midi_dir ../shared/data/bach_midi

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .cache
