"""Pieces shared by the weight-sync transports: the bucket streams, per-dtype flattening, stats, the base class.

Streams (all built on ``convert.qwen3.export_hf_weights``: HF names, TP-gathered, PP-stage-local, size-bounded):

* ``source_stage_buckets``: every rank iterates its stage's export in lockstep (TP all-gathers); the stage's source
  rank (TP rank 0, DP rank 0) gets the buckets, the others get nothing. Used by the distributed transport, where each
  PP stage's source sends its own buckets.
* ``all_stage_buckets``: global rank 0 receives every stage's buckets in stage order (other stages' sources ship
  theirs to rank 0). Used where one process feeds the engine (in-process native engine, colocated IPC, disk).
"""
from __future__ import annotations

import abc
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tapo_megatron.convert.qwen3 import export_hf_weights
from tapo_megatron.parallel import ParallelContext

Bucket = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight sync that did not complete; the engines still serve the previous version (message says why)."""


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


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
class FlatTensorMeta:
    """Where one tensor lives in a flat byte buffer (field names as SGLang's ``FlattenedTensorMetadata``:
    byte offsets ``start_idx:end_idx``, ``numel`` counts bytes)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@dataclass
class FlatBucket:
    """One dtype's tensors of a bucket, concatenated into one uint8 buffer (one IPC handle instead of one per
    tensor)."""

    dtype: torch.dtype
    flat: torch.Tensor  # [total_bytes] uint8, on the tensors' device
    metadata: list[FlatTensorMeta]


def flatten_by_dtype(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[FlatBucket]:
    """Group a bucket by dtype and concatenate each group's raw bytes, in bucket order within a group."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    out = []
    for dtype, items in groups.items():
        parts, metadata, offset = [], [], 0
        for name, tensor in items:
            raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
            metadata.append(FlatTensorMeta(name, tensor.shape, dtype, offset, offset + raw.numel(), raw.numel()))
            parts.append(raw)
            offset += raw.numel()
        out.append(FlatBucket(dtype, torch.cat(parts), metadata))
    return out


def unflatten(flat: FlatBucket) -> Bucket:
    """Inverse of ``flatten_by_dtype`` for one group: views into ``flat.flat``."""
    return [(m.name, flat.flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in flat.metadata]


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

    def connect(self) -> None:
        """Set up transport state (process groups, directories). Default: nothing to do."""

    @abc.abstractmethod
    def sync(self, version: int) -> SyncStats:
        """Push the actor's current weights as ``version``; collective over all trainer ranks."""

    def disconnect(self) -> None:
        """Tear down transport state. Default: nothing to do."""
