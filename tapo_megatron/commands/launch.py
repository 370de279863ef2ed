"""``tapo launch {local,slurm,docker} --recipe R ...``: a NeMo-Run experiment (``launch.experiment``)."""
import argparse


def add_parser(sub):
    launch = sub.add_parser("launch", help="NeMo-Run experiment: local / slurm / docker (see launch/README.md)",
                            add_help=False)
    launch.add_argument("rest", nargs=argparse.REMAINDER)
    return launch


def run(args) -> int:
    from tapo_megatron.launch.experiment import main

    return main(args.rest)
