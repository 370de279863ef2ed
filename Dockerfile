# H100 training image: CUDA 13 + PyTorch + Transformer Engine + NVIDIA apex + megatron-core + SGLang + tapo-megatron.
# Every version comes from versions.env (sourced in each RUN; only the base image is a build argument):
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

COPY versions.env /opt/tapo/versions.env

# PyTorch first: everything below builds against it.
RUN . /opt/tapo/versions.env && \
    pip install --index-url ${TORCH_CUDA_INDEX} torch==${TORCH_VERSION} && \
    pip install triton==${TRITON_VERSION} numpy==${NUMPY_VERSION} packaging==${PACKAGING_VERSION} \
        psutil==${PSUTIL_VERSION} pybind11 einops

# Transformer Engine: the cu13 core wheel plus transformer-engine-torch, which builds from source against this torch.
RUN . /opt/tapo/versions.env && \
    pip install --no-build-isolation "transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}"

# NVIDIA apex comes only from source (the PyPI "apex" is an unrelated package); fused Adam / norms for Megatron.
RUN . /opt/tapo/versions.env && \
    git clone https://github.com/NVIDIA/apex /tmp/apex && cd /tmp/apex && git checkout ${APEX_REF} && \
    APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation . && \
    cd / && rm -rf /tmp/apex

# megatron-core without deps (its requirements would move torch); SGLang with its kernels (same torch pin).
RUN . /opt/tapo/versions.env && \
    pip install --no-deps megatron-core==${MEGATRON_CORE_VERSION} && \
    pip install sglang==${SGLANG_VERSION} torch==${TORCH_VERSION} --extra-index-url ${TORCH_CUDA_INDEX} && \
    pip install transformers==${TRANSFORMERS_VERSION} tokenizers==${TOKENIZERS_VERSION} \
        safetensors==${SAFETENSORS_VERSION} wandb==${WANDB_VERSION} math-verify==${MATH_VERIFY_VERSION} \
        tqdm==${TQDM_VERSION} pyyaml==${PYYAML_VERSION} matplotlib==${MATPLOTLIB_VERSION} \
        nemo-run==${NEMO_RUN_VERSION} leptonai==${LEPTONAI_VERSION} torch==${TORCH_VERSION} \
        --extra-index-url ${TORCH_CUDA_INDEX}

# This package last, so code edits rebuild only this layer.
COPY . /opt/tapo-megatron
RUN pip install --no-deps --no-build-isolation -e /opt/tapo-megatron && \
    python -c "import tapo_megatron, megatron.core, sglang, nemo_run, apex; print('tapo-megatron image ok')"

WORKDIR /opt/tapo-megatron
CMD ["tapo", "--help"]
