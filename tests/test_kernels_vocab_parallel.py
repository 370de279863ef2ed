"""Vocab-parallel log-probs at TP=2 over gloo (2 spawned CPU processes) against TP=1 and Megatron's own
``vocab_parallel_cross_entropy`` (at TP=1 and TP=2), for both backends; the fused LM-head form at TP=2 against TP=1.

The workers inherit TRITON_INTERPRET=1 from this process's environment and import triton fresh, so the Triton
backend runs in the interpreter there. Everything is asserted inside the workers; a failure re-raises here with the
worker's traceback.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
N, V, H = 6, 40, 8  # V / WORLD = 20 columns per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(N, V, generator=g) * 3
    logits[0, 25] = 30.0  # the row max on rank 1 only: exercises the MAX all-reduce rescale
    logits[1, 3] = 30.0  # ... and on rank 0 only
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[1] = 25, 38  # targets on each rank
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    w_lp, w_ent = torch.linspace(-1.0, 2.0, N), torch.linspace(0.5, -1.5, N)
    return logits, targets, mask, hidden, weight, w_lp, w_ent


def _ours(logits, targets, mask, group, temperature, backend, w_lp, w_ent):
    import tapo_kernels as tk

    x = logits.clone().requires_grad_()
    lp, ent = tk.masked_logprobs_vocab_parallel(
        x, targets, mask, group, temperature=temperature, return_entropy=True, backend=backend
    )
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import tapo_kernels as tk
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

        tp2 = dist.group.WORLD
        singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank must create every group
        tp1 = singles[rank]
        logits, targets, mask, hidden, weight, w_lp, w_ent = _data()
        cols = slice(rank * V // WORLD, (rank + 1) * V // WORLD)
        shard = logits[:, cols].contiguous()
        tol = dict(atol=1e-5, rtol=0)
        for backend in ("triton", "torch"):
            for temperature, m in ((1.0, None), (0.7, mask)):
                lp1, ent1, g1 = _ours(logits, targets, m, tp1, temperature, backend, w_lp, w_ent)
                lp2, ent2, g2 = _ours(shard, targets, m, tp2, temperature, backend, w_lp, w_ent)
                torch.testing.assert_close(lp2, lp1, **tol)
                torch.testing.assert_close(ent2, ent1, **tol)
                torch.testing.assert_close(g2, g1[:, cols], **tol)
                # and the TP=1 result against the plain-torch reference
                torch.testing.assert_close(lp1, tk.reference_logprobs(logits, targets, m, temperature), **tol)
                torch.testing.assert_close(ent1, tk.reference_entropy(logits, m, temperature), **tol)

            # Megatron's vocab-parallel cross-entropy (= -logprob), values and gradients, at TP=1 and TP=2
            for group, piece in ((tp1, logits), (tp2, shard)):
                xm = piece.clone()[:, None, :].requires_grad_()  # megatron layout [s, b, V/tp]
                loss = vocab_parallel_cross_entropy(xm * 1.0, targets[:, None], tp_group=group)  # * 1.0: it writes
                (loss[:, 0] * -w_lp).sum().backward()  # d(-loss) weighted like our log-probs
                x = piece.clone().requires_grad_()
                lp = tk.masked_logprobs_vocab_parallel(x, targets, None, group, backend=backend)
                (lp * w_lp).sum().backward()
                torch.testing.assert_close(lp, -loss[:, 0].detach(), **tol)
                torch.testing.assert_close(x.grad, xm.grad[:, 0], **tol)

            # fused LM head: TP=2 weight shards vs TP=1 full weight
            outs = []
            for group, w in ((tp1, weight), (tp2, weight[cols].contiguous())):
                hx, wx = hidden.clone().requires_grad_(), w.clone().requires_grad_()
                lp, ent = tk.fused_linear_logprobs(
                    hx, wx, targets, mask, temperature=0.9, return_entropy=True, token_chunk=4, vocab_chunk=8,
                    tp_group=group, backend=backend,
                )
                ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
                outs.append((lp.detach(), ent.detach(), hx.grad, wx.grad))
            (lp1, ent1, gh1, gw1), (lp2, ent2, gh2, gw2) = outs
            torch.testing.assert_close(lp2, lp1, **tol)
            torch.testing.assert_close(ent2, ent1, **tol)
            torch.testing.assert_close(gh2, gh1, atol=2e-5, rtol=1e-5)  # grad_hidden is all-reduced: full on each rank
            torch.testing.assert_close(gw2, gw1[cols], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(lp1, tk.reference_logprobs(hidden @ weight.T, targets, mask, 0.9), **tol)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_vocab_parallel_tp2_matches_tp1_and_megatron():
    old = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # inherited by the spawned workers
    try:
        mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
