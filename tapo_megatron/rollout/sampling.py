"""The one sampling path: K responses per query from an engine, as typed ``Rollout`` records.

    params = rollout_sampling(cfg.rollout, tokenizer.eos_id, seed)   # the rollout section's sampling settings
    rollouts = sample_groups(engine, queries, k, params, tokenizer)
    rollout_metrics(rollouts)                                       # rollout/accuracy, reward, length, truncated

Rollouts come in query order, ``k`` per query (``group_index`` = the query's position), each with the engine's
per-token log-probs, finish reason, weight version and decoded text (special tokens such as eos dropped). The RL
loop, evaluation and the cold-start build all sample through this function, in one engine call per batch.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence

from tapo_megatron.config import RolloutConfig
from tapo_megatron.records import FinishReason, Query, Rollout, SamplingParams
from tapo_megatron.rollout.base import RolloutEngine


def sample_groups(engine: RolloutEngine, queries: Sequence[Query], k: int, params: SamplingParams,
                  tokenizer) -> list[Rollout]:
    if k < 1:
        raise ValueError(f"sample_groups: k must be >= 1, got {k}")
    gens = engine.generate([q.prompt_ids for q in queries for _ in range(k)], params)
    if len(gens) != k * len(queries):
        raise RuntimeError(f"rollout engine returned {len(gens)} generations for {k * len(queries)} prompts")
    return [Rollout(query_id=q.id, group_index=i, prompt_ids=q.prompt_ids, response_ids=g.token_ids,
                    engine_logprobs=g.logprobs, finish_reason=g.finish_reason, weight_version=g.weight_version,
                    response_text=tokenizer.decode(g.token_ids))
            for i, q in enumerate(queries) for g in gens[i * k:(i + 1) * k]]


def sample_fresh_groups(engine: RolloutEngine, queries: Sequence[Query], k: int, params: SamplingParams, tokenizer,
                        current_version: int, max_staleness: int = 0, max_rounds: int = 2
                        ) -> tuple[list[Rollout], dict[str, float]]:
    """``sample_groups``, keeping only groups whose every rollout was sampled with weights at most
    ``max_staleness`` versions behind ``current_version`` (e.g. from an engine that restarted on its launch
    weights). A stale group is resampled (with a shifted seed) up to ``max_rounds`` times, then dropped.

    Returns the fresh rollouts (``group_index`` still the query's position) and ``rollout/resampled_stale``,
    ``rollout/dropped_stale`` (rollouts) and ``rollout/weight_version_min``."""
    rollouts = sample_groups(engine, queries, k, params, tokenizer)
    groups = {i: rollouts[i * k:(i + 1) * k] for i in range(len(queries))}
    resampled = 0

    def stale() -> list[int]:
        return [i for i, g in groups.items() if any(current_version - r.weight_version > max_staleness for r in g)]

    for attempt in range(1, max_rounds + 1):
        redo = stale()
        if not redo:
            break
        seed = None if params.seed is None else params.seed + 7919 * attempt
        fresh = sample_groups(engine, [queries[i] for i in redo], k, dataclasses.replace(params, seed=seed), tokenizer)
        for j, i in enumerate(redo):
            groups[i] = [dataclasses.replace(r, group_index=i) for r in fresh[j * k:(j + 1) * k]]
        resampled += k * len(redo)
    dropped = stale()
    kept = [r for i, g in groups.items() if i not in dropped for r in g]
    metrics = {"rollout/resampled_stale": float(resampled), "rollout/dropped_stale": float(k * len(dropped)),
               "rollout/weight_version_min": float(min((r.weight_version for r in kept), default=current_version))}
    return kept, metrics


def rollout_sampling(rollout: RolloutConfig, eos_id: int, seed: int | None) -> SamplingParams:
    """Sampling for RL rollouts: ``rollout.temperature / top_p / max_new_tokens``, stopping at eos."""
    return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                          max_new_tokens=rollout.max_new_tokens, stop_token_ids=(eos_id,), seed=seed)


def rollout_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Scored rollouts' ``rollout/*`` metrics: accuracy, mean reward, mean response length, truncated share, and
    ``rollout/query_crc`` (CRC-32 of the step's query ids: runs of a paired experiment must log the same)."""
    n = max(1, len(rollouts))
    query_ids = "\n".join(dict.fromkeys(r.query_id for r in rollouts))
    return {"rollout/query_crc": float(zlib.crc32(query_ids.encode())), "rollout/accuracy": sum(r.reward > 0.5 for r in rollouts) / n,
            "rollout/reward": sum(r.reward for r in rollouts) / n,
            "rollout/response_length": sum(len(r.response_ids) for r in rollouts) / n,
            "rollout/truncated": sum(r.finish_reason == FinishReason.LENGTH for r in rollouts) / n}
