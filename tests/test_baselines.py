"""The paper's baselines as algorithm choices: SFT on the constructed trajectories (``algorithm.policy_loss=
sft_constructed``) and OPSD (``algorithm.distillation=opsd``), plus the demo's policy constructor, through ``train()``.

SFT hand values (one original, two constructed rows; token 0 is prompt):
    logprobs row 1 (constructed, A = +0.5) [_, -1, -2], row 2 (constructed, A = -1) [_, -3, -4]
    loss = -(-1 - 2) / 4 constructed tokens = 0.75; d loss / d lp = -1/4 on row 1, 0 on rows 0 and 2
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _loop_worker import loop_config  # noqa: E402

from tapo_megatron.algorithms.losses import get_policy_loss  # noqa: E402
from tapo_megatron.config import ConfigError  # noqa: E402
from tapo_megatron.logging.tracker import read_metrics  # noqa: E402
from tapo_megatron.train import train  # noqa: E402

torch.set_num_threads(1)


def test_sft_constructed_loss_hand_values():
    fn = get_policy_loss("sft_constructed")
    lp = torch.tensor([[0.0, -0.5, -0.5], [9.0, -1.0, -2.0], [9.0, -3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0]] * 3)
    cons = torch.tensor([False, True, True])
    loss, m = fn(lp, torch.zeros(3, 3), torch.tensor([1.0, 0.5, -1.0]), mask, is_constructed=cons,
                 token_weights=torch.full((3, 3), 7.0), constructed_coef=1.0, clip_eps_low=0.2)
    assert float(loss) == pytest.approx(0.75)
    loss.backward()
    assert torch.equal(lp.grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.25, -0.25], [0.0, 0.0, 0.0]]))
    assert float(m["sft/trained_token_frac"]) == 0.5 and float(m["num_tokens/constructed"]) == 4


def test_baseline_configs_are_refused_when_they_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="sft_constructed.*tapo.enabled=true"):
        loop_config(tmp_path, 1, ["tapo.enabled=false", "algorithm.policy_loss=sft_constructed"])
    with pytest.raises(ConfigError, match="opsd.*tapo.enabled=false"):
        loop_config(tmp_path, 1, ["algorithm.distillation=opsd"])
    with pytest.raises(ConfigError, match="distillation='kd'"):
        loop_config(tmp_path, 1, ["algorithm.distillation=kd"])
    with pytest.raises(ConfigError, match="branch_normalization"):
        loop_config(tmp_path, 1, ["tapo.branch_normalization=global"])


def test_opsd_teacher_is_the_same_model_shown_the_reference(tmp_path):
    from tapo_megatron.tasks.arithmetic import TOKENIZER, solution_text
    from tapo_megatron.training.batch import collate, fill_policy_tensors
    from tapo_megatron.training.distill import attach_teacher_prompts, opsd_advantages

    cfg = loop_config(tmp_path, 1, ["tapo.enabled=false", "algorithm.distillation=opsd",
                                    "algorithm.drop_zero_variance_groups=false"])
    result = train(cfg)  # one OPSD step through the loop, then reuse its actor, task and engine
    rows = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert rows[0]["opsd/reverse_kl"] != 0 and "opsd/teacher_logprob" in rows[0]
    actor, task = result.actor, result.task
    queries = task.train[:2]
    from tapo_megatron.records import Provenance, Trajectory, TrajectoryKind
    trajs = [Trajectory(q.id, TrajectoryKind.ORIGINAL, i, q.prompt_ids, TOKENIZER.encode("5*3=15;A15") + [1],
                        [Provenance.SAMPLED] * 11, 1.0, advantage=1.0) for i, q in enumerate(queries)]
    batch = collate(trajs, TOKENIZER.pad_id)
    fill_policy_tensors(batch, actor, cfg.tapo)
    attach_teacher_prompts(batch, trajs, queries, task, cfg.algorithm)
    q = queries[0]
    assert batch.teacher_prompts[0] == TOKENIZER.encode(solution_text(q.problem)) + [1] + TOKENIZER.encode(
        q.problem + ">")
    old = batch.old_logprobs.clone()
    opsd_advantages(actor, batch)
    # by hand: the teacher's log-probs of the same 11 response tokens after its own context
    p, start = len(batch.teacher_prompts[0]), len(q.prompt_ids)
    teacher_tokens = torch.tensor([batch.teacher_prompts[0] + trajs[0].response_ids])
    teacher, _ = actor.compute_logprobs(teacher_tokens)
    torch.testing.assert_close(batch.advantages[0, start:start + 11], teacher[0, p:] - old[0, start:start + 11],
                               atol=1e-5, rtol=0)
    assert batch.advantages[0, :start].eq(0).all() and batch.advantages[0, start:].abs().sum() > 0
    # a teacher shown nothing more than the student has nothing to teach: advantages vanish
    batch.teacher_prompts = [list(q.prompt_ids) for q in queries]
    batch.advantages = torch.ones_like(batch.advantages)
    opsd_advantages(actor, batch)
    assert batch.advantages.abs().max() < 1e-5


@pytest.mark.parametrize("overrides, key", [
    (["tapo.constructor=policy_located", "tapo.branch_normalization=joint", "tapo.branch_grad_interval=1"],
     "branch/grad_cosine"),
    (["algorithm.policy_loss=sft_constructed"], "sft/trained_token_frac"),
])
def test_tapo_variants_through_train(tmp_path, overrides, key):
    train(loop_config(tmp_path, 2, overrides))
    rows = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["traj/num_constructed"] > 0 and key in r for r in rows), rows
    if "tapo.constructor=policy_located" in overrides:
        assert all(0 <= r["tapo/acceptance_rate"] <= 1 and r["tapo/parse_rate"] > 0 for r in rows)
        assert all(-1 <= r["branch/grad_cosine"] <= 1 and r["branch/grad_norm_constructed"] > 0 for r in rows)


def test_cold_start_sft_fine_tunes_the_pretrained_weights(tmp_path):
    """``tapo sft`` with ``checkpoint.pretrained_checkpoint`` starts from those weights (the base model), not from a
    random init: with lr 0 the saved SFT checkpoint equals the pretrained one."""
    from tapo_megatron.sft import run_sft
    from tapo_megatron.training.weight_sync import gather_hf_state

    base = train(loop_config(tmp_path / "base", 1, [f"checkpoint.save={tmp_path}/base_ckpt"]))
    want = {k: v.clone() for k, v in gather_hf_state(base.actor).items()}
    cfg = loop_config(tmp_path / "sft", 1, [f"checkpoint.pretrained_checkpoint={tmp_path}/base_ckpt",
                                            f"checkpoint.save={tmp_path}/sft_ckpt", "sft.train_iters=1",
                                            "sft.global_batch_size=4", "sft.optimizer.lr=0",
                                            "sft.optimizer.lr_warmup_iters=0"])
    got = gather_hf_state(run_sft(cfg))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_math_teacher_prompt_shows_the_reference_solution():
    from tapo_megatron.records import Query
    from tapo_megatron.tasks.math import render_teacher_prompt

    q = Query("q1", "What is {x} if x = 2?", "4")
    text = render_teacher_prompt(q, "Double it: {reference_solution} is literal, $\\boxed{4}$.")
    assert text.startswith("What is {x} if x = 2?\n\nA reference solution")
    assert "Double it: {reference_solution} is literal, $\\boxed{4}$." in text and text.endswith("\\boxed{}.\n")
    assert "The final answer is $\\boxed{4}$." in render_teacher_prompt(q, None)


def test_every_demo_arm_is_a_valid_config(tmp_path):
    from tapo_megatron.commands.demo import ARMS, arm_config

    base = loop_config(tmp_path, 1, ["data.reward=exact", "data.problem_seed=-1"])
    for arm in ARMS:
        cfg = arm_config(base, arm, seed=7, cold_ckpt=tmp_path / "ckpt", out=tmp_path)
        assert (cfg.seed, cfg.data.problem_seed) == (7, base.seed)  # the stream varies, the problems do not
        assert cfg.checkpoint.pretrained_checkpoint == str(tmp_path / "ckpt")
        assert cfg.tapo.enabled == (arm not in ("grpo", "opsd"))
    assert arm_config(base, "tapo", 7, tmp_path, tmp_path).tapo.constructor == "policy_located"
    assert arm_config(base, "tapo_oracle", 7, tmp_path, tmp_path).tapo.constructor == "step_verifier"
