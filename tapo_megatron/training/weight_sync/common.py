"""Pieces shared by the weight-sync transports: the bucket streams, per-dtype flattening, stats, the base class.

Streams (all built on ``convert.qwen3.export_hf_weights``: HF names, TP-gathered, PP-stage-local, size-bounded):

* ``source_stage_buckets``: every rank iterates its stage's export in lockstep (TP all-gathers); the stage's source
  rank (TP rank 0, DP rank 0) gets the buckets, the others get nothing. Used by the distributed transport, where each
  PP stage's source sends its own buckets.
* ``all_stage_buckets``: global rank 0 receives every stage's buckets in stage order (other stages' sources ship
  theirs to rank 0). Used where one process feeds the engine (in-process native engine, colocated IPC, disk).

The flat layouts live in ``rollout.buckets`` (the engines decode them).
"""
from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tapo_megatron.convert.qwen3 import export_hf_weights
from tapo_megatron.errors import TapoError
from tapo_megatron.parallel import ParallelContext
from tapo_megatron.rollout.buckets import (  # noqa: F401  (re-exported for the transports)
    Bucket,
    FlatBucket,
    FlatTensorMeta,
    bucket_nbytes,
    flatten_by_dtype,
    flatten_for_broadcast,
    unflatten,
)


class WeightSyncError(TapoError, RuntimeError):
    """A weight sync that did not complete: one line naming the engine and the weight version; no engine serves a
    half-updated model afterwards (it still serves the previous version, or stays paused until the next sync)."""


def raise_if_rank0_failed(ctx: ParallelContext, mode: str, error: str | None, version: int, engine) -> None:
    """Broadcast "did rank 0's engine take the update"; on failure every rank raises the same WeightSyncError,
    naming the engine's error and the version it still serves. Collective."""
    failed = torch.tensor([1.0 if error else 0.0], device=ctx.device)
    if ctx.world_size > 1:
        dist.broadcast(failed, src=0)
    if failed.item() > 0:
        served = engine.weight_version if engine is not None else "the previous one"
        raise WeightSyncError(f"{mode} weight sync to version {version} failed"
                              + (f": {error}" if error else " on rank 0") + f"; the engine serves version {served}")


def shape_mismatch(model, engine) -> str | None:
    """Rank 0, before any bucket is sent: the first names/shapes where the trainer's HF export and the engine's
    model differ (a tied ``lm_head.weight`` may be absent on either side); None when they agree or the engine
    cannot say."""
    expected = engine.expected_weight_shapes() if engine is not None else None
    if expected is None:
        return None
    from tapo_megatron.convert.qwen3 import hf_shapes, shape_of_model

    sent = hf_shapes(shape_of_model(model))
    tied = {"lm_head.weight"}
    unknown = [n for n in sent if n not in expected]
    missing = [n for n in expected if n not in sent and n not in tied]
    wrong = [f"{n} {tuple(sent[n])} vs engine {tuple(expected[n])}" for n in sent
             if n in expected and tuple(sent[n]) != tuple(expected[n])]
    problems = ([f"unknown to the engine: {', '.join(unknown[:3])}"] if unknown else []) + \
               ([f"missing from the trainer: {', '.join(missing[:3])}"] if missing else []) + \
               ([f"shape {'; '.join(wrong[:3])}"] if wrong else [])
    return "; ".join(problems) or None


def refuse_mismatched_engine(model, ctx: ParallelContext, engine, mode: str, version: int) -> None:
    """Collective: every rank raises the same WeightSyncError when rank 0 finds a name/shape mismatch."""
    problem = None
    if ctx.rank == 0:
        try:
            problem = shape_mismatch(model, engine)
        except Exception as err:  # noqa: BLE001 - e.g. the engine is unreachable: report it like a mismatch
            problem = f"could not read the engine's model: {type(err).__name__}: {err}"
    if ctx.world_size > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise WeightSyncError(f"{mode} weight sync to version {version} refused before sending anything: the "
                              f"trainer's model and the engine's differ ({problem})")


def is_source_rank(ctx: ParallelContext) -> bool:
    """The rank that sends its pipeline stage's weights: TP rank 0 of DP replica 0."""
    return ctx.tp_rank == 0 and ctx.dp_rank == 0


def source_stage_buckets(model, ctx: ParallelContext, bucket_bytes: int) -> Iterator[Bucket]:
    """This stage's buckets on its source rank; other ranks iterate (for the TP collectives) and yield nothing."""
    for bucket in export_hf_weights(model, ctx, bucket_bytes):
        if is_source_rank(ctx):
            yield bucket


def all_stage_buckets(model, ctx: ParallelContext, bucket_bytes: int) -> Iterator[Bucket]:
    """On global rank 0: every stage's buckets in stage order; elsewhere: ship this stage's buckets to rank 0."""
    for stage in range(ctx.pp_size):
        if stage == ctx.pp_rank:
            for bucket in export_hf_weights(model, ctx, bucket_bytes):
                if ctx.rank == 0:
                    yield [(name, t.detach().clone()) for name, t in bucket]
                elif is_source_rank(ctx) and stage > 0:
                    dist.send_object_list([[(n, t.cpu()) for n, t in bucket]], dst=0)
            if stage > 0 and is_source_rank(ctx) and ctx.rank != 0:
                dist.send_object_list([None], dst=0)  # end of this stage's stream
        elif ctx.rank == 0 and stage > 0:
            src_rank = dist.get_global_rank(ctx.pp_group, stage)
            while True:
                box = [None]
                dist.recv_object_list(box, src=src_rank)
                if box[0] is None:
                    break
                yield box[0]


@dataclass
class SyncStats:
    """One sync: what moved and how long it took (``as_metrics`` gives the RL loop's ``sync/*`` keys)."""

    mode: str
    version: int
    seconds: float = 0.0
    bytes: int = 0  # payload bytes sent by this rank (0 on non-source ranks)
    num_tensors: int = 0
    bucket_bytes: list[int] = field(default_factory=list)  # size of every bucket this rank sent
    check: dict[str, float] = field(default_factory=dict)  # post-sync check results, if one ran

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def as_metrics(self) -> dict[str, float]:
        out = {"sync/seconds": self.seconds, "sync/bytes": float(self.bytes), "sync/gb_per_s": self.gb_per_s,
               "sync/buckets": float(len(self.bucket_bytes)), "sync/tensors": float(self.num_tensors)}
        out.update({f"sync/check_{k}": v for k, v in self.check.items()})
        return out


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


class WeightSync(abc.ABC):
    """One transport, same methods for all (slime's ``UpdateWeightFrom{Tensor,Distributed,Disk}``).

    ``connect()`` once after the engines exist (collective over the trainer ranks); ``sync(version)`` after every
    optimizer step (collective), which leaves every engine serving ``version`` or raises ``WeightSyncError`` with
    the engines still on the previous version; ``disconnect()`` at the end.
    """

    mode: str = ""
    _shapes_checked = False

    def check_engine_shapes(self, version: int) -> None:
        """Once (and again after an engine restart): refuse an engine whose model differs, before any bucket."""
        if not self._shapes_checked:
            refuse_mismatched_engine(self.model, self.ctx, self.engine, self.mode, version)
            self._shapes_checked = True

    def connect(self) -> None:
        """Set up transport state (process groups, directories). Default: nothing to do."""

    @abc.abstractmethod
    def sync(self, version: int) -> SyncStats:
        """Push the actor's current weights as ``version``; collective over all trainer ranks."""

    def disconnect(self) -> None:
        """Tear down transport state. Default: nothing to do."""
