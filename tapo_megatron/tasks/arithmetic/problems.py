"""Embedded demo task: synthetic, step-verifiable multi-step integer arithmetic, char-level.

Format (one character = one token; see DEMO_NOTES):

    prompt    <pad><pad>...<pad>7+5*3-4>          left-padded with <pad> to a fixed ``prompt_len``
    response  5*3=15;7+15=22;22-4=18;A18<eos>

Problems have 2–4 binary operations from ``+ - *`` on operands 0–20; every intermediate value satisfies
``|v| <= 999`` (problems that break the bound are resampled). Evaluation order is fixed, which makes every step
checkable:

1. all multiplications first, left to right (a chain ``2*3*4`` is ``2*3=6;6*4=24;``);
2. then the additions and subtractions, left to right, on the resulting terms.

Each step is one binary operation written ``a<op>b=c;``. The response ends with ``A<answer>`` and ``<eos>``.

**Correction marker.** A self-correction (TAPO's micro-reflection, in this task's alphabet) is the character ``W``
("wait"): the wrong response copied verbatim up to and including its first faulty step (its ``;`` terminator added
if the step had none), then ``W``, then the correct steps from the correct state to ``A<answer>``:

    wrong       5*3=15;7+15=21;21-4=17;A17
    corrected   5*3=15;7+15=21;W7+15=22;22-4=18;A18

**Step correctness** (``check_steps``) is defined against the canonical solution: because step ``i`` is only judged
when steps ``0..i-1`` equal the canonical ones, "correct given the previous steps' values" reduces to "equal to the
canonical step ``i``", character for character. See ``StepErrorKind`` for the kinds of fault.

Main entry points: ``ArithmeticTokenizer``, ``ArithmeticTask`` (problems, splits, gold solutions, SFT pairs, wrong
responses), ``check_steps``, ``write_correction``, ``is_reflective``, ``extract_answer``.
"""
from __future__ import annotations

import enum
import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal, Sequence

from tapo_megatron.records import Query
from tapo_megatron.tasks.arithmetic.tokenizer import (
    ANSWER_MARK,
    CORRECTION_MARKER,
    PROMPT_END,
    STEP_END,
    TOKENIZER,
    encode_prompt,
)


# ---------------------------------------------------------------------------------------------------------------
# Problems and canonical solutions
# ---------------------------------------------------------------------------------------------------------------

_PROBLEM_RE = re.compile(r"\d+(?:[+\-*]\d+)+")
_STEP_RE = re.compile(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)")
_ANSWER_RE = re.compile(r"A(-?\d+)")


@dataclass(frozen=True)
class Step:
    """One binary operation ``a <op> b = c`` of a solution."""

    a: int
    op: str  # one of "+", "-", "*"
    b: int
    c: int

    @property
    def text(self) -> str:
        """The step as written in a response, terminator included: ``"5*3=15;"``."""
        return f"{self.a}{self.op}{self.b}={self.c}{STEP_END}"


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def parse_problem(problem: str) -> tuple[list[int], list[str]]:
    """``"7+5*3-4"`` -> ``([7, 5, 3, 4], ["+", "*", "-"])``. Raises ValueError on anything else."""
    if not _PROBLEM_RE.fullmatch(problem):
        raise ValueError(
            f"not an arithmetic problem: {problem!r} (expected non-negative integers joined by + - *, "
            f"without spaces or the trailing {PROMPT_END!r})"
        )
    operands = [int(x) for x in re.split(r"[+\-*]", problem)]
    ops = re.findall(r"[+\-*]", problem)
    return operands, ops


