"""Colocated weight sync: the engines share the trainer's devices, so weights move by reference, not by copy.

The transport calls ``engine.update_weights_from_tensor(stream, version)`` on global rank 0 and never looks at the
engine's type. What the stream holds depends on ``per_rank_ipc`` (set from the config, the same on every rank):

* False (an in-process engine, or TP-1 SGLang): rank 0's HF-named buckets (all stages gathered to rank 0).
* True (SGLang engines on the trainer's GPUs): per bucket, a list of ``rollout.sglang.TensorPayload`` - every
  trainer rank of the first pipeline stage flattens its own copy of the bucket (TP all-gathered, so every TP rank
  holds it, on its own GPU), serializes it as SGLang's flattened-bucket payload (CUDA-IPC handle, device named by
  UUID through SGLang's reductions patch) and the payloads are gathered to rank 0, which sends engine ``i``'s TP
  rank ``r`` the payload of the trainer rank on GPU ``i * engine_tp + r``: each engine rank opens memory on its own
  GPU, owned by the trainer process on that GPU (as slime's ``UpdateWeightFromTensor`` and NeMo-RL do). The buffers stay
  referenced until rank 0 says the engines answered (a barrier per bucket), since the engines read them in place.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from tapo_megatron.convert.qwen3 import export_hf_weights
from tapo_megatron.parallel import ParallelContext
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.common import (
    Bucket,
    SyncStats,
    Timer,
    WeightSync,
    WeightSyncError,
    all_stage_buckets,
    bucket_nbytes,
    flatten_by_dtype,
    raise_if_rank0_failed,
)


def rank_payload_stream(model, ctx: ParallelContext, bucket_bytes: int, serialize: Callable, stats: SyncStats,
                        engine_tp: int) -> Iterator[list]:
    """Per bucket, on rank 0: one ``TensorPayload`` per dtype group, ``per_server[i][r]`` serialized by the trainer
    rank on GPU ``i * engine_tp + r`` (global rank = GPU index: one node, PP 1; every rank holds the whole bucket
    after the TP all-gather); elsewhere yields nothing but must be iterated in lockstep (a gather per bucket)."""
    from tapo_megatron.rollout.sglang import TensorPayload

    if ctx.pp_size != 1:
        raise WeightSyncError("colocated per-rank CUDA-IPC sync needs pipeline_model_parallel_size=1 (each engine "
                              "rank must find the whole model on its GPU)")
    if ctx.world_size % engine_tp:
        raise WeightSyncError(f"engine TP {engine_tp} does not divide the {ctx.world_size} trainer ranks")
    for bucket in export_hf_weights(model, ctx, bucket_bytes):
        flats = flatten_by_dtype(bucket)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the flat buffers must be written before another process reads them
        mine = [serialize(f) for f in flats]
        gathered = [None] * ctx.world_size if ctx.rank == 0 else None
        if ctx.world_size > 1:
            dist.gather_object(mine, gathered, dst=0)
        else:
            gathered = [mine]
        if ctx.rank == 0:
            stats.bucket_bytes.append(bucket_nbytes(bucket))
            stats.bytes += stats.bucket_bytes[-1]
            stats.num_tensors += len(bucket)
            servers = ctx.world_size // engine_tp
            yield [TensorPayload([[gathered[i * engine_tp + r][j] for r in range(engine_tp)] for i in range(servers)],
                                 flat.nbytes) for j, flat in enumerate(flats)]
        if ctx.world_size > 1:
            dist.barrier()  # rank 0 has the engines' answers for this bucket: the buffers may go
        del flats


class TensorWeightSync(WeightSync):
    """Colocated sync into an in-process engine or SGLang engines on the same GPUs (see module docstring).

    Args:
        model: the actor's (possibly DDP-wrapped) Qwen3 stage.
        ctx: the trainer's parallel context.
        engine: on global rank 0 the engine; None on other ranks.
        bucket_bytes: bound on one bucket.
        per_rank_ipc: build one CUDA-IPC payload per engine TP rank on the trainer rank of that GPU.
        engine_tp: GPUs per engine (``launch.engine_tp``): engine i's TP rank r sits on GPU i * engine_tp + r.
        serialize: FlatBucket -> payload string (default: SGLang's flattened-bucket serializer).
    """

    mode = "colocated"

    def __init__(self, model, ctx: ParallelContext, engine: RolloutEngine | None, bucket_bytes: int, *,
                 per_rank_ipc: bool = False, serialize: Callable | None = None, engine_tp: int = 1):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
        self.model, self.ctx, self.engine, self.bucket_bytes = model, ctx, engine, bucket_bytes
        self.per_rank_ipc, self.engine_tp = per_rank_ipc, engine_tp
        if serialize is None and per_rank_ipc:
            from tapo_megatron.rollout.sglang import serialize_flat_bucket as serialize
        self.serialize = serialize

    def sync(self, version: int) -> SyncStats:
        stats = SyncStats(mode=self.mode, version=version)
        with Timer() as timer:
            self.check_engine_shapes(version)
            if self.per_rank_ipc:
                stream = rank_payload_stream(self.model, self.ctx, self.bucket_bytes, self.serialize, stats,
                                             self.engine_tp)
            else:
                stream = _counted(all_stage_buckets(self.model, self.ctx, self.bucket_bytes), stats)
            error = None
            if self.ctx.rank == 0 and self.engine is not None:
                try:
                    self.engine.update_weights_from_tensor(stream, version)
                except Exception as err:  # noqa: BLE001 - reported on every rank below
                    error = f"{type(err).__name__}: {err}"
                for _ in stream:  # a failed engine stops reading: finish the collectives of the other ranks
                    pass
            else:
                for _ in stream:
                    pass
            raise_if_rank0_failed(self.ctx, self.mode, error, version, self.engine)
        stats.seconds = timer.seconds
        return stats


def _counted(stream: Iterable[Bucket], stats: SyncStats) -> Iterator[Bucket]:
    for bucket in stream:
        stats.bucket_bytes.append(bucket_nbytes(bucket))
        stats.bytes += stats.bucket_bytes[-1]
        stats.num_tensors += len(bucket)
        yield bucket
