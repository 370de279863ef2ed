"""Worker for test_faults_ranks.py (2 ranks, data parallel): a NaN gradient on rank 1 only must stop the update
on BOTH ranks (each would otherwise step its own optimizer shard), and a SIGTERM to rank 1 only must stop both
ranks at the same step. Prints one result line per rank."""
import os
import signal

import torch

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.runguard import RunGuard
from tapo_megatron.training.actor import MegatronActor, NonFiniteLossError

SHAPE = Qwen3Shape(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=32)


def main() -> None:
    torch.set_num_threads(1)
    ctx = init_parallel(1, 1, seed=3)
    actor = MegatronActor(SHAPE, ctx, OptimizerConfig(lr=1e-2), ParallelConfig(micro_batch_size=2))
    tokens = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in actor.module.parameters()]

    def loss_nan_on_rank1(lp, mb):
        if ctx.rank == 1:
            lp = lp.clone()
            lp.register_hook(lambda g: g * float("nan"))
        return -lp.sum() / 28.0, {}

    try:
        actor.train_step({"tokens": tokens}, loss_nan_on_rank1)
        outcome = "stepped"
    except NonFiniteLossError:
        outcome = "skipped"
    unchanged = all(torch.equal(a, b) for a, b in zip(before, actor.module.parameters()))
    guard = RunGuard([])
    guard._install()
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    stopped = guard.stop_requested(ctx)
    guard.close()
    print(f"rank {ctx.rank}: {outcome} unchanged={unchanged} iteration={actor.iteration} stopped={stopped}",
          flush=True)


if __name__ == "__main__":
    main()
