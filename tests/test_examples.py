"""The copyable plug-ins in ``examples/``, each looked up THROUGH ITS REGISTRY (by import path and by name) and run.

RLOO hand values (A_i = r_i - mean of the other members of i's (group_id, is_constructed) group):

    group (0, original)    rewards [1]        singleton                          -> [0]
    group (1, original)    rewards [1, 0]     1 - 0 = 1;  0 - 1 = -1             -> [1, -1]
    group (2, original)    rewards [1, 0, 0]  1 - (0+0)/2 = 1;  0 - (1+0)/2      -> [1, -0.5, -0.5]
    group (2, constructed) rewards [1, 1, 0]  1 - (1+0)/2 = 0.5;  0 - (1+1)/2    -> [0.5, 0.5, -1]
    group (1, constructed) rewards [1, 1]     all equal                          -> [0, 0]

  5 groups, 2 zero-variance (the singleton and (1, constructed)), 2 constructed groups (1 zero-variance);
  zero advantages: 1 of 6 originals, 2 of 5 constructed.
"""
from __future__ import annotations

import math
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `examples` is a top-level package of the repository, not of tapo_megatron

from tapo_megatron.algorithms.advantages import AdvantageInput, dae_estimator, get_advantage  # noqa: E402
from tapo_megatron.config import AlgorithmConfig, ConfigError, TapoConfig, load_config  # noqa: E402
from tapo_megatron.records import FinishReason, Provenance, Query, Rollout, SamplingParams, TrajectoryKind  # noqa: E402
from tapo_megatron.rewards import close_default_verifier, get_reward, math_reward, score_batch  # noqa: E402
from tapo_megatron.rollout.native import NativeEngine  # noqa: E402
from tapo_megatron.tasks.arithmetic import ArithmeticTask, ArithmeticTokenizer  # noqa: E402
from tapo_megatron.trajectory.builder import TrajectoryBuilder  # noqa: E402
from tapo_megatron.trajectory.constructors import (  # noqa: E402
    ConstructionRequest,
    build_constructor,
    get_constructor,
)
from tapo_megatron.trajectory.splice import splice  # noqa: E402

DEMO = REPO / "tapo_megatron" / "recipes" / "demo.yaml"
TOK = ArithmeticTokenizer()
TASK = ArithmeticTask()


# ---------------------------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict():
    fn = get_reward("examples.reward:strict_boxed_reward")
    yield fn
    close_default_verifier()  # the math_verify worker pool started by the first verification


def test_reward_found_by_path_and_name(strict):
    from examples.reward import strict_boxed_reward

    assert strict is strict_boxed_reward
    assert get_reward("strict_boxed") is strict_boxed_reward


STRICT_CASES = [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),  # one box, mathematically equal
    ("\\boxed{\\boxed{5}}", "5", 1.0),  # a box wrapping a box is one box
    ("maybe \\boxed{0.5}, or \\boxed{0.5}", "0.5", 0.0),  # two boxes, even when both are right
    ("\\boxed{0.5} ... or rather \\boxed{3", "0.5", 0.0),  # a second, unclosed box is still a hedge
    ("the answer is 0.5", "0.5", 0.0),  # no box (math_reward would accept this one)
    ("\\boxed{3}", "4", 0.0),  # wrong
    ("}}{{\\boxed{\\boxed{ \x00 $$ \\frac{", "4", 0.0),  # garbage
    ("", "4", 0.0),
    (None, "4", 0.0),  # non-str response
    (12, "12", 0.0),
    ("\\boxed{12}", None, 0.0),  # non-str gold
]


def test_strict_boxed_cases(strict):
    got = [strict(response, gold) for response, gold, _ in STRICT_CASES]
    assert got == [want for _, _, want in STRICT_CASES]
    assert math_reward("the answer is 0.5", "0.5") == 1.0  # what "strict" adds over the built-in reward
    # The batched path (rewards.scoring picks it up) agrees with one call per item.
    responses, golds, wants = zip(*STRICT_CASES)
    assert score_batch(strict, list(responses), list(golds)) == list(wants)


# ---------------------------------------------------------------------------------------------------------------
# Advantage estimator
# ---------------------------------------------------------------------------------------------------------------

