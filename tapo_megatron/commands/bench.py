"""``tapo bench kernels | sync | engine | rewards | train``: each prints its figures next to a baseline measured in the
same run."""
import argparse


def add_parser(sub):
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["kernels", "sync", "engine", "rewards", "train"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return bench


def run(args) -> None:
    if args.what == "engine":
        from tapo_megatron.rollout import bench as engine_bench

        engine_bench.main(args.rest)
    elif args.what == "rewards":
        from tapo_megatron.rewards import bench as rewards_bench

        rewards_bench.main(args.rest)
    elif args.what == "sync":
        from tapo_megatron.training.weight_sync import bench as sync_bench

        sync_bench.main(args.rest)
    elif args.what == "train":
        from tapo_megatron.training import bench as train_bench

        train_bench.main(args.rest)
    else:
        from tapo_kernels import bench as kernel_bench

        kernel_bench.main(args.rest)
