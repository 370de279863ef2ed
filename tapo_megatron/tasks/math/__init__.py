"""The math task: real problem sets (DeepScaleR, MATH; AIME24/25, HMMT25 for evaluation), scored by math-verify.

Files are JSONL rows with ``problem`` and ``answer`` (``data.queries``). A name in ``data.train_file``,
``data.train_files`` or ``data.eval_files`` is either a shipped data set (``deepscaler``, ``math``, ``aime24``,
``aime25``, ``hmmt25``: ``data.assets``) or a path. Prompts are the tokenizer's chat prompt (Qwen3 non-thinking).
"""
from __future__ import annotations

import re
from pathlib import Path

from tapo_megatron.algorithms.reflection import ReflectionDetector
from tapo_megatron.config import ConfigError, DataConfig, ModelConfig
from tapo_megatron.data.assets import resolve_dataset
from tapo_megatron.data.queries import QueryFile, load_queries
from tapo_megatron.data.tokenizer import load_tokenizer
from tapo_megatron.tasks.base import Task, register_task, task_reward

__all__ = ["gold_answer_problem", "load_eval_set", "make_task"]


def gold_answer_problem(answer: str) -> str | None:
    """None if the math verifier can parse ``answer`` as a gold answer, else the reason (for ``load_queries``)."""
    from tapo_megatron.rewards.math_verifier import parse_gold

    return None if parse_gold(answer) else "the math verifier cannot parse it"


def load_eval_set(name: str, tokenizer, on_error: str = "skip", limit: int | None = None,
                  check_answers: bool = False) -> tuple[str, QueryFile]:
    """(benchmark name, its queries) for a shipped set's short name or a JSONL path (name: the file's stem)."""
    path = resolve_dataset(name)
    label = name if path.name != Path(name).name else path.stem
    return label, load_queries(path, on_error=on_error, tokenizer=tokenizer, limit=limit,
                               answer_check=gold_answer_problem if check_answers else None)


@register_task("math")
def make_task(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    if not model.tokenizer or model.tokenizer == "arithmetic":
        raise ConfigError("the math task needs model.tokenizer: 'qwen3' (shipped) or a local tokenizer folder")
    if not data.train_file:
        raise ConfigError("data.train_file is required by the math task (a JSONL path or a shipped set: "
                          "deepscaler, math)")
    tokenizer = load_tokenizer(model.tokenizer)
    # Gold answers the verifier cannot parse are bad rows (reported with count and first): every response to one
    # would score 0 without a word.
    evals = dict(load_eval_set(f, tokenizer, data.on_bad_row, check_answers=True) for f in data.eval_files)
    files = [load_queries(resolve_dataset(f), on_error=data.on_bad_row, tokenizer=tokenizer,
                          answer_check=gold_answer_problem)
             for f in [data.train_file, *data.train_files]]
    solutions = {k: v for f in files for k, v in f.solutions.items()}
    return Task(name="math", tokenizer=tokenizer, reward=task_reward(data, "math"), reflection=ReflectionDetector(),
                train=[q for f in files for q in f.queries], evals={name: qf.queries for name, qf in evals.items()},
                teacher_prompt=lambda q: tokenizer.chat_prompt_ids(render_teacher_prompt(q, solutions.get(q.id))))


TEACHER_TEMPLATE = Path(__file__).resolve().parents[2] / "trajectory" / "templates" / "opsd_teacher_prompt.txt"
_TEACHER_FIELDS = re.compile(r"\{(problem|reference_solution)\}")


def render_teacher_prompt(query, solution: str | None, template: str | None = None) -> str:
    """OPSD's teacher prompt: the problem with its reference solution (the file's gold ``solution``; without one,
    the gold answer), from ``templates/opsd_teacher_prompt.txt``; one pass, so braces in the texts stay literal."""
    values = {"problem": query.problem,
              "reference_solution": solution or f"The final answer is $\\boxed{{{query.answer}}}$."}
    return _TEACHER_FIELDS.sub(lambda m: values[m.group(1)], template or TEACHER_TEMPLATE.read_text())
