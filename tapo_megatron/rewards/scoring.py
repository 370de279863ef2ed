"""The one scoring path: a whole step's (or benchmark's) responses in one call, through the verifier's pool.

    score_rollouts(rollouts, queries, reward_fn)    # sets Rollout.reward for every rollout, in one batch
    score_batch(reward_fn, responses, golds)        # the same for plain texts

Used by the RL loop, evaluation and the cold-start build alike, so the math verifier's process pool always gets the
whole batch at once (never one item per call).
"""
from __future__ import annotations

from typing import Sequence

from tapo_megatron.records import Query, Rollout
from tapo_megatron.rewards.registry import RewardFn


def score_batch(reward_fn: RewardFn, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    """Rewards for ``zip(responses, golds)``: ``reward_fn.score_batch(responses, golds)`` when the function offers
    a batched path (``math_reward`` does: its pool's workers run in parallel), else one call per pair."""
    if len(responses) != len(golds):
        raise ValueError(f"responses has {len(responses)} items but golds has {len(golds)}")
    batched = getattr(reward_fn, "score_batch", None)
    if callable(batched):
        return [float(x) for x in batched(responses, golds)]
    return [float(reward_fn(r, g)) for r, g in zip(responses, golds)]




def score_rollouts(rollouts: Sequence[Rollout], queries: Sequence[Query], reward_fn: RewardFn) -> list[float]:
    """Score every rollout against its query's gold answer in one batch; sets and returns ``Rollout.reward``."""
    gold = {q.id: q.answer for q in queries}
    rewards = score_batch(reward_fn, [r.response_text for r in rollouts], [gold[r.query_id] for r in rollouts])
    for r, reward in zip(rollouts, rewards):
        r.reward = reward
    return rewards
