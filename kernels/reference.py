"""Plain-torch references for every kernel in ``tapo_kernels``.

These are the definitions the kernels are tested against and benchmarked beside. They favour obviousness over speed
or memory: the log-prob reference upcasts the whole ``[N, V]`` logits to fp32 (the "unfused path" the fused kernels
exist to avoid) and the advantage reference loops over groups in Python.

Inputs / outputs (shapes):
    reference_logprobs(logits [N, V], targets [N], mask [N] | None, temperature) -> logprobs [N] fp32
    reference_entropy(logits [N, V], mask [N] | None, temperature)                 -> entropy [N] fp32
    reference_grouped_advantage(rewards [B], group_ids [B], eps, normalize_std)   -> advantages [B] fp32
    reference_token_advantage(sample_adv [B], token_sample_index [T], response_mask [T] | None) -> [T] fp32
"""
from __future__ import annotations

import torch


def reference_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(logits / T)[target] per row, in fp32; rows with ``mask == 0`` give 0.

    This is the unfused path: a full fp32 copy of ``logits`` plus a full fp32 ``log_softmax`` output.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V] fp32
    safe_targets = targets.clamp(0, logits.shape[-1] - 1)  # masked rows may carry ignore-ids such as -100
    out = logp.gather(-1, safe_targets.long().unsqueeze(-1)).squeeze(-1)  # [N]
    if mask is not None:
        out = out * (mask != 0).to(out.dtype)
    return out


def reference_entropy(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Entropy -sum p log p of softmax(logits / T) per row, in fp32; rows with ``mask == 0`` give 0."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V]
    ent = -(logp.exp() * logp).sum(-1)  # [N]
    if mask is not None:
        ent = ent * (mask != 0).to(ent.dtype)
    return ent


def reference_grouped_advantage(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    normalize_std: bool = True,
) -> torch.Tensor:
    """GRPO advantage per sample, one Python iteration per group (the loop the kernel replaces).

    A = (r - mean_g) / (std_g + eps), or r - mean_g when ``normalize_std`` is False, where mean and the *population*
    std are taken over the samples sharing ``group_ids``. A group with one member, or whose rewards are all equal,
    gives 0 to all its members (no learning signal; avoids dividing rounding noise by eps).
    """
    rewards = rewards.float()
    if rewards.numel() == 0:
        return rewards.clone()
    # sort once so each group is a contiguous segment, then one Python iteration per group
    order = torch.argsort(group_ids, stable=True)
    _, counts = torch.unique_consecutive(group_ids[order], return_counts=True)
    pieces = []
    for r in torch.split(rewards[order], counts.tolist()):
        if r.numel() < 2:
            pieces.append(torch.zeros_like(r))
            continue
        adv = r - r.mean()
        if normalize_std:
            adv = adv / (r.std(unbiased=False) + eps)
        pieces.append(torch.where(r.max() == r.min(), 0.0, adv))  # all-equal group: 0 (a tensor test, no sync)
    out = torch.empty_like(rewards)
    out[order] = torch.cat(pieces)
    return out


def reference_token_advantage(
    sample_adv: torch.Tensor,
    token_sample_index: torch.Tensor,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Broadcast per-sample advantages to tokens: ``out[t] = sample_adv[token_sample_index[t]] * mask[t]``.

    Tokens whose sample index is negative (padding) give 0.
    """
    valid = token_sample_index >= 0
    out = sample_adv.float()[token_sample_index.clamp(min=0).long()] * valid.float()
    if response_mask is not None:
        out = out * (response_mask != 0).float()
    return out


def token_sample_index_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sample index of each packed token from ``cu_seqlens [B + 1]``; tokens at or past ``cu_seqlens[-1]`` get -1."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    out = torch.full((num_tokens,), -1, dtype=torch.long, device=cu_seqlens.device)
    n = min(num_tokens, idx.numel())
    out[:n] = idx[:n]
    return out
