# Two commands for a new user: `make demo` and `make test`. Both build the CPU environment first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_SILENT := true

.PHONY: venv demo test test-all bench clean

venv: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.2
	$(PY) -m pip install -q -r requirements-cpu.txt
	# megatron-core's metadata says Python >= 3.12, but its cp311 wheel works (STACK_NOTES).
	$(PY) -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: venv
	$(VENV)/bin/tapo demo

test: venv
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) -m tapo_kernels.bench

clean:
	rm -rf $(VENV) runs build *.egg-info
