"""``tapo demo`` (``make demo``): the embedded CPU experiment: one cold start, then RL arms from it over paired seeds.

A 0.79 M-parameter Qwen3 held in Megatron-Core learns step-by-step arithmetic; the native engine samples; the same
code path runs Qwen3-8B on H100s. Steps:

1. **Cold start**: SFT (with 15 % reflective traces) until greedy held-out accuracy reaches ~50 %; evaluated once.
2. **Arms** (``--arms``, from ``ARMS``), each once per seed (``--seeds``, >= 3 for the experiment), all from the cold
   start. A seed fixes the query stream, so every arm sees the same queries at each step (paired design). The arms
   run as separate processes, ``--jobs`` at a time, each with one torch thread and deterministic kernels, so a
   (arm, seed) run is bit-identical on any machine of the same kind.
3. **Summary** (``summary.json``, ``table.png``, ``training_curves.png``, ``eval.png``): per arm and metric (greedy,
   Pass@1, first-attempt, DSR, ERR) the mean over seeds with a 95 % bootstrap CI over problems and seeds, and the
   paired difference to the ``grpo`` arm (``evaluation.paired.compare_arms``).

Arms: ``grpo``; ``tapo`` (the policy writes the correction after the faulty step its step checker located:
``tapo.constructor=policy_located``); ``tapo_oracle`` (the ablation in which the program writes it:
``step_verifier``); ``tapo_joint`` (joint normalisation at lambda = 1) and ``tapo_prefix`` (the spliced wrong prefix
trained too); ``sft`` (SFT on the constructed trajectories, no RL term); ``opsd`` (on-policy self-distillation, the
teacher being the same model shown the gold solution).
"""
from __future__ import annotations

import copy
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from tapo_megatron.config import TrainConfig, apply_overrides, from_dict, load_config, to_dict
from tapo_megatron.evaluation import evaluate
from tapo_megatron.evaluation.paired import METRICS, compare_arms, read_samples
from tapo_megatron.logging.plots import plot_bars, plot_curves
from tapo_megatron.logging.tracker import read_metrics
from tapo_megatron.models.qwen3 import shape_from_config
from tapo_megatron.parallel import setup_parallel
from tapo_megatron.recipes import RECIPES_DIR
from tapo_megatron.rollout.build import build_engine
from tapo_megatron.sft import run_sft
from tapo_megatron.tasks import build_task
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.weight_sync import sync_weights

DEMO_RECIPE = RECIPES_DIR / "demo.yaml"
ARMS: dict[str, list[str]] = {
    "grpo": ["tapo.enabled=false", "algorithm.advantage_estimator=grpo"],
    "tapo": ["tapo.enabled=true", "tapo.constructor=policy_located", "algorithm.advantage_estimator=dae"],
    # The program's corrections are always correct, so every constructed group is all-equal: under the recipe's
    # "zero" rule they carry no signal and the arm is bit-identical to grpo (measured). "fixed" (+1 for a correct
    # construction) is the signal the oracle gives: the previous demo's TAPO arm.
    "tapo_oracle": ["tapo.enabled=true", "tapo.constructor=step_verifier", "algorithm.advantage_estimator=dae",
                    "tapo.constructed_zero_variance=fixed"],
    # ablations of the TAPO arm: one token mean over both branches at lambda = 1; the spliced prefix trained too
    "tapo_joint": ["tapo.enabled=true", "tapo.constructor=policy_located", "algorithm.advantage_estimator=dae",
                   "tapo.branch_normalization=joint", "tapo.constructed_coef=1.0"],
    "tapo_prefix": ["tapo.enabled=true", "tapo.constructor=policy_located", "algorithm.advantage_estimator=dae",
                    "tapo.train_constructed_prefix=true"],
    # "fixed": all-correct constructed groups keep a positive advantage, so SFT trains on every correct construction
    "sft": ["tapo.enabled=true", "tapo.constructor=policy_located", "algorithm.advantage_estimator=dae",
            "algorithm.policy_loss=sft_constructed", "tapo.constructed_zero_variance=fixed"],
    "opsd": ["tapo.enabled=false", "algorithm.distillation=opsd", "algorithm.drop_zero_variance_groups=false"],
}
EVAL_KEYS = ["greedy_accuracy", "pass@1", "first_attempt", "dsr", "err"]
CURVE_KEYS = ["rollout/accuracy", "loss", "entropy", "grad_norm", "rollout/response_length", "approx_kl",
              "ots_weight_mean", "tapo/parse_rate", "tapo/acceptance_rate", "tapo/constructed_accuracy",
              "branch/grad_norm_ratio", "branch/grad_cosine"]
RUN_MEANS = ["tapo/parse_rate", "tapo/acceptance_rate", "tapo/constructed_accuracy", "tapo/frac_zero_adv_constructed",
             "ots_weight_mean", "branch/grad_norm_ratio", "branch/grad_cosine", "grad_norm", "opsd/reverse_kl"]
SFT_THREADS = 2  # fixed: a different thread count changes float reductions, so results would differ across machines


