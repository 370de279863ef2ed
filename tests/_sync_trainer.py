"""Worker for tests/test_weight_sync_transports.py: a TP=2 trainer (torchrun, 2 gloo ranks) syncing into a native
engine server in another process through the disaggregated transport (the code path NCCL + SGLang uses).

    torchrun --nproc_per_node 2 tests/_sync_trainer.py ENGINE_URL BUCKET_BYTES OUT.pt DISK_DIR

Steps: load fixed HF weights into the actor, sync as version 1, score probes and sampled sequences on both sides;
take a training step, run a sync to version 2 that fails after two buckets (injected), record what the engine
serves; then sync version 3 and score again; then two disk syncs (versions 4, 5: HF checkpoint + the engine's
/update_weights_from_disk, keeping one folder). Rank 0 saves everything to OUT.pt for the test to assert on.
"""
import sys

import torch

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.parallel import init_parallel
from tapo_megatron.records import SamplingParams
from tapo_megatron.rollout.sglang import EngineServer, SGLangEngine
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.weight_sync import DiskWeightSync, WeightSyncError, check_logprobs
from tapo_megatron.training.weight_sync import distributed as distributed_module
from tapo_megatron.training.weight_sync.distributed import DistributedWeightSync

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _parallel_worker import SHAPE, hf_weights  # noqa: E402  (the same fixed model as the parallel tests)


def main(url: str, bucket_bytes: int, out: str, disk_dir: str) -> None:
    torch.set_num_threads(1)
    ctx = init_parallel(2, 1, seed=7)
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(lr=0.05), ParallelConfig(micro_batch_size=4))
    actor.load_hf_state(hf_weights(SHAPE))
    servers = [EngineServer(url=url, startup_timeout_s=60)]
    engine = SGLangEngine.connect([url], startup_timeout_s=60) if ctx.rank == 0 else None
    sync = DistributedWeightSync(actor.module, ctx, engine, bucket_bytes, group_timeout_s=120)
    sync.connect()
    probes = torch.randint(0, SHAPE.vocab_size, (3, 12), generator=torch.Generator().manual_seed(11))
    result = {}

    # 1. A full sync, then both sides score the same sequences.
    stats = sync.sync(1)
    result["v1_stats"] = {"bucket_bytes": stats.bucket_bytes, "bytes": stats.bytes, "tensors": stats.num_tensors}
    result["v1_check"] = check_logprobs(actor, engine, probes, atol=1e-4)
    prompts = probes[:, :4].tolist()
    gens = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)) if engine else None
    box = [gens]
    torch.distributed.broadcast_object_list(box, src=0)
    gens = box[0]
    seqs = torch.tensor([p + g.token_ids for p, g in zip(prompts, gens)])
    recomputed, _ = actor.compute_logprobs(seqs)
    actor_v1, _ = actor.compute_logprobs(probes)
    if ctx.rank == 0:
        result["v1_gen_engine_lp"] = torch.tensor([g.logprobs for g in gens])
        result["v1_gen_actor_lp"] = recomputed[:, 4:].float()
        result["v1_gen_versions"] = [g.weight_version for g in gens]
        result["v1_actor_probe_lp"] = actor_v1[:, 1:].float()

    # 2. One training step, then a sync that dies after two buckets.
    tokens = torch.randint(0, SHAPE.vocab_size, (4, 12), generator=torch.Generator().manual_seed(5))
    actor.train_step({"tokens": tokens, "mask": torch.ones(4, 12)}, lambda lp, mb: (-(lp * mb["mask"]).mean(), {}))
    real_export = distributed_module.export_hf_weights

    def failing_export(model, ctx_, bucket_bytes_):
        for i, bucket in enumerate(real_export(model, ctx_, bucket_bytes_)):
            if i == 2:
                raise RuntimeError("injected failure after two buckets")
            yield bucket

    distributed_module.export_hf_weights = failing_export
    try:
        sync.sync(2)
        result["interrupted_raised"] = False
    except WeightSyncError as err:
        result["interrupted_raised"] = True
        result["interrupted_message"] = str(err)
    finally:
        distributed_module.export_hf_weights = real_export
    if ctx.rank == 0:
        result["after_interrupt_version"] = servers[0].weight_version()
        result["after_interrupt_engine_lp"] = engine.prompt_logprobs(probes)[0]
    actor_v2, _ = actor.compute_logprobs(probes)
    if ctx.rank == 0:
        result["v2_actor_probe_lp"] = actor_v2[:, 1:].float()

    # 3. The next sync succeeds and the engine matches the updated actor.
    sync.sync(3)
    result["v3_check"] = check_logprobs(actor, engine, probes, atol=1e-4)
    if ctx.rank == 0:
        result["v3_version"] = servers[0].weight_version()
        result["v3_engine_version"] = engine.weight_version
    sync.disconnect()

    # 4. Disk transport into the same server: a checkpoint per version, only the newest kept.
    actor.train_step({"tokens": tokens, "mask": torch.ones(4, 12)}, lambda lp, mb: (-(lp * mb["mask"]).mean(), {}))
    disk = DiskWeightSync(actor.module, ctx, engine, disk_dir, bucket_bytes, keep=1)
    disk.sync(4)
    disk_stats = disk.sync(5)
    result["disk_check"] = check_logprobs(actor, engine, probes, atol=1e-4)
    if ctx.rank == 0:
        result["disk_version"] = servers[0].weight_version()
        result["disk_reload_path"] = engine.reload_path
        result["disk_bytes"] = disk_stats.bytes
    if ctx.rank == 0:
        result["expected_bytes"] = sum(t.numel() * 4 for t in hf_weights(SHAPE).values())
        torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
