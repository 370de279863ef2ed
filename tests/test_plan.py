"""Planner: parameter counts against an independent reference (transformers' Qwen3 on the meta device, built from
the real configs), memory terms hand-computed for a small layout, and refusals that name the reason."""
from __future__ import annotations

import pytest
import torch
import transformers

from tapo_megatron.commands import main as tapo_main
from tapo_megatron.config import TrainConfig
from tapo_megatron.models.hf_config import hf_config_from_qwen3, qwen3_preset
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.launch.plan import GB, PlanError, check_plan, make_plan, stage_parameters
from tapo_megatron.recipes import load_recipe


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B"])
def test_parameter_count_matches_hf_model(name):
    config = hf_config_from_qwen3(qwen3_preset(name))
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(config)
    reference = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    cfg = load_recipe(f"qwen3_{name.split('-')[1].lower().replace('.', '_')}_tapo")
    plan = make_plan(cfg, Qwen3Shape.from_hf(cfg.model.hf_config), 1, 1)
    assert plan.num_parameters == reference
    assert plan.params_per_gpu == reference  # TP = PP = 1: one GPU holds everything


def test_qwen3_8b_figures():
    cfg = load_recipe("qwen3_8b_tapo", "h100_1x8")
    plan = make_plan(cfg, Qwen3Shape.from_hf(cfg.model.hf_config), 1, 8)
    # 8B by hand from config.json: untied 151936 x 4096 embedding and head, 36 layers.
    layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 12288 + 2 * 128 + 2 * 4096
    total = 2 * 151936 * 4096 + 36 * layer + 4096
    assert plan.num_parameters == total == 8_190_735_360
    lo = plan.layout
    assert (lo.tp, lo.pp, lo.dp, lo.engine_tp, lo.num_engines) == (2, 1, 4, 2, 4)
    per_gpu = 36 * ((4096 * 6144 + 4096 * 4096 + 3 * 4096 * 12288) // 2 + 2 * 128 + 2 * 4096) + 4096 \
        + 2 * 151936 * 4096 // 2
    assert plan.params_per_gpu == per_gpu
    assert plan.params_gb == pytest.approx(per_gpu * 2 / GB)  # bf16
    assert plan.grads_gb == pytest.approx(per_gpu * 2 / GB)  # bf16 grad buffer (Megatron's default, TE on GPU)
    assert plan.optimizer_gb == pytest.approx(per_gpu * 12 / 4 / GB)  # fp32 main + m + v, sharded over DP=4
    assert plan.engine_weights_gb == pytest.approx(total * 2 / 2 / GB)
    seq = 1024 + 8192
    assert plan.seq_len == seq
    kv_per_token = 2 * 36 * 4 * 128 * 2  # K,V x layers x (8 kv heads / engine TP 2) x head_dim x bf16
    assert plan.kv_cache_needed_gb == pytest.approx(128 * seq * kv_per_token / GB)  # 512 rollouts / 4 engines
    check_plan(plan)


def test_memory_terms_small_layout_by_hand():
    shape = Qwen3Shape(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    cfg = TrainConfig()
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 2, 2
    cfg.parallel.micro_batch_size = 3
    cfg.model.params_dtype = "float32"
    cfg.rollout.max_new_tokens, cfg.launch.max_prompt_tokens = 20, 12
    cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt = 4, 8
    plan = make_plan(cfg, shape, 1, 8)  # TP 2 x PP 2 x DP 2, colocated, engine TP 1
    sharded = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128
    body = 2 * (sharded // 2 + 2 * 16 + 2 * 64)
    # first stage: body + embedding/2; last stage: body + final norm + tied copy of the embedding/2 (PP > 1)
    assert stage_parameters(shape, 2, 2) == body + 64 + 1000 * 64 // 2
    assert plan.optimizer_gb == pytest.approx(plan.params_per_gpu * 8 / 2 / GB)  # fp32: m + v only, DP 2
    tokens = 3 * 32
    # TP 2 on GPU: sequence parallel shards the h-wide tensors too
    per_token_layer = 4 * 64 / 2 + (2 * (4 + 4) * 16 + 4 * 16) / 2 + 3 * 128 / 2
    assert plan.activations_gb == pytest.approx(4 * tokens * per_token_layer * 4 / GB)
    assert plan.logits_gb == pytest.approx(tokens * 500 * 4 / GB)  # fp32 logits, gradient in place
    assert plan.sequences_per_engine == 4  # 32 rollouts over 8 engines
    # a packed token budget, full recompute, no SP, fp32 grad reduce and the fused log-prob path
    cfg.parallel.max_tokens_per_micro_batch = 200
    cfg.megatron = {"sequence_parallel": False, "recompute_granularity": "full", "grad_reduce_in_fp32": True}
    cfg.model.logprobs_path = "fused_linear"
    plan = make_plan(cfg, shape, 1, 8)
    assert plan.activations_gb == pytest.approx(4 * 200 * 64 * 4 / GB)  # only each layer's input
    assert plan.logits_gb == pytest.approx(2048 * 500 * 8 / GB)  # one tile, not [tokens, V]
    assert plan.grads_gb == pytest.approx(plan.params_per_gpu * 4 / GB)
    cfg.megatron = {"recompute_granularity": "selective", "recompute_modules": ["mlp"]}
    plan = make_plan(cfg, shape, 1, 8)
    assert plan.activations_gb == pytest.approx(4 * 200 * (4 * 64 / 2 + (2 * 8 * 16 + 4 * 16) / 2) * 4 / GB)


def test_refuses_what_does_not_fit():
    cfg = load_recipe("qwen3_8b_tapo")  # TP 1 on one GPU
    plan = make_plan(cfg, Qwen3Shape.from_hf(cfg.model.hf_config), 1, 1)
    with pytest.raises(PlanError, match=r"does not fit: a trainer GPU needs .* > 80 GB .*optimizer states 98\.3"):
        check_plan(plan)


def test_refuses_layouts_that_do_not_divide():
    shape_cfg = load_recipe("qwen3_8b_tapo", overrides=["parallel.tensor_model_parallel_size=3"])
    shape = Qwen3Shape.from_hf(shape_cfg.model.hf_config)
    with pytest.raises(PlanError, match="not divisible by TP x PP = 3 x 1"):
        make_plan(shape_cfg, shape, 1, 8)
    with pytest.raises(PlanError, match="exceeds --gpus-per-node=8"):
        make_plan(load_recipe("qwen3_8b_tapo", overrides=["parallel.tensor_model_parallel_size=16"]), shape, 2, 8)
    with pytest.raises(PlanError, match="does not divide num_hidden_layers=36"):
        make_plan(load_recipe("qwen3_8b_tapo", overrides=["parallel.pipeline_model_parallel_size=8"]), shape, 1, 8)
    sep = load_recipe("qwen3_8b_tapo", "h100_4x8")
    with pytest.raises(PlanError, match="leaves no trainer node"):
        make_plan(sep, shape, 2, 8)


def test_cli_plan(capsys):
    assert tapo_main(["plan", "--recipe", "qwen3_8b_tapo", "--nodes", "1", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "preset: h100_1x8" in out and "8,190,735,360 parameters" in out and "fits: yes" in out
    assert tapo_main(["plan", "--recipe", "qwen3_8b_tapo", "--nodes", "1", "--gpus-per-node", "1"]) == 2
    assert "does not fit" in capsys.readouterr().err
