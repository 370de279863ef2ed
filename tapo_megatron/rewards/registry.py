"""Reward functions by name: the one place users plug in their own verifier.

Every reward has one signature, ``RewardFn = (response: str, gold: str) -> float``. Built-in names:
``"math"`` (``math_reward``, math_verify in a deadline pool) and ``"exact"`` (``exact_answer_reward``, the demo
task's ``A<integer>`` answer). A name containing ``":"`` is a dotted import path to a user plug-in,
``"my_pkg.my_module:my_reward"``, imported on lookup.

    @register_reward("my_reward")
    def my_reward(response: str, gold: str) -> float: ...

    reward_fn = get_reward(config.data.reward)   # "math", "exact", "my_reward" or "my_pkg.mod:fn"
    rewards = score_batch(reward_fn, responses, golds)   # uses reward_fn.score_batch if it has one
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Sequence

RewardFn = Callable[[str, str], float]  # (response text, gold answer) -> reward; 1.0 correct, 0.0 wrong

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``. Raises ValueError on a duplicate or malformed name."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty str without ':' (':' marks import paths), got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(
                f"reward {name!r} is already registered (by {_describe(_REGISTRY[name])}); pick another name"
            )
        _check_signature(fn, name)
        _REGISTRY[name] = fn
        return fn

    return decorator


def available_rewards() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def get_reward(name: str) -> RewardFn:
    """The reward function for a registered ``name`` or a ``"pkg.module:function"`` import path.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
        ImportError / AttributeError: the import path's module or function does not exist.
        TypeError: the object found is not callable as ``fn(response, gold)``.
    """
    if ":" in name:
        return _import_reward(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown reward {name!r}; registered: {available_rewards()}, "
            "or give an import path 'pkg.module:function'"
        ) from None


def score_batch(reward_fn: RewardFn, responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    """Rewards for ``zip(responses, golds)``: ``reward_fn.score_batch(responses, golds)`` when the function offers
    a batched path (``math_reward`` does: its pool's workers run in parallel), else one call per pair."""
    if len(responses) != len(golds):
        raise ValueError(f"responses has {len(responses)} items but golds has {len(golds)}")
    batched = getattr(reward_fn, "score_batch", None)
    if callable(batched):
        return [float(x) for x in batched(responses, golds)]
    return [float(reward_fn(r, g)) for r, g in zip(responses, golds)]


def _import_reward(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward import path must look like 'pkg.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward import path {path!r}: cannot import module {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):  # allows "module:Class.method"
        if not hasattr(obj, part):
            raise AttributeError(f"reward import path {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    _check_signature(obj, path)
    return obj


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
