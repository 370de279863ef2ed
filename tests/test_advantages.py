"""Advantages: GRPO group normalisation and DAE, against hand-computed values.

Hand arithmetic used below (population std, i.e. divide by the group size):
  2 of 8 correct:  mean 1/4, var 1/4 * 3/4 = 3/16, std sqrt(3)/4 = 0.4330127
                   A(1) = (3/4) / (sqrt(3)/4) = sqrt(3) = 1.7320508,  A(0) = -(1/4) / (sqrt(3)/4) = -1/sqrt(3) = -0.5773503
  1 of 11 correct: mean 1/11, var 10/121, std sqrt(10)/11 = 0.2874798
                   A(1) = (10/11) / (sqrt(10)/11) = sqrt(10) = 3.1622777,  A(0) = -1/sqrt(10) = -0.3162278
  1 of 2 correct:  mean 1/2, std 1/2, A = +-1
  1 of 4 correct:  same std as 2 of 8 -> A(1) = sqrt(3), A(0) = -1/sqrt(3)
  2 of 3 correct:  mean 2/3, var 2/9, std sqrt(2)/3 = 0.4714045; A(1) = (1/3)/(sqrt(2)/3) = 1/sqrt(2) = 0.7071068,
                   A(0) = -(2/3)/(sqrt(2)/3) = -sqrt(2) = -1.4142136
"""
from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from tapo_megatron.algorithms.advantages import (
    AdvantageStats,
    ZeroVariancePolicy,
    decoupled_advantages,
    AdvantageInput,
    dae_estimator,
    get_advantage,
    group_normalized_advantages,
    list_advantages,
    register_advantage,
)

# ragged groups of sizes 1 (id 7), 2 (id 3), 8 (id 42, 2 correct), 11 (id -5, 1 correct), interleaved by hand
RAGGED = [
    (42, 1.0), (-5, 0.0), (3, 0.0), (-5, 0.0), (42, 0.0), (7, 1.0), (-5, 1.0), (42, 0.0), (-5, 0.0), (3, 1.0),
    (42, 0.0), (-5, 0.0), (-5, 0.0), (42, 1.0), (-5, 0.0), (42, 0.0), (-5, 0.0), (-5, 0.0), (42, 0.0), (-5, 0.0),
    (42, 0.0), (-5, 0.0),
]
# (group id, reward) -> expected advantage with std normalisation, and mean-centred only
EXPECTED_STD = {(7, 1.0): 0.0, (3, 1.0): 1.0, (3, 0.0): -1.0, (42, 1.0): 1.7320508, (42, 0.0): -0.5773503,
                (-5, 1.0): 3.1622777, (-5, 0.0): -0.3162278}
EXPECTED_CENTRED = {(7, 1.0): 0.0, (3, 1.0): 0.5, (3, 0.0): -0.5, (42, 1.0): 0.75, (42, 0.0): -0.25,
                    (-5, 1.0): 10 / 11, (-5, 0.0): -1 / 11}  # 0.9090909, -0.0909091


def _ragged():
    ids = torch.tensor([g for g, _ in RAGGED])
    rewards = torch.tensor([r for _, r in RAGGED])
    return rewards, ids


def test_ragged_unsorted_groups_std():
    rewards, ids = _ragged()
    adv = group_normalized_advantages(rewards, ids, eps=0.0)
    expected = torch.tensor([EXPECTED_STD[k] for k in RAGGED])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert adv[5].item() == 0.0  # the singleton is exactly 0


def test_ragged_default_eps_is_small():
    rewards, ids = _ragged()
    adv = group_normalized_advantages(rewards, ids)  # eps = 1e-6: relative change <= 1e-6 / 0.287
    expected = torch.tensor([EXPECTED_STD[k] for k in RAGGED])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    assert adv.dtype == torch.float32


def test_ragged_normalize_std_off():
    rewards, ids = _ragged()
    adv = group_normalized_advantages(rewards, ids, normalize_std=False)
    expected = torch.tensor([EXPECTED_CENTRED[k] for k in RAGGED])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_all_equal_rewards_are_exactly_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (r - mean) / (std + eps) would leak ~1e-11 advantages
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 1.0, 1.0, 1.0, 1.0])
    ids = torch.tensor([5, 5, 5, 9, 9, 2, 2, 2, 2])
    for normalize_std in (True, False):
        adv = group_normalized_advantages(rewards, ids, normalize_std=normalize_std)
        assert torch.equal(adv, torch.zeros(9)), adv


