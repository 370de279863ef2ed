"""Per-token log-probs (and entropies) from the last stage's sequence-first output, aligned to target tokens.

The actor hands over the output layer's result in Megatron's own [s, b, *] layout (no [b, s, V] transpose copy):
either vocab-parallel logits [s, b, V/tp] (``model.logprobs_path=logits``) or the final hidden states [s, b, H] with
the output weight (``fused_linear``: the LM-head GEMM is fused into the log-prob, chunked over tokens, so [s*b, V]
logits never exist). Position t predicts token t + 1; the result is token-aligned [b, s] (entry t = log p(token t |
tokens before it), entry 0 and padding = 0, see records.py). ``tapo_kernels`` does the work (Triton on GPU, its
chunked torch path on CPU), matching Megatron's vocab-parallel cross-entropy.

    logprobs, entropy = token_logprobs(output, tokens, lengths, tp_group, ...)           # [b, s] each
    logprobs, entropy = token_logprobs(output, packed, None, tp_group, cu_seqlens=cu)   # THD: [rows, seq_len]
"""
from __future__ import annotations

import torch

from tapo_kernels import fused_linear_logprobs, masked_logprobs_vocab_parallel
from tapo_megatron.training.microbatch import packed_targets, unpack_rows

LOGPROB_PATHS = ("logits", "fused_linear")


def _targets(tokens: torch.Tensor, lengths: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-first targets [s, b] (position t -> token t + 1) and the mask of positions that have one."""
    t = tokens.t()
    targets = torch.zeros_like(t)
    targets[:-1] = t[1:]
    pos = torch.arange(t.shape[0], device=t.device)[:, None]
    ends = torch.tensor(lengths, device=t.device)[None] if lengths is not None else t.shape[0]
    return targets, pos < ends - 1


def token_logprobs(output: torch.Tensor, tokens: torch.Tensor, lengths: list[int] | None, tp_group, *,
                   temperature: float = 1.0, with_entropy: bool = False, backend: str = "auto",
                   output_weight: torch.Tensor | None = None, reduce_grad_hidden: bool = True,
                   inplace_backward: bool = False,
                   cu_seqlens: torch.Tensor | None = None, seq_len: int | None = None):
    """output [s, b, V/tp] logits (or [s, b, H] hidden states with ``output_weight`` [V/tp, H]); tokens [b, s].

    ``inplace_backward`` writes d(loss)/d(logits) into the logits buffer (the output layer's backward never reads
    its own output). ``reduce_grad_hidden``: see ``fused_linear_logprobs``. ``cu_seqlens`` marks a packed
    micro-batch (b = 1): results come back as [rows, seq_len].
    Returns (logprobs, entropy | None), fp32."""
    if cu_seqlens is not None:
        targets, mask = packed_targets(tokens, cu_seqlens)
        targets, mask = targets[:, None], mask[:, None]
    else:
        targets, mask = _targets(tokens, lengths)
    kw = dict(temperature=temperature, return_entropy=with_entropy, backend=backend)
    if output_weight is not None:
        out = fused_linear_logprobs(output, output_weight, targets, mask, tp_group=tp_group,
                                    reduce_grad_hidden=reduce_grad_hidden, **kw)
    else:
        out = masked_logprobs_vocab_parallel(output, targets, mask, tp_group, inplace_backward=inplace_backward, **kw)
    logprobs, entropy = out if with_entropy else (out, None)
    if cu_seqlens is not None:
        align = lambda v: unpack_rows(v.reshape(-1), cu_seqlens, seq_len)  # noqa: E731
    else:
        def align(v):  # [s, b] -> [b, s], shifted one position right
            res = v.new_zeros((v.shape[1], v.shape[0]))
            res[:, 1:] = v[:-1].t()
            return res
    return align(logprobs), (align(entropy) if entropy is not None else None)
