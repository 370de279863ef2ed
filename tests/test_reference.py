"""The KL reference (``algorithm.kl_coef > 0``): the initial policy's log-probs, scored by the actor itself with the
reference weights swapped in, leaving the training state untouched; the KL term of the loss checked by hand."""
import torch

from tapo_megatron.algorithms.losses import kl_penalty
from tapo_megatron.config import AlgorithmConfig, OptimizerConfig, ParallelConfig, TapoConfig
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.records import TrainBatch
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.batch import batch_tensors, make_policy_loss_fn
from tapo_megatron.training.reference import ReferencePolicy

SHAPE = Qwen3Shape(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=True,
                   max_position_embeddings=64)


def _batch(tokens: torch.Tensor, advantages: torch.Tensor) -> TrainBatch:
    b, t = tokens.shape
    mask = torch.zeros(b, t)
    mask[:, 4:] = 1.0
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=advantages[:, None] * mask,
                      old_logprobs=torch.zeros(b, t), token_weights=torch.ones(b, t),
                      is_constructed=torch.zeros(b, dtype=torch.bool), provenance=torch.zeros(b, t, dtype=torch.long),
                      engine_logprobs=None)


def test_reference_is_the_initial_policy_and_kl_matches_hand_computation():
    torch.manual_seed(0)
    ctx = init_parallel(1, 1, seed=5)
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(lr=5e-2, clip_grad=0.0), ParallelConfig(micro_batch_size=4))
    tokens = torch.randint(0, SHAPE.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    initial, _ = actor.compute_logprobs(tokens)
    reference = ReferencePolicy.snapshot(actor)

    algo, tapo = AlgorithmConfig(kl_coef=0.0), TapoConfig()
    batch = _batch(tokens, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    batch.old_logprobs = initial
    actor.train_step(batch_tensors(batch), make_policy_loss_fn(batch, algo, tapo))  # the policy moves
    moved, _ = actor.compute_logprobs(tokens)
    assert (moved - initial).abs().max() > 1e-3

    ref = reference.logprobs(actor, tokens)
    torch.testing.assert_close(ref, initial, rtol=0, atol=0)  # exactly the initial policy's log-probs
    after, _ = actor.compute_logprobs(tokens)
    torch.testing.assert_close(after, moved, rtol=0, atol=0)  # the training weights are back, bit for bit

    # The loss's KL term by hand: zero advantages leave only kl_coef * mean over masked tokens of k3(pi, pi_ref).
    kl_coef = 0.3
    batch = _batch(tokens, torch.zeros(4))
    batch.old_logprobs, batch.ref_logprobs = moved, ref
    loss_fn = make_policy_loss_fn(batch, AlgorithmConfig(kl_coef=kl_coef, kl_estimator="k3"), tapo)
    loss, metrics = loss_fn(moved, batch_tensors(batch))
    mask = batch.loss_mask.bool()
    log_r = (ref - moved)[mask]  # log(pi_ref / pi) per masked token
    expected_kl = (log_r.exp() - log_r - 1.0).mean()
    torch.testing.assert_close(kl_penalty(moved, ref, "k3")[mask].mean(), expected_kl)
    torch.testing.assert_close(loss, kl_coef * expected_kl, rtol=1e-6, atol=1e-7)
    assert expected_kl > 0
