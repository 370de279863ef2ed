"""OOD Token Suppression (OTS, TAPO spec step 7): per-token weights for constructed trajectories.

For each response token t of a constructed trajectory

    s_t = log pi(y_t | x, y_<t) + H(pi(. | x, y_<t)),     w_t = clip(exp(s_t), clip_min, clip_max), detached.

A token the model would write itself has log p close to -H (its surprisal is typical), so w ~ 1; a token injected by
the constructor that the model finds unlikely has log p << -H and is pushed towards clip_min. No token is masked.

Inputs are token-aligned [B, T] tensors (entry t = token t, see ``tapo_megatron.records``). The log-probs and entropy
are those of the policy the weights are computed with (the actor's recompute of the rollout-time policy).
``token_entropy_from_logits`` is the torch reference for the entropy; the training path may use a fused kernel.
"""
from __future__ import annotations

import torch

__all__ = ["ots_weights", "token_entropy_from_logits"]


def ots_weights(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    clip_min: float = 0.01,
    clip_max: float = 10.0,
) -> torch.Tensor:
    """OTS token weights.

    Args:
        logprobs: [B, T] log pi(y_t | ...) of each token.
        entropy: [B, T] entropy of the policy's next-token distribution that produced token t.
        mask: [B, T] bool (or 0/1): where to apply OTS, i.e. response tokens of constructed trajectories
            (``loss_mask.bool() & is_constructed[:, None]``).
        clip_min, clip_max: clip range of exp(s_t); 0 < clip_min <= clip_max.

    Returns:
        float32 [B, T] weights, detached: clip(exp(logprobs + entropy)) where mask is true, 1 elsewhere.
    """
    if logprobs.shape != entropy.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"ots_weights: logprobs {tuple(logprobs.shape)}, entropy {tuple(entropy.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    if not 0 < clip_min <= clip_max:
        raise ValueError(f"ots_weights: need 0 < clip_min <= clip_max, got clip_min={clip_min}, clip_max={clip_max}")
    with torch.no_grad():
        score = logprobs.detach().float() + entropy.detach().float()
        weights = score.exp().clamp(min=clip_min, max=clip_max)
        # where (not multiply): padding positions may hold -inf/NaN log-probs and must still get weight 1
        return torch.where(mask.bool(), weights, torch.ones_like(weights))


def token_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, accumulated in fp32.

    Args:
        logits: [..., V] any float dtype; -inf entries (masked vocabulary) are allowed.

    Returns:
        float32 [...] entropy in nats, H = -sum_v p_v log p_v.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # subtracts the max internally: stable for large logits
    p = logp.exp()
    # 0 * log 0 = 0: masked (-inf) logits would otherwise give 0 * -inf = NaN
    plogp = torch.where(torch.isneginf(logp), torch.zeros_like(logp), p * logp)
    return -plogp.sum(dim=-1)
