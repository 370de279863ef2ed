"""Tasks: queries, reward, reflection detector, step verifier and tokenizer as one object (``tasks.base.Task``).

``build_task(cfg.data, cfg.model, seed)`` looks ``data.task`` up: ``arithmetic`` (embedded CPU demo), ``math``
(real data sets, math-verify), or a user's ``pkg.module:function``.
"""
from tapo_megatron.tasks.base import TASKS, Task, build_task, fit_prompts, register_task  # noqa: I001  (first)
from tapo_megatron.tasks import arithmetic, math  # noqa: F401  (registers the built-in tasks)

__all__ = ["TASKS", "Task", "build_task", "fit_prompts", "register_task"]
