"""Per-stage wall time of one RL step, logged as ``time/<stage>`` every step.

    watch = Stopwatch()
    rollouts = sample_groups(...); watch.lap("generate")
    ...
    metrics.update(watch.times)      # {"time/generate": s, "time/reward": s, ...}

``lap(name)`` charges the time since the previous lap (or the start) to ``name``; ``lap()`` without a name only moves
the mark (for a stage that times itself, e.g. ``training.step.policy_step`` reports log-probs and train).
"""
from __future__ import annotations

import time


class Stopwatch:
    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.times: dict[str, float] = {}

    def lap(self, name: str | None = None) -> float:
        now = time.perf_counter()
        elapsed, self.mark = now - self.mark, now
        if name:
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + elapsed
        return elapsed

    def total(self) -> float:
        return time.perf_counter() - self.start
