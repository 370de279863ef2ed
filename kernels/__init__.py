"""tapo_kernels: fused kernels for RL post-training, each with a plain-torch reference.

    grouped_advantage(rewards [B], group_ids [B], ...)          GRPO/DAE advantages over ragged, unsorted groups
    masked_logprobs(logits [..., V], targets [...], mask, ...)   per-token log-prob (+ entropy), fused fwd/bwd
    masked_logprobs_vocab_parallel(logits_shard, ..., tp_group)  the same over a Megatron TP vocab shard
    fused_linear_logprobs(hidden [N, H], weight [V, H], ...)     LM-head GEMM fused in: [N, V] logits never exist

On the training path: ``masked_logprobs_vocab_parallel`` (the actor's log-probs and entropies, ``training/logprobs``;
in-place backward when training), ``fused_linear_logprobs`` (``model.logprobs_path=fused_linear``) and
``grouped_advantage`` (``algorithms.advantages`` on CUDA).

Importing this package neither needs a GPU nor launches anything; Triton kernels are compiled on first use.
Backend choice: ``tapo_kernels.select`` (Triton on CUDA, torch on CPU, ``TAPO_KERNELS=torch|triton`` to force).
Benchmark: ``python -m tapo_kernels.bench``.
"""
from .fused_linear import fused_linear_logprobs
from .grouped_advantage import GroupedAdvantage, grouped_advantage
from .masked_logprobs import masked_logprobs, masked_logprobs_vocab_parallel
from .reference import (
    reference_entropy,
    reference_grouped_advantage,
    reference_logprobs,
    reference_token_advantage,
)
from .select import resolve_backend

__all__ = [
    "GroupedAdvantage",
    "fused_linear_logprobs",
    "grouped_advantage",
    "masked_logprobs",
    "masked_logprobs_vocab_parallel",
    "reference_entropy",
    "reference_grouped_advantage",
    "reference_logprobs",
    "reference_token_advantage",
    "resolve_backend",
]
