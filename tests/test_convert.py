"""Tests for tapo_megatron.convert: HF Qwen3 <-> Megatron-Core conversion, the export iterator, clear errors.

Multi-rank scenarios run in ``tests/_convert_worker.py`` under ``torchrun`` (gloo, CPU); see its docstring.
The real-shape (Qwen3-0.6B) conversion is ``tests/_convert_qwen3_06b.py``, marked slow here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tapo_megatron.convert import ConversionError, HFCheckpointReader, HFShardWriter, hf_to_mcore, mcore_to_hf
from tapo_megatron.convert.mcore_writer import _row_blocks
from tapo_megatron.convert.qwen3 import (
    LAYER_SLOTS,
    full_from_hf,
    full_to_hf,
    qkv_from_hf,
    qkv_to_hf,
    tp_shard,
    tp_unshard,
)
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import ParallelConfigError
from tapo_megatron.data.assets import qwen3_tokenizer_dir

REPO_ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convert_worker import make_hf_model, tiny_qwen3_config  # noqa: E402
from conftest import Workers  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_convert_worker.py"
QKV_SLOT, FC1_SLOT = LAYER_SLOTS[1], LAYER_SLOTS[6]


WORKERS = Workers()  # tests/conftest.py: the one way workers are run


def _env() -> dict:
    return WORKERS.env()


def _make_work(root: Path, tied: bool) -> Path:
    hf = root / "hf"
    make_hf_model(hf, tied=tied)
    tok = qwen3_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, hf / name)
    torch.manual_seed(1)
    torch.save(torch.randint(3, 256, (2, 12)), root / "input_ids.pt")
    return root


def _torchrun(work: Path, nproc: int, layouts: str, timeout: int) -> subprocess.CompletedProcess:
    return WORKERS.run(WORKER, "--work", work, "--layouts", layouts, nproc=nproc, timeout=timeout, check=False)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    """A tiny random Qwen3 converted by two gloo ranks at TP=2 and PP=2 (tied: also TP=1/PP=1 as 2 DP replicas;
    the untied run skips it to keep the file fast - the layout code paths do not depend on tying)."""
    work = _make_work(tmp_path_factory.mktemp("tied" if request.param else "untied"), request.param)
    layouts = "1x1,2x1,1x2" if request.param else "2x1,1x2"
    proc = _torchrun(work, 2, layouts, timeout=300)
    return work, proc, layouts


# ---------------------------------------------------------------------------------------------------------------
# Layout functions against hand-built tensors.

SMALL = Qwen3Shape(vocab_size=8, hidden_size=2, intermediate_size=4, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=1)


def test_qkv_interleaves_per_query_group():
    # One row per head (head_dim 1), row value = head id: q heads 0..3, k heads 10,11, v heads 20,21.
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]]).expand(4, 2)
    k = torch.tensor([[10.0], [11.0]]).expand(2, 2)
    v = torch.tensor([[20.0], [21.0]]).expand(2, 2)
    fused = qkv_from_hf(q, k, v, SMALL)
    # Group 0: q0 q1 k0 v0; group 1: q2 q3 k1 v1.
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    # TP=2: rank 1 holds exactly group 1.
    assert tp_shard(QKV_SLOT, fused, 2, 1)[:, 0].tolist() == [2, 3, 11, 21]
    back = qkv_to_hf(fused, SMALL)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_fc1_tp_shards_hold_gate_then_up_slices():
    gate = torch.arange(4.0).unsqueeze(1).expand(4, 2)  # rows 0..3
    up = (100 + torch.arange(4.0)).unsqueeze(1).expand(4, 2)  # rows 100..103
    full = full_from_hf(FC1_SLOT, [gate, up], SMALL)
    assert full[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    shards = [tp_shard(FC1_SLOT, full, 2, r) for r in range(2)]
    assert shards[0][:, 0].tolist() == [0, 1, 100, 101]
    assert shards[1][:, 0].tolist() == [2, 3, 102, 103]
    assert torch.equal(tp_unshard(FC1_SLOT, shards), full)
    g, u = full_to_hf(FC1_SLOT, full, SMALL)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_row_parallel_shards_split_columns():
    o_proj = torch.arange(8.0).reshape(2, 4)
    slot = LAYER_SLOTS[4]  # linear_proj
    assert tp_shard(slot, o_proj, 2, 1).tolist() == [[2, 3], [6, 7]]
    assert torch.equal(tp_unshard(slot, [tp_shard(slot, o_proj, 2, r) for r in range(2)]), o_proj)


def test_shard_writer_bounds_shards_and_indexes(tmp_path):
    writer = HFShardWriter(tmp_path, max_shard_bytes=100)
    writer.add("a", torch.zeros(10))  # 40 bytes
    writer.add("b", torch.zeros(10))  # 80 total: same shard
    writer.add("c", torch.zeros(10))  # would be 120: new shard
    writer.add("big", torch.zeros(50))  # 200 bytes > bound: a shard of its own
    writer.add("d", torch.zeros(1))
    names = writer.close()
    assert names == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 40 * 3 + 200 + 4
    assert index["weight_map"] == {"a": names[0], "b": names[0], "c": names[1], "big": names[2], "d": names[3]}
    reader_dir = tmp_path
    (reader_dir / "config.json").write_text("{}")
    reader = HFCheckpointReader(reader_dir)
    assert reader.info["big"].shape == (50,) and torch.equal(reader["c"], torch.zeros(10))


def test_row_blocks_respect_the_byte_bound():
    # 10 rows of 4 bytes, at most 12 bytes a block: ceil(40 / 12) = 4 blocks of ceil(10 / 4) = 3 rows.
    assert _row_blocks(10, 4, 12) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert _row_blocks(5, 4, 1000) == [(0, 5)]
    assert _row_blocks(3, 100, 10) == [(0, 1), (1, 2), (2, 3)]  # a row larger than the bound: one row a block


def test_reader_get_rows_reads_a_row_block(tmp_path):
    from safetensors.torch import save_file

    t = torch.arange(24.0).reshape(6, 4)
    save_file({"w": t}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    reader = HFCheckpointReader(tmp_path)
    assert torch.equal(reader.get_rows("w", 2, 5), t[2:5])
    with pytest.raises(ValueError, match="rows 4:7 are out of range for w with 6 rows"):
        reader.get_rows("w", 4, 7)


def test_streaming_checkpoint_equals_megatron_save(tmp_path):
    """hf_to_mcore writes what Megatron's dist_checkpointing.save writes for the same weights (keys, shapes,
    dtypes, values, _extra_state and common objects), building each chunk from its own HF reads only: never more
    than the largest layer tensor read between two chunk writes (the embedding goes in row blocks)."""
    work = tmp_path
    make_hf_model(work / "hf", tied=False)
    proc = subprocess.run([sys.executable, str(WORKER), "--work", str(work), "--streaming"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "streaming checks passed" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# End to end, multi-rank.


def test_roundtrip_logits_export_and_resharding(converted):
    """HF -> mcore (TP=1/PP=1, TP=2, PP=2) -> HF bit-exact; Megatron logits = transformers logits (1e-5); export
    iterator equals the HF tensors in bounded buckets; each checkpoint loads at the other layouts with the same
    logits; the exported directory loads in transformers and generates."""
    work, proc, layouts = converted
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = proc.stdout
    expected = ["tp=2 pp=1", "tp=1 pp=2", "ckpt tp=2 pp=1 loaded at tp=1 pp=2", "ckpt tp=1 pp=2 loaded at tp=2 pp=1"]
    if "1x1" in layouts:
        expected += ["tp=1 pp=1", "ckpt tp=1 pp=1 loaded at tp=2 pp=1", "ckpt tp=2 pp=1 loaded at tp=1 pp=2"]
    for what in expected:
        assert f"{what}: max |logit diff|" in out, f"no logit check reported for {what}"
    assert out.count("all checks passed") == 2


@pytest.mark.slow
def test_tp2_pp2_four_ranks(tmp_path):
    work = _make_work(tmp_path, tied=True)
    proc = _torchrun(work, 4, "2x2,1x1", timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "tp=2 pp=2: max |logit diff|" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Clear errors (raised before any process group or model exists).


@pytest.fixture
def tiny_hf(tmp_path) -> Path:
    make_hf_model(tmp_path / "hf", tied=False)
    return tmp_path / "hf"


def _rewrite_shard_of(hf: Path, name: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(hf / shard)
    edit(tensors, index["weight_map"], shard)
    save_file(tensors, hf / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_config_tensor_mismatch_names_tensor_and_field(tiny_hf, tmp_path):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tiny_hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*intermediate_size"):
        hf_to_mcore(tiny_hf, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_missing_key_is_named(tiny_hf, tmp_path):
    name = "model.layers.2.self_attn.k_norm.weight"

    def drop(tensors, weight_map, shard):
        del tensors[name], weight_map[name]
    _rewrite_shard_of(tiny_hf, name, drop)
    with pytest.raises(ConversionError, match=r"missing tensor.*model\.layers\.2\.self_attn\.k_norm\.weight"):
        hf_to_mcore(tiny_hf, tmp_path / "ckpt")


def test_extra_key_is_named(tiny_hf, tmp_path):
    name = "model.layers.0.input_layernorm.weight"

    def add(tensors, weight_map, shard):
        tensors["model.layers.4.mlp.up_proj.weight"] = torch.zeros(96, 64)
        weight_map["model.layers.4.mlp.up_proj.weight"] = shard
    _rewrite_shard_of(tiny_hf, name, add)
    with pytest.raises(ConversionError, match=r"does not have: model\.layers\.4\.mlp\.up_proj\.weight"):
        hf_to_mcore(tiny_hf, tmp_path / "ckpt")


def test_truncated_safetensors_names_file(tiny_hf, tmp_path):
    shard = sorted(tiny_hf.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ConversionError, match=rf"{shard.name} is truncated or corrupt"):
        hf_to_mcore(tiny_hf, tmp_path / "ckpt")


def test_tp_not_dividing_kv_groups_is_named(tiny_hf, tmp_path):
    # 4 query heads, 2 KV groups: TP=4 divides the heads but not the KV groups.
    with pytest.raises(ParallelConfigError, match=r"tensor_model_parallel_size=4.*num_key_value_heads=2"):
        hf_to_mcore(tiny_hf, tmp_path / "ckpt", tp=4, pp=1)
    assert tiny_qwen3_config(False)["num_attention_heads"] % 4 == 0


def test_mcore_checkpoint_config_mismatch_names_tensor(converted, tmp_path):
    work, proc, _ = converted
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt_tp2_pp1", ckpt)
    cfg = json.loads((ckpt / "hf_config.json").read_text())
    cfg["intermediate_size"] = 80
    (ckpt / "hf_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"decoder\.layers\.mlp\.linear_fc1\.weight has global shape"):
        mcore_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The unedited checkpoint converts in-process too (no process group needed) and matches the worker's export.
    mcore_to_hf(work / "ckpt_tp2_pp1", tmp_path / "out2", max_shard_bytes=10**9)
    reader, ref = HFCheckpointReader(tmp_path / "out2"), HFCheckpointReader(work / "hf")
    assert sorted(reader) == sorted(ref)
    assert all(torch.equal(reader[k], ref[k]) for k in ref)


# ---------------------------------------------------------------------------------------------------------------
# Real Qwen3-0.6B shape (random weights), CPU: time and peak memory.


@pytest.mark.slow
def test_qwen3_06b_shape_conversion(tmp_path):
    proc = subprocess.run([sys.executable, str(WORKER.with_name("_convert_qwen3_06b.py")), "--work", str(tmp_path)],
                          env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bit_exact"] and report["generated_tokens"] > 0
