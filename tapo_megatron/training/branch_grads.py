"""Diagnostic: the gradients of TAPO's two loss branches, each alone, at the current weights (no update).

    metrics = branch_gradient_stats(actor, batch, algo, tapo)     # every tapo.branch_grad_interval steps

Two extra forward/backward passes over the step's batch with the step's own loss and denominators: one with the
constructed rows masked out (the GRPO branch alone), one with the originals masked out (lambda * the constructed
branch alone), so the two gradients sum to the step's gradient (before clipping). Megatron's gradient finalisation is switched off for these passes: each
rank's local gradient is summed over data-parallel ranks here, and norms and dot products skip tensor-parallel
duplicates and are summed over the model-parallel ranks. Costs one gradient-sized copy of memory while it runs.
Returns ``algorithms.branches.gradient_comparison``'s metrics (before clipping).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tapo_megatron.algorithms.branches import gradient_comparison
from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.records import TrainBatch
from tapo_megatron.training.batch import batch_tensors, make_policy_loss_fn


def _branch_gradient(actor, tensors: dict, loss_fn) -> list[torch.Tensor]:
    """This branch's full-batch gradient, one tensor per parameter that counts (no TP duplicates)."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    _, micro_batches = actor._plan(tensors)  # this DP rank's micro-batches, as the step makes them
    actor.model.zero_grad_buffer()
    config, finalize = actor.config, actor.config.finalize_model_grads_func
    config.finalize_model_grads_func = None  # keep local gradients: reduced below, never handed to the optimizer
    try:
        actor._forward_backward(micro_batches,
                                lambda logprobs, entropy, mb: loss_fn(logprobs, mb), forward_only=False)
    finally:
        config.finalize_model_grads_func = finalize
    grads = []
    for param in actor.model.module.parameters():
        if not param.requires_grad:
            continue
        grad = param.main_grad.detach().float().clone()
        if actor.ctx.dp_size > 1:
            dist.all_reduce(grad, group=actor.ctx.dp_group)
        grad /= actor.ctx.dp_size  # the loss was scaled by dp for Megatron's averaging, which did not run
        if param_is_not_tensor_parallel_duplicate(param, tp_group=actor.ctx.tp_group):
            grads.append(grad.flatten())
    actor.model.zero_grad_buffer()
    return grads


def branch_gradient_stats(actor, batch: TrainBatch, algo: AlgorithmConfig, tapo: TapoConfig) -> dict[str, float]:
    """Both branches' gradient norms, their ratio and cosine (see the module docstring); {} without both branches."""
    if not (tapo.enabled and batch.is_constructed.any() and (~batch.is_constructed).any()):
        return {}
    tensors = batch_tensors(batch)
    full = make_policy_loss_fn(batch, algo, tapo)  # the step's loss and denominators, lambda included

    def only(keep_constructed: bool):
        def loss_fn(logprobs, mb):
            rows = mb["is_constructed"] if keep_constructed else 1.0 - mb["is_constructed"]
            return full(logprobs, dict(mb, loss_mask=mb["loss_mask"] * rows))  # the other branch sums to 0
        return loss_fn

    g_orig = torch.cat(_branch_gradient(actor, tensors, only(False))).double()
    g_cons = torch.cat(_branch_gradient(actor, tensors, only(True))).double()
    sums = torch.stack([g_orig @ g_orig, g_cons @ g_cons, g_orig @ g_cons])
    if actor.ctx.world_size > 1:  # shards of one model: sum over tensor- and pipeline-parallel ranks
        for group in (actor.ctx.tp_group, actor.ctx.pp_group):
            dist.all_reduce(sums, group=group)
    return gradient_comparison(*(float(x) for x in sums))
