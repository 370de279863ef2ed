"""Tests for tapo_megatron.rewards: boxed extraction, the math verifier pool, the exact verifier, the registry.

CPU only, ~10-20 s. Run: .venv/bin/python -m pytest tests/test_rewards.py -x -q
"""
from __future__ import annotations

import json
import os
import random
import threading
import time

import pytest

from tapo_megatron.data.assets import data_file
from tapo_megatron.rewards import (
    MathVerifier,
    VerificationPool,
    available_rewards,
    close_default_verifier,
    default_verifier,
    extract_boxed,
    find_boxed,
    get_reward,
    math_reward,
    register_reward,
    registry,
    score_batch,
    verify_math_answer,
)
from tapo_megatron.tasks.arithmetic import exact_answer_reward

HMMT10_GOLD = r"\frac{-1+\sqrt{17}}{2}, \frac{-1-\sqrt{17}}{2}"
EVAL_FILES = ("aime2024.jsonl", "aime2025.jsonl", "hmmt_feb2025.jsonl")


# -- injectable worker functions (module level, so the worker processes can unpickle them) ------------------------


def flaky_verify(response: str, gold: str) -> float:
    """``verify_math_answer``, except for marker responses that hang, kill the worker, or raise."""
    if response == "HANG":
        time.sleep(600)  # far beyond any deadline used here
    if response == "CRASH":
        os._exit(3)  # the worker dies without answering
    if response == "RAISE":
        raise ValueError("bad text")
    if response == "NAN":
        return float("nan")
    return verify_math_answer(response, gold)


def broken_initializer() -> None:
    """A worker setup that fails (as a missing import would)."""
    os._exit(2)


def scaled_reward(response: str, gold: str) -> float:
    """A user plug-in for the import-path test: 0.5 for the exact gold text."""
    return 0.5 if response == gold else 0.0


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=10.0) as pool:
        yield pool


@pytest.fixture(scope="module", autouse=True)
def _stop_default_verifier():
    yield
    close_default_verifier()


def boxed(answer: str) -> str:
    return f"Putting it together, the final answer is $\\boxed{{{answer}}}$."


# -- \boxed{} extraction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{\sqrt{2}}{2}}.", r"\frac{\sqrt{2}}{2}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),  # the last box wins
        (r"\fbox{7}", "7"),
        (r"\boxed {x^{2}}", "x^{2}"),  # whitespace before the brace
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not grouping braces
        (r"\boxed{\boxed{5}}", "5"),  # a box wrapping a box is unwrapped
        (r"\boxed{a \fbox{b} c}", r"a \fbox{b} c"),  # an inner box stays part of the outer answer
        (r"\boxed{3} and later \boxed{4", "3"),  # truncated last box: fall back to the previous complete one
        (r"\boxed{}", ""),
        ("no box here 42", None),
        ("}}}{{{", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_find_boxed_and_bad_input():
    assert find_boxed(r"\boxed{a} x \boxed{\frac{1}{2}} \boxed{b") == ["a", r"\frac{1}{2}"]
    assert extract_boxed(None) is None
    assert extract_boxed(b"\\boxed{1}") is None
    start = time.perf_counter()
    assert extract_boxed("\\boxed{" * 20_000) is None  # 140 kB of unclosed boxes: linear, not quadratic
    assert extract_boxed("{" * 100_000 + r"\boxed{9}") == "9"
    assert time.perf_counter() - start < 2.0


# -- math verifier: values ----------------------------------------------------------------------------------------


def test_fractions_are_equal_in_every_notation(verifier):
    notations = [r"\frac{1}{2}", "0.5", "1/2", r"\dfrac12"]
    pairs = [(r, g) for r in notations for g in notations[:3]]
    scores = verifier.score_batch([boxed(r) for r, _ in pairs], [g for _, g in pairs])
    assert scores == [1.0] * len(pairs), [p for p, s in zip(pairs, scores) if s != 1.0]
    wrong = verifier.score_batch([boxed(r"\frac{1}{3}"), boxed("0.51"), boxed("2")], [r"\frac{1}{2}"] * 3)
    assert wrong == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        (r"\frac{9}{\sqrt{23}}", r"\frac{9 \sqrt{23}}{23}", 1.0),  # rationalised vs not
        (r"\frac{\sqrt{570}}{12}", r"\sqrt{\frac{95}{24}}", 1.0),  # sqrt(95/24) = sqrt(570)/12
        (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", 1.0),  # nested braces inside the box
        (r"\sqrt{640}", r"8\sqrt{10}", 1.0),
        (r"-2\sqrt{3}+\sqrt{23}", r"\sqrt{23}-2 \sqrt{3}", 1.0),
        (r"26! \cdot 2^{25}", r"2^{25} \cdot 26!", 1.0),
        (r"\sqrt{3}", r"\sqrt{2}", 0.0),
        (r"8\sqrt{11}", r"8\sqrt{10}", 0.0),
        (r"1+\frac{2}{\pi}", r"1-\frac{2}{\pi}", 0.0),
    ],
)
def test_radicals_and_expressions(verifier, response, gold, expected):
    assert verifier.score(boxed(response), gold) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (boxed(HMMT10_GOLD), 1.0),
        (boxed(r"\frac{-1-\sqrt{17}}{2}, \frac{-1+\sqrt{17}}{2}"), 1.0),  # order does not matter
        (boxed(r"\left\{\frac{-1-\sqrt{17}}{2}, \frac{-1+\sqrt{17}}{2}\right\}"), 1.0),  # written as a set
        (boxed(r"\frac{-1\pm\sqrt{17}}{2}"), 1.0),  # \pm denotes both values
        (boxed(r"\frac{-1\mp\sqrt{17}}{2}"), 1.0),
        (r"so $a+b+c = \boxed{\frac{-1+\sqrt{17}}{2}}$ or $\boxed{\frac{-1-\sqrt{17}}{2}}$", 1.0),  # one per box
        (boxed(r"\frac{-1+\sqrt{17}}{2}"), 0.0),  # only one of the two values
        (boxed(r"\frac{-1+\sqrt{17}}{2}, \frac{-1+\sqrt{17}}{2}"), 0.0),  # one value twice
        (boxed(HMMT10_GOLD + ", 3"), 0.0),  # an extra value
        (boxed(r"\frac{1\pm\sqrt{17}}{2}"), 0.0),
    ],
)
def test_two_value_answer(verifier, response, expected):
    assert verifier.score(response, HMMT10_GOLD) == expected


