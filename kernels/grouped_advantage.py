"""GRPO / DAE group-normalised advantages over ragged, unsorted groups, with an optional per-token broadcast.

Public API:

    grouped_advantage(rewards [B], group_ids [B], *, eps=1e-6, normalize_std=True,
                      token_sample_index [T] | None = None, cu_seqlens [B + 1] | None = None,
                      response_mask [T] | None = None, backend="auto") -> GroupedAdvantage

Definition (identical to ``tapo_megatron.algorithms.advantages.group_normalized_advantages``): over the samples
sharing a group id, mean and *population* std; ``A = (r - mean) / (std + eps)``, or ``r - mean`` when
``normalize_std`` is False. A group with a single member, or whose rewards are all exactly equal, gives A = 0 to all
its members (exact test ``max == min``, so rounding in the mean can never leak a tiny non-zero advantage).
DAE's original and constructed groups are just different ids.

Group ids are arbitrary non-negative integers; they are mapped to ``0..G-1`` with ``torch.unique(return_inverse)``
on the tensors' device (one host sync for G). Then the Triton backend runs ONE single-program kernel (pass 0: zero
the group accumulators; pass 1: atomic count / sum / min / max; pass 2: atomic sum of squared deviations from the
group mean, i.e. a two-pass variance, no E[x^2] - E[x]^2 cancellation; pass 3: per-sample advantage). A single
program is enough: B is at most tens of thousands of samples, and staying in one program lets the passes see each
other's atomics after a barrier without a second launch. When tokens are requested a second, fully parallel kernel
gathers each token's sample advantage (from a sample index, or a binary search in ``cu_seqlens``) under the mask.
The torch backend computes the same with ``index_add_`` / ``scatter_reduce_`` (no Python loop over groups).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .select import resolve_backend, triton_interpret

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover
    _HAVE_TRITON = False


@dataclass
class GroupedAdvantage:
    """Result of ``grouped_advantage``. ``G`` = number of distinct group ids."""

    sample_advantages: torch.Tensor  # [B] fp32, one per sample
    token_advantages: torch.Tensor | None  # [T] fp32 when tokens were given (0 under mask == 0 or padding)
    group_ids: torch.Tensor  # [G] the distinct input ids, sorted; group g of the stats below is group_ids[g]
    group_index: torch.Tensor  # [B] int64, each sample's group in 0..G-1
    group_count: torch.Tensor  # [G] fp32 number of members
    group_mean: torch.Tensor  # [G] fp32
    group_std: torch.Tensor  # [G] fp32 population std
    group_degenerate: torch.Tensor  # [G] bool: singleton or all rewards equal (advantages are 0)


if _HAVE_TRITON:

    def _group_kernel(
        rewards_ptr, gidx_ptr, stats_ptr, adv_ptr, n_samples, n_groups, eps,
        NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program. stats rows: 0 count, 1 sum -> mean, 2 sq-dev -> std, 3 min, 4 max, 5 degenerate flag."""
        offs = tl.arange(0, BLOCK)
        cnt_p = stats_ptr
        mean_p = stats_ptr + n_groups
        std_p = stats_ptr + 2 * n_groups
        min_p = stats_ptr + 3 * n_groups
        max_p = stats_ptr + 4 * n_groups
        deg_p = stats_ptr + 5 * n_groups
        # pass 0: initialise the accumulators (saves a separate memset launch)
        for start in range(0, n_groups, BLOCK):
            g = start + offs
            gm = g < n_groups
            zeros = tl.zeros([BLOCK], dtype=tl.float32)
            tl.store(cnt_p + g, zeros, mask=gm)
            tl.store(mean_p + g, zeros, mask=gm)
            tl.store(std_p + g, zeros, mask=gm)
            tl.store(min_p + g, zeros + float("inf"), mask=gm)
            tl.store(max_p + g, zeros - float("inf"), mask=gm)
        tl.debug_barrier()
        # pass 1: count, sum, min, max per group (atomics resolve duplicate groups within a block)
        for start in range(0, n_samples, BLOCK):
            i = start + offs
            im = i < n_samples
            r = tl.load(rewards_ptr + i, mask=im, other=0.0).to(tl.float32)
            g = tl.load(gidx_ptr + i, mask=im, other=0)
            tl.atomic_add(cnt_p + g, tl.full([BLOCK], 1.0, tl.float32), mask=im)
            tl.atomic_add(mean_p + g, r, mask=im)
            tl.atomic_min(min_p + g, r, mask=im)
            tl.atomic_max(max_p + g, r, mask=im)
        tl.debug_barrier()
        for start in range(0, n_groups, BLOCK):  # sum -> mean
            g = start + offs
            gm = g < n_groups
            c = tl.load(cnt_p + g, mask=gm, other=1.0, cache_modifier=".cg")
            sm = tl.load(mean_p + g, mask=gm, other=0.0, cache_modifier=".cg")
            tl.store(mean_p + g, sm / c, mask=gm)
        tl.debug_barrier()
        # pass 2: squared deviations from the group mean
        for start in range(0, n_samples, BLOCK):
            i = start + offs
            im = i < n_samples
            r = tl.load(rewards_ptr + i, mask=im, other=0.0).to(tl.float32)
            g = tl.load(gidx_ptr + i, mask=im, other=0)
            mu = tl.load(mean_p + g, mask=im, other=0.0, cache_modifier=".cg")
            d = r - mu
            tl.atomic_add(std_p + g, d * d, mask=im)
        tl.debug_barrier()
        for start in range(0, n_groups, BLOCK):  # sq-dev -> population std, degenerate flag
            g = start + offs
            gm = g < n_groups
            c = tl.load(cnt_p + g, mask=gm, other=1.0, cache_modifier=".cg")
            sq = tl.load(std_p + g, mask=gm, other=0.0, cache_modifier=".cg")
            lo = tl.load(min_p + g, mask=gm, other=0.0, cache_modifier=".cg")
            hi = tl.load(max_p + g, mask=gm, other=0.0, cache_modifier=".cg")
            tl.store(std_p + g, tl.sqrt(sq / c), mask=gm)
            tl.store(deg_p + g, ((c < 2.0) | (lo == hi)).to(tl.float32), mask=gm)
        tl.debug_barrier()
        # pass 3: per-sample advantage
        for start in range(0, n_samples, BLOCK):
            i = start + offs
            im = i < n_samples
            r = tl.load(rewards_ptr + i, mask=im, other=0.0).to(tl.float32)
            g = tl.load(gidx_ptr + i, mask=im, other=0)
            mu = tl.load(mean_p + g, mask=im, other=0.0, cache_modifier=".cg")
            a = r - mu
            deg = tl.load(deg_p + g, mask=im, other=1.0, cache_modifier=".cg") != 0.0
            if NORMALIZE:
                sd = tl.load(std_p + g, mask=im, other=1.0, cache_modifier=".cg")
                a = a / tl.where(deg, 1.0, sd + eps)  # degenerate groups may have std + eps == 0
            tl.store(adv_ptr + i, tl.where(deg, 0.0, a), mask=im)

    def _token_kernel(
        adv_ptr, index_ptr, cu_ptr, mask_ptr, out_ptr, n_tokens, n_samples,
        USE_CU: tl.constexpr, HAS_MASK: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """out[t] = adv[sample(t)] * mask[t]; sample(t) from an index array or a binary search in cu_seqlens."""
        t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tm = t < n_tokens
        if USE_CU:
            # largest i in [0, B) with cu[i] <= t; tokens at or past cu[B] are padding
            lo = tl.zeros([BLOCK], dtype=tl.int64)
            hi = tl.zeros([BLOCK], dtype=tl.int64) + (n_samples - 1)
            for _ in range(SEARCH_STEPS):
                mid = (lo + hi + 1) // 2
                v = tl.load(cu_ptr + mid, mask=tm & (lo < hi), other=0)
                go = v <= t
                lo = tl.where((lo < hi) & go, mid, lo)
                hi = tl.where((lo < hi) & (~go), mid - 1, hi)
            end = tl.load(cu_ptr + n_samples)
            idx = lo
            valid = tm & (t < end)
        else:
            idx = tl.load(index_ptr + t, mask=tm, other=-1).to(tl.int64)
            valid = tm & (idx >= 0)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + t, mask=tm, other=0) != 0)
        a = tl.load(adv_ptr + tl.where(valid, idx, 0), mask=valid, other=0.0)
        tl.store(out_ptr + t, tl.where(valid, a, 0.0), mask=tm)


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> tuple[object, object]:
    """Kernels decorated on first use (triton picks interpreter vs compiler inside ``triton.jit``)."""
    del interpret
    return triton.jit(_group_kernel), triton.jit(_token_kernel)


