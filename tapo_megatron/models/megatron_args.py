"""The ``megatron:`` config section: Megatron-Core's own field names, passed through to the objects the actor builds.

    megatron:
      recompute_granularity: selective      # TransformerConfig
      attention_backend: flash              # TransformerConfig (AttnBackend member name)
      overlap_grad_reduce: true             # DistributedDataParallelConfig
      use_precision_aware_optimizer: true   # OptimizerConfig

Each key must be a field of ``TransformerConfig`` (with ``ModelParallelConfig``), Megatron's ``OptimizerConfig`` or
``DistributedDataParallelConfig`` (megatron-core 0.19.2); an unknown key is refused with its close matches. A key
that one of our own sections sets (the model shape from ``model.hf_config``, the layout from ``parallel``, the
optimizer from ``optimizer``/``sft.optimizer``) is refused naming that field, so one value has one home.
Values apply on top of our defaults (``models.qwen3.transformer_config``, ``speed_defaults``) to every dataclass
that has the field.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import typing

from tapo_megatron.errors import ConfigError

# Megatron fields our own sections own: megatron key -> the field to set instead.
OWNED = {
    **{k: "model.hf_config" for k in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "layernorm_epsilon", "normalization", "qk_layernorm", "gated_linear_unit", "activation_func",
        "add_bias_linear", "add_qkv_bias", "rotary_base", "vocab_size")},
    "params_dtype": "model.params_dtype", "bf16": "model.params_dtype", "fp16": "model.params_dtype",
    "pipeline_dtype": "model.params_dtype",
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "micro_batch_size": "parallel.micro_batch_size",
    "optimizer": "optimizer (Adam is the only one the actor builds)",
    **{k: f"optimizer.{k}" for k in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                                     "clip_grad")},
    "finalize_model_grads_func": "the actor (it must stay Megatron's finalize_model_grads)",
    "no_sync_func": "the actor", "variable_seq_lengths": "the actor (set for PP with trimmed micro-batches)",
}


@functools.lru_cache(maxsize=1)
def megatron_dataclasses() -> dict[str, type]:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {"transformer": TransformerConfig, "optimizer": OptimizerConfig, "ddp": DistributedDataParallelConfig}


def _coerce(cls: type, name: str, value):
    """YAML value -> the field's type where that is unambiguous (an Enum member by name, an int for a float)."""
    hint = typing.get_type_hints(cls).get(name)
    if isinstance(hint, type) and issubclass(hint, enum.Enum) and isinstance(value, str):
        try:
            return hint[value]
        except KeyError:
            raise ConfigError(f"megatron.{name}={value!r}: expected one of "
                              f"{', '.join(m.name for m in hint)}") from None
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"megatron.{name}={value!r}: expected true or false")
    return value


def split_megatron_args(section: dict) -> dict[str, dict]:
    """Validate the ``megatron:`` mapping and split it by target: {"transformer": {...}, "optimizer": {...},
    "ddp": {...}} (a field several dataclasses share goes to each)."""
    if not isinstance(section, dict):
        raise ConfigError(f"megatron: expected a mapping of Megatron field names, got {type(section).__name__}")
    classes = megatron_dataclasses()
    names = {target: {f.name for f in dataclasses.fields(cls)} for target, cls in classes.items()}
    known = set().union(*names.values())
    out: dict[str, dict] = {target: {} for target in classes}
    for key, value in section.items():
        if key in OWNED:
            raise ConfigError(f"megatron.{key} contradicts our own setting: set {OWNED[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"megatron.{key} is not a field of Megatron-Core's TransformerConfig, OptimizerConfig "
                              f"or DistributedDataParallelConfig{hint}")
        for target, cls in classes.items():
            if key in names[target]:
                out[target][key] = _coerce(cls, key, value)
    return out


def speed_defaults(tp_size: int, gpu_with_te: bool) -> dict[str, dict]:
    """What a Megatron user expects on with Transformer Engine on a GPU (the ``megatron:`` section overrides each):
    bias-SwiGLU, RoPE and masked-softmax fusions, gradient-accumulation fusion where its CUDA extension imports,
    sequence parallelism with TP > 1, overlapped grad reduce, grads reduced in the param dtype (Megatron's default).
    ``overlap_param_gather`` stays off by default: it defers the DistributedOptimizer's all-gather of the updated
    weights to the next forward, but the RL loop pushes the weights to the engines right after the step (set it
    with ``megatron: {overlap_param_gather: true}`` for SFT). Without TE (CPU): all off, grads reduced in fp32."""
    if not gpu_with_te:
        return {"transformer": {}, "optimizer": {}, "ddp": {"grad_reduce_in_fp32": True}}
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (apex's wgrad kernel: Megatron's linears need it)
        wgrad_fusion = True
    except ImportError:
        wgrad_fusion = False
    return {
        "transformer": {"bias_activation_fusion": True, "bias_dropout_fusion": True, "masked_softmax_fusion": True,
                        "apply_rope_fusion": True, "gradient_accumulation_fusion": wgrad_fusion,
                        "sequence_parallel": tp_size > 1},
        "optimizer": {},
        "ddp": {"grad_reduce_in_fp32": False, "overlap_grad_reduce": True},
    }


def merged(defaults: dict[str, dict], overrides: dict[str, dict]) -> dict[str, dict]:
    return {target: {**defaults.get(target, {}), **overrides.get(target, {})} for target in ("transformer",
                                                                                             "optimizer", "ddp")}
