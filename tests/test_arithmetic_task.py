"""The embedded demo task: tokenizer, problem format, splits, step verifier, correction writer, SFT pairs."""
from __future__ import annotations

import random
import re

import pytest

from tapo_megatron.records import Query
from tapo_megatron.tasks.arithmetic import (
    ArithmeticTask,
    ArithmeticTokenizer,
    StepErrorKind,
    check_steps,
    encode_prompt,
    evaluate,
    extract_answer,
    format_prompt,
    is_reflective,
    parse_problem,
    solution_steps,
    write_correction,
)

EXAMPLE = "7+5*3-4"
EXAMPLE_GOLD = "5*3=15;7+15=22;22-4=18;A18"


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


# -- tokenizer -------------------------------------------------------------------------------------------------------


def test_tokenizer_ids_are_the_documented_table():
    tok = ArithmeticTokenizer()
    assert tok.vocab_size == 20 <= 32
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    expected = {"0": 2, "9": 11, "+": 12, "-": 13, "*": 14, "=": 15, ";": 16, "A": 17, ">": 18, "W": 19}
    assert {ch: tok.token_to_id(ch) for ch in expected} == expected
    assert tok.encode("7+5*3-4>") == [9, 12, 7, 14, 5, 13, 6, 18]


def test_tokenizer_round_trip_and_specials():
    tok = ArithmeticTokenizer()
    text = "0123456789+-*=;A>W"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<pad><pad>7+5>") + tok.encode("12;A12") + [tok.eos_id]
    assert ids[:2] == [0, 0] and ids[-1] == 1
    assert tok.decode(ids) == "7+5>12;A12"
    assert tok.decode(ids, skip_special=False) == "<pad><pad>7+5>12;A12<eos>"
    assert tok.encode(tok.decode(ids, skip_special=False)) == ids


def test_tokenizer_rejects_unknown_input():
    tok = ArithmeticTokenizer()
    with pytest.raises(ValueError, match=r"'/' at position 1"):
        tok.encode("8/2")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode("<bos>1")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([3, 20])


def test_prompt_is_left_padded_to_fixed_length(task):
    assert format_prompt(EXAMPLE) == "7+5*3-4>"
    assert task.prompt_len == 15  # 5 two-digit operands + 4 ops + '>'
    assert encode_prompt(EXAMPLE, 15) == [0] * 7 + [9, 12, 7, 14, 5, 13, 6, 18]
    assert task.tokenizer.chat_prompt_ids(EXAMPLE) == [9, 12, 7, 14, 5, 13, 6, 18]
    longest = "20*20-20*20+20"
    assert len(encode_prompt(longest, 15)) == 15 and encode_prompt(longest, 15)[0] != 0
    with pytest.raises(ValueError, match="more than prompt_len=14"):
        encode_prompt(longest, 14)
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        ArithmeticTask(prompt_len=14)


# -- problems and gold solutions -------------------------------------------------------------------------------------


def test_example_solution(task):
    assert task.solution(EXAMPLE) == EXAMPLE_GOLD
    assert parse_problem(EXAMPLE) == ([7, 5, 3, 4], ["+", "*", "-"])


@pytest.mark.parametrize(
    "problem, gold",
    [
        ("2*3+4*5", "2*3=6;4*5=20;6+20=26;A26"),  # both products before the sum
        ("1+2*3-4*5", "2*3=6;4*5=20;1+6=7;7-20=-13;A-13"),  # all '*' first, then +/- left to right
        ("2*3*4", "2*3=6;6*4=24;A24"),  # product chains left to right
        ("20-3-5", "20-3=17;17-5=12;A12"),  # subtraction is left-associative
        ("3-7*2+0", "7*2=14;3-14=-11;-11+0=-11;A-11"),  # negative intermediates keep their sign
        ("10*0*7-20", "10*0=0;0*7=0;0-20=-20;A-20"),
    ],
)
def test_precedence(task, problem, gold):
    assert task.solution(problem) == gold


def test_malformed_problem_is_rejected():
    for bad in ["7+5>", "7 + 5", "-3+4", "7", "7+", "7/5"]:
        with pytest.raises(ValueError, match="not an arithmetic problem"):
            parse_problem(bad)


def test_sampled_problems_respect_bounds_and_match_python_eval(task):
    rng = random.Random(123)
    n_ops_seen = set()
    for _ in range(3000):
        problem = task.sample_problem(rng)
        operands, ops = parse_problem(problem)
        n_ops_seen.add(len(ops))
        assert 2 <= len(ops) <= 4
        assert all(0 <= x <= 20 for x in operands)
        steps = solution_steps(problem)
        assert len(steps) == len(ops)  # one step per binary operation
        assert all(abs(s.c) <= 999 for s in steps)
        assert evaluate(problem) == eval(problem)  # Python's precedence is the reference
    assert n_ops_seen == {2, 3, 4}


