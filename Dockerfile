# FM Server image: `docker compose up` (GPU) or `docker compose -f docker-compose.cpu.yml up` (CPU);
# see the README's "Deploy". The project is installed by `make install`, exactly as the README does,
# so the image has no dependency list of its own: pyproject.toml is the only one.
#
# Default: CUDA 13.0 runtime with torch's cu130 build (they must match; NVIDIA driver >= 580).
# Older drivers or pre-Turing GPUs, the CUDA 12.6 pair:
#   --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# No GPU (docker-compose.cpu.yml): BASE_IMAGE=ubuntu:24.04, TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# The wheel index torch comes from (the Makefile's TORCH_INDEX); the torch version is the Makefile's.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
# The uid the server runs as: make it the owner of the folder mounted on /app/runs.
ARG UID=1000

# What `make install` needs (python3-venv, make), and ALSA, which python-rtmidi's wheel links to.
# Versions are those of the base image's Ubuntu release: pinning them breaks at each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv make libasound2t64 \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user; Ubuntu images ship a user "ubuntu" that already holds uid 1000.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid "${UID}" --shell /usr/sbin/nologin fm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app

# torch in a layer of its own: it is most of the image and changes far less often than the code.
COPY Makefile pyproject.toml README.md ./
RUN make torch TORCH_INDEX="${TORCH_INDEX}"

COPY model/ model/
COPY server/ server/
COPY client/ client/
RUN make install EXTRAS= TORCH_INDEX="${TORCH_INDEX}" \
    && mkdir runs && chown fm:fm runs

# The shipped checkpoint, where the server looks by default; user checkpoints come in on /app/runs.
COPY checkpoints/default/ checkpoints/default/

ENV PATH=/app/.venv/bin:$PATH \
    FM_PORT=8000
USER ${UID}
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['FM_PORT'] + '/health', timeout=5)"]
CMD ["python", "-m", "server", "--host", "0.0.0.0"]
