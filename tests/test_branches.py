"""Branch balance of TAPO's loss: per-branch vs joint normalisation (lambda = 0 exact in both), and the diagnostic
branch gradients through the real Megatron actor (they must add up to the step's own gradient).

Hand values (``branch_denominators``): N_orig = 10, N_cons = 4
    per_branch, any lambda      -> (10, 4)
    joint, lambda = 0.5         -> (10 + 0.5 * 4, same) = (12, 12)
    joint, lambda = 0           -> (10, 10): GRPO's denominator
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from tapo_megatron.algorithms.branches import branch_denominators, gradient_comparison
from tapo_megatron.config import AlgorithmConfig, OptimizerConfig, ParallelConfig, TapoConfig
from tapo_megatron.parallel import init_parallel
from tapo_megatron.records import FinishReason, Provenance, Rollout, Trajectory, TrajectoryKind
from tapo_megatron.rewards import get_reward
from tapo_megatron.tasks.arithmetic import ArithmeticStepVerifier, ArithmeticTask, ArithmeticTokenizer
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.batch import batch_tensors, collate, fill_policy_tensors, make_policy_loss_fn
from tapo_megatron.training.branch_grads import branch_gradient_stats
from tapo_megatron.trajectory.builder import TrajectoryBuilder
from tapo_megatron.trajectory.constructors import build_constructor
from test_tapo_step import TINY_SHAPE

torch.set_num_threads(1)


def test_branch_denominators_hand_values():
    assert branch_denominators(10, 4, 0.5, "per_branch") == (10, 4)
    assert branch_denominators(10, 4, 0.5, "joint") == (12, 12)
    assert branch_denominators(10, 4, 0.0, "joint") == (10, 10)
    assert branch_denominators(0, 0, 1.0, "joint") == (1.0, 1.0)  # empty branches sum to 0; no 0/0
    with pytest.raises(ValueError, match="per_branch, joint"):
        branch_denominators(1, 1, 1.0, "mixed")


def test_gradient_comparison_hand_values():
    m = gradient_comparison(9.0, 16.0, 6.0)  # |a| = 3, |b| = 4, cos = 6 / 12
    assert m == {"branch/grad_norm_original": 3.0, "branch/grad_norm_constructed": 4.0,
                 "branch/grad_norm_ratio": 4 / 3, "branch/grad_cosine": 0.5}
    assert math.isnan(gradient_comparison(0.0, 4.0, 0.0)["branch/grad_cosine"])


def _traj(kind, response, adv, prompt=(5, 6)):
    return Trajectory(query_id="q", kind=kind, advantage_group=0, prompt_ids=list(prompt), response_ids=list(response),
                      provenance=[Provenance.SAMPLED] * len(response), reward=0.0, advantage=adv)


def _batch():
    """3 originals (5 tokens) + 2 constructed (6 tokens) with random old log-probs and OTS weights."""
    trajs = [_traj(TrajectoryKind.ORIGINAL, [2, 3], 1.0), _traj(TrajectoryKind.ORIGINAL, [4, 3, 1], -0.5),
             _traj(TrajectoryKind.CONSTRUCTED, [2, 2, 1], 0.7), _traj(TrajectoryKind.CONSTRUCTED, [3, 4, 1], -0.2)]
    batch = collate(trajs, pad_id=0)
    g = torch.Generator().manual_seed(0)
    batch.old_logprobs = -torch.rand(batch.tokens.shape, generator=g)
    batch.token_weights = torch.where(batch.is_constructed[:, None], torch.rand(batch.tokens.shape, generator=g) * 2,
                                      torch.ones(batch.tokens.shape))
    return trajs, batch


def _loss_and_grad(batch, tapo, lp):
    lp = lp.clone().requires_grad_(True)
    loss, _ = make_policy_loss_fn(batch, AlgorithmConfig(), tapo)(lp, batch_tensors(batch))
    loss.backward()
    return loss.detach(), lp.grad


def test_joint_normalisation_lambda_zero_is_grpo_and_lambda_one_is_one_token_mean():
    trajs, batch = _batch()
    lp = batch.old_logprobs + 0.1 * torch.randn(batch.tokens.shape, generator=torch.Generator().manual_seed(1))
    orig = collate(trajs[:2], pad_id=0)
    orig.old_logprobs = batch.old_logprobs[:2, :orig.tokens.shape[1]]
    grpo_loss, grpo_grad = _loss_and_grad(orig, TapoConfig(enabled=False), lp[:2, :orig.tokens.shape[1]])
    for mode in ("per_branch", "joint"):
        loss0, grad0 = _loss_and_grad(batch, TapoConfig(enabled=True, constructed_coef=0.0, branch_normalization=mode),
                                      lp)
        assert torch.equal(loss0, grpo_loss)  # exactly GRPO, not approximately
        assert torch.equal(grad0[:2, :orig.tokens.shape[1]], grpo_grad) and not grad0[2:].any()
    # lambda = 1, joint: one token mean over the 5 + 6 response tokens of both branches
    loss_j, _ = _loss_and_grad(batch, TapoConfig(enabled=True, constructed_coef=1.0, branch_normalization="joint"), lp)
    loss_p, _ = _loss_and_grad(batch, TapoConfig(enabled=True, constructed_coef=1.0), lp)
    ratio = (lp - batch.old_logprobs).exp()
    per_token = -batch.advantages * ratio * batch.token_weights * batch.loss_mask  # ratios stay within the clip
    assert ((ratio - 1).abs()[batch.loss_mask.bool()] < 0.2).all()
    s_orig, s_cons = float(per_token[:2].sum()), float(per_token[2:].sum())
    assert float(loss_j) == pytest.approx((s_orig + s_cons) / 11, rel=1e-6)
    assert float(loss_p) == pytest.approx(s_orig / 5 + s_cons / 6, rel=1e-6)


def test_branch_gradients_add_up_to_the_step_gradient_through_the_actor():
    torch.manual_seed(0)
    tokenizer, task = ArithmeticTokenizer(), ArithmeticTask()
    shape = TINY_SHAPE
    actor = MegatronActor(shape, init_parallel(1, 1, seed=11), OptimizerConfig(lr=1e-3, clip_grad=1e9),
                          ParallelConfig(micro_batch_size=8))
    rng, reward = random.Random(0), get_reward("exact")
    queries = task.generate_split(2, seed=5, split="train")
    rollouts = []
    for i, q in enumerate(queries):
        for j in range(8):
            text = task.solution(q.problem) if j < 3 else task.wrong_response(q.problem, rng)
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            rollouts.append(Rollout(q.id, i, q.prompt_ids, ids, [0.0] * len(ids), FinishReason.STOP, 0, text,
                                    reward(text, q.answer)))
    algo = AlgorithmConfig(advantage_estimator="dae")
    stats, batches = {}, {}
    for mode in ("per_branch", "joint"):  # both at the same starting weights
        tapo = TapoConfig(enabled=True, constructor="step_verifier", branch_normalization=mode, branch_grad_interval=1)
        builder = TrajectoryBuilder(tapo, algo, tokenizer, reward,
                                    build_constructor(tapo, step_verifier=ArithmeticStepVerifier()), seed=0)
        batch = collate(builder.build(queries, rollouts, step=0).trajectories, tokenizer.pad_id)
        fill_policy_tensors(batch, actor, tapo)
        stats[mode], batches[mode] = branch_gradient_stats(actor, batch, algo, tapo), (batch, tapo)
    # joint weighs the 2-4x fewer constructed tokens by their count: a smaller share of the update
    assert stats["joint"]["branch/grad_norm_ratio"] < 0.9 * stats["per_branch"]["branch/grad_norm_ratio"]
    batch, tapo = batches["joint"]
    step = actor.train_step(batch_tensors(batch), make_policy_loss_fn(batch, algo, tapo))
    na, nb, cos = (stats["joint"][k] for k in ("branch/grad_norm_original", "branch/grad_norm_constructed",
                                                 "branch/grad_cosine"))
    assert na > 0 and nb > 0 and -1 <= cos <= 1
    # the diagnostic passes left no gradient behind, and the branches add up to the step's own gradient
    assert math.sqrt(na * na + nb * nb + 2 * na * nb * cos) == pytest.approx(step.grad_norm, rel=1e-4)
