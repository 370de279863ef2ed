"""Parity of the tapo_kernels kernels with their torch references (CPU: Triton runs under TRITON_INTERPRET=1).

Tolerances: fp32 values and gradients <= 1e-5 (absolute; all quantities are O(1) here). bf16 logits: the kernels read
the same bf16 numbers the reference upcasts and do fp32 maths, so values still agree to 1e-5; gradients are written in
bf16 by both paths (the reference's ``.float()`` casts its fp32 gradient back), so they agree to within one bf16 ulp (fp32 values a hair apart may round to neighbours):
|diff| <= 2**-7 * |ref| + 1e-6.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    # Triton builds its own library (tl.sum, tl.max...) for the interpreter only if this is set before triton is
    # first imported; `import torch` does not import triton, so this is early enough when this module loads first.
    os.environ["TRITON_INTERPRET"] = "1"

import tapo_kernels as tk  # noqa: E402
from tapo_kernels import select  # noqa: E402

BACKENDS = ["triton", "torch"]
# If another test module imported triton first (e.g. through megatron.core), the interpreter cannot be switched on
# in this process: the tests then run once more in a fresh interpreter instead (test_kernels_in_fresh_process).
IN_PROCESS = DEVICE.type == "cuda" or select.triton_interpreter_ready()


@pytest.fixture(autouse=True)
def _setup(request):
    if not IN_PROCESS and request.node.name != "test_kernels_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; covered by test_kernels_in_fresh_process")
    torch.set_num_threads(1)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1].replace("1 skipped", "")


def _weights(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct upstream gradients per row for log-prob and entropy, so every row's gradient path is checked."""
    return torch.linspace(-1.0, 2.0, n, device=DEVICE), torch.linspace(0.5, -1.5, n, device=DEVICE)


