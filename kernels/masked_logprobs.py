"""Masked per-token log-prob (and entropy) of target tokens, without a full fp32 copy of the logits.

Public API (inputs may carry leading dims ``[...]``; they are flattened to ``N`` rows and the outputs reshaped back):

    masked_logprobs(logits [..., V], targets [...], mask [...] | None, *, temperature=1.0, return_entropy=False,
                    chunk_size=None, backend="auto", inplace_backward=False)
        -> logprobs [...] fp32, or (logprobs, entropy) when return_entropy

    masked_logprobs_vocab_parallel(logits_shard [..., V/tp], targets, mask, tp_group, vocab_start=None, *, ...)
        the same for Megatron tensor parallelism: every rank holds a vocabulary shard; results are replicated.

``logprobs[i] = log softmax(logits[i] / T)[targets[i]]`` and ``entropy[i] = -sum_v p_v log p_v`` of that softmax.
Rows with ``mask == 0`` give 0 and a zero gradient (their targets are never read, so ignore-ids such as -100 are
fine there). Forward and backward are one ``torch.autograd.Function``:

* forward: one pass over each row keeps an online max ``m``, ``s = sum exp(z - m)`` and, for the entropy,
  ``t = sum exp(z - m) (z - m)`` in fp32 (``z = logit / T``), reading bf16/fp16/fp32 logits as they are.
  Then ``logprob = (z_target - m) - log s``, ``entropy = log s - t / s`` (>= 0 by construction).
* backward: one pass recomputes ``p`` from the saved ``m`` and ``log s`` and writes, in the logits' dtype,
  ``dL/dlogit_v = [g_lp (1[v = target] - p_v) - g_H p_v (log p_v + H)] / T``.
  With ``inplace_backward=True`` the gradient overwrites the logits buffer (as Megatron's cross-entropy does), so
  the backward allocates nothing of size ``[N, V]``; the tensor's autograd version is bumped so any other user of the
  logits fails loudly instead of reading gradients.

Vocab parallel: each rank computes its shard's ``(m, s, t)``; ``m`` is all-reduced with MAX, the rescaled ``s, t``,
the target logit (non-zero only on the owning rank) and an ownership count with one SUM all-reduce. The backward
needs no communication (upstream gradients are replicated across the TP group, as in Megatron).

Backends: ``triton`` (one program per row, vocab in blocks; CUDA, or CPU under ``TRITON_INTERPRET=1``) and
``torch`` (the same maths on ``chunk_size`` rows at a time, so at most ``[chunk_size, V]`` fp32 exists). ``auto``
picks via ``tapo_kernels.select.resolve_backend``. ``chunk_size`` only affects the torch backend; the Triton kernels
stream each row and never hold more than one block of it.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from .select import resolve_backend, triton_interpret

try:  # triton is optional: the torch backend covers CPU-only installs
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    _HAVE_TRITON = False

_TORCH_CHUNK_ELEMS = 2**24  # default torch-backend chunk: fp32 temporaries of at most 64 MiB each
_STATS_ROWS = 5  # rows of the per-token statistics tensor: m, s, t, z_target, owned
_EXACT_ABOVE = 64.0  # torch backend: |log-sum-exp| above which z - lse is not exact enough in fp32 (ulp(64) ~ 8e-6)

if _HAVE_TRITON:

    def _stats_kernel(
        logits_ptr, stride_row, targets_ptr, active_ptr, out_ptr,
        n_rows, n_cols, vocab_start, inv_temp,
        HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Per row: online max m, s = sum exp(z - m), t = sum exp(z - m)(z - m), target logit, ownership."""
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2**31 at 64k tokens x 152k vocab
        act = 1
        if HAS_MASK:
            act = tl.load(active_ptr + row).to(tl.int32)
        row_ptr = logits_ptr + row * stride_row
        offs = tl.arange(0, BLOCK_V)
        neg_inf = float("-inf")
        zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)  # fp32 scalar tensor for loop-carried values
        m = zero + neg_inf
        s = zero
        t = zero
        n_eff = n_cols * (act != 0).to(tl.int32)  # masked rows skip the vocab loop entirely (no reads)
        for start in range(0, n_eff, BLOCK_V):
            cols = start + offs
            z = tl.load(row_ptr + cols, mask=cols < n_cols, other=neg_inf).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)  # an all--inf prefix must not give (-inf) - (-inf)
            e = tl.exp(z - m_safe)
            alpha = tl.exp(m - m_safe)
            if WITH_ENTROPY:
                zc = tl.where(z == neg_inf, 0.0, z - m_safe)
                # move t from basis m to basis m_new: t' = alpha (t - (m_new - m) s)
                shift = tl.where(m == neg_inf, 0.0, m_safe - m)  # s = t = 0 while m = -inf: avoid inf * 0
                t = alpha * (t - shift * s) + tl.sum(e * zc, axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        tgt = tl.load(targets_ptr + row) - vocab_start
        owned = (tgt >= 0) & (tgt < n_cols) & (act != 0)
        z_t = tl.load(row_ptr + tl.where(owned, tgt, 0), mask=owned, other=0.0).to(tl.float32) * inv_temp
        is_act = act != 0
        # masked rows get neutral statistics (m=0, s=1) so cross-rank merges stay finite; their outputs are zeroed
        tl.store(out_ptr + row, tl.where(is_act, m, 0.0))
        tl.store(out_ptr + n_rows + row, tl.where(is_act, s, 1.0))
        tl.store(out_ptr + 2 * n_rows + row, tl.where(is_act, t, 0.0))
        tl.store(out_ptr + 3 * n_rows + row, tl.where(owned, z_t, 0.0))
        tl.store(out_ptr + 4 * n_rows + row, owned.to(tl.float32))

    def _grad_kernel(
        logits_ptr, stride_row, grad_ptr, grad_stride_row, targets_ptr, active_ptr,
        max_ptr, logs_ptr, ent_ptr, glp_ptr, gent_ptr,
        n_cols, vocab_start, inv_temp,
        HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Per row: grad_v = [g_lp (1[v = target] - p_v) - g_H p_v (log p_v + H)] / T, stored in grad's dtype."""
        row = tl.program_id(0).to(tl.int64)
        act = 1
        if HAS_MASK:
            act = tl.load(active_ptr + row).to(tl.int32)
        is_act = act != 0
        row_ptr = logits_ptr + row * stride_row
        grad_row = grad_ptr + row * grad_stride_row
        m = tl.load(max_ptr + row)
        log_s = tl.load(logs_ptr + row)
        glp = tl.load(glp_ptr + row) * inv_temp
        tgt = tl.load(targets_ptr + row) - vocab_start
        if WITH_ENTROPY:
            ent = tl.load(ent_ptr + row)
            gent = tl.load(gent_ptr + row) * inv_temp
        offs = tl.arange(0, BLOCK_V)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + offs
            in_b = cols < n_cols
            x = tl.load(row_ptr + cols, mask=in_b & is_act, other=float("-inf")).to(tl.float32)
            logp = (x * inv_temp - m) - log_s  # not z - lse: z - m is exact even at |z| ~ 1e4
            p = tl.exp(logp)
            g = tl.where(cols == tgt, glp, 0.0) - glp * p
            if WITH_ENTROPY:
                # -inf logits (and masked lanes) have p = 0: keep 0 * -inf out of the product
                g -= gent * p * tl.where(x == float("-inf"), 0.0, logp + ent)
            g = tl.where(is_act, g, 0.0)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=in_b)


@functools.lru_cache(maxsize=2)
def _jitted(interpret: bool) -> tuple[object, object]:
    """The jitted kernels; decorated lazily (not at import) because triton picks interpreter vs compiler when
    ``triton.jit`` runs, so a test can set TRITON_INTERPRET=1 any time before the first launch."""
    del interpret  # the cache key; triton reads the env var itself inside triton.jit
    return triton.jit(_stats_kernel), triton.jit(_grad_kernel)


def _launch_cfg(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(n_cols, 16)), 4096)
    return block, 8 if block >= 2048 else 4


