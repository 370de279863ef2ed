"""Per-token log-probs (and entropies) from vocab-parallel logits, aligned to target tokens.

logits [B, T, V/tp] at positions 0..T-1 predict tokens 1..T; the result is aligned so that entry t is
log p(tokens[t] | tokens[:t]) and entry 0 is 0 (see records.py). The work is done by ``tapo_kernels`` (Triton on
GPU, its chunked torch reference on CPU; ``backend`` or TAPO_KERNELS forces either), which never materialises an
fp32 copy of the logits and matches Megatron's vocab-parallel cross-entropy.
"""
from __future__ import annotations

import torch

from tapo_kernels import masked_logprobs_vocab_parallel


def vocab_parallel_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, tp_group,
                                        temperature: float = 1.0, with_entropy: bool = False,
                                        backend: str = "auto"):
    """logits [B, T, V/tp] (this rank's vocab shard), tokens [B, T] -> (logprobs [B, T], entropy [B, T] | None)."""
    out = masked_logprobs_vocab_parallel(logits[:, :-1], tokens[:, 1:], None, tp_group, temperature=temperature,
                                         return_entropy=with_entropy, backend=backend)
    logprobs, entropy = out if with_entropy else (out, None)
    pad = logprobs.new_zeros((logprobs.shape[0], 1))
    logprobs = torch.cat([pad, logprobs], dim=1)
    if entropy is not None:
        entropy = torch.cat([pad, entropy], dim=1)
    return logprobs, entropy