def _solve(operands: Sequence[int], ops: Sequence[str], override: tuple[int, int] | None = None) -> list[Step]:
    """Steps in canonical order. ``override=(k, v)`` forces step k's result to v and continues from the wrong value
    (how a policy's arithmetic slip propagates); without it the steps are the gold solution."""
    steps: list[Step] = []

    def record(a: int, op: str, b: int) -> int:
        c = _apply(a, op, b)
        if override is not None and override[0] == len(steps):
            c = override[1]
        steps.append(Step(a, op, b, c))
        return c

    # Phase 1: collapse multiplication chains, left to right. terms[j] is the j-th additive term.
    terms = [operands[0]]
    add_ops: list[str] = []
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] = record(terms[-1], "*", b)
        else:
            terms.append(b)
            add_ops.append(op)
    # Phase 2: additions and subtractions, left to right.
    acc = terms[0]
    for op, b in zip(add_ops, terms[1:]):
        acc = record(acc, op, b)
    return steps


def solution_steps(problem: str) -> list[Step]:
    """The canonical steps of a problem, e.g. ``"7+5*3-4"`` -> ``[5*3=15, 7+15=22, 22-4=18]``."""
    operands, ops = parse_problem(problem)
    return _solve(operands, ops)


def evaluate(problem: str) -> int:
    """The value of a problem under standard precedence."""
    return solution_steps(problem)[-1].c


def solution_text(problem: str) -> str:
    """The gold response text without ``<eos>``: ``"5*3=15;7+15=22;22-4=18;A18"``."""
    steps = solution_steps(problem)
    return "".join(s.text for s in steps) + f"{ANSWER_MARK}{steps[-1].c}"


def extract_answer(response_text: str) -> str | None:
    """The final answer of a response: the integer after the last ``A`` when the text ends with ``A<int>``.

    ``"5*3=15;A15;W...;A18"`` -> ``"18"``; ``"5*3=15;7+15="`` -> None. The text is the decoded response without
    ``<eos>``; anything after the answer makes it None, since the reward asks for the answer right before EOS.
    """
    match = re.search(r"A(-?\d+)\Z", response_text)
    return match.group(1) if match else None


def is_reflective(response_text: str) -> bool:
    """True when the response contains the self-correction marker ``W``."""
    return CORRECTION_MARKER in response_text


# ---------------------------------------------------------------------------------------------------------------
# Step verifier and correction writer
# ---------------------------------------------------------------------------------------------------------------


class StepErrorKind(str, enum.Enum):
    """Why a response is not the canonical solution (the first fault only)."""

    WRONG_ORDER = "wrong_order"  # a well-formed step whose operation is not the next canonical one (a, op or b differ)
    WRONG_RESULT = "wrong_result"  # the next canonical operation with a wrong result c
    MALFORMED = "malformed"  # a segment that is not ``a<op>b=c`` in canonical integer form, or a malformed answer
    EXTRA_STEP = "extra_step"  # a step after all canonical steps were done (the answer was expected)
    PREMATURE_ANSWER = "premature_answer"  # ``A...`` before all canonical steps were done
    WRONG_ANSWER = "wrong_answer"  # all steps right, ``A<x>`` with x != the answer
    INCOMPLETE = "incomplete"  # the text is a strict prefix of the gold solution (truncated, or EOS too early)


@dataclass(frozen=True)
class StepCheck:
    """The first faulty step of a response (``check_steps`` returns None when there is none).

    A response is parsed into segments: steps ``a<op>b=c;`` (the ``;`` belongs to the step; a final segment without
    it ends at the end of the text) and the answer, which is everything from an ``A`` at a segment start to the end.
    """

    step_index: int  # 0-based number of the faulty segment = number of correct steps before it
    char_offset: int  # where the faulty segment starts in response_text (INCOMPLETE: where the unfinished one does)
    char_end: int  # end (exclusive) of the faulty segment, its ';' included; len(text) for INCOMPLETE
    kind: StepErrorKind
    expected: str  # what the canonical solution has at this position: "7+15=22;" or "A18"
    found: str  # response_text[char_offset:char_end]


def _segments(text: str) -> list[tuple[int, int, bool]]:
    """Split a response into (start, end, is_answer) segments; see ``StepCheck``."""
    segs: list[tuple[int, int, bool]] = []
    pos = 0
    while pos < len(text):
        if text[pos] == ANSWER_MARK:
            segs.append((pos, len(text), True))
            break
        end = text.find(STEP_END, pos)
        end = len(text) if end < 0 else end + 1
        segs.append((pos, end, False))
        pos = end
    return segs


