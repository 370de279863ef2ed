"""The conversion API: HF Qwen3 directory <-> Megatron-Core distributed checkpoint.

Megatron-side format (the actor's checkpoint format, so either loads into the other)::

    <ckpt>/model/            megatron.core.dist_checkpointing (torch_dist) of GPTModel.sharded_state_dict()
    <ckpt>/hf_config.json    the HF config.json of the model (Qwen3Shape.from_file reads it)
    <ckpt>/hf_assets/        tokenizer + generation config copied from the HF directory (converted checkpoints)

A distributed checkpoint stores global tensors, so it loads at any TP/PP (``load_mcore_checkpoint``), whatever
layout wrote it.

* ``hf_to_mcore(hf_dir, out, tp, pp)``: streams without building the model (``mcore_writer``): the checkpoint is
  written with torch DCP chunk by chunk (a layer's row of each stacked tensor, or a layer-sized block of
  embedding rows), each chunk built from the HF shards when the writer asks for it, so memory is one layer plus
  the open HF shard's mapped pages. ``tp``/``pp`` are the layout the checkpoint is meant for and are checked
  against the model (heads, KV groups, layers, vocab); the checkpoint itself does not depend on them. Runs as one
  process, or under ``torchrun`` (world size a multiple of tp * pp), where the ranks share the layers.
* ``mcore_to_hf(ckpt, out)``: streams without building a model. For each layer it loads just that layer's slices
  of the stacked checkpoint tensors, maps them to HF names and hands them to a shard writer that flushes a
  safetensors shard whenever it fills, so memory is one shard plus one layer. Under torchrun, rank 0 does the work.

Both write to ``<out>.tmp`` and rename it to ``<out>`` at the end, so an interrupted run leaves no ``<out>``.
Usage from Python::

    from tapo_megatron.convert import hf_to_mcore, mcore_to_hf
    hf_to_mcore("Qwen3-0.6B", "ckpt/qwen3-0.6b", tp=1, pp=1)
    mcore_to_hf("ckpt/qwen3-0.6b", "export/qwen3-0.6b")
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from tapo_megatron.convert.hf_io import (
    ConversionError,
    HFCheckpointReader,
    HFShardWriter,
    copy_hf_assets,
)
from tapo_megatron.convert.qwen3 import (
    EMBEDDING,
    FINAL_NORM,
    LAYER_SLOTS,
    OUTPUT,
    check_hf_tensors,
    ckpt_tensor_shapes,
    full_to_hf,
    hf_layer_prefix,
)
from tapo_megatron.convert.checkpoints import MANIFEST_FILE, checkpoint_problem, error_summary
from tapo_megatron.errors import OutputExistsError
from tapo_megatron.models.qwen3 import Qwen3Shape, check_parallel
from tapo_megatron.parallel import check_layout

MODEL_SUBDIR = "model"
HF_CONFIG_FILE = "hf_config.json"
ASSETS_SUBDIR = "hf_assets"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _progress(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=_rank() != 0, leave=False)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")


def _start_atomic(out: Path, overwrite: bool) -> Path:
    """Rank 0 prepares ``<out>.tmp`` (removing a stale one); returns it. Refuses an existing ``out``."""
    tmp = out.with_name(out.name + ".tmp")
    _refuse_existing(out, overwrite)
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def _finish_atomic(tmp: Path, out: Path) -> None:
    _barrier()
    if _rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    _barrier()


def hf_to_mcore(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: torch.dtype | None = None,
                overwrite: bool = False, seed: int = 1234) -> Path:
    """Convert an HF Qwen3 directory into a Megatron distributed checkpoint at ``out``; returns ``out``.

    Streams: no model is built (only a tiny-width copy to read the keys ``sharded_state_dict()`` saves); each
    checkpoint chunk is made from the HF tensors when it is written, so peak memory is about one layer plus the
    open HF shard, whatever the model size. ``tp``/``pp``: the layout the checkpoint is meant for, checked against
    the model; the checkpoint loads at any layout. In one process any ``tp``/``pp`` that divides the model is
    accepted; under ``torchrun`` the world size must be a multiple of tp * pp and the ranks write disjoint layers.
    ``dtype``: stored dtype (default: the HF tensors' dtype, so the round trip is bit-exact). ``seed``: seeds the
    process-group set-up (no weights are random). Raises ``ConversionError`` for config/tensor mismatches,
    missing/extra keys and truncated files, ``ParallelConfigError`` when tp does not divide heads/KV groups.
    """
    from tapo_megatron.convert.mcore_writer import probe_megatron_layout, write_mcore_checkpoint
    from tapo_megatron.parallel import init_parallel

    hf_dir, out = Path(hf_dir), Path(out)
    _refuse_existing(out, overwrite)  # before minutes of work, not after
    t0 = time.perf_counter()
    reader = HFCheckpointReader(hf_dir)
    shape = Qwen3Shape.from_hf(reader.config)
    check_hf_tensors(shape, {k: v.shape for k, v in reader.info.items()}, source=f"HF checkpoint {hf_dir}")
    check_parallel(shape, tp, pp)  # names the field tp/pp does not divide (heads, KV groups, layers, vocab)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        check_layout(world, tp, pp)  # before any process group exists
        ctx = init_parallel(tp, pp, seed=seed)
    else:
        ctx = init_parallel(1, 1, seed=seed)  # one process: the layout only shapes the key probe, which is TP-free
    dtype = dtype or reader.dtype
    layout = probe_megatron_layout(shape, ctx)

    tmp = _start_atomic(out, overwrite)
    if _rank() == 0:
        (tmp / MODEL_SUBDIR).mkdir()
    _barrier()
    bar = _progress(None, "hf->mcore")

    def progress(desc: str) -> None:  # one call per written layer / embedding block
        bar.set_postfix_str(desc, refresh=False)
        bar.update(1)

    units = write_mcore_checkpoint(reader, shape, layout, tmp / MODEL_SUBDIR, dtype, progress=progress)
    bar.close()
    reader.close()
    if _rank() == 0:
        # The original config (bos/eos ids etc. kept), with the fields HF may leave implicit written out.
        config = dict(reader.config)
        config.setdefault("head_dim", shape.head_dim)
        config["tie_word_embeddings"] = shape.tie_word_embeddings
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        copy_hf_assets(hf_dir, tmp / ASSETS_SUBDIR)
    _finish_atomic(tmp, out)
    if _rank() == 0:
        print(f"hf_to_mcore: {hf_dir} -> {out} (for tp={tp}, pp={pp}, {dtype}; {units} chunk groups on rank 0) "
              f"in {time.perf_counter() - t0:.1f} s")
    return out


def load_mcore_checkpoint(model, ckpt: str | Path) -> None:
    """Load a checkpoint written by ``hf_to_mcore`` or the actor into a model stage built at any TP/PP."""
    from megatron.core import dist_checkpointing

    from tapo_megatron.convert.qwen3 import unwrap_model

    model_dir = Path(ckpt) / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} not found: not a Megatron checkpoint written by hf_to_mcore or the actor")
    m = unwrap_model(model)
    state = dist_checkpointing.load(m.sharded_state_dict(), str(model_dir))
    m.load_state_dict(state)


def read_ckpt_shape(ckpt: str | Path) -> Qwen3Shape:
    """The Qwen3 shape recorded in a Megatron checkpoint directory (``<ckpt>/hf_config.json``)."""
    path = Path(ckpt) / HF_CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{path} not found: the checkpoint does not record its HF config")
    return Qwen3Shape.from_file(path)


def _check_ckpt_metadata(shape: Qwen3Shape, metadata: dict, model_dir: Path) -> torch.dtype:
    """Refuse a checkpoint whose stored tensors do not match ``hf_config.json``; returns the weight dtype.

    ``metadata``: DCP ``state_dict_metadata`` (key -> TensorStorageMetadata with global ``size``).
    """
    expected = ckpt_tensor_shapes(shape)
    tensors = {k: m for k, m in metadata.items() if hasattr(m, "chunks")}  # skip _extra_state / common bytes
    for key, want in expected.items():
        if key not in tensors:
            raise ConversionError(f"Megatron checkpoint {model_dir} has no tensor {key} (hf_config.json: "
                                  f"tie_word_embeddings={shape.tie_word_embeddings})")
        got = tuple(tensors[key].size)
        if got != want:
            raise ConversionError(f"Megatron checkpoint tensor {key} has global shape {got}, hf_config.json implies "
                                  f"{want}")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise ConversionError(f"Megatron checkpoint {model_dir} has tensor(s) the Qwen3 mapping does not know: "
                              f"{', '.join(extra[:8])}")
    return tensors[EMBEDDING.ckpt_key].properties.dtype


class _RowSliceLoadPlanner(DefaultLoadPlanner):
    """A torch DCP load planner that reads, per key, either the whole stored tensor or one row of its leading
    (stacked-layers) axis, so a layer can be read without touching the other layers' bytes.

    Megatron's own ``dist_checkpointing.load`` cannot express "one layer of the stack" on a single rank, and it
    would need a model; plain DCP with this planner needs neither (nor an initialised process group).
    ``rows``: key -> layer row, or None for the whole tensor; state-dict buffers have shape ``[1, *rest]`` for a
    row, the global shape otherwise.
    """

    def __init__(self, rows: dict[str, int | None]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.rows = rows

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, buf in self.state_dict.items():
            row = self.rows[key]
            offsets = [0] * buf.ndim if row is None else [row] + [0] * (buf.ndim - 1)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.state_dict[index.fqn]  # the buffer is the local chunk, whatever its global offset


def _read_slices(model_dir: Path, metadata: dict, rows: dict[str, int | None]) -> dict[str, torch.Tensor]:
    """Read ``{key: layer row or None}`` from a Megatron (torch_dist) checkpoint; a row drops the layer axis."""
    bufs = {}
    for key, row in rows.items():
        md = metadata[key]
        size = tuple(md.size) if row is None else (1, *md.size[1:])
        bufs[key] = torch.empty(size, dtype=md.properties.dtype)
    dcp.load(bufs, storage_reader=dcp.FileSystemReader(str(model_dir)), planner=_RowSliceLoadPlanner(rows),
             no_dist=True)
    return {k: (b if rows[k] is None else b[0]) for k, b in bufs.items()}


def mcore_to_hf(ckpt: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30,
                tokenizer_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert a Megatron checkpoint (``hf_to_mcore`` output or an actor checkpoint) into an HF directory.

    Writes ``config.json``, ``model-*.safetensors`` + ``model.safetensors.index.json`` (shards of at most
    ``max_shard_bytes``) and the tokenizer / generation config from ``<ckpt>/hf_assets`` or, if given,
    ``tokenizer_dir``. Streams: one layer in memory plus the shard being filled. Returns ``out``.
    """
    ckpt, out = Path(ckpt), Path(out)
    _refuse_existing(out, overwrite)
    t0 = time.perf_counter()
    shape = read_ckpt_shape(ckpt)
    model_dir = ckpt / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} not found: not a Megatron checkpoint written by hf_to_mcore or the actor")
    if (ckpt / MANIFEST_FILE).is_file() and (problem := checkpoint_problem(ckpt)):  # an actor checkpoint
        raise ConversionError(f"checkpoint {ckpt} is not usable: {problem}")
    tmp = _start_atomic(out, overwrite)
    if _rank() == 0:  # no collectives below: under torchrun the other ranks only wait
        bar = None
        try:
            metadata = dcp.FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata
            dtype = _check_ckpt_metadata(shape, metadata, model_dir)
            writer = HFShardWriter(tmp, max_shard_bytes)
            L = shape.num_hidden_layers
            globals_last = [FINAL_NORM] + ([] if shape.tie_word_embeddings else [OUTPUT])
            bar = _progress(L + 1 + len(globals_last), "mcore->hf")

            def emit(slot, full: torch.Tensor, hf_prefix: str) -> None:
                for name, tensor in zip(slot.hf, full_to_hf(slot, full, shape)):
                    writer.add(hf_prefix + name, tensor)

            # One read per global tensor and per layer: the peak is one layer (or the embedding), not the model.
            for slot in [EMBEDDING]:
                emit(slot, _read_slices(model_dir, metadata, {slot.ckpt_key: None})[slot.ckpt_key], "")
                bar.update(1)
            for layer in range(L):
                loaded = _read_slices(model_dir, metadata, {s.ckpt_key: layer for s in LAYER_SLOTS})
                for slot in LAYER_SLOTS:
                    emit(slot, loaded[slot.ckpt_key], hf_layer_prefix(layer))
                del loaded
                bar.update(1)
            for slot in globals_last:
                emit(slot, _read_slices(model_dir, metadata, {slot.ckpt_key: None})[slot.ckpt_key], "")
                bar.update(1)
            bar.close()
            writer.close()
            hf_config = json.loads((ckpt / HF_CONFIG_FILE).read_text())
            config = {**hf_config, **shape.to_hf()}
            config["torch_dtype"] = config["dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            assets = Path(tokenizer_dir) if tokenizer_dir is not None else ckpt / ASSETS_SUBDIR
            if assets.is_dir():
                copy_hf_assets(assets, tmp)
            write_generation_config(tmp, config)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            if bar is not None:
                bar.close()
            shutil.rmtree(tmp, ignore_errors=True)  # no stale half-written export left behind
            if isinstance(e, ConversionError):
                raise
            raise ConversionError(f"reading Megatron checkpoint {model_dir} failed ({error_summary(e)}); "
                                  f"nothing was written to {out}") from e
    _finish_atomic(tmp, out)
    if _rank() == 0:
        print(f"mcore_to_hf: {ckpt} -> {out} in {time.perf_counter() - t0:.1f} s")
    return out


GENERATION_CONFIG = "generation_config.json"
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def write_generation_config(out_dir: Path, config: dict) -> None:
    """``generation_config.json`` for serving (transformers, SGLang and vLLM read the stop ids from it), unless the
    source's was copied. Token ids from the model config, else from the tokenizer files copied beside it."""
    if (out_dir / GENERATION_CONFIG).is_file():
        return
    from transformers import GenerationConfig

    ids = {k: config[k] for k in _TOKEN_ID_KEYS if config.get(k) is not None}
    if "eos_token_id" not in ids and (out_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out_dir))
        ids.update({k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                                      ("pad_token_id", tok.pad_token_id)) if v is not None and k not in ids})
    GenerationConfig(**ids).save_pretrained(str(out_dir))


