"""A rollout engine serving a saved policy: an HF Qwen3 directory or a Megatron checkpoint (``tapo eval``, the
cold-start build).

    policy = load_policy(path, cfg.rollout, seed)      # PolicySource(engine, model_name, model_version, tokenizer_dir)
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tapo_megatron.config import ConfigError, RolloutConfig
from tapo_megatron.convert.checkpoints import has_checkpoint, is_megatron_checkpoint, resolve_checkpoint
from tapo_megatron.errors import CheckpointNotFoundError


@dataclass
class PolicySource:
    """A rollout engine serving a checkpoint, plus what provenance records need about it."""

    engine: object  # a RolloutEngine
    model_name: str  # the checkpoint path as given (or "random-init")
    model_version: str  # "iter_<N>" for a Megatron checkpoint, "sha256:<12 hex>" of the weight files for an HF dir
    tokenizer_dir: Path | None  # tokenizer files shipped with the checkpoint, if any


def weights_fingerprint(hf_dir: Path) -> str:
    """A cheap content fingerprint of an HF dir: config.json, plus size and first MiB of every weight file."""
    digest = hashlib.sha256((hf_dir / "config.json").read_bytes())
    for weights in sorted(hf_dir.glob("*.safetensors")) + sorted(hf_dir.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        with open(weights, "rb") as f:
            digest.update(f.read(2**20))
    return "sha256:" + digest.hexdigest()[:12]


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_policy(path: str | Path, rollout: RolloutConfig, seed: int,
                dtype: torch.dtype = torch.float32) -> PolicySource:
    """A rollout engine for an HF Qwen3 directory or a Megatron checkpoint (the actor's or ``hf_to_mcore``'s).

    A Megatron checkpoint is streamed to a temporary HF directory with ``convert.mcore_to_hf`` (one layer in
    memory at a time) and loaded from there, so both kinds reach the engine through the same HF loader.
    Only the native engine loads checkpoints in-process; ``rollout.engine="sglang"`` is refused by name.
    """
    if rollout.engine != "native":
        raise ConfigError(f"rollout.engine={rollout.engine!r} is not available in this environment (native only)")
    from tapo_megatron.rollout.native import NativeEngine

    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"model {str(path)!r}: no such HF directory or Megatron checkpoint")
    if (path / "config.json").is_file():
        engine = NativeEngine.from_pretrained(path, dtype=dtype, seed=seed, num_threads=rollout.num_threads)
        return PolicySource(engine, str(path), weights_fingerprint(path), path if _has_tokenizer(path) else None)
    if not is_megatron_checkpoint(path):
        raise CheckpointNotFoundError(
            f"model {str(path)!r} is neither an HF directory (config.json) nor a Megatron checkpoint "
            "(state.json / latest_checkpointed_iteration.txt / model + hf_config.json)")
    from tapo_megatron.convert.api import mcore_to_hf

    ckpt = resolve_checkpoint(path) if has_checkpoint(path) else path
    version = ckpt.name if ckpt.name.startswith("iter_") else "mcore"
    with tempfile.TemporaryDirectory(prefix="tapo-policy-") as tmp:
        hf_dir = mcore_to_hf(ckpt, Path(tmp) / "hf")
        engine = NativeEngine.from_pretrained(hf_dir, dtype=dtype, seed=seed, num_threads=rollout.num_threads)
    assets = ckpt / "hf_assets"
    return PolicySource(engine, str(path), version, assets if _has_tokenizer(assets) else None)
