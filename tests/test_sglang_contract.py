"""The adapter and the weight-sync transports against SGLang's own code: request classes, argument parser, HTTP
handlers and the scheduler-side weight-update manager (session rules), see tests/_sync_sglang_contract.py.

SGLang cannot share the main CPU environment (its io_struct needs torchvision, which does not import beside the
torch 2.13 CPU wheel), so the checks live in tests/_sync_sglang_contract.py and run in the separate ``.venv-sglang``
(``make venv-sglang``, pinned in requirements-sglang-contract.txt). This test runs them there as a subprocess; it
skips, saying how to build the environment, only when that environment does not exist.
"""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv-sglang" / "bin" / "python"


@pytest.mark.skipif(not PYTHON.exists(), reason="no .venv-sglang: run `make venv-sglang` (about 3-15 min, 6 GB)")
def test_payloads_match_sglang_request_classes():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "_sync_sglang_contract.py")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
