"""OTS weights, entropy helper, the decoupled PPO-clip loss and the SFT loss, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from tapo_megatron.algorithms.losses import (
    get_policy_loss,
    kl_penalty,
    list_policy_losses,
    policy_loss,
    register_policy_loss,
    sft_loss,
)
from tapo_megatron.algorithms.ots import ots_weights, token_entropy_from_logits

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------------------------- OTS


def test_ots_weights_values_clipping_and_mask():
    logprobs = torch.tensor([[-0.1, -2.0, -10.0, -0.5, -0.01, float("-inf")]])
    entropy = torch.tensor([[0.1, 0.5, 1.0, 5.0, 3.0, 0.3]])
    mask = torch.tensor([[True, True, True, False, True, False]])
    w = ots_weights(logprobs, entropy, mask)
    # s = 0 -> 1;  s = -1.5 -> exp(-1.5) = 0.2231302;  s = -9 -> 1.234e-4, clipped up to 0.01;
    # masked out -> 1 (even though exp(4.5) = 90 would clip to 10);  s = 2.99 -> 19.89, clipped down to 10;
    # masked-out -inf log-prob (padding) -> 1
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.2231302, 0.01, 1.0, 10.0, 1.0]]), rtol=0, atol=1e-6)


def test_ots_weights_custom_clip_float_mask_and_detached():
    logprobs = torch.tensor([[-3.0, -0.2]], requires_grad=True)
    entropy = torch.tensor([[1.0, 0.2]], requires_grad=True)
    w = ots_weights(logprobs, entropy, torch.tensor([[1.0, 1.0]]), clip_min=0.2, clip_max=0.5)
    # exp(-2) = 0.1353 -> clipped to 0.2;  exp(0) = 1 -> clipped to 0.5
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.5]]))
    assert not w.requires_grad and w.dtype == torch.float32


def test_ots_weights_bad_args():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="same shape"):
        ots_weights(x, torch.zeros(1, 3), x.bool())
    with pytest.raises(ValueError, match="clip_min"):
        ots_weights(x, x, x.bool(), clip_min=0.0)


def test_token_entropy_from_logits():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4 = 1.3862944
            [0.0, 0.0, math.log(2.0), float("-inf")],  # p = 1/4, 1/4, 1/2, 0: 0.5 ln4 + 0.5 ln2 = 1.0397208
            [1000.0, 0.0, 0.0, 0.0],  # one-hot in fp32: 0, and no overflow
            [5.0, float("-inf"), float("-inf"), float("-inf")],  # masked vocabulary: 0, not NaN
        ]
    )
    h = token_entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.tensor([1.3862944, 1.0397208, 0.0, 0.0]), rtol=0, atol=1e-6)
    # bf16 input (values exact in bf16), accumulated in fp32: uniform over 4 at a large offset -> ln 4;
    # [256, 256, -inf, -inf] -> ln 2 = 0.6931472
    h16 = token_entropy_from_logits(torch.tensor([[300.0] * 4, [256.0, 256.0, -math.inf, -math.inf]]).bfloat16())
    assert h16.dtype == torch.float32
    torch.testing.assert_close(h16, torch.tensor([1.3862944, 0.6931472]), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------- policy loss, 2 x 3


def _two_by_three():
    """Row 0 original (A = +1), row 1 constructed (A = -1); position 0 is prompt (garbage values, masked out).

    ratios: row 0 -> [_, 1.5, 0.5], row 1 -> [_, 1.0, 0.7]; OTS weights row 1 -> [_, 0.5, 2.0].
    """
    old = torch.full((2, 3), -1.0)
    ratios = torch.tensor([[7.0, 1.5, 0.5], [9.0, 1.0, 0.7]])
    logprobs = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])  # per sequence, broadcast over tokens
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0], [123.0, 0.5, 2.0]])
    cons = torch.tensor([False, True])
    return logprobs, old, adv, mask, weights, cons


def test_policy_loss_lambda_one_hand_checked():
    logprobs, old, adv, mask, weights, cons = _two_by_three()
    loss, m = policy_loss(logprobs, old, adv, mask, is_constructed=cons, token_weights=weights, constructed_coef=1.0)
    # row 0, A = +1:  t1: max(-1.5, -1.2) = -1.2 (clipped);  t2: max(-0.5, -0.8) = -0.5   -> (-1.7) / 2 = -0.85
    # row 1, A = -1:  t1: max(1.0, 1.0) = 1.0, w 0.5 -> 0.5;  t2: max(0.7, 0.8) = 0.8 (clipped), w 2 -> 1.6
    #                 -> (0.5 + 1.6) / 2 = 1.05
    # L = -0.85 + 1.0 * 1.05 = 0.2   (a joint denominator would give (-1.7 + 2.1) / 4 = 0.1)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert m["loss/original"].item() == pytest.approx(-0.85, abs=1e-6)
    assert m["loss/constructed"].item() == pytest.approx(1.05, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(0.5)  # row0 t1 and row1 t2 of 4 tokens
    assert m["clip_frac/original"].item() == pytest.approx(0.5)
    assert m["clip_frac/constructed"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 0.7) / 4, abs=1e-6)  # 0.925
    # approx KL(old || new) = mean(r - 1 - ln r): 0.0945349, 0.1931472, 0, 0.0566749 -> 0.0860893
    assert m["approx_kl"].item() == pytest.approx(0.0860893, abs=1e-6)
    assert m["ots_weight_mean"].item() == pytest.approx(1.25)  # (0.5 + 2.0) / 2, prompt weight 123 ignored
    assert m["zero_adv_frac/constructed"].item() == 0.0
    assert m["num_tokens/original"].item() == 2 and m["num_tokens/constructed"].item() == 2
    assert m["kl_ref"].item() == 0.0

    loss.backward()
    # dl/dlogprob = -A * ratio * w / N_branch where unclipped, 0 where clipped (and on the masked prompt):
    # row 0 t2: -(1)(0.5)/2 = -0.25;  row 1 t1: -(-1)(1.0)(0.5)/2 = 0.25
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -0.25], [0.0, 0.25, 0.0]]), rtol=0, atol=1e-6)


def test_policy_loss_lambda_half_and_asymmetric_clip():
    logprobs, old, adv, mask, weights, cons = _two_by_three()
    loss, _ = policy_loss(logprobs, old, adv, mask, is_constructed=cons, token_weights=weights, constructed_coef=0.5)
    assert loss.item() == pytest.approx(-0.85 + 0.5 * 1.05, abs=1e-6)  # -0.325
    # clip_eps_high = 0.6: row 0 t1 ratio 1.5 is no longer clipped -> -1.5; row 0 = (-1.5 - 0.5)/2 = -1.0
    # clip_eps_low = 0.4: row 1 t2 ratio 0.7 is inside [0.6, 1.6] -> 0.7 * 2 = 1.4; row 1 = (0.5 + 1.4)/2 = 0.95
    loss, m = policy_loss(logprobs, old, adv, mask, is_constructed=cons, token_weights=weights, constructed_coef=1.0,
                          clip_eps_low=0.4, clip_eps_high=0.6)
    assert loss.item() == pytest.approx(-1.0 + 0.95, abs=1e-6)
    assert m["clip_frac"].item() == 0.0


def test_policy_loss_kl_estimators():
    # one original row, 3 response tokens with log(pi_ref/pi) = ln 2, -ln 2, 0 and ratio 1 (A = 0 -> no PG term)
    lp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = lp + torch.tensor([[math.log(2.0), -math.log(2.0), 0.0]])
    mask = torch.ones(1, 3)
    cons = torch.tensor([False])
    # k3 = e^x - x - 1: 2 - 0.6931472 - 1 = 0.3068528;  0.5 + 0.6931472 - 1 = 0.1931472;  0  -> mean 0.1666667
    # k1 = lp - ref: -ln2, ln2, 0 -> mean 0;   k2 = (ln2)^2 / 2 = 0.2402265 twice -> mean 0.1601510
    for est, want in (("k3", 0.1666667), ("k1", 0.0), ("k2", 0.1601510)):
        loss, m = policy_loss(lp, lp.clone(), torch.zeros(1), mask, is_constructed=cons, token_weights=None,
                              constructed_coef=1.0, kl_coef=0.1, ref_logprobs=ref, kl_estimator=est)
        assert m["kl_ref"].item() == pytest.approx(want, abs=1e-6), est
        assert loss.item() == pytest.approx(0.1 * want, abs=1e-6), est
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([[0.3068528, 0.1931472, 0.0]]))
    # kl metric is reported even when the KL term is off, and then does not enter the loss
    loss, m = policy_loss(lp, lp.clone(), torch.zeros(1), mask, is_constructed=cons, token_weights=None,
                          constructed_coef=1.0, ref_logprobs=ref)
    assert loss.item() == 0.0 and m["kl_ref"].item() == pytest.approx(0.1666667, abs=1e-6)


def test_kl_on_constructed_tokens_is_weighted():
    # constructed row with OTS weights [0.5, 2]: k3 = 0.3068528 * 0.5 + 0.1931472 * 2 = 0.5397208, / 2 = 0.2698604
    lp = torch.tensor([[-1.0, -1.0]])
    ref = lp + torch.tensor([[math.log(2.0), -math.log(2.0)]])
    loss, _ = policy_loss(lp, lp.clone(), torch.zeros(1), torch.ones(1, 2), is_constructed=torch.tensor([True]),
                          token_weights=torch.tensor([[0.5, 2.0]]), constructed_coef=1.0, kl_coef=1.0,
                          ref_logprobs=ref)
    assert loss.item() == pytest.approx(0.2698604, abs=1e-6)


class _TinyLM(torch.nn.Module):
    """Embedding -> linear: logits for the next token; enough to push gradients into real parameters."""

    def __init__(self, vocab: int = 7, dim: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token-aligned [B, T]: entry t = log p(tokens[t] | tokens[:t]); entry 0 is 0."""
        logp = torch.log_softmax(self.emb[tokens[:, :-1]] @ self.out, dim=-1)  # [B, T-1, V]
        lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def _random_batch(seed: int, b: int = 5, t: int = 6):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (b, t), generator=g)
    mask = torch.zeros(b, t)
    for i, (start, end) in enumerate([(2, 6), (1, 4), (3, 6), (2, 5), (1, 6)][:b]):
        mask[i, start:end] = 1.0
    old = -torch.rand(b, t, generator=g) * 3
    adv = torch.randn(b, generator=g)
    weights = torch.rand(b, t, generator=g) * 2
    ref = -torch.rand(b, t, generator=g) * 3
    return tokens, mask, old, adv, weights, ref


