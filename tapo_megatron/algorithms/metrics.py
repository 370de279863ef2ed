"""Evaluation metrics: unbiased pass@k, pass@1, DSR, ERR, first-attempt correctness, spurious reflections.

    pass_at_k(n, c, k)   = 1 - C(n - c, k) / C(n, k)     (n samples of one problem, c of them correct)
    DSR = #(correct and not reflective) / #correct          "of the correct responses, the share with no reflection"
    ERR = #(reflective and correct) / #reflective           "of the reflective responses, the share that end correct"
    first-attempt = #(clean first attempt and correct) / #responses
    spurious = #(reflective and clean first attempt) / #reflective

The first attempt of a response is its text before the first reflection (all of it when it has none); it is clean
when it contains no faulty step (exact on the arithmetic task, whose step checker says so; see
``evaluation.core.evaluate`` for tasks without one). DSR only counts how often the marker is written; first-attempt
correctness asks whether the model got it right before reflecting, and a spurious reflection is one that follows a
clean attempt (nothing to correct).

Rates whose denominator is 0 (no correct response for DSR, no reflective response for ERR) are undefined and
returned as float('nan'); print them with :func:`format_rate`, which writes "n/a".
Reflection itself is decided by ``tapo_megatron.algorithms.reflection.ReflectionDetector``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "pass_at_k",
    "mean_pass_at_k",
    "pass_at_1",
    "direct_solution_rate",
    "effective_reflection_rate",
    "first_attempt_rate",
    "spurious_reflection_rate",
    "format_rate",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: the probability that k of the n samples, drawn without replacement,
    contain at least one correct one.

    Uses the product form 1 - prod_{i=n-c+1}^{n} (1 - k / i), which equals 1 - C(n-c, k) / C(n, k) without the huge
    binomials. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {v!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(results: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over problems; ``results`` holds one (n, c) pair per problem."""
    if len(results) == 0:
        raise ValueError("mean_pass_at_k: no problems given")
    return sum(pass_at_k(n, c, k) for n, c in results) / len(results)


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Pass@1 as the mean over samples: per problem the share of its samples that are correct, averaged over
    problems (so each problem weighs the same whatever its sample count). ``correct[p][s]`` is sample s of problem p.
    """
    if len(correct) == 0:
        raise ValueError("pass_at_1: no problems given")
    total = 0.0
    for p, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"pass_at_1: problem {p} has no samples")
        total += sum(bool(s) for s in samples) / len(samples)
    return total / len(correct)


def _check_pairs(fn: str, first: Sequence[bool], second: Sequence[bool],
                 names: tuple[str, str] = ("correct", "reflective")) -> None:
    if len(first) != len(second):
        raise ValueError(f"{fn}: {names[0]} has {len(first)} entries but {names[1]} has {len(second)}")


def direct_solution_rate(correct: Sequence[bool], reflective: Sequence[bool]) -> float:
    """DSR: of the correct responses, the share that contain no reflection. NaN when no response is correct.

    ``correct[i]`` and ``reflective[i]`` describe response i (pool all responses of all problems of a benchmark).
    """
    _check_pairs("direct_solution_rate", correct, reflective)
    n_correct = sum(bool(c) for c in correct)
    if n_correct == 0:
        return float("nan")
    return sum(bool(c) and not bool(r) for c, r in zip(correct, reflective)) / n_correct


def effective_reflection_rate(correct: Sequence[bool], reflective: Sequence[bool]) -> float:
    """ERR: of the responses that contain a reflection, the share that end correct. NaN when none reflects."""
    _check_pairs("effective_reflection_rate", correct, reflective)
    n_reflective = sum(bool(r) for r in reflective)
    if n_reflective == 0:
        return float("nan")
    return sum(bool(c) and bool(r) for c, r in zip(correct, reflective)) / n_reflective


def first_attempt_rate(correct: Sequence[bool], clean_first_attempt: Sequence[bool]) -> float:
    """Of all responses, the share whose first attempt is clean and that end correct. NaN when there are none."""
    _check_pairs("first_attempt_rate", correct, clean_first_attempt, ("correct", "clean_first_attempt"))
    if not correct:
        return float("nan")
    return sum(bool(c) and bool(f) for c, f in zip(correct, clean_first_attempt)) / len(correct)


def spurious_reflection_rate(reflective: Sequence[bool], clean_first_attempt: Sequence[bool]) -> float:
    """Of the reflective responses, the share whose attempt before the first reflection was clean. NaN when none
    reflects."""
    _check_pairs("spurious_reflection_rate", reflective, clean_first_attempt, ("reflective", "clean_first_attempt"))
    n_reflective = sum(bool(r) for r in reflective)
    if n_reflective == 0:
        return float("nan")
    return sum(bool(r) and bool(f) for r, f in zip(reflective, clean_first_attempt)) / n_reflective


def format_rate(value: float, digits: int = 1) -> str:
    """A rate in [0, 1] as a percentage string, "n/a" for NaN (an undefined rate)."""
    if math.isnan(value):
        return "n/a"
    return f"{100.0 * value:.{digits}f}"
