"""One forward per on-policy step, and PPO reuse of a rollout batch (training/step.py) on the real Megatron actor:

- default (1 epoch, 1 mini-batch): no separate old-log-prob pass, and the step equals the two-pass step (old
  log-probs + OTS weights from a forward before the update) in loss, gradient norm, metrics and updated weights;
- ppo_epochs=2: the first epoch runs at ratio 1 with no clipping, the second sees the moved policy (ratio != 1,
  clip fraction > 0); the iteration (lr schedule, loop step) advances once per rollout step."""
import torch

from _parallel_worker import SHAPE, fixed_batch, hf_weights
from tapo_megatron.config import AlgorithmConfig, OptimizerConfig, ParallelConfig, TapoConfig
from tapo_megatron.parallel import init_parallel
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.batch import batch_tensors, fill_policy_tensors, make_policy_loss_fn
from tapo_megatron.training.step import policy_step
from tapo_megatron.training.weight_sync import gather_hf_state

TAPO = TapoConfig(enabled=True, constructed_coef=1.0)


def _actor(ctx, lr=0.05):
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(lr=lr), ParallelConfig(micro_batch_size=3))
    actor.load_hf_state(hf_weights(SHAPE))
    return actor


def _batch():
    batch = fixed_batch()
    batch.seq_lengths = torch.tensor([4 + 3 + i % 5 for i in range(8)])
    return batch


def test_on_policy_step_is_one_forward_and_equals_the_two_pass_step():
    ctx = init_parallel(1, 1, seed=5)
    one, two = _actor(ctx), _actor(ctx)
    calls = []
    original = one.compute_logprobs
    one.compute_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
    got, _ = policy_step(one, _batch(), AlgorithmConfig(), TAPO, None, 0)
    assert calls == []  # no old-log-prob pass

    ref_batch = _batch()
    ref_metrics = fill_policy_tensors(ref_batch, two, TAPO)
    ref = two.train_step(batch_tensors(ref_batch), make_policy_loss_fn(ref_batch, AlgorithmConfig(), TAPO))
    assert abs(got["loss"] - ref.loss) < 1e-6 and abs(got["grad_norm"] - ref.grad_norm) < 1e-6
    assert got["ratio_mean"] == 1.0 and got["clip_frac"] == 0.0
    for key in ("entropy", "ots/weight_injected", "ots_weight_mean"):
        if key in ref_metrics or key in ref.metrics:
            want = ref_metrics.get(key, ref.metrics.get(key))
            assert abs(got[key] - want) < 1e-5, key
    a, b = gather_hf_state(one), gather_hf_state(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5, msg=name)
    assert one.iteration == two.iteration == 1


def test_two_ppo_epochs_move_the_ratio_and_engage_the_clip():
    ctx = init_parallel(1, 1, seed=5)
    actor = _actor(ctx, lr=0.2)
    metrics, skipped = policy_step(actor, _batch(), AlgorithmConfig(ppo_epochs=2), TAPO, None, 0)
    assert skipped == 0 and metrics["ppo/optimizer_steps"] == 2.0
    assert metrics["ppo/epoch0/ratio_mean"] == 1.0 and metrics["ppo/epoch0/clip_frac"] == 0.0  # old = current
    assert metrics["ppo/epoch1/clip_frac"] > 0.0 and abs(metrics["ppo/epoch1/ratio_mean"] - 1.0) > 1e-3
    assert actor.iteration == 1  # the lr schedule and the loop count rollout steps
    # mini-batches: 2 epochs x 2 mini-batches of 4 trajectories = 4 optimizer steps, still one iteration
    actor = _actor(ctx, lr=0.2)
    metrics, _ = policy_step(actor, _batch(), AlgorithmConfig(ppo_epochs=2, mini_batch_size=4), TAPO, None, 0)
    assert metrics["ppo/optimizer_steps"] == 4.0 and actor.iteration == 1
    assert metrics["ppo/epoch1/clip_frac"] > 0.0