def test_lambda_zero_equals_grpo_without_constructed_rows():
    tokens, mask, old, adv, weights, ref = _random_batch(1)
    cons = torch.tensor([False, True, False, True, False])
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, ref_logprobs=ref)

    model = _TinyLM()
    loss_tapo, m = policy_loss(model.logprobs(tokens), old, adv, mask, is_constructed=cons, token_weights=weights,
                               constructed_coef=0.0, **kw)
    loss_tapo.backward()
    grads_tapo = [p.grad.clone() for p in model.parameters()]

    keep = ~cons  # plain GRPO: the same originals, constructed rows removed
    model_ref = _TinyLM()
    kw["ref_logprobs"] = ref[keep]
    loss_grpo, _ = policy_loss(model_ref.logprobs(tokens[keep]), old[keep], adv[keep], mask[keep],
                               is_constructed=torch.zeros(3, dtype=torch.bool), token_weights=None,
                               constructed_coef=1.0, **kw)
    loss_grpo.backward()
    torch.testing.assert_close(loss_tapo, loss_grpo, rtol=1e-6, atol=1e-7)
    for g_tapo, p in zip(grads_tapo, model_ref.parameters()):
        torch.testing.assert_close(g_tapo, p.grad, rtol=1e-6, atol=1e-7)
    assert m["loss/constructed"].item() != 0.0  # the constructed term exists, it just does not enter

    # and lambda = 1 really changes the gradients (so the comparison above can fail)
    model.zero_grad()
    loss1, _ = policy_loss(model.logprobs(tokens), old, adv, mask, is_constructed=cons, token_weights=weights,
                           constructed_coef=1.0, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.05, ref_logprobs=ref)
    loss1.backward()
    assert not torch.allclose(model.out.grad, grads_tapo[1])


