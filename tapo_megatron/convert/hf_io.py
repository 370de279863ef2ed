"""Streaming HF checkpoint I/O: lazy safetensors reading, sharded writing with an index, asset copying.

* ``HFCheckpointReader(hf_dir)`` is a read-only ``Mapping[str, Tensor]`` over an HF model directory
  (``model.safetensors`` or ``model-*.safetensors`` + ``model.safetensors.index.json``). Opening it reads only the
  safetensors headers (names, shapes, dtypes); ``reader[name]`` materialises one tensor. Truncated or corrupt files
  are reported with the file name when the reader opens. ``reader.get_rows(name, a, b)`` reads a block of rows.
* ``HFShardWriter(out_dir, max_shard_bytes)`` takes tensors one at a time and writes a shard as soon as the next
  tensor would overflow it, so at most one shard is held in memory; ``close()`` names the shards
  ``model-0000k-of-0000n.safetensors`` and writes ``model.safetensors.index.json``.
* ``copy_hf_assets(src, dst)`` copies tokenizer and generation-config files (not weights, not ``config.json``).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from tapo_megatron.errors import CheckpointError

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# Files copied beside the weights: everything a tokenizer or generate() needs, nothing model-shaped.
HF_ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class ConversionError(CheckpointError):
    """A checkpoint that cannot be converted: the message names the tensor, field or file at fault."""


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one stored tensor (no data read)."""

    file: str  # shard file name inside the checkpoint directory
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise ConversionError(
            f"safetensors file {path} is truncated or corrupt ({e}); re-download or re-export it") from e


class HFCheckpointReader(Mapping):
    """Lazy, read-only ``{hf_name: Tensor}`` view of an HF safetensors checkpoint directory.

    ``config`` is the parsed ``config.json``; ``info[name]`` gives file/shape/dtype without reading data;
    ``reader[name]`` reads one tensor (a fresh CPU tensor). One shard handle is kept open at a time, so reading in
    index order touches one shard after another.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{config_path} not found: not an HF model directory")
        self.config: dict = json.loads(config_path.read_text())
        index_path = self.dir / SAFE_INDEX
        if index_path.is_file():
            weight_map: dict[str, str] = json.loads(index_path.read_text()).get("weight_map", {})
            if not weight_map:
                raise ConversionError(f"{index_path} has no weight_map")
        elif (self.dir / SAFE_SINGLE).is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.dir} has neither {SAFE_INDEX} nor {SAFE_SINGLE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SAFE_SINGLE]
        self.info: dict[str, TensorInfo] = {}
        for fname in files:
            path = self.dir / fname
            if not path.is_file():
                raise ConversionError(f"shard {fname} named in {SAFE_INDEX} is missing from {self.dir}")
            with _open(path) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ConversionError(f"tensor {name} in {fname} has unsupported dtype {sl.get_dtype()}")
                    self.info[name] = TensorInfo(fname, tuple(sl.get_shape()), dtype)
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.info:
                    raise ConversionError(f"tensor {name} is listed in {SAFE_INDEX} under {fname} but is not in it")
                if self.info[name].file != fname:
                    raise ConversionError(
                        f"tensor {name} is listed under {fname} in {SAFE_INDEX} but stored in {self.info[name].file}")
            unindexed = sorted(set(self.info) - set(weight_map))
            if unindexed:
                raise ConversionError(f"tensor(s) stored but missing from {SAFE_INDEX}: {', '.join(unindexed[:5])}")
        self._handle = None
        self._handle_file: str | None = None

    def _handle_for(self, name: str):
        info = self.info.get(name)
        if info is None:
            raise KeyError(f"tensor {name} is not in the HF checkpoint {self.dir}")
        if self._handle_file != info.file:
            self.close()
            self._handle = _open(self.dir / info.file).__enter__()
            self._handle_file = info.file
        return self._handle

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle_for(name).get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (leading axis), reading only those bytes."""
        rows = self.info[name].shape[0] if name in self.info else None
        if rows is not None and not 0 <= start < stop <= rows:
            raise ValueError(f"rows {start}:{stop} are out of range for {name} with {rows} rows")
        return self._handle_for(name).get_slice(name)[start:stop]

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._handle_file = None, None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point weights (the first one found; HF checkpoints use one)."""
        for info in self.info.values():
            if info.dtype.is_floating_point:
                return info.dtype
        raise ConversionError(f"no floating-point tensor in {self.dir}")


class HFShardWriter:
    """Writes HF-named tensors into size-bounded safetensors shards as they arrive.

    ``add(name, tensor)`` buffers the tensor; when the buffer would exceed ``max_shard_bytes`` the buffer is written
    first (a tensor larger than the bound gets a shard of its own). ``close()`` writes the last shard, renames
    shards to ``model-0000k-of-0000n.safetensors`` and writes ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # names per written shard, in order
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise ConversionError(f"tensor {name} written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # contiguous + CPU: safetensors stores raw bytes; a fresh copy also detaches from any shared storage.
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        k = len(self._shards) + 1
        save_file(self._buffer, str(self.dir / f"model-{k:05d}.partial.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish writing; returns the shard file names."""
        self._flush()
        if not self._shards:
            raise ConversionError("no tensors were written")
        n = len(self._shards)
        weight_map, names = {}, []
        for k, tensor_names in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"model-{k:05d}.partial.safetensors", self.dir / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def copy_hf_assets(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy tokenizer / generation-config files from ``src_dir`` to ``dst_dir``; returns the names copied."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_ASSET_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
