"""Builds the pieces a run needs from its config: parallel context, model shape, tokenizer, queries, actor, engine.

Shared by the RL loop (train.py), cold-start SFT (sft.py) and evaluation, so every entry point builds them alike.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tapo_megatron.config import ConfigError, DataConfig, ModelConfig, RolloutConfig, TrainConfig
from tapo_megatron.data.queries import load_queries
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.models.qwen3 import Qwen3Shape, check_parallel
from tapo_megatron.parallel import ParallelContext, init_parallel
from tapo_megatron.records import Query
from tapo_megatron.tasks.arithmetic import ArithmeticTask


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
    check_parallel(shape, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   world_size=None if not _under_torchrun() else int(__import__("os").environ["WORLD_SIZE"]))
    return init_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=cfg.seed)


def _under_torchrun() -> bool:
    import os

    return "WORLD_SIZE" in os.environ


@dataclass
class Queries:
    train: list[Query]
    evals: dict[str, list[Query]]  # benchmark name -> queries


def load_task_queries(data: DataConfig, tokenizer, seed: int) -> Queries:
    if data.task == "arithmetic":
        task = ArithmeticTask()
        return Queries(train=task.generate_split(data.num_train_problems, seed, "train"),
                       evals={"heldout": task.generate_split(data.num_eval_problems, seed + 1, "heldout")})
    train = load_queries(data.train_file, on_error=data.on_bad_row, tokenizer=tokenizer).queries
    evals = {Path(f).stem: load_queries(f, on_error=data.on_bad_row, tokenizer=tokenizer).queries
             for f in data.eval_files}
    return Queries(train=train, evals=evals)


def build_engine(rollout: RolloutConfig, shape: Qwen3Shape, seed: int):
    if rollout.engine == "native":
        from tapo_megatron.rollout.native import NativeEngine

        return NativeEngine(shape.to_hf(), seed=seed, num_threads=rollout.num_threads)
    raise ConfigError(f"rollout.engine={rollout.engine!r} is not available in this environment (native only)")


def build_tokenizer(model: ModelConfig):
    return load_tokenizer(model.tokenizer)


def torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
