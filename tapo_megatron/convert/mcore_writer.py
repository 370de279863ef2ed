"""Streaming writer of a Megatron-Core (torch_dist) checkpoint straight from HF safetensors, without a model.

``dist_checkpointing.save`` needs every parameter of a stage in memory. This module writes the same on-disk
format with ``torch.distributed.checkpoint`` (DCP) and a custom ``SavePlanner`` whose ``resolve_data`` builds each
chunk from the HF shards only when the storage writer asks for it, so at most one layer's tensors are alive.

The format (Megatron-Core 0.19, ``torch_dist`` backend), as ``dist_checkpointing.save`` of
``GPTModel.sharded_state_dict()`` writes it and ``dist_checkpointing.load`` / ``mcore_to_hf`` read it:

* ``.metadata`` + ``__<rank>_0.distcp``: a DCP checkpoint. Each ShardedTensor key is one global tensor
  (``ckpt_tensor_shapes``: layer parameters stacked as ``[num_layers, ...]`` under ``decoder.layers.<name>``, in the
  full TP=1 layout). Chunks may be cut anywhere: a DCP reader intersects the chunks it wants with the stored ones,
  so a checkpoint loads at any TP/PP whatever chunking wrote it. Here a chunk is one layer's row of a stacked
  tensor, or a block of rows of the embedding / output layer (bounded like a layer, see ``_row_blocks``).
* ShardedObjects as bytes entries ``<key>/shard_<offset>_<shape>`` holding ``torch.save([obj])``: each layer's
  ``_extra_state`` (``None`` for the local layer spec) and ``common_state/shard_0_1`` (the non-tensor part of the
  state dict). Their keys and values are taken from the model's own ``sharded_state_dict()`` - a copy of the
  model at a tiny width (same layers, heads and tying) is built once for that (``probe_megatron_layout``).
* ``metadata.json``: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1}`` (Megatron's
  ``save_config``).
"""
from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, SavePlan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from tapo_megatron.convert.hf_io import ConversionError, HFCheckpointReader
from tapo_megatron.convert.qwen3 import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_SLOTS,
    OUTPUT,
    Slot,
    ckpt_tensor_shapes,
    full_from_hf,
    hf_layer_prefix,
)
from tapo_megatron.models.qwen3 import Qwen3Shape, build_qwen3
from tapo_megatron.parallel import ParallelContext


@dataclass(frozen=True)
class MegatronLayout:
    """What ``GPTModel.sharded_state_dict()`` of a Qwen3 model saves, besides the tensor data.

    ``tensor_keys``: the ShardedTensor keys (every PP stage's); ``objects``: ShardedObject unique key -> value
    (``_extra_state`` of each layer's modules); ``common``: the common (non-sharded) state dict.
    """

    tensor_keys: frozenset[str]
    objects: dict[str, object]
    common: dict


def _probe_shape(shape: Qwen3Shape, tp: int) -> Qwen3Shape:
    """The same layer count, heads, KV groups and tying at a tiny width (still divisible by ``tp``)."""
    return dataclasses.replace(shape, vocab_size=4 * tp, hidden_size=8, intermediate_size=2 * tp, head_dim=2,
                               max_position_embeddings=16)


