"""Shared test plumbing: one way to run a worker script as a plain process or under torchrun (gloo, CPU).

    def test_x(workers, tmp_path):
        proc = workers.run(WORKER, "arg", nproc=2)              # asserts exit 0, shows the output tail if not
        proc = workers.run(WORKER, "arg", check=False)           # returns the CompletedProcess; caller checks

``workers`` is session-scoped, so module-scoped fixtures can use it too.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"

# Every worker: one thread (2-core CI), no hub access, quiet wandb, the checkout and tests/ importable.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "WANDB_SILENT": "true", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}


class Workers:
    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **WORKER_ENV, **extra}

    def run(self, script: str | Path, *args, nproc: int = 1, timeout: float = 300, check: bool = True,
            env: dict[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run ``script`` with ``args``: one plain process, or ``nproc`` ranks under ``torch.distributed.run``."""
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = launcher + [str(script), *map(str, args)]
        proc = subprocess.run(cmd, env=self.env(**(env or {})), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)
        if check:
            assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout ---\n"
                                          f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
        return proc


@pytest.fixture(scope="session")
def workers() -> Workers:
    return Workers()
