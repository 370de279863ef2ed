"""Stage (3): scored rollouts -> training trajectories with provenance and advantages.

    builder = TrajectoryBuilder(tapo_cfg, algo_cfg, tokenizer, reward_fn, constructor, seed)
    result = builder.build(queries, rollouts, step)     # BuildResult(trajectories, metrics, advantage_stats)

Inputs: the step's queries (``rollout.group_index`` indexes this list) and their rollouts, already scored
(``rollout.reward``). Output, in order: the ORIGINAL trajectories (one per rollout, all response tokens SAMPLED,
engine log-probs kept, ``advantage_group`` = query index) minus dropped ones, then the CONSTRUCTED trajectories.

With ``tapo.enabled`` (spec steps 3-6), per query: the DCS gate (``is_candidate``: >= n_pos correct and >= n_neg
wrong), up to m_max (wrong, correct) pairs (``select_pairs``, rng seeded from (seed, step)), then one
``constructor.construct`` call for the whole step, ``splice`` of every parsed construction onto its wrong rollout,
and the verifier (``reward_fn`` on the decoded spliced response) scores each. Constructed trajectories of query i get
``advantage_group = len(queries) + i``: their own group per query. Failed constructions are counted by reason and
dropped; the step goes on.

Advantages come from the registered estimator ``algo.advantage_estimator`` with group id = query index for both
kinds: ``"dae"`` (``decoupled_advantages``, TAPO's DAE) normalises originals and constructed trajectories separately
and applies ``tapo.constructed_zero_variance`` to all-equal constructed groups; ``"grpo"`` mixes constructed
trajectories into their query's group (the "no DAE" ablation; with TAPO off both are plain GRPO).

``algo.drop_zero_variance_groups``: ORIGINAL trajectories whose query's originals all have the same reward (their
advantage is exactly 0) are dropped. Their policy-gradient term is zero, so dropping saves compute; it still changes
the loss through the token-mean normaliser (fewer tokens) and drops their KL term when ``kl_coef`` > 0. Constructed
trajectories are never dropped (with ``constructed_zero_variance="zero"`` some carry zero advantage; that fraction is
logged).

Metrics (``BuildResult.metrics``; ratios are NaN when their denominator is 0):

    traj/num_original, traj/num_constructed, traj/num_dropped_zero_variance
    adv/num_zero_variance_groups, adv/frac_zero_original
    tapo/num_candidates, tapo/constructions_attempted, tapo/parse_rate, tapo/splice_rate (spliced / attempted),
    tapo/acceptance_rate (spliced / parsed; a splice reusing < tapo.min_reused_tokens tokens fails as short_prefix),
    tapo/fail/<reason> (one per FailureReason, 0 when none), tapo/prefix_fraction_mean (over splice attempts),
    tapo/sampled_token_frac (share of constructed response tokens reused from the rollout), tapo/constructed_accuracy,
    tapo/frac_zero_adv_constructed, tapo/frac_zero_adv_constructed_tokens
"""
from __future__ import annotations

import math
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tapo_megatron.algorithms.advantages import AdvantageInput, AdvantageStats, ZeroVariancePolicy, get_advantage
from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.data.tokenizer import Tokenizer
from tapo_megatron.records import Provenance, Query, Rollout, Trajectory, TrajectoryKind
from tapo_megatron.rewards.registry import RewardFn
from tapo_megatron.rewards.scoring import score_batch
from tapo_megatron.trajectory.candidates import is_candidate, is_correct, select_pairs
from tapo_megatron.trajectory.constructors import ConstructionRequest, Constructor
from tapo_megatron.trajectory.parse import FailureReason
from tapo_megatron.trajectory.splice import splice

__all__ = ["BuildResult", "TrajectoryBuilder"]


