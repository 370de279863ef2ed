"""After a weight sync, the native engine (HF transformers) scores sequences exactly as the Megatron actor does:
an independent implementation of the same model, so this also checks the Megatron -> HF mapping end to end."""
import pytest
import torch

from tapo_megatron.config import OptimizerConfig, ParallelConfig
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.records import SamplingParams
from tapo_megatron.rollout.native import NativeEngine
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.weight_sync import sync_weights


@pytest.mark.parametrize("tied", [True, False])
def test_engine_logprobs_equal_actor_after_sync(tied):
    torch.manual_seed(0)
    shape = Qwen3Shape(vocab_size=24, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                       tie_word_embeddings=tied, max_position_embeddings=64)
    ctx = init_parallel(1, 1, seed=3)
    actor = MegatronActor(shape, ctx, OptimizerConfig(lr=1e-2), ParallelConfig(micro_batch_size=4))
    engine = NativeEngine(shape.to_hf(), seed=99)  # different random init: only the sync can make them agree
    tokens = torch.randint(0, shape.vocab_size, (6, 16), generator=torch.Generator().manual_seed(5))
    # One optimizer step first, so the synced weights are not the initial ones.
    actor.train_step({"tokens": tokens, "mask": torch.ones(6, 16)},
                     lambda lp, mb: (-(lp * mb["mask"]).sum() / 96.0, {}))
    stats = sync_weights(actor, engine, version=1, bucket_bytes=4096)
    assert engine.weight_version == 1 and stats["sync/bytes"] > 0
    actor_lp, _ = actor.compute_logprobs(tokens)
    with torch.no_grad():
        logits = engine.model(tokens).logits.float()
    engine_lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(actor_lp[:, 1:], engine_lp, atol=1e-4, rtol=0)
    # And the engine's own reported log-probs of what it samples agree with the actor's recomputation.
    prompts = [tokens[i, :5].tolist() for i in range(4)]
    gens = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))
    seqs = torch.tensor([p + g.token_ids for p, g in zip(prompts, gens)])
    recomputed, _ = actor.compute_logprobs(seqs)
    torch.testing.assert_close(recomputed[:, 5:], torch.tensor([g.logprobs for g in gens]), atol=1e-4, rtol=0)
    assert all(g.weight_version == 1 for g in gens)


def test_disk_transport_into_an_in_process_engine(tmp_path):
    """The disk transport calls the engine's ``update_weights_from_disk`` (the interface default for in-process
    engines: stream the written HF folder into the atomic update)."""
    from tapo_megatron.training.weight_sync import DiskWeightSync

    shape = Qwen3Shape(vocab_size=24, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0,
                       tie_word_embeddings=False, max_position_embeddings=32)
    ctx = init_parallel(1, 1, seed=3)
    actor = MegatronActor(shape, ctx, OptimizerConfig(lr=1e-2), ParallelConfig(micro_batch_size=2))
    engine = NativeEngine(shape.to_hf(), seed=7)
    stats = DiskWeightSync(actor.module, ctx, engine, tmp_path, 1 << 14, keep=1).sync(2)
    tokens = torch.randint(0, shape.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    actor_lp, _ = actor.compute_logprobs(tokens)
    torch.testing.assert_close(engine.prompt_logprobs(tokens)[0], actor_lp[:, 1:].float(), atol=1e-4, rtol=0)
    assert engine.weight_version == 2 and stats.bytes > 0 and [p.name for p in tmp_path.iterdir()] == ["v2"]
