"""Difficulty-aware Candidate Selection (DCS) and the wrong/correct pairing of TAPO (spec steps 3-4).

Two filters, kept apart on purpose:

- ``is_candidate(rewards, n_pos, n_neg)``: the ONLINE gate, per query and per RL step, on the K rewards of that
  step's rollouts: construct only when |P| >= n_pos correct and |N| >= n_neg wrong (defaults 2 and 4 of 8).
- ``zpd_filter(accuracies_or_counts, k)``: the OFFLINE dataset filter ("zone of proximal development"), run once
  before training on K samples per query: keep queries whose accuracy lies in [low, high] = [12.5 %, 87.5 %].

``select_pairs(rollouts, m_max, rng)`` then draws up to m_max wrong rollouts of a candidate, each paired with a
correct rollout of the same group (the policy's own correct answer, never the gold solution).

A rollout counts as correct when its reward is > 0.5 (binary verifier rewards are 0.0 / 1.0).
"""
from __future__ import annotations

import numbers
import random
from collections.abc import Sequence

from tapo_megatron.records import Rollout

__all__ = ["CORRECT_THRESHOLD", "is_correct", "is_candidate", "zpd_filter", "select_pairs"]

CORRECT_THRESHOLD = 0.5  # reward > this counts as correct
_ZPD_TOLERANCE = 1e-9  # accuracies computed as means may differ from 1/8, 7/8 by float round-off


def is_correct(reward: float) -> bool:
    return reward > CORRECT_THRESHOLD


def is_candidate(rewards: Sequence[float], n_pos: int, n_neg: int) -> bool:
    """The online DCS gate: True iff at least ``n_pos`` rewards are correct (> 0.5) and at least ``n_neg`` are not.

    Args:
        rewards: the K rewards of one query's rollouts in this step.
        n_pos, n_neg: minimum numbers of correct and wrong rollouts (both >= 1: a pair needs one of each).

    ``[1, 1, 0, 0, 0, 0, 0, 0]`` with (2, 4) -> True; ``[1, 0, 0, 0, 0, 0, 0, 0]`` -> False (one correct).
    """
    if n_pos < 1 or n_neg < 1:
        raise ValueError(
            f"n_pos={n_pos} and n_neg={n_neg} must both be >= 1 (a pair needs a correct and a wrong rollout)"
        )
    n_correct = sum(1 for r in rewards if is_correct(r))
    return n_correct >= n_pos and len(rewards) - n_correct >= n_neg


def zpd_filter(
    accuracies_or_counts: Sequence[float] | Sequence[int], k: int, low: float = 0.125, high: float = 0.875
) -> list[bool]:
    """The offline ZPD dataset filter: which queries to keep, given K samples each.

    Args:
        accuracies_or_counts: one value per query. If every value is an integer (Python or NumPy int, not bool)
            they are numbers of correct samples out of ``k`` (0..k); otherwise accuracies in [0, 1].
        k: samples per query (counts are divided by it; also bounds-checks the counts).
        low, high: inclusive accuracy bounds (defaults 1/8 and 7/8, i.e. 1 to 7 correct of 8).

    Returns:
        One bool per query: True = keep (low <= accuracy <= high). With k = 8: counts 1..7 kept, 0 and 8 dropped.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    values = list(accuracies_or_counts)
    as_counts = bool(values) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values
    )
    keep: list[bool] = []
    for i, v in enumerate(values):
        if as_counts:
            if not 0 <= v <= k:
                raise ValueError(f"accuracies_or_counts[{i}] = {v}: a count of correct samples must be in [0, {k}]")
            acc = int(v) / k
        else:
            acc = float(v)
            if not 0.0 <= acc <= 1.0:  # also rejects NaN
                raise ValueError(f"accuracies_or_counts[{i}] = {v}: an accuracy must be in [0, 1]")
        keep.append(low - _ZPD_TOLERANCE <= acc <= high + _ZPD_TOLERANCE)
    return keep


def select_pairs(rollouts: Sequence[Rollout], m_max: int, rng: random.Random) -> list[tuple[Rollout, Rollout]]:
    """Pair up to ``m_max`` wrong rollouts of one query with correct ones from the same group.

    Args:
        rollouts: all rollouts of ONE query in this step (same query_id).
        m_max: at most this many wrong rollouts are used; when there are more, ``m_max`` of them are drawn without
            replacement (then kept in rollout order).
        rng: the caller's seeded generator; the result depends only on the rollouts' order and rng's state.

    Returns:
        ``[(wrong, correct), ...]``, one per chosen wrong rollout, ``correct`` drawn uniformly (with replacement
        across pairs) from the group's correct rollouts. Empty when the group has no correct or no wrong rollout.
    """
    if m_max < 1:
        raise ValueError(f"m_max must be >= 1, got {m_max}")
    if len({r.query_id for r in rollouts}) > 1:
        ids = sorted({r.query_id for r in rollouts})
        raise ValueError(f"select_pairs takes the rollouts of one query, got query ids {ids}")
    correct = [r for r in rollouts if is_correct(r.reward)]
    wrong = [r for r in rollouts if not is_correct(r.reward)]
    if not correct or not wrong:
        return []
    if len(wrong) > m_max:
        chosen = sorted(rng.sample(range(len(wrong)), m_max))
        wrong = [wrong[i] for i in chosen]
    return [(w, rng.choice(correct)) for w in wrong]