def _run_both(logits, targets, mask, temperature, backend, **kw):
    """(lp, ent, grad) from tapo_kernels and (lp, ent, grad) from the reference."""
    w_lp, w_ent = _weights(targets.numel())
    x = logits.clone().requires_grad_()
    lp, ent = tk.masked_logprobs(x, targets, mask, temperature=temperature, return_entropy=True, backend=backend, **kw)
    ((lp.reshape(-1) * w_lp).sum() + (ent.reshape(-1) * w_ent).sum()).backward()
    xr = logits.clone().requires_grad_()
    # one upcast node, so the reference's gradient is rounded to the logits' dtype once (not once per output)
    xf = xr.float().reshape(-1, xr.shape[-1])
    lpr = tk.reference_logprobs(xf, targets.reshape(-1), None if mask is None else mask.reshape(-1), temperature)
    entr = tk.reference_entropy(xf, None if mask is None else mask.reshape(-1), temperature)
    ((lpr * w_lp).sum() + (entr * w_ent).sum()).backward()
    return (lp.reshape(-1), ent.reshape(-1), x.grad), (lpr, entr, xr.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_logprobs_fp32_match_reference(backend, temperature, masked):
    g = torch.Generator().manual_seed(1)
    n, v = 9, 50
    logits = (torch.randn(n, v, generator=g) * 3).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    mask = None
    if masked:
        mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], device=DEVICE)
        targets[1] = -100  # ignore-ids on masked rows must never be read
    (lp, ent, grad), (lpr, entr, gradr) = _run_both(logits, targets, mask, temperature, backend, chunk_size=4)
    torch.testing.assert_close(lp, lpr, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, entr, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, gradr, atol=1e-5, rtol=0)
    if masked:
        off = mask == 0
        assert torch.all(lp[off] == 0) and torch.all(ent[off] == 0)
        assert torch.all(grad[off] == 0)
        assert torch.all(grad[~off].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_multi_block_rows(backend):
    """V larger than one Triton block (4096): the online max / sum-exp merge across blocks."""
    g = torch.Generator().manual_seed(2)
    n, v = 3, 4100
    logits = (torch.randn(n, v, generator=g) * 2).to(DEVICE)
    logits[0, 4099] = 15.0  # the row max sits in the second block
    targets = torch.tensor([4099, 5, 4097], device=DEVICE)
    (lp, ent, grad), (lpr, entr, gradr) = _run_both(logits, targets, None, 1.3, backend)
    torch.testing.assert_close(lp, lpr, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, entr, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, gradr, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_bf16(backend):
    g = torch.Generator().manual_seed(3)
    n, v = 8, 64
    logits = (torch.randn(n, v, generator=g) * 4).to(torch.bfloat16).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], device=DEVICE)
    (lp, ent, grad), (lpr, entr, gradr) = _run_both(logits, targets, mask, 0.9, backend)
    assert grad.dtype == torch.bfloat16 and lp.dtype == torch.float32
    torch.testing.assert_close(lp, lpr, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, entr, atol=1e-5, rtol=0)
    diff = (grad.float() - gradr.float()).abs()
    assert torch.all(diff <= 2.0**-7 * gradr.float().abs() + 1e-6), f"max bf16 grad diff {diff.max().item()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_extreme_logits(backend, dtype):
    """+-1e4 logits, all-equal rows and -inf entries: no NaN, log-prob <= 0, entropy >= 0, exact known values."""
    v = 40
    rows = [
        torch.full((v,), 1e4),  # all equal, huge
        torch.full((v,), -1e4),  # all equal, very negative
        torch.cat([torch.tensor([1e4]), torch.full((v - 1,), -1e4)]),  # one-hot-like
        torch.cat([torch.tensor([-1e4]), torch.full((v - 1,), 1e4)]),
        torch.cat([torch.tensor([0.0, float("-inf")]), torch.zeros(v - 2)]),  # a -inf (e.g. banned) token
    ]
    logits = torch.stack(rows).to(dtype).to(DEVICE)
    targets = torch.tensor([3, 0, 0, 0, 2], device=DEVICE)
    x = logits.clone().requires_grad_()
    lp, ent = tk.masked_logprobs(x, targets, None, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(x.grad.float()).all()
    assert (lp <= 0).all() and (ent >= 0).all()
    log_v = math.log(v)
    hi, lo = float(logits[0, 0]), float(logits[1, 0])  # +-1e4 as stored in this dtype (bf16 rounds them)
    expected_lp = torch.tensor([-log_v, -log_v, 0.0, (lo - hi) - math.log(v - 1), -math.log(v - 1)])
    expected_ent = torch.tensor([log_v, log_v, 0.0, math.log(v - 1), math.log(v - 1)])
    torch.testing.assert_close(lp.cpu(), expected_lp, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(ent.cpu(), expected_ent, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_leading_dims_inplace_and_no_entropy(backend):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 20, generator=g).to(DEVICE)
    targets = torch.randint(0, 20, (2, 3), generator=g).to(DEVICE)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], device=DEVICE)
    x = logits.clone().requires_grad_()
    lp = tk.masked_logprobs(x, targets, mask, backend=backend)
    assert lp.shape == (2, 3)
    lp.sum().backward()
    # in-place backward: same gradient, written into the (non-leaf) logits buffer
    y = logits.clone().requires_grad_()
    buf = y * 1.0
    lp2 = tk.masked_logprobs(buf, targets, mask, backend=backend, inplace_backward=True)
    lp2.sum().backward()
    xr = logits.clone().requires_grad_()
    tk.reference_logprobs(xr.reshape(6, 20), targets.reshape(6), mask.reshape(6)).sum().backward()
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(y.grad, xr.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(buf.detach(), xr.grad, atol=1e-6, rtol=0)  # the buffer now holds the gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_out_of_vocab_target_raises(backend):
    logits = torch.zeros(3, 10, device=DEVICE)
    targets = torch.tensor([1, 10, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"targets\[1\] = 10"):
        tk.masked_logprobs(logits, targets, None, backend=backend)
    # the same id on a masked row is fine
    out = tk.masked_logprobs(logits, targets, torch.tensor([1, 0, 1], device=DEVICE), backend=backend)
    assert out[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_match_reference(backend, dtype):
    g = torch.Generator().manual_seed(5)
    n, h, v = 10, 16, 70
    hidden = torch.randn(n, h, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], device=DEVICE)
    w_lp, w_ent = _weights(n)
    hx, wx = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = tk.fused_linear_logprobs(hx, wx, targets, mask, temperature=0.8, return_entropy=True,
                                       token_chunk=4, vocab_chunk=32, backend=backend)  # 3 x 3 tiles
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    hr, wr = hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()
    logits = hr @ wr.T
    lpr = tk.reference_logprobs(logits, targets, mask, 0.8)
    entr = tk.reference_entropy(logits, mask, 0.8)
    ((lpr * w_lp).sum() + (entr * w_ent).sum()).backward()
    if dtype == torch.float32:
        tol = dict(atol=1e-5, rtol=0)
        gtol = dict(atol=2e-5, rtol=1e-5)  # sums over 70 vocab entries of O(1) terms
    else:  # bf16 logits tiles (as the real output layer would produce) vs an fp32 GEMM reference
        tol = dict(atol=0.1, rtol=0.02)
        gtol = dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(lp, lpr, **tol)
    torch.testing.assert_close(ent, entr, **tol)
    torch.testing.assert_close(hx.grad.float(), hr.grad, **gtol)
    torch.testing.assert_close(wx.grad.float(), wr.grad, **gtol)
    assert torch.all(hx.grad[mask == 0] == 0)


def _ragged_groups(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of every size 1..11 (ids arbitrary, incl. huge), shuffled; a few zero-variance groups."""
    g = torch.Generator().manual_seed(seed)
    ids, rewards = [], []
    for size in range(1, 12):
        gid = int(torch.randint(0, 2**40, (1,), generator=g))
        ids += [gid] * size
        if size in (3, 7):  # all-equal rewards: no learning signal
            rewards += [0.3] * size
        else:
            rewards += torch.randint(0, 3, (size,), generator=g).float().mul(0.5).tolist()
    perm = torch.randperm(len(ids), generator=g)
    return torch.tensor(rewards)[perm].to(DEVICE), torch.tensor(ids)[perm].to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grouped_advantage_ragged_unsorted(backend, normalize_std):
    rewards, ids = _ragged_groups(6)
    out = tk.grouped_advantage(rewards, ids, normalize_std=normalize_std, backend=backend)
    ref = tk.reference_grouped_advantage(rewards, ids, normalize_std=normalize_std)
    torch.testing.assert_close(out.sample_advantages, ref, atol=1e-5, rtol=0)
    # per-group statistics and the degenerate policy
    for g, gid in enumerate(out.group_ids.tolist()):
        r = rewards[ids == gid]
        assert out.group_count[g] == r.numel()
        torch.testing.assert_close(out.group_mean[g], r.mean(), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.group_std[g], r.std(unbiased=False), atol=1e-6, rtol=0)
        degenerate = r.numel() == 1 or bool((r == r[0]).all())
        assert bool(out.group_degenerate[g]) == degenerate
        if degenerate:
            assert torch.all(out.sample_advantages[ids == gid] == 0)
    assert int(out.group_degenerate.sum()) >= 3  # the singleton and the two all-equal groups


def test_grouped_advantage_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 2.0, 5.0], device=DEVICE)
    ids = torch.tensor([7, 7, 3, 7], device=DEVICE)
    for backend in BACKENDS:
        out = tk.grouped_advantage(rewards, ids, eps=0.0, backend=backend)
        # group 7: {1, 0, 5}, mean 2, population std sqrt(14/3); group 3 is a singleton
        s = math.sqrt(14 / 3)
        expected = torch.tensor([-1 / s, -2 / s, 0.0, 3 / s])
        torch.testing.assert_close(out.sample_advantages.cpu(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_advantage_token_broadcast(backend):
    rewards, ids = _ragged_groups(7)
    b = rewards.numel()
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(0, 5, (b,), generator=g)  # includes empty samples
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(DEVICE)
    n_tok = int(cu[-1]) + 3  # 3 padding tokens past the last sample
    mask = (torch.rand(n_tok, generator=g) > 0.3).to(DEVICE)
    out = tk.grouped_advantage(rewards, ids, cu_seqlens=cu, response_mask=mask, backend=backend)
    from tapo_kernels.reference import token_sample_index_from_cu_seqlens

    idx = token_sample_index_from_cu_seqlens(cu, n_tok)
    expected = tk.reference_token_advantage(out.sample_advantages, idx, mask)
    torch.testing.assert_close(out.token_advantages, expected, atol=0, rtol=0)
    assert torch.all(out.token_advantages[-3:] == 0)
    # the same through an explicit index (with -1 padding and no mask)
    out2 = tk.grouped_advantage(rewards, ids, token_sample_index=idx, backend=backend)
    torch.testing.assert_close(out2.token_advantages, tk.reference_token_advantage(out.sample_advantages, idx))
    # hand check: token t of sample i carries sample i's advantage
    i = int(torch.nonzero(lengths > 0)[0, 0])
    torch.testing.assert_close(out2.token_advantages[int(cu[i])], out.sample_advantages[i])


def test_grouped_advantage_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"group_ids\[1\] = -2"):
        tk.grouped_advantage(torch.ones(2), torch.tensor([0, -2]), backend="torch")
    with pytest.raises(ValueError, match=r"rewards\[0\]"):
        tk.grouped_advantage(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0]), backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        tk.grouped_advantage(torch.ones(2), torch.tensor([0, 0]), cu_seqlens=torch.tensor([0, 1]),
                             response_mask=torch.ones(1), backend="torch")


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TAPO_KERNELS", raising=False)
    assert select.resolve_backend("auto", cpu) == "torch"
    assert select.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("TAPO_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select.resolve_backend("auto", cpu) == "triton"
    assert select.resolve_backend("torch", cpu) == "torch"  # an explicit argument beats the environment
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select.resolve_backend("auto", cpu)
    monkeypatch.setenv("TAPO_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="TAPO_KERNELS"):
        select.resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="valid: auto, triton, torch"):
        tk.masked_logprobs(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]), backend="fast")
    monkeypatch.setenv("TAPO_KERNELS", "torch")
    logits = torch.randn(4, 6)
    targets = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(tk.masked_logprobs(logits, targets), tk.reference_logprobs(logits, targets),
                               atol=1e-6, rtol=0)
