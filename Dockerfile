# H100 training image: CUDA 13 + PyTorch + Transformer Engine + NVIDIA apex + megatron-core + SGLang + tapo-megatron.
# Every version comes from versions.env (sourced in each RUN; only the base image is a build argument). Check that
# the Python layer resolves, without docker: `make image-check`. Build:
#   docker build -t tapo-megatron:$(git rev-parse --short HEAD) \
#     --build-arg CUDA_IMAGE=$(sed -n 's/^CUDA_IMAGE=//p' versions.env) --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG GIT_COMMIT=unknown
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS=16 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TAPO_MODELS=/models \
    TAPO_RUNS=/runs \
    TAPO_GIT_COMMIT=${GIT_COMMIT}

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv git build-essential ninja-build cmake libibverbs-dev \
        ca-certificates curl && \
    rm -rf /var/lib/apt/lists/* && \
    python3 -m venv $VIRTUAL_ENV && pip install --upgrade pip setuptools wheel

COPY versions.env requirements-image.txt /opt/tapo/

# The whole Python layer in one resolve, exactly what `make image-check` resolves (versions.env exported for pip's
# ${VAR} expansion): torch (PyPI's CUDA 13 build), triton, the TE core wheel, megatron-core, SGLang and its kernels
# (flashinfer, flash-attn-4), transformers, wandb, nemo-run.
RUN set -a && . /opt/tapo/versions.env && set +a && \
    pip install -r /opt/tapo/requirements-image.txt

# Transformer Engine's PyTorch extension: sdist only, compiled against the torch above (its requirements are in the
# layer above; image-check checks them against the sdist).
RUN . /opt/tapo/versions.env && \
    pip install --no-deps --no-build-isolation transformer-engine-torch==${TRANSFORMER_ENGINE_VERSION}

# NVIDIA apex comes only from source (the PyPI "apex" is an unrelated package); fused Adam / norms for Megatron.
RUN . /opt/tapo/versions.env && \
    git clone --depth 1 --branch ${APEX_REF} https://github.com/NVIDIA/apex /tmp/apex && \
    APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-deps --no-build-isolation /tmp/apex && \
    rm -rf /tmp/apex

# This package last, so code edits rebuild only this layer.
COPY . /opt/tapo-megatron
RUN pip install --no-deps --no-build-isolation -e /opt/tapo-megatron && \
    python -c "import tapo_megatron, megatron.core, sglang, nemo_run, apex, transformer_engine.pytorch; print('tapo-megatron image ok')" && \
    pip check

WORKDIR /opt/tapo-megatron
CMD ["tapo", "--help"]
