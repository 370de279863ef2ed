"""Per-token log-probs (and entropies) from vocab-parallel logits, aligned to target tokens.

logits [B, T, V/tp] at positions 0..T-1 predict tokens 1..T; the result is aligned so that entry t is
log p(tokens[t] | tokens[:t]) and entry 0 is 0 (see records.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _vocab_parallel_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # Megatron's cross-entropy overwrites its input in place: give it its own copy of the (float) logits.
    return -vocab_parallel_cross_entropy(logits.float().clone() if logits.dtype == torch.float32 else logits.float(),
                                         targets)


@torch.no_grad()
def _vocab_parallel_entropy(logits: torch.Tensor, tp_group) -> torch.Tensor:
    logits = logits.float()
    local_max = logits.max(dim=-1).values
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - local_max.unsqueeze(-1)
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sums, group=tp_group)
    sum_exp, sum_exp_x = sums
    # H = log Z - E[x] with x the shifted logits: log(sum e^x) - sum(e^x x) / sum(e^x)
    return sum_exp.log() - sum_exp_x / sum_exp


def vocab_parallel_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, tp_group,
                                        temperature: float = 1.0, with_entropy: bool = False):
    """logits [B, T, V/tp] (this rank's vocab shard), tokens [B, T] -> (logprobs [B, T], entropy [B, T] | None)."""
    logits = logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    entropy = _vocab_parallel_entropy(logits, tp_group) if with_entropy else None
    logprobs = _vocab_parallel_logprob(logits, tokens[:, 1:])
    pad = logprobs.new_zeros((logprobs.shape[0], 1))
    logprobs = torch.cat([pad, logprobs], dim=1)
    if entropy is not None:
        entropy = torch.cat([pad, entropy], dim=1)
    return logprobs, entropy
