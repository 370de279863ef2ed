"""A NaN loss is refused with a clear error and loses nothing: the weights and the iteration stay as they were,
and the next finite step proceeds normally."""
import pytest
import torch

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.training.actor import MegatronActor, NonFiniteLossError


def test_nan_loss_skips_step_and_keeps_weights():
    shape = Qwen3Shape(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                       max_position_embeddings=32)
    actor = MegatronActor(shape, init_parallel(1, 1, seed=2), OptimizerConfig(lr=1e-2), ParallelConfig())
    tokens = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in actor.module.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        actor.train_step({"tokens": tokens}, lambda lp, mb: (lp.sum() * float("nan"), {}))
    after = actor.module.state_dict()
    assert actor.iteration == 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    result = actor.train_step({"tokens": tokens}, lambda lp, mb: (-lp.sum() / 28.0, {}))
    assert actor.iteration == 1 and result.grad_norm > 0
    assert any(not torch.equal(before[k], actor.module.state_dict()[k]) for k in before)
