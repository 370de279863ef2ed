"""Save, kill the process, resume: the next step's loss and the final weights equal the uninterrupted run's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_resume_worker.py")


def _run(out: Path, *args) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    return subprocess.run([sys.executable, str(WORKER), str(out), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300).returncode


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["sft/loss"] for r in rows}


def test_killed_run_resumes_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run(straight) == 0
    assert _run(killed, 3) == 3  # died inside step 3; the step-2 checkpoint is the newest complete one
    assert (killed / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert _run(killed) == 0  # resumes at step 3
    ref, got = _losses(straight), _losses(killed)
    assert got[3] == ref[3] and got[4] == ref[4], (ref, got)
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