def check_steps(problem: str, response_text: str) -> StepCheck | None:
    """Find the first wrong or malformed step of ``response_text`` (decoded, without ``<eos>``) for ``problem``.

    Definition: with canonical steps s_0..s_{n-1} and answer v, segment i (i < n) is correct iff it equals s_i
    character for character (``a<op>b=c;``, integers without leading zeros or plus signs); segment n must be exactly
    ``A<v>`` and end the text. Since segment i is only judged after segments 0..i-1 matched, this is "step i is the
    correct next operation with the correct result, given the previous (correct) values". A reflective response is
    judged like any other: its first fault is the slip before ``W``.

    Returns None iff ``response_text == solution_text(problem)``.
    """
    steps = solution_steps(problem)
    gold = solution_text(problem)
    if response_text == gold:
        return None
    answer = f"{ANSWER_MARK}{steps[-1].c}"
    if gold.startswith(response_text):
        # In gold text ';' only terminates steps, so the prefix holds this many complete steps.
        n_done = response_text.count(STEP_END)
        start = response_text.rfind(STEP_END) + 1  # the unfinished segment ("7+1", "A", or "")
        expected = steps[n_done].text if n_done < len(steps) else answer
        n = len(response_text)
        return StepCheck(n_done, start, n, StepErrorKind.INCOMPLETE, expected, response_text[start:])

    for i, (start, end, is_answer) in enumerate(_segments(response_text)):
        found = response_text[start:end]
        expected = steps[i].text if i < len(steps) else answer

        def fault(kind: StepErrorKind) -> StepCheck:
            return StepCheck(i, start, end, kind, expected, found)

        if is_answer:
            if i < len(steps):
                return fault(StepErrorKind.PREMATURE_ANSWER)
            if not _ANSWER_RE.fullmatch(found) or str(int(found[1:])) != found[1:]:
                return fault(StepErrorKind.MALFORMED)
            return fault(StepErrorKind.WRONG_ANSWER)  # == answer would have made the whole text gold
        if found == expected:
            continue
        if i >= len(steps):
            return fault(StepErrorKind.EXTRA_STEP)
        body = found[:-1] if found.endswith(STEP_END) else found
        match = _STEP_RE.fullmatch(body)
        if match is None:
            return fault(StepErrorKind.MALFORMED)
        a, op, b, c = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
        if f"{a}{op}{b}={c}" != body:  # right numbers, non-canonical spelling such as "05" or "-0"
            return fault(StepErrorKind.MALFORMED)
        gold_step = steps[i]
        if (a, op, b) != (gold_step.a, gold_step.op, gold_step.b):
            return fault(StepErrorKind.WRONG_ORDER)
        if c != gold_step.c:
            return fault(StepErrorKind.WRONG_RESULT)
        # Same step, same result, but no ';' and the text ends here: a strict prefix of gold, handled above.
        raise AssertionError(f"unreachable: segment {found!r} matches step {gold_step.text!r}")
    # Every segment matched and the text is not a prefix of gold: impossible, since matched segments concatenate
    # to a prefix of gold.
    raise AssertionError(f"unreachable: {response_text!r} for {problem!r}")


def write_correction(problem: str, response_text: str) -> str | None:
    """The micro-reflective rewrite of a wrong response, as a step-verifier constructor writes it.

    Output = ``response_text`` verbatim up to and including its first faulty segment (``check_steps``), a ``;`` if
    that segment had none, the marker ``W``, the canonical steps from the faulty step on, and ``A<answer>``.
    Exception: an INCOMPLETE response (a strict prefix of the gold text) contains nothing wrong, so it is completed
    without a marker (the result is the gold solution). Returns None for a correct response.

    ``"5*3=15;7+15=21;21-4=17;A17"`` -> ``"5*3=15;7+15=21;W7+15=22;22-4=18;A18"``.
    """
    check = check_steps(problem, response_text)
    if check is None:
        return None
    if check.kind is StepErrorKind.INCOMPLETE:
        return solution_text(problem)
    steps = solution_steps(problem)
    prefix = response_text[: check.char_end]
    if not prefix.endswith(STEP_END):
        prefix += STEP_END  # the marker always starts a fresh segment
    rest = "".join(s.text for s in steps[check.step_index:]) + f"{ANSWER_MARK}{steps[-1].c}"
    return prefix + CORRECTION_MARKER + rest


