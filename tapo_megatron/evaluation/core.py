"""Evaluation: greedy accuracy, Pass@1 / Pass@k over n samples, DSR, ERR, first-attempt correctness, spurious
reflections.

The same function runs on the demo's held-out split, on AIME/HMMT files, and every N steps during RL.
Per-sample rows (``EvalSample``: response, extracted ``\boxed{}`` answer, correct, reflective) can be written to
JSONL; the summary is a flat dict of floats (NaN where undefined). ``tapo eval`` (``benchmarks.run_eval``) calls this once per
benchmark; the RL loop calls it every ``eval_interval`` steps.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from tapo_megatron.algorithms.metrics import (direct_solution_rate, effective_reflection_rate, first_attempt_rate,
                                              mean_pass_at_k, spurious_reflection_rate)
from tapo_megatron.algorithms.reflection import ReflectionDetector
from tapo_megatron.records import Query, Rollout, SamplingParams
from tapo_megatron.rewards import extract_boxed, score_rollouts
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.rollout.sampling import sample_groups


@dataclass
class EvalSample:
    query_id: str
    sample: int  # -1 for the greedy sample
    response: str
    extracted_answer: str | None  # content of the last \boxed{} (None: no box; the verifier may still read the tail)
    correct: bool
    reflective: bool
    num_tokens: int
    clean_first_attempt: bool = False  # no faulty step before the first reflection (see first_attempt_clean)


def first_attempt_clean(query: Query, text: str, correct: bool, detector: ReflectionDetector, reward_fn,
                        step_verifier=None) -> bool:
    """Whether the attempt before the first reflection (the whole text without one) has no faulty step.

    With a step verifier (the arithmetic task) this is exact: ``step_verifier.first_attempt_clean``. Without one
    (math) it is read from answers: a response without reflection is clean iff correct; a reflective one iff the
    text before its first reflection already verifies (a correct answer was written before reflecting)."""
    matches = detector.find(text)
    start = matches[0].start if matches else None
    if step_verifier is not None:
        return step_verifier.first_attempt_clean(query.problem, text, start)
    if start is None:
        return correct
    return reward_fn(text[:start], query.answer) > 0.5


def evaluate(engine: RolloutEngine, queries: list[Query], reward_fn: Callable[[str, str], float], tokenizer, *,
             n_samples: int = 4, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,
             greedy: bool = True, ks: tuple[int, ...] = (1, 2, 4, 8, 16), detector: ReflectionDetector | None = None,
             seed: int = 0, samples_path: str | Path | None = None, step_verifier=None) -> dict[str, float]:
    """Greedy and sampled evaluation of ``queries``; ``step_verifier`` (a task's, e.g. the arithmetic one) makes
    first-attempt correctness and the spurious-reflection rate exact (see ``first_attempt_clean``)."""
    detector = detector or ReflectionDetector()
    by_id = {q.id: q for q in queries}
    stop = (tokenizer.eos_id,)
    rows: list[EvalSample] = []

    def add_rows(rollouts: list[Rollout], sample_index: int) -> None:
        for r in rollouts:
            correct = r.reward > 0.5
            clean = first_attempt_clean(by_id[r.query_id], r.response_text, correct, detector, reward_fn,
                                        step_verifier)
            rows.append(EvalSample(r.query_id, sample_index, r.response_text, extract_boxed(r.response_text),
                                   correct, detector.is_reflective(r.response_text), len(r.response_ids), clean))

    summary: dict[str, float] = {"num_problems": float(len(queries))}
    # generation is one batched call per pass, so the bar moves a pass at a time (shown on a terminal only)
    bar = tqdm(total=len(queries) * ((1 if greedy else 0) + max(0, n_samples)), desc="eval", unit="sample",
               disable=None, leave=False)
    if greedy:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop)
        rollouts = sample_groups(engine, queries, 1, params, tokenizer)
        score_rollouts(rollouts, queries, reward_fn)  # one batch: the "math" verifier spreads it over its pool
        add_rows(rollouts, -1)
        bar.update(len(rollouts))
        summary["greedy_accuracy"] = sum(r.correct for r in rows) / max(1, len(queries))
        summary["greedy_first_attempt"] = sum(r.correct and r.clean_first_attempt for r in rows) / max(1, len(queries))
    if n_samples > 0:
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                stop_token_ids=stop, seed=seed)
        rollouts = sample_groups(engine, queries, n_samples, params, tokenizer)
        score_rollouts(rollouts, queries, reward_fn)
        for j in range(n_samples):  # rows sample-major: sample j of every problem, then sample j + 1
            add_rows(rollouts[j::n_samples], j)
        bar.update(len(rollouts))
        sampled = [r for r in rows if r.sample >= 0]
        per_problem: dict[str, list[bool]] = {}
        for r in sampled:
            per_problem.setdefault(r.query_id, []).append(r.correct)
        counts = [(len(v), sum(v)) for v in per_problem.values()]
        for k in ks:
            if k <= n_samples:
                summary[f"pass@{k}"] = mean_pass_at_k(counts, k)
        correct = [r.correct for r in sampled]
        reflective = [r.reflective for r in sampled]
        summary["dsr"] = direct_solution_rate(correct, reflective)
        summary["err"] = effective_reflection_rate(correct, reflective)
        clean = [r.clean_first_attempt for r in sampled]
        summary["first_attempt"] = first_attempt_rate(correct, clean)
        summary["spurious_reflection_rate"] = spurious_reflection_rate(reflective, clean)
        summary["reflection_rate"] = sum(reflective) / max(1, len(reflective))
        summary["mean_response_tokens"] = sum(r.num_tokens for r in sampled) / max(1, len(sampled))
    bar.close()
    if samples_path:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")
    return summary


def evaluate_task(engine: RolloutEngine, task, *, n_samples: int, max_new_tokens: int, seed: int) -> dict[str, float]:
    """Every eval set of a ``tasks.Task``, as ``eval/<set>/<metric>`` metrics (the RL loop's periodic eval)."""
    metrics: dict[str, float] = {}
    for name, queries in task.evals.items():
        summary = evaluate(engine, queries, task.reward, task.tokenizer, n_samples=n_samples,
                           max_new_tokens=max_new_tokens, seed=seed, detector=task.reflection,
                           step_verifier=task.step_verifier)
        metrics.update({f"eval/{name}/{k}": v for k, v in summary.items()})
    return metrics
