"""Policy losses: PPO-clip in TAPO's decoupled form, and the SFT loss.

    L = L_GRPO(originals) + lambda * L_ref(constructed, OTS weights)

Inputs are token-aligned [B, T] tensors (entry t = token t, see ``tapo_megatron.records``); ``is_constructed`` is
bool [B]. Per masked token t with ratio rho_t = exp(log pi - log pi_old) and advantage A_t:

    l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high)) + kl_coef * KL_t(pi || pi_ref)

    L_GRPO = sum_{original tokens} l_t / N_orig
    L_ref  = sum_{constructed tokens} w_t l_t / N_cons          (w_t = OTS weight, detached)

Aggregation is a token-level mean with each branch divided by ITS OWN token count. With lambda = 0 the loss and its
gradients are exactly those of GRPO on the originals alone; a joint denominator (N_orig + N_cons) would shrink the
GRPO term whenever constructions exist. The OTS weight scales token t's whole contribution (policy-gradient and KL
terms alike), so w_t = 1 everywhere gives the plain GRPO form on constructed tokens too.

Global counts and gradient accumulation: by default N_orig / N_cons are the masked counts of the tensors passed in.
The trainer instead passes the counts over the whole optimizer step (all micro-batches of all data-parallel ranks),
so every micro-batch loss is a slice of one sum: summing the micro-batch losses (and their gradients) gives the
full-batch loss exactly, whatever the micro-batch split or padding. Two consequences for the caller: do not divide the
micro-batch losses by the number of micro-batches, and if the data-parallel all-reduce *averages* gradients (Megatron
DDP's default), multiply the loss by the data-parallel world size (or configure the reduction as a sum).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from tapo_megatron.registry import Registry

__all__ = [
    "KL_ESTIMATORS",
    "kl_penalty",
    "policy_loss",
    "sft_loss",
    "PolicyLossFn",
    "register_policy_loss",
    "get_policy_loss",
    "list_policy_losses",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps ratios finite in fp32 for tokens the policy has moved far from


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators), same shape as the inputs.

    k1 = log pi - log pi_ref (unbiased, can be negative); k2 = (log pi - log pi_ref)^2 / 2;
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, >= 0; log-ratio clamped to +-20).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r} is unknown; valid: {', '.join(KL_ESTIMATORS)}")
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff * diff
    log_r = (-diff).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # log(pi_ref / pi)
    return log_r.exp() - log_r - 1.0


def _denominator(given: int | float | torch.Tensor | None, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Token count a branch is divided by: the global count if given, else the local masked count; at least 1
    (a branch with no tokens contributes a zero sum, so the floor only avoids 0/0)."""
    if given is None:
        return mask.sum().to(torch.float32).clamp(min=1.0)
    if not isinstance(given, torch.Tensor) and given < 0:
        raise ValueError(f"{name} must be >= 0, got {given}")
    return torch.as_tensor(given, dtype=torch.float32, device=mask.device).clamp(min=1.0)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Local mean of values over mask (0 when the mask is empty), detached."""
    values = values.detach()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _check_token_tensor(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if t.shape != shape:
        raise ValueError(f"policy_loss: {name} has shape {tuple(t.shape)}, expected {tuple(shape)} (same as logprobs)")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    is_constructed: torch.Tensor,
    token_weights: torch.Tensor | None,
    constructed_coef: float,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    num_original_tokens: int | float | torch.Tensor | None = None,
    num_constructed_tokens: int | float | torch.Tensor | None = None,
    engine_logprobs: torch.Tensor | None = None,
    tis_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TAPO's decoupled PPO-clip loss (see the module docstring for the formula and aggregation).

    Args:
        logprobs: [B, T] current-policy log-probs (carries the gradient).
        old_logprobs: [B, T] rollout-time policy log-probs.
        advantages: [B, T] per-token advantages, or [B] per sequence (broadcast over tokens).
        loss_mask: [B, T] 1/0 (or bool); nonzero marks the response tokens trained on.
        is_constructed: bool [B], True for constructed trajectories.
        token_weights: [B, T] OTS weights used on constructed tokens (ignored on originals); None means all 1.
        constructed_coef: lambda >= 0; 0 reproduces GRPO exactly.
        clip_eps_low, clip_eps_high: ratio clip range [1 - eps_low, 1 + eps_high].
        kl_coef: weight of the KL-to-reference term; > 0 requires ref_logprobs.
        ref_logprobs: [B, T] reference-model log-probs; when given the "kl_ref" metric is reported even at kl_coef=0.
        kl_estimator: "k1" | "k2" | "k3" (see :func:`kl_penalty`).
        num_original_tokens, num_constructed_tokens: global token counts of each branch over the whole optimizer
            step; None uses this call's masked counts.
        engine_logprobs, tis_cap: truncated importance sampling for the engine/trainer mismatch (off when
            ``tis_cap`` is 0): the policy-gradient term of each ORIGINAL token (sampled by the engine) is scaled by
            ``min(exp(old - engine), tis_cap)``, detached (slime's ``--use-tis``: the rollouts came from the engine's
            distribution, the ratio's denominator is the trainer's). Constructed rows are not engine samples.

    Returns:
        (loss, metrics). loss is a 0-dim fp32 tensor. metrics are detached 0-dim tensors:
          "loss/original", "loss/constructed", "pg_loss/original", "pg_loss/constructed": each branch's term with the
              same denominators as the loss (constructed before lambda), so they also sum over micro-batches;
          "clip_frac", "clip_frac/original", "clip_frac/constructed", "ratio_mean", "approx_kl" (k3 estimate of
              KL(pi_old || pi)), "kl_ref", "ots_weight_mean" (over constructed tokens), "zero_adv_frac/constructed"
              (share of constructed tokens with advantage exactly 0): LOCAL means over this call's masked tokens,
              0 when empty;
          "num_tokens/original", "num_tokens/constructed": local counts, to token-weight the local means when
              combining micro-batches.
    """
    shape = logprobs.shape
    if logprobs.dim() != 2:
        raise ValueError(f"policy_loss: logprobs must be [B, T], got shape {tuple(shape)}")
    _check_token_tensor("old_logprobs", old_logprobs, shape)
    _check_token_tensor("loss_mask", loss_mask, shape)
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None].expand(shape)
    _check_token_tensor("advantages", advantages, shape)
    if token_weights is not None:
        _check_token_tensor("token_weights", token_weights, shape)
    if ref_logprobs is not None:
        _check_token_tensor("ref_logprobs", ref_logprobs, shape)
    if is_constructed.shape != shape[:1] or is_constructed.dtype != torch.bool:
        raise ValueError(
            f"policy_loss: is_constructed must be bool [B={shape[0]}], got {is_constructed.dtype} "
            f"{tuple(is_constructed.shape)}"
        )
    if constructed_coef < 0:
        raise ValueError(f"policy_loss: constructed_coef (lambda) must be >= 0, got {constructed_coef}")
    if not (0 <= clip_eps_low < 1 and clip_eps_high >= 0):
        raise ValueError(f"policy_loss: need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}")
    if kl_coef < 0:
        raise ValueError(f"policy_loss: kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logprobs")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"policy_loss: kl_estimator={kl_estimator!r} is unknown; valid: {', '.join(KL_ESTIMATORS)}")

    # fp32 math whatever the model dtype; the casts stay in the autograd graph
    lp = logprobs.float()
    old = old_logprobs.detach().float()
    adv = advantages.detach().float()
    mask = loss_mask.bool()
    cons_rows = is_constructed[:, None]  # [B, 1]
    orig_mask = mask & ~cons_rows  # [B, T]
    cons_mask = mask & cons_rows  # [B, T]
    zeros = torch.zeros_like(lp)

    log_ratio = (lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()  # [B, T]
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [B, T] pessimistic bound

    tis = None
    if tis_cap > 0:
        if engine_logprobs is None:
            raise ValueError("policy_loss: tis_cap > 0 needs engine_logprobs")
        _check_token_tensor("engine_logprobs", engine_logprobs, shape)
        tis = (old - engine_logprobs.detach().float()).clamp(max=math.log(tis_cap)).exp()
        pg = torch.where(cons_rows, pg, tis * pg)

    kl = kl_penalty(lp, ref_logprobs.detach().float(), kl_estimator) if ref_logprobs is not None else None
    per_token = pg + kl_coef * kl if (kl is not None and kl_coef > 0) else pg

    if token_weights is None:
        weights = torch.ones_like(lp)
    else:
        weights = token_weights.detach().float()

    n_orig = _denominator(num_original_tokens, orig_mask, "num_original_tokens")
    n_cons = _denominator(num_constructed_tokens, cons_mask, "num_constructed_tokens")

    # torch.where, not multiplication by the mask: a NaN at a padded position cannot reach the sum
    orig_term = torch.where(orig_mask, per_token, zeros).sum() / n_orig
    cons_term = torch.where(cons_mask, weights * per_token, zeros).sum() / n_cons
    # lambda = 0 leaves the constructed rows out of the graph: their gradient is exactly 0 even if a constructed
    # token's loss is inf/NaN, and the loss is GRPO's on the originals
    loss = orig_term + constructed_coef * cons_term if constructed_coef != 0 else orig_term

    with torch.no_grad():
        clipped = pg_clipped > pg_unclipped
        metrics: dict[str, torch.Tensor] = {
            "loss/original": orig_term.detach(),
            "loss/constructed": cons_term.detach(),
            "pg_loss/original": torch.where(orig_mask, pg, zeros).sum() / n_orig,
            "pg_loss/constructed": torch.where(cons_mask, weights * pg, zeros).sum() / n_cons,
            "clip_frac": _masked_mean(clipped.float(), mask),
            "clip_frac/original": _masked_mean(clipped.float(), orig_mask),
            "clip_frac/constructed": _masked_mean(clipped.float(), cons_mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "approx_kl": _masked_mean(kl_penalty(old, lp, "k3"), mask),  # KL(pi_old || pi), samples from pi_old
            "kl_ref": _masked_mean(kl, mask) if kl is not None else zeros.new_zeros(()),
            "ots_weight_mean": _masked_mean(weights, cons_mask),
            "zero_adv_frac/constructed": _masked_mean((adv == 0).float(), cons_mask),
            "num_tokens/original": orig_mask.sum().float(),
            "num_tokens/constructed": cons_mask.sum().float(),
        }
        if tis is not None:
            metrics["tis/weight_mean"] = _masked_mean(tis, orig_mask)
            metrics["tis/truncated_frac"] = _masked_mean((tis >= tis_cap).float(), orig_mask)
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor, loss_mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None
) -> torch.Tensor:
    """Negative mean log-likelihood: -sum(mask * logprobs) / num_tokens.

    Args:
        logprobs: [B, T] log-probs of the target tokens (token-aligned).
        loss_mask: [B, T] 1/0 or bool.
        num_tokens: global token count for gradient accumulation (see module docstring); None = local count.

    Returns:
        0-dim fp32 loss.
    """
    if logprobs.shape != loss_mask.shape:
        raise ValueError(f"sft_loss: logprobs {tuple(logprobs.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    mask = loss_mask.bool()
    lp = logprobs.float()
    total = torch.where(mask, lp, torch.zeros_like(lp)).sum()
    return -total / _denominator(num_tokens, mask, "num_tokens")


# ---------------------------------------------------------------------------------------------------------------------
# Registry of policy losses (the trainer looks the configured name up here).


# Every registered policy loss has the signature of :func:`policy_loss` (same positional tensors and keywords).
PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register  # decorator: @register_policy_loss("name")
get_policy_loss = POLICY_LOSSES.get  # unknown names raise KeyError listing the valid ones
list_policy_losses = POLICY_LOSSES.names


register_policy_loss("ppo_clip")(policy_loss)


@register_policy_loss("sft_constructed")
def sft_constructed_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    is_constructed: torch.Tensor,
    num_constructed_tokens: int | float | torch.Tensor | None = None,
    **_unused,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's SFT baseline: supervised fine-tuning on TAPO's constructed trajectories, no RL term.

    Same rollouts, construction and splicing as TAPO (``tapo.enabled``), but the loss is the negative log-likelihood
    of the constructed trajectories whose advantage is > 0 (with DAE and ``tapo.constructed_zero_variance='fixed'``
    exactly the verified-correct ones), divided by the step's constructed token count; originals, clip, KL and OTS
    weights are ignored. Same signature as :func:`policy_loss` (the other keywords are accepted and unused)."""
    shape = logprobs.shape
    _check_token_tensor("loss_mask", loss_mask, shape)
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None].expand(shape)
    _check_token_tensor("advantages", advantages, shape)
    mask = loss_mask.bool() & is_constructed[:, None]
    keep = mask & (advantages.detach() > 0)
    lp = logprobs.float()
    loss = -torch.where(keep, lp, torch.zeros_like(lp)).sum() / _denominator(num_constructed_tokens, mask,
                                                                             "num_constructed_tokens")
    with torch.no_grad():
        metrics = {"loss/constructed": loss.detach(), "sft/trained_token_frac": _masked_mean(keep.float(), mask),
                   "num_tokens/original": (loss_mask.bool() & ~is_constructed[:, None]).sum().float(),
                   "num_tokens/constructed": mask.sum().float()}
    return loss, metrics
