"""A strict boxed-answer math reward: 1.0 only for a response with exactly one ``\\boxed{...}`` that math-verify
accepts against the gold answer.

Why stricter than the built-in ``"math"`` reward: ``math_reward`` reads the *last* box, so a policy can learn to hedge
(``\\boxed{3} ... or maybe \\boxed{4}``) and still be paid when the last guess is right; and without any box it falls
back to the last answer-like expression. Here a response must commit to one boxed answer.

Plug it in from a recipe or the command line, by import path (with the repository root on ``sys.path``) or, once
this module is imported, by its registered name:

    data.reward=examples.reward:strict_boxed_reward
    data.reward=strict_boxed

Signature to keep (``tapo_megatron.rewards.RewardFn``): ``(response: str, gold: str) -> float``, never raising on a
bad response. The optional ``score_batch(responses, golds) -> list[float]`` attribute is the batched path that
``rewards.scoring.score_batch`` uses when present (here: all verifications of a step through the pool at once).
"""
from __future__ import annotations

import re
from typing import Sequence

from tapo_megatron.rewards import math_reward, math_reward_batch, register_reward
from tapo_megatron.rewards.boxed import boxed_spans

# Every box opener, complete or not; the same pattern rewards.boxed matches its boxes with.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def has_single_box(response: object) -> bool:
    """True when ``response`` is a str with exactly one complete outermost box and no other box opener.

    ``boxed_spans`` skips boxes whose braces never close, so ``"\\boxed{3} ... \\boxed{4"`` has one complete box;
    counting the openers outside it rejects that hedge too. A box nested inside the one box (``\\boxed{\\boxed{5}}``)
    is part of its content and allowed (math_verify sees the unwrapped ``5``).
    """
    if not isinstance(response, str):
        return False
    spans = boxed_spans(response)
    if len(spans) != 1:
        return False
    start, end = spans[0]
    openers_inside = len(_BOX_OPEN.findall(response, start, end))
    return len(_BOX_OPEN.findall(response)) - openers_inside == 1


@register_reward("strict_boxed")
def strict_boxed_reward(response: str, gold: str) -> float:
    """1.0 iff ``response`` has exactly one boxed answer (``has_single_box``) and it equals ``gold`` mathematically.

    The comparison is ``math_reward``'s (math_verify in the default ``MathVerifier`` pool, with its per-item
    deadline); with a single box, its "last box" is the only box. Garbage, non-str input or a gold that does not
    parse give 0.0, never an exception.
    """
    if not isinstance(gold, str) or not has_single_box(response):
        return 0.0
    return float(math_reward(response, gold))


def strict_boxed_reward_batch(responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    """``[strict_boxed_reward(r, g) ...]``, but the responses that pass the box check go to the pool in one batch
    (its workers run in parallel: one call per item would verify them one at a time)."""
    scores = [0.0] * len(responses)
    keep = [i for i, (r, g) in enumerate(zip(responses, golds)) if isinstance(g, str) and has_single_box(r)]
    if keep:
        verified = math_reward_batch([responses[i] for i in keep], [golds[i] for i in keep])
        for i, score in zip(keep, verified):
            scores[i] = float(score)
    return scores


strict_boxed_reward.score_batch = strict_boxed_reward_batch  # picked up by rewards.scoring.score_batch