def add_parser(sub):
    demo = sub.add_parser("demo", help="run the embedded CPU experiment: cold start, then RL arms over paired seeds")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    demo.add_argument("--arms", nargs="+", default=["grpo", "tapo"], choices=list(ARMS))
    demo.add_argument("--jobs", type=int, default=2, help="arm processes at a time (one torch thread each)")
    demo.add_argument("--rl-steps", type=int, default=None, help="RL steps per arm (default: the recipe's)")
    demo.add_argument("--cold-start-target", type=float, default=0.5,
                      help="stop the cold-start SFT at this greedy accuracy on 200 held-out probes")
    demo.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for the CIs")
    demo.add_argument("overrides", nargs="*", help="config overrides section.field=value (every stage)")
    return demo


def run(args) -> None:
    run_demo(args.out, seeds=tuple(args.seeds), arms=tuple(args.arms), jobs=args.jobs, rl_steps=args.rl_steps,
             target=args.cold_start_target, n_boot=args.bootstrap, overrides=args.overrides)


def _deterministic(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _eval(engine, cfg, task, path=None) -> dict:
    return evaluate(engine, task.evals["heldout"], task.reward, task.tokenizer, n_samples=cfg.data.eval_samples,
                    max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed + 7, samples_path=path,
                    detector=task.reflection, step_verifier=task.step_verifier)


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


def evaluate_checkpoint(cfg, ckpt: Path, path: Path) -> dict:
    """Held-out evaluation of a checkpoint through the same engine path as the arms."""
    shape = shape_from_config(cfg.model)
    task = build_task(cfg.data, cfg.model, cfg.seed)
    ctx = setup_parallel(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                         cfg.seed, **shape.layout_dims())
    actor = MegatronActor(shape, ctx, cfg.optimizer, cfg.parallel, cfg.model.params_dtype, cfg.model.kernel_backend,
                          cfg.model.logprobs_path, cfg.megatron)
    actor.load_model_weights(ckpt)
    engine = build_engine(cfg.rollout, shape, cfg.seed)
    sync_weights(actor, engine, 0, 2**26)
    return _eval(engine, cfg, task, path)


def arm_config(cfg: TrainConfig, arm: str, seed: int, cold_ckpt: Path, out: Path) -> TrainConfig:
    arm_cfg = apply_overrides(copy.deepcopy(cfg), ARMS[arm])
    arm_cfg.data.problem_seed = cfg.seed if cfg.data.problem_seed < 0 else cfg.data.problem_seed  # the cold start's
    arm_cfg.seed = seed  # the query stream, sampling and pairing draws
    arm_cfg.checkpoint.pretrained_checkpoint = str(cold_ckpt)
    arm_cfg.checkpoint.save = ""
    arm_cfg.logging.output_dir = str(out / f"{arm}_seed{seed}")
    arm_cfg.logging.run_name = f"demo-{arm}-seed{seed}"
    return arm_cfg.validate()


def run_arm(cfg_dict: dict, arm: str, seed: int, cold_ckpt: str, out: str) -> dict:
    """One (arm, seed) run and its held-out evaluation; runs in its own process (``--jobs``)."""
    from tapo_megatron.train import train

    _deterministic(1)
    cfg = arm_config(from_dict(TrainConfig, cfg_dict), arm, seed, Path(cold_ckpt), Path(out))
    t0 = time.perf_counter()
    result = train(cfg)
    run_dir = Path(cfg.logging.output_dir)
    summary = _eval(result.engine, cfg, result.task, run_dir / "eval_samples.jsonl")
    summary.update(arm=arm, seed=seed, steps=cfg.train_iters, seconds=time.perf_counter() - t0,
                   start_checkpoint=cfg.checkpoint.pretrained_checkpoint, problem_seed=cfg.data.problem_seed)
    records = read_metrics(run_dir / "metrics.jsonl")
    for key in RUN_MEANS:  # how the run's constructions and branches behaved, averaged over the steps that logged them
        values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        summary[f"mean/{key}"] = sum(values) / len(values) if values else math.nan
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=1))
    return summary


