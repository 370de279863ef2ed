"""Evaluation: ``evaluate`` (greedy, Pass@k, DSR, ERR of one engine on one query list; also used during RL) and
``benchmarks`` (``tapo eval``: a checkpoint on AIME24 / AIME25 / HMMT25, summaries, side-by-side comparisons)."""
from tapo_megatron.evaluation.core import EvalSample, evaluate, evaluate_task

__all__ = ["EvalSample", "evaluate", "evaluate_task"]
