# Two commands for a new user: `make demo` and `make test`. Both build the CPU environment first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_SILENT := true

.PHONY: venv venv-sglang demo test test-all bench clean image-check gpu-check gpu-wheel

venv: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.2
	$(PY) -m pip install -q -r requirements-cpu.txt
	# megatron-core's metadata says Python >= 3.12, but its cp311 wheel works (STACK_NOTES).
	$(PY) -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# SGLang contract-test environment (tests/test_sglang_contract.py): sglang's request classes need torch 2.14.1 +
# torchvision, so they get their own venv; the main env is untouched. ~3 min idle (STACK_NOTES); measured 14.5 min wall
# (2.7 min CPU) on a loaded 2-core machine; 5.7 GB, mostly the torch 2.14.1 wheel.
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed

venv-sglang: $(SGLANG_STAMP)

$(SGLANG_STAMP): requirements-sglang-contract.txt
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q -r requirements-sglang-contract.txt
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps sglang==0.5.23
	touch $(SGLANG_STAMP)

demo: venv
	$(VENV)/bin/tapo demo

test: venv venv-sglang
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m tapo_kernels.bench

# The GPU image's Python layer (requirements-image.txt + versions.env) resolved against the package registry for
# CPython 3.12 manylinux x86_64 without installing it; hadolint on the Dockerfile when installed. Needs the registry
# (network); ~2 min. Run by .ci/run after `make test`.
image-check: venv
	$(PY) ops/image_check.py

# One H100/H200 with only torch + Triton (+ transformers): kernel parity and speed, the actor's step (tokens/s, MFU)
# and a colocated weight sync, <= 8 min, one JSON (runs/gpu_check.json) and PASS/FAIL per target. megatron-core
# travels as a wheel: `make gpu-wheel` here (network), then copy the checkout with .whl/ to the GPU machine.
# The CPU dry mode is tests/test_gpu_check.py.
GPU_PYTHON ?= python3

gpu-wheel:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2

gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --target .gpu-site .whl/megatron_core-*.whl
	$(GPU_PYTHON) ops/gpu_check.py --out runs/gpu_check.json

clean:
	rm -rf $(VENV) $(SGLANG_VENV) runs build *.egg-info .gpu-site
