"""Which rows of a global batch go to which data-parallel rank and micro-batch, and how long each micro-batch is.

    plan = plan_micro_batches(lengths, dp_size, micro_batch_size, max_tokens)   # identical on every rank
    plan.ranks[dp_rank]  -> [MicroBatch(rows=[...], seq_len=...), ...]
    plan.pad_fraction    -> share of computed token slots that are padding (all ranks together)

Rows are dealt to data-parallel ranks longest first, each to the rank with the fewest tokens so far (LPT), so ranks
finish together. On each rank rows are cut, longest first, into micro-batches trimmed to their own longest row:
with ``max_tokens`` (``parallel.max_tokens_per_micro_batch``, slime's ``--max-tokens-per-gpu``, verl's
``use_dynamic_bsz``) every micro-batch keeps ``rows x longest <= max_tokens`` and the cut points minimise padding
plus a small per-micro-batch overhead; without it, ``micro_batch_size`` rows each. Trimming trailing padding is
exact for a causal model; the loss is normalised by global token counts (``training/batch.py``), so any split gives
the same loss and gradients.

Packed sequences (THD, Transformer Engine only): ``pack_rows`` lays a micro-batch's rows end to end as one row with
``cu_seqlens`` and positions restarting per row; ``unpack_rows`` puts per-token values back in [rows, seq_len].
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    rows: list[int]  # global row indices, longest first
    seq_len: int  # longest row: the micro-batch's width


@dataclass
class MicroBatchPlan:
    ranks: list[list[MicroBatch]]  # per data-parallel rank
    real_tokens: int
    computed_tokens: int

    @property
    def pad_fraction(self) -> float:
        return 1.0 - self.real_tokens / max(1, self.computed_tokens)


def plan_micro_batches(lengths: list[int], dp_size: int, micro_batch_size: int, max_tokens: int = 0) -> MicroBatchPlan:
    """The split of rows of the given ``lengths`` (tokens per row, padding excluded) over ranks and micro-batches.

    A rank left without rows (batch smaller than ``dp_size``) gets one micro-batch with no rows; the actor feeds it
    one all-padding row so every rank runs the schedule. Raises ValueError for a row over ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if max_tokens and order and lengths[order[0]] > max_tokens:
        raise ValueError(f"row {order[0]} has {lengths[order[0]]} tokens, over "
                         f"parallel.max_tokens_per_micro_batch={max_tokens}")
    heap = [(0, 0, r) for r in range(dp_size)]  # (tokens, rows, rank)
    assigned: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        tokens, rows, rank = heapq.heappop(heap)
        assigned[rank].append(i)
        heapq.heappush(heap, (tokens + lengths[i], rows + 1, rank))
    ranks, computed = [], 0
    for rows in assigned:  # each already longest first
        mbs = _cut_by_budget(rows, lengths, max_tokens) if max_tokens else [
            MicroBatch(rows[i:i + micro_batch_size], max(1, lengths[rows[i]]))
            for i in range(0, len(rows), micro_batch_size)]
        computed += sum(len(m.rows) * m.seq_len for m in mbs)
        ranks.append(mbs or [MicroBatch([], 1)])
    return MicroBatchPlan(ranks, real_tokens=int(sum(lengths)), computed_tokens=computed)


MICRO_BATCH_OVERHEAD = 0.01  # fixed cost of one more micro-batch, as a share of a full budget's compute


def _cut_by_budget(rows: list[int], lengths: list[int], max_tokens: int) -> list[MicroBatch]:
    """Cut rows (longest first) into consecutive micro-batches with ``n x longest <= max_tokens``, minimising
    computed tokens plus ``MICRO_BATCH_OVERHEAD x max_tokens`` per micro-batch (dynamic programming over cut
    points: greedy filling would put very different lengths together and pad them)."""
    n, overhead = len(rows), MICRO_BATCH_OVERHEAD * max_tokens
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # micro-batch rows[i:j], its longest row is rows[i]
            width = max(1, lengths[rows[i]])
            if (j - i) * width > max_tokens:
                break
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    mbs, j = [], n
    while j > 0:
        i = cut[j]
        mbs.append(MicroBatch(rows[i:j], max(1, lengths[rows[i]])))
        j = i
    return mbs[::-1]


def pack_rows(tokens: torch.Tensor, lengths: list[int], multiple: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, T] tokens -> ([1, N] packed tokens, [1, N] positions restarting per row, cu_seqlens int32).

    ``multiple``: N is padded up to a multiple of it (sequence parallelism splits N over TP ranks) with one extra
    document of padding, so cu_seqlens has rows + 2 entries then; the first rows + 1 describe the real rows."""
    extra = -sum(lengths) % multiple
    lengths = list(lengths) + ([extra] if extra else [])
    pieces = [tokens[i, :n] for i, n in enumerate(lengths[:tokens.shape[0]])]
    if extra:
        pieces.append(tokens.new_zeros(extra))
    positions = [torch.arange(n, device=tokens.device) for n in lengths]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=tokens.device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=tokens.device), 0)
    return torch.cat(pieces)[None], torch.cat(positions)[None], cu


def packed_targets(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets [N] of a packed stream and the mask [N] of positions that have one in their own row
    (the last token of each row would otherwise predict the next row's first token)."""
    flat = packed.reshape(-1)
    targets = torch.zeros_like(flat)
    targets[:-1] = flat[1:]
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[(cu_seqlens[1:] - 1).long()] = False
    return targets, mask


def unpack_rows(values: torch.Tensor, cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Per-position values [N] of a packed stream (entry j = prediction of token j + 1 of its row) -> token-aligned
    [rows, seq_len] (entry t = token t, entry 0 and padding = 0)."""
    rows = cu_seqlens.numel() - 1
    out = values.new_zeros((rows, seq_len))
    for i in range(rows):
        lo, hi = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        out[i, 1:hi - lo] = values[lo:hi - 1]
    return out
