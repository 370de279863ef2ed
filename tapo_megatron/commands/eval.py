"""``tapo eval``: Pass@k / DSR / ERR of a checkpoint on AIME24, AIME25, HMMT25 (or JSONL files); ``--compare``."""
from __future__ import annotations

import sys


def add_parser(sub):
    ev = sub.add_parser("eval", help="Pass@k / DSR / ERR on AIME24, AIME25, HMMT25 (or JSONL files)")
    ev.add_argument("--model", help="HF Qwen3 directory or Megatron checkpoint")
    ev.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="put evaluated runs side by side")
    ev.add_argument("--labels", nargs="+", help="--compare / --compare-training: names of the runs")
    ev.add_argument("--compare-training", nargs="+", metavar="OUTPUT_DIR",
                    help="training runs' last in-loop eval metrics (their metrics.jsonl) as one PNG")
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
    return ev


def run(args) -> None:
    from tapo_megatron.errors import ConfigError
    from tapo_megatron.evaluation import benchmarks

    if args.compare_training:
        from pathlib import Path

        from tapo_megatron.logging.plots import plot_eval_comparison
        from tapo_megatron.logging.tracker import read_metrics

        labels = args.labels or [Path(d).name for d in args.compare_training]
        if len(labels) != len(args.compare_training) or len(set(labels)) != len(labels):
            raise ConfigError("--labels: one distinct name per run")
        runs = {label: read_metrics(Path(d) / "metrics.jsonl") for label, d in zip(labels, args.compare_training)}
        try:
            print(plot_eval_comparison(runs, Path(args.out) / "eval_compare.png"))
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return
    if args.compare:
        result = benchmarks.compare_runs(args.compare, args.out, labels=args.labels)
        print(result.table)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return
    if not args.model:
        raise ConfigError("give --model (HF dir or Megatron checkpoint) or --compare RUN_DIR ...")
    settings = benchmarks.EvalSettings(n_samples=args.n, temperature=args.temperature, top_p=args.top_p,
                                       max_new_tokens=args.max_new_tokens, ks=tuple(args.ks), seed=args.seed,
                                       greedy=args.greedy, limit=args.limit, on_bad_row=args.on_bad_row,
                                       num_threads=args.threads)
    benchmarks.run_eval(args.model, args.benchmarks, args.out, settings, tokenizer_path=args.tokenizer,
                        engine=args.engine, label=args.label)
