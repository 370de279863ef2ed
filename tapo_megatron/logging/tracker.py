"""Per-step metrics to JSONL (always) and wandb (offline by default; online when WANDB_API_KEY is set).

``metrics.jsonl`` survives restarts: a resumed run (``resume_step=N``) keeps the rows up to step N and appends, so
rows of steps after the checkpoint (logged, then lost with a kill) are not doubled; a fresh start in a directory
that already has a log moves it aside to ``metrics.<k>.jsonl`` instead of truncating it.

wandb records besides the scalars: the run config as a ``config`` artifact (``config.yaml``), a table of rollout
samples every ``logging.sample_table_interval`` steps (``log_rollout_samples``; also ``samples.jsonl``), the final HF
export as a ``model`` artifact (``log_export``). A resumed run continues the same wandb run: its id is kept in
``<output_dir>/wandb_run.json``.
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
        self._wandb = start_wandb(self.output_dir, run_name, config, resolve_wandb_mode(wandb_mode), project,
                                  resume)

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

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list]) -> None:
        """A wandb table at ``step``; the rows also go to ``<output_dir>/<key's last part>.jsonl``."""
        with open(self.output_dir / f"{key.rsplit('/', 1)[-1]}.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, row))}) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_artifact(self, path: str | Path, name: str, kind: str, reference: bool = False) -> None:
        """``path`` (a file or folder) as a wandb artifact; ``reference``: record paths and checksums, no copy
        (a model export stays where it is on the shared filesystem)."""
        if self._wandb is None:
            return
        import wandb

        art = wandb.Artifact(name, type=kind)
        path = Path(path).resolve()
        if reference:
            art.add_reference(path.as_uri(), max_objects=100_000)
        elif path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self._wandb.log_artifact(art)

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


WANDB_STATE = "wandb_run.json"


def start_wandb(output_dir: Path, run_name: str, config: dict, mode: str, project: str, resume: bool):
    """The wandb run (None when disabled). A resume continues the run recorded in ``<output_dir>/wandb_run.json``;
    the config is logged as an artifact once per run."""
    if mode == "disabled":
        return None
    import wandb
    import yaml

    state_path = output_dir / WANDB_STATE
    previous = json.loads(state_path.read_text()).get("id") if resume and state_path.is_file() else None
    run = wandb.init(project=project, name=run_name, mode=mode, dir=str(output_dir), reinit="finish_previous",
                     id=previous, resume="allow" if previous else None,
                     config={**config, "git_commit": git_commit(),
                             "container_image": os.environ.get("TAPO_CONTAINER_IMAGE", "")})
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"id": run.id, "project": project, "name": run_name}) + "\n")
    os.replace(tmp, state_path)
    if previous is None:
        cfg_file = output_dir / "config.yaml"
        cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
        art = wandb.Artifact(f"config-{run.id}", type="config")
        art.add_file(str(cfg_file))
        run.log_artifact(art)
    return run


SAMPLE_COLUMNS = ["query_id", "kind", "reward", "advantage", "prompt", "response", "injected"]
INJECTED_OPEN, INJECTED_CLOSE = "⟦", "⟧"  # ⟦ ⟧ around the constructor's text inside a response


def sample_rows(trajectories, tokenizer, limit: int) -> list[list]:
    """Up to ``limit`` trajectories as table rows, half constructed and half original where there are enough: the
    response with the injected part between ⟦ ⟧, and the injected text alone."""
    from tapo_megatron.records import Provenance, TrajectoryKind

    built = [t for t in trajectories if t.kind == TrajectoryKind.CONSTRUCTED]
    plain = [t for t in trajectories if t.kind != TrajectoryKind.CONSTRUCTED]
    n_built = min(len(built), max((limit + 1) // 2, limit - len(plain)))
    chosen = built[:n_built] + plain[:limit - n_built]
    rows = []
    for t in chosen:
        spans, injected = [], []
        start = 0
        for i in range(1, len(t.response_ids) + 1):  # runs of equal provenance, decoded run by run
            if i == len(t.response_ids) or t.provenance[i] != t.provenance[start]:
                text = tokenizer.decode(t.response_ids[start:i])
                if t.provenance[start] == Provenance.INJECTED:
                    injected.append(text)
                    text = f"{INJECTED_OPEN}{text}{INJECTED_CLOSE}"
                spans.append(text)
                start = i
        rows.append([t.query_id, t.kind.value, float(t.reward), float(t.advantage), tokenizer.decode(t.prompt_ids),
                     "".join(spans), " | ".join(injected)])
    return rows


def log_rollout_samples(logger, logging_cfg, step: int, trajectories, tokenizer) -> None:
    """Every ``logging.sample_table_interval`` steps: the step's trajectories as the ``rollout/samples`` table
    (rank 0; ``logger`` is None elsewhere)."""
    every = logging_cfg.sample_table_interval
    if logger is None or not every or step % every or not trajectories:
        return
    logger.log_table(step, "rollout/samples", SAMPLE_COLUMNS,
                     sample_rows(trajectories, tokenizer, logging_cfg.sample_table_rows))


def log_export(logger, export_dir: str, run_name: str) -> None:
    """The final HF export as a ``model`` artifact (by reference: paths and checksums, the files stay put)."""
    if logger is not None and export_dir and Path(export_dir).is_dir():
        logger.log_artifact(export_dir, f"{run_name or 'model'}-hf", "model", reference=True)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