def test_out_of_bound_problems_are_resampled():
    small = ArithmeticTask(max_abs_value=30)
    rng = random.Random(0)
    problems = [small.sample_problem(rng) for _ in range(500)]
    assert all(abs(s.c) <= 30 for p in problems for s in solution_steps(p))
    assert any("*" in p for p in problems)  # products are still drawn, only the large ones are resampled


# -- splits ----------------------------------------------------------------------------------------------------------


def test_splits_are_disjoint_deterministic_and_distinct(task):
    train = task.generate_split(2000, seed=0, split="train")
    heldout = task.generate_split(300, seed=0, split="heldout")
    train_problems = {q.problem for q in train}
    heldout_problems = {q.problem for q in heldout}
    assert len(train_problems) == 2000 and len(heldout_problems) == 300  # distinct within a split
    assert not train_problems & heldout_problems
    assert all(task.split_of(p) == "heldout" for p in heldout_problems)
    assert all(task.split_of(p) == "train" for p in train_problems)
    # Deterministic, and the same problems across seeds still land in the same split.
    assert [q.problem for q in task.generate_split(300, seed=0, split="heldout")] == [q.problem for q in heldout]
    other_seed = {q.problem for q in task.generate_split(300, seed=1, split="train")}
    assert other_seed != set(list(train_problems)[:300]) and not other_seed & heldout_problems
    # Membership is a hash: about heldout_fraction of random problems are held out.
    rng = random.Random(7)
    share = sum(task.split_of(task.sample_problem(rng)) == "heldout" for _ in range(4000)) / 4000
    assert 0.08 < share < 0.12


def test_queries_carry_answer_and_prompt(task):
    (q,) = task.generate_split(1, seed=3, split="heldout")
    assert isinstance(q, Query)
    assert q.id == f"arith-{q.problem}" and q.source == "arithmetic-heldout"
    assert q.answer == str(eval(q.problem))
    assert len(q.prompt_ids) == task.prompt_len
    assert task.tokenizer.decode(q.prompt_ids) == q.problem + ">"
    assert task.make_query(EXAMPLE).answer == "18"


# -- step verifier ---------------------------------------------------------------------------------------------------


def test_check_steps_correct_response():
    assert check_steps(EXAMPLE, EXAMPLE_GOLD) is None


def test_check_steps_wrong_arithmetic():
    c = check_steps(EXAMPLE, "5*3=15;7+15=21;21-4=17;A17")
    assert (c.kind, c.step_index, c.char_offset, c.char_end) == (StepErrorKind.WRONG_RESULT, 1, 7, 15)
    assert (c.expected, c.found) == ("7+15=22;", "7+15=21;")


def test_check_steps_out_of_order():
    # Left to right without precedence: 7+5 first.
    c = check_steps(EXAMPLE, "7+5=12;12*3=36;36-4=32;A32")
    assert (c.kind, c.step_index, c.char_offset, c.expected) == (StepErrorKind.WRONG_ORDER, 0, 0, "5*3=15;")
    # Right first step, then subtraction before addition.
    c = check_steps(EXAMPLE, "5*3=15;15-4=11;7+11=18;A18")
    assert (c.kind, c.step_index, c.char_offset, c.found) == (StepErrorKind.WRONG_ORDER, 1, 7, "15-4=11;")
    # Commuted operands are a different step (the canonical form is fixed).
    assert check_steps(EXAMPLE, "3*5=15;").kind is StepErrorKind.WRONG_ORDER


def test_check_steps_malformed():
    c = check_steps(EXAMPLE, "5*3=15;7+=22;22-4=18;A18")
    assert (c.kind, c.step_index, c.char_offset, c.char_end) == (StepErrorKind.MALFORMED, 1, 7, 13)
    assert check_steps(EXAMPLE, "05*3=15;7+15=22;22-4=18;A18").kind is StepErrorKind.MALFORMED  # leading zero
    assert check_steps(EXAMPLE, "5*3=15;;").kind is StepErrorKind.MALFORMED
    c = check_steps(EXAMPLE, "5*3=15;7+15=22;22-4=18;A18;")  # junk after the answer
    assert (c.kind, c.step_index, c.char_offset, c.found) == (StepErrorKind.MALFORMED, 3, 23, "A18;")


def test_check_steps_missing_or_wrong_answer():
    c = check_steps(EXAMPLE, "5*3=15;7+15=22;22-4=18;")  # EOS where the answer belongs
    assert (c.kind, c.step_index, c.char_offset, c.expected) == (StepErrorKind.INCOMPLETE, 3, 23, "A18")
    c = check_steps(EXAMPLE, "5*3=15;7+1")  # truncated mid-step
    assert (c.kind, c.step_index, c.char_offset, c.char_end, c.found) == (StepErrorKind.INCOMPLETE, 1, 7, 10, "7+1")
    c = check_steps(EXAMPLE, "5*3=15;7+15=22;22-4=18;A17")
    assert (c.kind, c.step_index, c.char_offset, c.expected) == (StepErrorKind.WRONG_ANSWER, 3, 23, "A18")
    c = check_steps(EXAMPLE, "5*3=15;A15")
    assert (c.kind, c.step_index, c.char_offset) == (StepErrorKind.PREMATURE_ANSWER, 1, 7)
    c = check_steps(EXAMPLE, "5*3=15;7+15=22;22-4=18;18+0=18;A18")
    assert (c.kind, c.step_index, c.char_offset) == (StepErrorKind.EXTRA_STEP, 3, 23)


