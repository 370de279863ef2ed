"""Engine/trainer mismatch handling: truncated importance sampling (off by default) and the staleness rule.

* TIS: engine log-probs perturbed by a known amount ``d`` below the trainer's scale each sampled token's
  policy-gradient term by exactly ``exp(d)`` (and by the cap once ``exp(d)`` exceeds it); constructed rows are not
  touched; ``tis_cap=0`` gives the plain loss bit for bit.
* Staleness: rollouts sampled with weights older than ``rollout.max_weight_staleness`` versions are resampled, then
  dropped, and counted.
"""
import math

import pytest
import torch

from tapo_megatron.algorithms.losses import policy_loss
from tapo_megatron.config import AlgorithmConfig, RolloutConfig
from tapo_megatron.records import FinishReason, Generation, Query, SamplingParams
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.rollout.sampling import sample_fresh_groups


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(3, 5, generator=g)).requires_grad_()
    old = lp.detach() + 0.01 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, generator=g)
    mask = torch.ones(3, 5)
    cons = torch.tensor([False, False, True])
    return lp, old, adv, mask, cons


def _loss(lp, old, adv, mask, cons, **kw):
    loss, metrics = policy_loss(lp, old, adv, mask, is_constructed=cons, token_weights=None, constructed_coef=1.0,
                                clip_eps_low=10.0 / 11, clip_eps_high=10.0, **kw)  # wide clip: pg is linear
    return loss, metrics


@pytest.mark.parametrize("delta,cap", [(0.3, 2.0), (1.5, 2.0)])
def test_tis_scales_sampled_tokens_by_the_known_perturbation(delta, cap):
    lp, old, adv, mask, cons = _inputs()
    plain, _ = _loss(lp, old, adv, mask, cons)
    engine = old - delta  # the engine gave every sampled token exp(delta) less probability than the trainer
    tis, m = _loss(lp, old, adv, mask, cons, engine_logprobs=engine, tis_cap=cap)
    w = min(math.exp(delta), cap)
    orig_only, _ = _loss(lp, old, adv, mask * (~cons)[:, None], cons)
    cons_only, _ = _loss(lp, old, adv, mask * cons[:, None], cons)
    # each branch is divided by its own token count, so the loss is (w * originals' term) + constructed term
    torch.testing.assert_close(tis, w * orig_only + cons_only, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tis, plain)
    assert float(m["tis/weight_mean"]) == pytest.approx(w, rel=1e-5)
    assert float(m["tis/truncated_frac"]) == (1.0 if math.exp(delta) >= cap else 0.0)


def test_tis_is_off_by_default():
    assert AlgorithmConfig().tis_cap == 0.0 and RolloutConfig().max_weight_staleness == 0
    lp, old, adv, mask, cons = _inputs(1)
    plain, _ = _loss(lp, old, adv, mask, cons)
    same, m = _loss(lp, old, adv, mask, cons, engine_logprobs=old - 5.0)
    assert torch.equal(plain, same) and "tis/weight_mean" not in m
    with pytest.raises(ValueError, match="tis_cap > 0 needs engine_logprobs"):
        _loss(lp, old, adv, mask, cons, tis_cap=2.0)


class _VersionedEngine(RolloutEngine):
    """Answers with a scripted weight version per call (a restarted engine first, then a synced one)."""

    def __init__(self, versions):
        self.versions, self.calls = list(versions), 0

    def generate(self, prompts, params):
        version = self.versions[min(self.calls, len(self.versions) - 1)]
        self.calls += 1
        return [Generation([1, 2], [-0.1, -0.2], FinishReason.LENGTH, weight_version=version) for _ in prompts]

    def update_weights(self, buckets, version): ...
    weight_version = 0
    def flush_cache(self): ...
    def release_memory(self): ...
    def resume_memory(self): ...
    def shutdown(self): ...
    def prompt_logprobs(self, tokens):
        raise AssertionError("a scripted engine has no model to score prompts with")

    def health(self): return True


class _Tok:
    def decode(self, ids):
        return " ".join(map(str, ids))


QUERIES = [Query(id=f"q{i}", problem="p", answer="1", prompt_ids=[3, 4 + i]) for i in range(3)]


def test_stale_rollouts_are_resampled_and_counted():
    engine = _VersionedEngine([3, 5])  # first batch from an engine still at version 3; the trainer is at 5
    rollouts, m = sample_fresh_groups(engine, QUERIES, 2, SamplingParams(seed=1), _Tok(), 5, max_staleness=0)
    assert len(rollouts) == 6 and all(r.weight_version == 5 for r in rollouts)
    assert [r.group_index for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert m["rollout/resampled_stale"] == 6 and m["rollout/dropped_stale"] == 0 and engine.calls == 2
    fresh, m = sample_fresh_groups(_VersionedEngine([4]), QUERIES, 2, SamplingParams(), _Tok(), 5, max_staleness=1)
    assert len(fresh) == 6 and m["rollout/resampled_stale"] == 0  # one version behind is allowed at staleness 1


def test_rollouts_that_stay_stale_are_dropped_never_trained_on():
    engine = _VersionedEngine([0])
    rollouts, m = sample_fresh_groups(engine, QUERIES, 2, SamplingParams(), _Tok(), 2, max_staleness=0, max_rounds=2)
    assert rollouts == [] and m["rollout/dropped_stale"] == 6 and m["rollout/resampled_stale"] == 12
