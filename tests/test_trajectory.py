"""The trajectory builder stage: DCS, ZPD, pairing, parsing, constructors, splicing, and the builder end to end.

Demo task hand arithmetic (char tokenizer: digit d -> id d+2, + 12, - 13, * 14, = 15, ; 16, A 17, W 19, <eos> 1):

    problem 7+5*3-4, gold "5*3=15;7+15=22;22-4=18;A18" (answer 18)
    w1 "5*3=15;7+15=21;21-4=17;A17"  -> "5*3=15;7+15=21;" + "W7+15=22;22-4=18;A18"   c = 15, inject 20 + eos
    w2 "5*3=16;7+16=23;23-4=19;A19"  -> "5*3=16;" + "W5*3=15;7+15=22;22-4=18;A18"          c = 7,  inject 27 + eos
    w3 "" (eos only)                 -> the gold text: copies nothing -> prefix_mismatch (fraction 0)
    w4 "5*3=15;7+15=22;22-4=18;A17"  -> "5*3=15;7+15=22;22-4=18;A17" + ";WA18"             c = 26, inject 5 + eos

Advantages (population std, eps = 1e-6):
    4 of 8 correct:  mean 1/2, std 1/2            -> A = +-0.5 / (0.5 + 1e-6)
    1 of 4 correct:  mean 1/4, std sqrt(3)/4      -> A(1) = 0.75 / (sqrt(3)/4 + 1e-6), A(0) = -0.25 / (...)
    mixed (no DAE) 7 of 11 correct: mean 7/11, std sqrt(28)/11 -> A(1) = (4/11)/(std+eps), A(0) = -(7/11)/(std+eps)
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from tapo_megatron.errors import ConfigError

from tapo_megatron.config import AlgorithmConfig, TapoConfig
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.data.assets import qwen3_tokenizer_dir
from tapo_megatron.records import FinishReason, Generation, Provenance, Query, Rollout, SamplingParams, TrajectoryKind
from tapo_megatron.tasks.arithmetic import ArithmeticStepVerifier, exact_answer_reward
from tapo_megatron.rollout.base import RolloutEngine
from tapo_megatron.tasks.arithmetic import ArithmeticTask, ArithmeticTokenizer
from tapo_megatron.trajectory import (
    ConstructionRequest,
    Constructor,
    PolicyConstructor,
    StepVerifierConstructor,
    TrajectoryBuilder,
    available_constructors,
    build_constructor,
    is_candidate,
    parse_construction,
    register_constructor,
    select_pairs,
    zpd_filter,
)
from tapo_megatron.trajectory.constructors import render_construction_prompt
from tapo_megatron.trajectory.splice import copy_extent, splice

ARITH = ArithmeticTokenizer()
TASK = ArithmeticTask()
GOLD = "5*3=15;7+15=22;22-4=18;A18"
W1 = "5*3=15;7+15=21;21-4=17;A17"
R1 = "5*3=15;7+15=21;W7+15=22;22-4=18;A18"
W2 = "5*3=16;7+16=23;23-4=19;A19"
W4 = "5*3=15;7+15=22;22-4=18;A17"
EPS = 1e-6


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(qwen3_tokenizer_dir())


def arith_rollout(query: Query, group_index: int, text: str, reward: float | None = None) -> Rollout:
    ids = ARITH.encode(text) + [ARITH.eos_id]
    return Rollout(
        query_id=query.id, group_index=group_index, prompt_ids=list(query.prompt_ids), response_ids=ids,
        engine_logprobs=[-0.25] * len(ids), finish_reason=FinishReason.STOP, weight_version=3, response_text=text,
        reward=exact_answer_reward(text, query.answer) if reward is None else reward,
    )


def fake_rollout(query_id: str, reward: float, tag: int) -> Rollout:
    return Rollout(query_id=query_id, group_index=0, prompt_ids=[5], response_ids=[tag], engine_logprobs=[0.0],
                   finish_reason=FinishReason.STOP, weight_version=0, reward=reward)


# ---------------------------------------------------------------------------------------------------------------
# DCS, ZPD, pairing
# ---------------------------------------------------------------------------------------------------------------


def test_dcs_gate():
    assert is_candidate([1, 1, 0, 0, 0, 0, 0, 0], n_pos=2, n_neg=4)
    assert is_candidate([1, 1, 1, 1, 0, 0, 0, 0], n_pos=2, n_neg=4)
    assert not is_candidate([1, 0, 0, 0, 0, 0, 0, 0], n_pos=2, n_neg=4)  # one correct
    assert not is_candidate([1, 1, 1, 1, 1, 0, 0, 0], n_pos=2, n_neg=4)  # three wrong
    assert not is_candidate([0.5, 0.5, 0, 0, 0, 0, 0, 0], n_pos=2, n_neg=4)  # 0.5 is not correct (> 0.5 is)
    assert is_candidate([0.51, 0.9, 0.5, 0, 0, 0], n_pos=2, n_neg=4)
    with pytest.raises(ValueError, match="n_pos"):
        is_candidate([1, 0], n_pos=0, n_neg=1)


def test_zpd_filter_bounds_are_inclusive():
    assert zpd_filter([0, 1, 4, 7, 8], k=8) == [False, True, True, True, False]
    assert zpd_filter([np.int64(1), np.int64(8)], k=8) == [True, False]  # numpy ints are counts too
    assert zpd_filter([0.0, 0.125, 0.5, 0.875, 1.0, 0.12, 0.88], k=8) == [False, True, True, True, False, False,
                                                                          False]
    assert zpd_filter([sum([1.0] + [0.0] * 7) / 8, sum([1.0] * 7 + [0.0]) / 8], k=8) == [True, True]
    assert zpd_filter([], k=8) == []
    with pytest.raises(ValueError, match=r"accuracies_or_counts\[1\] = 9"):
        zpd_filter([1, 9], k=8)
    with pytest.raises(ValueError, match=r"accuracies_or_counts\[0\]"):
        zpd_filter([1.5], k=8)


def test_select_pairs_m_max_and_same_group():
    group = [fake_rollout("q", 1.0, 100), fake_rollout("q", 1.0, 101)] + [fake_rollout("q", 0.0, i) for i in range(6)]
    pairs = select_pairs(group, m_max=4, rng=random.Random(0))
    assert len(pairs) == 4
    wrong_tags = [w.response_ids[0] for w, _ in pairs]
    assert len(set(wrong_tags)) == 4 and wrong_tags == sorted(wrong_tags)  # distinct, kept in rollout order
    assert all(w.reward == 0.0 and c.reward == 1.0 for w, c in pairs)
    # Independent reference of the documented draw: indices sampled without replacement, then one choice per pair.
    ref = random.Random(0)
    idx = sorted(ref.sample(range(6), 4))
    ref_correct = [ref.choice([100, 101]) for _ in idx]
    assert wrong_tags == idx and [c.response_ids[0] for _, c in pairs] == ref_correct

    # m_max >= |N|: every wrong rollout, in order
    assert [w.response_ids[0] for w, _ in select_pairs(group, 6, random.Random(1))] == list(range(6))
    # no correct or no wrong rollout: no pairs
    assert select_pairs(group[2:], 4, random.Random(0)) == []
    assert select_pairs(group[:2], 4, random.Random(0)) == []
    with pytest.raises(ValueError, match="one query"):
        select_pairs(group + [fake_rollout("other", 0.0, 9)], 4, random.Random(0))
    with pytest.raises(ValueError, match="m_max"):
        select_pairs(group, 0, random.Random(0))


def test_select_pairs_is_deterministic_in_the_seed():
    group = [fake_rollout("q", 1.0, 100 + i) for i in range(3)] + [fake_rollout("q", 0.0, i) for i in range(5)]

    def draw(seed: int) -> list[tuple[int, int]]:
        return [(w.response_ids[0], c.response_ids[0]) for w, c in select_pairs(group, 2, random.Random(seed))]

    assert draw(7) == draw(7)
    assert len({tuple(draw(s)) for s in range(20)}) > 1  # the seed matters


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


def test_parse_good_and_tolerated_forms():
    c = parse_construction("Sure.\n<analysis>\nStep 2 is wrong.\n</analysis>\n<reconstruction>\nA B W C\n"
                           "</reconstruction>\ntrailing")
    assert (c.text, c.analysis, c.failure, c.closed) == ("A B W C", "Step 2 is wrong.", None, True)
    # case-insensitive tags, whitespace inside the brackets, missing </analysis>, missing </reconstruction> at EOS
    c = parse_construction("<ANALYSIS>bad step<Reconstruction> copy W fix < / RECONSTRUCTION >")
    assert (c.text, c.analysis, c.failure, c.closed) == ("copy W fix", "bad step", None, True)
    c = parse_construction("<analysis>x</analysis><reconstruction>copy W fix")
    assert (c.text, c.failure, c.closed) == ("copy W fix", None, False)
    c = parse_construction("<reconstruction>only this</reconstruction>")  # no analysis section: accepted
    assert (c.text, c.analysis, c.failure) == ("only this", "", None)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("The answer is 18.", "no_tags"),
        ("<analysis>the error is in step 2</analysis>", "no_tags"),
        ("<reconstruction>5*3=15;W</reconstruction><analysis>step 1</analysis>", "wrong_order"),
        ("<analysis>step 1</analysis><reconstruction>  \n </reconstruction>", "empty"),
        ("<analysis>step 1</analysis><reconstruction>", "empty"),
        ("<analysis>a</analysis><reconstruction>" + "7" * 100_000 + "</reconstruction>", "too_long"),
    ],
)
def test_parse_garbage(text, reason):
    c = parse_construction(text)
    assert c.failure == reason and c.text is None and c.raw == text


# ---------------------------------------------------------------------------------------------------------------
# Splicing, arithmetic tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_splice_reuses_the_wrong_rollouts_ids():
    q = TASK.make_query("7+5*3-4")
    wrong = arith_rollout(q, 0, W1)
    result = splice(q, wrong, R1, ARITH, min_prefix_match=0.9, max_tokens=64, advantage_group=5)
    t = result.trajectory
    assert result.failure is None and result.prefix_fraction == 1.0
    assert (result.prefix_chars, result.prefix_tokens, result.injected_tokens) == (15, 15, 21)
    assert t.response_ids[:15] == wrong.response_ids[:15] == ARITH.encode("5*3=15;7+15=21;")
    assert t.response_ids[15:] == [19, 9, 12, 3, 7, 15, 4, 4, 16, 4, 4, 13, 6, 15, 3, 10, 16, 17, 3, 10, 1]
    assert t.provenance == [Provenance.SAMPLED] * 15 + [Provenance.INJECTED] * 21
    assert t.response_ids[-1] == ARITH.eos_id
    assert t.prompt_ids == q.prompt_ids  # conditioned on the original query
    assert (t.kind, t.advantage_group, t.engine_logprobs, t.response_text) == (TrajectoryKind.CONSTRUCTED, 5, None, R1)
    assert ARITH.decode(t.response_ids) == R1


def test_splice_rejections():
    q = TASK.make_query("7+5*3-4")
    wrong = arith_rollout(q, 0, W1)
    # a copying slip in step 1, then the copy goes on: c = 5 of D = 15 characters -> 1/3
    typo = "5*3=16;7+15=21;W7+15=22;22-4=18;A18"
    assert copy_extent(W1, typo) == 15
    r = splice(q, wrong, typo, ARITH)
    assert (r.trajectory, r.failure, r.prefix_fraction) == (None, "prefix_mismatch", pytest.approx(1 / 3))
    r = splice(q, wrong, typo, ARITH, min_prefix_match=0.3)  # accepted when the bar is lowered
    assert r.failure is None and r.prefix_tokens == 5 and ARITH.decode(r.trajectory.response_ids) == typo
    # drops the prefix: only the correction and continuation, or the copy starts at step 2
    for dropped in ("W7+15=22;22-4=18;A18", "7+15=21;W7+15=22;22-4=18;A18"):
        r = splice(q, wrong, dropped, ARITH)
        assert (r.trajectory, r.failure, r.prefix_fraction) == (None, "prefix_mismatch", 0.0)
    # nothing after the copy
    assert splice(q, wrong, W1[:10], ARITH).failure == "no_continuation"
    # 15 prefix + 21 injected = 36 tokens
    assert splice(q, wrong, R1, ARITH, max_tokens=35).failure == "too_long"
    assert splice(q, wrong, R1, ARITH, max_tokens=36).failure is None
    with pytest.raises(ValueError, match="belongs to query"):
        splice(TASK.make_query("2*3+4"), wrong, R1, ARITH)


def test_copy_extent_whitespace_and_corrections():
    assert copy_extent("a = 1\nb = 2\nc = 3", "a = 1\n\nb = 2\nc = 4 wait c = 3") == len("a = 1\nb = 2\nc =")
    assert copy_extent(W1, R1) == 15  # the correction "W7+15=22;..." shares no 8-character run with "21-4=17;A17"
    assert copy_extent("7+5=12;12*3=36;36-4=32;A32", "7+5=12;W5*3=15;7+15=22;22-4=18;A18") == 7
    assert copy_extent("", GOLD) == 0
    # an inserted correction whose continuation repeats the wrong text's next step is still the correction
    assert copy_extent("8*3=28;8*3=24;28-5=23;23+24=47;A47", "8*3=28;W8*3=24;8*3=24;24-5=19;19+24=43;A43") == 7
    # a deleted character inside the copy is a slip: the copy goes on to "so"
    w = "The total is 12 apples and 30 pears, so 42 fruits."
    assert copy_extent(w, "The total is 12 apple and 30 pears, so wait: 12 + 30 = 42.") == len(w) - len(" 42 fruits.")


# ---------------------------------------------------------------------------------------------------------------
# Splicing, Qwen3 tokenizer
# ---------------------------------------------------------------------------------------------------------------

QWEN_PROBLEM = "A farmer has 5 baskets of 3 rows of 4 apples each, and 7 loose apples. How many apples are there?"
QWEN_WRONG = ("Each basket holds $3 \\times 4 = 12$ apples, so the 5 baskets hold $12 \\times 5 = 60$ apples. "
              "Removing the 7 loose apples gives $60 - 7 = 53$.\n\nTherefore, the answer is $\\boxed{53}$.")
QWEN_FIX = (" Wait, the loose apples are extra apples, so they must be added, not removed: $60 + 7 = 67$.\n\n"
            "Therefore, the answer is $\\boxed{67}$.")
QWEN_RECON = QWEN_WRONG[:QWEN_WRONG.index("\n\n")] + QWEN_FIX  # copy through "= 53$." then the correction
QWEN_CORRECT = ("The 5 baskets hold $5 \\times 3 \\times 4 = 60$ apples; with the 7 loose ones that is $60 + 7 = 67$."
                "\n\nTherefore, the answer is $\\boxed{67}$.")


def qwen_query(tok) -> Query:
    return Query(id="farm-1", problem=QWEN_PROBLEM, answer="67", prompt_ids=tok.chat_prompt_ids(QWEN_PROBLEM))


def qwen_rollout(tok, query: Query, text: str) -> Rollout:
    ids = tok.encode(text) + [tok.eos_id]
    return Rollout(query_id=query.id, group_index=0, prompt_ids=list(query.prompt_ids), response_ids=ids,
                   engine_logprobs=[-0.5] * len(ids), finish_reason=FinishReason.STOP, weight_version=1,
                   response_text=text, reward=boxed_reward(text, query.answer))


def boxed_reward(response: str, gold: str) -> float:
    return 1.0 if f"\\boxed{{{gold}}}" in response else 0.0


def test_splice_qwen_divergence_inside_a_token(qwen):
    q = qwen_query(qwen)
    wrong = qwen_rollout(qwen, q, QWEN_WRONG)
    result = splice(q, wrong, QWEN_RECON, qwen)
    t = result.trajectory
    c = QWEN_WRONG.index("\n\n")  # W continues "\n\n", R continues " Wait": c ends inside the token ".\n\n"
    assert result.failure is None and result.prefix_fraction == 1.0
    assert result.prefix_chars == c - 1  # the straddling token ".\n\n" is not reused: "." is re-tokenised
    k = result.prefix_tokens
    assert k > 0 and t.response_ids[:k] == wrong.response_ids[:k]
    assert qwen.decode(wrong.response_ids[k:k + 1]) == ".\n\n"
    assert t.provenance == [Provenance.SAMPLED] * k + [Provenance.INJECTED] * (len(t.response_ids) - k)
    assert t.response_ids[-1] == qwen.eos_id
    assert qwen.decode(t.response_ids) == QWEN_RECON
    assert qwen.decode(t.response_ids[k:]).startswith(". Wait")


def test_splice_qwen_multibyte_character_before_divergence(qwen):
    # " ≈" is two byte-level tokens (' \xe2', '\x89\x88'); the divergence comes right after it, so the reused
    # prefix must end after the second byte token, never between the two.
    q = qwen_query(qwen)
    head = "We compare both quantities: the ratio of red apples to all apples is ≈"
    wrong_text = head + " 0.25 of the total, so the answer is $\\boxed{5}$."
    recon = head + "½, which is wrong: the ratio is exactly 1/4, so the answer is $\\boxed{67}$."
    wrong = qwen_rollout(qwen, q, wrong_text)
    pieces = [qwen.decode([i]) for i in wrong.response_ids]
    assert "\ufffd" in "".join(pieces)  # the tokenizer really splits the character
    result = splice(q, wrong, recon, qwen)
    k, c = result.prefix_tokens, len(head)
    assert result.failure is None and result.prefix_fraction == 1.0 and result.prefix_chars == c
    assert result.trajectory.response_ids[:k] == wrong.response_ids[:k]
    assert qwen.decode(wrong.response_ids[:k]) == head
    assert not head.startswith(qwen.decode(wrong.response_ids[:k + 1]))  # k is the largest
    assert qwen.decode(result.trajectory.response_ids) == recon
    # "≠" shares its first UTF-8 bytes with "≈": the divergence is inside the character's byte tokens. The token
    # ' \xe2' (space + half character) straddles it and must not be reused; the space is re-tokenised.
    recon2 = head[:-1] + "≠ 1/4: it is exactly 1/4, so the answer is $\\boxed{67}$."
    result = splice(q, wrong, recon2, qwen)
    k = result.prefix_tokens
    assert result.failure is None and result.prefix_chars == len(head) - 2
    assert qwen.decode(wrong.response_ids[:k]) == head[:-2] and qwen.decode(wrong.response_ids[k:k + 1]) == " \ufffd"
    assert result.trajectory.response_ids[:k] == wrong.response_ids[:k]
    assert qwen.decode(result.trajectory.response_ids) == recon2


def test_splice_qwen_rejects_early_reformatting(qwen):
    q = qwen_query(qwen)
    wrong = qwen_rollout(qwen, q, QWEN_WRONG)
    # The copy re-flows the first space into a line break: same content, but only 4 characters are verbatim.
    reflowed = QWEN_RECON.replace("Each basket", "Each\nbasket", 1)
    r = splice(q, wrong, reflowed, qwen)
    assert r.failure == "prefix_mismatch" and r.prefix_fraction == pytest.approx(4 / QWEN_WRONG.index("\n\n"))


# ---------------------------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------------------------


def test_step_verifier_construction_in_the_policys_textual_form():
    q = TASK.make_query("7+5*3-4")
    request = ConstructionRequest.from_rollouts(q, arith_rollout(q, 0, W1), arith_rollout(q, 0, GOLD), ARITH)
    assert (request.wrong_solution, request.reference_solution) == (W1, GOLD)
    [c] = StepVerifierConstructor(ArithmeticStepVerifier()).construct([request])
    assert c.failure is None and c.text == R1
    assert c.analysis == "Step 2, '7+15=21;', has a wrong result: it should be '7+15=22;'."
    assert parse_construction(c.raw).text == R1
    assert c.raw.startswith("<analysis>") and c.raw.endswith("</reconstruction>")
    [none] = StepVerifierConstructor(ArithmeticStepVerifier()).construct([ConstructionRequest(q, arith_rollout(q, 0, GOLD),
                                                                      arith_rollout(q, 0, GOLD))])
    assert none.failure == "no_error"


def test_constructor_registry():
    assert {"policy", "step_verifier"} <= set(available_constructors())
    assert isinstance(build_constructor(TapoConfig(constructor="step_verifier"), step_verifier=ArithmeticStepVerifier()),
                      StepVerifierConstructor)
    with pytest.raises(ConfigError, match="needs a task with a step verifier"):  # a math task has none
        build_constructor(TapoConfig(constructor="step_verifier"))
    with pytest.raises(KeyError, match="registered: .*policy"):
        build_constructor(TapoConfig(constructor="oracle"))
    with pytest.raises(ValueError, match="already registered"):
        register_constructor("policy")(StepVerifierConstructor)
    with pytest.raises(ValueError, match="needs the rollout engine"):
        build_constructor(TapoConfig(constructor="policy"))
    with pytest.raises(ValueError, match="step_verifier"):  # the demo's char vocabulary cannot hold the prompt
        build_constructor(TapoConfig(constructor="policy"), engine=FakeEngine([], ARITH), tokenizer=ARITH)


def test_template_rendering(tmp_path: Path):
    template = "P={problem} W={wrong_solution} R={reference_solution} \\boxed{answer} {other}"
    out = render_construction_prompt(template, "$\\frac{1}{2}$ {wrong_solution}", "w{1}", "r")
    assert out == "P=$\\frac{1}{2}$ {wrong_solution} W=w{1} R=r \\boxed{answer} {other}"
    bad = tmp_path / "t.txt"
    bad.write_text("only {problem} and {wrong_solution}")
    with pytest.raises(ValueError, match="reference_solution"):
        PolicyConstructor(FakeEngine([], None), None, template_path=bad)


class FakeEngine(RolloutEngine):
    """Returns fixed texts (encoded with the tokenizer, eos appended unless finish_reason is LENGTH), in order."""

    def __init__(self, outputs: list[tuple[str, FinishReason]], tokenizer) -> None:
        self.outputs = list(outputs)
        self.tokenizer = tokenizer
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        self.calls.append((prompts, params))
        gens = []
        for text, reason in self.outputs[:len(prompts)]:
            ids = self.tokenizer.encode(text) + ([self.tokenizer.eos_id] if reason is FinishReason.STOP else [])
            gens.append(Generation(token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason=reason))
        self.outputs = self.outputs[len(prompts):]
        return gens

    def update_weights(self, buckets, version: int) -> None:
        raise AssertionError("not used")

    @property
    def weight_version(self) -> int:
        return 0

    def flush_cache(self) -> None: ...

    def release_memory(self) -> None: ...

    def resume_memory(self) -> None: ...

    def shutdown(self) -> None: ...

    def prompt_logprobs(self, tokens):
        raise AssertionError("a scripted engine has no model to score prompts with")

    def health(self) -> bool:
        return True


def test_policy_constructor_prompt_and_parsing(qwen):
    q = qwen_query(qwen)
    request = ConstructionRequest.from_rollouts(q, qwen_rollout(qwen, q, QWEN_WRONG),
                                                qwen_rollout(qwen, q, QWEN_CORRECT), qwen)
    good = (f"<analysis>\nThe loose apples must be added.\n</analysis>\n<reconstruction>\n{QWEN_RECON}\n"
            "</reconstruction>")
    engine = FakeEngine([(good, FinishReason.STOP), ("<analysis>a</analysis><reconstruction>Each basket holds",
                                                     FinishReason.LENGTH)], qwen)
    constructor = build_constructor(TapoConfig(constructor="policy", max_construction_tokens=77,
                                               construction_temperature=0.7), engine=engine, tokenizer=qwen)
    out = constructor.construct([request, request])
    assert (out[0].failure, out[0].text, out[0].analysis) == (None, QWEN_RECON, "The loose apples must be added.")
    assert out[1].failure == "too_long"  # cut off by max_new_tokens before </reconstruction>
    [(prompts, params)] = engine.calls  # one engine call for the whole batch
    assert (params.max_new_tokens, params.temperature, params.stop_token_ids) == (77, 0.7, (qwen.eos_id,))
    text = qwen.decode(prompts[0], skip_special=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for part in (QWEN_PROBLEM, QWEN_WRONG, QWEN_CORRECT, "<reconstruction>", "VERBATIM"):
        assert part in text
    assert prompts[0] == qwen.chat_prompt_ids(constructor.prompt_text(request))


# ---------------------------------------------------------------------------------------------------------------
# Builder end to end
# ---------------------------------------------------------------------------------------------------------------


def arith_batch():
    """q0 7+5*3-4: 4 correct + w1..w4 (candidate); q1 2*3+4: 1 of 4 correct (not); q2 1+2*3: 3 of 3 correct."""
    q0, q1, q2 = (TASK.make_query(p) for p in ("7+5*3-4", "2*3+4", "1+2*3"))
    rollouts = [arith_rollout(q0, 0, GOLD) for _ in range(4)]
    rollouts += [arith_rollout(q0, 0, w) for w in (W1, W2, "", W4)]
    rollouts += [arith_rollout(q1, 1, t) for t in ("2*3=6;6+4=10;A10", "2*3=5;5+4=9;A9", "2*3=6;A6", "")]
    rollouts += [arith_rollout(q2, 2, "2*3=6;1+6=7;A7") for _ in range(3)]
    return [q0, q1, q2], rollouts


def arith_builder(**tapo_overrides) -> TrajectoryBuilder:
    tapo = TapoConfig(enabled=True, constructor="step_verifier", **tapo_overrides)
    algo = AlgorithmConfig(advantage_estimator="dae")
    return TrajectoryBuilder(tapo, algo, ARITH, exact_answer_reward,
                             build_constructor(tapo, step_verifier=ArithmeticStepVerifier()), seed=1)


def test_builder_end_to_end_step_verifier():
    queries, rollouts = arith_batch()
    assert [r.reward for r in rollouts] == [1.0] * 4 + [0.0] * 4 + [1.0, 0.0, 0.0, 0.0] + [1.0] * 3
    result = arith_builder().build(queries, rollouts, step=0)
    trajs = result.trajectories
    originals = [t for t in trajs if t.kind is TrajectoryKind.ORIGINAL]
    constructed = [t for t in trajs if t.kind is TrajectoryKind.CONSTRUCTED]
    assert len(originals) == 12 and len(constructed) == 3  # q2's 3 zero-variance originals dropped
    assert [t.advantage_group for t in originals] == [0] * 8 + [1] * 4
    assert [t.advantage_group for t in constructed] == [3, 3, 3]  # len(queries) + query index
    for t, r in zip(originals, rollouts):
        assert t.response_ids == r.response_ids and t.engine_logprobs == r.engine_logprobs
        assert t.provenance == [Provenance.SAMPLED] * len(r.response_ids)

    a8 = 0.5 / (0.5 + EPS)
    s4 = math.sqrt(3) / 4 + EPS
    assert [t.advantage for t in originals] == pytest.approx([a8] * 4 + [-a8] * 4 + [0.75 / s4] + [-0.25 / s4] * 3,
                                                             rel=1e-9)
    # w1, w2, w4 spliced (w3 copies nothing); every construction ends at A18 -> reward 1; all-equal group -> fixed +1
    assert [t.response_text for t in constructed] == [R1, "5*3=16;W5*3=15;7+15=22;22-4=18;A18", W4 + ";WA18"]
    assert [sum(p is Provenance.SAMPLED for p in t.provenance) for t in constructed] == [15, 7, 26]
    assert [len(t.response_ids) for t in constructed] == [36, 35, 32]
    assert [(t.reward, t.advantage) for t in constructed] == [(1.0, 1.0)] * 3
    assert constructed[1].response_ids[:7] == rollouts[5].response_ids[:7]

    m = result.metrics
    assert m["tapo/num_candidates"] == 1 and m["tapo/constructions_attempted"] == 4
    assert m["tapo/parse_rate"] == 1.0 and m["tapo/splice_rate"] == 0.75
    assert m["tapo/fail/prefix_mismatch"] == 1 and m["tapo/fail/no_tags"] == 0
    assert result.failures == {"prefix_mismatch": 1}
    assert m["tapo/prefix_fraction_mean"] == 0.75  # (1 + 1 + 0 + 1) / 4
    assert m["tapo/sampled_token_frac"] == pytest.approx((15 / 36 + 7 / 35 + 26 / 32) / 3)
    assert m["tapo/constructed_accuracy"] == 1.0 and m["tapo/frac_zero_adv_constructed"] == 0.0
    assert (m["traj/num_original"], m["traj/num_constructed"], m["traj/num_dropped_zero_variance"]) == (12, 3, 3)


def test_builder_zero_variance_policy_zero_and_no_drop():
    queries, rollouts = arith_batch()
    builder = arith_builder(constructed_zero_variance="zero")
    builder.algo.drop_zero_variance_groups = False
    result = builder.build(queries, rollouts, step=0)
    assert len(result.trajectories) == 18
    assert [t.advantage for t in result.trajectories[12:15]] == [0.0] * 3  # q2's originals kept, zero advantage
    assert result.metrics["tapo/frac_zero_adv_constructed"] == 1.0
    assert result.metrics["tapo/frac_zero_adv_constructed_tokens"] == 1.0
    assert result.metrics["traj/num_dropped_zero_variance"] == 0


def test_builder_grpo_estimator_mixes_groups():
    queries, rollouts = arith_batch()
    tapo = TapoConfig(enabled=True, constructor="step_verifier")
    with pytest.warns(UserWarning, match="no-DAE"):
        builder = TrajectoryBuilder(tapo, AlgorithmConfig(advantage_estimator="grpo"), ARITH, exact_answer_reward,
                                    build_constructor(tapo, step_verifier=ArithmeticStepVerifier()), seed=1)
    trajs = builder.build(queries, rollouts, step=0).trajectories
    std = math.sqrt(28) / 11 + EPS  # q0: 4 + 3 correct of 8 + 3
    q0 = [t.advantage for t in trajs if t.query_id == queries[0].id]
    assert q0 == pytest.approx([4 / 11 / std] * 4 + [-7 / 11 / std] * 4 + [4 / 11 / std] * 3, rel=1e-9)


def test_builder_tapo_off_is_plain_grpo():
    queries, rollouts = arith_batch()
    builder = TrajectoryBuilder(TapoConfig(enabled=False), AlgorithmConfig(), ARITH, exact_answer_reward, None)
    result = builder.build(queries, rollouts, step=0)
    assert all(t.kind is TrajectoryKind.ORIGINAL for t in result.trajectories) and len(result.trajectories) == 12
    assert not any(k.startswith("tapo/") for k in result.metrics)
    with pytest.raises(ValueError, match="needs a constructor"):
        TrajectoryBuilder(TapoConfig(enabled=True), AlgorithmConfig(), ARITH, exact_answer_reward, None)
    bad = rollouts[:1]
    bad[0].group_index = 2
    with pytest.raises(ValueError, match=r"rollouts\[0\].query_id"):
        builder.build(queries, bad, step=0)


def test_builder_pairing_depends_on_seed_and_step_only():
    queries, rollouts = arith_batch()
    builder = arith_builder(m_max=2)  # 2 of the 4 wrong rollouts drawn
    first = [t.response_text for t in builder.build(queries, rollouts, step=3).trajectories]
    again = [t.response_text for t in arith_builder(m_max=2).build(queries, rollouts, step=3).trajectories]
    assert first == again


def test_builder_policy_constructor_with_garbage(qwen):
    q = qwen_query(qwen)
    wrong_texts = [QWEN_WRONG, QWEN_WRONG.replace("7 loose", "seven loose"), "I guess 50.", "It is 60.", "53."]
    rollouts = [qwen_rollout(qwen, q, QWEN_CORRECT) for _ in range(3)] + [qwen_rollout(qwen, q, t)
                                                                          for t in wrong_texts]
    outputs = [
        f"<analysis>Subtracted instead of added.</analysis>\n<reconstruction>\n{QWEN_RECON}\n</reconstruction>",
        "The answer is 67.",  # no tags
        "<reconstruction>I guess 67.</reconstruction><analysis>guessed</analysis>",  # wrong order
        "<analysis>x</analysis><reconstruction>" + "It is 60. " * 10_000 + "</reconstruction>",  # 100 kB
        f"<analysis>Wrong op.</analysis><reconstruction>{QWEN_CORRECT}</reconstruction>",  # drops the prefix
    ]
    engine = FakeEngine([(o, FinishReason.STOP) for o in outputs], qwen)
    tapo = TapoConfig(enabled=True, constructor="policy", m_max=5, max_spliced_tokens=256)
    builder = TrajectoryBuilder(tapo, AlgorithmConfig(advantage_estimator="dae"), qwen, boxed_reward,
                                build_constructor(tapo, engine=engine, tokenizer=qwen), seed=0)
    result = builder.build([q], rollouts, step=0)
    [t] = [t for t in result.trajectories if t.kind is TrajectoryKind.CONSTRUCTED]
    k = sum(p is Provenance.SAMPLED for p in t.provenance)
    assert t.response_ids[:k] == rollouts[3].response_ids[:k] and qwen.decode(t.response_ids) == QWEN_RECON
    assert (t.reward, t.advantage, t.advantage_group) == (1.0, 1.0, 1)  # a singleton group: fixed +1
    m = result.metrics
    assert (m["tapo/num_candidates"], m["tapo/constructions_attempted"]) == (1, 5)
    assert (m["tapo/parse_rate"], m["tapo/splice_rate"]) == (0.4, 0.2)
    assert result.failures == {"no_tags": 1, "wrong_order": 1, "too_long": 1, "prefix_mismatch": 1}
    assert m["traj/num_original"] == 8 and m["traj/num_constructed"] == 1
    orig = [t.advantage for t in result.trajectories if t.kind is TrajectoryKind.ORIGINAL]
    std = math.sqrt(15) / 8 + EPS  # 3 of 8 correct: var 3/8 * 5/8
    assert orig == pytest.approx([5 / 8 / std] * 3 + [-3 / 8 / std] * 5, rel=1e-9)


def test_constructor_interface_is_pluggable():
    calls = []

    class Echo(Constructor):
        def construct(self, requests):
            calls.append(len(requests))
            return [parse_construction(f"<analysis>a</analysis><reconstruction>{r.wrong_solution};WA18"
                                       "</reconstruction>") for r in requests]

        @classmethod
        def from_config(cls, tapo, *, engine=None, tokenizer=None):
            return cls()

    queries, rollouts = arith_batch()
    tapo = TapoConfig(enabled=True, constructor="unused")
    builder = TrajectoryBuilder(tapo, AlgorithmConfig(advantage_estimator="dae"), ARITH, exact_answer_reward, Echo())
    result = builder.build(queries, rollouts, step=0)
    assert calls == [4]
    # w3 is empty -> copies nothing; the other three get ";WA18" appended after their full text
    assert result.metrics["tapo/splice_rate"] == 0.75 and result.metrics["tapo/constructed_accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Located policy constructor (the step checker locates, the policy writes) and the reuse floor
# ---------------------------------------------------------------------------------------------------------------


def test_step_verifier_correction_prefix_and_first_attempt():
    sv = ArithmeticStepVerifier()
    assert sv.correction_prefix("7+5*3-4", W1) == "5*3=15;7+15=21;"
    assert sv.correction_prefix("7+5*3-4", W2) == "5*3=16;"
    assert sv.correction_prefix("7+5*3-4", "5*3=15;A14") == "5*3=15;A14;"  # premature answer: ';' added
    assert sv.correction_prefix("7+5*3-4", GOLD) is None
    assert sv.correction_prefix("7+5*3-4", "5*3=15;7+1") is None  # unfinished: nothing wrong in it
    assert sv.first_attempt_clean("7+5*3-4", R1, R1.index("W")) is False  # the slip comes before W
    spurious = "5*3=15;W5*3=15;7+15=22;22-4=18;A18"
    assert sv.first_attempt_clean("7+5*3-4", spurious, spurious.index("W")) is True
    assert sv.first_attempt_clean("7+5*3-4", GOLD, None) is True
    assert sv.first_attempt_clean("7+5*3-4", W4, None) is False


def test_located_policy_constructor_prompts_the_policy_after_the_located_step():
    q = TASK.make_query("7+5*3-4")
    correct = arith_rollout(q, 0, GOLD)
    requests = [ConstructionRequest.from_rollouts(q, arith_rollout(q, 0, w), correct, ARITH) for w in (W1, W2, GOLD)]
    # the policy's own continuations: right for w1, wrong for w2 (it corrects to a wrong value), none for GOLD
    engine = FakeEngine([("7+15=22;22-4=18;A18", FinishReason.STOP), ("5*3=14;7+14=21;21-4=17;A17",
                                                                     FinishReason.STOP)], ARITH)
    tapo = TapoConfig(enabled=True, constructor="policy_located", max_construction_tokens=33,
                      construction_temperature=0.9)
    constructor = build_constructor(tapo, engine=engine, tokenizer=ARITH, step_verifier=ArithmeticStepVerifier())
    out = constructor.construct(requests)
    assert [c.text for c in out] == [R1, "5*3=16;W5*3=14;7+14=21;21-4=17;A17", None]
    assert out[2].failure == "no_error"
    assert out[0].analysis == "Step 2, '7+15=21;', has a wrong result: it should be '7+15=22;'."
    [(prompts, params)] = engine.calls  # one engine call, only for the two faulty solutions
    assert prompts == [q.prompt_ids + ARITH.encode("5*3=15;7+15=21;W"), q.prompt_ids + ARITH.encode("5*3=16;W")]
    assert (params.max_new_tokens, params.temperature, params.stop_token_ids) == (33, 0.9, (ARITH.eos_id,))
    # a continuation that hit the token limit is cut off
    cut = build_constructor(tapo, engine=FakeEngine([("7+15=22;22", FinishReason.LENGTH)], ARITH), tokenizer=ARITH,
                            step_verifier=ArithmeticStepVerifier()).construct(requests[:1])
    assert cut[0].failure == "too_long"
    with pytest.raises(ConfigError, match="policy_located.*step verifier"):
        build_constructor(tapo, engine=engine, tokenizer=ARITH)
    with pytest.raises(ConfigError, match="correction_prefix"):  # an older step verifier that only writes corrections
        build_constructor(tapo, engine=engine, tokenizer=ARITH, step_verifier=object())


def test_builder_with_located_policy_constructor_scores_the_policys_corrections():
    queries, rollouts = arith_batch()
    # w1, w2, w4 get a continuation (w3 is empty: INCOMPLETE, nothing wrong); w2's correction is wrong
    engine = FakeEngine([("7+15=22;22-4=18;A18", FinishReason.STOP), ("5*3=14;7+14=21;21-4=17;A17", FinishReason.STOP),
                         ("A18", FinishReason.STOP)], ARITH)
    tapo = TapoConfig(enabled=True, constructor="policy_located", min_reused_tokens=8)
    builder = TrajectoryBuilder(tapo, AlgorithmConfig(advantage_estimator="dae"), ARITH, exact_answer_reward,
                                build_constructor(tapo, engine=engine, tokenizer=ARITH,
                                                  step_verifier=ArithmeticStepVerifier()), seed=1)
    result = builder.build(queries, rollouts, step=0)
    constructed = [t for t in result.trajectories if t.kind is TrajectoryKind.CONSTRUCTED]
    # w2 reuses 7 tokens ("5*3=16;") < min_reused_tokens = 8: rejected as short_prefix and counted
    assert [t.response_text for t in constructed] == [R1, W4 + ";WA18"]
    assert [t.reward for t in constructed] == [1.0, 1.0]
    m = result.metrics
    assert result.failures == {"no_error": 1, "short_prefix": 1}
    assert (m["tapo/parse_rate"], m["tapo/acceptance_rate"], m["tapo/splice_rate"]) == (0.75, 2 / 3, 0.5)
    assert m["tapo/fail/short_prefix"] == 1 and m["tapo/constructed_accuracy"] == 1.0
    # without the floor w2 is kept, and its wrong correction scores 0: constructed accuracy 2/3
    engine.outputs = [("7+15=22;22-4=18;A18", FinishReason.STOP), ("5*3=14;7+14=21;21-4=17;A17", FinishReason.STOP),
                      ("A18", FinishReason.STOP)]
    builder.tapo = TapoConfig(enabled=True, constructor="policy_located")
    again = builder.build(queries, rollouts, step=0)
    assert again.metrics["tapo/constructed_accuracy"] == pytest.approx(2 / 3)
    assert again.metrics["tapo/acceptance_rate"] == 1.0
