"""Tests for shared/proposals.py: K, labels, TTA inversion, MC dropout, thresholds, reference, chunks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from shared.config import TTA_TRANSFORMS, ProposalConfig
from shared.proposals import ProposalSet, apply_tta, generate_proposals, iter_proposals, plain_inference

ALL_TTA = TTA_TRANSFORMS  # identity, hflip, vflip, hvflip, rot90, rot270


def _unet(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=1, dropout=dropout)


def _images(n=3, h=16, w=16, seed=0):
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


class Pointwise(torch.nn.Module):
    """logit = x - 0.5 per pixel: equivariant to every flip and rotation."""

    def forward(self, x):
        return x[:, :1] - 0.5


class RightNeighbour(torch.nn.Module):
    """logit = x[p] + x[p + right] - 1.5 on binary images: foreground iff a pixel and its right
    neighbour are both 1. Integer arithmetic, so the masks are exact; not flip-equivariant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0
            self.conv.weight[0, 0, 1, 2] = 1.0
            self.conv.bias.fill_(-1.5)

    def forward(self, x):
        return self.conv(x)


def test_k_labels_and_dtypes():
    cfg = ProposalConfig()  # 4 flips, 4 MC samples, 3 thresholds
    ps = generate_proposals(_unet(), _images(n=3), cfg, "cpu")
    assert ps.labels == (
        "tta:identity", "tta:hflip", "tta:vflip", "tta:hvflip",
        "mc:0", "mc:1", "mc:2", "mc:3",
        "thr:0.30", "thr:0.50", "thr:0.70",
    )
    assert ps.masks.shape == (3, 11, 16, 16) and ps.masks.dtype == torch.uint8
    assert set(ps.masks.unique().tolist()) <= {0, 1}
    assert ps.mean_prob.shape == (3, 16, 16) and ps.mean_prob.dtype == torch.float32
    assert float(ps.mean_prob.min()) >= 0 and float(ps.mean_prob.max()) <= 1
    assert ps.ref_logits.shape == (3, 1, 16, 16) and ps.ref_logits.dtype == torch.float32
    assert len(ps) == 3 and ps.k == 11


@pytest.mark.parametrize("h,w", [(12, 12), (10, 14)])
def test_equivariant_model_gives_identical_tta_masks(h, w):
    x = _images(n=2, h=h, w=w)
    cfg = ProposalConfig(tta=ALL_TTA, mc_samples=0, thresholds=(0.5,), batch_size=64)
    ps = generate_proposals(Pointwise(), x, cfg, "cpu")
    expected = (x[:, 0] > 0.5).to(torch.uint8)
    for k in range(len(ALL_TTA)):
        assert torch.equal(ps.masks[:, k], expected), ps.labels[k]
    torch.testing.assert_close(ps.mean_prob, torch.sigmoid(x[:, 0] - 0.5))