def probe_megatron_layout(shape: Qwen3Shape, ctx: ParallelContext) -> MegatronLayout:
    """Build this rank's stage of ``shape`` at a tiny width and read what its ``sharded_state_dict()`` saves.

    Keys do not depend on width, and the objects (``_extra_state``) do not either, so this gives the exact keys
    ``dist_checkpointing.save`` would write for the real model at a cost of kilobytes. With several ranks the
    stages' answers are gathered, so every rank gets the whole model's keys.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    model = build_qwen3(_probe_shape(shape, ctx.tp_size), ctx, torch.float32)
    sharded, common = save_preprocess(model.sharded_state_dict(), validate_access_integrity=False)
    tensor_keys, objects = set(), {}
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            tensor_keys.add(value.key)
        elif isinstance(value, ShardedObject):
            objects[value.unique_key] = value.data
        else:
            raise ConversionError(f"Megatron sharded_state_dict holds a {type(value).__name__} "
                                  f"({getattr(value, 'key', '?')}) the streaming writer does not know")
    del model
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (sorted(tensor_keys), objects))
        for keys, objs in parts:
            tensor_keys.update(keys)
            objects.update(objs)
    return MegatronLayout(frozenset(tensor_keys), objects, common)


@dataclass
class _Unit:
    """A group of write items produced together (one layer, one block of embedding rows, ...).

    ``items``: DCP write items; ``resolve(item)``: the tensor (chunk-shaped) or BytesIO for one of them.
    """

    desc: str
    items: list[WriteItem]
    resolve: Callable[[WriteItem], torch.Tensor | io.BytesIO]


class _LazySavePlanner(DefaultSavePlanner):
    """A DCP save planner over write items known in advance, whose data is built on demand.

    ``units``: this rank's units. ``create_local_plan`` lists their items; the storage writer calls
    ``resolve_data`` once per item, in plan order, and writes the result before asking for the next, so only the
    item being written (and the writer's last chunk per key) is alive. ``progress(desc)`` is called after each
    unit's last item.
    """

    def __init__(self, units: list[_Unit], progress: Callable[[str], None] | None = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.units = units
        self.progress = progress
        self._owner: dict[MetadataIndex, tuple[_Unit, bool]] = {}
        for unit in units:
            for k, item in enumerate(unit.items):
                self._owner[item.index] = (unit, k == len(unit.items) - 1)

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = state_dict  # empty: the data lives in the HF shards until resolve_data
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan([item for unit in self.units for item in unit.items])
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        unit, last = self._owner[write_item.index]
        data = unit.resolve(write_item)
        if write_item.type != WriteItemType.BYTE_IO:
            want = tuple(write_item.tensor_data.chunk.sizes)
            if tuple(data.shape) != want:
                raise ConversionError(f"{write_item.index.fqn} chunk at {tuple(write_item.index.offset)}: built a "
                                      f"tensor of shape {tuple(data.shape)}, the checkpoint chunk is {want}")
        if last and self.progress is not None:
            self.progress(unit.desc)
        return data


def _tensor_item(key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], global_size: tuple[int, ...],
                 dtype: torch.dtype) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                                    properties=TensorProperties(dtype=dtype), size=torch.Size(global_size)))


def _bytes_item(key: str) -> WriteItem:
    return WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)


def _row_blocks(rows: int, row_bytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """Split ``rows`` into near-equal ``(start, stop)`` blocks of at most ``block_bytes`` (at least one row)."""
    n = max(1, math.ceil(rows * row_bytes / max(block_bytes, 1)))
    n = min(n, rows)
    step = math.ceil(rows / n)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _serialized(obj) -> io.BytesIO:
    """A ShardedObject's bytes as Megatron stores them: ``torch.save([obj])``."""
    buf = io.BytesIO()
    torch.save([obj], buf)
    buf.seek(0)
    return buf


def plan_units(reader: HFCheckpointReader, shape: Qwen3Shape, layout: MegatronLayout, dtype: torch.dtype
               ) -> list[_Unit]:
    """Every write unit of the checkpoint, in HF order: objects, embedding blocks, layers, final norm, output.

    Raises ``ConversionError`` when the model's ``sharded_state_dict()`` keys and the Qwen3 mapping disagree.
    """
    expected = ckpt_tensor_shapes(shape)
    unknown = sorted(layout.tensor_keys - set(expected))
    missing = sorted(set(expected) - layout.tensor_keys)
    if unknown or missing:
        raise ConversionError(f"Megatron's sharded_state_dict and the Qwen3 mapping disagree: tensors the mapping "
                              f"does not know: {unknown or 'none'}; tensors the model does not save: "
                              f"{missing or 'none'}")
    elem = torch.empty((), dtype=dtype).element_size()
    L = shape.num_hidden_layers
    # A layer's largest tensor bounds the row blocks of the (vocab x hidden) tensors, so they stay layer-sized.
    layer_bytes = max(math.prod(expected[s.ckpt_key][1:]) for s in LAYER_SLOTS) * elem

    def read(slot: Slot, hf_prefix: str) -> torch.Tensor:
        return full_from_hf(slot, [reader[hf_prefix + n] for n in slot.hf], shape).to(dtype)

    units = []
    # Megatron stores the common (non-sharded) state as the ShardedObject "common_state" of shape (1,).
    objects = {**layout.objects, "common_state/shard_0_1": layout.common}
    units.append(_Unit("objects", [_bytes_item(k) for k in objects],
                       lambda item: _serialized(objects[item.index.fqn])))

    def vocab_units(slot: Slot, hf_name: str) -> None:
        rows, hidden = expected[slot.ckpt_key]
        for start, stop in _row_blocks(rows, hidden * elem, layer_bytes):
            units.append(_Unit(f"{slot.ckpt_key}[{start}:{stop}]",
                               [_tensor_item(slot.ckpt_key, (start, 0), (stop - start, hidden), (rows, hidden), dtype)],
                               lambda item, a=start, b=stop: reader.get_rows(hf_name, a, b).to(dtype)))

    vocab_units(EMBEDDING, EMBEDDING.hf[0])
    for layer in range(L):
        items, slots = [], {}
        for slot in LAYER_SLOTS:
            full = expected[slot.ckpt_key]
            item = _tensor_item(slot.ckpt_key, (layer,) + (0,) * (len(full) - 1), (1, *full[1:]), full, dtype)
            items.append(item)
            slots[item.index.fqn] = slot
        units.append(_Unit(f"layer {layer}", items,
                           lambda item, p=hf_layer_prefix(layer), s=slots: read(s[item.index.fqn], p).unsqueeze(0)))
    units.append(_Unit(FINAL_NORM.ckpt_key, [_tensor_item(FINAL_NORM.ckpt_key, (0,), expected[FINAL_NORM.ckpt_key],
                                                          expected[FINAL_NORM.ckpt_key], dtype)],
                       lambda item: read(FINAL_NORM, "")))
    if not shape.tie_word_embeddings:
        vocab_units(OUTPUT, OUTPUT.hf[0])
    return units


def write_mcore_checkpoint(reader: HFCheckpointReader, shape: Qwen3Shape, layout: MegatronLayout,
                           model_dir: str | Path, dtype: torch.dtype, progress: Callable[[str], None] | None = None
                           ) -> int:
    """Write the Megatron torch_dist checkpoint of the HF tensors in ``reader`` into ``model_dir``.

    Single process (no process group, or a group of one): this process writes everything. Under a process group
    of N ranks every rank must call this; units are dealt round-robin (rank r writes units r, r + N, ...) and rank
    0 writes the metadata. ``dtype``: the stored dtype. Returns the number of units this rank wrote.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    units = plan_units(reader, shape, layout, dtype)
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        rank, world = dist.get_rank(), dist.get_world_size()
        units = units[rank::world]
    planner = _LazySavePlanner(units, progress)
    # One file per rank, items in plan order, one writer thread: resolve_data runs one item at a time.
    writer = dcp.FileSystemWriter(str(model_dir), single_file_per_rank=True, thread_count=1, sync_files=False)
    dcp.save({}, storage_writer=writer, planner=planner, no_dist=not distributed)
    if not distributed or dist.get_rank() == 0:
        strategy = TorchDistSaveShardedStrategy()
        save_config(CheckpointingConfig(strategy.backend, strategy.version), str(model_dir))
    return len(units)
