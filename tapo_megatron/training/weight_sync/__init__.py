"""Push the actor's weights into rollout engines after every optimizer step (one mapping: ``convert.qwen3``).

One module and class per transport, same methods (``connect``, ``sync(version) -> SyncStats``, ``disconnect``):

==============  ==============================  ==========================================================
mode            class                           how
==============  ==============================  ==========================================================
colocated       ``TensorWeightSync``            in-process engine: the bucket stream; SGLang on the same
                                                GPUs: per-dtype flattened buckets via CUDA IPC handles
distributed     ``DistributedWeightSync``       process group source ranks -> engines, bucketed
                                                broadcasts announced by update-from-distributed
disk            ``DiskWeightSync``              HF checkpoint on a shared directory, update-from-disk
==============  ==============================  ==========================================================

Every sync carries a weight version; generations are tagged with the version the engine served. ``check_logprobs``
(check.py) is the optional post-sync probe comparison. ``sync_weights(actor, engine, version, bucket_bytes)`` is the
RL loop's one-call colocated sync into an in-process engine.
"""
from __future__ import annotations

import torch

from tapo_megatron.config import ConfigError, RolloutConfig
from tapo_megatron.parallel import broadcast_object
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.check import check_logprobs, probe_tokens
from tapo_megatron.training.weight_sync.common import (
    FlatBucket,
    FlatTensorMeta,
    SyncStats,
    WeightSync,
    WeightSyncError,
    all_stage_buckets,
    bucket_nbytes,
    flatten_by_dtype,
    is_source_rank,
    source_stage_buckets,
    unflatten,
)
from tapo_megatron.training.weight_sync.disk import DiskWeightSync
from tapo_megatron.training.weight_sync.tensor import TensorWeightSync

SYNC_MODES = ("colocated", "distributed", "disk")


def sync_weights(actor, engine: RolloutEngine | None, version: int, bucket_bytes: int) -> dict:
    """Export the actor's weights into ``engine`` (held by global rank 0) as ``version``; collective over ranks.

    Returns the ``sync/*`` metrics (seconds, bytes, GB/s, buckets, tensors).
    """
    return TensorWeightSync(actor.module, actor.ctx, engine, bucket_bytes).sync(version).as_metrics()


def gather_hf_state(actor, bucket_bytes: int = 2**26) -> dict[str, torch.Tensor] | None:
    """The full HF-named state dict on global rank 0 (None elsewhere); collective over all ranks."""
    state = {}
    for bucket in all_stage_buckets(actor.module, actor.ctx, bucket_bytes):
        state.update({name: t.detach().cpu().clone() for name, t in bucket})
    return state if actor.ctx.rank == 0 else None


def make_weight_sync(mode: str, actor, engine: RolloutEngine | None, bucket_bytes: int, *,
                     disk_root: str = "", master_address: str = "127.0.0.1", per_rank_ipc: bool = False,
                     engine_tp: int = 1) -> WeightSync:
    """The transport for ``rollout.weight_sync_mode``; ``engine``: rank 0's engine (distributed: an engine client
    on every source rank), ``disk_root`` for disk. Unknown modes are refused by name."""
    if mode == "colocated":
        return TensorWeightSync(actor.module, actor.ctx, engine, bucket_bytes, per_rank_ipc=per_rank_ipc,
                                engine_tp=engine_tp)
    if mode == "distributed":
        from tapo_megatron.training.weight_sync.distributed import DistributedWeightSync

        return DistributedWeightSync(actor.module, actor.ctx, engine, bucket_bytes, master_address=master_address)
    if mode == "disk":
        if not disk_root:
            raise ValueError("weight_sync_mode='disk' needs rollout.weight_sync_dir")
        return DiskWeightSync(actor.module, actor.ctx, engine, disk_root, bucket_bytes)
    raise ValueError(f"rollout.weight_sync_mode={mode!r}: expected one of {', '.join(SYNC_MODES)}")