# ---------------------------------------------------------------------------------------------------------------------
# Local (per-shard) statistics and gradients, one implementation per backend.


def _local_stats(
    logits: torch.Tensor,  # [N, Vl], stride(-1) == 1
    targets: torch.Tensor,  # [N] int64
    active: torch.Tensor | None,  # [N] int8 or None
    vocab_start: int,
    temperature: float,
    with_entropy: bool,
    backend: str,
    chunk_size: int,
) -> torch.Tensor:
    """Per-row statistics of this shard, ``[5, N]`` fp32: m, s, t, z_target (0 if not owned), owned (0/1)."""
    n, v = logits.shape
    out = torch.empty(_STATS_ROWS, n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    if backend == "triton":
        stats_k, _ = _jitted(triton_interpret())
        block, warps = _launch_cfg(v)
        dummy = targets if active is None else active
        stats_k[(n,)](
            logits, logits.stride(0), targets, dummy, out, n, v, vocab_start, 1.0 / temperature,
            HAS_MASK=active is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
        )
        return out
    # torch: the reference point is lse itself (m = lse, s = 1, t = sum p log p = -H), a valid form of the same
    # statistics (merges rescale by exp(m - m')); logsumexp and the fused log-softmax are single vectorised passes.
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        z = _scaled_fp32(logits[lo:hi], temperature)  # [C, Vl]: the only fp32 copy, one chunk at a time
        lse = torch.logsumexp(z, -1)
        out[0, lo:hi] = lse
        out[1, lo:hi] = 1.0
        if with_entropy:
            logp = z - lse[:, None]
            out[2, lo:hi] = torch.linalg.vecdot(logp.exp(), logp)
            del logp
        else:
            out[2, lo:hi] = 0.0
        # Rows where that is not exact enough: |lse| > _EXACT_ABOVE (z - lse would lose z's low bits, ~1e-3 at
        # 1e4) or a NaN entropy sum (-inf logits: 0 * -inf). Redo them with the max as the reference point.
        redo = (lse.abs() > _EXACT_ABOVE) | out[2, lo:hi].isnan()
        if bool(redo.any()):
            rows = redo.nonzero().squeeze(-1)
            zr = z[rows]
            m = zr.amax(-1)
            m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
            zc = torch.where(zr == float("-inf"), 0.0, zr - m_safe[:, None])
            e = torch.exp(zr - m_safe[:, None])
            out[0, lo + rows], out[1, lo + rows] = m, e.sum(-1)
            out[2, lo + rows] = (e * zc).sum(-1) if with_entropy else 0.0
        local = targets[lo:hi] - vocab_start
        owned = (local >= 0) & (local < v)
        z_t = z.gather(-1, local.clamp(0, v - 1)[:, None]).squeeze(-1)
        out[3, lo:hi] = torch.where(owned, z_t, torch.zeros_like(z_t))
        out[4, lo:hi] = owned.float()
        del z
    if active is not None:
        act = active != 0
        out[0] = torch.where(act, out[0], 0.0)
        out[1] = torch.where(act, out[1], 1.0)
        out[2] = torch.where(act, out[2], 0.0)
        out[3] = torch.where(act, out[3], 0.0)
        out[4] = torch.where(act, out[4], 0.0)
    return out


def _local_grad(
    logits: torch.Tensor,  # [N, Vl]
    grad_out: torch.Tensor,  # [N, Vl], written (may alias logits)
    targets: torch.Tensor,
    active: torch.Tensor | None,
    vocab_start: int,
    temperature: float,
    row_max: torch.Tensor,  # [N] fp32 max of z over the whole vocabulary
    log_s: torch.Tensor,  # [N] fp32 log sum exp(z - max)
    ent: torch.Tensor | None,  # [N] fp32 when the entropy has a gradient
    g_lp: torch.Tensor,  # [N] fp32
    g_ent: torch.Tensor | None,  # [N] fp32
    backend: str,
    chunk_size: int,
) -> None:
    n, v = logits.shape
    if n == 0:
        return
    with_entropy = g_ent is not None
    if backend == "triton":
        _, grad_k = _jitted(triton_interpret())
        block, warps = _launch_cfg(v)
        dummy = targets if active is None else active
        grad_k[(n,)](
            logits, logits.stride(0), grad_out, grad_out.stride(0), targets, dummy,
            row_max, log_s, ent if with_entropy else log_s, g_lp, g_ent if with_entropy else g_lp,
            v, vocab_start, 1.0 / temperature,
            HAS_MASK=active is not None, WITH_ENTROPY=with_entropy, BLOCK_V=block, num_warps=warps,
        )
        return
    inv_t = 1.0 / temperature
    lse = row_max + log_s
    exact = row_max.abs() > _EXACT_ABOVE  # rows whose log p needs (z - max) - log s (see _local_stats)
    in_place = grad_out.data_ptr() == logits.data_ptr() and logits.dtype == torch.float32 and temperature == 1.0
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        rows = hi - lo
        # log p in one buffer (the gradient's own rows when it is the fp32 logits buffer: no temporary at all)
        if in_place:
            buf = torch.sub(logits[lo:hi], lse[lo:hi, None], out=grad_out[lo:hi])
        else:
            buf = _scaled_fp32(logits[lo:hi], temperature) - lse[lo:hi, None]
        redo = exact[lo:hi].nonzero().squeeze(-1)
        if redo.numel():
            z = _scaled_fp32(logits[lo + redo], temperature)
            buf[redo] = (z - row_max[lo + redo, None]) - log_s[lo + redo, None]
        glp = g_lp[lo:hi] * inv_t
        if with_entropy:  # g = -p (g_lp + g_H (log p + H)) / T
            buf.clamp_(min=-1e30)  # -inf logits: p = 0 must not meet (log p + H) = -inf
            p = buf.exp()
            buf.add_(ent[lo:hi, None]).mul_((g_ent[lo:hi] * inv_t)[:, None]).add_(glp[:, None]).mul_(p).neg_()
            del p
        else:  # g = -p g_lp / T
            buf.exp_().mul_(-glp[:, None])
        local = targets[lo:hi] - vocab_start
        owned = (local >= 0) & (local < v)
        if active is not None:
            owned &= active[lo:hi] != 0
        idx = owned.nonzero().squeeze(-1)
        buf[idx, local[idx]] += glp[idx]  # + g_lp / T at the target
        if active is not None:
            buf[active[lo:hi] == 0] = 0.0
        if buf.data_ptr() != grad_out[lo:hi].data_ptr():
            grad_out[lo:hi] = buf.to(grad_out.dtype)
        del buf, rows


def _scaled_fp32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x / T in fp32 (a copy unless x is fp32 and T = 1: then x itself, which callers only read)."""
    z = x if x.dtype == torch.float32 else x.float()
    return z if temperature == 1.0 else z * (1.0 / temperature)


# ---------------------------------------------------------------------------------------------------------------------
# Merging statistics across vocab pieces (vocab chunks or TP ranks).


def merge_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two ``[5, N]`` statistics of disjoint vocab pieces into the statistics of their union."""
    m = torch.maximum(a[0], b[0])
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    out = torch.empty_like(a)
    out[0] = m
    out[1] = 0.0
    out[2] = 0.0
    for x in (a, b):
        scale = torch.exp(x[0] - m_safe)
        out[1] += x[1] * scale
        shift = torch.where(x[0] == float("-inf"), 0.0, m_safe - x[0])
        out[2] += scale * (x[2] - shift * x[1])
    out[3] = a[3] + b[3]
    out[4] = a[4] + b[4]
    return out


def _allreduce_stats(stats: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The statistics of the whole vocabulary from every rank's shard statistics (MAX, then one SUM)."""
    if group is None or dist.get_world_size(group) == 1:
        return stats
    m_glob = stats[0].clone()
    dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(m_glob == float("-inf"), torch.zeros_like(m_glob), m_glob)
    scale = torch.exp(stats[0] - m_safe)
    packed = torch.stack(
        [
            stats[1] * scale,
            scale * (stats[2] - torch.where(stats[0] == float("-inf"), 0.0, m_safe - stats[0]) * stats[1]),
            stats[3],
            stats[4],
        ]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return torch.cat([m_glob[None], packed])


def finish_stats(
    stats: torch.Tensor, targets: torch.Tensor, active: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, entropy, max, log_s), each ``[N]`` fp32, from whole-vocabulary statistics (lse = max + log_s);
    checks that every unmasked target is owned by exactly one vocab piece."""
    m, s, t, z_t, owned = stats
    act = torch.ones_like(owned, dtype=torch.bool) if active is None else active != 0
    bad = act & (owned == 0)
    if bool(bad.any()):  # one device sync per call; an out-of-vocab target is a data bug worth stopping for
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{row}] = {int(targets[row])} lies outside the vocabulary (no vocab shard owns it) "
            "and that row is not masked out"
        )
    log_s = torch.log(s)
    zero = torch.zeros_like(log_s)
    # (z_t - m) - log s rather than z_t - (m + log s): z_t - m is exact, so |logits| ~ 1e4 loses nothing.
    # The clamps are exact inequalities in real arithmetic; they only remove last-bit rounding.
    logprobs = torch.where(act, torch.clamp((z_t - m) - log_s, max=0.0), zero)
    entropy = torch.where(act, torch.clamp(log_s - t / s, min=0.0), zero)
    return logprobs, entropy, m, log_s


# ---------------------------------------------------------------------------------------------------------------------
# Autograd.


class _MaskedLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits, targets, active, temperature, with_entropy, vocab_start, tp_group, backend, chunk_size,
        inplace_backward,
    ):
        stats = _local_stats(logits, targets, active, vocab_start, temperature, with_entropy, backend, chunk_size)
        stats = _allreduce_stats(stats, tp_group)
        logprobs, entropy, row_max, log_s = finish_stats(stats, targets, active)
        ctx.save_for_backward(logits, targets, active, row_max, log_s, entropy)
        ctx.cfg = (temperature, vocab_start, backend, chunk_size, inplace_backward, with_entropy)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):  # type: ignore[override]
        logits, targets, active, row_max, log_s, entropy = ctx.saved_tensors
        temperature, vocab_start, backend, chunk_size, inplace_backward, with_entropy = ctx.cfg
        if g_lp is None and (g_ent is None or not with_entropy):
            return (None,) * 10
        g_lp = torch.zeros_like(log_s) if g_lp is None else g_lp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (with_entropy and g_ent is not None) else None
        grad = logits if inplace_backward else torch.empty_like(logits)
        _local_grad(
            logits, grad, targets, active, vocab_start, temperature, row_max, log_s, entropy, g_lp, g_ent, backend,
            chunk_size,
        )
        if inplace_backward:
            # the kernel wrote through a raw pointer: tell autograd the logits changed
            torch.autograd.graph.increment_version(logits)
        return (grad,) + (None,) * 9


def _prepare(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V]; got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits shape without vocab {tuple(logits.shape[:-1])}")
    if mask is not None and tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} != targets shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None; got {chunk_size}")
    logits2d = logits.reshape(-1, logits.shape[-1])
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    targets1d = targets.reshape(-1).to(torch.int64).contiguous()
    active = None if mask is None else (mask.reshape(-1) != 0).to(torch.int8).contiguous()
    return logits2d, targets1d, active


def _run(
    logits, targets, mask, tp_group, vocab_start, temperature, return_entropy, chunk_size, backend, inplace_backward
):
    backend = resolve_backend(backend, logits.device)
    logits2d, targets1d, active = _prepare(logits, targets, mask, temperature, chunk_size)
    if chunk_size is None:  # bound each fp32 temporary of the torch backend to 2**24 elements
        chunk_size = max(1, _TORCH_CHUNK_ELEMS // max(1, logits2d.shape[-1]))
    logprobs, entropy = _MaskedLogprobFn.apply(
        logits2d, targets1d, active, float(temperature), bool(return_entropy), int(vocab_start), tp_group, backend,
        int(chunk_size), bool(inplace_backward),
    )
    logprobs = logprobs.reshape(targets.shape)
    if return_entropy:
        return logprobs, entropy.reshape(targets.shape)
    return logprobs


def masked_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` under ``softmax(logits / temperature)``, optionally with its entropy.

    Args:
        logits: ``[..., V]`` bf16/fp16/fp32, last dim contiguous. Never upcast as a whole.
        targets: ``[...]`` integer token ids in ``[0, V)`` wherever ``mask`` is non-zero.
        mask: ``[...]`` (bool/int/float) or None; rows where it is 0 give 0 and receive zero gradient.
        temperature: divides the logits before the softmax (the sampling temperature of the rollout).
        return_entropy: also return the entropy (differentiable).
        chunk_size: rows per chunk for the torch backend; None = as many rows as keep one fp32 chunk
            within 2**24 elements (64 MiB), e.g. 110 rows at V = 151,936.
        backend: "auto" | "triton" | "torch" (see ``tapo_kernels.select``).
        inplace_backward: write d(loss)/d(logits) into the logits buffer (saves one ``[N, V]`` tensor).
    Returns:
        logprobs ``[...]`` fp32 (<= 0), or ``(logprobs, entropy)`` fp32 when ``return_entropy``.
    """
    return _run(logits, targets, mask, None, 0, temperature, return_entropy, chunk_size, backend, inplace_backward)


def masked_logprobs_vocab_parallel(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    tp_group: dist.ProcessGroup | None,
    vocab_start: int | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``masked_logprobs`` over a vocabulary split across the ranks of ``tp_group`` (Megatron TP layout).

    Args:
        logits_shard: ``[..., V / tp]`` this rank's slice of the vocabulary, columns
            ``[vocab_start, vocab_start + V / tp)`` of the full logits.
        targets: ``[...]`` global token ids (identical on every rank).
        mask: ``[...]`` or None (identical on every rank).
        tp_group: the tensor-parallel process group; None means a single rank.
        vocab_start: first global vocab id of this shard; None gives Megatron's equal split, ``rank * V / tp``.
        Other arguments as in ``masked_logprobs``.
    Returns:
        logprobs (and entropy), replicated on every rank; equals ``-vocab_parallel_cross_entropy`` when T = 1.
    """
    if vocab_start is None:
        rank = 0 if tp_group is None else dist.get_rank(tp_group)
        vocab_start = rank * logits_shard.shape[-1]
    return _run(
        logits_shard, targets, mask, tp_group, vocab_start, temperature, return_entropy, chunk_size, backend,
        inplace_backward,
    )
