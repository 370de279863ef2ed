"""The ``tapo`` command: one entry point, one subcommand per job.

    tapo demo [--seeds 1234 1235] [--grpo-steps N]     the embedded CPU demo (cold start, GRPO, TAPO)
    tapo train --config R.yaml [a.b=v ...]            RL (GRPO, or TAPO with tapo.enabled=true)
    tapo sft --config R.yaml [a.b=v ...]              cold-start SFT on the Megatron actor
    tapo convert hf-to-mcore --hf-dir D --out C --tp T --pp P
    tapo convert mcore-to-hf --ckpt C --out D
    tapo bench kernels                                Triton kernels vs torch (ratios, peak memory)
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


def _quiet_dependencies() -> None:
    """Keep the console for our own progress: Megatron/TE/apex fallback and deprecation notices are not news."""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("megatron", "megatron.core", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")


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

    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["kernels"])
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
        elif args.command == "convert":
            from tapo_megatron.convert import cli as convert_cli

            if args.direction == "hf-to-mcore":
                convert_cli.hf_to_mcore(args.hf_dir, args.out, tp=args.tp, pp=args.pp)
            else:
                convert_cli.mcore_to_hf(args.ckpt, args.out)
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
