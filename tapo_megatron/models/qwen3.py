"""Qwen3 on Megatron-Core: an HF-style Qwen3 config -> a ``GPTModel`` stage for this rank's TP/PP position.

Qwen3 = GQA attention with per-head q/k RMSNorm, SwiGLU MLP, RoPE (theta from the config), RMSNorm, no biases,
tied (0.6B-4B) or untied (8B) embeddings. The Transformer Engine layer spec is used when TE imports, the local
(pure megatron.core) spec otherwise; both give the same parameter names for the converter except where
``convert.qwen3`` says otherwise.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from tapo_megatron.config import ConfigError, ModelConfig
from tapo_megatron.parallel import ParallelContext, check_layout, is_gpu


class ModelConfigError(ConfigError):
    """A model config that is missing a field or contradicts itself."""


@dataclass(frozen=True)
class Qwen3Shape:
    """The architecture values of a Qwen3 model, with HF ``config.json`` field names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    # The source config's other keys (bos/eos ids, rope_parameters, sliding-window keys, ...): not architecture
    # here, but an exported config.json must keep them (to_hf). Not part of equality or the hash.
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict) -> "Qwen3Shape":
        """From an HF ``config.json`` dict (extra keys ignored; missing required keys named in the error)."""
        cfg = dict(cfg)
        if "head_dim" not in cfg and "hidden_size" in cfg and "num_attention_heads" in cfg:
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        if "rope_theta" not in cfg and isinstance(cfg.get("rope_parameters"), dict):
            cfg["rope_theta"] = cfg["rope_parameters"].get("rope_theta", cls.rope_theta)
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in cfg]
        if missing:
            raise ModelConfigError(f"Qwen3 config is missing required field(s): {', '.join(missing)}")
        extra = {k: v for k, v in cfg.items() if k not in known}
        shape = cls(**{k: v for k, v in cfg.items() if k in known and k != "extra"}, extra=extra)
        shape.validate()
        return shape

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen3Shape":
        return cls.from_hf(json.loads(Path(path).read_text()))

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"Qwen3 config field {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")

    def to_hf(self) -> dict:
        """An HF ``config.json`` for ``Qwen3ForCausalLM`` with these values."""
        values = asdict(self)
        return {
            **values.pop("extra"),
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
            **values,
        }

    def layout_dims(self) -> dict[str, int]:
        """What a TP x PP layout must divide (``parallel.check_layout`` keywords)."""
        return dict(num_layers=self.num_hidden_layers, num_heads=self.num_attention_heads,
                    num_kv_heads=self.num_key_value_heads, vocab_size=self.vocab_size)

    def num_parameters(self) -> int:
        h, l, i, v = self.hidden_size, self.num_hidden_layers, self.intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 2 * self.head_dim + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + l * per_layer + h


def check_parallel(shape: Qwen3Shape, tp: int, pp: int, world_size: int | None = None) -> None:
    """Refuse a layout the model cannot be split into, naming the field."""
    check_layout(world_size if world_size is not None else tp * pp, tp, pp, **shape.layout_dims())


def shape_from_config(model: ModelConfig) -> Qwen3Shape:
    """The model's shape from ``model.hf_config`` (inline values) or ``model.hf_config_path`` (a config.json or an
    HF directory)."""
    if model.hf_config:
        return Qwen3Shape.from_hf(model.hf_config)
    path = Path(model.hf_config_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"model.hf_config_path={model.hf_config_path!r}: no config.json there")
    return Qwen3Shape.from_hf(json.loads(path.read_text()))


def have_transformer_engine() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE) and is_gpu()


def transformer_config(shape: Qwen3Shape, ctx: ParallelContext, dtype: torch.dtype = torch.float32,
                       overrides: dict | None = None):
    """The Megatron ``TransformerConfig`` for a Qwen3 shape on this layout; ``overrides`` (validated
    ``megatron:`` fields and ``megatron_args.speed_defaults``) go on top."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    gpu = is_gpu()
    kwargs = dict(
        num_layers=shape.num_hidden_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=ctx.tp_size,
        pipeline_model_parallel_size=ctx.pp_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Fusions that need apex/TE or CUDA: off here; megatron_args.speed_defaults turns them on with TE on GPU.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not gpu,
        batch_p2p_sync=gpu,
        deallocate_pipeline_outputs=False,
        # micro-batches are trimmed to their own longest row, so stages exchange shapes with each activation
        variable_seq_lengths=ctx.pp_size > 1,
        moe_token_dispatcher_type="alltoall",  # dense model: unused, but the default one refuses variable lengths
    )
    return TransformerConfig(**{**kwargs, **(overrides or {})})


def build_qwen3(shape: Qwen3Shape, ctx: ParallelContext, dtype: torch.dtype = torch.float32,
                overrides: dict | None = None):
    """Build this rank's stage of a Qwen3 ``GPTModel`` (random init; load weights with a checkpoint or converter).
    ``overrides``: extra ``TransformerConfig`` fields (see ``transformer_config``)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    check_parallel(shape, ctx.tp_size, ctx.pp_size, ctx.world_size)
    config = transformer_config(shape, ctx, dtype, overrides)
    if have_transformer_engine():
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=ctx.is_first_stage,
        post_process=ctx.is_last_stage,
        parallel_output=True,  # keep logits vocab-sharded: log-probs are computed vocab-parallel
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        rotary_percent=1.0,
    )
    model.to(ctx.device)
    return model
