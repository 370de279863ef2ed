"""Binary math reward for real data (AIME, HMMT, MATH, DeepScaleR), built on math_verify 0.9.0.

Inputs: a model response (free text, any length, possibly garbage) and a gold answer as the datasets store it
(``"204"``, ``"\\frac{9 \\sqrt{23}}{23}"``, ``"2^{25} \\cdot 26!"``, the two-value
``"\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}"``). Output: 1.0 if the response's final answer equals the
gold answer mathematically, else 0.0. Never raises on bad text.

How the response's answer is found:
1. the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), parsed as LaTeX; if the gold has
   several values (a set) and the response boxed them one per box, the last that-many boxes are also tried as a
   list; a single ``\\pm`` / ``\\mp`` is also tried as the two values it denotes;
2. with no box, math_verify's own extraction of the last answer-like expression in the last
   ``FALLBACK_TAIL_CHARS`` characters.
Lists compare as sets (order-insensitive, same values); ``\\frac{1}{2}``, ``1/2`` and ``0.5`` are equal.

Time limit: math_verify's timeouts use ``signal.alarm`` (which raises outside the main thread), so they are switched
off (``parsing_timeout=None``, ``timeout_seconds=None``) and every verification runs in a ``VerificationPool``
worker with a hard deadline instead; a hung worker is killed and replaced and the item scores 0.0.

    from tapo_megatron.rewards import math_reward, MathVerifier
    math_reward("... so the answer is \\boxed{\\frac{1}{2}}", "0.5")          # 1.0, via a lazily created pool
    with MathVerifier(num_workers=4, timeout_s=5.0) as verifier:             # explicit pool for batch scoring
        rewards = verifier.score_batch(responses, golds)
"""
from __future__ import annotations

import logging
import os
import re
import threading
from functools import lru_cache
from typing import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import FiniteSet

from tapo_megatron.rewards.boxed import find_boxed
from tapo_megatron.rewards.pool import VerificationPool, WorkerFn
from tapo_megatron.rewards.registry import register_reward

logger = logging.getLogger(__name__)

# Without a box, only the end of a response is searched: the final answer is there, and math_verify's regexes
# over 100 kB of text cost ~0.1 s per response.
FALLBACK_TAIL_CHARS = 4000

_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![A-Za-z])")  # \pm or \mp, but not \pmod


def _as_math(latex: str) -> str:
    """Wrap bare LaTeX in ``$...$`` (math_verify only reads LaTeX inside math delimiters)."""
    return "$" + latex.replace("$", " ").strip() + "$"


def _parse(text: str) -> list:
    return parse(text, extraction_config=_EXTRACTION, parsing_timeout=None)


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> list:
    """Parse a dataset gold answer (cached: the K responses of a group share it). Empty list if unparseable.

    A gold that contains a box (some datasets store ``\\boxed{...}``) is reduced to the box's content first.
    """
    boxes = find_boxed(gold)
    parsed = _parse(_as_math(boxes[-1] if boxes else gold))
    if not parsed:  # logged once per gold and worker, thanks to the cache
        logger.warning("gold answer %.200r could not be parsed; every response to it scores 0.0", gold)
    return parsed


def _num_values(parsed_gold: list) -> int:
    """How many values the gold lists (1 unless it parsed to a set such as HMMT #10's two roots)."""
    if parsed_gold and isinstance(parsed_gold[0], FiniteSet):
        return max(1, len(parsed_gold[0].args))
    return 1


def _expand_plus_minus(latex: str) -> str | None:
    """``\\frac{-1\\pm\\sqrt{17}}{2}`` -> ``\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}``; None unless exactly
    one ``\\pm`` / ``\\mp`` occurs (more than one is ambiguous)."""
    matches = _PLUS_MINUS.findall(latex)
    if len(matches) != 1:
        return None
    first, second = ("+", "-") if matches[0] == "\\pm" else ("-", "+")
    return f"{_PLUS_MINUS.sub(first, latex)}, {_PLUS_MINUS.sub(second, latex)}"


