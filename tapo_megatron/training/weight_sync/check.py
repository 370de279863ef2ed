"""Post-sync check: do the engines now compute what the trainer computes?

``check_logprobs`` scores a few fixed probe sequences with the actor (Megatron, collective over trainer ranks) and
with every engine server (SGLang: ``/generate`` with ``logprob_start_len=0`` returns ``input_token_logprobs``; an
in-process engine: a forward pass) and reports the largest absolute difference; above ``atol`` it raises. A wrong
mapping or a half-applied sync moves log-probs by far more than numerical noise (fp32: ~1e-6; bf16: ~1e-2).
"""
from __future__ import annotations

import torch

from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.training.weight_sync.common import WeightSyncError


def probe_tokens(vocab_size: int, num: int = 2, length: int = 16, seed: int = 1234) -> torch.Tensor:
    """Fixed pseudo-random probe sequences [num, length] (the same on every rank and every call)."""
    return torch.randint(0, vocab_size, (num, length), generator=torch.Generator().manual_seed(seed))


def check_logprobs(actor, engine: RolloutEngine | None, tokens: torch.Tensor, atol: float) -> float:
    """Largest |actor - engine| log-prob over probes and servers (rank 0; 0.0 elsewhere). Collective: every
    trainer rank must call it. Raises ``WeightSyncError`` above ``atol``."""
    actor_lp, _ = actor.compute_logprobs(tokens)  # [num, length]; position 0 carries no log-prob
    if actor.ctx.rank != 0 or engine is None:
        return 0.0
    reference = actor_lp[:, 1:].float().cpu()
    worst = 0.0
    for i, got in enumerate(engine.prompt_logprobs(tokens)):
        diff = float((got - reference).abs().max())
        worst = max(worst, diff)
        if not diff <= atol:  # also catches NaN
            raise WeightSyncError(f"post-sync check: engine server {i} log-probs differ from the actor's by "
                                  f"{diff:.3g} > {atol:g} on the probe sequences (wrong mapping or partial sync)")
    return worst
