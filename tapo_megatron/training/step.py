"""One RL optimizer step on a collated batch: policy tensors, the registered loss, non-finite steps skipped.

    metrics, skipped = policy_step(actor, batch, cfg.algorithm, cfg.tapo, reference, skipped_in_a_row)
"""
from __future__ import annotations

from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.records import TrainBatch
from tapo_megatron.training.actor import NonFiniteLossError
from tapo_megatron.training.branch_grads import branch_gradient_stats
from tapo_megatron.training.distill import opsd_advantages
from tapo_megatron.training.batch import batch_tensors, fill_policy_tensors, make_policy_loss_fn

MAX_SKIPPED_STEPS = 3  # non-finite steps in a row that mean training has diverged


def policy_step(actor, batch: TrainBatch, algo: AlgorithmConfig, tapo: TapoConfig, reference,
                skipped_in_a_row: int) -> tuple[dict, int]:
    """Old log-probs and OTS weights (and reference log-probs when ``reference`` is given), then one PPO-clip step.

    A non-finite loss or gradient skips the step (weights untouched, the iteration consumed) and is logged;
    ``MAX_SKIPPED_STEPS`` in a row stop the run with the error. Returns (metrics, skipped steps in a row)."""
    metrics = fill_policy_tensors(batch, actor, tapo)
    metrics.update(opsd_advantages(actor, batch))  # OPSD baseline: teacher-student log-ratios replace advantages
    if tapo.branch_grad_interval and actor.iteration % tapo.branch_grad_interval == 0:
        metrics.update(branch_gradient_stats(actor, batch, algo, tapo))  # diagnostic passes, before the update
    if reference is not None:
        batch.ref_logprobs = reference.logprobs(actor, batch.tokens)
    try:
        result = actor.train_step(batch_tensors(batch), make_policy_loss_fn(batch, algo, tapo))
    except NonFiniteLossError as err:
        if skipped_in_a_row + 1 >= MAX_SKIPPED_STEPS:
            raise
        print(f"[train] {err}", flush=True)
        actor.skip_step()
        return {**metrics, "skipped_nonfinite": 1.0}, skipped_in_a_row + 1
    metrics.update(result.metrics, loss=result.loss, grad_norm=result.grad_norm, lr=result.lr, skipped_nonfinite=0.0)
    return metrics, 0
