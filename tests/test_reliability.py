"""Tests for shared/reliability.py: Dice, pair accuracy / gain, Spearman, the report."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

from shared.config import MiningConfig
from shared.judges import OracleJudge
from shared.mining import mine_pairs
from shared.proposals import ProposalSet
from shared.config import AggregationConfig
from shared.ledger import EXCLUDED, TRUSTED, Ledger
from shared.reliability import (
    dice_scores,
    informative_pairs,
    informative_report,
    wilson_lower_bound,
    pair_accuracy,
    pair_gain,
    pairwise_overlaps,
    reliability_report,
    spearman,
)


def test_dice_by_hand():
    truth = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    truth[0, 0, 0] = 1  # 2 pixels; image 1 has an empty truth
    masks = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    masks[:, 0, 0] = 1  # the top row
    masks[:, 1] = 1  # everything
    # image 0: 2*2/(2+2) = 1, 2*2/(4+2) = 2/3, empty vs 2 px = 0
    # image 1: top row vs empty = 0, all vs empty = 0, empty vs empty = 1
    expected = torch.tensor([[1.0, 2 / 3, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(dice_scores(masks, truth), expected)
    torch.testing.assert_close(dice_scores(masks.bool(), truth[:, 0] * 255), expected)  # (N, H, W), any nonzero
    with pytest.raises(ValueError, match=r"truth has shape \(2, 1, 3, 3\) but masks \(2, 3, 2, 2\)"):
        dice_scores(masks, torch.zeros(2, 1, 3, 3))


def test_pairwise_overlaps_by_hand():
    masks = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    masks[0, 0] = 1
    masks[0, 1, 0] = 1
    inter, size = pairwise_overlaps(masks)
    assert size.tolist() == [[4, 2, 0]]
    assert inter[0].tolist() == [[4, 2, 0], [2, 2, 0], [0, 0, 0]]


def _graded(n=60, k=6, size=16, seed=0):
    """Proposal j misses 4*j of the truth's 64 pixels: Dice strictly falls with j (proposal order
    shuffled per image). Returns (ProposalSet, truth)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    truth[:, :, 4:12, 4:12] = 1
    inside = truth[0, 0].flatten().nonzero().flatten()
    masks = truth.repeat(1, k, 1, 1).clone()
    for i in range(n):
        perm = torch.randperm(k, generator=g)
        for j in range(k):
            masks[i, perm[j]].view(-1)[inside[torch.randperm(inside.numel(), generator=g)[: 4 * j]]] = 0
    ps = ProposalSet(masks=masks, mean_prob=masks.float().mean(1), ref_logits=torch.zeros(n, 1, size, size),
                     labels=tuple(f"p:{j}" for j in range(k)))
    return ps, truth


def _report(judge, strategy="top_bottom"):
    """``judge`` is an oracle template: bound to the truth here, as a round binds it to its split."""
    ps, truth = _graded()
    scores = judge.bind(truth).score(torch.zeros(len(ps), 1, 16, 16), ps)
    pairs = mine_pairs(scores, ps.masks, MiningConfig(strategy=strategy, max_pairs_per_image=3))
    return reliability_report(scores, dice_scores(ps.masks, truth), pairs)


@pytest.mark.parametrize("strategy", ["top_bottom", "gap", "skip_top", "top_random"])
def test_perfect_judge(strategy):
    report = _report(OracleJudge(), strategy)
    assert report["pair_accuracy"] == 1.0 and report["pair_gain"] > 0
    assert report["spearman"] == pytest.approx(1.0)
    assert report["n_images"] == 60 and report["n_pairs"] > 0 and report["n_ranked_images"] == 60


def test_adversarial_judge():
    report = _report(OracleJudge(invert=True))
    assert report["pair_accuracy"] == 0.0 and report["pair_gain"] < 0
    assert report["spearman"] == pytest.approx(-1.0)


