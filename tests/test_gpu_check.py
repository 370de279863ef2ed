"""`make gpu-check` cannot rot: its CPU dry mode (tiny shapes, Triton interpreted) runs here end to end and writes the
JSON the GPU run writes, with parity checked for real and speed targets reported as SKIP."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "ops" / "gpu_check.py"), "--dry", "--iters", "1",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    targets = [k for k, v in result.items() if isinstance(v, dict) and "pass" in v]
    assert targets == ["kernel_parity_T8", "kernel_speed_T8", "kernel_memory_T8", "kernel_parity_T16",
                       "kernel_speed_T16", "kernel_memory_T16", "train_step", "weight_sync"]
    assert result["kernel_parity_T16"]["pass"] is True and result["kernel_parity_T16"]["grad_vs_megatron"] < 1e-2
    assert result["weight_sync"]["engine_weights_equal_actor"] is True
    assert result["train_step"]["tokens_per_s"] > 0 and result["kernel_speed_T8"]["pass"] is None
    for name in targets:
        assert any(line.split(" ", 1)[0] in ("PASS", "SKIP") and f" {name}:" in line
                   for line in proc.stdout.splitlines()), name


def test_gpu_check_verdicts_fail_on_a_missed_target():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "ops" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    lines, failed = gc.verdicts({"dry": False, "kernel_parity_T4096": {"pass": True, "err": 1e-4},
                                 "train_step": {"pass": False, "mfu": 0.05}, "weight_sync": {"pass": None}})
    assert failed and lines == ["PASS kernel_parity_T4096: err=0.0001", "FAIL train_step: mfu=0.05",
                                "SKIP (dry run: not a speed measurement) weight_sync: "]
    assert not gc.verdicts({"a": {"pass": True}})[1]
