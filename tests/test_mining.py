"""Tests for shared/mining.py: strategies on hand-built score tables, plausibility, filters, caps,
gathering, headroom, mine_split (the judge never sees the truth it is measured against)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from monai.networks.nets import UNet

from shared.config import MiningConfig, ProposalConfig
from shared.judges import AgreementJudge, OracleJudge, UncertaintyJudge
from shared.mining import MinedPairs, candidate_pairs, gather_pairs, headroom, mine_pairs, mine_split
from shared.proposals import ProposalSet, generate_proposals, plausible
from shared.reliability import dice_scores

# Two images, K = 4. Scores chosen exactly representable in binary floating point.
#   image 0: ranked 2 (0.75) > 0 (0.5) > 3 (0.25) > 1 (0.0)
#   image 1: ranked 1 (1.0)  > 3 (0.5) > 0 (0.375) > 2 (0.125)
SCORES = torch.tensor([[0.5, 0.0, 0.75, 0.25], [0.375, 1.0, 0.125, 0.5]])


def _distinct_masks(n=2, k=4, size=8):
    """Proposal j of every image covers rows 0..j (so every pair disagrees on whole rows)."""
    masks = torch.zeros(n, k, size, size, dtype=torch.uint8)
    for j in range(k):
        masks[:, j, : j + 1] = 1
    return masks


def _cfg(strategy, **kw):
    return MiningConfig(strategy=strategy, min_disagreement=0.0, **kw)


@pytest.mark.parametrize(
    "strategy,max_pairs,expected",
    [
        # best vs worst: image 0 -> (2, 1), image 1 -> (1, 2)
        ("top_bottom", 1, [[0, 2, 1], [1, 1, 2]]),
        ("top_bottom", 3, [[0, 2, 1], [1, 1, 2]]),  # one candidate per image whatever the cap
        # second best vs worst: image 0 -> (0, 1), image 1 -> (3, 2)
        ("skip_top", 1, [[0, 0, 1], [1, 3, 2]]),
        # largest gaps first. Image 0 gaps: (2,1) .75; (2,3) .5, (0,1) .5; then .25s. Equal gaps keep
        # the order of rank positions (0,1),(0,2),(0,3),(1,2),(1,3),(2,3): positions (0,2) = proposals
        # (2,3) come before positions (1,3) = proposals (0,1). Image 1: (1,2) .875, (1,0) .625, (1,3) .5.
        ("gap", 3, [[0, 2, 1], [0, 2, 3], [0, 0, 1], [1, 1, 2], [1, 1, 0], [1, 1, 3]]),
        ("gap", 1, [[0, 2, 1], [1, 1, 2]]),
    ],
)
def test_strategies_on_a_hand_built_table(strategy, max_pairs, expected):
    pairs = mine_pairs(SCORES, _distinct_masks(), _cfg(strategy, max_pairs_per_image=max_pairs))
    assert pairs.dtype == torch.long
    assert pairs.tolist() == expected


def test_top_random_best_vs_distinct_others_reproducibly():
    cfg = _cfg("top_random", max_pairs_per_image=3)
    a = mine_pairs(SCORES, _distinct_masks(), cfg, torch.Generator().manual_seed(4))
    b = mine_pairs(SCORES, _distinct_masks(), cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert a[a[:, 0] == 0, 1].tolist() == [2, 2, 2] and sorted(a[a[:, 0] == 0, 2].tolist()) == [0, 1, 3]
    assert a[a[:, 0] == 1, 1].tolist() == [1, 1, 1] and sorted(a[a[:, 0] == 1, 2].tolist()) == [0, 2, 3]
    one = mine_pairs(SCORES, _distinct_masks(), _cfg("top_random"), torch.Generator().manual_seed(4))
    assert one.tolist() == a[[0, 3]].tolist()  # the cap keeps each image's first random candidate
    draws = {tuple(mine_pairs(SCORES, _distinct_masks(), _cfg("top_random"), torch.Generator().manual_seed(s))[0].tolist())
             for s in range(20)}
    assert len(draws) > 1


def test_empty_disagreement_pair_is_dropped():
    masks = _distinct_masks()
    masks[0, 1] = masks[0, 2]  # image 0's best (2) and worst (1) are the same mask
    pairs = mine_pairs(SCORES, masks, _cfg("top_bottom"))
    assert pairs.tolist() == [[1, 1, 2]]
    # gap mining skips that pair and moves on to the next candidates of image 0
    pairs = mine_pairs(SCORES, masks, _cfg("gap", max_pairs_per_image=2))
    assert pairs.tolist() == [[0, 2, 3], [0, 0, 1], [1, 1, 2], [1, 1, 0]]


def test_min_gap_filter_and_zero_gap():
    # image 0 best-worst gap 0.75, image 1 gap 0.875
    assert mine_pairs(SCORES, _distinct_masks(), _cfg("top_bottom", min_gap=0.8)).tolist() == [[1, 1, 2]]
    assert mine_pairs(SCORES, _distinct_masks(), _cfg("top_bottom", min_gap=0.75)).tolist() == [[0, 2, 1], [1, 1, 2]]
    # gap mining with min_gap 0.5: image 0 keeps (2,1), (2,3), (0,1)
    pairs = mine_pairs(SCORES, _distinct_masks(), _cfg("gap", min_gap=0.5, max_pairs_per_image=10))
    assert pairs[pairs[:, 0] == 0].tolist() == [[0, 2, 1], [0, 2, 3], [0, 0, 1]]
    # a tie carries no preference: all-equal scores give no pair even with min_gap 0
    assert mine_pairs(torch.zeros(2, 4), _distinct_masks(), _cfg("top_bottom")).shape == (0, 3)


def test_ties_are_broken_by_index():
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # best of the tied top = lowest index (0); worst of the tied bottom = highest index (3)
    assert mine_pairs(scores, _distinct_masks(n=1), _cfg("top_bottom")).tolist() == [[0, 0, 3]]
    assert mine_pairs(scores, _distinct_masks(n=1), _cfg("skip_top")).tolist() == [[0, 1, 3]]


def test_min_disagreement_filter():
    # 8x8 = 64 pixels; proposals j and j+1 differ on one row = 8 pixels = 0.125
    masks = _distinct_masks(n=1)
    scores = torch.tensor([[0.0, 1.0, 0.5, 0.25]])  # best 1, worst 0: they differ on 8 px
    cfg = MiningConfig(strategy="top_bottom", min_disagreement=0.125)
    assert mine_pairs(scores, masks, cfg).tolist() == [[0, 1, 0]]
    cfg = MiningConfig(strategy="top_bottom", min_disagreement=0.13)
    assert mine_pairs(scores, masks, cfg).shape == (0, 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"scores \(2, 3\) must be \(N, K\) for masks .*\(2, 4, 8, 8\)"):
        mine_pairs(SCORES[:, :3], _distinct_masks(), _cfg("top_bottom"))
    bad = SCORES.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf for images \[1\]"):
        mine_pairs(bad, _distinct_masks(), _cfg("top_bottom"))
    with pytest.raises(ValueError, match="not one of top_bottom, top_random, gap, skip_top"):
        mine_pairs(SCORES, _distinct_masks(), MiningConfig(strategy="best"))


def _proposal_set(n=3, k=4, size=8):
    masks = _distinct_masks(n, k, size)
    ref = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return ProposalSet(masks=masks, mean_prob=masks.float().mean(1), ref_logits=ref,
                       labels=tuple(f"p:{j}" for j in range(k)))


def test_gather_pairs_with_offset_and_fresh_tensors():
    ps = _proposal_set()
    scores = torch.tensor([[0.0, 1.0, 0.5, 0.25]]).repeat(3, 1)
    pairs = torch.tensor([[0, 1, 0], [2, 3, 2], [2, 1, 0]])
    mp = gather_pairs(ps, pairs, offset=10, scores=scores)
    assert len(mp) == 3 and mp.image_index.tolist() == [10, 12, 12]
    assert torch.equal(mp.chosen[1, 0], ps.masks[2, 3]) and torch.equal(mp.rejected[1, 0], ps.masks[2, 2])
    assert mp.chosen.shape == (3, 1, 8, 8) and mp.chosen.dtype == torch.uint8
    assert torch.equal(mp.ref_logits[1], ps.ref_logits[2]) and mp.ref_logits.dtype == torch.float32
    torch.testing.assert_close(mp.score_gap, torch.tensor([1.0, -0.25, 1.0]))
    assert mp.chosen_k.tolist() == [1, 3, 1] and mp.rejected_k.tolist() == [0, 2, 0]
    torch.testing.assert_close(mp.disagreement_fraction(), torch.tensor([8 / 64, 8 / 64, 8 / 64]))
    for name in ("chosen", "rejected"):
        assert getattr(mp, name).untyped_storage().data_ptr() != ps.masks.untyped_storage().data_ptr()
    assert mp.ref_logits.untyped_storage().data_ptr() != ps.ref_logits.untyped_storage().data_ptr()
    assert torch.isnan(gather_pairs(ps, pairs).score_gap).all()  # no scores: gap unknown
    with pytest.raises(ValueError, match=r"proposals up to 7.*\(3, 4, 8, 8\)"):
        gather_pairs(ps, torch.tensor([[0, 7, 1]]))


def test_mined_pairs_concat_subset_empty():
    ps = _proposal_set()
    a = gather_pairs(ps, torch.tensor([[0, 1, 0]]), offset=0)
    b = gather_pairs(ps, torch.tensor([[1, 2, 0], [2, 3, 0]]), offset=3)
    both = MinedPairs.concat([a, MinedPairs.empty(8, 8), b])
    assert len(both) == 3 and both.image_index.tolist() == [0, 4, 5]
    sub = both.subset([2, 0])
    assert sub.image_index.tolist() == [5, 0] and torch.equal(sub.chosen[0], both.chosen[2])
    assert len(MinedPairs.empty(8, 8)) == 0 and MinedPairs.empty(8, 8).disagreement_fraction().shape == (0,)
    with pytest.raises(ValueError, match=r"size \(4, 4\), part 0 of size \(8, 8\)"):
        MinedPairs.concat([a, MinedPairs.empty(4, 4)])


def _tiny_unet():
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(8, 16, 32), strides=(2, 2),
                num_res_units=1, dropout=0.1)


def test_mine_split_end_to_end_and_chunking():
    model = _tiny_unet()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 16, 16, generator=g)
    truth = (torch.rand(6, 1, 16, 16, generator=g) > 0.6).to(torch.uint8)
    cfg_p = ProposalConfig(tta=("identity", "hflip"), mc_samples=2, thresholds=(0.3, 0.5), batch_size=4)
    cfg_m = MiningConfig(strategy="gap", max_pairs_per_image=2, min_disagreement=0.0)
    small, stats = mine_split(model, images, OracleJudge(truth=truth), cfg_m, cfg_p, "cpu", truth=truth, chunk_size=2)
    whole, _ = mine_split(model, images, OracleJudge(truth=truth), cfg_m, cfg_p, "cpu", truth=truth, chunk_size=64)
    assert 0 < len(small) <= 12
    for name in ("image_index", "chosen", "rejected", "ref_logits", "score_gap"):
        assert torch.equal(getattr(small, name), getattr(whole, name)), name
    assert int(small.image_index.max()) >= 4  # later chunks are offset into the split
    assert stats["images"] == 6 and stats["proposals_per_image"] == 6 and stats["pairs"] == len(small)
    assert stats["pair_accuracy"] == 1.0 and stats["pair_gain"] > 0  # a perfect judge
    assert stats["dice_pick"] == stats["dice_best"] and stats["implausible_fraction"] == 0.0
    assert 0 < stats["disagreement_q50"] <= 1 and stats["score_gap_mean"] > 0
    assert all(isinstance(v, (int, float)) for v in stats.values())


def test_mine_split_without_truth_and_no_pairs():
    model = _tiny_unet()
    images = torch.rand(3, 1, 16, 16)
    cfg_p = ProposalConfig(tta=("identity",), mc_samples=0, thresholds=(0.5,))
    # a 100% disagreement floor drops everything: stats stay finite
    pairs, stats = mine_split(model, images, AgreementJudge(), MiningConfig(min_disagreement=1.0), cfg_p, "cpu")
    assert len(pairs) == 0 and pairs.chosen.shape == (0, 1, 16, 16)
    assert stats["pairs"] == 0 and stats["score_gap_mean"] == 0.0 and "pair_accuracy" not in stats
    assert stats["implausible_fraction"] == 0.0 and "dice_best" not in stats
    # an oracle must be bound before it reaches mine_split: the truth given to mine_split is for measuring only
    with pytest.raises(ValueError, match="holds no ground truth: bind it"):
        mine_split(model, images, OracleJudge(), MiningConfig(), cfg_p, "cpu")
    with pytest.raises(ValueError, match="holds no ground truth: bind it"):
        mine_split(model, images, OracleJudge(), MiningConfig(), cfg_p, "cpu", truth=torch.zeros(3, 1, 16, 16))


# ----------------------------------------------------------------------------- plausibility, top_identity, headroom

# image 0: proposal 1 (its worst) is implausible; image 1: proposal 2 (its worst) is
ALLOWED = torch.tensor([[True, False, True, True], [True, True, False, True]])


@pytest.mark.parametrize(
    "strategy,allowed,expected",
    [
        # the worst *allowed* proposal is rejected: image 0 ranks 2 > 0 > 3 (> 1), image 1 ranks 1 > 3 > 0 (> 2)
        ("top_bottom", ALLOWED, [[0, 2, 3], [1, 1, 0]]),
        ("skip_top", ALLOWED, [[0, 0, 3], [1, 3, 0]]),
        # the best of image 0 is implausible: the best allowed is chosen
        ("top_bottom", torch.tensor([[True, True, False, True], [True] * 4]), [[0, 0, 1], [1, 1, 2]]),
        # gap among the allowed only. Image 0: (2,3) .5, (2,0) .25, (0,3) .25; image 1: (1,0) .625, (1,3) .5, (3,0) .125
        ("gap", ALLOWED, [[0, 2, 3], [0, 2, 0], [0, 0, 3], [1, 1, 0], [1, 1, 3], [1, 3, 0]]),
        # an image with no plausible proposal gives no pair
        ("top_bottom", torch.tensor([[False] * 4, [True] * 4]), [[1, 1, 2]]),
    ],
)
def test_implausible_proposals_are_never_chosen_or_rejected(strategy, allowed, expected):
    pairs = mine_pairs(SCORES, _distinct_masks(), _cfg(strategy, max_pairs_per_image=10), allowed=allowed)
    assert pairs.tolist() == expected
    assert bool(allowed[pairs[:, 0], pairs[:, 1]].all()) and bool(allowed[pairs[:, 0], pairs[:, 2]].all())


def test_top_random_with_allowed_skips_implausible_candidates():
    for seed in range(10):
        pairs = mine_pairs(SCORES, _distinct_masks(), _cfg("top_random", max_pairs_per_image=3),
                           torch.Generator().manual_seed(seed), allowed=ALLOWED)
        assert sorted(pairs.tolist()) == [[0, 2, 0], [0, 2, 3], [1, 1, 0], [1, 1, 3]]


def test_top_identity_pairs_the_best_with_the_identity():
    cfg = _cfg("top_identity", max_pairs_per_image=3)
    assert mine_pairs(SCORES, _distinct_masks(), cfg, identity=0).tolist() == [[0, 2, 0], [1, 1, 0]]
    # image 0's best is the identity itself: no pair there
    assert mine_pairs(SCORES, _distinct_masks(), cfg, identity=2).tolist() == [[1, 1, 2]]
    # the identity always counts as plausible; an implausible best gives way to the best allowed
    no_identity = torch.tensor([[False, True, True, True]] * 2)
    assert mine_pairs(SCORES, _distinct_masks(), cfg, allowed=no_identity, identity=0).tolist() == [[0, 2, 0], [1, 1, 0]]
    best_out = torch.tensor([[True, True, False, True], [True] * 4])  # image 0: the best allowed is 0, the identity
    assert mine_pairs(SCORES, _distinct_masks(), cfg, allowed=best_out, identity=0).tolist() == [[1, 1, 0]]
    assert candidate_pairs(SCORES, "top_identity", identity=3).tolist() == [[[2, 3]], [[1, 3]]]
    with pytest.raises(ValueError, match="top_identity needs the identity proposal"):
        mine_pairs(SCORES, _distinct_masks(), cfg)


def test_headroom_by_hand():
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.8, 0.3], [0.1, 0.2, 0.3]])
    true_dice = torch.tensor([[0.6, 0.9, 0.7], [0.5, 0.4, 0.8], [0.3, 0.2, 0.1]])
    allowed = torch.tensor([[True, False, True], [True, True, True], [False, False, False]])
    identity_dice = torch.tensor([0.55, 0.45, 0.2])
    pairs = torch.tensor([[0, 0, 2], [1, 2, 0], [1, 1, 0]])
    figures = headroom(scores, true_dice, allowed, identity_dice, pairs)
    # identity: (.55 + .45 + .2) / 3. best allowed: .7 (not the implausible .9), .8, and .3 where none is allowed.
    # pick (top score among the allowed): proposal 0 (.6), 1 (.4), 2 (.1). chosen: .6, .8, .4
    # chosen over identity, pair by pair: .6 - .55, .8 - .45, .4 - .45
    assert figures == pytest.approx({"dice_identity": 0.4, "dice_best": 0.6, "dice_pick": 1.1 / 3, "dice_chosen": 0.6,
                                     "chosen_over_identity": 0.35 / 3})
    no_pairs = headroom(scores, true_dice, allowed, identity_dice, torch.zeros(0, 3, dtype=torch.long))
    assert no_pairs["dice_chosen"] == 0.0 and no_pairs["chosen_over_identity"] == 0.0
    assert no_pairs["dice_best"] == pytest.approx(0.6)
    empty = headroom(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool), torch.zeros(0),
                     torch.zeros(0, 3, dtype=torch.long))
    assert set(empty) == set(figures) and all(v == 0.0 for v in empty.values())


# ----------------------------------------------------------------------------- mine_split: truth, oracle, plausibility


class _Recording:
    """Wraps a judge and keeps what it was given and what it returned, chunk by chunk."""

    def __init__(self, judge):
        self.judge, self.name, self.calls = judge, judge.name, []

    def score(self, images, proposals):
        scores = self.judge.score(images, proposals)
        self.calls.append((proposals.positions.clone(), proposals.masks.clone(), scores.clone()))
        return scores


def _split(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g)
    truth = (torch.rand(n, 1, size, size, generator=g) > 0.6).to(torch.uint8)
    return images, truth


SPLIT_PROPOSALS = ProposalConfig(tta=("identity", "hflip"), mc_samples=2, thresholds=(0.3, 0.5), batch_size=4)


def _same_pairs(a: MinedPairs, b: MinedPairs) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("image_index", "chosen", "rejected", "ref_logits",
                                                                 "score_gap", "chosen_k", "rejected_k"))


@pytest.mark.parametrize("judge", [AgreementJudge, UncertaintyJudge])
def test_a_label_free_judge_is_blind_to_the_truth(judge):
    """The real truth, a scrambled one (masks moved to other images) or none: the judge scores
    and mining pairs the same; only the measured figures change."""
    model = _tiny_unet()
    images, truth = _split()
    cfg_m = MiningConfig(strategy="gap", max_pairs_per_image=2, min_disagreement=0.0)
    runs = {}
    for name, given in (("real", truth), ("scrambled", truth.roll(1, dims=0)), ("none", None)):
        recording = _Recording(judge())
        runs[name] = (*mine_split(model, images, recording, cfg_m, SPLIT_PROPOSALS, "cpu", truth=given, chunk_size=2),
                      recording.calls)
    real, scrambled, none = runs["real"], runs["scrambled"], runs["none"]
    assert len(real[0]) > 0 and len(real[2]) == 3  # three chunks of two images
    for other in (scrambled, none):
        assert _same_pairs(real[0], other[0])
        assert all(torch.equal(a[2], b[2]) for a, b in zip(real[2], other[2], strict=True))
    assert real[1]["dice_best"] != scrambled[1]["dice_best"]  # the truth did reach the measurements
    assert "pair_accuracy" not in none[1]


def test_a_bound_oracle_ranks_by_true_dice_chunk_by_chunk():
    """The oracle looks its rows up by the chunk's positions: chunks of 2 score as one chunk of 6."""
    model = _tiny_unet()
    images, truth = _split()
    cfg_m = MiningConfig(strategy="gap", max_pairs_per_image=2, min_disagreement=0.0)
    chunked = _Recording(OracleJudge().bind(truth))
    small, stats = mine_split(model, images, chunked, cfg_m, SPLIT_PROPOSALS, "cpu", truth=truth, chunk_size=2)
    whole, _ = mine_split(model, images, OracleJudge().bind(truth), cfg_m, SPLIT_PROPOSALS, "cpu", truth=truth)
    assert [c[0].tolist() for c in chunked.calls] == [[0, 1], [2, 3], [4, 5]]
    for positions, masks, scores in chunked.calls:
        assert torch.equal(scores, dice_scores(masks, truth[positions]))
    assert len(small) > 0 and _same_pairs(small, whole)
    assert stats["pair_accuracy"] == 1.0 and stats["spearman"] == pytest.approx(1.0)
    assert stats["dice_pick"] == stats["dice_best"] >= stats["dice_chosen"] > 0
    # bound to other masks, it ranks by those, whatever truth mine_split measures against
    other = truth.roll(1, dims=0)
    misled = _Recording(OracleJudge().bind(other))
    wrong, figures = mine_split(model, images, misled, cfg_m, SPLIT_PROPOSALS, "cpu", truth=truth, chunk_size=2)
    for positions, masks, scores in misled.calls:
        assert torch.equal(scores, dice_scores(masks, other[positions]))
    assert not _same_pairs(wrong, small) and figures["spearman"] < 0.9


