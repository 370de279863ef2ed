"""Trajectories -> a TrainBatch: right-padded token-aligned tensors, old log-probs and OTS weights from the actor.

    batch = collate(trajectories, pad_id, max_tokens=budget)   # tokens, masks, advantages, provenance, lengths
    fill_policy_tensors(batch, actor, tapo_cfg)               # PPO reuse only: old log-probs (+ entropy -> OTS)
    loss_fn = make_policy_loss_fn(batch, algo_cfg, tapo_cfg)  # normalised by the GLOBAL token counts
"""
from __future__ import annotations

import dataclasses

import torch

from tapo_megatron.algorithms.branches import branch_denominators
from tapo_megatron.algorithms.losses import get_policy_loss
from tapo_megatron.algorithms.ots import ots_weights
from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.errors import DataError
from tapo_megatron.records import Provenance, TrainBatch, Trajectory, TrajectoryKind


def collate(trajectories: list[Trajectory], pad_id: int, train_constructed_prefix: bool = True,
            max_tokens: int = 0) -> TrainBatch:
    """Right-pad trajectories into a TrainBatch (``seq_lengths`` lets the actor trim each micro-batch).

    ``max_tokens`` (``parallel.max_tokens_per_micro_batch``; 0: none): a trajectory longer than the micro-batch
    token budget is refused here, naming its query, rather than failing later inside the actor.

    ``train_constructed_prefix=False`` keeps a constructed trajectory's SAMPLED prefix (the wrong rollout's own
    tokens up to the divergence point) as conditioning only: it gets no loss, so a positive constructed advantage
    does not reinforce the slip itself (the same tokens already appear, with their own advantage, in the wrong
    original). True (the spec's reading) trains every response token of the constructed trajectory.
    """
    if not trajectories:
        raise ValueError("collate: no trajectories to train on")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    over = [i for i, n in enumerate(lengths) if max_tokens and n > max_tokens]
    if over:
        t = trajectories[over[0]]
        raise DataError(f"trajectory of query {t.query_id!r} ({t.kind.value}) has {lengths[over[0]]} tokens, over "
                        f"parallel.max_tokens_per_micro_batch={max_tokens} ({len(over)} such trajectories); raise "
                        f"the budget or lower rollout.max_new_tokens / the prompt length")
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
        provenance=provenance, engine_logprobs=engine_logprobs, seq_lengths=torch.tensor(lengths))


def fill_policy_tensors(batch: TrainBatch, actor, tapo: TapoConfig) -> dict:
    """Old log-probs from a forward pass of the rollout-time policy (the actor before this step's update), and
    OTS weights from its log-probs and entropies on constructed response tokens. Returns mismatch metrics.
    Only PPO reuse (several optimizer steps per rollout batch) needs this pass; the on-policy step takes the same
    tensors detached from its training forward (``make_policy_loss_fn(..., on_policy=True)``)."""
    old, entropy = actor.compute_logprobs(batch.tokens, with_entropy=True, lengths=batch.seq_lengths)
    return set_policy_tensors(batch, old, entropy, tapo)


def set_policy_tensors(batch: TrainBatch, old: torch.Tensor, entropy: torch.Tensor, tapo: TapoConfig) -> dict:
    """Store old log-probs and OTS weights computed from (old, entropy) [B, T]; return entropy, OTS and
    engine-vs-actor mismatch metrics."""
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


def select_rows(batch: TrainBatch, rows: torch.Tensor) -> TrainBatch:
    """The trajectories ``rows`` of a batch (a PPO mini-batch), every per-row tensor indexed alike."""
    def pick(value):
        return value[rows] if isinstance(value, torch.Tensor) else [value[int(i)] for i in rows]  # lists: per row

    return dataclasses.replace(batch, **{f.name: pick(getattr(batch, f.name)) for f in dataclasses.fields(batch)
                                         if getattr(batch, f.name) is not None})


def batch_tensors(batch: TrainBatch) -> dict[str, torch.Tensor]:
    """The tensors the actor slices into micro-batches (is_constructed broadcast to [B, T] so it slices alike)."""
    return {"tokens": batch.tokens, "loss_mask": batch.loss_mask, "advantages": batch.advantages,
            "old_logprobs": batch.old_logprobs, "token_weights": batch.token_weights,
            "is_constructed": batch.is_constructed.float()[:, None].expand_as(batch.loss_mask).contiguous(),
            **({"ref_logprobs": batch.ref_logprobs} if batch.ref_logprobs is not None else {}),
            **({"lengths": batch.seq_lengths} if batch.seq_lengths is not None else {}),
            **({"engine_logprobs": batch.engine_logprobs} if batch.engine_logprobs is not None else {})}


def make_policy_loss_fn(batch: TrainBatch, algo: AlgorithmConfig, tapo: TapoConfig, on_policy: bool = False):
    """A LossFn for the actor: the registered policy loss ``algo.policy_loss`` (default TAPO's decoupled PPO-clip),
    normalised by the batch's global token counts (per branch or joint: ``tapo.branch_normalization``).

    ``on_policy``: the old log-probs are the training forward's own, detached (ratio exactly 1, the gradient that of
    the separate-pass path), and OTS weights come from them and the detached entropy the actor passes in
    ``mb["entropy"]`` (``actor.train_step(..., with_entropy=True)``)."""
    policy_loss = get_policy_loss(algo.policy_loss)
    mask = batch.loss_mask.bool()
    coef = tapo.constructed_coef if tapo.enabled else 0.0
    d_orig, d_cons = branch_denominators(float((mask & ~batch.is_constructed[:, None]).sum()),
                                         float((mask & batch.is_constructed[:, None]).sum()),
                                         coef, tapo.branch_normalization)

    def loss_fn(logprobs: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        is_constructed = mb["is_constructed"][:, 0].bool()
        if on_policy:
            old = logprobs.detach()
            cons_mask = mb["loss_mask"].bool() & is_constructed[:, None]
            mb = {**mb, "old_logprobs": old, "token_weights": ots_weights(
                old, mb["entropy"], cons_mask, tapo.ots_clip_min, tapo.ots_clip_max)}
        loss, metrics = policy_loss(
            logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
            is_constructed=is_constructed, token_weights=mb["token_weights"],
            constructed_coef=coef,
            clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, kl_coef=algo.kl_coef,
            ref_logprobs=mb.get("ref_logprobs"), kl_estimator=algo.kl_estimator,
            num_original_tokens=d_orig, num_constructed_tokens=d_cons,
            **({"engine_logprobs": mb["engine_logprobs"], "tis_cap": algo.tis_cap} if algo.tis_cap > 0 else {}))
        return loss, metrics

    return loss_fn