@dataclass
class BuildResult:
    """What one step's trajectory builder produced."""

    trajectories: list[Trajectory]  # originals (minus dropped) then constructed; advantages filled in
    metrics: dict[str, float]  # see the module docstring
    advantage_stats: AdvantageStats | None = None  # None when there were no trajectories
    failures: dict[str, int] = field(default_factory=dict)  # construction failures by reason (also in metrics)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class TrajectoryBuilder:
    """Builds one RL step's trajectories (see the module docstring).

    Args:
        tapo: the ``tapo`` config section (enabled, n_pos, n_neg, m_max, min_prefix_match, max_spliced_tokens,
            constructed_zero_variance, constructed_fixed_advantage).
        algo: the ``algorithm`` config section (advantage_estimator, normalize_std, adv_eps,
            drop_zero_variance_groups).
        tokenizer: the policy's tokenizer.
        reward_fn: the verifier, ``(response_text, gold) -> float``; scores the spliced trajectories.
        constructor: required when ``tapo.enabled``; ignored otherwise.
        seed: with the step number, seeds the pairing draws (same seed and step -> same pairs).
    """

    def __init__(
        self,
        tapo: TapoConfig,
        algo: AlgorithmConfig,
        tokenizer: Tokenizer,
        reward_fn: RewardFn,
        constructor: Constructor | None = None,
        seed: int = 0,
    ) -> None:
        if tapo.enabled:
            if constructor is None:
                raise ValueError(
                    "tapo.enabled=True needs a constructor (see trajectory.constructors.build_constructor)"
                )
            if tapo.n_pos < 1 or tapo.n_neg < 1:
                raise ValueError(f"tapo.n_pos={tapo.n_pos} and tapo.n_neg={tapo.n_neg} must both be >= 1")
            if tapo.m_max < 1:
                raise ValueError(f"tapo.m_max={tapo.m_max} must be >= 1")
            if not 0.0 <= tapo.min_prefix_match <= 1.0:
                raise ValueError(f"tapo.min_prefix_match={tapo.min_prefix_match} must be in [0, 1]")
            if tapo.min_reused_tokens < 1:
                raise ValueError(f"tapo.min_reused_tokens={tapo.min_reused_tokens} must be >= 1")
            if tapo.max_spliced_tokens < 1:
                raise ValueError(f"tapo.max_spliced_tokens={tapo.max_spliced_tokens} must be >= 1")
            if algo.advantage_estimator == "grpo":
                warnings.warn(
                    "tapo.enabled with algorithm.advantage_estimator='grpo' mixes constructed trajectories into "
                    "their query's GRPO group (the no-DAE ablation); TAPO's DAE is advantage_estimator='dae'",
                    stacklevel=2,
                )
        ZeroVariancePolicy.parse(tapo.constructed_zero_variance)  # refuse a typo now, not at the first candidate
        self.tapo = tapo
        self.algo = algo
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.constructor = constructor if tapo.enabled else None
        self.seed = seed
        self.advantage_fn = get_advantage(algo.advantage_estimator)

    # -- public ----------------------------------------------------------------------------------------------------

    def build(self, queries: Sequence[Query], rollouts: Sequence[Rollout], step: int) -> BuildResult:
        """Trajectories with advantages for one step; see the module docstring for the metrics."""
        self._check_inputs(queries, rollouts)
        trajectories = [self._original(r) for r in rollouts]
        query_index = [r.group_index for r in rollouts]  # DAE keys groups on (query index, is_constructed)
        metrics: dict[str, float] = {}
        failures: dict[str, int] = {}
        if self.constructor is not None:
            constructed, constructed_query_index, metrics, failures = self._construct(queries, rollouts, step)
            trajectories += constructed
            query_index += constructed_query_index

        stats = self._assign_advantages(trajectories, query_index) if trajectories else None
        kept, n_dropped = self._drop_zero_variance(trajectories)
        metrics.update(self._summary(kept, n_dropped, stats))
        return BuildResult(trajectories=kept, metrics=metrics, advantage_stats=stats, failures=failures)

    # -- steps -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_inputs(queries: Sequence[Query], rollouts: Sequence[Rollout]) -> None:
        for row, r in enumerate(rollouts):
            if not 0 <= r.group_index < len(queries):
                raise ValueError(f"rollouts[{row}].group_index={r.group_index} is outside the {len(queries)} queries")
            if r.query_id != queries[r.group_index].id:
                raise ValueError(
                    f"rollouts[{row}].query_id={r.query_id!r} but queries[{r.group_index}].id="
                    f"{queries[r.group_index].id!r}"
                )
            if len(r.engine_logprobs) != len(r.response_ids):
                raise ValueError(
                    f"rollouts[{row}] has {len(r.engine_logprobs)} engine log-probs for {len(r.response_ids)} "
                    "response tokens"
                )

    @staticmethod
    def _original(r: Rollout) -> Trajectory:
        return Trajectory(
            query_id=r.query_id,
            kind=TrajectoryKind.ORIGINAL,
            advantage_group=r.group_index,
            prompt_ids=list(r.prompt_ids),
            response_ids=list(r.response_ids),
            provenance=[Provenance.SAMPLED] * len(r.response_ids),
            reward=float(r.reward),
            engine_logprobs=list(r.engine_logprobs),
            response_text=r.response_text,
        )

    def _construct(
        self, queries: Sequence[Query], rollouts: Sequence[Rollout], step: int
    ) -> tuple[list[Trajectory], list[int], dict[str, float], dict[str, int]]:
        """DCS -> pairs -> construct -> splice -> score.

        Returns (constructed trajectories, their query indices, metrics, failures by reason)."""
        tapo, tok = self.tapo, self.tokenizer
        groups: dict[int, list[Rollout]] = defaultdict(list)
        for r in rollouts:
            groups[r.group_index].append(r)
        # A string seed is hashed with sha512: the same (seed, step) gives the same pairs in every process.
        rng = random.Random(f"tapo-pairs:{self.seed}:{step}")
        requests: list[ConstructionRequest] = []
        n_candidates = 0
        for qi in sorted(groups):
            group = groups[qi]
            if not is_candidate([r.reward for r in group], tapo.n_pos, tapo.n_neg):
                continue
            n_candidates += 1
            for wrong, correct in select_pairs(group, tapo.m_max, rng):
                requests.append(ConstructionRequest.from_rollouts(queries[qi], wrong, correct, tok))

        constructions = self.constructor.construct(requests) if requests else []
        if len(constructions) != len(requests):
            raise RuntimeError(
                f"constructor {self.constructor.name!r} returned {len(constructions)} constructions for "
                f"{len(requests)} requests"
            )
        failures: Counter[str] = Counter()
        prefix_fractions: list[float] = []
        n_parsed = 0
        out: list[Trajectory] = []
        out_query_index: list[int] = []
        for request, construction in zip(requests, constructions):
            if construction.failure is not None:
                failures[construction.failure] += 1
                continue
            n_parsed += 1
            qi = request.wrong.group_index
            result = splice(
                request.query, request.wrong, construction.text, tok,
                min_prefix_match=tapo.min_prefix_match, max_tokens=tapo.max_spliced_tokens,
                advantage_group=len(queries) + qi,
            )
            prefix_fractions.append(result.prefix_fraction)
            if result.failure is None and result.prefix_tokens < tapo.min_reused_tokens:
                result.failure = FailureReason.SHORT_PREFIX.value  # a rewrite, not a micro-reflection
            if result.failure is not None:
                failures[result.failure] += 1
                continue
            trajectory = result.trajectory
            trajectory.response_text = tok.decode(trajectory.response_ids)
            out.append(trajectory)
            out_query_index.append(qi)
        # Score what will be trained on: the decoded spliced responses, in one batch, by the rollouts' verifier.
        golds = [queries[qi].answer for qi in out_query_index]
        for trajectory, reward in zip(out, score_batch(self.reward_fn, [t.response_text for t in out], golds)):
            trajectory.reward = reward

        attempted = len(requests)
        metrics: dict[str, float] = {
            "tapo/num_candidates": float(n_candidates),
            "tapo/constructions_attempted": float(attempted),
            "tapo/parse_rate": _ratio(n_parsed, attempted),
            "tapo/splice_rate": _ratio(len(out), attempted),
            "tapo/acceptance_rate": _ratio(len(out), n_parsed),  # of the parsed constructions, the share spliced
            "tapo/prefix_fraction_mean": _mean(prefix_fractions),
        }
        for reason in FailureReason:
            metrics[f"tapo/fail/{reason.value}"] = float(failures.get(reason.value, 0))
        for reason, count in failures.items():  # a custom constructor may report reasons of its own
            metrics.setdefault(f"tapo/fail/{reason}", float(count))
        return out, out_query_index, metrics, dict(failures)

    def _assign_advantages(self, trajectories: list[Trajectory], query_index: list[int]) -> AdvantageStats:
        rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
        group_ids = torch.tensor(query_index, dtype=torch.long)
        is_constructed = torch.tensor([t.kind is TrajectoryKind.CONSTRUCTED for t in trajectories], dtype=torch.bool)
        adv, stats = self.advantage_fn(AdvantageInput(
            rewards, group_ids, is_constructed, eps=self.algo.adv_eps, normalize_std=self.algo.normalize_std,
            constructed_zero_variance=self.tapo.constructed_zero_variance,
            fixed_value=self.tapo.constructed_fixed_advantage))
        for t, a in zip(trajectories, adv.tolist()):
            t.advantage = float(a)
        return stats

    def _drop_zero_variance(self, trajectories: list[Trajectory]) -> tuple[list[Trajectory], int]:
        """Drop originals whose query's originals share one reward value (and whose advantage is hence 0)."""
        if not self.algo.drop_zero_variance_groups:
            return trajectories, 0
        values: dict[int, set[float]] = defaultdict(set)
        for t in trajectories:
            if t.kind is TrajectoryKind.ORIGINAL:
                values[t.advantage_group].add(t.reward)
        # advantage == 0 as well: under the "grpo" estimator constructed members can give such a group a signal
        kept = [
            t for t in trajectories
            if not (t.kind is TrajectoryKind.ORIGINAL and len(values[t.advantage_group]) == 1 and t.advantage == 0.0)
        ]
        return kept, len(trajectories) - len(kept)

    def _summary(self, kept: list[Trajectory], n_dropped: int, stats: AdvantageStats | None) -> dict[str, float]:
        constructed = [t for t in kept if t.kind is TrajectoryKind.CONSTRUCTED]
        metrics: dict[str, float] = {
            "traj/num_original": float(len(kept) - len(constructed)),
            "traj/num_constructed": float(len(constructed)),
            "traj/num_dropped_zero_variance": float(n_dropped),
            "adv/num_zero_variance_groups": float(stats.num_zero_variance_groups) if stats else 0.0,
            "adv/frac_zero_original": stats.frac_zero_advantage_original if stats else math.nan,
        }
        if self.constructor is not None:
            n_tokens = sum(len(t.response_ids) for t in constructed)
            metrics.update({
                "tapo/sampled_token_frac": _mean(
                    [sum(p is Provenance.SAMPLED for p in t.provenance) / len(t.provenance) for t in constructed]
                ),
                "tapo/constructed_accuracy": _mean([float(is_correct(t.reward)) for t in constructed]),
                "tapo/frac_zero_adv_constructed": _mean([float(t.advantage == 0.0) for t in constructed]),
                "tapo/frac_zero_adv_constructed_tokens": _ratio(
                    sum(len(t.response_ids) for t in constructed if t.advantage == 0.0), n_tokens
                ),
            })
        return metrics
