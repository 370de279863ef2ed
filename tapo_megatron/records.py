"""Typed records that cross stage boundaries.

    Query --(rollout)--> Rollout --(reward, trajectory builder)--> Trajectory --(collate)--> TrainBatch

No string-keyed dicts travel between stages: each stage takes and returns these dataclasses.
Token-aligned arrays follow one convention everywhere: entry ``t`` belongs to token ``t`` of the sequence
(``logprobs[t] = log p(tokens[t] | tokens[:t])``), so position 0 of a sequence never carries a log-prob.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token was sampled (it is included in the response ids)
    LENGTH = "length"  # max_new_tokens reached
    ABORT = "abort"  # the engine died or the request was cancelled


class Provenance(enum.IntEnum):
    """Where a token of a trajectory came from."""

    PROMPT = 0  # part of the query's prompt, never trained on
    SAMPLED = 1  # sampled by the policy during rollout (on-policy)
    INJECTED = 2  # written by the constructor (diagnosis, correction, continuation)


class TrajectoryKind(str, enum.Enum):
    ORIGINAL = "original"  # a plain rollout, as sampled
    CONSTRUCTED = "constructed"  # a micro-reflective trajectory spliced from a wrong rollout


@dataclass
class Query:
    """One training or evaluation problem."""

    id: str  # unique, stable across runs (used for provenance and resume)
    problem: str  # problem text, without chat formatting
    answer: str  # gold answer as the verifier expects it
    prompt_ids: list[int] = field(default_factory=list)  # chat-formatted prompt tokens
    source: str = ""  # dataset name / origin


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # per-request seed; None draws from the engine's generator


@dataclass
class Generation:
    """What an engine returns for one prompt."""

    token_ids: list[int]  # response tokens (stop token included when finish_reason is STOP)
    logprobs: list[float]  # engine log-prob of each response token under the sampling distribution's model
    finish_reason: FinishReason
    weight_version: int = 0  # weight version of the engine that produced it


@dataclass
class Rollout:
    """One sampled response to a query, with its reward."""

    query_id: str
    group_index: int  # index of the query within the step's batch (GRPO group)
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]  # one per response token
    finish_reason: FinishReason
    weight_version: int
    response_text: str = ""
    reward: float = 0.0


@dataclass
class Trajectory:
    """A sequence that reaches the loss: an original rollout or a constructed one."""

    query_id: str
    kind: TrajectoryKind
    advantage_group: int  # trajectories normalised together share this id (DAE: originals and constructed differ)
    prompt_ids: list[int]
    response_ids: list[int]
    provenance: list[Provenance]  # one per response token (SAMPLED or INJECTED)
    reward: float
    engine_logprobs: list[float] | None = None  # per response token when all tokens were sampled; else None
    advantage: float = 0.0  # filled in by the advantage stage
    response_text: str = ""

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass
class TrainBatch:
    """Right-padded token-aligned tensors for one optimizer step (global batch on this DP rank).

    All tensors are [B, T] unless stated; entry t refers to token t (see module docstring).
    """

    tokens: torch.Tensor  # long
    loss_mask: torch.Tensor  # float, 1 on response tokens
    advantages: torch.Tensor  # float, per-token advantage (the trajectory's advantage broadcast)
    old_logprobs: torch.Tensor  # float, log-probs of the rollout-time policy (actor recompute)
    token_weights: torch.Tensor  # float, OTS weights (1 on original trajectories)
    is_constructed: torch.Tensor  # bool [B]
    provenance: torch.Tensor  # long, Provenance per token (PROMPT on prompt and padding)
    ref_logprobs: torch.Tensor | None = None  # float, reference-model log-probs when KL is on
    engine_logprobs: torch.Tensor | None = None  # float, engine log-probs on sampled tokens (0 elsewhere)
    teacher_prompts: list[list[int]] | None = None  # OPSD: per row, the teacher's context (reference solution)
    seq_lengths: torch.Tensor | None = None  # long [B], tokens per row before padding (the actor trims to these)

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]
