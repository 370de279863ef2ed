"""Exact-answer reward for the demo arithmetic task.

The demo response is a chain of steps ending in ``A<integer>`` and then end-of-sequence, e.g.
``"5*3=15;7+15=22;22-4=18;A18"`` for gold ``"18"``. Input: the decoded response (EOS token not included) and the
gold integer as a string. Output: 1.0 iff the text after the last ``A`` is exactly the gold integer (surrounding
whitespace allowed), else 0.0. Text after the answer (a response that ran on instead of stopping) scores 0.0.
"""
from __future__ import annotations

import re

from tapo_megatron.rewards.registry import register_reward

_INTEGER = re.compile(r"[+-]?\d+")


@register_reward("exact")
def exact_answer_reward(response: str, gold: str) -> float:
    """1.0 iff the integer after the last ``A`` in ``response`` equals ``gold`` exactly (as a string), else 0.0.

    ``"…;A18"`` vs ``"18"`` -> 1.0; ``"…;A018"``, ``"…;A18;5"``, ``"…;A"``, no ``A`` -> 0.0. Never raises on a
    bad response; raises ValueError if ``gold`` is not an integer string (a data bug, not a model error).
    """
    gold_text = gold.strip() if isinstance(gold, str) else gold
    if not isinstance(gold_text, str) or not _INTEGER.fullmatch(gold_text):
        raise ValueError(f"exact_answer_reward: gold must be an integer string such as '18', got {gold!r}")
    if not isinstance(response, str):
        return 0.0
    answer_start = response.rfind("A")
    if answer_start < 0:
        return 0.0
    answer = response[answer_start + 1 :].strip()
    # Compare the strings, not int(answer): the task writes integers canonically, so "018" or "+18" is wrong output.
    return 1.0 if answer == gold_text else 0.0
