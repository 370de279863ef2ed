"""Worker for tests/test_convert.py: conversion scenarios that need torch.distributed (run as a plain process for
one rank, or under ``torchrun --nproc_per_node 2``). Exits non-zero on the first failed check.

    python tests/_convert_worker.py --work DIR --layouts 1x1
    python tests/_convert_worker.py --work DIR --streaming
    torchrun --nproc_per_node 2 tests/_convert_worker.py --work DIR --layouts 1x1,2x1,1x2

``DIR`` must hold ``hf/`` (a tiny random Qwen3 written by ``make_hf_model``, with tokenizer files) and
``input_ids.pt``. With 2 ranks, layout 1x1 runs as 2 data-parallel replicas. ``--streaming`` (one process)
compares the streamed ``hf_to_mcore`` checkpoint with Megatron's own ``dist_checkpointing.save`` of the same
weights and checks that the writer reads the HF tensors chunk by chunk (``check_streaming``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tapo_megatron.convert import (  # noqa: E402
    export_hf_weights,
    hf_to_mcore,
    load_mcore_checkpoint,
    mcore_to_hf,
    read_ckpt_shape,
)
from tapo_megatron.models.qwen3 import build_qwen3  # noqa: E402
from tapo_megatron.parallel import init_parallel  # noqa: E402

LOGIT_TOL = 1e-5


def tiny_qwen3_config(tied: bool, **overrides) -> dict:
    """A tiny Qwen3 config: GQA with 2 KV groups of 2 query heads, head_dim != hidden/heads."""
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, tie_word_embeddings=tied, max_position_embeddings=128,
               rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return cfg


def make_hf_model(out: Path, tied: bool, seed: int = 0, max_shard_size: str = "40KB", **overrides):
    """Write a random ``Qwen3ForCausalLM`` to ``out`` (sharded safetensors, several shards) and return it.

    Every weight is randomised, norms included (1 + noise), so a swapped norm or head would change the logits.
    """
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**tiny_qwen3_config(tied, **overrides))).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=False)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return model


def hf_logits(hf_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def megatron_logits(model, ctx, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits ``[b, s, V]`` on the last PP stage (None elsewhere): a plain forward per stage, hidden
    states passed on with send/recv, vocab-parallel logits all-gathered over TP."""
    from megatron.core import parallel_state as ps

    b, s = input_ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        if not ctx.is_first_stage:
            hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(input_ids, position_ids, None)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    if ctx.tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, out.contiguous(), group=ctx.tp_group)
        out = torch.cat(parts, dim=-1)
    return out


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(f"[rank {dist.get_rank() if dist.is_initialized() else 0}] {msg}")


def check_bit_exact(ref_dir: Path, got_dir: Path) -> None:
    ref, got = hf_tensors(ref_dir), hf_tensors(got_dir)
    check(sorted(ref) == sorted(got), f"key sets differ: {sorted(set(ref) ^ set(got))}")
    for k in ref:
        check(ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), f"tensor {k} differs after round trip")
    index = json.loads((got_dir / "model.safetensors.index.json").read_text())
    check(set(index["weight_map"]) == set(got), "index weight_map does not list exactly the stored tensors")
    check(len(set(index["weight_map"].values())) > 1, "expected several shards with the small shard bound")


def check_logits(model, ctx, input_ids, ref: torch.Tensor, what: str) -> None:
    got = megatron_logits(model, ctx, input_ids)
    if got is not None:
        err = (got - ref).abs().max().item()
        check(err <= LOGIT_TOL, f"{what}: max |logit diff| = {err:.3g} > {LOGIT_TOL}")
        print(f"[rank {ctx.rank}] {what}: max |logit diff| = {err:.2e}", flush=True)


def check_export(model, ctx, hf_dir: Path, bucket_bytes: int) -> None:
    """Exported HF tensors equal the HF originals bit for bit; buckets respect the bound; stages partition keys."""
    ref = hf_tensors(hf_dir)
    names = []
    for bucket in export_hf_weights(model, ctx, bucket_bytes=bucket_bytes):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        check(size <= bucket_bytes or len(bucket) == 1, f"bucket of {size} bytes exceeds {bucket_bytes}")
        for name, t in bucket:
            check(name in ref, f"export yielded unknown tensor {name}")
            check(torch.equal(t, ref[name]), f"exported {name} differs from the HF original")
            names.append(name)
    check(len(names) == len(set(names)), "export yielded a tensor twice")
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank, names))
    union = [n for tp_rank, _, dp_rank, ns in per_rank if tp_rank == 0 and dp_rank == 0 for n in ns]
    check(sorted(union) == sorted(ref), f"stages' exports do not partition the HF keys: {set(union) ^ set(ref)}")
    for tp_rank, pp_rank, dp_rank, ns in per_rank:
        check(ns == names or pp_rank != ctx.pp_rank, f"ranks of PP stage {pp_rank} exported different tensors/order")


