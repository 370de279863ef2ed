"""Rollout engines: token prompts -> sampled responses with per-token log-probs; weights in from the actor.

``RolloutEngine`` (base.py) is the interface; ``NativeEngine`` (native.py) runs HF transformers on CPU or one GPU.
"""
from tapo_megatron.rollout.base import (
    RolloutEngine,
    WeightSpec,
    WeightUpdateError,
    check_prompts,
    check_sampling_params,
    stage_weight_buckets,
)
from tapo_megatron.rollout.native import NativeEngine

__all__ = [
    "NativeEngine",
    "RolloutEngine",
    "WeightSpec",
    "WeightUpdateError",
    "check_prompts",
    "check_sampling_params",
    "stage_weight_buckets",
]
