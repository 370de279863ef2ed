"""``tapo bench sync``: seconds per weight sync and GB/s for a model shape, bucketed vs per-tensor, in one run.

    tapo bench sync [--preset Qwen3-0.6B | --hf-config config.json | (default: a 37 M-param Qwen3 shape)]
                    [--mode distributed|colocated] [--bucket-mb 64] [--repeats 3] [--dtype float32|bfloat16]

What runs: a single-rank Megatron actor of the shape (random weights) and an engine with the same shape -
``distributed``: a native engine server in another process, fed by ``DistributedWeightSync`` over gloo on CPU
(NCCL on GPU; the engine is still the native server, so this measures the trainer-side transport and protocol);
``colocated``: an in-process native engine fed by ``TensorWeightSync``. Each repeat runs one bucketed sync
(``--bucket-mb``) and one per-tensor sync (each tensor its own bucket: one announcement + broadcast per tensor),
alternating, so both see the same machine load, and in the same loop the limits of the machine: one copy of the
same bytes (``copy_gb_per_s``) and, distributed, one single announced broadcast of all the bytes into the engine
(``single_broadcast_gb_per_s``). Prints the median seconds and GB/s per strategy, the ratios against those limits,
and the Qwen3-8B (bf16) sync time the bucketed rate implies, one JSON line each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

# A mid-size default that fits a 2-core CPU machine: 34 M parameters (134 MB in fp32), 8 layers.
DEFAULT_SHAPE = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "rope_theta": 1e6,
                 "tie_word_embeddings": False, "max_position_embeddings": 2048}


def run(shape_cfg: dict, mode: str, bucket_bytes: int, repeats: int, dtype: str) -> list[dict]:
    """Measure both strategies; returns one result dict per strategy (also printed)."""
    from tapo_megatron.config import OptimizerConfig, ParallelConfig
    from tapo_megatron.models.qwen3 import Qwen3Shape
    from tapo_megatron.parallel import init_parallel
    from tapo_megatron.rollout.native import NativeEngine
    from tapo_megatron.rollout.sglang import SGLangEngine, ServerLaunch, native_server_argv
    from tapo_megatron.training.actor import MegatronActor
    from tapo_megatron.training.weight_sync import TensorWeightSync
    from tapo_megatron.training.weight_sync.distributed import DistributedWeightSync

    shape = Qwen3Shape.from_hf(shape_cfg)
    ctx = init_parallel(1, 1, seed=0)
    actor = MegatronActor(shape, ctx, OptimizerConfig(), ParallelConfig(micro_batch_size=1))
    if dtype == "bfloat16":
        actor.module.to(torch.bfloat16)
    engine = None
    tmp = tempfile.TemporaryDirectory(prefix="tapo_bench_sync_")
    try:
        if mode == "distributed":
            model_dir = Path(tmp.name) / "model"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps(shape.to_hf()))
            engine = SGLangEngine.launch([ServerLaunch(argv=native_server_argv(str(model_dir),
                                                                               extra=["--dtype", dtype]),
                                                       env={"OMP_NUM_THREADS": "1"}, log_dir=tmp.name)],
                                         startup_timeout_s=300)
            syncs = {name: DistributedWeightSync(actor.module, ctx, engine, b)
                     for name, b in (("bucketed", bucket_bytes), ("per_tensor", 1))}
            syncs["bucketed"].connect()
            syncs["per_tensor"]._groups = syncs["bucketed"]._groups  # the same groups serve both
            syncs["per_tensor"]._pool = syncs["bucketed"]._pool
        else:
            engine = NativeEngine(shape.to_hf(), dtype=getattr(torch, dtype))
            syncs = {name: TensorWeightSync(actor.module, ctx, engine, b)
                     for name, b in (("bucketed", bucket_bytes), ("per_tensor", 1))}
        samples: dict[str, list] = {name: [] for name in syncs}
        limits: dict[str, list] = {"copy": [], "single_broadcast": []}
        total = sum(p.numel() * p.element_size() for p in actor.module.parameters())
        version = 0
        for _ in range(repeats):
            for name, sync in syncs.items():
                version += 1
                samples[name].append(sync.sync(version))
            limits["copy"].append(_copy_seconds(total))
            if mode == "distributed":
                limits["single_broadcast"].append(_single_broadcast_seconds(engine, syncs["bucketed"], total))
        results = []
        for name, stats in samples.items():
            seconds = statistics.median(s.seconds for s in stats)
            nbytes = stats[0].bytes
            results.append({"strategy": name, "mode": mode, "dtype": dtype, "params": shape.num_parameters(),
                            "gb": round(nbytes / 1e9, 4), "buckets": len(stats[0].bucket_bytes),
                            "seconds_per_sync": round(seconds, 4), "gb_per_s": round(nbytes / 1e9 / seconds, 4)})
        summary = {"speedup_bucketed_vs_per_tensor":
                   round(results[1]["seconds_per_sync"] / results[0]["seconds_per_sync"], 2)}
        for limit, seconds in limits.items():
            if seconds:
                gbps = total / 1e9 / statistics.median(seconds)
                summary[f"{limit}_gb_per_s"] = round(gbps, 4)
                summary[f"bucketed_vs_{limit}"] = round(results[0]["gb_per_s"] / gbps, 3)
        # What these rates imply for Qwen3-8B in bf16 (8.19e9 parameters, 16.4 GB) on this machine.
        summary["implied_qwen3_8b_sync_seconds"] = round(QWEN3_8B_BF16_BYTES / 1e9 / results[0]["gb_per_s"], 1)
        results.append(summary)
        for r in results:
            print(json.dumps(r))
        if mode == "distributed":
            syncs["bucketed"].disconnect()
        return results
    finally:
        if engine is not None:
            engine.shutdown()
        tmp.cleanup()


QWEN3_8B_BF16_BYTES = 8_190_735_360 * 2


def _copy_seconds(nbytes: int) -> float:
    """One device copy of the same bytes (the memory-bandwidth limit of any transport on this machine)."""
    import time

    src = torch.empty(nbytes, dtype=torch.uint8)
    start = time.perf_counter()
    src.clone()
    return time.perf_counter() - start


def _single_broadcast_seconds(engine, sync, nbytes: int) -> float:
    """The same bytes as ONE announced broadcast into the engine, inside a session that is closed without a
    commit (the limit of the distributed transport: its HTTP, rendezvous and collective, no export)."""
    import time

    from tapo_megatron.rollout.buckets import FlatBucket, FlatTensorMeta

    flat = torch.zeros(nbytes, dtype=torch.uint8)
    bucket = FlatBucket(None, flat, [FlatTensorMeta("bench.flat", torch.Size([nbytes]), torch.uint8, 0, nbytes,
                                                    nbytes)])
    start = time.perf_counter()
    engine.begin_weight_update(engine.weight_version)
    engine.update_weights_from_distributed(bucket, sync.group_name(0), engine.weight_version, servers=[0],
                                           send=lambda: torch.distributed.broadcast(flat, src=0, group=sync._groups[0]))
    for server in engine.servers:  # close without committing: the staged "bench.flat" is dropped at the next begin
        server.post("/end_weight_update", {})
        server.post("/continue_generation", {})
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tapo bench sync", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="a shipped Qwen3 preset (e.g. Qwen3-0.6B)")
    source.add_argument("--hf-config", help="an HF config.json")
    parser.add_argument("--mode", choices=["distributed", "colocated"], default="distributed")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if args.preset:
        from tapo_megatron.models.hf_config import qwen3_preset

        shape_cfg = qwen3_preset(args.preset)
    elif args.hf_config:
        shape_cfg = json.loads(Path(args.hf_config).read_text())
    else:
        shape_cfg = dict(DEFAULT_SHAPE)
    if args.repeats < 1 or args.bucket_mb <= 0:
        raise ValueError("--repeats must be >= 1 and --bucket-mb > 0")
    torch.set_num_threads(1)
    run(shape_cfg, args.mode, int(args.bucket_mb * 2**20), args.repeats, args.dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