def test_noisy_judge_lies_in_between():
    # Dice steps are about 0.03 apart, so noise of std 0.1 swaps many but not all orders
    report = _report(OracleJudge(noise_std=0.1, seed=0))
    assert 0.55 < report["pair_accuracy"] < 0.98
    assert 0.0 < report["spearman"] < 0.95
    flipped = _report(OracleJudge(flip_prob=0.5, seed=0))
    assert 0.2 < flipped["pair_accuracy"] < 0.8


def test_pair_accuracy_and_gain_by_hand():
    true_dice = torch.tensor([[0.9, 0.5, 0.5], [0.2, 0.8, 0.2]])
    pairs = torch.tensor([[0, 0, 1], [0, 1, 2], [1, 0, 1], [1, 1, 0]])
    # right, tie (1/2), wrong, right -> 2.5 / 4; gains 0.4, 0, -0.6, 0.6 -> 0.1
    assert pair_accuracy(true_dice, pairs) == pytest.approx(0.625)
    assert pair_gain(true_dice, pairs) == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"true_dice has shape \(2, 3\)"):
        pair_accuracy(true_dice, torch.tensor([[2, 0, 1]]))


def test_spearman_monotone_ties_and_constant_rows():
    true_dice = torch.tensor([[0.1, 0.4, 0.2, 0.9], [0.3, 0.1, 0.2, 0.5]])
    assert spearman(2 * true_dice + 1, true_dice) == pytest.approx(1.0)
    assert spearman(-true_dice, true_dice) == pytest.approx(-1.0)
    # ties get average ranks: x = [1, 2, 2, 3] vs y = [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5)
    x, y = torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman(x, y) == pytest.approx(spearmanr(x[0], y[0]).statistic)
    # a row with constant scores (or constant truth) is skipped, not averaged in as 0 or NaN
    scores = torch.stack([torch.ones(4), true_dice[1]])
    assert spearman(scores, true_dice) == pytest.approx(1.0)
    assert spearman(torch.ones(2, 4), true_dice) == 0.0


def test_random_rows_match_scipy():
    g = torch.Generator().manual_seed(0)
    scores, truth = torch.rand(8, 7, generator=g), torch.rand(8, 7, generator=g)
    truth[:, 3] = truth[:, 2]  # some ties
    expected = sum(spearmanr(scores[i], truth[i]).statistic for i in range(8)) / 8
    assert spearman(scores, truth) == pytest.approx(expected)


def test_zero_pairs_and_zero_images_are_nan_free():
    true_dice = torch.tensor([[0.5, 0.4]])
    report = reliability_report(torch.tensor([[1.0, 0.0]]), true_dice, torch.zeros(0, 3, dtype=torch.long))
    assert report == {"pair_accuracy": 0.5, "spearman": 1.0, "pair_gain": 0.0, "n_pairs": 0, "n_images": 1,
                      "n_ranked_images": 1}
    empty = reliability_report(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0, 3, dtype=torch.long))
    assert all(math.isfinite(v) for v in empty.values())
    assert empty["pair_accuracy"] == 0.5 and empty["n_pairs"] == 0 and empty["n_images"] == 0


# ----------------------------------------------------------------------------- informative pairs, Wilson bound


@pytest.mark.parametrize("successes, n, expected", [
    # p = 0.8, z^2 = 3.8416: (0.8 + 0.19208 - 1.96 sqrt(0.016 + 0.009604)) / 1.38416 = 0.67846 / 1.38416
    (8, 10, 0.4902),
    (80, 100, 0.7112),   # (0.8 + 0.019208 - 1.96 sqrt(0.0016 + 0.00009604)) / 1.038416
    (10, 10, 0.7225),    # p = 1: 1 / (1 + z^2 / n) = 1 / 1.38416
    (0, 10, 0.0),        # p = 0: centre and margin are both z^2 / 2n
    (0, 0, 0.0),         # no trials: no evidence, no trust
])
def test_wilson_lower_bound_by_hand(successes, n, expected):
    assert wilson_lower_bound(successes, n) == pytest.approx(expected, abs=5e-5)


