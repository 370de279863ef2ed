"""Trajectories -> a TrainBatch: right-padded token-aligned tensors, old log-probs and OTS weights from the actor.

    batch = collate(trajectories, pad_id)                      # tokens, masks, advantages, provenance
    fill_policy_tensors(batch, actor, tapo_cfg)               # old log-probs (+ entropy -> OTS weights)
    loss_fn = make_policy_loss_fn(batch, algo_cfg, tapo_cfg)  # normalised by the GLOBAL token counts
"""
from __future__ import annotations

import torch

from tapo_megatron.algorithms.losses import get_policy_loss
from tapo_megatron.algorithms.ots import ots_weights
from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.records import Provenance, TrainBatch, Trajectory, TrajectoryKind


def collate(trajectories: list[Trajectory], pad_id: int, train_constructed_prefix: bool = True) -> TrainBatch:
    """Right-pad trajectories into a TrainBatch.

    ``train_constructed_prefix=False`` keeps a constructed trajectory's SAMPLED prefix (the wrong rollout's own
    tokens up to the divergence point) as conditioning only: it gets no loss, so a positive constructed advantage
    does not reinforce the slip itself (the same tokens already appear, with their own advantage, in the wrong
    original). True (the spec's reading) trains every response token of the constructed trajectory.
    """
    if not trajectories:
        raise ValueError("collate: no trajectories to train on")
    seq_len = max(len(t.prompt_ids) + len(t.response_ids) for t in trajectories)
    b = len(trajectories)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_len))
    advantages = torch.zeros((b, seq_len))
    provenance = torch.full((b, seq_len), int(Provenance.PROMPT), dtype=torch.long)
    engine_logprobs = torch.zeros((b, seq_len))
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_ids), len(t.response_ids)
        tokens[i, :p + r] = torch.tensor(t.prompt_ids + t.response_ids)
        loss_mask[i, p:p + r] = 1.0
        if not train_constructed_prefix and t.kind == TrajectoryKind.CONSTRUCTED:
            prefix = sum(1 for x in t.provenance if x == Provenance.SAMPLED)
            loss_mask[i, p:p + prefix] = 0.0
        advantages[i, p:p + r] = t.advantage
        provenance[i, p:p + r] = torch.tensor([int(x) for x in t.provenance])
        if t.engine_logprobs is not None:
            engine_logprobs[i, p:p + r] = torch.tensor(t.engine_logprobs, dtype=torch.float)
    return TrainBatch(
        tokens=tokens, loss_mask=loss_mask, advantages=advantages, old_logprobs=torch.zeros((b, seq_len)),
        token_weights=torch.ones((b, seq_len)),
        is_constructed=torch.tensor([t.kind == TrajectoryKind.CONSTRUCTED for t in trajectories]),
        provenance=provenance, engine_logprobs=engine_logprobs)


def fill_policy_tensors(batch: TrainBatch, actor, tapo: TapoConfig) -> dict:
    """Old log-probs from a forward pass of the rollout-time policy (the actor before this step's update), and
    OTS weights from its log-probs and entropies on constructed response tokens. Returns mismatch metrics."""
    old, entropy = actor.compute_logprobs(batch.tokens, with_entropy=True)
    batch.old_logprobs = old
    response = batch.loss_mask.bool()
    metrics = {"entropy": float(entropy[response].mean()) if response.any() else 0.0}
    if batch.is_constructed.any():
        constructed_mask = batch.loss_mask.bool() & batch.is_constructed[:, None]
        batch.token_weights = ots_weights(old, entropy, constructed_mask, tapo.ots_clip_min, tapo.ots_clip_max)
        injected = constructed_mask & (batch.provenance == int(Provenance.INJECTED))
        if injected.any():
            metrics["ots/weight_injected"] = float(batch.token_weights[injected].mean())
        sampled = constructed_mask & (batch.provenance == int(Provenance.SAMPLED))
        if sampled.any():
            metrics["ots/weight_sampled_prefix"] = float(batch.token_weights[sampled].mean())
    # Engine vs actor log-probs on the same sampled tokens of original rollouts: the train/inference mismatch.
    sampled = batch.loss_mask.bool() & ~batch.is_constructed[:, None]
    if sampled.any() and batch.engine_logprobs is not None:
        diff = (batch.engine_logprobs - old)[sampled]
        metrics["mismatch/logprob_abs_mean"] = float(diff.abs().mean())
        metrics["mismatch/logprob_abs_max"] = float(diff.abs().max())
    return metrics


def batch_tensors(batch: TrainBatch) -> dict[str, torch.Tensor]:
    """The tensors the actor slices into micro-batches (is_constructed broadcast to [B, T] so it slices alike)."""
    return {"tokens": batch.tokens, "loss_mask": batch.loss_mask, "advantages": batch.advantages,
            "old_logprobs": batch.old_logprobs, "token_weights": batch.token_weights,
            "is_constructed": batch.is_constructed.float()[:, None].expand_as(batch.loss_mask).contiguous(),
            **({"ref_logprobs": batch.ref_logprobs} if batch.ref_logprobs is not None else {}),
            **({"engine_logprobs": batch.engine_logprobs} if batch.engine_logprobs is not None else {})}


def make_policy_loss_fn(batch: TrainBatch, algo: AlgorithmConfig, tapo: TapoConfig):
    """A LossFn for the actor: the registered policy loss ``algo.policy_loss`` (default TAPO's decoupled PPO-clip),
    normalised by the batch's global token counts."""
    policy_loss = get_policy_loss(algo.policy_loss)
    mask = batch.loss_mask.bool()
    n_orig = float((mask & ~batch.is_constructed[:, None]).sum())
    n_cons = float((mask & batch.is_constructed[:, None]).sum())

    def loss_fn(logprobs: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics = policy_loss(
            logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
            is_constructed=mb["is_constructed"][:, 0].bool(), token_weights=mb["token_weights"],
            constructed_coef=tapo.constructed_coef if tapo.enabled else 0.0,
            clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, kl_coef=algo.kl_coef,
            ref_logprobs=mb.get("ref_logprobs"), kl_estimator=algo.kl_estimator,
            num_original_tokens=max(n_orig, 1.0), num_constructed_tokens=max(n_cons, 1.0),
            **({"engine_logprobs": mb["engine_logprobs"], "tis_cap": algo.tis_cap} if algo.tis_cap > 0 else {}))
        return loss, metrics

    return loss_fn
