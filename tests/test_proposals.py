"""Tests for shared/proposals.py: K, labels, TTA inversion, MC dropout, thresholds (of the mean or of
the identity pass), morphological variants, pass maps and sources, plausibility, reference, chunks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from shared.config import TTA_TRANSFORMS, ProposalConfig
from shared.proposals import (
    ProposalSet,
    apply_tta,
    generate_proposals,
    iter_proposals,
    plain_inference,
    plausible,
    proposal_labels,
    proposal_sources,
)

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
    cfg = ProposalConfig()  # 4 flips, 4 MC samples, 2 thresholds of the identity pass's map
    ps = generate_proposals(_unet(), _images(n=3), cfg, "cpu")
    assert ps.labels == (
        "tta:identity", "tta:hflip", "tta:vflip", "tta:hvflip",
        "mc:0", "mc:1", "mc:2", "mc:3",
        "thr:0.30", "thr:0.70",
    )
    assert ps.sources == (0, 1, 2, 3, 4, 5, 6, 7, 0, 0)  # the thresholds are made from the identity pass
    ps = generate_proposals(_unet(), _images(n=3), ProposalConfig(thresholds=(0.3, 0.5, 0.7), threshold_of="mean"), "cpu")
    assert ps.labels[8:] == ("thr:0.30", "thr:0.50", "thr:0.70") and ps.sources[8:] == (-1, -1, -1)
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
    ps = generate_proposals(model, x, ProposalConfig(tta=("hflip",), threshold_of="mean", batch_size=4), "cpu")
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


def test_mc_sample_draws_one_dropout_mask_shared_by_the_batch():
    """A lone nn.Dropout(0.5) on an all-ones image: logit 2 where kept (mask 1), 0 where dropped
    (sigmoid 0.5, mask 0), so each MC mask is the keep mask itself. One mask per sample, the same
    for every image of the batch, a different one for the next sample and the next batch."""
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    x = torch.ones(4, 1, 16, 16)
    cfg = ProposalConfig(tta=("identity",), mc_samples=3, thresholds=(), batch_size=6)  # 2 images a batch
    ps = generate_proposals(model, x, cfg, "cpu", seed=1)
    mc = ps.masks[:, 1:4].bool()  # (image, sample, h, w)
    assert torch.equal(ps.masks[:, 0], torch.ones(4, 16, 16, dtype=torch.uint8))  # eval pass: dropout off
    assert torch.equal(mc[0], mc[1]) and torch.equal(mc[2], mc[3])  # shared within a batch
    assert not torch.equal(mc[0], mc[2])  # a new draw for the next batch
    assert not torch.equal(mc[0, 0], mc[0, 1])  # and for each sample
    assert 0.35 < mc.float().mean() < 0.65
    assert torch.allclose(ps.pass_probs[:, 1:4].float().max(), torch.sigmoid(torch.tensor(2.0)), atol=1e-3)


def test_mc_without_dropout_equals_identity_pass():
    ps = generate_proposals(_unet(dropout=0.0), _images(n=2), ProposalConfig(tta=("identity",), mc_samples=2, thresholds=()), "cpu")
    assert torch.equal(ps.masks[:, 1], ps.masks[:, 0]) and torch.equal(ps.masks[:, 2], ps.masks[:, 0])


def test_thresholds_are_nested_masks_of_the_mean():
    cfg = ProposalConfig(tta=("identity", "hflip"), mc_samples=2, thresholds=(0.3, 0.5, 0.7), threshold_of="mean")
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
    assert torch.equal(joined.pass_probs, whole.pass_probs) and joined.sources == whole.sources
    # each chunk knows where its images sit in the split
    for start, part in chunks:
        assert part.positions.tolist() == list(range(start, start + len(part)))
    assert joined.positions.tolist() == whole.positions.tolist() == [0, 1, 2, 3, 4]


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
    sub = ps.index([3, 1])
    assert sub.positions.tolist() == [3, 1] and sub.sources == ps.sources
    assert torch.equal(sub.pass_probs, ps.pass_probs[[3, 1]])


def test_bad_inputs_raise_with_shapes_and_options():
    model = _unet()
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(1, 16, 16\)"):
        generate_proposals(model, torch.rand(1, 16, 16), ProposalConfig(), "cpu")
    with pytest.raises(ValueError, match="'rot45' is not one of identity, hflip"):
        generate_proposals(model, _images(), ProposalConfig(tta=("rot45",)), "cpu")
    with pytest.raises(ValueError, match="at least one pass"):
        generate_proposals(model, _images(), ProposalConfig(tta=(), mc_samples=0), "cpu")
    with pytest.raises(ValueError, match="list identity in proposals.tta"):
        generate_proposals(model, _images(), ProposalConfig(tta=("hflip",), morph=(1,)), "cpu")
    with pytest.raises(ValueError, match="list identity in proposals.tta"):
        generate_proposals(model, _images(), ProposalConfig(tta=("hflip",), threshold_of="identity"), "cpu")
    two_out = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\) logits.*\(1, 2, 16, 16\)"):
        generate_proposals(two_out, _images(n=1), ProposalConfig(tta=("identity",), mc_samples=0), "cpu")


def test_empty_split():
    ps = generate_proposals(_unet(), torch.zeros(0, 1, 16, 16), ProposalConfig(), "cpu")
    assert ps.masks.shape == (0, 10, 16, 16)  # 4 flips, 4 MC samples, 2 thresholds of the identity pass
    assert ps.sources == (0, 1, 2, 3, 4, 5, 6, 7, 0, 0) and ps.positions.shape == (0,)
    assert list(iter_proposals(_unet(), torch.zeros(0, 1, 16, 16), ProposalConfig(), "cpu")) == []


# ----------------------------------------------------------------------------- pass maps, sources, morph, plausibility


def test_pass_maps_sources_and_positions_are_filled():
    cfg = ProposalConfig(tta=("hflip", "identity"), mc_samples=2, thresholds=(0.3, 0.5), threshold_of="mean", morph=(1,))
    ps = generate_proposals(_unet(), _images(n=3), cfg, "cpu")
    assert ps.n_passes == 4 and ps.pass_probs.shape == (3, 4, 16, 16) and ps.pass_probs.dtype == torch.float16
    assert ps.positions.tolist() == [0, 1, 2] and ps.positions.dtype == torch.int64
    assert ps.sources == proposal_sources(cfg) == (0, 1, 2, 3, -1, -1, 1)
    # the maps are the passes' probabilities: their mean is mean_prob, the identity map the reference's
    torch.testing.assert_close(ps.pass_probs.float().mean(1), ps.mean_prob, atol=2e-3, rtol=0)
    torch.testing.assert_close(ps.pass_probs[:, 1].float(), torch.sigmoid(ps.ref_logits[:, 0]), atol=1e-3, rtol=0)
    confident = (ps.pass_probs.float() - 0.5).abs() > 1e-2
    assert torch.equal(ps.masks[:, :4].bool()[confident], (ps.pass_probs.float() > 0.5)[confident])


def test_proposal_sources_and_labels_by_hand():
    cfg = ProposalConfig(tta=("hflip", "identity"), mc_samples=2, thresholds=(0.3, 0.5), threshold_of="mean",
                         morph=(1, -1))
    assert proposal_labels(cfg) == ("tta:hflip", "tta:identity", "mc:0", "mc:1", "thr:0.30", "thr:0.50",
                                    "morph:+1", "morph:-1")
    assert proposal_sources(cfg) == (0, 1, 2, 3, -1, -1, 1, 1)
    assert proposal_sources(ProposalConfig(tta=("hflip", "identity"), mc_samples=1, thresholds=(0.5,),
                                           threshold_of="identity")) == (0, 1, 2, 1)
    # the default cuts the identity pass's map: its thresholds' source is the identity pass, wherever it sits
    assert proposal_sources(ProposalConfig(tta=("hflip", "identity"), mc_samples=1)) == (0, 1, 2, 1, 1)


def test_threshold_of_identity_cuts_the_identity_pass():
    cfg = ProposalConfig(tta=("hflip", "identity"), mc_samples=2, thresholds=(0.3, 0.5, 0.7), threshold_of="identity")
    ps = generate_proposals(_unet(), _images(n=3), cfg, "cpu")
    identity_prob = torch.sigmoid(ps.ref_logits[:, 0])
    for k, t in zip((4, 5, 6), (0.3, 0.5, 0.7)):
        assert torch.equal(ps.masks[:, k], (identity_prob > t).to(torch.uint8)), t
    assert not torch.equal(ps.masks[:, 4], (ps.mean_prob > 0.3).to(torch.uint8))  # not the mean's
    assert torch.equal(ps.masks[:, 5], ps.masks[:, 1])  # the identity pass's own mask
    assert ps.sources[4:] == (1, 1, 1)


def test_morph_variants_of_a_known_square():
    """Pointwise model: the identity mask is the 4 x 4 square of the image (rows and columns 3..6)."""
    x = torch.zeros(1, 1, 10, 10)
    x[..., 3:7, 3:7] = 1
    cfg = ProposalConfig(tta=("identity",), mc_samples=0, thresholds=(), morph=(1, 2, -1, -2, 0))
    ps = generate_proposals(Pointwise(), x, cfg, "cpu")
    assert ps.labels == ("tta:identity", "morph:+1", "morph:+2", "morph:-1", "morph:-2", "morph:+0")
    expected = torch.zeros(5, 10, 10, dtype=torch.uint8)
    expected[0, 2:8, 2:8] = 1  # dilated by 1: 6 x 6
    expected[1, 1:9, 1:9] = 1  # by 2: 8 x 8
    expected[2, 4:6, 4:6] = 1  # eroded by 1: 2 x 2
    # eroded by 2: nothing left
    expected[4] = x[0, 0].to(torch.uint8)  # radius 0: the mask itself
    assert torch.equal(ps.masks[0, 1:], expected)
    assert ps.sources == (0, 0, 0, 0, 0, 0)


def test_morph_variants_are_max_pool_dilations_and_erosions():
    cfg = ProposalConfig(tta=("identity", "hflip"), mc_samples=1, thresholds=(0.5,), morph=(1, -1))
    ps = generate_proposals(_unet(), _images(n=3), cfg, "cpu")
    identity, dilated, eroded = ps.masks[:, 0], ps.masks[:, 4], ps.masks[:, 5]
    assert ps.labels[4:] == ("morph:+1", "morph:-1")
    assert bool((eroded <= identity).all()) and bool((identity <= dilated).all())
    assert not torch.equal(eroded, identity) and not torch.equal(identity, dilated)
    m = identity.unsqueeze(1).float()
    grown = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)[:, 0] > 0.5
    shrunk = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)[:, 0] > 0.5
    assert torch.equal(dilated.bool(), grown) and torch.equal(eroded.bool(), shrunk)


def _plausibility_set(masks: torch.Tensor, mean_prob: torch.Tensor) -> ProposalSet:
    n, k, h, w = masks.shape
    return ProposalSet(masks=masks.to(torch.uint8), mean_prob=mean_prob, ref_logits=torch.zeros(n, 1, h, w),
                       labels=tuple(f"p:{i}" for i in range(k)))


def test_plausible_flags_frame_covering_and_empty_masks():
    # consensus (mean_prob > 0.5): a 4 x 4 square, 16 of 100 pixels
    mean_prob = torch.full((1, 10, 10), 0.1)
    mean_prob[:, 3:7, 3:7] = 0.9
    masks = torch.zeros(1, 5, 10, 10)
    masks[0, 0] = 1  # the whole frame: 100 pixels
    # masks[0, 1]: empty
    masks[0, 2, 3:7, 3:8] = 1  # near-consensus: 20 pixels
    masks[0, 3, 3:7, 3:7] = 1  # the consensus
    masks[0, 4, 0, :8] = 1  # 8 pixels: 16 / 2, the lower bound itself
    ps = _plausibility_set(masks, mean_prob)
    # ratio 2: areas from 8 to 32 pass
    assert plausible(ps, 2.0).tolist() == [[False, False, True, True, True]]
    assert plausible(ps, 1.2).tolist() == [[False, False, False, True, False]]  # 20 > 19.2, 8 < 13.3
    assert plausible(ps, None).tolist() == [[True] * 5]
    assert plausible(ps, None).dtype == torch.bool


def test_plausible_with_an_empty_consensus_uses_one_percent_of_the_image():
    # nothing above 0.5: the upper bound is ratio * 1 % of the 100 pixels = 2 pixels at ratio 2
    masks = torch.zeros(1, 3, 10, 10)
    masks[0, 1, 0, :2] = 1
    masks[0, 2, 0, :3] = 1
    ps = _plausibility_set(masks, torch.full((1, 10, 10), 0.2))
    assert plausible(ps, 2.0).tolist() == [[True, True, False]]


def test_proposal_set_checks_the_new_fields():
    base = dict(masks=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), mean_prob=torch.zeros(2, 4, 4),
                ref_logits=torch.zeros(2, 1, 4, 4), labels=("a", "b", "c"))
    assert ProposalSet(**base).positions.tolist() == [0, 1] and ProposalSet(**base).n_passes == 0
    with pytest.raises(ValueError, match=r"positions has shape \(3,\), expected \(2,\)"):
        ProposalSet(**base, positions=torch.arange(3))
    with pytest.raises(ValueError, match="2 sources for K = 3"):
        ProposalSet(**base, sources=(0, 1))
    with pytest.raises(ValueError, match=r"pass_probs has shape \(2, 4, 4, 4\)"):
        ProposalSet(**base, pass_probs=torch.zeros(2, 4, 4, 4, dtype=torch.float16))
    ok = ProposalSet(**base, pass_probs=torch.zeros(2, 2, 4, 4, dtype=torch.float16), sources=(0, 1, -1))
    assert ok.n_passes == 2 and ok.sources == (0, 1, -1)
    # concat of a set with pass maps and one without keeps none
    assert ProposalSet.concat([ok, ProposalSet(**base)]).pass_probs is None
    assert ProposalSet.concat([ok, ProposalSet(**base)]).sources is None
    with pytest.raises(ValueError, match="disagree on the proposals' sources"):
        ProposalSet.concat([ok, ProposalSet(**base, sources=(0, 0, -1))])
