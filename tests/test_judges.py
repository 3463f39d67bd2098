"""Tests for shared/judges: oracle (noise, flips, inversion), agreement, uncertainty, build_judge."""

from __future__ import annotations

import math

import pytest
import torch

from shared.config import JudgeConfig
from shared.judges import AgreementJudge, Judge, OracleJudge, UncertaintyJudge, build_judge
from shared.proposals import ProposalSet
from shared.reliability import dice_scores


def _set(masks: torch.Tensor, mean_prob: torch.Tensor | None = None) -> ProposalSet:
    n, k, h, w = masks.shape
    if mean_prob is None:
        mean_prob = masks.float().mean(1)
    return ProposalSet(masks=masks.to(torch.uint8), mean_prob=mean_prob.float(),
                       ref_logits=torch.zeros(n, 1, h, w), labels=tuple(f"p:{i}" for i in range(k)))


def _graded(n=6, k=5, size=16, seed=0):
    """Truth is a square; proposal j drops 3*j of its pixels (at random), so Dice falls with j.
    The proposal order is shuffled per image. Returns (images, proposals, truth)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    truth[:, :, 4:12, 4:12] = 1
    masks = truth.repeat(1, k, 1, 1).clone()
    inside = truth[0, 0].flatten().nonzero().flatten()
    for i in range(n):
        perm = torch.randperm(k, generator=g)
        for j in range(k):
            drop = inside[torch.randperm(inside.numel(), generator=g)[: 3 * j]]
            masks[i, perm[j]].view(-1)[drop] = 0
    images = torch.rand(n, 1, size, size, generator=g)
    return images, _set(masks), truth


def test_oracle_zero_noise_is_true_dice():
    images, ps, truth = _graded()
    scores = OracleJudge().score(images, ps, truth)
    dice = dice_scores(ps.masks, truth)
    assert scores.shape == (6, 5) and scores.dtype == torch.float32
    assert torch.equal(scores, dice)
    assert torch.equal(scores.argsort(1), dice.argsort(1))


def test_oracle_invert_and_flip_all_negate():
    images, ps, truth = _graded()
    dice = dice_scores(ps.masks, truth)
    assert torch.equal(OracleJudge(invert=True).score(images, ps, truth), -dice)
    assert torch.equal(OracleJudge(flip_prob=1.0).score(images, ps, truth), -dice)
    assert torch.equal(OracleJudge(flip_prob=1.0, invert=True).score(images, ps, truth), dice)


def test_oracle_flip_prob_flips_some_images():
    images, ps, truth = _graded(n=40)
    dice = dice_scores(ps.masks, truth)
    scores = OracleJudge(flip_prob=0.5, seed=1).score(images, ps, truth)
    flipped = (scores == -dice).all(1)
    kept = (scores == dice).all(1)
    assert bool((flipped | kept).all()) and 5 < int(flipped.sum()) < 35


def test_oracle_noise_between_and_seeded():
    images, ps, truth = _graded(n=20)
    dice = dice_scores(ps.masks, truth)
    a = OracleJudge(noise_std=0.05, seed=3)
    first, second = a.score(images, ps, truth), a.score(images, ps, truth)
    assert not torch.equal(first, dice)
    assert 0.02 < float((first - dice).std()) < 0.08
    assert not torch.equal(first, second), "successive calls draw fresh noise"
    b = OracleJudge(noise_std=0.05, seed=3)
    assert torch.equal(b.score(images, ps, truth), first), "same seed, same calls, same scores"
    assert torch.equal(b.score(images, ps, truth, seed=11), a.score(images, ps, truth, seed=11))


def test_oracle_without_truth_raises_clearly():
    images, ps, _ = _graded()
    with pytest.raises(ValueError, match="oracle judge needs ground-truth masks: .*site 'north'"):
        OracleJudge(site="north").score(images, ps, None)


def test_agreement_hand_values_and_empty_masks():
    # A = 4 pixels, B = 2 of them, C = empty, D = empty.
    masks = torch.zeros(1, 4, 2, 2, dtype=torch.uint8)
    masks[0, 0] = 1
    masks[0, 1, 0] = 1
    # Dice(A,B) = 2*2/(4+2) = 2/3; Dice(A,C) = Dice(A,D) = Dice(B,C) = Dice(B,D) = 0; Dice(C,D) = 1
    scores = AgreementJudge().score(torch.zeros(1, 1, 2, 2), _set(masks))
    expected = torch.tensor([[2 / 9, 2 / 9, 1 / 3, 1 / 3]])
    torch.testing.assert_close(scores, expected)


def test_agreement_prefers_the_consensus():
    # horizontal bars shifted by -2, -1, 0, +1, +2 rows: the middle one overlaps the most
    masks = torch.zeros(2, 5, 16, 16, dtype=torch.uint8)
    for k, shift in enumerate((-2, -1, 0, 1, 2)):
        masks[:, k, 6 + shift : 10 + shift, 2:14] = 1
    masks[1] = masks[1, [3, 0, 4, 2, 1]]  # the consensus is now at index 3
    scores = AgreementJudge().score(torch.zeros(2, 1, 16, 16), _set(masks))
    assert scores[0].argmax() == 2 and scores[1].argmax() == 3


def test_uncertainty_prefers_the_mean_mask_over_its_complement():
    g = torch.Generator().manual_seed(0)
    mean_prob = torch.rand(3, 16, 16, generator=g)
    mask = (mean_prob > 0.5).to(torch.uint8)
    masks = torch.stack([1 - mask, mask, (torch.rand(3, 16, 16, generator=g) > 0.5).to(torch.uint8)], dim=1)
    scores = UncertaintyJudge().score(torch.zeros(3, 1, 16, 16), _set(masks, mean_prob))
    assert bool((scores.argmax(1) == 1).all()) and bool((scores.argmin(1) == 0).all())
    assert bool((scores <= 0).all())


def test_uncertainty_formula_by_hand():
    # q = [0.9, 0.5]: the 0.5 pixel has entropy 1 and weight 0, so the score is the
    # log-likelihood at the first pixel: log 0.9 for m = [1, *], log 0.1 for m = [0, *].
    mean_prob = torch.tensor([[[0.9, 0.5]]])
    masks = torch.tensor([[[[1, 0]], [[1, 1]], [[0, 1]]]], dtype=torch.uint8)
    w = 1 - (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2))
    expected = torch.tensor([[math.log(0.9), math.log(0.9), math.log(0.1)]]) * w / (w + 1e-6)
    scores = UncertaintyJudge().score(torch.zeros(1, 1, 1, 2), _set(masks, mean_prob))
    torch.testing.assert_close(scores, expected.float())


@pytest.mark.parametrize("judge", [AgreementJudge(), UncertaintyJudge(), OracleJudge()])
def test_judges_check_shapes(judge):
    images, ps, truth = _graded(n=3)
    assert isinstance(judge, Judge)
    with pytest.raises(ValueError, match=r"images have shape \(2, 1, 16, 16\).*\(3, 5, 16, 16\)"):
        judge.score(images[:2], ps, truth)
    out = judge.score(images, ps, truth)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_build_judge(tmp_path):
    assert isinstance(build_judge(JudgeConfig(kind="agreement"), tmp_path), AgreementJudge)
    assert isinstance(build_judge(JudgeConfig(kind="uncertainty"), tmp_path), UncertaintyJudge)
    oracle = build_judge(JudgeConfig(kind="oracle", noise_std=0.2, flip_prob=0.1, invert=True, seed=5), tmp_path)
    assert (oracle.noise_std, oracle.flip_prob, oracle.invert, oracle.seed) == (0.2, 0.1, True, 5)
    with pytest.raises(ValueError, match="not one of agreement, uncertainty, learned, oracle"):
        build_judge(JudgeConfig(kind="psychic"), tmp_path)