def find_mcore_checkpoint(path: str | Path) -> Path:
    """The Megatron checkpoint that ``tapo export`` and ``tapo convert mcore-to-hf`` both accept: ``hf_to_mcore``
    output, an actor ``iter_*`` directory, or a save directory (its latest checkpoint)."""
    from tapo_megatron.convert.checkpoints import resolve_checkpoint

    path = Path(path)
    if (path / MODEL_SUBDIR).is_dir() and (path / HF_CONFIG_FILE).is_file():
        return path
    return resolve_checkpoint(path)


def export_hf(ckpt: str | Path, out: str | Path, tokenizer: str = "") -> Path:
    """The final checkpoint ``ckpt`` as an HF directory ready for serving at ``out`` (replaced if it exists), with
    the tokenizer files of ``tokenizer`` ("qwen3", a folder, or "" for none). Collective: rank 0 writes."""
    tokenizer_dir = None
    if tokenizer == "qwen3":
        from tapo_megatron.data.assets import qwen3_tokenizer_dir

        tokenizer_dir = qwen3_tokenizer_dir()
    elif tokenizer and Path(tokenizer).is_dir():
        tokenizer_dir = tokenizer
    return mcore_to_hf(ckpt, out, tokenizer_dir=tokenizer_dir, overwrite=True)
