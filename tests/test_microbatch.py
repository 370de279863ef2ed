"""Token-budget micro-batching (training/microbatch.py, collate's budget check) and THD packing helpers, plus the
packed-vs-padded actor check under Transformer Engine (GPU only: TE's attention is the only one that takes
``packed_seq_params``)."""
import random

import pytest
import torch

from tapo_megatron.errors import DataError
from tapo_megatron.records import Provenance, Trajectory, TrajectoryKind
from tapo_megatron.training.batch import collate
from tapo_megatron.training.microbatch import pack_rows, packed_targets, plan_micro_batches, unpack_rows


def _demo_like_lengths(n=256, seed=0):
    rng = random.Random(seed)  # prompt ~20-30 tokens + response up to 48: the demo's rollout shapes
    return [rng.randint(20, 30) + rng.randint(5, 48) for _ in range(n)]


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_budget_plan_covers_every_row_within_budget_and_balances_ranks(dp):
    lengths = _demo_like_lengths()
    plan = plan_micro_batches(lengths, dp, micro_batch_size=64, max_tokens=2048)
    rows = sorted(i for rank in plan.ranks for mb in rank for i in mb.rows)
    assert rows == list(range(len(lengths)))
    for rank in plan.ranks:
        for mb in rank:
            assert mb.seq_len == max(lengths[i] for i in mb.rows)  # trimmed to its own longest row
            assert len(mb.rows) * mb.seq_len <= 2048
    loads = [sum(lengths[i] for mb in rank for i in mb.rows) for rank in plan.ranks]
    assert max(loads) - min(loads) <= max(lengths)
    # the target (<= 5 %) on the demo's shape (one rank); 64 rows a rank leave less to choose from
    assert plan.pad_fraction < (0.05 if dp < 4 else 0.08)
    padded = plan_micro_batches(lengths, dp, micro_batch_size=64)  # no budget: still trimmed and sorted
    assert all(len(mb.rows) <= 64 for rank in padded.ranks for mb in rank)
    assert plan.pad_fraction < padded.pad_fraction < 1 - sum(lengths) / (len(lengths) * max(lengths))


def test_rank_without_rows_gets_one_empty_micro_batch():
    plan = plan_micro_batches([5], dp_size=2, micro_batch_size=4)
    assert [len(r) for r in plan.ranks] == [1, 1] and plan.ranks[1][0].rows == []


def test_over_budget_row_refused_by_plan_and_by_collate_with_query_id():
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch=10"):
        plan_micro_batches([4, 11], 1, 4, max_tokens=10)
    trajs = [Trajectory(query_id=f"q{i}", kind=TrajectoryKind.ORIGINAL, advantage_group=0, prompt_ids=[1] * 4,
                        response_ids=[2] * n, provenance=[Provenance.SAMPLED] * n, reward=0.0)
             for i, n in enumerate((3, 9))]
    with pytest.raises(DataError, match="'q1'.*13 tokens.*max_tokens_per_micro_batch=12"):
        collate(trajs, pad_id=0, max_tokens=12)
    batch = collate(trajs, pad_id=0, max_tokens=13)
    assert batch.seq_lengths.tolist() == [7, 13]
    from tapo_megatron.sft import collate_sft

    with pytest.raises(DataError, match="SFT example has 13 tokens, over parallel.max_tokens_per_micro_batch=12"):
        collate_sft([([1] * 4, [2] * 3), ([1] * 4, [2] * 9)], pad_id=0, max_tokens=12)


@pytest.mark.parametrize("multiple", [1, 4])
def test_pack_unpack_round_trip_aligns_targets_per_row(multiple):
    lengths = [5, 3, 7]
    tokens = torch.arange(1, 22).reshape(3, 7)
    packed, positions, cu = pack_rows(tokens, lengths, multiple=multiple)
    assert packed.shape[1] % multiple == 0 and cu[len(lengths)] == sum(lengths)
    assert positions[0, :sum(lengths)].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    targets, mask = packed_targets(packed, cu[:len(lengths) + 1])
    # a "model" whose prediction at each position is its target: unpacking must give back each row's tokens
    aligned = unpack_rows(torch.where(mask, targets, 0).float(), cu[:len(lengths) + 1], 7)
    for i, n in enumerate(lengths):
        assert aligned[i, 1:n].tolist() == tokens[i, 1:n].float().tolist()
        assert aligned[i, 0] == 0 and (aligned[i, n:] == 0).all()
    assert not mask[cu[1:len(lengths) + 1].long() - 1].any()  # a row's last token never predicts the next row


@pytest.mark.gpu
def test_packed_thd_matches_padded_under_transformer_engine():
    from tapo_megatron.config import OptimizerConfig, ParallelConfig
    from tapo_megatron.models.qwen3 import Qwen3Shape, have_transformer_engine
    from tapo_megatron.parallel import init_parallel
    from tapo_megatron.training.actor import MegatronActor

    if not torch.cuda.is_available() or not have_transformer_engine():
        pytest.skip("THD packing needs CUDA and Transformer Engine")
    shape = Qwen3Shape(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    ctx = init_parallel(1, 1, seed=3)
    actors = [MegatronActor(shape, ctx, OptimizerConfig(), ParallelConfig(micro_batch_size=4, packed_sequences=p))
              for p in (True, False)]
    actors[1].module.load_state_dict(actors[0].module.state_dict())
    assert actors[0].packed_sequences and not actors[1].packed_sequences
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (6, 40), generator=g)
    lengths = torch.tensor([40, 33, 17, 25, 9, 40])
    packed, padded = (a.compute_logprobs(tokens, with_entropy=True, lengths=lengths) for a in actors)
    torch.testing.assert_close(packed[0], padded[0], atol=2e-3, rtol=0)
    torch.testing.assert_close(packed[1], padded[1], atol=2e-3, rtol=0)
