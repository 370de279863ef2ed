"""A task: what a run learns from and is judged by, as one object (nanochat's ``tasks/`` idea).

    task = build_task(cfg.data, cfg.model, seed)        # looks ``data.task`` up in TASKS
    task.train, task.evals["aime24"]                    # Query lists (prompt ids made with task.tokenizer)
    task.reward(response, gold) -> float                # the verifier (a RewardFn)
    task.reflection.is_reflective(text)                 # what counts as a self-correction (DSR / ERR)
    task.step_verifier                                  # a StepVerifierTask, or None (math has none)

Built in: ``arithmetic`` (the embedded CPU demo) and ``math`` (JSONL problem sets, math-verify). A user's own task
is a function ``(data: DataConfig, model: ModelConfig, seed: int) -> Task`` registered with ``@register_task`` or
named as ``"pkg.module:function"`` in ``data.task``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from tapo_megatron.algorithms.reflection import ReflectionDetector
from tapo_megatron.config import DataConfig, ModelConfig
from tapo_megatron.data.tokenizer import Tokenizer
from tapo_megatron.records import Query
from tapo_megatron.registry import Registry
from tapo_megatron.rewards import RewardFn, get_reward
from tapo_megatron.trajectory.constructors import StepVerifierTask

# (n examples, seed, reflective fraction) -> (prompt ids, response ids incl. eos) pairs; None: SFT reads a file
SftExampleFn = Callable[[int, int, float], list[tuple[list[int], list[int]]]]


@dataclass
class Task:
    name: str  # registry name, e.g. "arithmetic"
    tokenizer: Tokenizer  # the policy's tokenizer; every prompt below is encoded with it
    reward: RewardFn  # (response text, gold answer) -> 1.0 / 0.0
    reflection: ReflectionDetector  # marks reflective responses (DSR, ERR)
    train: list[Query]  # the RL training pool
    evals: dict[str, list[Query]] = field(default_factory=dict)  # benchmark name -> queries
    step_verifier: Optional[StepVerifierTask] = None  # a task whose solutions can be checked step by step
    # OPSD's teacher context for a query: the prompt ids of the same model shown the reference solution; None: the
    # task has no reference solutions (algorithm.distillation='opsd' is refused)
    teacher_prompt: Optional[Callable[[Query], list[int]]] = None
    sft_examples: Optional[SftExampleFn] = None  # a task that writes its own SFT data (the arithmetic demo)


TaskFn = Callable[[DataConfig, ModelConfig, int], Task]


def _check_task_fn(fn: object, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"task {name!r}: {fn!r} is not callable")
    try:
        inspect.signature(fn).bind("data", "model", 0)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"task {name!r}: {fn!r} cannot be called as fn(data, model, seed): {exc}") from exc


TASKS: Registry[TaskFn] = Registry("task", check=_check_task_fn)
register_task = TASKS.register


def build_task(data: DataConfig, model: ModelConfig, seed: int) -> Task:
    """The task named by ``data.task``, built from the data and model sections (``data.problem_seed`` when set)."""
    return TASKS.get(data.task)(data, model, data.problem_seed if data.problem_seed >= 0 else seed)


def fit_prompts(task: Task, max_prompt_tokens: int) -> Task:
    """Drop queries whose prompt leaves fewer than the rollout's ``max_new_tokens`` of the model's context
    (``max_prompt_tokens`` = context - max_new_tokens), saying how many and the first, instead of failing at the step
    that samples one. Raises DataError when no training query is left."""
    from tapo_megatron.errors import DataError

    def keep(queries: list[Query], where: str) -> list[Query]:
        fits = [q for q in queries if len(q.prompt_ids) <= max_prompt_tokens]
        if len(fits) < len(queries):
            first = next(q for q in queries if len(q.prompt_ids) > max_prompt_tokens)
            print(f"[data] {where}: dropped {len(queries) - len(fits)} of {len(queries)} queries whose prompt is "
                  f"longer than {max_prompt_tokens} tokens (context minus rollout.max_new_tokens); first: "
                  f"{first.id!r} ({len(first.prompt_ids)} tokens)", flush=True)
        return fits

    task.train = keep(task.train, f"{task.name} training set")
    if not task.train:
        raise DataError(f"{task.name}: no training query fits the prompt budget of {max_prompt_tokens} tokens "
                        "(raise model max_position_embeddings or lower rollout.max_new_tokens)")
    task.evals = {name: keep(queries, f"eval set {name}") for name, queries in task.evals.items()}
    return task


def task_reward(data: DataConfig, default: str) -> RewardFn:
    """``data.reward`` when set (a registered name or a ``pkg.module:fn`` plug-in), else the task's own."""
    return get_reward(data.reward or default)
