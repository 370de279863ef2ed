"""Baseline OPSD (on-policy self-distillation): the teacher is the SAME model conditioned on the reference solution.

    attach_teacher_prompts(batch, trajectories, queries, task, algo)   # rank-independent: every rank builds them
    metrics = opsd_advantages(actor, batch)                             # after the old log-probs, before the step

For every response token y_t of the student's own rollout (context x = the original prompt), the teacher scores the
same token in its context c = ``task.teacher_prompt(query)`` (reference solution + problem):

    A_t = log pi(y_t | c, y_<t) - log pi(y_t | x, y_<t)          (both under the rollout-time weights, detached)

and ``batch.advantages`` becomes A_t. The unchanged PPO-clip surrogate then follows -grad KL(pi(.|x) || pi(.|c)) along
the student's samples: the sampled-token (score-function) estimator of the per-token reverse KL, the form on-policy
distillation uses; no reward enters. The full-vocabulary divergence would need both models' logits in the loss: not
implemented. Logged: ``opsd/reverse_kl`` (mean of -A_t over response tokens) and ``opsd/teacher_logprob``.
"""
from __future__ import annotations

import torch

from tapo_megatron.config import AlgorithmConfig
from tapo_megatron.errors import ConfigError
from tapo_megatron.records import Query, TrainBatch, Trajectory


def attach_teacher_prompts(batch: TrainBatch, trajectories: list[Trajectory], queries: list[Query], task,
                           algo: AlgorithmConfig) -> None:
    """With ``algorithm.distillation='opsd'``, the teacher context of every row (in the trajectories' order)."""
    if algo.distillation != "opsd":
        return
    if task.teacher_prompt is None:
        raise ConfigError(f"algorithm.distillation='opsd': the {task.name!r} task has no teacher prompt "
                          "(Task.teacher_prompt: the model shown a reference solution)")
    by_id = {q.id: q for q in queries}
    batch.teacher_prompts = [list(task.teacher_prompt(by_id[t.query_id])) for t in trajectories]


def opsd_advantages(actor, batch: TrainBatch) -> dict[str, float]:
    """Replace ``batch.advantages`` by the teacher-student log-ratio on response tokens (see the module docstring);
    {} when the batch has no teacher prompts. Needs ``batch.old_logprobs`` (the student's rollout-time log-probs)."""
    if batch.teacher_prompts is None:
        return {}
    mask = batch.loss_mask.bool()
    rows = []  # (teacher prompt length, response start, response length) per row
    for i, prompt in enumerate(batch.teacher_prompts):
        idx = mask[i].nonzero().flatten()
        start, length = (int(idx[0]), len(idx)) if len(idx) else (0, 0)
        rows.append((len(prompt), start, length))
    width = max(p + n for p, _, n in rows)
    tokens = torch.full((len(rows), width), int(batch.tokens[0, 0]), dtype=torch.long)  # right padding, never scored
    for i, (prompt, (p, start, n)) in enumerate(zip(batch.teacher_prompts, rows)):
        tokens[i, :p] = torch.tensor(prompt, dtype=torch.long)
        tokens[i, p:p + n] = batch.tokens[i, start:start + n]
    teacher, _ = actor.compute_logprobs(tokens)
    advantages = torch.zeros_like(batch.advantages)
    for i, (p, start, n) in enumerate(rows):
        advantages[i, start:start + n] = teacher[i, p:p + n] - batch.old_logprobs[i, start:start + n]
    batch.advantages = advantages
    n_tokens = max(int(mask.sum()), 1)
    return {"opsd/reverse_kl": float(-advantages[mask].sum()) / n_tokens,
            "opsd/teacher_logprob": float(sum(teacher[i, p:p + n].sum() for i, (p, _, n) in enumerate(rows))) / n_tokens}
