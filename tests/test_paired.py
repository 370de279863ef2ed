"""Paired-seed statistics of the demo experiment, on hand-written eval rows.

One eval = 2 problems p, q; greedy row + 2 sampled rows each:
    arm A seed 1: greedy p right, q wrong; samples p [right (clean), right (reflective, not clean)], q [wrong, wrong
                  (reflective)]  -> greedy 1/2, pass@1 (1 + 0)/2 = 1/2, first_attempt 1/4, DSR 1/2, ERR 1/2
"""
from __future__ import annotations

import math

import pytest

from tapo_megatron.evaluation.paired import compare_arms, sample_metrics


def row(q, sample, correct, reflective=False, clean=None):
    return {"query_id": q, "sample": sample, "correct": correct, "reflective": reflective,
            "clean_first_attempt": correct and not reflective if clean is None else clean}


A1 = [row("p", -1, True), row("q", -1, False), row("p", 0, True), row("p", 1, True, True, False),
      row("q", 0, False), row("q", 1, False, True, False)]


def test_sample_metrics_hand_values():
    assert sample_metrics(A1) == {"greedy": 0.5, "pass@1": 0.5, "first_attempt": 0.25, "dsr": 0.5, "err": 0.5}
    no_reflection = [row("p", -1, True), row("p", 0, False)]
    m = sample_metrics(no_reflection)
    assert math.isnan(m["err"]) and math.isnan(m["dsr"]) and m["greedy"] == 1.0


def test_compare_arms_means_paired_differences_and_cis():
    better = [dict(r, correct=True, clean_first_attempt=True) if r["query_id"] == "q" and r["sample"] == 0 else r
              for r in A1]  # arm B: one more sampled success, first attempt clean
    evals = {"grpo": {1: A1, 2: A1}, "tapo": {1: better, 2: A1}}
    out = compare_arms(evals, baseline="grpo", n_boot=200, seed=0)
    assert out["seeds"] == [1, 2] and out["problems"] == 2
    g, t = out["arms"]["grpo"], out["arms"]["tapo"]
    assert g["pass@1"]["per_seed"] == [0.5, 0.5] and t["pass@1"]["per_seed"] == [0.75, 0.5]
    assert t["pass@1"]["mean"] == pytest.approx(0.625)
    diff = t["pass@1"]["diff"]
    assert diff["per_seed"] == [0.25, 0.0] and diff["seeds_ahead"] == 1 and diff["mean"] == pytest.approx(0.125)
    lo, hi = diff["ci95"]
    assert 0.0 <= lo <= diff["mean"] <= hi <= 0.5  # a draw of seed 2 twice gives 0, never below
    assert t["first_attempt"]["diff"]["per_seed"] == [0.25, 0.0]
    # identical arms: every paired draw is exactly 0
    same = compare_arms({"grpo": {1: A1, 2: A1}, "copy": {1: A1, 2: A1}}, baseline="grpo", n_boot=50)
    assert same["arms"]["copy"]["greedy"]["diff"]["ci95"] == (0.0, 0.0)
    # reproducible in the bootstrap seed
    assert compare_arms(evals, "grpo", n_boot=200, seed=0) == out


def test_compare_arms_refuses_an_unpaired_design():
    with pytest.raises(ValueError, match="seeds"):
        compare_arms({"grpo": {1: A1, 2: A1}, "tapo": {1: A1}}, baseline="grpo")
    with pytest.raises(ValueError, match="other problems"):
        compare_arms({"grpo": {1: A1}, "tapo": {1: [r for r in A1 if r["query_id"] == "p"]}}, baseline="grpo")
    with pytest.raises(ValueError, match="baseline"):
        compare_arms({"tapo": {1: A1}}, baseline="grpo")
