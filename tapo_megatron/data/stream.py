"""An endless, seeded, resumable stream of training queries (epoch-wise reshuffles; position is checkpointed)."""
from __future__ import annotations

import random

from tapo_megatron.records import Query


class QueryStream:
    def __init__(self, queries: list[Query], seed: int):
        if not queries:
            raise ValueError("QueryStream: no training queries")
        self.queries, self.seed = queries, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.queries)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Query]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.queries[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._shuffle(self.epoch)
