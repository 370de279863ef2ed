"""Builds the pieces a run needs from its config: parallel context, model shape, tokenizer, queries, actor, engine.

Shared by the RL loop (train.py), cold-start SFT (sft.py) and evaluation, so every entry point builds them alike.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tapo_megatron.algorithms.reflection import ReflectionDetector
from tapo_megatron.config import ConfigError, DataConfig, ModelConfig, RolloutConfig, TrainConfig
from tapo_megatron.data.queries import load_queries
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.models.qwen3 import Qwen3Shape, check_parallel
from tapo_megatron.parallel import ParallelContext, init_parallel
from tapo_megatron.records import Query
from tapo_megatron.tasks.arithmetic import CORRECTION_MARKER, ArithmeticTask


def model_shape(model: ModelConfig) -> Qwen3Shape:
    if model.hf_config:
        return Qwen3Shape.from_hf(model.hf_config)
    path = Path(model.hf_config_path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"model.hf_config_path={model.hf_config_path!r}: no config.json there")
    return Qwen3Shape.from_hf(json.loads(path.read_text()))


def setup_parallel(cfg: TrainConfig, shape: Qwen3Shape) -> ParallelContext:
    # Refuse a layout the model cannot be split into before Megatron raises from deep inside.
    p = cfg.parallel
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None  # set under torchrun
    check_parallel(shape, p.tensor_model_parallel_size, p.pipeline_model_parallel_size, world_size=world)
    return init_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=cfg.seed)


@dataclass
class Queries:
    train: list[Query]
    evals: dict[str, list[Query]]  # benchmark name -> queries


def load_task_queries(data: DataConfig, tokenizer, seed: int) -> Queries:
    if data.task == "arithmetic":
        task = ArithmeticTask()
        return Queries(train=task.generate_split(data.num_train_problems, seed, "train"),
                       evals={"heldout": task.generate_split(data.num_eval_problems, seed + 1, "heldout")})
    train = [q for f in [data.train_file, *data.train_files]
             for q in load_queries(f, on_error=data.on_bad_row, tokenizer=tokenizer).queries]
    evals = {Path(f).stem: load_queries(f, on_error=data.on_bad_row, tokenizer=tokenizer).queries
             for f in data.eval_files}
    return Queries(train=train, evals=evals)


def build_engine(rollout: RolloutConfig, shape: Qwen3Shape, seed: int):
    """The rollout engine on rank 0: the in-process native engine, or SGLang servers (connected or launched)."""
    if rollout.engine == "native":
        from tapo_megatron.rollout.native import NativeEngine

        return NativeEngine(shape.to_hf(), seed=seed, num_threads=rollout.num_threads)
    from tapo_megatron.rollout.sglang import ServerLaunch, SGLangEngine, sglang_server_argv

    timeouts = dict(startup_timeout_s=rollout.engine_startup_timeout_s,
                    request_timeout_s=rollout.engine_request_timeout_s)
    if rollout.engine_urls:
        return SGLangEngine.connect(rollout.engine_urls, **timeouts)
    if not rollout.engine_model_path:
        raise ConfigError("rollout.engine='sglang' needs rollout.engine_urls or rollout.engine_model_path")
    argv = sglang_server_argv(rollout.engine_model_path, random_seed=seed, extra=rollout.engine_server_args)
    return SGLangEngine.launch([ServerLaunch(argv=argv) for _ in range(rollout.num_engines)], **timeouts)


def build_tokenizer(model: ModelConfig):
    return load_tokenizer(model.tokenizer)


def reflection_detector(data: DataConfig) -> ReflectionDetector:
    """The arithmetic task marks a self-correction with one character; real math text uses phrases."""
    if data.task == "arithmetic":
        return ReflectionDetector(patterns=[], markers=[CORRECTION_MARKER])
    return ReflectionDetector()


def torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


@dataclass
class PolicySource:
    """A rollout engine serving a checkpoint, plus what provenance records need about it."""

    engine: object  # a RolloutEngine
    model_name: str  # the checkpoint path as given (or "random-init")
    model_version: str  # "iter_<N>" for a Megatron checkpoint, "sha256:<12 hex>" of the weight files for an HF dir
    tokenizer_dir: Path | None  # tokenizer files shipped with the checkpoint, if any


def _is_megatron_checkpoint(path: Path) -> bool:
    from tapo_megatron.training.actor import has_checkpoint

    return has_checkpoint(path) or ((path / "model").is_dir() and (path / "hf_config.json").is_file())


def _weights_fingerprint(hf_dir: Path) -> str:
    """A cheap content fingerprint of an HF dir: config.json, plus size and first MiB of every weight file."""
    import hashlib

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

    A Megatron checkpoint is streamed to a temporary HF directory with ``convert.cli.mcore_to_hf`` (one layer in
    memory at a time) and loaded from there, so both kinds reach the engine through the same HF loader.
    Only the native engine loads checkpoints in-process; ``rollout.engine="sglang"`` is refused by name.
    """
    import tempfile

    if rollout.engine != "native":
        raise ConfigError(f"rollout.engine={rollout.engine!r} is not available in this environment (native only)")
    from tapo_megatron.rollout.native import NativeEngine

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model {str(path)!r}: no such HF directory or Megatron checkpoint")
    if (path / "config.json").is_file():
        engine = NativeEngine.from_pretrained(path, dtype=dtype, seed=seed, num_threads=rollout.num_threads)
        return PolicySource(engine, str(path), _weights_fingerprint(path), path if _has_tokenizer(path) else None)
    if not _is_megatron_checkpoint(path):
        raise FileNotFoundError(f"model {str(path)!r} is neither an HF directory (config.json) nor a Megatron "
                                "checkpoint (state.json / latest_checkpointed_iteration.txt / model + hf_config.json)")
    from tapo_megatron.convert.cli import mcore_to_hf
    from tapo_megatron.training.actor import has_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(path) if has_checkpoint(path) else path
    version = ckpt.name if ckpt.name.startswith("iter_") else "mcore"
    with tempfile.TemporaryDirectory(prefix="tapo-policy-") as tmp:
        hf_dir = mcore_to_hf(ckpt, Path(tmp) / "hf")
        engine = NativeEngine.from_pretrained(hf_dir, dtype=dtype, seed=seed, num_threads=rollout.num_threads)
    assets = ckpt / "hf_assets"
    return PolicySource(engine, str(path), version, assets if _has_tokenizer(assets) else None)
