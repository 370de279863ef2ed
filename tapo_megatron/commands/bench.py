"""``tapo bench kernels | sync``: the kernel benchmark (``tapo_kernels.bench``) and the weight-sync benchmark."""
import argparse


def add_parser(sub):
    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("what", choices=["kernels", "sync"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return bench


def run(args) -> None:
    if args.what == "sync":
        from tapo_megatron.training.weight_sync import bench as sync_bench

        sync_bench.main(args.rest)
    else:
        from tapo_kernels import bench as kernel_bench

        kernel_bench.main(args.rest)