def _validate(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    token_sample_index: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    response_mask: torch.Tensor | None,
) -> None:
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    if group_ids.dtype.is_floating_point:
        raise ValueError(f"group_ids must be integers; got {group_ids.dtype}")
    if rewards.numel() and bool((group_ids < 0).any()):
        row = int((group_ids < 0).nonzero()[0, 0])
        raise ValueError(f"group_ids[{row}] = {int(group_ids[row])} is negative; group ids must be >= 0")
    if rewards.numel() and not bool(torch.isfinite(rewards).all()):
        row = int((~torch.isfinite(rewards)).nonzero()[0, 0])
        raise ValueError(f"rewards[{row}] = {float(rewards[row])} is not finite")
    if token_sample_index is not None and cu_seqlens is not None:
        raise ValueError("give token_sample_index or cu_seqlens, not both")
    if cu_seqlens is not None:
        if cu_seqlens.shape != (rewards.numel() + 1,):
            raise ValueError(f"cu_seqlens must be [B + 1] = [{rewards.numel() + 1}]; got {tuple(cu_seqlens.shape)}")
        if response_mask is None:
            raise ValueError("cu_seqlens needs response_mask (it fixes the number of packed tokens T)")
    if token_sample_index is not None:
        if token_sample_index.dim() != 1:
            raise ValueError(f"token_sample_index must be [T]; got {tuple(token_sample_index.shape)}")
        if token_sample_index.numel() and int(token_sample_index.max()) >= rewards.numel():
            raise ValueError(f"token_sample_index has a value >= B = {rewards.numel()}")
        if response_mask is not None and response_mask.shape != token_sample_index.shape:
            raise ValueError(
                f"response_mask {tuple(response_mask.shape)} != token_sample_index {tuple(token_sample_index.shape)}"
            )
    if response_mask is not None and response_mask.dim() != 1:
        raise ValueError(f"response_mask must be [T]; got {tuple(response_mask.shape)}")


