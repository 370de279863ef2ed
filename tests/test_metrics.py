"""pass@k, pass@1, DSR, ERR and the reflection detector, against hand-computed values and hand-labelled text."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from tapo_megatron.algorithms.metrics import (
    direct_solution_rate,
    effective_reflection_rate,
    first_attempt_rate,
    format_rate,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
    spurious_reflection_rate,
)
from tapo_megatron.algorithms.reflection import DEFAULT_REFLECTION_PATTERNS, ReflectionDetector

# ------------------------------------------------------------------------------------------------------------ pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 2, 2, 5 / 6),  # 1 - C(2,2)/C(4,2) = 1 - 1/6
        (3, 1, 2, 2 / 3),  # 1 - C(2,2)/C(3,2) = 1 - 1/3
        (10, 3, 1, 0.3),  # k = 1 is c/n
        (16, 1, 4, 0.25),  # 1 - C(15,4)/C(16,4) = 1 - 1365/1820 = 1 - 12/16
        (16, 4, 16, 1.0),  # k = n: any correct sample -> 1
        (5, 0, 3, 0.0),  # nothing correct
        (5, 5, 1, 1.0),  # everything correct
        (4, 3, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (1000, 1, 1, 0.001),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials():
    # independent reference: exact rational arithmetic with math.comb (the product form avoids these huge integers)
    for n, c, k in ((200, 100, 100), (500, 7, 64), (64, 1, 63)):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 2, 5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 2, 0)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="n must be"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="must be an int"):
        pass_at_k(4.0, 2, 1)


def test_mean_pass_at_k_and_pass_at_1():
    assert mean_pass_at_k([(4, 2), (4, 0)], 2) == pytest.approx(5 / 12)  # (5/6 + 0) / 2
    with pytest.raises(ValueError, match="k <= n"):
        mean_pass_at_k([(4, 2), (2, 1)], 3)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)
    # per-problem means 1/4 and 2/2, averaged: 0.625 (not the pooled 3/6 = 0.5)
    assert pass_at_1([[True, False, False, False], [True, True]]) == pytest.approx(0.625)
    assert pass_at_1([[True, False, True, False]] * 3) == pytest.approx(mean_pass_at_k([(4, 2)] * 3, 1))
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        pass_at_1([[True], []])


# ------------------------------------------------------------------------------------------------------- DSR and ERR


def test_dsr_and_err_hand_values():
    correct = [True, True, True, False, False]
    reflective = [False, True, False, True, False]
    # 3 correct, of which 2 without reflection -> DSR 2/3; 2 reflective, of which 1 correct -> ERR 1/2
    assert direct_solution_rate(correct, reflective) == pytest.approx(2 / 3)
    assert effective_reflection_rate(correct, reflective) == pytest.approx(0.5)


def test_dsr_and_err_undefined_are_nan():
    assert math.isnan(direct_solution_rate([False, False], [True, False]))  # nothing correct
    assert math.isnan(effective_reflection_rate([True, False], [False, False]))  # nothing reflective
    assert format_rate(float("nan")) == "n/a"
    assert format_rate(2 / 3) == "66.7"
    with pytest.raises(ValueError, match="correct has 2 entries but reflective has 1"):
        direct_solution_rate([True, False], [True])


# -------------------------------------------------------------------------------------------------- reflection detector

REFLECTIVE = [
    "So 3x + 5 = 20 gives x = 5. Wait, that's not right: 3 * 5 + 5 = 20 is correct, so x = 5 stands.",
    "The discriminant is b^2 - 4ac = 16 - 24 = -8.\nWait I think I dropped a sign; b^2 = 36, so it is 12.",
    "Then the area is 12. But wait the triangle is not right-angled.",
    "Hmm, the sum of the roots should be -b/a = 3.",
    "So the answer is 42. Let me re-check the second case before boxing it.",
    "Let me recheck: 17 * 3 = 51.",
    "Let me double-check the modular arithmetic: 7^4 = 2401 = 1 mod 100.",
    "I made an arithmetic error in step 2: 14 * 6 is 84, not 74.",
    "It seems I've made a mistake with the bounds of the integral.",
    "On second thought, the case n = 0 must be excluded, so there are 9 values.",
    "Actually, the probability is 3/8 because order matters here.",
    "Let me reconsider the boundary case x = 1.",
    "We should re-evaluate the integral with the corrected limits.",
    "That can\u2019t be right, since a probability cannot exceed 1.",
    "Plugging in gives f(2) = 9. That's wrong, since f(2) = 2^2 + 3 = 7.",
    "The roots are 2 and 3, so the product is 5 \u2014 wait\u2014the product is 6.",
]

NOT_REFLECTIVE = [
    "We await the final value: x = 5, so the answer is \\boxed{5}.",
    "The expected waiting time is 1/p = 4 minutes, so the answer is \\boxed{4}.",
    "If they wait 5 minutes between trains, the total is 5 * 12 = 60.",
    "The value is actually 5 by the same formula, so the answer is \\boxed{5}.",  # no comma: emphasis, not a U-turn
    "The statement is factually, and numerically, consistent.",  # 'actually' inside a word
    "Let me check: 3 + 4 = 7, which matches.",  # checking, not re-checking
    "The mistake-free solution uses the evaluation of f at 2.",
    "A hmmingbird is not a word, and Ohm's law gives V = IR.",
    "The answer is 12. \u2713",
    "Each customer's wait-time is exponential, and we need to wait. The mean is 2.",
]


@pytest.mark.parametrize("text", REFLECTIVE)
def test_detector_positives(text):
    assert ReflectionDetector().is_reflective(text), text


@pytest.mark.parametrize("text", NOT_REFLECTIVE)
def test_detector_tricky_negatives(text):
    detector = ReflectionDetector()
    assert not detector.is_reflective(text), detector.find(text)


def test_detector_find_positions_and_dedup():
    text = "x = 4. Wait, let me double-check. Hmm, yes."
    matches = ReflectionDetector().find(text)
    assert [(m.start, m.end, m.text) for m in matches] == [
        (7, 11, "Wait"),  # matched by two patterns (interjection + sentence start), reported once
        (13, 32, "let me double-check"),
        (34, 37, "Hmm"),
    ]


def test_detector_markers_and_custom_patterns():
    marker_only = ReflectionDetector(patterns=[], markers=["\u21ba"])
    assert marker_only.is_reflective("12 + 5 = 18 \u21ba 12 + 5 = 17")
    assert not marker_only.is_reflective("Wait, 12 + 5 = 17")  # defaults replaced
    assert [(m.start, m.text) for m in marker_only.find("a\u21bab\u21ba")] == [(1, "\u21ba"), (3, "\u21ba")]
    custom = ReflectionDetector(patterns=[r"\boops\b"], markers=["<redo>"])
    assert custom.is_reflective("OOPS, 3 * 4 = 12") and custom.is_reflective("<redo> 12")
    assert not custom.is_reflective("<REDO> 12")  # markers are literal and case-sensitive
    assert len(ReflectionDetector().patterns) == len(DEFAULT_REFLECTION_PATTERNS)


def test_detector_rejects_bad_config():
    with pytest.raises(ValueError, match=r"patterns\[1\]"):
        ReflectionDetector(patterns=[r"\bwait\b", "(unclosed"])
    with pytest.raises(ValueError, match=r"markers\[0\] is empty"):
        ReflectionDetector(markers=[""])
    with pytest.raises(ValueError, match="nothing could ever be detected"):
        ReflectionDetector(patterns=[])
    with pytest.raises(ValueError, match="not a single string"):
        ReflectionDetector(patterns=r"\bwait\b")


def test_dsr_err_with_detector():
    detector = ReflectionDetector()
    responses = [
        ("x = 5, so \\boxed{5}.", True),
        ("x = 4. Wait, I made an error: x = 5. \\boxed{5}", True),
        ("Hmm, maybe \\boxed{3}.", False),
        ("The answer is \\boxed{7}.", False),
    ]
    reflective = [detector.is_reflective(t) for t, _ in responses]
    correct = [c for _, c in responses]
    assert reflective == [False, True, True, False]
    assert direct_solution_rate(correct, reflective) == pytest.approx(0.5)  # 1 of 2 correct had no reflection
    assert effective_reflection_rate(correct, reflective) == pytest.approx(0.5)  # 1 of 2 reflective is correct


# ----------------------------------------------------------------------------- first attempt, spurious reflections

# Six hand-labelled arithmetic responses to 7+5*3-4 (gold 5*3=15;7+15=22;22-4=18;A18), marker W:
#   text                                           correct reflective clean-first-attempt
ARITH_CASES = [
    ("5*3=15;7+15=22;22-4=18;A18", True, False, True),  # direct and right
    ("5*3=15;7+15=21;W7+15=22;22-4=18;A18", True, True, False),  # slip, then an effective correction
    ("5*3=15;W5*3=15;7+15=22;22-4=18;A18", True, True, True),  # spurious: nothing wrong before W
    ("5*3=15;7+15=21;21-4=17;A17", False, False, False),  # wrong, never reflects
    ("5*3=15;7+15=22;W7+15=23;23-4=19;A19", False, True, True),  # spurious and harmful
    ("5*3=16;W5*3=17;7+17=24;24-4=20;A20", False, True, False),  # slip, failed correction
]


def test_first_attempt_and_spurious_rates_hand_values():
    from tapo_megatron.evaluation.core import first_attempt_clean
    from tapo_megatron.tasks.arithmetic import ArithmeticStepVerifier, ArithmeticTask, exact_answer_reward

    query = ArithmeticTask().make_query("7+5*3-4")
    detector = ReflectionDetector(patterns=[], markers=["W"])
    correct = [exact_answer_reward(t, query.answer) > 0.5 for t, *_ in ARITH_CASES]
    reflective = [detector.is_reflective(t) for t, *_ in ARITH_CASES]
    clean = [first_attempt_clean(query, t, c, detector, exact_answer_reward, ArithmeticStepVerifier())
             for (t, *_), c in zip(ARITH_CASES, correct)]
    assert (correct, reflective, clean) == tuple(list(col) for col in zip(*ARITH_CASES))[1:]
    # first attempt: clean and correct = rows 0 and 2 of 6; DSR: of 3 correct, 1 without W; ERR: of 4 with W, 2 right
    assert first_attempt_rate(correct, clean) == pytest.approx(2 / 6)
    assert direct_solution_rate(correct, reflective) == pytest.approx(1 / 3)
    assert effective_reflection_rate(correct, reflective) == pytest.approx(2 / 4)
    # spurious: of the 4 reflective rows, rows 2 and 4 had nothing wrong before W
    assert spurious_reflection_rate(reflective, clean) == pytest.approx(2 / 4)
    assert math.isnan(spurious_reflection_rate([False, False], [True, False]))
    assert math.isnan(first_attempt_rate([], []))
    with pytest.raises(ValueError, match="reflective has 2 entries but clean_first_attempt has 1"):
        spurious_reflection_rate([True, False], [True])


def test_first_attempt_without_a_step_verifier_reads_the_answer_before_the_reflection():
    from tapo_megatron.evaluation.core import first_attempt_clean
    from tapo_megatron.records import Query

    def boxed(text, gold):  # a stand-in verifier: the last \boxed{} equals gold
        return 1.0 if text.rfind("\\boxed{") >= 0 and text[text.rfind("\\boxed{") + 7:].split("}")[0] == gold else 0.0

    q, det = Query("q", "1+1", "2"), ReflectionDetector()
    assert first_attempt_clean(q, "So \\boxed{2}.", True, det, boxed) is True
    assert first_attempt_clean(q, "So \\boxed{3}.", False, det, boxed) is False
    assert first_attempt_clean(q, "So \\boxed{2}. Wait, let me re-check: \\boxed{2}.", True, det, boxed) is True
    assert first_attempt_clean(q, "So \\boxed{3}. Wait, that is wrong: \\boxed{2}.", True, det, boxed) is False
