"""Recipes: the paper's settings in every Qwen3 recipe, architecture values equal to the released configs, GRPO =
TAPO minus TAPO, the tiny recipe = the 0.6B recipe minus scale, presets that resolve, and errors naming the field."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from tapo_megatron.config import ConfigError, load_config
from tapo_megatron.data.assets import FILES_DIR, data_file, resolve_dataset
from tapo_megatron.recipes import list_presets, list_recipes, load_recipe, recipe_path, resolve_recipe

SIZES = {"0_6b": "Qwen3-0.6B", "1_7b": "Qwen3-1.7B", "4b": "Qwen3-4B", "8b": "Qwen3-8B"}
REAL = json.loads((data_file("qwen3_configs.json")).read_text())["models"]


def test_all_recipes_and_presets_present():
    names = set(list_recipes())
    assert {f"qwen3_{s}_{a}" for s in SIZES for a in ("tapo", "grpo")} | {"tiny", "demo"} <= names
    assert list_presets() == ["h100_1x8", "h100_4x8"]


@pytest.mark.parametrize("size", SIZES)
def test_paper_settings_and_real_architecture(size):
    cfg = load_recipe(f"qwen3_{size}_tapo")
    assert cfg.train_iters == 500 and cfg.rollout.n_samples_per_prompt == 8
    t = cfg.tapo
    assert (t.enabled, t.n_pos, t.n_neg, t.m_max, t.constructed_coef, t.ots_clip_min, t.ots_clip_max) == \
        (True, 2, 4, 4, 1.0, 0.01, 10.0)
    real = REAL[SIZES[size]]["config"]
    for key, value in cfg.model.hf_config.items():
        assert value == real[key], f"{size}: model.hf_config.{key}={value} but the released config has {real[key]}"
    assert cfg.model.name == SIZES[size]
    # data: DeepScaleR + MATH through the cold start and the ZPD filter, AIME24/AIME25/HMMT25 for evaluation
    cs = cfg.coldstart
    assert cs.query_files == ["deepscaler", "math"] and (cs.zpd_low, cs.zpd_high) == (0.125, 0.875)
    assert cfg.data.train_file == f"{cs.output_dir}/rl_queries.jsonl" and cfg.data.train_files == []
    assert cfg.sft.data_file == f"{cs.output_dir}/sft_mix.jsonl"
    assert cfg.checkpoint.pretrained_checkpoint == f"{cs.output_dir}/sft_checkpoints"  # RL starts from the SFT model
    assert cfg.data.eval_files == ["aime24", "aime25", "hmmt25"] and cfg.model.tokenizer == "qwen3"
    # a construction copies the wrong rollout before correcting it: room for a whole rollout and more
    assert t.max_construction_tokens >= cfg.rollout.max_new_tokens and t.min_reused_tokens == 32
    for f in [*cs.query_files, *cfg.data.eval_files]:
        path = resolve_dataset(f)
        assert path.parent == FILES_DIR and path.is_file(), f


@pytest.mark.parametrize("size", SIZES)
def test_grpo_is_tapo_without_tapo(size):
    tapo, grpo = asdict(resolve_recipe(f"qwen3_{size}_tapo")), asdict(resolve_recipe(f"qwen3_{size}_grpo"))
    assert grpo["tapo"]["enabled"] is False
    diff = {s for s in tapo if tapo[s] != grpo[s]}
    assert diff == {"tapo", "checkpoint", "logging"}
    assert {k for k in tapo["tapo"] if tapo["tapo"][k] != grpo["tapo"][k]} == {"enabled"}


def test_tiny_is_the_06b_recipe_shrunk():
    tiny, full = asdict(resolve_recipe("tiny")), asdict(resolve_recipe("qwen3_0_6b_tapo"))
    scale = {("train_iters",), ("eval_interval",), ("model", "name"), ("model", "hf_config"), ("model", "params_dtype"),
             ("model", "kernel_backend"), ("data", "eval_samples"), ("parallel", "micro_batch_size"),
             ("optimizer", "lr_warmup_iters"), ("rollout", "engine"), ("rollout", "engine_model_path"), ("rollout", "rollout_batch_size"),
             ("rollout", "max_new_tokens"), ("algorithm", "drop_zero_variance_groups"),
             ("tapo", "max_construction_tokens"), ("tapo", "max_spliced_tokens"), ("launch", "max_prompt_tokens"),
             # tiny has no cold-start stages: it trains on the shipped files from a random init
             ("data", "train_file"), ("data", "train_files"), ("tapo", "min_reused_tokens"),
             ("launch", "reserved_gb")}
    differing = set()
    for section, value in full.items():
        if section in ("checkpoint", "logging", "coldstart", "sft"):
            continue  # paths, run names and the cold-start stages
        if isinstance(value, dict):
            differing |= {(section, k) for k in value if value[k] != tiny[section][k]}
        elif value != tiny[section]:
            differing.add((section,))
    assert differing <= scale, differing - scale
    assert tiny["model"]["hf_config"]["vocab_size"] == full["model"]["hf_config"]["vocab_size"]  # real tokenizer


@pytest.mark.parametrize("preset,placement", [("h100_1x8", "colocated"), ("h100_4x8", "separate")])
def test_presets_resolve_for_every_size(preset, placement):
    for size in SIZES:
        cfg = load_recipe(f"qwen3_{size}_tapo", preset)
        assert cfg.launch.engine_placement == placement


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown config field 'tapo.n_postive'"):
        load_recipe("qwen3_8b_tapo", overrides=["tapo.n_postive=3"])
    with pytest.raises(ConfigError, match="launch.engine_placement='remote'"):
        load_recipe("qwen3_8b_tapo", overrides=["launch.engine_placement=remote"])
    with pytest.raises(ConfigError, match="checkpoint.export_hf needs checkpoint.save"):
        load_recipe("tiny", overrides=["checkpoint.save="])
    with pytest.raises(ConfigError, match="preset 'h100_4x8' has no entry for model.name=''"):
        resolve_recipe("demo", "h100_4x8")
    with pytest.raises(ConfigError, match="recipe 'qwen3_9b' not found; packaged recipes: .*qwen3_8b_tapo"):
        recipe_path("qwen3_9b")


def test_env_references_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPO_MODELS", "/m")
    monkeypatch.setenv("TAPO_RUNS", str(tmp_path))
    cfg = load_recipe("qwen3_4b_grpo")
    assert cfg.checkpoint.pretrained_checkpoint == f"{tmp_path}/qwen3_4b_coldstart/sft_checkpoints"
    assert cfg.coldstart.model_path == "/m/Qwen3-4B"
    assert cfg.checkpoint.export_hf == f"{tmp_path}/qwen3_4b_grpo/hf"
    # load_config (tapo train --config) expands the same way
    assert load_config(recipe_path("qwen3_4b_grpo")).logging.output_dir == f"{tmp_path}/qwen3_4b_grpo"
