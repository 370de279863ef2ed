"""Stage (2): verifiers that turn a response and a gold answer into a binary reward.

    Rollout.response_text, Query.answer --reward_fn--> Rollout.reward (1.0 correct, 0.0 wrong)

- ``math_reward`` / ``MathVerifier``: real math data (AIME, HMMT, MATH) via math_verify, in a process pool with a
  hard per-item deadline; ``MathVerifier.score_batch`` scores a whole step's rollouts.
- ``exact_answer_reward``: the demo task's ``A<integer>`` answer.
- ``register_reward`` / ``get_reward``: the registry ("math", "exact", or a "pkg.module:function" plug-in);
  ``score_batch(reward_fn, responses, golds)`` scores a step's rollouts, batched through the pool for "math".
"""
from tapo_megatron.rewards.registry import (  # noqa: I001  (first: the verifiers register into it)
    RewardFn,
    available_rewards,
    get_reward,
    register_reward,
    score_batch,
)
from tapo_megatron.rewards.boxed import extract_boxed, find_boxed
from tapo_megatron.rewards.exact import exact_answer_reward
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
    "exact_answer_reward",
    "extract_boxed",
    "find_boxed",
    "get_reward",
    "math_reward",
    "math_reward_batch",
    "register_reward",
    "score_batch",
    "verify_math_answer",
]
