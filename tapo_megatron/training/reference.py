"""The reference policy for ``algorithm.kl_coef > 0``: the weights the run started from, scored with the actor's own
machinery (same layout, same kernels), never a second model in memory.

    ref = ReferencePolicy.snapshot(actor)        # right after the initial weights are in place, before any step
    batch.ref_logprobs = ref.logprobs(actor, batch.tokens)

``logprobs`` copies the actor's current weights aside (to host memory), copies the reference weights in, runs the
actor's forward, and copies the current weights back, so the training state is bit-identical afterwards. slime does
the same with its weight backuper (``--ref-load``); the cost is two host<->device copies of this rank's shard per
step and one shard of host memory.
"""
from __future__ import annotations

import torch


class ReferencePolicy:
    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights  # this rank's parameter shards, by name, in host memory

    @classmethod
    @torch.no_grad()
    def snapshot(cls, actor) -> "ReferencePolicy":
        return cls({name: p.detach().to("cpu", copy=True) for name, p in actor.module.named_parameters()})

    @torch.no_grad()
    def logprobs(self, actor, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] log-probs of ``tokens`` under the reference weights (every rank, like ``compute_logprobs``)."""
        params = dict(actor.module.named_parameters())
        current = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data.copy_(self.weights[name])
            logprobs, _ = actor.compute_logprobs(tokens, lengths=lengths)
        finally:
            for name, p in params.items():
                p.data.copy_(current[name])
        return logprobs