def run_demo(out_dir: str = "runs/demo", seeds: tuple[int, ...] = (1, 2, 3), arms: tuple[str, ...] = ("grpo", "tapo"),
             jobs: int = 2, rl_steps: int | None = None, target: float = 0.5, n_boot: int = 1000,
             overrides: list[str] = ()) -> dict:
    start = time.perf_counter()
    _deterministic(SFT_THREADS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(DEMO_RECIPE, [f"logging.output_dir={out}", *overrides])
    if rl_steps:
        cfg.train_iters = rl_steps
    shape = shape_from_config(cfg.model)
    print(f"[demo] cold-start SFT of a {shape.num_parameters() / 1e6:.2f} M-param Qwen3 on Megatron-Core", flush=True)
    cold_ckpt, sft_info = cold_start(cfg, out, target=target, check_every=100)
    cold = evaluate_checkpoint(cfg, cold_ckpt, out / "cold_start_eval_samples.jsonl")
    cold.update(sft_steps=sft_info["steps"], probes=sft_info["probes"])
    print(f"[demo] cold start: greedy {cold['greedy_accuracy']:.1%}, pass@1 {cold['pass@1']:.1%}", flush=True)

    runs = [(arm, seed) for seed in seeds for arm in arms]
    print(f"[demo] {len(runs)} RL runs ({', '.join(arms)} x seeds {list(seeds)}), {cfg.train_iters} steps each, "
          f"{jobs} at a time", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_arm, to_dict(cfg), arm, seed, str(cold_ckpt), str(out)) for arm, seed in runs]
        results = []
        for (arm, seed), fut in zip(runs, futures):
            res = fut.result()
            print(f"[demo] {arm} seed {seed}: greedy {res['greedy_accuracy']:.1%}, pass@1 {res['pass@1']:.1%}, "
                  f"first attempt {res['first_attempt']:.1%} ({res['seconds']:.0f} s)", flush=True)
            results.append(res)

    samples = {arm: {seed: read_samples(out / f"{arm}_seed{seed}" / "eval_samples.jsonl") for seed in seeds}
               for arm in arms}
    baseline = "grpo" if "grpo" in arms else arms[0]
    comparison = compare_arms(samples, baseline=baseline, n_boot=n_boot, seed=0)
    summary = {"cold_start": cold, "runs": results, "comparison": comparison, "arms": list(arms),
               "seeds": list(seeds), "rl_steps": cfg.train_iters, "heldout_problems": comparison["problems"],
               "wall_seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    write_figures(out, comparison, cold, arms, seeds)
    print_table(comparison, cold)
    print(f"[demo] wrote {out / 'summary.json'}, table.png, training_curves.png, eval.png in "
          f"{summary['wall_seconds']:.0f} s", flush=True)
    return summary


def _mean_curves(paths: list[Path]) -> list[dict]:
    """Step-wise mean over seeds of every numeric metric (a seed missing a metric at a step is left out)."""
    by_step: dict[int, dict[str, list[float]]] = {}
    for path in paths:
        for rec in read_metrics(path):
            cell = by_step.setdefault(rec["step"], {})
            for k, v in rec.items():
                if isinstance(v, (int, float)) and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    cell.setdefault(k, []).append(float(v))
    return [{"step": s, **{k: sum(v) / len(v) for k, v in cell.items() if k != "step"}} for s, cell in sorted(by_step.items())]


def write_figures(out: Path, comparison: dict, cold: dict, arms, seeds) -> None:
    import matplotlib.pyplot as plt

    curves = {arm: _mean_curves([out / f"{arm}_seed{s}" / "metrics.jsonl" for s in seeds]) for arm in arms}
    plot_curves(curves, CURVE_KEYS, out / "training_curves.png", title=f"mean over seeds {list(seeds)}")
    bars = {"cold start": {m: cold.get(k, math.nan) for m, k in zip(METRICS, EVAL_KEYS)}}
    bars.update({arm: {m: comparison["arms"][arm][m]["mean"] for m in METRICS} for arm in arms})
    plot_bars(bars, list(METRICS), out / "eval.png", title=f"held-out arithmetic ({comparison['problems']} problems)")
    rows = table_rows(comparison, cold)
    fig, ax = plt.subplots(figsize=(2 + 1.9 * len(METRICS), 0.5 + 0.38 * len(rows)))
    ax.axis("off")
    ax.table(cellText=[r[1:] for r in rows], rowLabels=[r[0] for r in rows], colLabels=list(METRICS),
             loc="center").auto_set_font_size(False)
    fig.tight_layout()
    fig.savefig(out / "table.png", dpi=120)
    plt.close(fig)


def _pct(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.1f}"


def table_rows(comparison: dict, cold: dict) -> list[list[str]]:
    """Rows: the cold start, each arm's mean [95 % CI], each non-baseline arm's paired difference [CI] (ahead/seeds)."""
    rows = [["cold start"] + [_pct(cold.get(k, math.nan)) for k in EVAL_KEYS]]
    n = len(comparison["seeds"])
    for arm, entry in comparison["arms"].items():
        rows.append([arm] + [f"{_pct(entry[m]['mean'])} [{_pct(entry[m]['ci95'][0])}, {_pct(entry[m]['ci95'][1])}]"
                             for m in METRICS])
    for arm, entry in comparison["arms"].items():
        if arm == comparison["baseline"]:
            continue
        rows.append([f"{arm} - {comparison['baseline']}"] + [
            f"{_pct(d['mean'])} [{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}] {d['seeds_ahead']}/{n}"
            for d in (entry[m]["diff"] for m in METRICS)])
    return rows


def print_table(comparison: dict, cold: dict) -> None:
    rows = table_rows(comparison, cold)
    width = max(len(c) for r in rows for c in r[1:]) + 2
    print(f"{'':<14}" + "".join(f"{m:>{width}}" for m in METRICS))
    for r in rows:
        print(f"{r[0]:<14}" + "".join(f"{c:>{width}}" for c in r[1:]))