def connect_weight_sync(rollout: RolloutConfig, actor, engine: RolloutEngine | None, engine_tp: int = 1) -> WeightSync:
    """The transport of ``rollout.weight_sync_mode`` (colocated / distributed / disk), connected. Collective.

    Distributed: every PP stage's source rank posts to the servers, so the source ranks other than rank 0 get an
    engine client of the same URLs (``rollout.engine_urls``). Colocated SGLang on several GPUs: one CUDA-IPC
    payload per engine TP rank, built by the trainer rank on that GPU."""
    if rollout.weight_sync_mode == "distributed" and engine is None and is_source_rank(actor.ctx):
        from tapo_megatron.rollout.sglang import SGLangEngine

        if not rollout.engine_urls:
            raise ValueError("weight_sync_mode='distributed' needs the engine servers (rollout.engine_urls)")
        engine = SGLangEngine.connect(rollout.engine_urls, startup_timeout_s=rollout.engine_startup_timeout_s,
                                      request_timeout_s=rollout.engine_request_timeout_s)
    # Colocated SGLang on several GPUs: each engine rank reads the copy of the trainer rank on its own GPU.
    per_rank_ipc = (rollout.weight_sync_mode == "colocated" and rollout.engine == "sglang"
                    and torch.cuda.is_available() and actor.ctx.world_size > 1)
    if per_rank_ipc and actor.ctx.pp_size != 1:
        raise ConfigError("colocated SGLang engines read each GPU's weights from the trainer rank on that GPU, which "
                          "holds the whole model only with parallel.pipeline_model_parallel_size=1")
    sync = make_weight_sync(rollout.weight_sync_mode, actor, engine, int(rollout.weight_sync_bucket_mb * 2**20),
                            disk_root=rollout.weight_sync_dir, master_address=rollout.weight_sync_master_address,
                            per_rank_ipc=per_rank_ipc, engine_tp=engine_tp)
    sync.connect()
    return sync


def push_weights(sync: WeightSync, rollout: RolloutConfig, actor, engine: RolloutEngine | None,
                 probes: torch.Tensor | None) -> dict:
    """Sync the actor's weights into the engines as version ``actor.iteration`` and, with
    ``rollout.weight_sync_check="logprobs"``, compare probe log-probs. Returns the ``sync/*`` metrics. Collective."""
    metrics = sync.sync(actor.iteration).as_metrics()
    if rollout.weight_sync_check == "logprobs":
        metrics["sync/check_max_abs_logprob"] = check_logprobs(actor, engine, probes, rollout.weight_sync_check_atol)
    return metrics


def refresh_engines(sync: WeightSync, actor, engine: RolloutEngine | None) -> dict:
    """Before a rollout: when an engine server does not serve the trainer's version (it restarted on its launch
    weights), push the current weights now (the distributed transport first rebuilds the lost update group), so
    no stale server samples. Collective. Returns ``sync/refreshed_engines``."""
    stale = engine.stale_servers() if engine is not None and actor.ctx.rank == 0 else []
    stale = broadcast_object(stale, actor.ctx)
    if stale:
        sync.sync(actor.iteration)
    return {"sync/refreshed_engines": float(len(stale))}


def release_engine_memory(rollout: RolloutConfig, launch, engine: RolloutEngine | None) -> dict:
    """Colocated SGLang: free the engines' weights and KV cache before the train step (rank 0; the engines are
    idle: the step's rollouts are done). Returns the engine's ``engine/*`` metrics (seconds, freed GB)."""
    if engine is None or not _colocated_sglang(rollout, launch):
        return {}
    return engine.release_memory() or {}


def resume_engine_memory(rollout: RolloutConfig, launch, engine: RolloutEngine | None) -> dict:
    """Undo ``release_engine_memory`` after the train step, before the weight sync loads into the engines."""
    if engine is None or not _colocated_sglang(rollout, launch):
        return {}
    return engine.resume_memory() or {}


def _colocated_sglang(rollout: RolloutConfig, launch) -> bool:
    return rollout.engine == "sglang" and launch.engine_placement == "colocated" and not rollout.engine_urls


__all__ = [
    "DiskWeightSync", "FlatBucket", "FlatTensorMeta", "SYNC_MODES", "SyncStats", "TensorWeightSync", "WeightSync",
    "WeightSyncError", "all_stage_buckets", "bucket_nbytes", "check_logprobs",
    "connect_weight_sync", "flatten_by_dtype", "gather_hf_state", "make_weight_sync", "probe_tokens",
    "push_weights", "refresh_engines", "release_engine_memory", "resume_engine_memory", "source_stage_buckets",
    "sync_weights", "unflatten",
]
