# syntax=docker/dockerfile:1
# slimserve images, two targets from one file (docs/cluster.md):
#
#   make docker                        # = docker build --target cpu -t slimserve:cpu .
#   make docker DOCKER_TARGET=gpu      # CUDA base, CUDA torch, TensorRT ([tensorrt] extra)
#   docker run --init --shm-size=2g -p 8000:8000 -v "$PWD/artifacts:/app/artifacts" slimserve:cpu
#
# Both install with `make venv` and start with `serve run serve_config.yaml`, the commands the
# README gives (tests/deploy/test_docker.py keeps them the same, so CI exercises them). The
# image's serve_config.yaml is the repository's, bound to 0.0.0.0 (deploy/gen_rayservice.py).
# Artifacts: mount a built artifacts/ folder at /app/artifacts (the default), or bake the tiny
# profile's in at build time with `make docker BUILD_ARTIFACTS=true`.
#
# Python is the same CPython build in both images (python-build-standalone, installed by uv),
# so one builder recipe serves a Debian and an Ubuntu/CUDA runtime: it needs nothing but glibc.

ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9
ARG DEBIAN_IMAGE=debian:12.12-slim
# The GPU stack, in one place. The CUDA base image, torch's CUDA wheels (TORCH_CUDA, from
# download.pytorch.org; torch's version is pyproject.toml's pin, the same in both images) and
# TensorRT's tensorrt-cu<major> package must share a CUDA major version, and onnxruntime-gpu
# must be a build for it too (tests/deploy/test_gpu_image.py checks what a file can show).
ARG CUDA_VERSION=13.0.2
ARG TORCH_CUDA=cu130
ARG TENSORRT_VERSION=11.4.0.106
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
ARG CUDA_IMAGE=nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------- builder: Python, make, venv
FROM ${DEBIAN_IMAGE} AS builder
ARG PYTHON_VERSION=3.11.18
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
# /opt/python/python3 -> the real interpreter, so `make venv PY=...` needs no version string.
RUN uv python install "${PYTHON_VERSION}" \
    && ln -s "$(uv python find --no-project "${PYTHON_VERSION}")" /opt/python/python3
WORKDIR /app

# CPU: torch's CPU wheel (PyPI's Linux torch is the CUDA build), onnxruntime ([cpu] extra).
FROM builder AS build-cpu
ARG BUILD_ARTIFACTS=false
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    make venv EXTRAS=dev,cpu PY="$(readlink -f /opt/python/python3)" \
    && .venv/bin/python deploy/gen_rayservice.py --bind-all serve_config.yaml \
    && mkdir -p artifacts \
    && if [ "${BUILD_ARTIFACTS}" = "true" ]; then make artifacts; fi

# GPU: torch's CUDA wheel, onnxruntime-gpu ([gpu] extra) INSTEAD of onnxruntime (both install
# the `onnxruntime` module, so they cannot live side by side) and TensorRT, all for CUDA_VERSION;
# the last line fails the build if ORT lacks its CUDA provider or torch's CUDA differs.
FROM builder AS build-gpu
ARG BUILD_ARTIFACTS=false
ARG CUDA_VERSION
ARG TORCH_CUDA
ARG TENSORRT_VERSION
ARG ONNXRUNTIME_GPU_VERSION
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    make venv EXTRAS=dev,gpu PY="$(readlink -f /opt/python/python3)" \
    && .venv/bin/pip install "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
        "tensorrt-cu${CUDA_VERSION%%.*}==${TENSORRT_VERSION}" \
    && .venv/bin/python -c "import onnxruntime as o, torch; assert 'CUDAExecutionProvider' in o.get_available_providers(); assert torch.version.cuda.split('.')[0] == '${CUDA_VERSION%%.*}', torch.version.cuda" \
    && .venv/bin/python deploy/gen_rayservice.py --bind-all serve_config.yaml \
    && mkdir -p artifacts \
    && if [ "${BUILD_ARTIFACTS}" = "true" ]; then make artifacts; fi

# ---------------------------------------------------------------- runtime images
# No apt packages: Python and every library come from the builder; HTTPS (the hub, datasets)
# uses certifi's CA bundle from the venv (its path names Python 3.11, as PYTHON_VERSION does).
# The service runs as uid 10001 (numeric, so Kubernetes' runAsNonRoot can check it), owns only
# /app/artifacts, and cannot change the code or the venv.
FROM ${DEBIAN_IMAGE} AS cpu
ENV PATH=/app/.venv/bin:${PATH} \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    SSL_CERT_FILE=/app/.venv/lib/python3.11/site-packages/certifi/cacert.pem \
    HF_HOME=/app/artifacts/.cache/huggingface
RUN groupadd --system --gid 10001 slimserve \
    && useradd --system --uid 10001 --gid slimserve --create-home --shell /bin/bash slimserve
COPY --from=build-cpu /opt/python /opt/python
COPY --from=build-cpu /app /app
COPY --from=build-cpu --chown=10001:10001 /app/artifacts /app/artifacts
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Replicas load models first: allow a few minutes before a failing check counts.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=8)"]
# `serve run` shuts Serve down cleanly on Ctrl-C (SIGINT); `docker stop` sends this.
STOPSIGNAL SIGINT
CMD ["serve", "run", "serve_config.yaml"]

FROM ${CUDA_IMAGE} AS gpu
ENV PATH=/app/.venv/bin:${PATH} \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    SSL_CERT_FILE=/app/.venv/lib/python3.11/site-packages/certifi/cacert.pem \
    HF_HOME=/app/artifacts/.cache/huggingface
RUN groupadd --system --gid 10001 slimserve \
    && useradd --system --uid 10001 --gid slimserve --create-home --shell /bin/bash slimserve
COPY --from=build-gpu /opt/python /opt/python
COPY --from=build-gpu /app /app
COPY --from=build-gpu --chown=10001:10001 /app/artifacts /app/artifacts
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=8)"]
STOPSIGNAL SIGINT
CMD ["serve", "run", "serve_config.yaml"]