def test_non_binary_rewards():
    # [0, 0.5, 1]: mean 0.5, var (0.25 + 0 + 0.25) / 3 = 1/6, std 0.4082483 -> A = -+0.5/0.4082483 = -+1.2247449
    adv = group_normalized_advantages(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.2247449, -1.2247449, 0.0]), rtol=0, atol=1e-6)


def test_int_and_bool_rewards_give_float32():
    adv = group_normalized_advantages(torch.tensor([True, False]), torch.tensor([1, 1]), eps=0.0)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0]))


def test_matches_python_statistics_reference():
    # independent reference: a Python loop with statistics.pstdev over random ragged groups
    rng = random.Random(0)
    ids = [rng.choice([-3, 0, 4, 17, 100, 2**40]) for _ in range(60)]
    rewards = [rng.choice([0.0, 0.25, 1.0]) for _ in range(60)]
    adv = group_normalized_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids), eps=1e-6)
    for i, (g, r) in enumerate(zip(ids, rewards)):
        members = [rr for gg, rr in zip(ids, rewards) if gg == g]
        sd = statistics.pstdev(members)
        want = 0.0 if sd == 0 else (r - statistics.fmean(members)) / (sd + 1e-6)
        assert adv[i].item() == pytest.approx(want, abs=1e-12), i


def test_empty_and_bad_inputs():
    assert group_normalized_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError, match="group_ids shape"):
        group_normalized_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        group_normalized_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        group_normalized_advantages(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        group_normalized_advantages(torch.tensor([0.0, float("nan")]), torch.tensor([0, 0]))


# ---------------------------------------------------------------------------------------------------------------- DAE


def test_dae_separates_originals_from_constructed():
    # query 0: 8 originals (2 correct) and 3 constructed (2 correct), all passed with the SAME group id 0
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0])
    ids = torch.zeros(11, dtype=torch.long)
    cons = torch.tensor([False] * 8 + [True] * 3)
    adv, stats = decoupled_advantages(rewards, ids, cons, eps=0.0)
    expected = [1.7320508, -0.5773503, -0.5773503, 1.7320508, -0.5773503, -0.5773503, -0.5773503, -0.5773503,
                0.7071068, 0.7071068, -1.4142136]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert stats.num_groups == 2 and stats.num_zero_variance_groups == 0
    assert stats.num_constructed == 3 and stats.num_constructed_groups == 1

    # mixing (plain GRPO over the same ids, the no-DAE ablation): 4 of 11 correct, mean 4/11, std sqrt(28)/11;
    # A(1) = 7/sqrt(28) = 1.3228757, A(0) = -4/sqrt(28) = -0.7559289: the originals' correct answers lose signal
    mixed, mixed_stats = get_advantage("grpo")(AdvantageInput(
        rewards, ids, cons, eps=0.0, normalize_std=True, constructed_zero_variance="zero", fixed_value=1.0
    ))
    assert mixed[0].item() == pytest.approx(1.3228757, abs=1e-6)
    assert mixed[1].item() == pytest.approx(-0.7559289, abs=1e-6)
    assert mixed_stats.num_groups == 1 and mixed_stats.num_constructed_groups == 1


def test_dae_distinct_ids_equal_shared_ids():
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    cons = torch.tensor([False, False, False, False, True, True, True, True])
    shared = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    offset = torch.tensor([0, 0, 1, 1, 1000, 1000, 1001, 1001])  # constructed groups given their own ids
    a1, _ = decoupled_advantages(rewards, shared, cons)
    a2, _ = decoupled_advantages(rewards, offset, cons)
    assert torch.equal(a1, a2)


def _policy_batch():
    """orig q0: 2/8 correct; orig q1: 0/4 (zero variance); cons q0: 1/4; cons q1: [1, 1] (zero var); cons q2: [0]."""
    rewards = [1.0, 0, 0, 1, 0, 0, 0, 0] + [0.0] * 4 + [1.0, 0, 0, 0] + [1.0, 1.0] + [0.0]
    ids = [0] * 8 + [1] * 4 + [0] * 4 + [1, 1] + [2]
    cons = [False] * 12 + [True] * 7
    return torch.tensor(rewards), torch.tensor(ids), torch.tensor(cons)


ORIG_Q0 = [1.7320508, -0.5773503, -0.5773503, 1.7320508, -0.5773503, -0.5773503, -0.5773503, -0.5773503]
CONS_Q0 = [1.7320508, -0.5773503, -0.5773503, -0.5773503]