def test_check_steps_flags_the_slip_of_a_reflective_response():
    c = check_steps(EXAMPLE, "5*3=15;7+15=21;W7+15=22;22-4=18;A18")
    assert (c.kind, c.step_index, c.char_offset) == (StepErrorKind.WRONG_RESULT, 1, 7)


# -- correction writer -----------------------------------------------------------------------------------------------


def test_write_correction_exact_strings():
    assert write_correction(EXAMPLE, EXAMPLE_GOLD) is None
    assert write_correction(EXAMPLE, "5*3=15;7+15=21;21-4=17;A17") == "5*3=15;7+15=21;W7+15=22;22-4=18;A18"
    assert write_correction(EXAMPLE, "7+5=12;12*3=36;36-4=32;A32") == "7+5=12;W5*3=15;7+15=22;22-4=18;A18"
    # A faulty step without its ';' gets one before the marker.
    assert write_correction(EXAMPLE, "5*3=15;7+15=21") == "5*3=15;7+15=21;W7+15=22;22-4=18;A18"
    assert write_correction(EXAMPLE, "5*3=15;7+15=22;22-4=18;A17") == "5*3=15;7+15=22;22-4=18;A17;WA18"
    assert write_correction(EXAMPLE, "5*3=15;A15") == "5*3=15;A15;W7+15=22;22-4=18;A18"
    assert write_correction("1+2*3-4*5", "2*3=6;4*5=20;1+6=8;8-20=-12;A-12") == (
        "2*3=6;4*5=20;1+6=8;W1+6=7;7-20=-13;A-13"
    )
    # Nothing written is wrong in a truncated response: it is completed, no marker.
    assert write_correction(EXAMPLE, "5*3=15;7+1") == EXAMPLE_GOLD


def test_corrections_keep_the_prefix_and_reach_the_answer(task):
    rng = random.Random(5)
    for _ in range(300):
        problem = task.sample_problem(rng)
        wrong = task.wrong_response(problem, rng)
        check = check_steps(problem, wrong)
        assert check is not None and check.kind is StepErrorKind.WRONG_RESULT
        assert extract_answer(wrong) != str(eval(problem))
        fixed = write_correction(problem, wrong)
        # Steps before the slip equal gold's, so gold's text from the slip's offset is the canonical rest.
        assert fixed == wrong[: check.char_end] + "W" + task.solution(problem)[check.char_offset:]
        assert extract_answer(fixed) == str(eval(problem))
        assert is_reflective(fixed) and not is_reflective(wrong)
        task.tokenizer.encode(fixed)  # stays inside the vocabulary


def test_extract_answer():
    assert extract_answer(EXAMPLE_GOLD) == "18"
    assert extract_answer("7*2=14;3-14=-11;A-11") == "-11"
    assert extract_answer("5*3=15;A15;W7+15=22;22-4=18;A18") == "18"
    assert extract_answer("5*3=15;7+15=") is None
    assert extract_answer("A18;") is None
    assert not is_reflective(EXAMPLE_GOLD)


# -- SFT pairs -------------------------------------------------------------------------------------------------------


def test_sft_examples(task):
    tok = task.tokenizer
    examples = task.sft_examples(200, seed=0)
    assert examples == task.sft_examples(200, seed=0)
    for prompt_ids, response_ids in examples:
        assert len(prompt_ids) == task.prompt_len and response_ids[-1] == tok.eos_id
        assert tok.eos_id not in response_ids[:-1] and tok.pad_id not in response_ids
        problem = tok.decode(prompt_ids)[:-1]
        assert task.split_of(problem) == "train"
        assert tok.decode(response_ids) == task.solution(problem)
        assert len(response_ids) <= task.max_response_len
    reflective = task.sft_examples(100, seed=0, reflective_fraction=1.0)
    for prompt_ids, response_ids in reflective:
        text = tok.decode(response_ids)
        problem = tok.decode(prompt_ids)[:-1]
        assert is_reflective(text) and extract_answer(text) == str(eval(problem))
    mixed = task.sft_examples(400, seed=1, reflective_fraction=0.25)
    share = sum(is_reflective(tok.decode(r)) for _, r in mixed) / 400
    assert 0.15 < share < 0.35


def test_max_response_len_bounds_the_worst_case(task):
    # Widest step "-999-999=-999;" (14 chars; b is never negative) x 4 steps + "A-999" + <eos> = 62.
    assert task.max_response_len == 62
    worst = max(len(task.solution(task.sample_problem(random.Random(s)))) for s in range(2000))
    assert worst + 1 <= task.max_response_len
    assert re.fullmatch(r"(-?\d+[+\-*]\d+=-?\d+;){2,4}A-?\d+", task.solution("20*20-20*20+20"))
