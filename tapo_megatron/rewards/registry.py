"""Reward functions by name: the one place users plug in their own verifier.

Every reward has one signature, ``RewardFn = (response: str, gold: str) -> float``. Built-in names:
``"math"`` (``math_reward``, math_verify in a deadline pool); tasks register their own (the arithmetic task's
``"exact"``, in ``tasks/arithmetic/reward.py``). A name containing ``":"`` is a dotted import path to a user plug-in,
``"my_pkg.my_module:my_reward"``, imported on lookup.

    @register_reward("my_reward")
    def my_reward(response: str, gold: str) -> float: ...

    reward_fn = get_reward(config.data.reward)   # "math", "exact", "my_reward" or "my_pkg.mod:fn"
    rewards = score_batch(reward_fn, responses, golds)   # rewards.scoring: reward_fn.score_batch if it has one
"""
from __future__ import annotations

import inspect
from typing import Callable

from tapo_megatron.registry import Registry

RewardFn = Callable[[str, str], float]  # (response text, gold answer) -> reward; 1.0 correct, 0.0 wrong

def _check_signature(fn: object, name: str) -> None:
    """Fail at registration/lookup, not mid-training, if ``fn`` cannot be called as ``fn(response, gold)``."""
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {fn!r} is not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no signature; trust them
    try:
        signature.bind("response", "gold")
    except TypeError as exc:
        raise TypeError(
            f"reward {name!r}: {_describe(fn)}{signature} cannot be called as fn(response: str, gold: str): {exc}"
        ) from exc


def _describe(fn: object) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


REWARDS: Registry[RewardFn] = Registry("reward", check=_check_signature)
register_reward = REWARDS.register  # decorator: @register_reward("name"); duplicates and ':' in names refused
get_reward = REWARDS.get  # a registered name or "pkg.module:function"; unknown names list the registered ones
available_rewards = REWARDS.names