def test_dae_policy_zero():
    rewards, ids, cons = _policy_batch()
    adv, stats = decoupled_advantages(rewards, ids, cons, eps=0.0, constructed_zero_variance="zero")
    expected = ORIG_Q0 + [0.0] * 4 + CONS_Q0 + [0.0, 0.0] + [0.0]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert stats == AdvantageStats(
        num_samples=19, num_constructed=7,
        num_groups=5,  # orig q0, orig q1, cons q0, cons q1, cons q2
        num_zero_variance_groups=3,  # orig q1, cons q1, cons q2
        num_constructed_groups=3, num_constructed_zero_variance_groups=2,
        frac_zero_advantage_original=4 / 12, frac_zero_advantage_constructed=3 / 7,
    )


def test_dae_policy_pool():
    # pooled constructed rewards [1,0,0,0,1,1,0]: mean 3/7, var 3/7 * 4/7 = 12/49, std sqrt(12)/7 = 0.4948717
    # A(1) = (4/7)/(sqrt(12)/7) = 4/sqrt(12) = 1.1547005;  A(0) = -3/sqrt(12) = -0.8660254
    rewards, ids, cons = _policy_batch()
    adv, stats = decoupled_advantages(rewards, ids, cons, eps=0.0, constructed_zero_variance=ZeroVariancePolicy.POOL)
    expected = ORIG_Q0 + [0.0] * 4 + CONS_Q0 + [1.1547005, 1.1547005] + [-0.8660254]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert stats.frac_zero_advantage_constructed == 0.0
    assert stats.num_constructed_zero_variance_groups == 2  # still reported: the policy's input, not its output
    assert stats.frac_zero_advantage_original == pytest.approx(1 / 3)  # originals never pooled


def test_dae_policy_pool_without_std():
    # mean-centred: r - 3/7 -> 4/7 = 0.5714286 and -3/7 = -0.4285714; cons q0 (1 of 4) -> 0.75, -0.25
    rewards, ids, cons = _policy_batch()
    adv, _ = decoupled_advantages(rewards, ids, cons, normalize_std=False, constructed_zero_variance="pool")
    expected = [0.75, -0.25, -0.25, 0.75, -0.25, -0.25, -0.25, -0.25] + [0.0] * 4
    expected += [0.75, -0.25, -0.25, -0.25] + [0.5714286, 0.5714286] + [-0.4285714]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)


def test_dae_policy_pool_all_constructed_equal_gives_zero():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    ids = torch.tensor([0, 0, 0, 0, 1])
    cons = torch.tensor([False, False, True, True, True])
    adv, stats = decoupled_advantages(rewards, ids, cons, eps=0.0, constructed_zero_variance="pool")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0]))
    assert stats.frac_zero_advantage_constructed == 1.0


def test_dae_policy_fixed():
    rewards, ids, cons = _policy_batch()
    adv, stats = decoupled_advantages(rewards, ids, cons, eps=0.0, constructed_zero_variance="fixed", fixed_value=0.5)
    expected = ORIG_Q0 + [0.0] * 4 + CONS_Q0 + [0.5, 0.5] + [-0.5]  # all-wrong ORIGINALS stay 0 (GRPO)
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert stats.frac_zero_advantage_constructed == 0.0


def test_dae_no_constructed_equals_grpo():
    rewards, ids = _ragged()
    cons = torch.zeros(len(RAGGED), dtype=torch.bool)
    adv, stats = decoupled_advantages(rewards, ids, cons)
    assert torch.equal(adv, group_normalized_advantages(rewards, ids))
    assert stats.num_constructed == 0 and math.isnan(stats.frac_zero_advantage_constructed)
    assert stats.num_groups == 4 and stats.num_zero_variance_groups == 1  # the singleton


def test_dae_bad_inputs():
    rewards, ids, cons = _policy_batch()
    with pytest.raises(ValueError, match="'median'.*valid: 'zero', 'pool', 'fixed'"):
        decoupled_advantages(rewards, ids, cons, constructed_zero_variance="median")
    with pytest.raises(ValueError, match="is_constructed must be a bool"):
        decoupled_advantages(rewards, ids, cons.long())
    with pytest.raises(ValueError, match="fixed_value"):
        decoupled_advantages(rewards, ids, cons, constructed_zero_variance="fixed", fixed_value=-1.0)


def test_registry():
    assert {"grpo", "dae"} <= set(list_advantages())
    assert get_advantage("dae") is dae_estimator
    with pytest.raises(KeyError, match="registered: .*dae.*grpo"):
        get_advantage("gae")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("dae")(decoupled_advantages)
