"""Colocated weight sync: the engines share the trainer's devices, so weights move by reference, not by copy.

* In-process engine (``NativeEngine`` on global rank 0): the all-stage bucket stream goes straight into
  ``engine.update_weights(stream, version)``, which stages, validates and applies atomically.
* SGLang engines on the same GPUs: each bucket is grouped by dtype and flattened into one buffer per dtype
  (``flatten_by_dtype``); the buffer's CUDA IPC handle is serialized with SGLang's ``MultiprocessingSerializer``
  and sent with ``/update_weights_from_tensor`` (``load_format="flattened_bucket"``), one copy of the handle per
  engine TP rank (each rank opens it and keeps its shard). The weight version rides on the last bucket. The buffer
  stays referenced until the engine has answered, since the engine reads it directly.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tapo_megatron.parallel import ParallelContext
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.common import (
    Bucket,
    FlatBucket,
    SyncStats,
    Timer,
    WeightSync,
    all_stage_buckets,
    bucket_nbytes,
    flatten_by_dtype,
)


def serialize_flat_bucket(flat: FlatBucket) -> str:
    """A FlatBucket as SGLang's flattened-bucket payload, base64 (``MultiprocessingSerializer``: CUDA tensors
    travel as IPC handles). Needs sglang importable (true wherever SGLang engines run)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    # SGLang's own metadata class, so the engine process can unpickle it without importing tapo_megatron.
    metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                        end_idx=m.end_idx, numel=m.numel) for m in flat.metadata]
    return MultiprocessingSerializer.serialize({"flattened_tensor": flat.flat, "metadata": metadata},
                                               output_str=True)


def _lookahead(buckets: Iterable[Bucket]) -> Iterable[tuple[Bucket, bool]]:
    """(bucket, is_last) pairs, so the last bucket can carry the version."""
    iterator = iter(buckets)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for nxt in iterator:
        yield current, False
        current = nxt
    yield current, True


def push_buckets_via_ipc(engine: Any, buckets: Iterable[Bucket], version: int) -> SyncStats:
    """Send buckets to every server of an ``SGLangEngine`` through CUDA IPC (see module docstring)."""
    from tapo_megatron.rollout.sglang import pause_payload, update_tensor_payload

    stats = SyncStats(mode="colocated", version=version)
    for server in engine.servers:
        server.post("/pause_generation", pause_payload())
    for bucket, last in _lookahead(buckets):
        flats = flatten_by_dtype(bucket)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the flat buffers must be written before another process reads them
        for j, flat in enumerate(flats):
            serialized = serialize_flat_bucket(flat)
            tag = version if last and j == len(flats) - 1 else None
            for server in engine.servers:
                server.post("/update_weights_from_tensor",
                            update_tensor_payload([serialized] * server.world_size, tag))
        stats.bucket_bytes.append(bucket_nbytes(bucket))
        stats.bytes += stats.bucket_bytes[-1]
        stats.num_tensors += len(bucket)
        del flats  # only now: the engines answered, so they are done reading the buffers
    for server in engine.servers:
        server.post("/continue_generation", {})
    return stats


class TensorWeightSync(WeightSync):
    """Colocated sync into an in-process engine or SGLang engines on the same GPUs (see module docstring).

    Args:
        model: the actor's (possibly DDP-wrapped) Qwen3 stage.
        ctx: the trainer's parallel context.
        engine: on global rank 0 the engine (``NativeEngine`` or ``SGLangEngine``); None on other ranks.
        bucket_bytes: bound on one bucket.
    """

    mode = "colocated"

    def __init__(self, model, ctx: ParallelContext, engine: RolloutEngine | None, bucket_bytes: int):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
        self.model, self.ctx, self.engine, self.bucket_bytes = model, ctx, engine, bucket_bytes

    def sync(self, version: int) -> SyncStats:
        import torch.distributed as dist

        from tapo_megatron.rollout.sglang import SGLangEngine

        stats = SyncStats(mode=self.mode, version=version)
        with Timer() as timer:
            stream = all_stage_buckets(self.model, self.ctx, self.bucket_bytes)
            if self.ctx.rank == 0 and self.engine is not None:
                if isinstance(self.engine, SGLangEngine):
                    sent = push_buckets_via_ipc(self.engine, stream, version)
                    self.engine.set_weight_version(version)
                    stats.bytes, stats.bucket_bytes, stats.num_tensors = sent.bytes, sent.bucket_bytes, sent.num_tensors
                else:
                    self.engine.update_weights(_counted(stream, stats), version)
            else:
                for _ in stream:
                    pass
            if self.ctx.world_size > 1:
                dist.barrier()
        stats.seconds = timer.seconds
        return stats


def _counted(stream: Iterable[Bucket], stats: SyncStats) -> Iterable[Bucket]:
    for bucket in stream:
        stats.bucket_bytes.append(bucket_nbytes(bucket))
        stats.bytes += stats.bucket_bytes[-1]
        stats.num_tensors += len(bucket)
        yield bucket
