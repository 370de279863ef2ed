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

from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.check import check_logprobs, engine_prompt_logprobs, probe_tokens
from tapo_megatron.training.weight_sync.common import (
    FlatBucket,
    FlatTensorMeta,
    SyncStats,
    WeightSync,
    WeightSyncError,
    all_stage_buckets,
    bucket_nbytes,
    flatten_by_dtype,
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
                     servers=None, disk_root: str = "", master_address: str = "127.0.0.1") -> WeightSync:
    """The transport for ``rollout.weight_sync_mode``; ``servers`` (every rank) for distributed, ``disk_root`` for
    disk. Unknown modes are refused by name."""
    if mode == "colocated":
        return TensorWeightSync(actor.module, actor.ctx, engine, bucket_bytes)
    if mode == "distributed":
        from tapo_megatron.training.weight_sync.distributed import DistributedWeightSync

        if not servers:
            raise ValueError("weight_sync_mode='distributed' needs the engine servers (rollout.engine_urls)")
        return DistributedWeightSync(actor.module, actor.ctx, servers, bucket_bytes, engine=engine,
                                     master_address=master_address)
    if mode == "disk":
        if not disk_root:
            raise ValueError("weight_sync_mode='disk' needs rollout.weight_sync_dir")
        return DiskWeightSync(actor.module, actor.ctx, engine, disk_root, bucket_bytes)
    raise ValueError(f"rollout.weight_sync_mode={mode!r}: expected one of {', '.join(SYNC_MODES)}")


__all__ = [
    "DiskWeightSync", "FlatBucket", "FlatTensorMeta", "SYNC_MODES", "SyncStats", "TensorWeightSync", "WeightSync",
    "WeightSyncError", "all_stage_buckets", "bucket_nbytes", "check_logprobs", "engine_prompt_logprobs",
    "flatten_by_dtype", "gather_hf_state", "make_weight_sync", "probe_tokens", "source_stage_buckets",
    "sync_weights", "unflatten",
]