# (group_id, is_constructed, reward, hand advantage), deliberately unsorted; see the module docstring.
RAGGED = [
    (2, False, 1.0, 1.0),
    (1, True, 1.0, 0.0),
    (0, False, 1.0, 0.0),
    (2, True, 1.0, 0.5),
    (1, False, 1.0, 1.0),
    (2, False, 0.0, -0.5),
    (2, True, 0.0, -1.0),
    (1, False, 0.0, -1.0),
    (2, True, 1.0, 0.5),
    (1, True, 1.0, 0.0),
    (2, False, 0.0, -0.5),
]


def _ragged_input() -> AdvantageInput:
    return AdvantageInput(
        rewards=torch.tensor([r for _, _, r, _ in RAGGED], dtype=torch.float64),
        group_ids=torch.tensor([g for g, _, _, _ in RAGGED]),
        is_constructed=torch.tensor([c for _, c, _, _ in RAGGED]),
    )


def test_rloo_found_by_path_and_name():
    from examples.advantage import rloo_advantages

    assert get_advantage("examples.advantage:rloo_advantages") is rloo_advantages
    assert get_advantage("rloo") is rloo_advantages


def test_rloo_hand_values_and_stats():
    rloo = get_advantage("examples.advantage:rloo_advantages")
    adv, stats = rloo(_ragged_input())
    assert adv.dtype == torch.float64
    assert adv.tolist() == [a for _, _, _, a in RAGGED]  # exact: these values are dyadic
    assert (stats.num_samples, stats.num_constructed, stats.num_groups) == (11, 5, 5)
    assert stats.num_zero_variance_groups == 2
    assert (stats.num_constructed_groups, stats.num_constructed_zero_variance_groups) == (2, 1)
    assert stats.frac_zero_advantage_original == pytest.approx(1 / 6)
    assert stats.frac_zero_advantage_constructed == pytest.approx(2 / 5)


def test_rloo_is_scaled_mean_centring():
    """RLOO = n/(n-1) * (r - group mean), the group mean being DAE's (normalize_std=False) on the same keys."""
    rng = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 7, (200,), generator=rng)
    is_constructed = torch.rand(200, generator=rng) < 0.3
    rewards = (torch.rand(200, generator=rng) < 0.4).float()
    inp = AdvantageInput(rewards, group_ids, is_constructed, normalize_std=False)
    adv, _ = get_advantage("rloo")(inp)
    centred, _ = dae_estimator(inp)
    key = group_ids * 2 + is_constructed.long()
    n = torch.bincount(key)[key].float()
    expected = torch.where(n > 1, centred * n / (n - 1).clamp(min=1), torch.zeros_like(centred))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)


