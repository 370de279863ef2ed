"""GPU end-to-end check: real SGLang engine, real weight sync, log-prob parity SGLang vs Megatron, sync time.

Needs a GPU machine with sglang 0.5.23, megatron-core and this package installed, and a local Qwen3 HF folder:

    torchrun --nproc_per_node 1 examples/sglang_e2e.py --model /models/Qwen3-0.6B --mode distributed
    torchrun --nproc_per_node 1 examples/sglang_e2e.py --model /models/Qwen3-0.6B --mode disk --disk-dir /tmp/w
    python   examples/sglang_e2e.py --model /models/Qwen3-0.6B --mode colocated --engine-mem 0.4

Steps: launch one SGLang server (``--mem-fraction-static``; colocated adds ``--enable-memory-saver``) from the HF
folder; build the Megatron actor from the same folder, perturb its weights (so only a working sync can restore
parity), sync them as version 1 with the chosen transport (timed), then compare per-token log-probs on fixed probe
sequences (SGLang ``input_token_logprobs`` vs ``MegatronActor.compute_logprobs``) and on sampled responses (SGLang's
``output_token_logprobs`` vs the actor's recomputation). Prints one JSON line: sync seconds, GB/s, max |diff|.
Expected in bf16: max |diff| of a few 1e-2 (kernel differences), far below the perturbation's effect.
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Qwen3 HF folder (config.json + safetensors)")
    parser.add_argument("--mode", choices=["colocated", "distributed", "disk"], default="distributed")
    parser.add_argument("--disk-dir", default="/tmp/tapo_sync")
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--engine-mem", type=float, default=0.5, help="SGLang --mem-fraction-static")
    parser.add_argument("--atol", type=float, default=0.1)
    args = parser.parse_args()

    from tapo_megatron.config import OptimizerConfig, ParallelConfig
    from tapo_megatron.convert.hf_io import HFCheckpointReader
    from tapo_megatron.models.qwen3 import Qwen3Shape
    from tapo_megatron.parallel import init_parallel
    from tapo_megatron.records import SamplingParams
    from tapo_megatron.rollout.sglang import SGLangEngine, ServerLaunch, sglang_server_argv
    from tapo_megatron.training.actor import MegatronActor
    from tapo_megatron.training.weight_sync import check_logprobs, make_weight_sync, probe_tokens

    reader = HFCheckpointReader(args.model)
    shape = Qwen3Shape.from_hf(reader.config)
    ctx = init_parallel(1, 1, seed=0)
    engine = None
    if ctx.rank == 0:
        argv = sglang_server_argv(args.model, mem_fraction_static=args.engine_mem,
                                  enable_memory_saver=args.mode == "colocated", deterministic=True,
                                  extra={"dtype": "bfloat16", "disable_radix_cache": True})
        engine = SGLangEngine.launch([ServerLaunch(argv=argv)], startup_timeout_s=900)
    actor = MegatronActor(shape, ctx, OptimizerConfig(), ParallelConfig(micro_batch_size=1))
    actor.load_hf_state(reader)
    with torch.no_grad():  # a visible change: the engine must take the synced weights to match
        for p in actor.module.parameters():
            p.mul_(1.01)
    sync = make_weight_sync(args.mode, actor, engine, int(args.bucket_mb * 2**20), disk_root=args.disk_dir)
    sync.connect()
    stats = sync.sync(1)
    probes = probe_tokens(shape.vocab_size, num=4, length=64)
    probe_diff = check_logprobs(actor, engine, probes, atol=args.atol)
    prompts = probes[:, :16].tolist()
    gens = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=64, seed=0)) if engine else []
    box = [gens]
    torch.distributed.broadcast_object_list(box, src=0)
    gens = box[0]
    n = min(len(g.token_ids) for g in gens)
    seqs = torch.tensor([p + g.token_ids[:n] for p, g in zip(prompts, gens)])
    recomputed, _ = actor.compute_logprobs(seqs)
    if ctx.rank == 0:
        engine_lp = torch.tensor([g.logprobs[:n] for g in gens])
        sample_diff = float((recomputed[:, 16:].float().cpu() - engine_lp).abs().max())
        print(json.dumps({"mode": args.mode, "sync_seconds": round(stats.seconds, 3),
                          "gb_per_s": round(stats.gb_per_s, 3), "gb": round(stats.bytes / 1e9, 3),
                          "probe_max_abs_diff": probe_diff, "sample_max_abs_diff": sample_diff,
                          "versions": sorted({g.weight_version for g in gens})}))
    sync.disconnect()
    if engine is not None:
        engine.shutdown()


if __name__ == "__main__":
    main()
