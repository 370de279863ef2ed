"""Stage (2): verifiers that turn a response and a gold answer into a binary reward.

    Rollout.response_text, Query.answer --reward_fn--> Rollout.reward (1.0 correct, 0.0 wrong)

- ``math_reward`` / ``MathVerifier``: real math data (AIME, HMMT, MATH) via math_verify, in a process pool with a
  hard per-item deadline; ``MathVerifier.score_batch`` scores a whole step's rollouts.
- ``register_reward`` / ``get_reward``: the registry ("math", a task's own such as the arithmetic task's "exact",
  or a "pkg.module:function" plug-in);
- ``score_rollouts`` / ``score_batch``: a step's rollouts in one batch, through the pool for "math".
"""
from tapo_megatron.rewards.registry import (  # noqa: I001  (first: the verifiers register into it)
    RewardFn,
    available_rewards,
    get_reward,
    register_reward,
)
from tapo_megatron.rewards.scoring import score_batch, score_rollouts
from tapo_megatron.rewards.boxed import extract_boxed, find_boxed
from tapo_megatron.rewards.math_verifier import (
    MathVerifier,
    close_default_verifier,
    configure_default_verifier,
    default_verifier,
    math_reward,
    math_reward_batch,
    verify_math_answer,
)
from tapo_megatron.rewards.pool import PoolStats, VerificationPool

__all__ = [
    "MathVerifier",
    "PoolStats",
    "RewardFn",
    "VerificationPool",
    "available_rewards",
    "close_default_verifier",
    "configure_default_verifier",
    "default_verifier",
    "extract_boxed",
    "find_boxed",
    "get_reward",
    "math_reward",
    "math_reward_batch",
    "register_reward",
    "score_batch",
    "score_rollouts",
    "verify_math_answer",
]