def build_and_load(ckpt: Path, tp: int, pp: int):
    ctx = init_parallel(tp, pp)
    model = build_qwen3(read_ckpt_shape(ckpt), ctx, torch.float32).eval()
    load_mcore_checkpoint(model, ckpt)
    return model, ctx


def check_generate(hf: Path, out: Path, ids: torch.Tensor, ref: torch.Tensor) -> None:
    """The exported directory loads with AutoModelForCausalLM, reproduces the logits and generates like the
    original."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        err = (exported(ids).logits - ref).abs().max().item()
        check(err == 0.0, f"exported model's logits differ from the original by {err}")
        gen = exported.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        ref_gen = original.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    check(gen.shape == (1, 11) and torch.equal(gen, ref_gen), f"generation differs: {gen} vs {ref_gen}")
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        check((out / name).is_file(), f"{name} was not copied into the exported directory")


def run(work: Path, layouts: list[tuple[int, int]]) -> None:
    """For each (tp, pp): HF -> mcore at that layout, logits vs transformers, export iterator vs HF tensors,
    mcore -> HF bit-exact; then every checkpoint is loaded at every other layout (resharding) and the logits
    are checked again. Rank 0 also checks that an exported directory loads in transformers and generates."""
    hf, ids = work / "hf", torch.load(work / "input_ids.pt")
    ref = hf_logits(hf, ids)
    for tp, pp in layouts:
        ckpt, out = work / f"ckpt_tp{tp}_pp{pp}", work / f"out_tp{tp}_pp{pp}"
        hf_to_mcore(hf, ckpt, tp=tp, pp=pp)
        check(json.loads((ckpt / "hf_config.json").read_text())["tie_word_embeddings"]
              == json.loads((hf / "config.json").read_text())["tie_word_embeddings"], "hf_config.json lost tying")
        model, ctx = build_and_load(ckpt, tp, pp)
        check_logits(model, ctx, ids, ref, f"tp={tp} pp={pp}")
        check_export(model, ctx, hf, bucket_bytes=30_000)
        mcore_to_hf(ckpt, out, max_shard_bytes=40_000)
        if ctx.rank == 0:
            check_bit_exact(hf, out)
            check(not out.with_name(out.name + ".tmp").exists() and not ckpt.with_name(ckpt.name + ".tmp").exists(),
                  "temporary directory left behind")
        if dist.get_world_size() > 1:
            dist.barrier()
    if dist.get_rank() == 0:
        check_generate(hf, work / f"out_tp{layouts[0][0]}_pp{layouts[0][1]}", ids, ref)
    for tp, pp in layouts:
        for wtp, wpp in layouts:
            if (wtp, wpp) != (tp, pp):
                model, ctx = build_and_load(work / f"ckpt_tp{wtp}_pp{wpp}", tp, pp)
                check_logits(model, ctx, ids, ref, f"ckpt tp={wtp} pp={wpp} loaded at tp={tp} pp={pp}")
    print(f"[rank {dist.get_rank()}] all checks passed", flush=True)


def check_streaming(work: Path) -> None:
    """The streamed checkpoint equals Megatron's own save, and it is written chunk by chunk.

    Reference: a model built at TP=1/PP=1, filled with ``load_hf_weights`` and saved with
    ``dist_checkpointing.save``. Checked: same tensor keys, global shapes and dtypes, same values; same object
    keys (``_extra_state``, ``common_state``) and values. Streaming: every read of the HF reader and every chunk
    written by DCP is logged; between two consecutive chunk writes the reads must belong to the next chunk alone,
    and never total more bytes than the largest single tensor of a layer (so neither a whole layer stack nor the
    whole embedding is ever read at once).
    """
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import filesystem
    from megatron.core import dist_checkpointing

    from tapo_megatron.convert import HFCheckpointReader, load_hf_weights
    from tapo_megatron.convert.api import _read_slices
    from tapo_megatron.convert.qwen3 import LAYER_SLOTS, ckpt_tensor_shapes
    from tapo_megatron.models.qwen3 import Qwen3Shape

    hf = work / "hf"
    shape = Qwen3Shape.from_file(hf / "config.json")
    ctx = init_parallel(1, 1)
    model = build_qwen3(shape, ctx, torch.float32)
    load_hf_weights(model, ctx, HFCheckpointReader(hf))
    ref_dir = work / "megatron_save"
    ref_dir.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ref_dir))
    del model

    events: list[tuple[str, str, int]] = []  # ("read", hf name, bytes) | ("write", fqn, bytes)
    get_item, get_rows, write_item = HFCheckpointReader.__getitem__, HFCheckpointReader.get_rows, filesystem._write_item

    def spy_get(self, name):
        t = get_item(self, name)
        events.append(("read", name, t.numel() * t.element_size()))
        return t

    def spy_rows(self, name, a, b):
        t = get_rows(self, name, a, b)
        events.append(("read", f"{name}[{a}:{b}]", t.numel() * t.element_size()))
        return t

    def spy_write(transforms, stream, data, item, *args):
        if isinstance(data, torch.Tensor):
            events.append(("write", item.index.fqn, data.numel() * data.element_size()))
        return write_item(transforms, stream, data, item, *args)

    HFCheckpointReader.__getitem__, HFCheckpointReader.get_rows, filesystem._write_item = spy_get, spy_rows, spy_write
    try:
        hf_to_mcore(hf, work / "streamed")
    finally:
        HFCheckpointReader.__getitem__, HFCheckpointReader.get_rows = get_item, get_rows
        filesystem._write_item = write_item

    got_dir = work / "streamed" / "model"
    ref_md = dcp.FileSystemReader(str(ref_dir)).read_metadata().state_dict_metadata
    got_md = dcp.FileSystemReader(str(got_dir)).read_metadata().state_dict_metadata
    check(sorted(ref_md) == sorted(got_md), f"keys differ from Megatron's save: {sorted(set(ref_md) ^ set(got_md))}")
    tensor_keys = [k for k, m in ref_md.items() if hasattr(m, "chunks")]
    check(sorted(tensor_keys) == sorted(ckpt_tensor_shapes(shape)), "Megatron saved tensors the mapping lacks")
    for key in tensor_keys:
        check(tuple(ref_md[key].size) == tuple(got_md[key].size)
              and ref_md[key].properties.dtype == got_md[key].properties.dtype, f"{key}: global shape/dtype differ")
    ref_t = _read_slices(ref_dir, ref_md, {k: None for k in tensor_keys})
    got_t = _read_slices(got_dir, got_md, {k: None for k in tensor_keys})
    for key in tensor_keys:
        check(torch.equal(ref_t[key], got_t[key]), f"{key}: values differ from Megatron's save")
    object_keys = [k for k in ref_md if k not in tensor_keys]
    check(any("_extra_state" in k for k in object_keys) and "common_state/shard_0_1" in object_keys,
          f"expected _extra_state and common_state objects, got {object_keys}")
    objs = []
    for d in (ref_dir, got_dir):
        sd = {k: io.BytesIO() for k in object_keys}
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(d)), no_dist=True)
        objs.append(sd)
    check(objs[0] == objs[1], "ShardedObject values differ from Megatron's save")

    layer_bytes = max(torch.Size(s[1:]).numel() * 4 for k, s in ckpt_tensor_shapes(shape).items()
                      if k.startswith("decoder.layers."))
    writes = [e for e in events if e[0] == "write"]
    check(len(writes) == sum(len(m.chunks) for m in got_md.values() if hasattr(m, "chunks")), "unlogged writes")
    pending: list[tuple[str, str, int]] = []
    for kind, name, nbytes in events:
        if kind == "read":
            pending.append((kind, name, nbytes))
            continue
        read_bytes = sum(b for _, _, b in pending)
        check(read_bytes <= layer_bytes, f"{read_bytes} bytes read before writing a chunk of {name} "
                                         f"(> {layer_bytes}, the largest layer tensor): not streaming")
        check(len(pending) <= 3 and len({n.split(".self_attn")[0].split(".mlp")[0] for _, n, _ in pending}) <= 1,
              f"reads before writing {name} span several tensors/layers: {[n for _, n, _ in pending]}")
        check(nbytes == read_bytes, f"chunk of {name} ({nbytes} bytes) was not built from just its own reads "
                                    f"({read_bytes} bytes)")
        pending = []
    check(not pending, "HF tensors read after the last write")
    check(any("[" in n for k, n, _ in events if k == "read"), "the embedding was not read in row blocks")
    check(len(LAYER_SLOTS) * shape.num_hidden_layers <= len(writes), "fewer chunks than layer slots")
    print("streaming checks passed", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts, e.g. 1x1,2x1,1x2")
    parser.add_argument("--streaming", action="store_true", help="run check_streaming (one process) instead")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.streaming:
        check_streaming(args.work)
    else:
        run(args.work, [tuple(int(x) for x in lay.split("x")) for lay in args.layouts.split(",")])
    dist.barrier() if dist.is_initialized() and dist.get_world_size() > 1 else None
    if dist.is_initialized():
        dist.destroy_process_group()
