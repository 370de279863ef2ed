"""HF-style Qwen3 config dicts -> ``transformers.Qwen3Config``.

Inputs accepted by :func:`hf_config_from_qwen3`:
- a plain HF ``config.json`` dict (``{"hidden_size": 1024, ...}``), e.g. a tiny test model's;
- an entry of the shipped ``qwen3_configs.json`` (``data.assets``) (``{"config": {...}, "source": ...}``), unwrapped automatically;
- a ``Qwen3Config`` (returned as a copy, with the attention implementation set).

Field defaults match ``tapo_megatron.models.qwen3.Qwen3Shape.from_hf`` so that the Megatron builder and the HF
engine build the same model from the same dict (notably ``head_dim`` defaults to hidden_size // num_attention_heads,
not to ``Qwen3Config``'s own default of 128).

Usage::

    cfg = hf_config_from_qwen3(qwen3_preset("Qwen3-0.6B"))
    cfg = hf_config_from_qwen3({"vocab_size": 32, "hidden_size": 64, ..., "head_dim": 16})
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import transformers

from tapo_megatron.data.assets import data_file

# The architecture fields every dict must give (head_dim has a derived default, see module docstring).
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Optional fields and the value used when absent (Qwen3 dense checkpoints' values).
DEFAULTS: dict[str, Any] = {
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
}
# HF config.json bookkeeping keys that carry no architecture and are dropped before building the config.
_METADATA_KEYS = frozenset({"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path"})
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def qwen3_preset(name: str) -> dict:
    """The HF config dict of a named Qwen3 checkpoint (``"Qwen3-0.6B"``, ``"Qwen3-1.7B"``, ``"Qwen3-4B"``,
    ``"Qwen3-8B"``) from the shipped ``qwen3_configs.json``."""
    models = json.loads(data_file("qwen3_configs.json").read_text())["models"]
    if name not in models:
        raise KeyError(f"unknown Qwen3 preset {name!r}; known: {', '.join(sorted(models))}")
    return dict(models[name]["config"])


def hf_config_from_qwen3(
    cfg: Mapping[str, Any] | transformers.Qwen3Config, *, attn_implementation: str = "sdpa"
) -> transformers.Qwen3Config:
    """Build a ``Qwen3Config`` from an HF-style dict (see module docstring for the accepted forms).

    Args:
        cfg: the config dict or an existing ``Qwen3Config``.
        attn_implementation: "sdpa" (default: exact to ~1e-6 against eager in fp32 and faster on CPU) or "eager".

    Returns:
        a new ``Qwen3Config``; the input is never modified.

    Raises:
        ValueError: a required field is missing, a value is not a positive integer, the head counts do not divide,
            or the dict asks for a feature this project does not model (rope scaling, sliding window, non-SiLU MLP).
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r}; expected one of {ATTN_IMPLEMENTATIONS}")
    if isinstance(cfg, transformers.Qwen3Config):
        config = copy.deepcopy(cfg)
        config._attn_implementation = attn_implementation
        _validate(config.to_dict())
        return config
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a dict or transformers.Qwen3Config, got {type(cfg).__name__}")
    raw = dict(cfg)
    if isinstance(raw.get("config"), Mapping) and "hidden_size" not in raw:
        raw = dict(raw["config"])  # an entry of qwen3_configs.json
    model_type = raw.get("model_type", "qwen3")
    if model_type != "qwen3":
        raise ValueError(f"model_type={model_type!r}: only 'qwen3' configs are supported")
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        raise ValueError(f"Qwen3 config is missing required field(s): {', '.join(missing)}")

    kwargs = {k: v for k, v in raw.items() if k not in _METADATA_KEYS}
    kwargs.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    rope_parameters = kwargs.pop("rope_parameters", None)
    if "rope_theta" not in kwargs and isinstance(rope_parameters, Mapping):
        _check_rope_type(rope_parameters)
        kwargs["rope_theta"] = rope_parameters.get("rope_theta", DEFAULTS["rope_theta"])
    for name, default in DEFAULTS.items():
        kwargs.setdefault(name, default)
    _validate(kwargs)
    return transformers.Qwen3Config(**kwargs, attn_implementation=attn_implementation)


def _check_rope_type(rope: Mapping[str, Any]) -> None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (plain RoPE only; Megatron side builds plain RoPE)")


def _validate(fields: Mapping[str, Any]) -> None:
    """Refuse values the Megatron builder or the engine cannot reproduce, naming the field."""
    for name in (*REQUIRED_FIELDS, "head_dim"):
        value = fields.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"Qwen3 config field {name}={value!r} must be a positive integer")
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise ValueError(
            f"num_attention_heads={fields['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={fields['num_key_value_heads']}"
        )
    if fields.get("rope_scaling"):
        raise ValueError(f"rope_scaling={fields['rope_scaling']!r} is not supported (plain RoPE only)")
    if isinstance(fields.get("rope_parameters"), Mapping):
        _check_rope_type(fields["rope_parameters"])
    if fields.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported: Qwen3 dense models use full attention")
    if fields.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={fields['hidden_act']!r}: Qwen3 uses 'silu'")
