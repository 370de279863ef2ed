"""The embedded CPU demo task: step-by-step integer arithmetic, char-level, with a step verifier.

Everything the task is lives here: problems and canonical solutions (``problems``), the 20-token tokenizer
(``tokenizer``), the exact-answer reward (``reward``, registered as ``"exact"``), the step verifier used by the
``step_verifier`` constructor (``step_verifier``), and the reflection marker ``W``.
"""
from __future__ import annotations

from tapo_megatron.algorithms.reflection import ReflectionDetector
from tapo_megatron.config import ConfigError, DataConfig, ModelConfig
from tapo_megatron.tasks.arithmetic.problems import (
    ArithmeticTask,
    Step,
    StepCheck,
    StepErrorKind,
    check_steps,
    evaluate,
    extract_answer,
    is_reflective,
    parse_problem,
    solution_steps,
    solution_text,
    write_correction,
)
from tapo_megatron.tasks.arithmetic.reward import exact_answer_reward
from tapo_megatron.tasks.arithmetic.step_verifier import ArithmeticStepVerifier
from tapo_megatron.tasks.arithmetic.tokenizer import (
    CORRECTION_MARKER,
    TOKENIZER,
    ArithmeticTokenizer,
    encode_prompt,
    format_prompt,
)
from tapo_megatron.tasks.base import Task, register_task, task_reward

__all__ = [
    "CORRECTION_MARKER",
    "ArithmeticStepVerifier",
    "ArithmeticTask",
    "ArithmeticTokenizer",
    "Step",
    "StepCheck",
    "StepErrorKind",
    "check_steps",
    "encode_prompt",
    "evaluate",
    "exact_answer_reward",
    "extract_answer",
    "format_prompt",
    "is_reflective",
    "make_task",
    "parse_problem",
    "solution_steps",
    "solution_text",
    "write_correction",
]


@register_task("arithmetic")
def make_task(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """``data.num_train_problems`` training and ``data.num_eval_problems`` held-out problems (disjoint splits)."""
    if model.tokenizer not in ("", "arithmetic"):
        raise ConfigError(f"model.tokenizer={model.tokenizer!r}: the arithmetic task has its own char tokenizer; "
                          "leave model.tokenizer empty (or 'arithmetic')")
    problems = ArithmeticTask()
    return Task(
        name="arithmetic",
        tokenizer=TOKENIZER,
        reward=task_reward(data, "exact"),
        reflection=ReflectionDetector(patterns=[], markers=[CORRECTION_MARKER]),  # one char, not phrases
        train=problems.generate_split(data.num_train_problems, seed, "train"),
        evals={"heldout": problems.generate_split(data.num_eval_problems, seed + 1, "heldout")},
        step_verifier=ArithmeticStepVerifier(),
        sft_examples=lambda n, s, reflective: problems.sft_examples(n, s, reflective_fraction=reflective),
        teacher_prompt=teacher_prompt,
    )


def teacher_prompt(query) -> list[int]:
    """OPSD's teacher context: the gold solution, then the unpadded prompt (``5*3=15;...;A18<eos>7+5*3-4>``).
    The char vocabulary has no words, so the reference is shown as a solved example right before the problem."""
    return TOKENIZER.encode(solution_text(query.problem)) + [TOKENIZER.eos_id] + TOKENIZER.chat_prompt_ids(query.problem)
