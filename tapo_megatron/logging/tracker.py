"""Per-step metrics to JSONL (always) and wandb (offline by default; online when WANDB_API_KEY is set).

``metrics.jsonl`` survives restarts: a resumed run (``resume_step=N``) keeps the rows up to step N and appends, so
rows of steps after the checkpoint (logged, then lost with a kill) are not doubled; a fresh start in a directory
that already has a log moves it aside to ``metrics.<k>.jsonl`` instead of truncating it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository, when the package runs from a checkout


def git_commit() -> str:
    """HEAD of the checkout; installed (no .git beside the package, e.g. in the container) the commit baked in at
    build time ($TAPO_GIT_COMMIT)."""
    head = ""
    if (CHECKOUT / ".git").exists():
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            head = ""
    return head or os.environ.get("TAPO_GIT_COMMIT", "")


def resolve_wandb_mode(mode: str) -> str:
    """"auto": online when a key is configured, else offline. Explicit modes are kept."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class MetricsLogger:
    """Writes ``<output_dir>/metrics.jsonl`` and mirrors every record to wandb; use as a context manager."""

    def __init__(self, output_dir: str | Path, *, run_name: str, config: dict, wandb_mode: str = "auto",
                 project: str = "tapo-megatron", resume: bool = False, resume_step: int | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        _continue_log(self.path, resume_step)
        self._file = open(self.path, "a")
        self._wandb = None
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=project, name=run_name, mode=mode, dir=str(self.output_dir), reinit="finish_previous",
                config={**config, "git_commit": git_commit(),
                        "container_image": os.environ.get("TAPO_CONTAINER_IMAGE", "")})

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **{k: (None if isinstance(v, float) and not math.isfinite(v)
                                                           else v) for k, v in clean.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_images(self, images: dict[str, str | Path]) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({k: wandb.Image(str(v)) for k, v in images.items() if Path(v).is_file()})

    def upload_curves(self, keys: list[str], title: str) -> Path:
        """This run's curves of ``keys`` as ``curves.png`` next to metrics.jsonl, also logged to wandb."""
        from tapo_megatron.logging.plots import plot_curves

        png = plot_curves({self.output_dir.name: read_metrics(self.path)}, keys, self.output_dir / "curves.png",
                          title=title)
        self.log_images({"curves": png})
        return png

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _continue_log(path: Path, resume_step: int | None) -> None:
    """Prepare ``path`` for appending: rows up to ``resume_step`` kept (a torn last line dropped), or, on a fresh
    start (None), an existing log moved aside."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    if resume_step is None:
        k = 1
        while (aside := path.with_name(f"metrics.{k}.jsonl")).exists():
            k += 1
        os.replace(path, aside)
        print(f"[log] {path} existed and this run starts fresh: moved it to {aside}", flush=True)
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        print(f"[log] resuming at step {resume_step}: dropped {dropped} row(s) of {path} past the checkpoint (they "
              "are logged again)", flush=True)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