def test_informative_pairs_by_hand():
    # image 0: proposal 3 is implausible; true Dice gaps 0.25 (0-1), 0.5 (0-2), 0.25 (1-2)
    true_dice = torch.tensor([[1.0, 0.75, 0.5, 0.875], [0.5, 0.5, 0.5, 0.5]])
    allowed = torch.tensor([[True, True, True, False], [True] * 4])
    assert informative_pairs(true_dice, allowed, 0.25).tolist() == [[0, 0, 1], [0, 0, 2], [0, 1, 2]]
    assert informative_pairs(true_dice, allowed, 0.3).tolist() == [[0, 0, 2]]  # image 1: all tied, none
    assert informative_pairs(true_dice, torch.ones(2, 4, dtype=torch.bool), 0.375).tolist() == [[0, 0, 2], [0, 3, 2]]
    with pytest.raises(ValueError, match="positive"):
        informative_pairs(true_dice, allowed, 0.0)


def test_informative_report_by_hand():
    true_dice = torch.tensor([[1.0, 0.75, 0.5, 0.875]])
    allowed = torch.tensor([[True, True, True, False]])
    # (0, 1): 3 > 1 right; (0, 2): 3 > 2 right; (1, 2): 1 < 2 wrong -> 2 / 3
    report = informative_report(torch.tensor([[3.0, 1.0, 2.0, 9.0]]), true_dice, allowed, 0.25)
    assert report["informative_pairs"] == 3
    assert report["informative_pair_accuracy"] == pytest.approx(2 / 3)
    # three pairs of one image: one unit; the site's bound is a trial a pair
    assert report["informative_units"] == 1
    assert report["informative_wilson"] == pytest.approx(wilson_lower_bound(2, 3))
    # a score tie counts one half: (0, 1) tied, the others right -> 2.5 / 3
    tie = informative_report(torch.tensor([[3.0, 3.0, 2.0, 9.0]]), true_dice, allowed, 0.25)
    assert tie["informative_pair_accuracy"] == pytest.approx(2.5 / 3)
    none = informative_report(torch.zeros(1, 4), torch.full((1, 4), 0.5), allowed, 0.25)
    assert none == {"informative_pairs": 0, "informative_pair_accuracy": 0.5, "informative_units": 0,
                    "informative_wilson": 0.0}