def verify_math_answer(response: str, gold: str) -> float:
    """Score one response against one gold answer in the current process (no time limit of its own).

    This is the default worker function of ``MathVerifier``; call ``math_reward`` or a ``MathVerifier`` instead,
    which add the deadline. Returns 1.0 or 0.0.
    """
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return 0.0
    boxes = find_boxed(response)
    if not boxes:
        predicted = _parse(response[-FALLBACK_TAIL_CHARS:])
        return 1.0 if verify(gold_parsed, predicted, timeout_seconds=None) else 0.0
    candidates = [boxes[-1]]
    expanded = _expand_plus_minus(boxes[-1])
    if expanded is not None:
        candidates.append(expanded)
    num_values = _num_values(gold_parsed)
    if num_values > 1 and len(boxes) >= num_values:
        candidates.append(", ".join(boxes[-num_values:]))  # "\boxed{a} and \boxed{b}"
    for candidate in candidates:
        if verify(gold_parsed, _parse(_as_math(candidate)), timeout_seconds=None):
            return 1.0
    return 0.0


def _init_worker() -> None:
    # math_verify warns once per process that its own timeout is off; the pool's deadline replaces it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


class MathVerifier(VerificationPool):
    """A pool of math-verification workers with a per-item deadline.

    Args:
        num_workers: worker processes (default ``min(4, os.cpu_count())``); ~600-1000 verifications/s each.
        timeout_s: wall-clock limit per verification; a worker past it is killed and replaced, the item scores 0.0.
        batch_timeout_s: wall-clock limit of one ``score_batch`` (a training step's rewards); default
            ``2 * timeout_s``: a step of hanging responses costs at most that, not one timeout per item.
        worker_fn: the per-item function, ``verify_math_answer`` by default; injectable (module-level, picklable)
            so tests can make a worker hang.
        start_method: see ``VerificationPool``.

    Use as a context manager or call ``close()``. ``score(response, gold)`` and
    ``score_batch(responses, golds) -> list[float]`` never raise on bad text.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        *,
        worker_fn: WorkerFn = verify_math_answer,
        start_method: str = "forkserver",
        batch_timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            worker_fn,
            num_workers=num_workers,
            timeout_s=timeout_s,
            start_method=start_method,
            initializer=_init_worker,
            preload=(__name__,),  # replacements fork from a server that has sympy and math_verify imported
            batch_timeout_s=batch_timeout_s or 2 * timeout_s,
        )


# -- the module-level default used by math_reward -------------------------------------------------------------------

_default: MathVerifier | None = None
_default_pid: int | None = None
_default_settings: dict = {"num_workers": None, "timeout_s": 5.0, "batch_timeout_s": None}
_default_lock = threading.Lock()


def configure_default_verifier(num_workers: int | None = None, timeout_s: float = 5.0,
                               batch_timeout_s: float | None = None) -> None:
    """Set the pool size, per-item deadline and batch (step) deadline (None: 2 x timeout_s) of the verifier behind
    ``math_reward`` (restarts it if running)."""
    global _default
    with _default_lock:
        _default_settings.update(num_workers=num_workers, timeout_s=timeout_s, batch_timeout_s=batch_timeout_s)
        if _default is not None:
            _default.close()
            _default = None


def default_verifier() -> MathVerifier:
    """The shared ``MathVerifier``, created on first use (and again in a forked child, whose copy has no workers)."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default.closed or _default_pid != os.getpid():
            _default = MathVerifier(**_default_settings)
            _default_pid = os.getpid()
        return _default


def close_default_verifier() -> None:
    """Stop the default verifier's workers (a later ``math_reward`` call starts a new one)."""
    global _default
    with _default_lock:
        if _default is not None and _default_pid == os.getpid():
            _default.close()
        _default = None


@register_reward("math")
def math_reward(response: str, gold: str) -> float:
    """1.0 if ``response``'s final answer equals ``gold`` mathematically, else 0.0 (see the module docstring).

    Runs in the default ``MathVerifier`` pool with its deadline. Never raises on bad text (garbage, empty,
    non-str, unbalanced braces, a hanging expression); raises RuntimeError only if no worker process can start.
    """
    return default_verifier().score(response, gold)


def math_reward_batch(responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    """``[math_reward(r, g) for r, g in zip(responses, golds)]``, but all workers of the default pool in parallel."""
    return default_verifier().score_batch(responses, golds)


math_reward.score_batch = math_reward_batch  # the batched path that registry.score_batch uses