@pytest.mark.parametrize("name", ALL_TTA)
def test_tta_logits_are_mapped_back(name):
    # foreground iff the pixel and its right neighbour are 1, seen through the transform:
    # hflip sees the *left* neighbour, vflip the right one, rot90 the one below, etc.
    x = (torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    model = RightNeighbour()
    cfg = ProposalConfig(tta=(name,), mc_samples=0, thresholds=(), batch_size=8)
    ps = generate_proposals(model, x, cfg, "cpu")
    with torch.no_grad():
        expected = apply_tta(model(apply_tta(x, name)), name, inverse=True)[:, 0] > 0
    assert torch.equal(ps.masks[:, 0], expected.to(torch.uint8))
    if name == "hflip":  # spelled out: pixel and its left neighbour
        left = torch.zeros_like(x[:, 0], dtype=torch.bool)
        left[:, :, 1:] = (x[:, 0, :, 1:] > 0) & (x[:, 0, :, :-1] > 0)
        assert torch.equal(ps.masks[:, 0].bool(), left)


def test_apply_tta_inverse_roundtrip_and_unknown_name():
    x = torch.arange(2 * 3 * 5.0).view(1, 2, 3, 5)
    for name in ALL_TTA:
        assert torch.equal(apply_tta(apply_tta(x, name), name, inverse=True), x)
    with pytest.raises(ValueError, match="valid transforms: identity"):
        apply_tta(x, "rot45")


def test_ref_logits_equal_plain_eval_forward():
    model = _unet().train()
    x = _images(n=5)
    ps = generate_proposals(model, x, ProposalConfig(tta=("hflip",), batch_size=4), "cpu")
    model.eval()
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(ps.ref_logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_inference(model, x, "cpu", batch_size=2), expected, atol=1e-5, rtol=1e-5)


def test_mc_dropout_reproducible_and_diverse():
    model = _unet(dropout=0.3)
    x = _images(n=4)
    cfg = ProposalConfig(tta=(), mc_samples=3, thresholds=(), batch_size=6)
    rng_before = torch.get_rng_state()
    a = generate_proposals(model, x, cfg, "cpu", seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must be left untouched"
    b = generate_proposals(model, x, cfg, "cpu", seed=7)
    c = generate_proposals(model, x, cfg, "cpu", seed=8)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.mean_prob, b.mean_prob)
    assert not torch.equal(a.mean_prob, c.mean_prob)
    assert not torch.equal(a.masks[:, 0], a.masks[:, 1])


def test_mc_without_dropout_equals_identity_pass():
    ps = generate_proposals(_unet(dropout=0.0), _images(n=2), ProposalConfig(tta=("identity",), mc_samples=2, thresholds=()), "cpu")
    assert torch.equal(ps.masks[:, 1], ps.masks[:, 0]) and torch.equal(ps.masks[:, 2], ps.masks[:, 0])


def test_thresholds_are_nested_masks_of_the_mean():
    cfg = ProposalConfig(tta=("identity", "hflip"), mc_samples=2, thresholds=(0.3, 0.5, 0.7))
    ps = generate_proposals(_unet(), _images(n=3), cfg, "cpu")
    low, mid, high = ps.masks[:, 4], ps.masks[:, 5], ps.masks[:, 6]
    assert bool((high <= mid).all()) and bool((mid <= low).all())
    for k, t in zip((4, 5, 6), (0.3, 0.5, 0.7)):
        assert torch.equal(ps.masks[:, k], (ps.mean_prob > t).to(torch.uint8))


@pytest.mark.parametrize("chunk_size", [2, 3, 100])
def test_iter_proposals_chunks_concatenate_to_one_call(chunk_size):
    model = _unet(dropout=0.2)
    x = _images(n=5)
    cfg = ProposalConfig(tta=("identity", "hflip"), mc_samples=2, thresholds=(0.5,), batch_size=4)  # 2 images a batch
    whole = generate_proposals(model, x, cfg, "cpu", seed=3)
    chunks = list(iter_proposals(model, x, cfg, "cpu", chunk_size=chunk_size, seed=3))
    starts = [s for s, _ in chunks]
    assert starts == list(range(0, 5, max(2, chunk_size // 2 * 2)))
    joined = ProposalSet.concat([p for _, p in chunks])
    assert torch.equal(joined.masks, whole.masks)
    assert torch.equal(joined.mean_prob, whole.mean_prob)
    assert torch.equal(joined.ref_logits, whole.ref_logits)


@pytest.mark.parametrize("train", [True, False])
def test_model_mode_restored(train):
    model = _unet()
    model.train(train)
    flags = [m.training for m in model.modules()]
    generate_proposals(model, _images(n=2), ProposalConfig(), "cpu")
    plain_inference(model, _images(n=2), "cpu")
    assert [m.training for m in model.modules()] == flags


def test_index_returns_fresh_tensors():
    ps = generate_proposals(_unet(), _images(n=4), ProposalConfig(tta=("identity",), mc_samples=1, thresholds=(0.5,)), "cpu")
    for sel in (slice(1, 3), [1, 2], torch.tensor([False, True, True, False])):
        sub = ps.index(sel)
        assert torch.equal(sub.masks, ps.masks[1:3]) and sub.labels == ps.labels
        for name in ("masks", "mean_prob", "ref_logits"):
            assert getattr(sub, name).untyped_storage().data_ptr() != getattr(ps, name).untyped_storage().data_ptr()
    assert ps.index(2).masks.shape == (1, 3, 16, 16)


def test_bad_inputs_raise_with_shapes_and_options():
    model = _unet()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(1, 16, 16\)"):
        generate_proposals(model, torch.rand(1, 16, 16), ProposalConfig(), "cpu")
    with pytest.raises(ValueError, match="'rot45' is not one of identity, hflip"):
        generate_proposals(model, _images(), ProposalConfig(tta=("rot45",)), "cpu")
    with pytest.raises(ValueError, match="at least one pass"):
        generate_proposals(model, _images(), ProposalConfig(tta=(), mc_samples=0), "cpu")
    two_out = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\) logits.*\(1, 2, 16, 16\)"):
        generate_proposals(two_out, _images(n=1), ProposalConfig(tta=("identity",), mc_samples=0), "cpu")


def test_empty_split():
    ps = generate_proposals(_unet(), torch.zeros(0, 1, 16, 16), ProposalConfig(), "cpu")
    assert ps.masks.shape == (0, 11, 16, 16)
    assert list(iter_proposals(_unet(), torch.zeros(0, 1, 16, 16), ProposalConfig(), "cpu")) == []