# ---------------------------------------------------------------------------------------------------------------
# The task: problem sampling, splits, SFT data
# ---------------------------------------------------------------------------------------------------------------

Split = Literal["train", "heldout"]


def _rng(seed: int, tag: str) -> random.Random:
    """A generator seeded from (tag, seed) via sha256, so streams of different splits/uses never coincide."""
    digest = hashlib.sha256(f"{tag}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class ArithmeticTask:
    """Samples problems, assigns them to splits, and builds gold / wrong / reflective responses.

    Args:
        min_ops, max_ops: number of binary operations per problem, drawn uniformly (default 2–4).
        max_operand: operands are drawn uniformly from 0..max_operand (default 20).
        max_abs_value: problems with an intermediate value (or answer) beyond ±max_abs_value are resampled (999).
        heldout_fraction: share of all problems that belong to the held-out split. Membership is a hash of the
            problem string, so it is the same in every run and process, and train/held-out never overlap.
        prompt_len: padded prompt length; default (and minimum) the longest possible prompt (15 for the defaults).
    """

    def __init__(
        self,
        min_ops: int = 2,
        max_ops: int = 4,
        max_operand: int = 20,
        max_abs_value: int = 999,
        heldout_fraction: float = 0.1,
        prompt_len: int | None = None,
    ) -> None:
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={min_ops}, max_ops={max_ops}")
        if max_operand < 0 or max_abs_value < max_operand:
            raise ValueError(f"need 0 <= max_operand <= max_abs_value, got {max_operand}, {max_abs_value}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.min_ops = min_ops
        self.max_ops = max_ops
        self.max_operand = max_operand
        self.max_abs_value = max_abs_value
        self.heldout_fraction = heldout_fraction
        self.tokenizer = TOKENIZER
        longest = (max_ops + 1) * len(str(max_operand)) + max_ops + len(PROMPT_END)
        if prompt_len is None:
            prompt_len = longest
        if prompt_len < longest:
            raise ValueError(f"prompt_len={prompt_len} is shorter than the longest prompt ({longest} tokens)")
        self.prompt_len = prompt_len

    @property
    def max_response_len(self) -> int:
        """Upper bound on the tokens of a gold response, ``<eos>`` included (62 for the defaults).

        Per step ``a<op>b=c;`` with |a|, |c| <= max_abs_value (a may be negative, b never is: it is an operand or a
        product of non-negative operands). Reflective responses can be about twice as long.
        """
        neg = len(str(-self.max_abs_value))
        step = neg + 1 + len(str(self.max_abs_value)) + 1 + neg + 1
        return self.max_ops * step + 1 + neg + 1

    # -- problems ------------------------------------------------------------------------------------------------

    def split_of(self, problem: str) -> Split:
        """Which split a problem belongs to (deterministic hash of the problem string)."""
        h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little")
        return "heldout" if h / 2**64 < self.heldout_fraction else "train"

    def sample_problem(self, rng: random.Random) -> str:
        """One problem within the bounds (any split); resamples until every intermediate is within bounds."""
        while True:
            n_ops = rng.randint(self.min_ops, self.max_ops)
            operands = [rng.randint(0, self.max_operand) for _ in range(n_ops + 1)]
            ops = [rng.choice("+-*") for _ in range(n_ops)]
            if all(abs(s.c) <= self.max_abs_value for s in _solve(operands, ops)):
                return "".join(str(x) + o for x, o in zip(operands, ops)) + str(operands[-1])

    def sample_split_problem(self, rng: random.Random, split: Split) -> str:
        """One problem of the given split (rejection sampling on ``split_of``)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        while True:
            problem = self.sample_problem(rng)
            if self.split_of(problem) == split:
                return problem

    def prompt_ids(self, problem: str) -> list[int]:
        """``encode_prompt(problem, self.prompt_len)``; also a ``prompt_builder`` for ``data.load_queries``."""
        return encode_prompt(problem, self.prompt_len, self.tokenizer)

    def make_query(self, problem: str, split: Split | None = None) -> Query:
        """A ``Query`` for a problem: id ``arith-<problem>`` (unique, stable), padded prompt ids."""
        return Query(
            id=f"arith-{problem}",
            problem=problem,
            answer=str(evaluate(problem)),
            prompt_ids=self.prompt_ids(problem),
            source=f"arithmetic-{split or self.split_of(problem)}",
        )

    def generate_split(self, n: int, seed: int, split: Split) -> list[Query]:
        """``n`` distinct problems of ``split`` as Queries, deterministic in (n, seed, split).

        The first k queries of a call with n >= k equal a call with k. Raises ValueError when the split cannot
        supply n distinct problems (checked by giving up after 50·n + 1000 draws).
        """
        rng = _rng(seed, f"split-{split}")
        seen: set[str] = set()
        queries: list[Query] = []
        draws = 0
        while len(queries) < n:
            draws += 1
            if draws > 50 * n + 1000:
                raise ValueError(f"could not draw {n} distinct {split} problems (got {len(queries)}); lower n")
            problem = self.sample_split_problem(rng, split)
            if problem in seen:
                continue
            seen.add(problem)
            queries.append(self.make_query(problem, split))
        return queries

    # -- responses -----------------------------------------------------------------------------------------------

    def solution(self, problem: str) -> str:
        """The gold response text without ``<eos>``, e.g. ``"5*3=15;7+15=22;22-4=18;A18"``."""
        return solution_text(problem)

    def wrong_response(self, problem: str, rng: random.Random) -> str:
        """A self-consistent wrong response: one arithmetic slip at a random step (result off by 1–10 either way),
        later steps computed from the wrong value, and the resulting answer, which always differs from gold.
        Used for reflective SFT traces and for tests of later stages."""
        operands, ops = parse_problem(problem)
        gold = _solve(operands, ops)
        for attempt in range(8):
            # A slip followed by "*0" can still reach the gold answer; after a few tries slip the last step,
            # which always changes the answer.
            k = rng.randrange(len(gold)) if attempt < 7 else len(gold) - 1
            wrong_value = gold[k].c + rng.choice([-1, 1]) * rng.randint(1, 10)
            steps = _solve(operands, ops, override=(k, wrong_value))
            if steps[-1].c != gold[-1].c:
                break
        return "".join(s.text for s in steps) + f"{ANSWER_MARK}{steps[-1].c}"

    def sft_examples(
        self, n: int, seed: int, reflective_fraction: float = 0.0
    ) -> list[tuple[list[int], list[int]]]:
        """``n`` (prompt_ids, response_ids) pairs from the train split, deterministic in the arguments.

        prompt_ids has ``prompt_len`` tokens (left-padded); response_ids ends with ``<eos>``. Problems may repeat
        (this is a training stream). With ``reflective_fraction`` > 0 that share of responses (drawn per example) is
        ``write_correction(wrong_response)``: a slip, ``W``, and the correct continuation.
        """
        if not 0.0 <= reflective_fraction <= 1.0:
            raise ValueError(f"reflective_fraction must be in [0, 1], got {reflective_fraction}")
        rng = _rng(seed, "sft")
        tok = self.tokenizer
        examples: list[tuple[list[int], list[int]]] = []
        for _ in range(n):
            problem = self.sample_split_problem(rng, "train")
            text = self.solution(problem)
            if reflective_fraction > 0 and rng.random() < reflective_fraction:
                corrected = write_correction(problem, self.wrong_response(problem, rng))
                assert corrected is not None  # a wrong_response always has a slip
                text = corrected
            examples.append((self.prompt_ids(problem), tok.encode(text) + [tok.eos_id]))
        return examples
