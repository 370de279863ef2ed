"""LM head + masked log-prob (+ entropy) fused, so the full ``[N, V]`` logits never exist. The actor uses it with
``model.logprobs_path=fused_linear`` (``training/logprobs.py``).

    fused_linear_logprobs(hidden [..., H], weight [V_local, H], targets [...], mask [...] | None, *,
                          temperature=1.0, return_entropy=False, token_chunk=2048, vocab_chunk=32768,
                          tp_group=None, vocab_start=None, backend="auto")
        -> logprobs [...] fp32, or (logprobs, entropy)

Forward: for each ``[token_chunk, vocab_chunk]`` tile, ``logits = hidden_c @ weight_c.T`` (in the inputs' dtype, as
the output layer would compute them) and the masked-logprob statistics kernel reduces the tile to per-token
``(max, sum-exp, entropy partial, target logit)``; tiles are merged with the same online-softmax merge that combines
TP ranks, so vocab chunks and vocab shards are handled alike. Only the per-token statistics are kept.
Backward: each tile is recomputed, the gradient kernel turns it into d(loss)/d(logits) in place, and two GEMMs
accumulate ``grad_hidden`` and ``grad_weight`` in fp32. Peak extra memory is one tile plus the fp32 accumulators
(``[N, H]`` and ``[V_local, H]``), instead of ``[N, V]`` logits, their fp32 copy and their gradient.

With ``tp_group`` the weight is this rank's vocabulary shard (Megatron ``ColumnParallelLinear`` without sequence
parallelism: hidden is replicated); the forward all-reduces the statistics and the backward all-reduces
``grad_hidden`` (what ``ColumnParallelLinear`` does for its replicated input), so ``grad_hidden`` is the full gradient
on every rank and ``grad_weight`` is this shard's gradient.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .masked_logprobs import _allreduce_stats, _local_grad, _local_stats, finish_stats, merge_stats
from .select import resolve_backend


def _tiles(n: int, v: int, token_chunk: int, vocab_chunk: int):
    for lo in range(0, n, token_chunk):
        hi = min(lo + token_chunk, n)
        for v0 in range(0, v, vocab_chunk):
            yield lo, hi, v0, min(v0 + vocab_chunk, v)


class _FusedLinearLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden, weight, targets, active, temperature, with_entropy, vocab_start, tp_group, backend,
        token_chunk, vocab_chunk, reduce_grad_hidden,
    ):
        n, v = hidden.shape[0], weight.shape[0]
        stats = torch.empty(5, n, dtype=torch.float32, device=hidden.device)
        for lo, hi, v0, v1 in _tiles(n, v, token_chunk, vocab_chunk):
            logits = hidden[lo:hi] @ weight[v0:v1].T  # [C, Vc] in the inputs' dtype; the only [*, V]-like tensor
            act = None if active is None else active[lo:hi]
            tile = _local_stats(
                logits, targets[lo:hi], act, vocab_start + v0, temperature, with_entropy, backend, logits.shape[0]
            )
            stats[:, lo:hi] = tile if v0 == 0 else merge_stats(stats[:, lo:hi], tile)
            del logits
        stats = _allreduce_stats(stats, tp_group)
        logprobs, entropy, row_max, log_s = finish_stats(stats, targets, active)
        ctx.save_for_backward(hidden, weight, targets, active, row_max, log_s, entropy)
        ctx.cfg = (temperature, with_entropy, vocab_start, tp_group, backend, token_chunk, vocab_chunk,
                   reduce_grad_hidden)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):  # type: ignore[override]
        hidden, weight, targets, active, row_max, log_s, entropy = ctx.saved_tensors
        temperature, with_entropy, vocab_start, tp_group, backend, token_chunk, vocab_chunk, reduce_h = ctx.cfg
        if g_lp is None and (g_ent is None or not with_entropy):
            return (None,) * 12
        g_lp = torch.zeros_like(log_s) if g_lp is None else g_lp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (with_entropy and g_ent is not None) else None
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(v, weight.shape[1], dtype=torch.float32, device=weight.device) if need_w else None
        for lo, hi, v0, v1 in _tiles(n, v, token_chunk, vocab_chunk):
            logits = hidden[lo:hi] @ weight[v0:v1].T  # recompute the tile
            act = None if active is None else active[lo:hi]
            _local_grad(
                logits, logits, targets[lo:hi], act, vocab_start + v0, temperature, row_max[lo:hi], log_s[lo:hi],
                entropy[lo:hi] if g_ent is not None else None, g_lp[lo:hi],
                g_ent[lo:hi] if g_ent is not None else None, backend, logits.shape[0],
            )  # logits now hold d(loss)/d(logits) of the tile
            if need_h:
                grad_h[lo:hi] += (logits @ weight[v0:v1]).float()
            if need_w:
                grad_w[v0:v1] += (logits.T @ hidden[lo:hi]).float()
            del logits
        if need_h and reduce_h and tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
        ) + (None,) * 10


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    token_chunk: int = 2048,
    vocab_chunk: int = 32768,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    backend: str = "auto",
    reduce_grad_hidden: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` under ``softmax(hidden @ weight.T / T)`` without materialising the logits.

    Args:
        hidden: ``[..., H]`` final hidden states (after the final norm), bf16/fp16/fp32.
        weight: ``[V_local, H]`` output-layer weight (this rank's vocab shard under TP), same dtype as hidden.
        targets: ``[...]`` global token ids; mask ``[...]`` or None (0 = no log-prob, no gradient).
        temperature, return_entropy, backend: as in ``masked_logprobs``.
        token_chunk, vocab_chunk: tile size; peak extra memory ~ token_chunk * vocab_chunk * itemsize.
        tp_group, vocab_start: vocab-parallel form (vocab_start None = ``rank * V_local``).
        reduce_grad_hidden: all-reduce ``grad_hidden`` over ``tp_group`` (replicated hidden states); False when the
            caller's own op already sums it, e.g. a sequence-parallel all-gather whose backward reduce-scatters.
    Returns:
        logprobs ``[...]`` fp32, or ``(logprobs, entropy)``.
    """
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must share H ([V, H] weight)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} != hidden shape without H {tuple(hidden.shape[:-1])}")
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk ({token_chunk}) and vocab_chunk ({vocab_chunk}) must be >= 1")
    backend = resolve_backend(backend, hidden.device)
    if vocab_start is None:
        vocab_start = (0 if tp_group is None else dist.get_rank(tp_group)) * weight.shape[0]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    targets1d = targets.reshape(-1).to(torch.int64).contiguous()
    active = None if mask is None else (mask.reshape(-1) != 0).to(torch.int8).contiguous()
    logprobs, entropy = _FusedLinearLogprobFn.apply(
        hidden2d, weight, targets1d, active, float(temperature), bool(return_entropy), int(vocab_start), tp_group,
        backend, int(token_chunk), int(vocab_chunk), bool(reduce_grad_hidden),
    )
    logprobs = logprobs.reshape(targets.shape)
    if return_entropy:
        return logprobs, entropy.reshape(targets.shape)
    return logprobs
