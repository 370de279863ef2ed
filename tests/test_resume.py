"""Save, kill the process, resume: the next step's loss and the final weights equal the uninterrupted run's."""
import json
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_resume_worker.py")


@pytest.fixture
def run(workers):
    return lambda out, *args: workers.run(WORKER, out, *args, check=False).returncode


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["sft/loss"] for r in rows}


def test_killed_run_resumes_exactly(tmp_path, run):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run(straight) == 0
    assert run(killed, 3) == 3  # died inside step 3; the step-2 checkpoint is the newest complete one
    assert (killed / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert run(killed) == 0  # resumes at step 3
    ref, got = _losses(straight), _losses(killed)
    assert got[3] == ref[3] and got[4] == ref[4], (ref, got)
    a, b = torch.load(straight / "final.pt"), torch.load(killed / "final.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
