"""Worker for tests/test_parallel.py: run under torchrun (2 ranks) or as a plain single process.

    python tests/_parallel_worker.py TP PP OUT.pt [budget] [fused]

Builds a tiny Qwen3 actor at the layout, loads deterministic HF weights, computes log-probs and entropies of fixed
sequences, takes one PPO-clip training step on a fixed global batch, and saves (rank 0) log-probs, entropies, the
loss and the full updated HF state dict, for comparison against the single-rank run.
``budget``: rows carry their lengths (ragged, 7-11 of 12 tokens) and micro-batches follow a 24-token budget, so
micro-batches differ in rows and width (trimmed to their longest row). ``fused``: the fused linear + log-prob path.
"""
import sys

import torch

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.convert.qwen3 import hf_shapes
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.records import TrainBatch
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.batch import batch_tensors, make_policy_loss_fn
from tapo_megatron.training.weight_sync import gather_hf_state
from tapo_megatron.config import AlgorithmConfig, TapoConfig

SHAPE = Qwen3Shape(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
                   max_position_embeddings=64)


def hf_weights(shape: Qwen3Shape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dims in hf_shapes(shape).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(dims, generator=g)
        else:
            out[name] = 0.05 * torch.randn(dims, generator=g)
    return out


LENGTHS = torch.tensor([4 + 3 + i % 5 for i in range(8)])  # each row ends at its last response token


def fixed_batch() -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    b, t = 8, 12
    tokens = torch.randint(0, SHAPE.vocab_size, (b, t), generator=g)
    loss_mask = torch.zeros(b, t)
    for i in range(b):
        loss_mask[i, 4:4 + 3 + i % 5] = 1.0  # ragged responses
    adv = torch.randn(b, generator=g)[:, None].expand(b, t) * loss_mask
    is_constructed = torch.tensor([i % 3 == 2 for i in range(b)])
    return TrainBatch(tokens=tokens, loss_mask=loss_mask, advantages=adv.contiguous(),
                      old_logprobs=torch.zeros(b, t), token_weights=torch.rand(b, t, generator=g) + 0.5,
                      is_constructed=is_constructed, provenance=torch.zeros(b, t, dtype=torch.long))


def main(tp: int, pp: int, out: str, *flags: str) -> None:
    torch.manual_seed(0)
    ctx = init_parallel(tp, pp, seed=7)
    # adam_eps=1 makes the first Adam step ~ lr * grad: elementwise comparable (with eps=1e-8 an element whose
    # gradient is ~1e-9 flips sign on rounding noise), so the updated weights check the gradients themselves.
    parallel = ParallelConfig(micro_batch_size=2, max_tokens_per_micro_batch=24 if "budget" in flags else 0)
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(lr=1.0, adam_eps=1.0), parallel,
                          logprobs_path="fused_linear" if "fused" in flags else "logits")
    actor.load_hf_state(hf_weights(SHAPE))
    batch = fixed_batch()
    if "budget" in flags:
        batch.seq_lengths = LENGTHS
    logprobs, entropy = actor.compute_logprobs(batch.tokens, with_entropy=True, lengths=batch.seq_lengths)
    batch.old_logprobs = logprobs - 0.05 * batch.loss_mask  # ratios != 1 so clipping can engage
    tapo = TapoConfig(enabled=True, constructed_coef=1.0)
    result = actor.train_step(batch_tensors(batch), make_policy_loss_fn(batch, AlgorithmConfig(), tapo))
    state = gather_hf_state(actor)
    if ctx.rank == 0:
        torch.save({"logprobs": logprobs, "entropy": entropy, "loss": result.loss, "grad_norm": result.grad_norm,
                    "state": state, "pad_fraction": result.metrics["batch/pad_fraction"]}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
