"""The ``tapo`` command: one entry point, one subcommand per job.

    tapo demo [--seeds 1234 1235] [--grpo-steps N]     the embedded CPU demo (cold start, GRPO, TAPO)
    tapo train --config R.yaml [a.b=v ...]            RL (GRPO, or TAPO with tapo.enabled=true)
    tapo sft --config R.yaml [a.b=v ...]              cold-start SFT on the Megatron actor
    tapo coldstart build --config R.yaml [a.b=v ...]  cold-start set: rollouts, ZPD filter, construction, splicing
    tapo eval --model M --out D [--benchmarks aime24 aime25 hmmt25] [--n 16]   Pass@k, DSR, ERR per benchmark
    tapo eval --compare D1 D2 ... --out D             evaluated runs side by side
    tapo convert hf-to-mcore --hf-dir D --out C --tp T --pp P
    tapo convert mcore-to-hf --ckpt C --out D
    tapo bench kernels                                Triton kernels vs torch (ratios, peak memory)
    tapo bench sync [--preset P] [--mode distributed]  weight sync s/sync and GB/s, bucketed vs per-tensor
    tapo plan --recipe R --nodes N --gpus-per-node G  per-GPU memory of a layout; refuses what cannot fit
    tapo launch {local,slurm,docker} --recipe R ...   NeMo-Run experiment (launch/README.md)
    tapo export --ckpt C --out D                      final Megatron checkpoint -> HF directory for serving
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _config(args):
    from tapo_megatron.config import load_config

    return load_config(args.config, args.overrides)


def _plan(args) -> None:
    from tapo_megatron.builders import model_shape
    from tapo_megatron.plan import check_plan, make_plan
    from tapo_megatron.recipes import load_recipe, preset_for

    preset = preset_for(args.nodes, args.gpus_per_node) if args.preset == "auto" else (
        None if args.preset == "none" else args.preset)
    cfg = load_recipe(args.recipe, preset, args.overrides)
    plan = make_plan(cfg, model_shape(cfg.model), args.nodes, args.gpus_per_node)
    print(f"recipe: {args.recipe}   preset: {preset or 'none'}")
    print(plan.table())
    check_plan(plan)  # raises PlanError (a ValueError) naming why it does not fit
    print("fits: yes")


def _quiet_dependencies() -> None:
    """Keep the console for our own progress: Megatron/TE/apex fallback and deprecation notices are not news."""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("megatron", "megatron.core", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")


def _eval(args) -> None:
    from tapo_megatron import eval_cli

    if args.compare:
        result = eval_cli.compare_runs(args.compare, args.out, labels=args.labels)
        print(result.table)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return
    if not args.model:
        raise ValueError("give --model (HF dir or Megatron checkpoint) or --compare RUN_DIR ...")
    settings = eval_cli.EvalSettings(n_samples=args.n, temperature=args.temperature, top_p=args.top_p,
                                     max_new_tokens=args.max_new_tokens, ks=tuple(args.ks), seed=args.seed,
                                     greedy=args.greedy, limit=args.limit, on_bad_row=args.on_bad_row,
                                     num_threads=args.threads)
    eval_cli.run_eval(args.model, args.benchmarks, args.out, settings, tokenizer_path=args.tokenizer,
                      engine=args.engine, label=args.label)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_dependencies()
    parser = argparse.ArgumentParser(prog="tapo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded CPU demo end to end")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seeds", type=int, nargs="+", default=[1234])
    demo.add_argument("--grpo-steps", type=int, default=None)
    demo.add_argument("--arms", nargs="+", default=["grpo", "tapo"], choices=["grpo", "tapo"])
    demo.add_argument("overrides", nargs="*", help="config overrides section.field=value")

    for name, help_text in (("train", "RL training (GRPO / TAPO)"), ("sft", "cold-start SFT")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*")

    cold = sub.add_parser("coldstart", help="cold-start data")
    cold_sub = cold.add_subparsers(dest="action", required=True)
    cold_build = cold_sub.add_parser("build", help="build the cold-start SFT set from a query file")
    cold_build.add_argument("--config", default=None)
    cold_build.add_argument("overrides", nargs="*")

    ev = sub.add_parser("eval", help="Pass@k / DSR / ERR on AIME24, AIME25, HMMT25 (or JSONL files)")
    ev.add_argument("--model", help="HF Qwen3 directory or Megatron checkpoint")
    ev.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="put evaluated runs side by side")
    ev.add_argument("--labels", nargs="+", help="--compare: names of the runs")
    ev.add_argument("--out", required=True)
    ev.add_argument("--benchmarks", nargs="+", default=["aime24", "aime25", "hmmt25"])
    ev.add_argument("--n", type=int, default=16, help="samples per problem")
    ev.add_argument("--temperature", type=float, default=0.7)
    ev.add_argument("--top-p", type=float, default=0.8)
    ev.add_argument("--max-new-tokens", type=int, default=4096)
    ev.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--greedy", action="store_true", help="also one greedy sample per problem")
    ev.add_argument("--limit", type=int, default=0, help="first N problems per benchmark (0: all)")
    ev.add_argument("--on-bad-row", choices=["skip", "raise"], default="skip")
    ev.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's own)")
    ev.add_argument("--engine", default="native", choices=["native", "sglang"])
    ev.add_argument("--threads", type=int, default=1, help="native engine torch threads")
    ev.add_argument("--label", default="")

    conv = sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion")
    conv_sub = conv.add_subparsers(dest="direction", required=True)
    h2m = conv_sub.add_parser("hf-to-mcore")
    h2m.add_argument("--hf-dir", required=True)
    h2m.add_argument("--out", required=True)
    h2m.add_argument("--tp", type=int, default=1)
    h2m.add_argument("--pp", type=int, default=1)
    m2h = conv_sub.add_parser("mcore-to-hf")
    m2h.add_argument("--ckpt", required=True)
    m2h.add_argument("--out", required=True)

    plan = sub.add_parser("plan", help="per-GPU memory and layout check of a recipe")
    plan.add_argument("--recipe", required=True, help="packaged recipe name or YAML path")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True)
    plan.add_argument("--preset", default="auto", help="h100_1x8, h100_4x8, none, or auto (matching the layout)")
    plan.add_argument("overrides", nargs="*")

    launch = sub.add_parser("launch", help="NeMo-Run experiment: local / slurm / docker (see launch/README.md)")
    launch.add_argument("rest", nargs=argparse.REMAINDER)

    export = sub.add_parser("export", help="Megatron checkpoint -> HF directory")
    export.add_argument("--ckpt", required=True, help="a checkpoint dir (iter_N) or a save dir (its latest)")
    export.add_argument("--out", required=True)
    export.add_argument("--tokenizer-dir", default=None, help="tokenizer/generation-config folder to copy")
    export.add_argument("--overwrite", action="store_true")

    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["kernels", "sync"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    from tapo_megatron.config import ConfigError
    from tapo_megatron.parallel import ParallelConfigError

    try:
        if args.command == "demo":
            from tapo_megatron.demo import run_demo

            run_demo(args.out, seeds=tuple(args.seeds), grpo_steps=args.grpo_steps, arms=tuple(args.arms),
                     overrides=args.overrides)
        elif args.command == "train":
            from tapo_megatron.train import train

            train(_config(args))
        elif args.command == "sft":
            from tapo_megatron.sft import run_sft

            run_sft(_config(args))
        elif args.command == "coldstart":
            from tapo_megatron.coldstart import build_coldstart

            report = build_coldstart(_config(args))
            print(f"tapo coldstart build: {report.rows} rows in {report.output_dir} "
                  f"({report.zpd_kept}/{report.queries_done} queries in the ZPD, "
                  f"{report.constructions_spliced}/{report.constructions_attempted} constructions spliced)")
        elif args.command == "eval":
            _eval(args)
        elif args.command == "convert":
            from tapo_megatron.convert import cli as convert_cli

            if args.direction == "hf-to-mcore":
                convert_cli.hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp)
            else:
                convert_cli.mcore_to_hf(args.ckpt, args.out)
        elif args.command == "plan":
            _plan(args)
        elif args.command == "launch":
            import runpy

            from tapo_megatron.paths import REPO_ROOT

            sys.argv = ["launch/experiment.py", *args.rest]
            runpy.run_path(str(REPO_ROOT / "launch" / "experiment.py"), run_name="__main__")
        elif args.command == "export":
            from tapo_megatron.convert.cli import mcore_to_hf
            from tapo_megatron.training.actor import resolve_checkpoint

            mcore_to_hf(resolve_checkpoint(args.ckpt), args.out, tokenizer_dir=args.tokenizer_dir,
                        overwrite=args.overwrite)
        elif args.command == "bench" and args.what == "sync":
            from tapo_megatron import bench_sync

            bench_sync.main(args.rest)
        elif args.command == "bench":
            from tapo_kernels import bench as kernel_bench

            sys.argv = ["tapo_kernels.bench", *args.rest]
            kernel_bench.main()
    except (ConfigError, ParallelConfigError, ValueError, FileNotFoundError) as e:
        # Bad input: one clear line, not a traceback from deep inside Megatron.
        print(f"tapo {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
