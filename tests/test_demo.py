"""``tapo demo`` as an experiment, on a smoke config: one cold start, GRPO and TAPO arms over 2 paired seeds in
parallel processes, the bootstrap table and the PNGs; run twice in fresh processes, bit-identical results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SMOKE = ["--seeds", "1", "2", "--arms", "grpo", "tapo", "--jobs", "2", "--rl-steps", "2", "--bootstrap", "50",
         "--cold-start-target", "2", "sft.train_iters=12", "data.num_train_problems=200", "data.num_eval_problems=8",
         "data.eval_samples=2", "rollout.rollout_batch_size=4", "rollout.max_new_tokens=32",
         "tapo.branch_grad_interval=1", "tapo.n_pos=1", "tapo.n_neg=1", "logging.progress_bar=false",
         "logging.wandb_mode=disabled", "data.reward=_loop_worker:parity_reward"]
# the parity reward (tests/_loop_worker.py) gives a 12-step cold start groups with right and wrong members


def _timing(key: str) -> bool:
    return key == "time" or key.startswith("time/") or "seconds" in key or "_per_s" in key


def _strip(obj):
    """Everything but wall-clock timings."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not _timing(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _run(out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", "tapo_megatron.commands", "demo", "--out", str(out), *SMOKE], check=True,
                   timeout=900, env=env)
    summary = json.loads((out / "summary.json").read_text())
    metrics = {p.parent.name: [_strip(json.loads(line)) for line in p.read_text().splitlines()]
               for p in sorted(out.glob("*_seed*/metrics.jsonl"))}
    samples = {p.parent.name: p.read_text() for p in sorted(out.glob("*_seed*/eval_samples.jsonl"))}
    return summary, metrics, samples


def test_demo_experiment_smoke_and_bit_identical_reruns(tmp_path):
    first = _run(tmp_path / "a")
    summary, metrics, samples = first
    comparison = summary["comparison"]
    assert comparison["seeds"] == [1, 2] and comparison["baseline"] == "grpo" and comparison["problems"] == 8
    for metric in ("greedy", "pass@1", "first_attempt", "dsr", "err"):
        assert len(comparison["arms"]["tapo"][metric]["diff"]["per_seed"]) == 2
        assert len(comparison["arms"]["grpo"][metric]["ci95"]) == 2
    assert set(metrics) == {"grpo_seed1", "grpo_seed2", "tapo_seed1", "tapo_seed2"}
    cold = str(tmp_path / "a" / "cold_start_ckpt")
    assert {(r["start_checkpoint"], r["problem_seed"]) for r in summary["runs"]} == {(cold, 1234)}  # one cold start
    assert all(len(rows) == 2 for rows in metrics.values())
    assert all("loss" in r for rows in metrics.values() for r in rows)  # every arm trained at every step
    assert any("tapo/parse_rate" in r for r in metrics["tapo_seed1"])  # the policy constructor ran
    tapo_runs = [r for r in summary["runs"] if r["arm"] == "tapo"]
    assert all(0 <= r["mean/tapo/parse_rate"] <= 1 and -1 <= r["mean/branch/grad_cosine"] <= 1 for r in tapo_runs)
    for png in ("table.png", "eval.png", "training_curves.png"):
        assert (tmp_path / "a" / png).stat().st_size > 0
    # paired design: both arms drew the same queries at each step (the same seed's stream)
    for seed in (1, 2):
        crcs = [[r["rollout/query_crc"] for r in metrics[f"{arm}_seed{seed}"]] for arm in ("grpo", "tapo")]
        assert crcs[0] == crcs[1]
    assert metrics["grpo_seed1"][0]["rollout/query_crc"] != metrics["grpo_seed2"][0]["rollout/query_crc"]
    second = _run(tmp_path / "b")
    assert second[1] == metrics and second[2] == samples
    assert _strip(second[0]["comparison"]) == _strip(comparison)
    assert _strip(second[0]["cold_start"]) == _strip(summary["cold_start"])
