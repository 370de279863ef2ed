"""``tapo demo`` (``make demo``): the embedded CPU demo: cold-start SFT, then GRPO and TAPO from the same checkpoint.

A 0.79 M-parameter Qwen3 held in Megatron-Core learns step-by-step arithmetic; the native engine samples; the
same code path runs Qwen3-8B on H100s. Writes ``runs/demo/summary.json``, PNG curves and an eval bar chart.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from tapo_megatron.config import load_config
from tapo_megatron.evaluation import evaluate
from tapo_megatron.logging.plots import plot_bars, plot_curves
from tapo_megatron.logging.tracker import read_metrics
from tapo_megatron.models.qwen3 import shape_from_config
from tapo_megatron.parallel import setup_parallel
from tapo_megatron.recipes import RECIPES_DIR
from tapo_megatron.rollout.build import build_engine
from tapo_megatron.sft import run_sft
from tapo_megatron.tasks import build_task
from tapo_megatron.train import train
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.weight_sync import sync_weights

DEMO_RECIPE = RECIPES_DIR / "demo.yaml"
EVAL_KEYS = ["greedy_accuracy", "pass@1", "pass@4", "dsr", "err"]
CURVE_KEYS = ["rollout/accuracy", "loss", "entropy", "grad_norm", "rollout/response_length", "approx_kl",
              "clip_frac", "mismatch/logprob_abs_mean", "ots_weight_mean", "tapo/num_candidates",
              "tapo/parse_rate", "tapo/constructed_accuracy"]


def add_parser(sub):
    demo = sub.add_parser("demo", help="run the embedded CPU demo end to end")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seeds", type=int, nargs="+", default=[1234])
    demo.add_argument("--grpo-steps", type=int, default=None)
    demo.add_argument("--arms", nargs="+", default=["grpo", "tapo"], choices=["grpo", "tapo"])
    demo.add_argument("overrides", nargs="*", help="config overrides section.field=value")
    return demo


def run(args) -> None:
    run_demo(args.out, seeds=tuple(args.seeds), grpo_steps=args.grpo_steps, arms=tuple(args.arms),
             overrides=args.overrides)


def _eval(engine, cfg, task, path=None) -> dict:
    return evaluate(engine, task.evals["heldout"], task.reward, task.tokenizer, n_samples=cfg.data.eval_samples,
                    max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed + 7, samples_path=path,
                    detector=task.reflection)


def cold_start(cfg, out: Path, target: float, check_every: int) -> tuple[Path, dict]:
    """SFT until greedy held-out accuracy reaches ``target`` (a middling start: DEMO_NOTES) or the step budget."""
    task = build_task(cfg.data, cfg.model, cfg.seed)
    engine = build_engine(cfg.rollout, shape_from_config(cfg.model), cfg.seed)
    probe = task.evals["heldout"][:200]
    history = []

    def check(step, actor):
        if step % check_every:
            return False
        sync_weights(actor, engine, step, 2**26)
        acc = evaluate(engine, probe, task.reward, task.tokenizer, n_samples=0,
                       max_new_tokens=cfg.rollout.max_new_tokens)["greedy_accuracy"]
        history.append({"step": step, "probe_greedy_accuracy": acc})
        print(f"  cold start step {step}: greedy accuracy on 200 held-out probes {acc:.1%}", flush=True)
        return acc >= target

    sft_cfg = copy.deepcopy(cfg)
    sft_cfg.checkpoint.save = str(out / "cold_start_ckpt")
    sft_cfg.logging.output_dir = str(out / "sft")
    sft_cfg.logging.run_name = "demo-sft"
    actor = run_sft(sft_cfg, on_step=check)
    return Path(sft_cfg.checkpoint.save), {"steps": actor.iteration, "probes": history}


def rl_arm(cfg, name: str, tapo: bool, cold_ckpt: Path, out: Path, seed: int) -> dict:
    arm = copy.deepcopy(cfg)
    arm.seed = seed
    arm.tapo.enabled = tapo
    arm.algorithm.advantage_estimator = "dae" if tapo else "grpo"
    arm.checkpoint.pretrained_checkpoint = str(cold_ckpt)
    arm.checkpoint.save = ""
    arm.logging.output_dir = str(out / name)
    arm.logging.run_name = f"demo-{name}-seed{seed}"
    t0 = time.perf_counter()
    result = train(arm)
    summary = _eval(result.engine, arm, result.task, out / name / "eval_samples.jsonl")
    summary.update(steps=arm.train_iters, seconds=time.perf_counter() - t0)
    records = read_metrics(out / name / "metrics.jsonl")
    if tapo:
        summary["constructor"] = arm.tapo.constructor
        rates = [r["tapo/parse_rate"] for r in records if r.get("tapo/parse_rate") is not None]
        summary["construction_parse_rate"] = sum(rates) / len(rates) if rates else float("nan")
    return summary


def run_demo(out_dir: str = "runs/demo", seeds: tuple[int, ...] = (1234,), grpo_steps: int | None = None,
             arms: tuple[str, ...] = ("grpo", "tapo"), overrides: list[str] = ()) -> dict:
    start = time.perf_counter()
    torch.set_num_threads(2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(DEMO_RECIPE, [f"logging.output_dir={out}", *overrides])
    if grpo_steps:
        cfg.train_iters = grpo_steps
    shape = shape_from_config(cfg.model)
    print(f"[demo] cold-start SFT of a {shape.num_parameters() / 1e6:.2f} M-param Qwen3 "
          "on Megatron-Core", flush=True)
    cold_ckpt, sft_info = cold_start(cfg, out, target=0.5, check_every=100)

    # Held-out evaluation of the cold-start model through the same engine path.
    task = build_task(cfg.data, cfg.model, cfg.seed)
    heldout = task.evals["heldout"]
    ctx = setup_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                         cfg.seed, **shape.layout_dims())
    actor = MegatronActor(shape, ctx, cfg.optimizer, cfg.parallel, cfg.model.params_dtype,
                          cfg.model.kernel_backend, cfg.model.logprobs_path, cfg.megatron)
    actor.load_model_weights(cold_ckpt)
    engine = build_engine(cfg.rollout, shape, cfg.seed)
    sync_weights(actor, engine, 0, 2**26)
    cold = _eval(engine, cfg, task, out / "cold_start_eval_samples.jsonl")
    cold.update(sft_steps=sft_info["steps"])
    print(f"[demo] cold start: greedy {cold['greedy_accuracy']:.1%}, pass@1 {cold['pass@1']:.1%}", flush=True)
    del actor, engine

    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            print(f"[demo] {arm.upper()} seed {seed}: {cfg.train_iters} steps", flush=True)
            res = rl_arm(cfg, f"{arm}" if len(seeds) == 1 else f"{arm}_seed{seed}", arm == "tapo", cold_ckpt, out,
                         seed)
            print(f"[demo] {arm.upper()} seed {seed}: greedy {res['greedy_accuracy']:.1%}, "
                  f"pass@1 {res['pass@1']:.1%} ({res['seconds']:.0f} s)", flush=True)
            results[arm].append(res)

    summary = {"cold_start": {"heldout_accuracy": cold["greedy_accuracy"], **cold}}
    for arm, runs in results.items():
        entry = dict(runs[0])
        if len(runs) > 1:
            for key in EVAL_KEYS:
                vals = [r[key] for r in runs if not math.isnan(r[key])]
                entry[f"{key}_mean"] = statistics.mean(vals) if vals else float("nan")
                entry[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            entry["seeds"] = list(seeds)
            entry["per_seed"] = runs
        entry["heldout_accuracy"] = entry.get("greedy_accuracy_mean", entry["greedy_accuracy"])
        summary[arm] = entry
    summary["wall_seconds"] = time.perf_counter() - start
    summary["heldout_problems"] = len(heldout)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))

    table = {"cold start": cold, **{arm.upper(): summary[arm] for arm in arms}}
    plot_bars(table, EVAL_KEYS, out / "eval.png", title=f"Held-out arithmetic ({len(heldout)} problems)")
    curves = {arm.upper(): read_metrics(out / (arm if len(seeds) == 1 else f"{arm}_seed{seeds[0]}") /
                                        "metrics.jsonl") for arm in arms}
    plot_curves(curves, CURVE_KEYS, out / "training_curves.png", title="GRPO vs TAPO (demo)")
    plot_curves({"SFT": read_metrics(out / "sft" / "metrics.jsonl")}, ["sft/loss", "grad_norm"],
                out / "sft_curve.png", title="cold-start SFT")
    print_table(table)
    print(f"[demo] wrote {out / 'summary.json'}, {out / 'eval.png'}, {out / 'training_curves.png'} "
          f"in {summary['wall_seconds']:.0f} s", flush=True)
    return summary


def print_table(table: dict[str, dict]) -> None:
    header = f"{'model':<12}" + "".join(f"{k:>16}" for k in EVAL_KEYS)
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        cells = []
        for k in EVAL_KEYS:
            v = row.get(k, float("nan"))
            cells.append(f"{'n/a' if isinstance(v, float) and math.isnan(v) else f'{100 * v:.1f}%':>16}")
        print(f"{name:<12}" + "".join(cells))