def test_integer_set_gold_is_order_insensitive(verifier):
    scores = verifier.score_batch([boxed("3, 1, 2"), boxed("1, 2"), boxed("1, 2, 4")], ["1, 2, 3"] * 3)
    assert scores == [1.0, 0.0, 0.0]


def test_answers_without_a_box_use_math_verify_extraction(verifier):
    responses = [
        "Adding the parts gives 18. The final answer is 18.",
        "Therefore the answer is $\\frac{3}{4}$",
        "We get 18 apples at first, and after trading we have 20",  # the last number is the answer: wrong
        "I could not solve this problem.",
        "",
    ]
    scores = verifier.score_batch(responses, ["18", "0.75", "18", "18", "18"])
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_the_last_box_decides(verifier):
    assert verifier.score(r"first \boxed{17}, wait, it is \boxed{18}", "18") == 1.0
    assert verifier.score(r"first \boxed{18}, wait, it is \boxed{17}", "18") == 0.0
    assert verifier.score(r"the answer is \boxed{}", "18") == 0.0


def test_garbage_never_raises_and_scores_zero(verifier):
    rng = random.Random(0)
    binary_junk = bytes(rng.randrange(256) for _ in range(20_000)).decode("latin-1")
    long_text = "The sum of the first terms is large. " * 2_800  # ~100 kB
    responses = [
        binary_junk,
        "\x00\x01\x02\xff" * 1000,
        long_text,
        "{" * 100_000,
        "}" * 50_000 + "{" * 50_000,
        "\\boxed{" * 15_000,
        r"\boxed{\frac{1}{2",  # unbalanced
        r"\boxed{\frac{}{}}",
        r"\boxed{\sqrt{}}",
        "$$$$" * 1000,
        None,  # an aborted rollout
    ]
    start = time.perf_counter()
    scores = verifier.score_batch(responses, ["5"] * len(responses))
    assert scores == [0.0] * len(responses)
    # 100 kB of text with the right answer at the end still verifies.
    assert verifier.score(long_text + r" Hence \boxed{5}.", "5") == 1.0
    assert time.perf_counter() - start < 30.0
    assert verifier.stats.num_timeouts == 0  # these are fast rejections, not timeouts


def test_bad_gold_scores_zero(verifier):
    assert verifier.score(boxed("1"), r"\frac{") == 0.0
    assert verifier.score(boxed("1"), None) == 0.0


def test_math_reward_entry_point():
    assert math_reward(r"so \boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}") == 1.0
    assert math_reward(r"so \boxed{0.5}", "1/2") == 1.0
    assert math_reward("no idea", "1/2") == 0.0
    assert math_reward(b"\x00\xff", "1/2") == 0.0