def test_lambda_zero_ignores_nan_in_constructed_rows():
    tokens, mask, old, adv, weights, _ = _random_batch(2)
    cons = torch.tensor([False, True, False, True, False])
    lp = torch.randn(5, 6).clamp(max=0).requires_grad_(True)
    bad_weights = weights.clone()
    bad_weights[1, 2] = float("nan")
    loss, _ = policy_loss(lp, old, adv, mask, is_constructed=cons, token_weights=bad_weights, constructed_coef=0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert torch.equal(lp.grad[cons], torch.zeros(2, 6))


def test_micro_batch_losses_with_global_counts_sum_to_full_batch():
    tokens, mask, old, adv, weights, ref = _random_batch(3)
    cons = torch.tensor([False, True, True, False, True])
    lp_full = (-torch.rand(5, 6, generator=torch.Generator().manual_seed(9)) * 3).requires_grad_(True)
    kw = dict(constructed_coef=0.7, clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1)
    full, _ = policy_loss(lp_full, old, adv, mask, is_constructed=cons, token_weights=weights, ref_logprobs=ref, **kw)
    full.backward()

    # global counts over the whole batch; response spans are [2,6) [1,4) [3,6) [2,5) [1,6) -> 4, 3, 3, 3, 5 tokens
    n_orig = (mask.bool() & ~cons[:, None]).sum()  # rows 0, 3: 4 + 3 = 7
    n_cons = (mask.bool() & cons[:, None]).sum()  # rows 1, 2, 4: 3 + 3 + 5 = 11
    assert (n_orig.item(), n_cons.item()) == (7, 11)
    lp_mb = lp_full.detach().clone().requires_grad_(True)
    total = torch.zeros(())
    for rows in (torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3, 4])):  # uneven split, one branch each
        loss, _ = policy_loss(lp_mb[rows], old[rows], adv[rows], mask[rows], is_constructed=cons[rows],
                              token_weights=weights[rows], ref_logprobs=ref[rows], num_original_tokens=n_orig,
                              num_constructed_tokens=n_cons, **kw)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp_mb.grad, lp_full.grad, rtol=1e-6, atol=1e-7)

    # local counts per micro-batch would NOT sum to the full-batch loss
    local = sum(
        policy_loss(lp_mb[r], old[r], adv[r], mask[r], is_constructed=cons[r], token_weights=weights[r],
                    ref_logprobs=ref[r], **kw)[0].item()
        for r in (torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([3, 4]))
    )
    assert abs(local - full.item()) > 1e-3


