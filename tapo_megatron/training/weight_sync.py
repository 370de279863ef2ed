"""Push the actor's weights into rollout engines after every optimizer step (one mapping: convert.qwen3).

The export iterator yields HF-named, TP-gathered, PP-stage-local tensors in size-bounded buckets. Engines live on
global rank 0 (native engine, in-process); with PP > 1 the other stages ship their buckets to rank 0, which feeds
the whole stream to the engine as one atomic update carrying the new weight version.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
import torch.distributed as dist

from tapo_megatron.convert.qwen3 import export_hf_weights
from tapo_megatron.parallel import ParallelContext
from tapo_megatron.rollout.base import RolloutEngine


def _all_stage_buckets(model, ctx: ParallelContext, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """On global rank 0: every stage's buckets in stage order; elsewhere: send this stage's buckets to rank 0."""
    for stage in range(ctx.pp_size):
        if stage == ctx.pp_rank:
            for bucket in export_hf_weights(model, ctx, bucket_bytes):
                if ctx.rank == 0:
                    yield [(name, t.detach().clone()) for name, t in bucket]
                elif ctx.tp_rank == 0 and ctx.dp_rank == 0 and stage > 0:
                    dist.send_object_list([[(n, t.cpu()) for n, t in bucket]], dst=0)
            if stage > 0 and ctx.tp_rank == 0 and ctx.dp_rank == 0 and ctx.rank != 0:
                dist.send_object_list([None], dst=0)  # end of this stage's stream
        elif ctx.rank == 0 and stage > 0:
            src_rank = dist.get_global_rank(ctx.pp_group, stage)
            while True:
                box = [None]
                dist.recv_object_list(box, src=src_rank)
                if box[0] is None:
                    break
                yield box[0]


def sync_weights(actor, engine: RolloutEngine | None, version: int, bucket_bytes: int) -> dict:
    """Export the actor's weights into ``engine`` (held by global rank 0) as ``version``; collective over ranks."""
    start = time.perf_counter()
    ctx = actor.ctx
    stream = _all_stage_buckets(actor.module, ctx, bucket_bytes)
    nbytes = 0
    if ctx.rank == 0 and engine is not None:
        def counted():
            nonlocal nbytes
            for bucket in stream:
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket
        engine.update_weights(counted(), version)
    else:
        for _ in stream:
            pass
    if ctx.world_size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    return {"sync/seconds": seconds, "sync/bytes": float(nbytes)}


def gather_hf_state(actor, bucket_bytes: int = 2**26) -> dict[str, torch.Tensor] | None:
    """The full HF-named state dict on global rank 0 (None elsewhere); collective over all ranks."""
    state = {}
    for bucket in _all_stage_buckets(actor.module, actor.ctx, bucket_bytes):
        state.update({name: t.detach().cpu().clone() for name, t in bucket})
    return state if actor.ctx.rank == 0 else None
