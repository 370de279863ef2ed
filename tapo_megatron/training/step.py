"""One RL step on a collated batch: policy tensors, the registered loss, non-finite steps skipped.

    metrics, skipped = policy_step(actor, batch, cfg.algorithm, cfg.tapo, reference, skipped_in_a_row)

On-policy (``algorithm.ppo_epochs=1`` and one mini-batch, the default): ONE forward/backward. The old log-probs and
OTS inputs (log-prob, entropy) are the training forward's own, detached; the ratio is exactly 1, so the result is
the two-pass result without the second forward. PPO reuse (``ppo_epochs > 1`` or ``mini_batch_size`` smaller than
the batch): the old-log-prob pass runs once, then one optimizer step per mini-batch per epoch (the iteration and lr
schedule advance once per rollout step), so the ratio moves away from 1 and the clip engages.
"""
from __future__ import annotations

import torch

from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.logging.timing import Stopwatch
from tapo_megatron.records import TrainBatch
from tapo_megatron.training.actor import NonFiniteLossError
from tapo_megatron.training.batch import (
    batch_tensors,
    fill_policy_tensors,
    make_policy_loss_fn,
    select_rows,
    set_policy_tensors,
)
from tapo_megatron.training.branch_grads import branch_gradient_stats
from tapo_megatron.training.distill import opsd_advantages

MAX_SKIPPED_STEPS = 3  # non-finite steps in a row that mean training has diverged


def is_on_policy(algo: AlgorithmConfig, num_sequences: int) -> bool:
    return algo.ppo_epochs == 1 and (not algo.mini_batch_size or algo.mini_batch_size >= num_sequences)


def policy_step(actor, batch: TrainBatch, algo: AlgorithmConfig, tapo: TapoConfig, reference,
                skipped_in_a_row: int) -> tuple[dict, int]:
    """Reference log-probs when ``reference`` is given, then the on-policy step or the PPO mini-batch steps.

    A non-finite loss or gradient skips the step (weights untouched, the iteration consumed) and is logged;
    ``MAX_SKIPPED_STEPS`` in a row stop the run with the error. Returns (metrics, skipped steps in a row)."""
    watch = Stopwatch()  # time/logprobs: reference and old-log-prob passes; time/train: the optimizer step(s)
    if reference is not None:
        batch.ref_logprobs = reference.logprobs(actor, batch.tokens, batch.seq_lengths)
    metrics: dict = {}
    # OPSD's advantages and the branch-gradient diagnostic need the old log-probs before the step: a separate pass.
    diagnose = bool(tapo.branch_grad_interval) and actor.iteration % tapo.branch_grad_interval == 0
    try:
        if is_on_policy(algo, batch.num_sequences) and batch.teacher_prompts is None and not diagnose:
            watch.lap("logprobs")
            result = actor.train_step(batch_tensors(batch), make_policy_loss_fn(batch, algo, tapo, on_policy=True),
                                      with_entropy=True, return_logprobs=True)
            metrics.update(set_policy_tensors(batch, result.logprobs, result.entropy, tapo))
        else:
            metrics.update(fill_policy_tensors(batch, actor, tapo))
            metrics.update(opsd_advantages(actor, batch))  # OPSD baseline: teacher-student log-ratios as advantages
            if diagnose:
                metrics.update(branch_gradient_stats(actor, batch, algo, tapo))  # diagnostic passes, no update
            watch.lap("logprobs")
            result = _ppo_steps(actor, batch, algo, tapo, metrics)
        watch.lap("train")
        metrics.update(watch.times)
    except NonFiniteLossError as err:
        if skipped_in_a_row + 1 >= MAX_SKIPPED_STEPS:
            raise
        print(f"[train] {err}", flush=True)
        actor.skip_step()
        watch.lap("train")
        return {**metrics, **watch.times, "skipped_nonfinite": 1.0}, skipped_in_a_row + 1
    metrics.update(result.metrics, loss=result.loss, grad_norm=result.grad_norm, lr=result.lr, skipped_nonfinite=0.0)
    return metrics, 0


def _ppo_steps(actor, batch: TrainBatch, algo: AlgorithmConfig, tapo: TapoConfig, metrics: dict):
    """``ppo_epochs`` passes over the batch in shuffled mini-batches (the same order on every rank: seeded by the
    iteration), each mini-batch normalised by its own token counts. Per-epoch clip fraction and ratio are logged;
    the result returned is the last optimizer step's."""
    rows = batch.num_sequences
    size = algo.mini_batch_size or rows
    steps = [(epoch, lo) for epoch in range(algo.ppo_epochs) for lo in range(0, rows, size)]
    result, per_epoch = None, {}
    for n, (epoch, lo) in enumerate(steps):
        if lo == 0:
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(actor.iteration * 1009 + epoch))
        mini = select_rows(batch, order[lo:lo + size])
        result = actor.train_step(batch_tensors(mini), make_policy_loss_fn(mini, algo, tapo),
                                  advance=n == len(steps) - 1)
        for key in ("clip_frac", "ratio_mean"):
            if key in result.metrics:
                per_epoch.setdefault(f"ppo/epoch{epoch}/{key}", []).append(result.metrics[key])
    metrics.update({k: sum(v) / len(v) for k, v in per_epoch.items()})
    metrics["ppo/optimizer_steps"] = float(len(steps))
    return result
