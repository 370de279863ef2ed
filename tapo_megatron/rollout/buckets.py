"""Weight buckets as they travel to engines: HF-named tensors, and their flattened forms.

A bucket is ``list[(HF name, tensor)]``. Two flat layouts, both SGLang's (``sglang.srt.weight_sync.tensor_bucket``):

* ``flatten_by_dtype``: one uint8 buffer per dtype of a bucket (the colocated CUDA-IPC payload: one handle per
  buffer; SGLang's ``_update_weights_from_flattened_bucket`` rebuilds the tensors with ``FlattenedTensorBucket``).
* ``flatten_for_broadcast``: one uint8 buffer for the whole bucket, tensors ordered by element size (largest first)
  so that every offset is aligned: the layout ``FlattenedTensorBucket.empty(names, dtypes, shapes)`` allocates on
  the receiving side of ``/update_weights_from_distributed`` with ``load_format="flattened_bucket"`` (it refuses an
  unaligned offset), so one broadcast moves the whole bucket. ``empty_flat_bucket`` is that receiving allocation.

Field names follow SGLang's ``FlattenedTensorMetadata`` (byte offsets ``start_idx:end_idx``; ``numel`` counts bytes).
Lives in ``rollout/`` because engines (and their servers) decode these; the trainer's transports import it from here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Bucket = list[tuple[str, torch.Tensor]]


def bucket_nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


@dataclass
class FlatTensorMeta:
    """Where one tensor lives in a flat byte buffer (SGLang's ``FlattenedTensorMetadata`` fields)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


@dataclass
class FlatBucket:
    """Tensors concatenated into one uint8 buffer (one IPC handle or one broadcast instead of one per tensor).
    ``dtype`` is the group's dtype for ``flatten_by_dtype``, None for a mixed ``flatten_for_broadcast`` buffer."""

    dtype: torch.dtype | None
    flat: torch.Tensor  # [total_bytes] uint8, on the tensors' device
    metadata: list[FlatTensorMeta]

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


def _flatten(items: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> FlatBucket:
    parts, metadata, offset = [], [], 0
    for name, tensor in items:
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
        metadata.append(FlatTensorMeta(name, tensor.shape, tensor.dtype, offset, offset + raw.numel(), raw.numel()))
        parts.append(raw)
        offset += raw.numel()
    return FlatBucket(dtype, torch.cat(parts), metadata)


def flatten_by_dtype(bucket: Sequence[tuple[str, torch.Tensor]]) -> list[FlatBucket]:
    """Group a bucket by dtype and concatenate each group's raw bytes, in bucket order within a group."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return [_flatten(items, dtype) for dtype, items in groups.items()]


def flatten_for_broadcast(bucket: Sequence[tuple[str, torch.Tensor]]) -> FlatBucket:
    """The whole bucket in one buffer, largest element size first (stable), so every tensor starts aligned; the
    metadata order is the order to announce (``names``/``dtypes``/``shapes``)."""
    ordered = sorted(bucket, key=lambda item: -item[1].element_size())
    return _flatten(ordered, None)


def empty_flat_bucket(names: Sequence[str], dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]],
                      device: torch.device | str = "cpu") -> FlatBucket:
    """The receive buffer of an announced bucket, laid out as ``FlattenedTensorBucket.empty`` lays it out
    (offsets in announcement order; refuses negative dimensions and unaligned offsets as SGLang does)."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names/dtypes/shapes lengths differ ({len(names)}/{len(dtypes)}/{len(shapes)})")
    if not names:
        raise ValueError("Cannot create empty tensor bucket")
    metadata, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        size = torch.Size(shape)
        if any(dim < 0 for dim in size):
            raise ValueError(f"Negative dimension in received tensor {name}: {size}")
        if offset % dtype.itemsize:
            raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
        nbytes = size.numel() * dtype.itemsize
        metadata.append(FlatTensorMeta(name, size, dtype, offset, offset + nbytes, nbytes))
        offset += nbytes
    return FlatBucket(None, torch.empty(offset, dtype=torch.uint8, device=device), metadata)


def unflatten(flat: FlatBucket) -> Bucket:
    """Inverse of the flatten functions: views into ``flat.flat``."""
    return [(m.name, flat.flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in flat.metadata]
