"""Benchmark evaluation behind ``tapo eval``: Pass@k, DSR and ERR of one checkpoint on AIME24 / AIME25 / HMMT25 (or any JSONL), and side-by-side
comparisons of several evaluated runs.

    tapo eval --model DIR_OR_CKPT --out runs/eval/tapo [--benchmarks aime24 aime25 hmmt25] [--n 16]
              [--temperature 0.7] [--top-p 0.8] [--max-new-tokens 4096] [--tokenizer DIR] [--limit N] [--greedy]
    tapo eval --compare runs/eval/cold runs/eval/grpo runs/eval/tapo [--labels ...] --out runs/eval/compare

``--model`` is an HF Qwen3 directory or a Megatron checkpoint (an actor ``save`` dir, an ``iter_*`` dir, or
``tapo convert hf-to-mcore`` output; converted on the fly by ``rollout.policy.load_policy``). Generation is plain
single-pass (Qwen3 non-thinking chat prompt), n samples per problem; the math verifier scores them. The defaults
temperature 0.7 / top-p 0.8 are Qwen3's recommended non-thinking settings (the paper's are not published).

Outputs in ``--out``: ``<benchmark>.samples.jsonl`` (one ``evaluation.EvalSample`` per line: query_id, sample index,
response, extracted_answer, correct, reflective, num_tokens), ``summary.json`` (settings, model, version, and per
benchmark: num_problems, pass@k for k in {1, 2, 4, 8, 16} with k <= n (unbiased 1 - C(n-c, k)/C(n, k), averaged
over problems), dsr, err, reflection_rate, mean_response_tokens, bad rows), ``summary.md`` (the printed table) and
``summary.png`` (bars). ``--compare`` reads several ``summary.json`` and writes ``compare.md`` and one
``compare_<benchmark>.png`` per benchmark. Metrics come from ``evaluation.evaluate``, the function the RL loop calls
every ``eval_interval`` steps.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tapo_megatron.config import RolloutConfig
from tapo_megatron.data.assets import EVAL_SETS, resolve_dataset
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.errors import CheckpointNotFoundError, ConfigError, DataError
from tapo_megatron.evaluation.core import evaluate
from tapo_megatron.logging.plots import plot_bars
from tapo_megatron.rewards import get_reward
from tapo_megatron.rollout.policy import PolicySource, load_policy
from tapo_megatron.tasks.math import load_eval_set

__all__ = ["BENCHMARKS", "EvalSettings", "resolve_benchmark", "run_eval", "format_table", "compare_runs",
           "SUMMARY_FILE"]

BENCHMARKS = EVAL_SETS  # short names of the shipped eval sets -> their files; any other name is a JSONL path
SUMMARY_FILE = "summary.json"
TABLE_METRICS = ["pass@1", "pass@2", "pass@4", "pass@8", "pass@16", "dsr", "err"]
PLOT_METRICS = ["pass@1", "pass@16", "dsr", "err"]


@dataclass
class EvalSettings:
    """How one evaluation samples; stored in summary.json so compared runs can be checked for like-for-like."""

    n_samples: int = 16  # per problem
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 4096
    ks: tuple[int, ...] = (1, 2, 4, 8, 16)
    seed: int = 0
    greedy: bool = False  # also one greedy sample per problem (greedy_accuracy)
    limit: int = 0  # first N problems of each benchmark; 0: all
    on_bad_row: str = "skip"  # skip | raise
    reward: str = "math"
    num_threads: int = 1  # native engine torch threads


def resolve_benchmark(name: str) -> tuple[str, Path]:
    """``"aime24"`` -> ("aime24", the shipped aime2024.jsonl); a path -> (its stem, path)."""
    path = resolve_dataset(name)
    return (name if name in BENCHMARKS else path.stem), path


def run_eval(model: str | Path | None, benchmarks: list[str], out_dir: str | Path, settings: EvalSettings, *,
             tokenizer_path: str | Path | None = None, engine: str = "native", label: str = "",
             policy: PolicySource | None = None) -> dict:
    """Evaluate one checkpoint on each benchmark; write samples, summary.json/.md/.png; return the summary dict.

    Args:
        model: HF dir or Megatron checkpoint (ignored when ``policy`` is given).
        benchmarks: short names (``BENCHMARKS``) or JSONL paths.
        out_dir: output folder (created).
        settings: sampling and metric settings.
        tokenizer_path: tokenizer folder; None: the one shipped with the checkpoint.
        engine: rollout engine kind (``native``; ``sglang`` where installed).
        label: the run's name in tables; default: the out_dir name.
        policy: an already loaded engine (tests, or callers that hold one).
    """
    if settings.n_samples < 1 and not settings.greedy:
        raise ConfigError("n_samples must be >= 1 (or pass greedy=True)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if policy is None:
        if model is None:
            raise ConfigError("give a model (HF dir or Megatron checkpoint) to evaluate")
        policy = load_policy(model, RolloutConfig(engine=engine, num_threads=settings.num_threads),
                                      settings.seed)
    tok_dir = tokenizer_path or policy.tokenizer_dir
    if tok_dir is None:
        raise CheckpointNotFoundError(f"{policy.model_name} ships no tokenizer files: pass --tokenizer DIR")
    tokenizer = load_tokenizer(tok_dir)
    reward_fn = get_reward(settings.reward)
    summary = {"label": label or out.name, "model": policy.model_name, "model_version": policy.model_version,
               "tokenizer": str(tok_dir), "settings": asdict(settings), "benchmarks": {}}
    for name in benchmarks:
        bench, qf = load_eval_set(name, tokenizer, settings.on_bad_row, limit=settings.limit or None,
                                  check_answers=settings.reward == "math")
        path = qf.path
        for bad in qf.bad_rows:
            print(f"[eval] skipped bad row {bad}", flush=True)
        result = evaluate(policy.engine, qf.queries, reward_fn, tokenizer, n_samples=settings.n_samples,
                          temperature=settings.temperature, top_p=settings.top_p,
                          max_new_tokens=settings.max_new_tokens, greedy=settings.greedy, ks=tuple(settings.ks),
                          seed=settings.seed, samples_path=out / f"{bench}.samples.jsonl")
        result["bad_rows"] = [str(b) for b in qf.bad_rows]
        result["file"] = str(path)
        summary["benchmarks"][bench] = result
    summary["seconds"] = time.perf_counter() - t0
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))  # NaN (undefined DSR/ERR) stays NaN
    table = format_table({summary["label"]: summary})
    (out / "summary.md").write_text(table + "\n")
    print(table, flush=True)
    plot_bars({b: s for b, s in summary["benchmarks"].items()}, [m for m in PLOT_METRICS if _any(summary, m)],
              out / "summary.png", title=f"{summary['label']}: n={settings.n_samples}, T={settings.temperature}")
    return summary


def _any(summary: dict, metric: str) -> bool:
    return any(metric in s for s in summary["benchmarks"].values())


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def format_table(runs: dict[str, dict], metrics: list[str] | None = None) -> str:
    """A markdown table, one row per (run, benchmark), metrics in % ("–" where undefined or k > n).

    ``runs``: label -> summary dict (as returned by ``run_eval`` / read from summary.json).
    """
    metrics = metrics or [m for m in TABLE_METRICS if any(m in s for r in runs.values()
                                                            for s in r["benchmarks"].values())]
    lines = ["| run | benchmark | problems | n | " + " | ".join(m.replace("dsr", "DSR").replace("err", "ERR")
                                                               for m in metrics) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for label, run in runs.items():
        for bench, s in run["benchmarks"].items():
            lines.append(f"| {label} | {bench} | {int(s['num_problems'])} | {run['settings']['n_samples']} | "
                         + " | ".join(_cell(s.get(m)) for m in metrics) + " |")
    return "\n".join(lines)


@dataclass
class Comparison:
    table: str
    pngs: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> Comparison:
    """Side-by-side table and one bar chart per benchmark for runs evaluated by ``run_eval``."""
    if labels and len(labels) != len(run_dirs):
        raise ConfigError(f"--labels has {len(labels)} names for {len(run_dirs)} runs")
    runs: dict[str, dict] = {}
    for i, run_dir in enumerate(run_dirs):
        path = Path(run_dir) / SUMMARY_FILE
        if not path.is_file():
            raise DataError(f"{path} not found: evaluate the run with `tapo eval --model ... --out "
                                    f"{run_dir}` first")
        summary = json.loads(path.read_text())
        label = labels[i] if labels else summary.get("label") or Path(run_dir).name
        if label in runs:
            raise ConfigError(f"two runs are labelled {label!r}: pass --labels")
        runs[label] = summary
    warnings = []
    first_label, first = next(iter(runs.items()))
    for label, run in runs.items():  # different sampling settings make the numbers incomparable: say so
        for key in ("n_samples", "temperature", "top_p", "max_new_tokens"):
            if run["settings"][key] != first["settings"][key]:
                warnings.append(f"{label}: {key}={run['settings'][key]} differs from {first_label}'s "
                                f"{first['settings'][key]}")
    table = format_table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n" + "".join(f"\nwarning: {w}" for w in warnings) + "\n")
    pngs = []
    benches = list(dict.fromkeys(b for r in runs.values() for b in r["benchmarks"]))
    for bench in benches:
        table_b = {label: r["benchmarks"][bench] for label, r in runs.items() if bench in r["benchmarks"]}
        metrics = [m for m in PLOT_METRICS if any(m in s for s in table_b.values())]
        pngs.append(plot_bars(table_b, metrics, out / f"compare_{bench}.png", title=bench))
    return Comparison(table, pngs, warnings)