def test_the_bound_counts_groups_not_images_when_the_split_has_them():
    # 8 images, two informative pairs each (proposal 0 truly best); the judge is wrong on images 6-7
    true_dice = torch.tensor([[1.0, 0.5, 0.0]]).repeat(8, 1)
    allowed = torch.tensor([[True, True, False]]).repeat(8, 1)  # proposal 2 implausible: 1 pair an image
    allowed[:4, 2] = True  # images 0-3: three pairs each
    scores = torch.tensor([[1.0, 0.0, -1.0]] * 6 + [[0.0, 1.0, -1.0]] * 2)
    by_image = informative_report(scores, true_dice, allowed, 0.05)
    by_video = informative_report(scores, true_dice, allowed, 0.05, units=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    # 16 pairs, 14 right (images 0-3: 3 right each; 4-5: 1 each; 6-7: 0 of 1 each): 0.875
    assert by_image["informative_pairs"] == by_video["informative_pairs"] == 16
    assert by_image["informative_pair_accuracy"] == by_video["informative_pair_accuracy"] == 14 / 16
    # 8 images, 2 videos: the trials of the ledger's bound under bound_counts: units
    assert by_image["informative_units"] == 8 and by_video["informative_units"] == 2
    assert by_image["informative_wilson"] == by_video["informative_wilson"] == pytest.approx(wilson_lower_bound(14, 16))
    units = AggregationConfig(bound_counts="units")
    bounds = {}
    for name, report in (("image", by_image), ("video", by_video)):
        ledger = Ledger()
        ledger.record_reliability(name, 1, report, units)
        bounds[name] = ledger.site(name).bound()
    assert bounds["image"] == pytest.approx(wilson_lower_bound(0.875 * 8, 8))
    assert bounds["video"] == pytest.approx(wilson_lower_bound(0.875 * 2, 2))
    assert bounds["video"] < bounds["image"] < wilson_lower_bound(14, 16)
    with pytest.raises(ValueError, match="one entry per image"):
        informative_report(scores, true_dice, allowed, 0.05, units=torch.tensor([0, 1]))


def _inverted_on_informative(n_images=9):
    """A judge right on the trivial pairs, wrong on every informative one.

    Per image, true Dice of 5 proposals: 0.80, 0.60, 0.40, 0.41 and an empty mask (0.0, implausible).
    The judge ranks the empty mask last (right: top-vs-bottom mining picks it as rejected) and the
    near-tie 2-3 (Dice gap 0.01 < 0.05: trivial) either way, but orders 0 < 1 < 3 < 2: every pair of
    plausible proposals at least 0.05 apart (0-1, 0-2, 0-3, 1-2, 1-3) is inverted.
    """
    true_dice = torch.tensor([[0.80, 0.60, 0.40, 0.41, 0.0]]).repeat(n_images, 1)
    scores = torch.tensor([[0.2, 0.5, 0.8, 0.79, 0.0]]).repeat(n_images, 1)
    allowed = torch.tensor([[True, True, True, True, False]]).repeat(n_images, 1)
    masks = torch.zeros(n_images, 5, 4, 4, dtype=torch.uint8)
    for k in range(4):
        masks[:, k, : 4 - k] = 1  # distinct masks; proposal 4 empty
    return scores, true_dice, allowed, masks


def _ledger_figures(scores, true_dice, allowed, masks):
    """What a site reports: mined pairs (top-vs-bottom, every proposal a candidate) and informative pairs."""
    pairs = mine_pairs(scores, masks, MiningConfig())
    return reliability_report(scores, true_dice, pairs) | informative_report(scores, true_dice, allowed, 0.05)


def test_a_judge_inverted_on_informative_pairs_only_is_excluded():
    scores, true_dice, allowed, masks = _inverted_on_informative()
    figures = _ledger_figures(scores, true_dice, allowed, masks)
    assert figures["pair_accuracy"] == 1.0  # the mined pairs (best vs the empty mask) look perfect
    assert figures["informative_pairs"] == 45 and figures["informative_pair_accuracy"] == 0.0
    wilson, ema_point = Ledger(), Ledger()
    for r in (1, 2, 3):
        wilson.record_reliability("site", r, figures, AggregationConfig())
        ema_point.record_reliability("site", r, figures, AggregationConfig(statistic="ema_point"))
    assert wilson.site("site").state == EXCLUDED and wilson.factor("site") == 0.0
    assert ema_point.site("site").state == TRUSTED  # the old rule was fooled by the trivial pairs

    honest = _ledger_figures(true_dice, true_dice, allowed, masks)  # scores = true Dice
    ledger = Ledger()
    ledger.record_reliability("site", 1, honest, AggregationConfig())
    # 45 of 45 right: bound 1 / (1 + 3.8416 / 45) = 0.9213, factor (0.9213 - 0.5) / 0.5
    assert ledger.site("site").state == TRUSTED
    assert ledger.factor("site") == pytest.approx((0.9213 - 0.5) / 0.5, abs=1e-3)
    # with a trial an image (bound_counts: units) the 45 pairs of 9 images are 9 trials:
    # 1 / (1 + 3.8416 / 9) = 0.7009
    assert honest["informative_units"] == 9
    by_image = Ledger()
    by_image.record_reliability("site", 1, honest, AggregationConfig(bound_counts="units"))
    assert by_image.site("site").state == TRUSTED
    assert by_image.factor("site") == pytest.approx((0.7009 - 0.5) / 0.5, abs=1e-3)