def test_rloo_edge_cases():
    rloo = get_advantage("rloo")
    # all-equal non-dyadic rewards: exactly 0, no round-off from (S - r) / (n - 1)
    adv, stats = rloo(AdvantageInput(torch.full((3,), 0.1), torch.zeros(3, dtype=torch.long),
                                     torch.zeros(3, dtype=torch.bool)))
    assert adv.tolist() == [0.0, 0.0, 0.0] and stats.num_zero_variance_groups == 1
    empty = AdvantageInput(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    adv, stats = rloo(empty)
    assert adv.numel() == 0 and stats.num_groups == 0 and math.isnan(stats.frac_zero_advantage_original)
    with pytest.raises(ValueError, match="group_ids must be integer"):
        rloo(AdvantageInput(torch.ones(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool)))


def _fake_rollout(query: Query, group_index: int, reward: float, tag: int) -> Rollout:
    return Rollout(query_id=query.id, group_index=group_index, prompt_ids=[5], response_ids=[tag, 1],
                   engine_logprobs=[-0.5, -0.5], finish_reason=FinishReason.STOP, weight_version=0, reward=reward)


def test_rloo_through_the_trajectory_builder():
    queries = [Query(id=f"q{i}", problem="", answer="") for i in range(3)]
    originals = [(g, r, a) for g, c, r, a in RAGGED if not c]  # groups of sizes 1, 2 and 3
    rollouts = [_fake_rollout(queries[g], g, r, tag=2 + i) for i, (g, r, _) in enumerate(originals)]
    algo = AlgorithmConfig(advantage_estimator="examples.advantage:rloo_advantages", drop_zero_variance_groups=False)
    builder = TrajectoryBuilder(TapoConfig(enabled=False), algo, TOK, reward_fn=get_reward("exact"))
    built = builder.build(queries, rollouts, step=0)
    assert [t.response_ids[0] for t in built.trajectories] == [r.response_ids[0] for r in rollouts]
    assert [t.advantage for t in built.trajectories] == [a for _, _, a in originals]
    assert built.advantage_stats.num_groups == 3 and built.metrics["adv/num_zero_variance_groups"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Constructor
# ---------------------------------------------------------------------------------------------------------------


def _engine(seed: int = 0) -> NativeEngine:
    hf_config = yaml.safe_load(DEMO.read_text())["model"]["hf_config"]  # the demo's 0.79 M-parameter shape
    return NativeEngine(hf_config, seed=seed, num_threads=1)


def _rollout(query: Query, group_index: int, text: str) -> Rollout:
    ids = TOK.encode(text) + [TOK.eos_id]
    return Rollout(query_id=query.id, group_index=group_index, prompt_ids=list(query.prompt_ids), response_ids=ids,
                   engine_logprobs=[-0.25] * len(ids), finish_reason=FinishReason.STOP, weight_version=0,
                   response_text=text, reward=get_reward("exact")(text, query.answer))


def _requests() -> list[ConstructionRequest]:
    """Three wrong responses for each of three problems, each paired with the gold solution."""
    rng = random.Random(7)
    requests = []
    for qi, query in enumerate(TASK.generate_split(3, seed=11, split="train")):
        correct = _rollout(query, qi, TASK.solution(query.problem))
        for _ in range(3):
            wrong = _rollout(query, qi, TASK.wrong_response(query.problem, rng))
            requests.append(ConstructionRequest.from_rollouts(query, wrong, correct, TOK))
    return requests


TAPO = TapoConfig(enabled=True, constructor="examples.constructor:ArithmeticContinuationConstructor",
                  max_construction_tokens=48)


def test_constructor_found_by_path_and_name():
    from examples.constructor import ArithmeticContinuationConstructor, ContinuationConstructor

    assert get_constructor("examples.constructor:ContinuationConstructor") is ContinuationConstructor
    assert get_constructor("continuation") is ContinuationConstructor
    assert get_constructor("continuation_arithmetic") is ArithmeticContinuationConstructor
    assert issubclass(ArithmeticContinuationConstructor, ContinuationConstructor)
    # The base class's default marker is English: the demo's 20-token vocabulary refuses it at build time.
    base = TapoConfig(enabled=True, constructor="examples.constructor:ContinuationConstructor")
    with pytest.raises(ValueError, match="cannot encode the marker"):
        build_constructor(base, engine=_engine(), tokenizer=TOK)
    with pytest.raises(ValueError, match="needs the rollout engine"):
        build_constructor(TAPO, tokenizer=TOK)


def test_cut_point():
    from examples.constructor import ArithmeticContinuationConstructor, ContinuationConstructor

    arith = ArithmeticContinuationConstructor(_engine(), TOK)
    w1 = "5*3=15;7+15=21;21-4=17;A17"  # 26 chars, step ends after 7, 15, 22: nearest to 13 is 15
    assert arith.cut_point(w1) == 15
    assert ArithmeticContinuationConstructor(_engine(), TOK, cut_fraction=0.1).cut_point(w1) == 7
    assert arith.cut_point("A17") == 2  # no step end: the fraction's character, rounded
    assert arith.cut_point("7") == 1  # never empty
    # The base class cuts at line ends: 37 chars, lines end after 11 and 24; 24 is nearest to 18.5.
    math_text = "Let x = 2.\nThen 2x = 4.\nSo \\boxed{4}."
    assert ContinuationConstructor.step_ends == ("\n",)
    arith.step_ends = ("\n",)
    assert arith.cut_point(math_text) == len("Let x = 2.\nThen 2x = 4.\n") == 24


def test_continuation_constructor_constructs_and_splices():
    from examples.constructor import ArithmeticContinuationConstructor, ContinuationConstructor

    requests = _requests()
    constructor = build_constructor(TAPO, engine=_engine(seed=3), tokenizer=TOK)
    assert type(constructor) is ArithmeticContinuationConstructor
    assert constructor.sampling == SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=48,
                                                  stop_token_ids=(TOK.eos_id,))
    constructions = constructor.construct(requests)
    assert len(constructions) == len(requests)

    # Kwargs instead of the subclass, on an identically seeded engine: the very same constructions.
    by_kwargs = ContinuationConstructor(_engine(seed=3), TOK, sampling=constructor.sampling, marker="W",
                                        step_ends=(";",))
    assert [(c.text, c.failure) for c in by_kwargs.construct(requests)] == [(c.text, c.failure) for c in constructions]

    outcomes: Counter[str] = Counter()
    for request, construction in zip(requests, constructions):
        wrong_text = request.wrong_solution
        prefix = wrong_text[: constructor.cut_point(wrong_text)]
        assert prefix and wrong_text.startswith(prefix) and (prefix.endswith(";") or prefix == wrong_text)
        assert f"<reconstruction>\n{prefix}W" in construction.raw
        if construction.failure is not None:  # the random policy never stopped within 48 tokens
            assert construction.failure == "too_long" and construction.text is None
            outcomes["too_long"] += 1
            continue
        assert construction.text.startswith(prefix + "W")
        result = splice(request.query, request.wrong, construction.text, TOK, min_prefix_match=TAPO.min_prefix_match,
                        max_tokens=TAPO.max_spliced_tokens)
        if result.failure is not None:
            outcomes[result.failure] += 1
            continue
        outcomes["spliced"] += 1
        traj = result.trajectory
        k = result.prefix_tokens
        assert k == len(prefix)  # char tokenizer, and a wrong response never contains "W": the prefix is reused whole
        assert traj.prompt_ids == request.wrong.prompt_ids  # conditioned on the original query
        assert traj.response_ids[:k] == request.wrong.response_ids[:k]  # the policy's own sampled ids
        assert traj.provenance == [Provenance.SAMPLED] * k + [Provenance.INJECTED] * (len(traj.response_ids) - k)
        assert traj.response_ids[k] == TOK.token_to_id("W") and traj.response_ids[-1] == TOK.eos_id
        assert TOK.decode(traj.response_ids) == construction.text
    # Deterministic (engine seed 3, one thread); what the random demo-shape model actually produced:
    assert outcomes == Counter(spliced=8, too_long=1)


def test_continuation_constructor_in_a_tapo_step():
    """The constructor and RLOO together in one builder step (with the task's "exact" reward: the strict boxed
    reward reads LaTeX, not arithmetic), constructed trajectories in their own RLOO groups."""
    requests = _requests()
    queries = list({r.query.id: r.query for r in requests}.values())
    rollouts = [r.correct for r in requests[::3]] + [r.correct for r in requests[::3]] + [r.wrong for r in requests]
    tapo = TapoConfig(enabled=True, constructor="continuation_arithmetic", n_pos=1, n_neg=1, m_max=2,
                      max_construction_tokens=48)
    algo = AlgorithmConfig(advantage_estimator="rloo")
    builder = TrajectoryBuilder(tapo, algo, TOK, get_reward("exact"),
                                build_constructor(tapo, engine=_engine(seed=3), tokenizer=TOK), seed=0)
    built = builder.build(queries, rollouts, step=0)
    assert built.metrics["tapo/num_candidates"] == 3 and built.metrics["tapo/constructions_attempted"] == 6
    constructed = [t for t in built.trajectories if t.kind is TrajectoryKind.CONSTRUCTED]
    assert len(constructed) == 6 - sum(built.failures.values()) >= 1
    for t in constructed:  # a random model's continuation is no correct solution: an all-0 group, advantage 0
        assert "W" in t.response_text and t.reward == 0.0 and t.advantage == 0.0
    originals = [t for t in built.trajectories if t.kind is TrajectoryKind.ORIGINAL]
    assert len(originals) == 15
    for t in originals:  # groups of 2 correct + 3 wrong: 1 - (1+0+0+0)/4 = 0.75, 0 - (1+1+0+0)/4 = -0.5
        assert t.advantage == (0.75 if t.reward == 1.0 else -0.5)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [
    ("examples.advantage:rloo_advantages", "examples.reward:strict_boxed_reward",
     "examples.constructor:ContinuationConstructor"),
    ("rloo", "strict_boxed", "continuation"),
])
def test_config_naming_the_plugins_validates(names):
    import examples.advantage  # noqa: F401  (importing a plug-in module registers its name)
    import examples.constructor  # noqa: F401
    import examples.reward  # noqa: F401

    advantage, reward, constructor = names
    cfg = load_config(DEMO, [f"algorithm.advantage_estimator={advantage}", f"data.reward={reward}",
                             "tapo.enabled=true", f"tapo.constructor={constructor}"])
    assert (cfg.algorithm.advantage_estimator, cfg.data.reward, cfg.tapo.constructor) == names


def test_config_with_a_bad_plugin_path_fails():
    with pytest.raises(ConfigError, match="algorithm.advantage_estimator"):
        load_config(DEMO, ["algorithm.advantage_estimator=examples.advantage:no_such_estimator"])