def test_math_reward_works_outside_the_main_thread():
    # math_verify's own signal.alarm timeout raises ValueError in threads; the pool deadline does not.
    results = []
    threads = [threading.Thread(target=lambda: results.append(math_reward(boxed("0.25"), r"\frac{1}{4}")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [1.0, 1.0, 1.0]


# -- deadline pool: hangs, crashes, errors ------------------------------------------------------------------------


def test_hanging_item_is_killed_and_pool_recovers():
    timeout_s = 3.0  # well above a normal verification (~2 ms) even on a heavily loaded 2-core machine
    with MathVerifier(num_workers=2, timeout_s=timeout_s, worker_fn=flaky_verify) as pool:
        responses = ["HANG", boxed("2"), boxed("3"), boxed("4"), boxed("5")]
        start = time.perf_counter()
        scores = pool.score_batch(responses, ["1", "2", "3", "4", "6"])
        elapsed = time.perf_counter() - start
        # The hung item scores 0.0; the other worker finished the rest meanwhile.
        assert scores == [0.0, 1.0, 1.0, 1.0, 0.0]
        assert timeout_s <= elapsed < timeout_s + 15.0  # waited for the deadline, not for the 600 s sleep
        assert pool.stats.num_timeouts == 1 and pool.stats.num_restarts == 1
        # The replacement worker serves both slots afterwards, single calls included.
        assert pool.score_batch([boxed("7"), boxed("8")], ["7", "8"]) == [1.0, 1.0]
        start = time.perf_counter()
        assert pool.score("HANG", "1") == 0.0
        assert time.perf_counter() - start < timeout_s + 15.0
        assert pool.score(boxed(r"\frac{1}{2}"), "0.5") == 1.0
        assert pool.stats.num_timeouts == 2


def test_crashing_and_raising_workers_score_zero():
    with MathVerifier(num_workers=1, timeout_s=10.0, worker_fn=flaky_verify) as pool:
        scores = pool.score_batch(["CRASH", boxed("2"), "RAISE", "NAN", boxed("3")], ["1", "2", "1", "1", "3"])
        assert scores == [0.0, 1.0, 0.0, 0.0, 1.0]
        assert pool.stats.num_crashes == 1 and pool.stats.num_errors == 2 and pool.stats.num_timeouts == 0


def test_worker_that_cannot_start_is_an_error_not_a_zero_reward():
    with VerificationPool(verify_math_answer, num_workers=1, initializer=broken_initializer) as pool:
        with pytest.raises(RuntimeError, match="exited during startup"):
            pool.score(boxed("1"), "1")


def test_pool_argument_errors():
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(num_workers=1, timeout_s=0)
    with pytest.raises(ValueError, match="start_method"):
        MathVerifier(num_workers=1, start_method="threads")
    with pytest.raises(TypeError, match="picklable module-level"):
        MathVerifier(num_workers=1, worker_fn=lambda response, gold: 1.0)
    pool = MathVerifier(num_workers=1)
    with pytest.raises(ValueError, match="responses has 2 items but golds has 1"):
        pool.score_batch(["a", "b"], ["1"])
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.score("a", "1")


def test_batch_of_realistic_responses(verifier):
    """A step's batch through the 2-worker pool, on responses shaped like real ones, scored right. Throughput is a
    benchmark, not a test: ``tapo bench rewards`` (verifications/s against in-process math-verify)."""
    golds = [r"\frac{9 \sqrt{23}}{23}", "204", HMMT10_GOLD, r"2^{25} \cdot 26!", r"1-\frac{2}{\pi}", "-984"]
    reasoning = "Let $x$ be the unknown. Then $x^2 - 3x + 2 = 0$, so we factor and check both roots. " * 20
    responses, batch_golds = [], []
    for i in range(240):
        gold = golds[i % len(golds)]
        answer = gold if i % 2 == 0 else "17"
        responses.append(reasoning + boxed(answer))
        batch_golds.append(gold)
    scores = verifier.score_batch(responses, batch_golds)
    assert scores == [1.0 if i % 2 == 0 else 0.0 for i in range(240)]


# -- acceptance: the three eval sets ------------------------------------------------------------------------------


def _eval_rows() -> list[dict]:
    rows = []
    for name in EVAL_FILES:
        with open(data_file(name), encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def _wrong_answer(gold: str) -> str:
    """A clearly wrong answer: gold+1 (integers) or (gold)+1 in LaTeX."""
    try:
        return str(int(gold) + 1)
    except ValueError:
        return f"\\left({gold}\\right) + 1"


def test_eval_sets_gold_answers_accepted_and_wrong_answers_rejected(verifier):
    rows = _eval_rows()
    assert len(rows) == 90 and all({"id", "problem", "answer"} <= set(row) for row in rows)
    golds = [row["answer"] for row in rows]
    right = verifier.score_batch([boxed(g) for g in golds], golds)
    rejected = [row["id"] for row, score in zip(rows, right) if score != 1.0]
    assert not rejected, f"gold answers not accepted: {rejected}"
    wrong = verifier.score_batch([boxed(_wrong_answer(g)) for g in golds], golds)
    accepted = [row["id"] for row, score in zip(rows, wrong) if score != 0.0]
    assert not accepted, f"wrong answers accepted: {accepted}"
    hmmt10 = next(row for row in rows if row["id"] == "hmmt_feb2025-10")
    assert hmmt10["answer"] == HMMT10_GOLD
    assert verifier.score(boxed(r"\frac{-1+\sqrt{17}}{2}"), HMMT10_GOLD) == 0.0  # half of a two-value answer
    assert sum(not g.lstrip("-").isdigit() for g in golds) == 16  # the HMMT LaTeX answers were exercised


# -- exact verifier (demo task) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        ("5*3=15;7+15=22;22-4=18;A18", "18", 1.0),
        ("5*3=15;7+15=22;22-4=18;A18\n", "18", 1.0),
        ("3-9=-6;A-6", "-6", 1.0),
        ("A1;A2;A18", "18", 1.0),  # the last A counts
        ("5*3=15;7+15=22;22-4=18;A17", "18", 0.0),
        ("5*3=15;7+15=22;22-4=18;A018", "18", 0.0),  # not the canonical integer
        ("5*3=15;7+15=22;22-4=18;A18;5", "18", 0.0),  # ran on after the answer
        ("5*3=15;7+15=22;22-4=18;A", "18", 0.0),
        ("5*3=15;7+15=22;22-4=18", "18", 0.0),  # no answer
        ("A18A", "18", 0.0),
        ("", "18", 0.0),
        (None, "18", 0.0),
    ],
)
def test_exact_answer_reward(response, gold, expected):
    assert exact_answer_reward(response, gold) == expected


def test_exact_answer_reward_rejects_a_non_integer_gold():
    with pytest.raises(ValueError, match="gold must be an integer"):
        exact_answer_reward("A18", "18.0")


# -- registry ---------------------------------------------------------------------------------------------------


def test_registry_builtins_and_unknown_name():
    assert get_reward("math") is math_reward
    assert get_reward("exact") is exact_answer_reward
    assert {"math", "exact"} <= set(available_rewards())
    with pytest.raises(KeyError, match=r"unknown reward 'mathh'.*exact, math"):
        get_reward("mathh")


def test_registry_register_and_duplicates(monkeypatch):
    monkeypatch.setattr(registry.REWARDS, "_entries", dict(registry.REWARDS._entries))  # do not leak test names

    @register_reward("always_one")
    def always_one(response: str, gold: str) -> float:
        return 1.0

    assert get_reward("always_one")("anything", "x") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("always_one")(always_one)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(always_one)
    with pytest.raises(TypeError, match="cannot be called as fn"):
        register_reward("one_arg")(lambda response: 1.0)
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("pkg:fn")


def test_registry_import_path_plugins():
    assert get_reward("tapo_megatron.tasks.arithmetic.reward:exact_answer_reward") is exact_answer_reward
    plugin = get_reward(f"{__name__}:scaled_reward")
    assert plugin("7", "7") == 0.5 and plugin("7", "8") == 0.0
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(AttributeError, match="has no attribute 'missing'"):
        get_reward("tapo_megatron.tasks.arithmetic.reward:missing")
    with pytest.raises(TypeError, match="not callable"):
        get_reward("tapo_megatron.tasks.arithmetic.reward:_INTEGER")
    with pytest.raises(ValueError, match="must look like"):
        get_reward("tapo_megatron.tasks.arithmetic.reward:")


def test_registry_score_batch_uses_the_pool_for_math():
    math_fn = get_reward("math")
    before = default_verifier().stats.num_items
    responses = [boxed("1/3"), boxed("0.5"), "no answer", None]
    assert score_batch(math_fn, responses, [r"\frac{1}{3}"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert default_verifier().stats.num_items == before + 4  # one batched call, not four single ones
    assert score_batch(get_reward("exact"), ["1+1=2;A2", "A3"], ["2", "2"]) == [1.0, 0.0]  # per-item path
    with pytest.raises(ValueError, match="responses has 1 items but golds has 2"):
        score_batch(math_fn, ["a"], ["1", "2"])
