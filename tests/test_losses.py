"""Tests for shared/losses.py: the maths of DESIGN.md section 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from shared.losses import (
    _pair_margin,
    dpo_loss,
    entropy_loss,
    mask_log_likelihood,
    preference_stats,
    rn_dpo_loss,
    supervised_loss,
)

LOSSES = {"dpo": dpo_loss, "rn_dpo": rn_dpo_loss}


def _random_pairs(p=3, h=16, w=16, dtype=torch.float64, mask_dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pol = torch.randn(p, 1, h, w, generator=g, dtype=torch.float64).mul(3).to(dtype)
    ref = torch.randn(p, 1, h, w, generator=g, dtype=torch.float64).mul(3).to(dtype)
    chosen = (torch.rand(p, 1, h, w, generator=g) > 0.5).to(mask_dtype)
    rejected = (torch.rand(p, 1, h, w, generator=g) > 0.5).to(mask_dtype)
    return pol, ref, chosen, rejected


def _naive_ll(z, m):
    """Full-mask Bernoulli log-likelihood, written independently of the module."""
    m = m.to(z.dtype)
    return (m * F.logsigmoid(z) + (1 - m) * F.logsigmoid(-z)).sum(dim=(1, 2, 3))


def _naive_margin(pol, ref, chosen, rejected):
    """[ll_pol(m+) - ll_pol(m-)] - [ll_ref(m+) - ll_ref(m-)] over every pixel."""
    return (_naive_ll(pol, chosen) - _naive_ll(pol, rejected)) - (_naive_ll(ref, chosen) - _naive_ll(ref, rejected))


# --- the margin -------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agreement_pixels_cancel(mask_dtype, seed):
    pol, ref, chosen, rejected = _random_pairs(p=4, mask_dtype=mask_dtype, seed=seed)
    h, n = _pair_margin(pol, ref, chosen, rejected)
    assert h.dtype == n.dtype == torch.float64
    torch.testing.assert_close(h, _naive_margin(pol, ref, chosen, rejected), rtol=1e-12, atol=1e-10)
    # the same through the public mask_log_likelihood
    ll = mask_log_likelihood
    via_ll = (ll(pol, chosen) - ll(pol, rejected)) - (ll(ref, chosen) - ll(ref, rejected))
    torch.testing.assert_close(h, via_ll, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(n, (chosen != rejected).sum(dim=(1, 2, 3)).double())


def test_margin_ignores_non_finite_logits_outside_d():
    # agreement pixels are selected out, not multiplied by 0 (0 * inf would be NaN)
    pol = torch.tensor([[[[1.0, float("inf")]]]])
    ref = torch.tensor([[[[0.0, float("inf")]]]])
    chosen = torch.tensor([[[[1, 1]]]], dtype=torch.uint8)
    rejected = torch.tensor([[[[0, 1]]]], dtype=torch.uint8)
    h, n = _pair_margin(pol, ref, chosen, rejected)
    assert h.item() == 1.0 and n.item() == 1.0


# --- hand-derived values ----------------------------------------------------------------

# Each case: one pair of 4 pixels given as (chosen, rejected, delta = z - z_ref), beta,
# expected DPO and RN-DPO losses; -logsigmoid(x) = log(1 + exp(-x)).
HAND_CASES = [
    # one pixel in D, s=+1, delta 1, beta 2: h=1, |D|=1 -> both -logsigmoid(2) = log(1+e^-2) = 0.126928
    ([1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], 2.0, 0.126928, 0.126928),
    # two such pixels: h=2, |D|=2 -> dpo -logsigmoid(4) = log(1+e^-4) = 0.018150, rn -logsigmoid(2) = 0.126928
    ([1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], 2.0, 0.018150, 0.126928),
    # one pixel, s=-1 (chosen 0, rejected 1), delta 1: h=-1 -> -logsigmoid(-2) = log(1+e^2) = 2.126928
    ([0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], 2.0, 2.126928, 2.126928),
    # s=+1 and s=-1 with equal delta cancel: h=0 -> log 2 = 0.693147
    ([1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], 2.0, 0.693147, 0.693147),
    # an agreement pixel (both 1) with delta 5 does not count: h=1, |D|=1 -> 0.126928
    ([1, 1, 0, 0], [0, 1, 0, 0], [1, 5, 0, 0], 2.0, 0.126928, 0.126928),
    # four pixels s=+1, delta 2, beta 0.5: h=8, |D|=4 -> dpo -logsigmoid(4) = 0.018150,
    # rn -logsigmoid(0.5*8/4) = log(1+e^-1) = 0.313262
    ([1, 1, 1, 1], [0, 0, 0, 0], [2, 2, 2, 2], 0.5, 0.018150, 0.313262),
]


@pytest.mark.parametrize("chosen,rejected,delta,beta,exp_dpo,exp_rn", HAND_CASES)
def test_hand_derived_values(chosen, rejected, delta, beta, exp_dpo, exp_rn):
    ref = torch.tensor([0.3, -1.2, 2.0, 0.0]).view(1, 1, 2, 2)
    pol = ref + torch.tensor(delta, dtype=torch.float32).view(1, 1, 2, 2)
    c = torch.tensor(chosen, dtype=torch.uint8).view(1, 1, 2, 2)
    r = torch.tensor(rejected, dtype=torch.uint8).view(1, 1, 2, 2)
    assert dpo_loss(pol, ref, c, r, beta).item() == pytest.approx(exp_dpo, abs=1e-6)
    assert rn_dpo_loss(pol, ref, c, r, beta).item() == pytest.approx(exp_rn, abs=1e-6)


@pytest.mark.parametrize(
    "z,mask,expected",
    [
        # z=0: every pixel has probability 1/2 -> 4 * log(0.5) = -2.772589
        (0.0, 1, 4 * math.log(0.5)),
        (0.0, 0, 4 * math.log(0.5)),
        # z=log 3: sigmoid = 0.75 -> mask 1: 4 log 0.75 = -1.150728; mask 0: 4 log 0.25 = -5.545177
        (math.log(3), 1, 4 * math.log(0.75)),
        (math.log(3), 0, 4 * math.log(0.25)),
    ],
)
def test_mask_log_likelihood_values(z, mask, expected):
    logits = torch.full((1, 1, 2, 2), z, dtype=torch.float64)
    m = torch.full((1, 1, 2, 2), mask, dtype=torch.uint8)
    out = mask_log_likelihood(logits, m)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, abs=1e-12)


# --- RN-DPO scale invariance ------------------------------------------------------------


def _base_pair():
    """An 8x8 pair: random logits, a 3x2 disagreement patch of mixed sign, agreement elsewhere."""
    g = torch.Generator().manual_seed(7)
    pol = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    ref = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    chosen = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    rejected = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    chosen[..., 2:5, 3:5] = 1
    rejected[..., 2:5, 4:6] = 1  # D = columns 3 (s=+1) and 5 (s=-1) of rows 2..4: |D| = 6
    chosen[..., 0, 0] = rejected[..., 0, 0] = 1  # an agreement foreground pixel
    return pol, ref, chosen, rejected


def _tile(t, k):
    """Replicate the whole 8x8 pair k times along the width."""
    return torch.cat([t] * k, dim=-1)


def _scatter(t, k):
    """Copy the 8x8 pair into k disjoint slots of a 32x32 canvas of agreement (zero masks, zero logits)."""
    out = torch.zeros(1, 1, 32, 32, dtype=t.dtype)
    for i in range(k):
        r, c = divmod(i, 4)
        out[..., 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = t
    return out


@pytest.mark.parametrize("replicate", [_tile, _scatter], ids=["tile", "scatter"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_rn_dpo_scale_invariance(replicate, k):
    beta = 1.5
    base = _base_pair()
    big = tuple(replicate(t, k) for t in base)

    def loss_and_mass(fn, pol, ref, c, r):
        pol = pol.clone().requires_grad_(True)
        loss = fn(pol, ref, c, r, beta, reduction="sum")
        loss.backward()
        return loss.detach(), pol.grad.abs().sum()

    loss_1, mass_1 = loss_and_mass(rn_dpo_loss, *base)
    loss_k, mass_k = loss_and_mass(rn_dpo_loss, *big)
    torch.testing.assert_close(loss_k, loss_1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass_k, mass_1, rtol=1e-12, atol=1e-12)
    # total push of one pair: |D| pixels of beta * sigmoid(-beta h/|D|) / |D| each
    h_1, n_1 = _pair_margin(*base)
    assert mass_1.item() == pytest.approx(beta * torch.sigmoid(-beta * h_1 / n_1).item(), rel=1e-12)

    h_k, n_k = _pair_margin(*big)
    torch.testing.assert_close(h_k, k * h_1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n_k, k * n_1)
    # plain DPO sees a k-fold margin, so its loss changes
    assert h_1.item() != 0
    assert not torch.isclose(dpo_loss(*big, beta), dpo_loss(*base, beta))


# --- empty disagreement region ----------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("fill", [0, 1])
def test_empty_disagreement_is_log2_with_zero_grad(name, fill):
    pol, ref, _, _ = _random_pairs(p=1, dtype=torch.float32)
    mask = torch.full_like(pol, fill, dtype=torch.uint8)
    pol.requires_grad_(True)
    loss = LOSSES[name](pol, ref, mask, mask.clone(), beta=2.0)
    loss.backward()
    # h = 0 -> -logsigmoid(0) = log 2
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(pol.grad, torch.zeros_like(pol))


@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_pair_in_batch_stays_finite(name):
    pol, ref, chosen, rejected = _random_pairs(p=4, dtype=torch.float32)
    rejected[2] = chosen[2]
    pol.requires_grad_(True)
    per_pair = LOSSES[name](pol, ref, chosen, rejected, beta=2.0, reduction="none")
    per_pair.mean().backward()
    assert torch.isfinite(per_pair).all()
    assert torch.isfinite(pol.grad).all()
    assert per_pair[2].item() == pytest.approx(math.log(2), abs=1e-7)
    assert torch.equal(pol.grad[2], torch.zeros_like(pol.grad[2]))
    assert pol.grad[0].abs().sum() > 0


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,beta", [("rn_dpo", 2.0), ("rn_dpo", 0.5), ("dpo", 0.05)])
def test_gradient_matches_naive_formula(name, beta, seed):
    pol, ref, chosen, rejected = _random_pairs(p=3, dtype=torch.float64, seed=seed)
    n = (chosen != rejected).sum(dim=(1, 2, 3)).double() if name == "rn_dpo" else 1.0

    pol_a = pol.clone().requires_grad_(True)
    LOSSES[name](pol_a, ref, chosen, rejected, beta, reduction="sum").backward()

    pol_b = pol.clone().requires_grad_(True)
    naive = -F.logsigmoid(beta * _naive_margin(pol_b, ref, chosen, rejected) / n).sum()
    naive.backward()
    torch.testing.assert_close(pol_a.grad, pol_b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,beta", [("rn_dpo", 2.0), ("rn_dpo", 0.7), ("dpo", 0.05)])
def test_gradient_closed_form(name, beta):
    pol, ref, chosen, rejected = _random_pairs(p=1, dtype=torch.float64, seed=3)
    pol.requires_grad_(True)
    LOSSES[name](pol, ref, chosen, rejected, beta, reduction="sum").backward()

    in_d = chosen != rejected
    s = torch.where(chosen.bool(), 1.0, -1.0).double()
    h = (s * (pol.detach() - ref))[in_d].sum()
    scale = in_d.sum().double() if name == "rn_dpo" else torch.tensor(1.0, dtype=torch.float64)
    # d/dz_p [-logsigmoid(beta h / |D|)] = -beta sigmoid(-beta h/|D|) s_p / |D| on D, 0 elsewhere
    expected = torch.where(in_d, -beta * torch.sigmoid(-beta * h / scale) * s / scale, 0.0)
    assert in_d.any() and (~in_d).any()
    torch.testing.assert_close(pol.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name):
    pol, ref, chosen, rejected = _random_pairs(p=2, h=3, w=4, dtype=torch.float64, seed=4)
    pol.requires_grad_(True)
    ref.requires_grad_(True)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(
            lambda z, zr: LOSSES[name](z, zr, chosen, rejected, 0.8, reduction=reduction), (pol, ref)
        )


# --- precision --------------------------------------------------------------------------


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_low_precision_logits_give_float32_loss(low, name):
    pol, ref, chosen, rejected = _random_pairs(p=2, dtype=torch.float32)
    pol_low, ref_low = pol.to(low).requires_grad_(True), ref.to(low)
    loss = LOSSES[name](pol_low, ref_low, chosen, rejected, 0.5, reduction="none")
    assert loss.dtype == torch.float32
    # same value as float32 on the (rounded) low-precision inputs
    expected = LOSSES[name](pol_low.detach().float(), ref_low.float(), chosen, rejected, 0.5, reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert pol_low.grad.dtype == low and torch.isfinite(pol_low.grad.float()).all()


@pytest.mark.parametrize(
    "in_dtype,out_dtype",
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
)
def test_output_dtypes(in_dtype, out_dtype):
    pol, ref, chosen, rejected = _random_pairs(p=2, dtype=in_dtype)
    assert mask_log_likelihood(pol, chosen).dtype == out_dtype
    assert entropy_loss(pol).dtype == out_dtype
    for fn in LOSSES.values():
        assert fn(pol, ref, chosen, rejected, 1.0).dtype == out_dtype


# --- reductions and validation ----------------------------------------------------------


@pytest.mark.parametrize("name", list(LOSSES))
def test_reductions(name):
    args = _random_pairs(p=5, dtype=torch.float64)
    none = LOSSES[name](*args, 0.3, reduction="none")
    assert none.shape == (5,)
    torch.testing.assert_close(LOSSES[name](*args, 0.3, reduction="sum"), none.sum())
    torch.testing.assert_close(LOSSES[name](*args, 0.3, reduction="mean"), none.mean())
    torch.testing.assert_close(LOSSES[name](*args, 0.3), none.mean())  # default is mean


def _pairs_of_shape(shape):
    return torch.zeros(shape), torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize(
    "shapes,match",
    [
        # policy_logits, ref_logits, chosen, rejected
        ([(2, 8, 8)] * 4, r"policy_logits must have shape \(P, 1, H, W\), got \(2, 8, 8\)"),
        ([(2, 3, 8, 8)] * 4, r"policy_logits must have shape \(P, 1, H, W\), got \(2, 3, 8, 8\)"),
        ([(0, 1, 8, 8)] * 4, r"at least one pair"),
        ([(2, 1, 8, 8), (2, 1, 8, 4), (2, 1, 8, 8), (2, 1, 8, 8)],
         r"ref_logits has shape \(2, 1, 8, 4\) but policy_logits has shape \(2, 1, 8, 8\)"),
        ([(2, 1, 8, 8), (2, 1, 8, 8), (2, 1, 16, 16), (2, 1, 8, 8)],
         r"chosen has shape \(2, 1, 16, 16\) but policy_logits has shape \(2, 1, 8, 8\)"),
        ([(2, 1, 8, 8), (2, 1, 8, 8), (2, 1, 8, 8), (3, 1, 8, 8)],
         r"rejected has shape \(3, 1, 8, 8\) but policy_logits has shape \(2, 1, 8, 8\)"),
    ],
)
def test_bad_shapes_raise(name, shapes, match):
    tensors = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        LOSSES[name](*tensors, beta=1.0)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta_raises(name, beta):
    with pytest.raises(ValueError, match="beta must be a positive"):
        LOSSES[name](*_pairs_of_shape((1, 1, 4, 4)), beta=beta)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["avg", "Mean", None, ""])
def test_bad_reduction_raises(name, reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\)"):
        LOSSES[name](*_pairs_of_shape((1, 1, 4, 4)), beta=1.0, reduction=reduction)


def test_mask_log_likelihood_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"mask has shape \(1, 1, 4, 3\) but logits has shape \(1, 1, 4, 4\)"):
        mask_log_likelihood(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 3))


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="chosen must be a torch.Tensor"):
        rn_dpo_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), [[0, 1]], torch.zeros(1, 1, 2, 2), 1.0)


# --- logging stats, supervised and entropy losses --------------------------------------


def test_preference_stats_hand_values():
    # pair 0: one pixel s=+1, delta 1 -> h=1, |D|=1 of 4; pair 1: two pixels s=-1, delta 1 -> h=-2, |D|=2
    # norm margins 1 and -1 -> mean 0; d_frac (1/4 + 2/4)/2 = 0.375; reward_acc 1/2
    ref = torch.zeros(2, 1, 2, 2)
    pol = torch.ones(2, 1, 2, 2, requires_grad=True)
    chosen = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.uint8).view(2, 1, 2, 2)
    rejected = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.uint8).view(2, 1, 2, 2)
    stats = preference_stats(pol, ref, chosen, rejected)
    assert stats == pytest.approx({"norm_margin": 0.0, "d_frac": 0.375, "reward_acc": 0.5})
    assert all(type(v) is float for v in stats.values())


def test_supervised_loss():
    loss_fn = supervised_loss()
    assert isinstance(loss_fn, DiceCELoss)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    good = supervised_loss()(torch.where(target > 0, 10.0, -10.0), target)
    bad = supervised_loss()(torch.where(target > 0, -10.0, 10.0), target)
    assert good.ndim == 0 and good.item() < 0.01 < 1.0 < bad.item()


@pytest.mark.parametrize(
    "z,expected",
    [
        (0.0, math.log(2)),  # p = 1/2: entropy log 2 = 0.693147
        # z = log 3: p = 3/4: -(0.75 log 0.75 + 0.25 log 0.25) = 0.562335
        (math.log(3), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
        (-math.log(3), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
        (200.0, 0.0),  # saturated: no NaN from log 0
    ],
)
def test_entropy_loss_values(z, expected):
    out = entropy_loss(torch.full((2, 1, 4, 4), z, dtype=torch.float16 if abs(z) < 100 else torch.float32))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, abs=2e-3)
