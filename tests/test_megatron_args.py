"""The ``megatron:`` pass-through, validated against megatron-core's own dataclasses: an unknown key is refused with
its close matches, a key one of our sections owns is refused naming that section, a valid key reaches the object
the actor builds (TransformerConfig, DistributedDataParallelConfig, OptimizerConfig)."""
import pytest
import torch

from tapo_megatron.config import ConfigError, TrainConfig, apply_overrides
from tapo_megatron.models.megatron_args import split_megatron_args


def _cfg(**megatron):
    cfg = TrainConfig()
    cfg.model.hf_config = {"vocab_size": 32, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    cfg.megatron = megatron
    return cfg


def test_misspelt_key_refused_with_close_matches():
    with pytest.raises(ConfigError, match=r"megatron\.recompute_granulartiy .*did you mean recompute_granularity"):
        _cfg(recompute_granulartiy="selective").validate()
    with pytest.raises(ConfigError, match="overlap_grad_reduce"):
        _cfg(overlap_grad_reduse=True).validate()


def test_key_we_own_refused_naming_our_field():
    with pytest.raises(ConfigError, match=r"megatron\.lr contradicts .*optimizer\.lr"):
        _cfg(lr=1e-3).validate()
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size"):
        _cfg(tensor_model_parallel_size=2).validate()
    with pytest.raises(ConfigError, match="expected true or false"):
        _cfg(overlap_grad_reduce="yes please").validate()


def test_keys_split_by_dataclass_and_enums_by_name():
    from megatron.core.transformer.enums import AttnBackend

    out = split_megatron_args({"recompute_granularity": "selective", "attention_backend": "local",
                               "overlap_grad_reduce": True, "use_precision_aware_optimizer": False})
    assert out["transformer"] == {"recompute_granularity": "selective", "attention_backend": AttnBackend.local}
    assert out["ddp"] == {"overlap_grad_reduce": True}
    assert out["optimizer"] == {"use_precision_aware_optimizer": False}
    cfg = apply_overrides(_cfg(), ["megatron={recompute_granularity: full, recompute_method: uniform, "
                                   "recompute_num_layers: 1}"])
    assert cfg.validate().megatron["recompute_method"] == "uniform"


def test_fields_reach_the_actor_objects():
    from _parallel_worker import SHAPE
    from tapo_megatron.config import OptimizerConfig, ParallelConfig
    from tapo_megatron.parallel import init_parallel
    from tapo_megatron.training.actor import MegatronActor

    ctx = init_parallel(1, 1, seed=1)
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(), ParallelConfig(micro_batch_size=4),
                          megatron={"check_for_nan_in_grad": True, "init_method_std": 0.01,
                                    "use_precision_aware_optimizer": False})
    assert actor.config.init_method_std == 0.01 and actor.model.ddp_config.check_for_nan_in_grad is True
    tokens = torch.randint(0, SHAPE.vocab_size, (3, 9))
    loss_fn = lambda lp, mb: ((lp * mb["loss_mask"]).sum() / 27, {})  # noqa: E731
    result = actor.train_step({"tokens": tokens, "loss_mask": torch.ones(3, 9)}, loss_fn)
    assert result.grad_norm > 0
    # Recomputation reaches TransformerConfig (it runs on GPU; on CPU the recompute happens inside backward, where
    # parallel.cpu_compat's device mapping is not active, so only the config is checked here).
    from tapo_megatron.models.qwen3 import transformer_config

    config = transformer_config(SHAPE, ctx, overrides=split_megatron_args(
        {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]})["transformer"])
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn"]
