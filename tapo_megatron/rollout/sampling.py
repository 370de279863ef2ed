"""The one sampling path: K responses per query from an engine, as typed ``Rollout`` records.

    params = rollout_sampling(cfg.rollout, tokenizer.eos_id, seed)   # the rollout section's sampling settings
    rollouts = sample_groups(engine, queries, k, params, tokenizer)
    rollout_metrics(rollouts)                                       # rollout/accuracy, reward, length, truncated

Rollouts come in query order, ``k`` per query (``group_index`` = the query's position), each with the engine's
per-token log-probs, finish reason, weight version and decoded text (special tokens such as eos dropped). The RL
loop, evaluation and the cold-start build all sample through this function, in one engine call per batch.
"""
from __future__ import annotations

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
