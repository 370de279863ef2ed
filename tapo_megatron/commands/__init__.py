"""The ``tapo`` command: one entry point, one module per subcommand (``commands/<name>.py``: ``add_parser`` + ``run``).

    tapo demo [--seeds 1 2 3] [--arms grpo tapo]      the CPU experiment: cold start, paired-seed RL arms, CIs
    tapo train --config R.yaml [a.b=v ...]            RL (GRPO, or TAPO with tapo.enabled=true)
    tapo sft --config R.yaml [a.b=v ...]              cold-start SFT on the Megatron actor
    tapo coldstart build --config R.yaml [a.b=v ...]  cold-start set: rollouts, ZPD filter, construction, splicing
    tapo coldstart filter --config R.yaml [a.b=v ...] the RL queries the cold-start model solves 1..K-1 of K times
    tapo eval --model M --out D [--benchmarks aime24 aime25 hmmt25] [--n 16]   Pass@k, DSR, ERR per benchmark
    tapo eval --compare D1 D2 ... --out D             evaluated runs side by side
    tapo convert hf-to-mcore --hf-dir D --out C --tp T --pp P
    tapo convert mcore-to-hf --ckpt C --out D
    tapo export --ckpt C --out D                      final Megatron checkpoint -> HF directory for serving
    tapo bench kernels                                Triton kernels vs torch (ratios, peak memory)
    tapo bench sync [--preset P] [--mode distributed]  weight sync s/sync and GB/s, bucketed vs per-tensor
    tapo plan --recipe R --nodes N --gpus-per-node G  per-GPU memory of a layout; refuses what cannot fit
    tapo launch {local,slurm,docker} --recipe R ...   NeMo-Run experiment (launch/README.md)

Errors of the project's own family (``errors.TapoError``: configuration, data, checkpoint) print one line and exit
with status 2; anything else is a bug and keeps its traceback. ``train`` and ``sft`` stopped by SIGTERM, SIGUSR1 or
SIGINT save a checkpoint and exit 75 (``runguard.PREEMPTED_EXIT_CODE``): run the same command again to resume.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

COMMANDS = ("demo", "train", "sft", "coldstart", "eval", "convert", "export", "bench", "plan", "launch")


def _quiet_dependencies() -> None:
    """Keep the console for our own progress: Megatron/TE/apex fallback and deprecation notices are not news."""
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("megatron", "megatron.core", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"tapo_megatron.commands.{name}")
        module.add_parser(sub).set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_dependencies()
    args = build_parser().parse_args(argv)
    from tapo_megatron.errors import TapoError

    try:
        return args.run(args) or 0
    except TapoError as e:  # bad input: one clear line, not a traceback from deep inside Megatron
        print(f"tapo {args.command}: error: {e}", file=sys.stderr)
        return 2