def test_zero_adv_fraction_and_empty_branch():
    lp = torch.zeros(2, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # only constructed rows: 5 constructed tokens, 4 of them with advantage 0; the original branch is empty -> 0
    loss, m = policy_loss(lp, lp, adv, mask, is_constructed=torch.tensor([True, True]), token_weights=None,
                          constructed_coef=1.0)
    assert m["zero_adv_frac/constructed"].item() == pytest.approx(0.8)
    assert m["loss/original"].item() == 0.0 and m["num_tokens/original"].item() == 0
    assert loss.item() == pytest.approx(-1.0 / 5)  # one token with A = 1, ratio 1 -> -1, over 5 tokens


def test_policy_loss_bad_args():
    logprobs, old, adv, mask, weights, cons = _two_by_three()
    base = dict(is_constructed=cons, token_weights=weights, constructed_coef=1.0)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        policy_loss(logprobs, old[:, :2], adv, mask, **base)
    with pytest.raises(ValueError, match="is_constructed must be bool"):
        policy_loss(logprobs, old, adv, mask, **{**base, "is_constructed": cons.long()})
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(logprobs, old, adv, mask, kl_coef=0.1, **base)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        policy_loss(logprobs, old, adv, mask, kl_estimator="k4", ref_logprobs=old, **base)
    with pytest.raises(ValueError, match="constructed_coef"):
        policy_loss(logprobs, old, adv, mask, **{**base, "constructed_coef": -1.0})
    with pytest.raises(ValueError, match="num_original_tokens"):
        policy_loss(logprobs, old, adv, mask, num_original_tokens=-3, **base)


def test_sft_loss():
    lp = torch.tensor([[0.0, -1.0, -2.0], [5.0, -3.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    assert sft_loss(lp, mask).item() == pytest.approx(2.0)  # -(-1 - 2 - 3) / 3
    loss = sft_loss(lp, mask, num_tokens=6)
    assert loss.item() == pytest.approx(1.0)  # global count 6
    loss.backward()
    torch.testing.assert_close(lp.grad, -mask / 6)


def test_policy_loss_registry():
    assert "ppo_clip" in list_policy_losses()
    assert get_policy_loss("ppo_clip") is policy_loss
    with pytest.raises(KeyError, match="registered: ppo_clip"):
        get_policy_loss("dpo")
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("ppo_clip")(policy_loss)
