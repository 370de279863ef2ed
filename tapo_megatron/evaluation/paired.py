"""Paired-seed comparison of RL arms: metrics from per-sample eval rows, bootstrap CIs, paired differences.

    rows = read_samples(path)                         # EvalSample rows of one (arm, seed) eval (JSONL)
    m = sample_metrics(rows)                          # greedy, pass@1, first_attempt, dsr, err
    table = compare_arms({arm: {seed: rows}}, baseline="grpo", n_boot=1000, seed=0)

Metrics (``METRICS``; rows with ``sample == -1`` are greedy, the others sampled):
    greedy        mean correctness of the greedy rows
    pass@1        per problem the share of its sampled rows that are correct, averaged over problems
    first_attempt sampled rows with a clean first attempt that end correct (algorithms.metrics.first_attempt_rate)
    dsr, err      algorithms.metrics.direct_solution_rate / effective_reflection_rate on the sampled rows

Bootstrap (hierarchical, the two sources of noise in a paired-seed experiment): one draw resamples the seeds with
replacement, then the problems with replacement (one problem draw shared by all seeds and arms of that draw), and
recomputes each metric per (arm, seed) on the drawn problems, averaged over the drawn seeds. The 95 % CI is the
2.5 / 97.5 percentile of the draws; the paired difference arm - baseline is computed inside each draw on the same
seeds and problems, so what both arms share (the seed's queries, the problems' difficulty) cancels. Ratios undefined
in a draw (DSR with no correct response) are skipped in that draw's mean.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tapo_megatron.algorithms.metrics import direct_solution_rate, effective_reflection_rate, first_attempt_rate

__all__ = ["METRICS", "read_samples", "sample_metrics", "compare_arms"]

METRICS = ("greedy", "pass@1", "first_attempt", "dsr", "err")


def read_samples(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _Cells:
    """One (arm, seed) eval as arrays over problems, so a bootstrap draw is a weighted sum, not a Python loop."""

    def __init__(self, rows: Sequence[dict], problems: list[str]):
        index = {p: i for i, p in enumerate(problems)}
        n = len(problems)
        self.counts = {name: np.zeros(n) for name in ("greedy_n", "greedy_c", "n", "c", "fa", "refl", "refl_c",
                                                       "c_direct")}
        for r in rows:
            i = index[r["query_id"]]
            c = self.counts
            if r["sample"] < 0:
                c["greedy_n"][i] += 1
                c["greedy_c"][i] += r["correct"]
                continue
            c["n"][i] += 1
            c["c"][i] += r["correct"]
            c["fa"][i] += r["correct"] and r.get("clean_first_attempt", False)
            c["refl"][i] += r["reflective"]
            c["refl_c"][i] += r["reflective"] and r["correct"]
            c["c_direct"][i] += r["correct"] and not r["reflective"]

    def metrics(self, weights: np.ndarray) -> dict[str, float]:
        """Each metric with problem i counted ``weights[i]`` times."""
        c = self.counts
        s = {k: float(weights @ v) for k, v in c.items()}
        with np.errstate(invalid="ignore", divide="ignore"):
            per_problem = np.where(c["n"] > 0, c["c"] / np.maximum(c["n"], 1), np.nan)
        has = c["n"] > 0
        ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
        return {"greedy": ratio(s["greedy_c"], s["greedy_n"]),
                "pass@1": ratio(float(weights[has] @ per_problem[has]), float(weights[has].sum())),
                "first_attempt": ratio(s["fa"], s["n"]), "dsr": ratio(s["c_direct"], s["c"]),
                "err": ratio(s["refl_c"], s["refl"])}


def sample_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The five metrics of one eval (see the module docstring), on all its problems."""
    problems = sorted({r["query_id"] for r in rows})
    return _Cells(rows, problems).metrics(np.ones(len(problems)))


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _interval(draws: list[float]) -> tuple[float, float]:
    finite = np.array([d for d in draws if not math.isnan(d)])
    if not len(finite):
        return math.nan, math.nan
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def compare_arms(evals: Mapping[str, Mapping[int, Sequence[dict]]], baseline: str, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Per arm and metric: mean over seeds, 95 % bootstrap CI, per-seed values; per non-baseline arm the paired
    difference to ``baseline`` (mean, CI, per seed, and the number of seeds where the arm is ahead).

    ``evals[arm][seed]`` are the eval rows of that arm's run with that seed; every arm must have the same seeds and
    every eval the same problems (a paired design)."""
    arms = list(evals)
    if baseline not in evals:
        raise ValueError(f"compare_arms: baseline {baseline!r} is not among the arms {arms}")
    seeds = sorted(evals[baseline])
    for arm in arms:
        if sorted(evals[arm]) != seeds:
            raise ValueError(f"compare_arms: arm {arm!r} has seeds {sorted(evals[arm])}, baseline has {seeds}")
    problems = sorted({r["query_id"] for r in evals[baseline][seeds[0]]})
    for arm in arms:
        for s in seeds:
            if sorted({r["query_id"] for r in evals[arm][s]}) != problems:
                raise ValueError(f"compare_arms: arm {arm!r} seed {s} was evaluated on other problems")
    cells = {arm: {s: _Cells(evals[arm][s], problems) for s in seeds} for arm in arms}
    ones = np.ones(len(problems))
    point = {arm: {s: cells[arm][s].metrics(ones) for s in seeds} for arm in arms}
    rng = np.random.default_rng(seed)
    draws = {arm: {m: [] for m in METRICS} for arm in arms}
    diffs = {arm: {m: [] for m in METRICS} for arm in arms if arm != baseline}
    for _ in range(n_boot):
        drawn_seeds = rng.choice(len(seeds), size=len(seeds), replace=True)
        weights = np.bincount(rng.integers(0, len(problems), len(problems)), minlength=len(problems)).astype(float)
        values = {arm: [cells[arm][seeds[i]].metrics(weights) for i in drawn_seeds] for arm in arms}
        for arm in arms:
            for m in METRICS:
                draws[arm][m].append(_nanmean(v[m] for v in values[arm]))
        for arm in diffs:
            for m in METRICS:
                diffs[arm][m].append(_nanmean(a[m] - b[m] for a, b in zip(values[arm], values[baseline])))
    out: dict = {"seeds": seeds, "problems": len(problems), "n_boot": n_boot, "baseline": baseline, "arms": {}}
    for arm in arms:
        entry = {}
        for m in METRICS:
            per_seed = [point[arm][s][m] for s in seeds]
            entry[m] = {"mean": _nanmean(per_seed), "ci95": _interval(draws[arm][m]), "per_seed": per_seed}
            if arm != baseline:
                d = [point[arm][s][m] - point[baseline][s][m] for s in seeds]
                entry[m]["diff"] = {"mean": _nanmean(d), "ci95": _interval(diffs[arm][m]), "per_seed": d,
                                    "seeds_ahead": sum(1 for x in d if x > 0)}
        out["arms"][arm] = entry
    return out
