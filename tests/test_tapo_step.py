"""One full TAPO step through the real Megatron actor and the real native engine on a tiny model: checks what
reaches the loss (provenance tags, DAE advantages, OTS weights) and that lambda = 0 on the same batch is GRPO."""
import math
import random

import torch

from tapo_megatron.algorithms.ots import ots_weights
from tapo_megatron.config import AlgorithmConfig, OptimizerConfig, ParallelConfig, TapoConfig
from tapo_megatron.models.qwen3 import Qwen3Shape
from tapo_megatron.parallel import init_parallel
from tapo_megatron.records import FinishReason, Provenance, Rollout, SamplingParams, TrajectoryKind
from tapo_megatron.rewards import get_reward
from tapo_megatron.tasks.arithmetic import ArithmeticStepVerifier, ArithmeticTask, ArithmeticTokenizer
from tapo_megatron.rollout.native import NativeEngine
from tapo_megatron.training.actor import MegatronActor
from tapo_megatron.training.batch import batch_tensors, collate, fill_policy_tensors, make_policy_loss_fn
from tapo_megatron.training.weight_sync import sync_weights
from tapo_megatron.trajectory.builder import TrajectoryBuilder
from tapo_megatron.trajectory.constructors import build_constructor


def _rollouts(engine, tokenizer, task, queries, k=8):
    """Real engine rollouts, with responses replaced by 3 gold / 5 wrong solutions per query so that DCS fires
    (a random tiny model never answers correctly); log-probs of the replaced tokens are the engine's own."""
    rng = random.Random(0)
    gens = engine.generate([q.prompt_ids for q in queries for _ in range(k)],
                           SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=(tokenizer.eos_id,),
                                          seed=3))
    out = []
    for i, q in enumerate(queries):
        for j in range(k):
            text = task.solution(q.problem) if j < 3 else task.wrong_response(q.problem, rng)
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            with torch.no_grad():
                logits = engine.model(torch.tensor([q.prompt_ids + ids])).logits.float()
            lp = torch.log_softmax(logits[0, len(q.prompt_ids) - 1:-1], -1).gather(-1, torch.tensor(ids)[:, None])
            out.append(Rollout(q.id, i, q.prompt_ids, ids, lp.squeeze(-1).tolist(), FinishReason.STOP,
                               gens[i * k + j].weight_version, text))
    return out


# A 2-layer GQA Qwen3 over the arithmetic vocabulary: the smallest model whose actor step is still meaningful.
TINY_SHAPE = Qwen3Shape(vocab_size=ArithmeticTokenizer().vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128)

def test_one_tapo_step_through_actor_and_engine():
    torch.manual_seed(0)
    tokenizer, task = ArithmeticTokenizer(), ArithmeticTask()
    shape = TINY_SHAPE
    ctx = init_parallel(1, 1, seed=11)
    actor = MegatronActor(shape, ctx, OptimizerConfig(lr=1e-3), ParallelConfig(micro_batch_size=16))
    engine = NativeEngine(shape.to_hf(), seed=1)
    sync_weights(actor, engine, version=0, bucket_bytes=2**20)
    queries = task.generate_split(3, seed=5, split="train")
    rollouts = _rollouts(engine, tokenizer, task, queries)
    reward = get_reward("exact")
    for r, q in zip(rollouts, [q for q in queries for _ in range(8)]):
        r.reward = reward(r.response_text, q.answer)
    assert sum(r.reward for r in rollouts) == 9  # 3 correct per query

    tapo = TapoConfig(enabled=True, constructor="step_verifier", constructed_zero_variance="fixed",
                      constructed_fixed_advantage=1.0)
    algo = AlgorithmConfig(advantage_estimator="dae")
    builder = TrajectoryBuilder(tapo, algo, tokenizer, reward, build_constructor(tapo, tokenizer=tokenizer, step_verifier=ArithmeticStepVerifier()), seed=0)
    built = builder.build(queries, rollouts, step=0)
    originals = [t for t in built.trajectories if t.kind == TrajectoryKind.ORIGINAL]
    constructed = [t for t in built.trajectories if t.kind == TrajectoryKind.CONSTRUCTED]
    assert len(originals) == 24 and 1 <= len(constructed) <= 12  # m_max = 4 per candidate query
    assert built.metrics["tapo/num_candidates"] == 3
    # Provenance: originals all sampled; constructed = the wrong rollout's own ids, then injected tokens.
    wrong_by_query = {r.query_id: [] for r in rollouts}
    for r in rollouts:
        if r.reward == 0:
            wrong_by_query[r.query_id].append(r.response_ids)
    for t in originals:
        assert set(t.provenance) == {Provenance.SAMPLED}
    for t in constructed:
        n_sampled = t.provenance.count(Provenance.SAMPLED)
        assert t.provenance == [Provenance.SAMPLED] * n_sampled + [Provenance.INJECTED] * (len(t.provenance) - n_sampled)
        assert any(t.response_ids[:n_sampled] == w[:n_sampled] for w in wrong_by_query[t.query_id])
        assert t.reward == 1.0 and t.advantage == 1.0  # all corrections verify; "fixed" zero-variance policy
        assert t.response_ids[-1] == tokenizer.eos_id
    # DAE on originals: rewards 3x1, 5x0 -> mean 3/8, population std sqrt(15)/8.
    std = math.sqrt(15) / 8
    for t in originals:
        expected = ((1 - 3 / 8) if t.reward == 1 else (-3 / 8)) / (std + 1e-6)
        assert abs(t.advantage - expected) < 1e-5

    batch = collate(built.trajectories, tokenizer.pad_id)
    fill_policy_tensors(batch, actor, tapo)
    # OTS weights: 1 on originals; clip(exp(logp + H)) of the actor's own forward pass on constructed tokens.
    old, entropy = actor.compute_logprobs(batch.tokens, with_entropy=True)
    cmask = batch.loss_mask.bool() & batch.is_constructed[:, None]
    torch.testing.assert_close(batch.token_weights, ots_weights(old, entropy, cmask, 0.01, 10.0))
    assert torch.all(batch.token_weights[~batch.is_constructed] == 1.0)
    assert batch.token_weights[cmask].min() >= 0.01 and batch.token_weights[cmask].max() <= 10.0
    assert (batch.provenance[cmask] == int(Provenance.INJECTED)).any()

    # lambda = 0 on this batch equals GRPO on the originals alone (loss identical); lambda = 1 differs.
    tensors = batch_tensors(batch)
    fn0 = make_policy_loss_fn(batch, algo, TapoConfig(enabled=True, constructed_coef=0.0))
    orig_rows = ~batch.is_constructed
    only_orig = collate(originals, tokenizer.pad_id)
    only_orig.old_logprobs = batch.old_logprobs[orig_rows][:, :only_orig.tokens.shape[1]]
    fn_grpo = make_policy_loss_fn(only_orig, algo, TapoConfig(enabled=False))
    lp_all, _ = actor.compute_logprobs(batch.tokens)
    loss0, _ = fn0(lp_all, tensors)
    loss_grpo, _ = fn_grpo(lp_all[orig_rows][:, :only_orig.tokens.shape[1]], batch_tensors(only_orig))
    assert abs(float(loss0) - float(loss_grpo)) < 1e-7
    fn1 = make_policy_loss_fn(batch, algo, tapo)
    loss1, metrics = fn1(lp_all, tensors)
    assert abs(float(loss1) - float(loss0)) > 1e-4 and float(metrics["ots_weight_mean"]) > 0

    result = actor.train_step(tensors, fn1)
    assert math.isfinite(result.loss) and result.grad_norm > 0