@pytest.mark.parametrize("strategy", ["top_bottom", "gap"])
def test_mine_split_never_pairs_an_implausible_proposal(strategy):
    model = _tiny_unet()
    images, truth = _split()
    cfg_p = ProposalConfig(tta=("hflip", "identity"), mc_samples=2, thresholds=(0.3, 0.5, 0.7), batch_size=4)
    cfg_m = MiningConfig(strategy=strategy, max_pairs_per_image=20, min_disagreement=0.0)
    free, free_stats = mine_split(model, images, AgreementJudge(), cfg_m, cfg_p, "cpu", chunk_size=2)
    strict = dataclasses.replace(cfg_p, max_area_ratio=1.2)
    pairs, stats = mine_split(model, images, AgreementJudge(), cfg_m, strict, "cpu", truth=truth, chunk_size=2)
    allowed = plausible(generate_proposals(model, images, strict, "cpu"), 1.2)
    allowed[:, 1] = True  # the identity pass always counts
    fraction = float((~allowed).double().mean())
    assert fraction > 0 and stats["implausible_fraction"] == pytest.approx(fraction)
    assert free_stats["implausible_fraction"] == 0.0
    assert len(pairs) > 0
    assert bool(allowed[pairs.image_index, pairs.chosen_k].all()) and bool(allowed[pairs.image_index, pairs.rejected_k].all())
    touched = ~allowed[free.image_index, free.chosen_k] | ~allowed[free.image_index, free.rejected_k]
    assert bool(touched.any())  # without the filter, some pair does use an implausible proposal


def test_mine_split_top_identity_rejects_the_identity_pass():
    model = _tiny_unet()
    images, truth = _split()
    cfg_p = ProposalConfig(tta=("hflip", "identity"), mc_samples=2, thresholds=(0.3, 0.5), batch_size=4)
    pairs, stats = mine_split(model, images, OracleJudge(truth=truth), _cfg("top_identity"), cfg_p, "cpu", truth=truth)
    assert len(pairs) > 0 and set(pairs.rejected_k.tolist()) == {1}
    assert stats["pair_accuracy"] == 1.0 and stats["dice_chosen"] > stats["dice_identity"]