def _torch_group_stats(
    rewards: torch.Tensor, gidx: torch.Tensor, n_groups: int, eps: float, normalize_std: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    f32 = torch.float32
    cnt = torch.zeros(n_groups, dtype=f32, device=rewards.device).index_add_(0, gidx, torch.ones_like(rewards))
    mean = torch.zeros(n_groups, dtype=f32, device=rewards.device).index_add_(0, gidx, rewards) / cnt
    dev = rewards - mean[gidx]
    std = (torch.zeros(n_groups, dtype=f32, device=rewards.device).index_add_(0, gidx, dev * dev) / cnt).sqrt()
    lo = torch.full((n_groups,), float("inf"), device=rewards.device).scatter_reduce_(0, gidx, rewards, "amin")
    hi = torch.full((n_groups,), float("-inf"), device=rewards.device).scatter_reduce_(0, gidx, rewards, "amax")
    degenerate = (cnt < 2) | (lo == hi)
    adv = dev / torch.where(degenerate, 1.0, std + eps)[gidx] if normalize_std else dev
    adv = torch.where(degenerate[gidx], torch.zeros_like(adv), adv)
    return adv, cnt, mean, std, degenerate


def grouped_advantage(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    normalize_std: bool = True,
    token_sample_index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> GroupedAdvantage:
    """Group-normalised advantages (see the module docstring for the exact definition).

    Args:
        rewards: ``[B]`` float rewards, finite.
        group_ids: ``[B]`` non-negative integer group ids, any order, any values.
        eps: added to the std before dividing.
        normalize_std: divide by (std + eps); False gives the mean-centred reward (Dr. GRPO style).
        token_sample_index: ``[T]`` sample index of each token (negative = padding), or
        cu_seqlens: ``[B + 1]`` packed sequence offsets (sample i owns tokens ``cu[i]:cu[i+1]``); needs
            ``response_mask`` for T.
        response_mask: ``[T]`` tokens with 0 get advantage 0.
        backend: "auto" | "triton" | "torch".
    Returns:
        GroupedAdvantage with per-sample (and per-token) advantages and the per-group statistics.
    """
    _validate(rewards, group_ids, token_sample_index, cu_seqlens, response_mask)
    backend = resolve_backend(backend, rewards.device)
    dev = rewards.device
    rewards_f = rewards.float().contiguous()
    if rewards.numel() == 0:
        uniq = group_ids.new_empty(0)
        gidx = torch.zeros(0, dtype=torch.int64, device=dev)
    else:
        uniq, gidx = torch.unique(group_ids, return_inverse=True)  # remap to 0..G-1 (one sync for G)
    n, n_groups = rewards.numel(), uniq.numel()
    if backend == "triton" and n > 0:
        group_k, _ = _jitted(triton_interpret())
        gidx32 = gidx.to(torch.int32).contiguous()
        stats = torch.empty(6, n_groups, dtype=torch.float32, device=dev)
        adv = torch.empty(n, dtype=torch.float32, device=dev)
        group_k[(1,)](
            rewards_f, gidx32, stats, adv, n, n_groups, float(eps),
            NORMALIZE=bool(normalize_std), BLOCK=1024, num_warps=8,
        )
        cnt, mean, std, deg = stats[0], stats[1], stats[2], stats[5] != 0
    elif n > 0:
        adv, cnt, mean, std, deg = _torch_group_stats(rewards_f, gidx, n_groups, float(eps), normalize_std)
    else:
        adv = torch.zeros(0, dtype=torch.float32, device=dev)
        cnt = mean = std = torch.zeros(0, dtype=torch.float32, device=dev)
        deg = torch.zeros(0, dtype=torch.bool, device=dev)

    token_adv = None
    if token_sample_index is not None or cu_seqlens is not None:
        n_tok = response_mask.numel() if cu_seqlens is not None else token_sample_index.numel()
        if backend == "triton" and n_tok > 0 and n > 0:
            _, token_k = _jitted(triton_interpret())
            token_adv = torch.empty(n_tok, dtype=torch.float32, device=dev)
            mask_t = None if response_mask is None else (response_mask != 0).to(torch.int8).contiguous()
            idx_t = None if token_sample_index is None else token_sample_index.to(torch.int64).contiguous()
            cu_t = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
            any_ptr = adv  # placeholder pointer for arguments a constexpr branch never reads
            block = 1024
            token_k[(triton.cdiv(n_tok, block),)](
                adv, any_ptr if idx_t is None else idx_t, any_ptr if cu_t is None else cu_t,
                any_ptr if mask_t is None else mask_t, token_adv, n_tok, n,
                USE_CU=cu_t is not None, HAS_MASK=mask_t is not None,
                SEARCH_STEPS=max(1, int(n).bit_length()), BLOCK=block, num_warps=4,
            )
        else:
            from .reference import reference_token_advantage, token_sample_index_from_cu_seqlens

            idx = token_sample_index if cu_seqlens is None else token_sample_index_from_cu_seqlens(cu_seqlens, n_tok)
            if n == 0:
                token_adv = torch.zeros(n_tok, dtype=torch.float32, device=dev)
            else:
                token_adv = reference_token_advantage(adv, idx, response_mask)
    return GroupedAdvantage(
        sample_advantages=adv,
        token_advantages=token_adv,
        group_ids=uniq,
        group_index=gidx,
        group_count=cnt,
        group_mean=mean,
        group_std=std,
        group_degenerate=deg,
    )
