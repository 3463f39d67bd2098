"""Tests for shared/judges: oracle (binding, noise, flips, inversion), agreement and uncertainty
(leave-one-out over the passes), build_judge. No judge's ``score`` takes ground truth."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from shared.config import JudgeConfig
from shared.judges import AgreementJudge, Judge, OracleJudge, UncertaintyJudge, build_judge, check_inputs
from shared.judges.learned import LearnedJudge
from shared.judges.oracle import bind_to
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
    scores = OracleJudge(truth=truth).score(images, ps)
    dice = dice_scores(ps.masks, truth)
    assert scores.shape == (6, 5) and scores.dtype == torch.float32
    assert torch.equal(scores, dice)
    assert torch.equal(scores.argsort(1), dice.argsort(1))
    assert torch.equal(OracleJudge().bind(truth).score(images, ps), dice)


def test_oracle_invert_and_flip_all_negate():
    images, ps, truth = _graded()
    dice = dice_scores(ps.masks, truth)
    assert torch.equal(OracleJudge(invert=True, truth=truth).score(images, ps), -dice)
    assert torch.equal(OracleJudge(flip_prob=1.0, truth=truth).score(images, ps), -dice)
    assert torch.equal(OracleJudge(flip_prob=1.0, invert=True, truth=truth).score(images, ps), dice)


def test_oracle_flip_prob_flips_some_images():
    images, ps, truth = _graded(n=40)
    dice = dice_scores(ps.masks, truth)
    scores = OracleJudge(flip_prob=0.5, seed=1, truth=truth).score(images, ps)
    flipped = (scores == -dice).all(1)
    kept = (scores == dice).all(1)
    assert bool((flipped | kept).all()) and 5 < int(flipped.sum()) < 35


def test_oracle_noise_between_and_seeded():
    images, ps, truth = _graded(n=20)
    dice = dice_scores(ps.masks, truth)
    a = OracleJudge(noise_std=0.05, seed=3, truth=truth)
    first, second = a.score(images, ps), a.score(images, ps)
    assert not torch.equal(first, dice)
    assert 0.02 < float((first - dice).std()) < 0.08
    assert not torch.equal(first, second), "successive calls draw fresh noise"
    b = OracleJudge(noise_std=0.05, seed=3, truth=truth)
    assert torch.equal(b.score(images, ps), first), "same seed, same calls, same scores"
    assert torch.equal(b.score(images, ps, seed=11), a.score(images, ps, seed=11))


def test_oracle_without_truth_raises_clearly():
    images, ps, _ = _graded()
    with pytest.raises(ValueError, match="oracle judge needs ground-truth masks: .*site 'north'"):
        OracleJudge(site="north").bind(None)
    with pytest.raises(ValueError, match="holds no ground truth: bind it"):
        OracleJudge(site="north").score(images, ps)
    with pytest.raises(ValueError, match=r"truth must be \(N, 1, H, W\) masks, got \(6, 16, 16\)"):
        OracleJudge(truth=torch.zeros(6, 16, 16, dtype=torch.uint8))


def test_oracle_bind_seeds_from_the_template_and_its_bind_count():
    images, ps, truth = _graded(n=10)
    template = OracleJudge(noise_std=0.1, seed=4, site="north")
    first, second = template.bind(truth), template.bind(truth)
    assert template.truth is None and template.binds == 2 and template.calls == 0  # the template never scores
    assert first.truth is truth and (first.noise_std, first.site, first.binds, first.calls) == (0.1, "north", 0, 0)
    first_scores = first.score(images, ps)
    assert first.seed != second.seed and not torch.equal(first_scores, second.score(images, ps))
    # the same settings and bind count give the same bound oracle; another seed another one
    replay = OracleJudge(noise_std=0.1, seed=4)
    assert torch.equal(replay.bind(truth).score(images, ps), first_scores)
    assert replay.bind(truth).seed == second.seed
    assert OracleJudge(noise_std=0.1, seed=5).bind(truth).seed != first.seed


def test_oracle_looks_up_rows_by_position():
    """A chunk of images 3 and 1 of a split of 5: the oracle scores them against rows 3 and 1."""
    images, ps, _ = _graded(n=5)
    truth = torch.zeros(5, 1, 16, 16, dtype=torch.uint8)
    for i in range(5):
        truth[i, :, 2 + 2 * i : 8 + 2 * i, 4:12] = 1  # a different square per image
    oracle = OracleJudge(truth=truth)
    chunk = ps.index([3, 1])
    assert chunk.positions.tolist() == [3, 1]  # index keeps each image's position in the split
    expected = dice_scores(chunk.masks, truth[[3, 1]])
    assert torch.equal(oracle.score(images[[3, 1]], chunk), expected)
    assert not torch.equal(expected, dice_scores(chunk.masks, truth[:2]))  # the lookup matters
    chunk.positions = torch.tensor([5, 1])  # past the end of the split it holds
    with pytest.raises(ValueError, match=r"images 1\.\.5.*not of the split this oracle holds \(masks \(5, 1, 16, 16\)\)"):
        oracle.score(images[[3, 1]], chunk)
    chunk.positions = torch.tensor([-1, 1])  # before its start: the same clear error, not an IndexError
    with pytest.raises(ValueError, match=r"images -1\.\.1.*not of the split this oracle holds"):
        oracle.score(images[[3, 1]], chunk)


def test_bind_to_binds_oracles_only():
    _, _, truth = _graded(n=3)
    bound = bind_to(OracleJudge(noise_std=0.2), truth)
    assert isinstance(bound, OracleJudge) and bound.truth is truth and bound.noise_std == 0.2
    for judge in (AgreementJudge(), UncertaintyJudge()):
        assert bind_to(judge, truth) is judge and bind_to(judge, None) is judge
    with pytest.raises(ValueError, match="needs ground-truth masks"):
        bind_to(OracleJudge(), None)


@pytest.mark.parametrize("judge", [AgreementJudge, UncertaintyJudge, OracleJudge, LearnedJudge])
def test_no_judge_score_takes_truth(judge):
    params = list(inspect.signature(judge.score).parameters)
    assert params[:3] == ["self", "images", "proposals"] and "truth" not in params


def test_check_inputs_takes_no_truth():
    assert list(inspect.signature(check_inputs).parameters) == ["images", "proposals"]
    images, ps, _ = _graded(n=3)
    check_inputs(images, ps)
    check_inputs(None, ps)  # judges that do not look at the image
    with pytest.raises(ValueError, match=r"images have shape \(2, 1, 16, 16\).*expected \(3, C, 16, 16\)"):
        check_inputs(images[:2], ps)


def test_oracle_names_an_empty_chunk_of_another_size_clearly():
    images, ps, truth = _graded(n=3)
    empty = ps.index([])
    assert OracleJudge(truth=truth).score(images[:0], empty).shape == (0, 5)
    small = OracleJudge(truth=truth[..., :8, :8])
    with pytest.raises(ValueError, match=r"images none, size \(16, 16\)\) are not of the split this oracle holds"):
        small.score(images[:0], empty)


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


def _with_passes(pass_probs: torch.Tensor, extra: torch.Tensor, sources) -> ProposalSet:
    """P raw passes (masks ``pass_probs > 0.5``) followed by ``extra`` masks, with per-pass maps."""
    n, passes, h, w = pass_probs.shape
    masks = torch.cat([(pass_probs > 0.5), extra.bool()], dim=1).to(torch.uint8)
    return ProposalSet(masks=masks, mean_prob=pass_probs.float().mean(1), ref_logits=torch.zeros(n, 1, h, w),
                       labels=tuple(f"p:{i}" for i in range(masks.shape[1])), pass_probs=pass_probs.half(),
                       sources=sources)


def _loglik(q: torch.Tensor, m: torch.Tensor, eps: float = 1e-4) -> float:
    """The uncertainty score of mask m under the map q, written out (float64)."""
    q = q.double().clamp(eps, 1 - eps)
    entropy = -(q * q.log() + (1 - q) * (1 - q).log()) / math.log(2)
    weight = (1 - entropy).clamp_min(0)
    m = m.double()
    return float((weight * (m * q.log() + (1 - m) * (1 - q).log())).sum() / (weight.sum() + 1e-6))


def test_agreement_leaves_out_the_source_pass_by_hand():
    """Passes 0 (identity), 1, 2; a threshold of the identity map (source 0); a threshold of the mean (-1)."""
    # one row of 6 pixels: m0 = 111000, m1 = 110000, m2 = 011100, m3 = 111100, m4 = 111000
    rows = [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]
    masks = torch.tensor(rows, dtype=torch.uint8).view(1, 5, 1, 6)
    probs = 0.25 + 0.5 * masks[:, :3].float()  # the passes' maps; agreement reads only their count
    ps = _with_passes(probs, masks[:, 3:], sources=(0, 1, 2, 0, -1))
    assert torch.equal(ps.masks, masks)
    # Dice: d01 = 4/5, d02 = 4/6, d12 = 2/5; d31 = 4/6, d32 = 6/7 (d30 = 6/7 left out); d40 = 1, d41 = 4/5, d42 = 4/6
    expected = torch.tensor([[(4 / 5 + 4 / 6) / 2, (4 / 5 + 2 / 5) / 2, (4 / 6 + 2 / 5) / 2,
                              (4 / 6 + 6 / 7) / 2, (1 + 4 / 5 + 4 / 6) / 3]])
    scores = AgreementJudge().score(torch.zeros(1, 1, 1, 6), ps)
    torch.testing.assert_close(scores, expected)
    # without pass information every other proposal counts, as before: m3 also meets m0 and m4 (6/7 each)
    plain = AgreementJudge().score(torch.zeros(1, 1, 1, 6), _set(masks))
    torch.testing.assert_close(plain[0, 3], torch.tensor((6 / 7 + 4 / 6 + 6 / 7 + 6 / 7) / 4))


def test_agreement_with_one_pass_compares_with_every_other_proposal():
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.uint8).view(1, 3, 1, 4)
    ps = _with_passes(0.25 + 0.5 * masks[:, :1].float(), masks[:, 1:], sources=(0, 0, 0))
    torch.testing.assert_close(AgreementJudge().score(torch.zeros(1, 1, 1, 4), ps),
                               AgreementJudge().score(torch.zeros(1, 1, 1, 4), _set(masks)))


def test_uncertainty_scores_each_proposal_against_the_other_passes():
    """Under the mean of all passes the threshold of that mean (proposal 4) is the built-in winner.
    Leave-one-out: a proposal made from the identity pass (0, and its threshold 3) is scored
    against the mean of passes 1 and 2, pass k against the others, the threshold of the mean
    against the full mean."""
    p = torch.tensor([[0.875, 0.875, 0.875, 0.125],  # identity
                      [0.875, 0.125, 0.125, 0.125],
                      [0.875, 0.375, 0.875, 0.625]]).view(1, 3, 1, 4)
    mean = p.mean(1)  # [0.875, 0.458, 0.625, 0.292]
    extra = torch.stack([p[:, 0] > 0.5, mean > 0.5], dim=1)  # threshold of identity, threshold of mean
    ps = _with_passes(p, extra, sources=(0, 1, 2, 0, -1))
    images = torch.zeros(1, 1, 1, 4)
    full = UncertaintyJudge().score(images, _set(ps.masks, mean))
    assert int(full.argmax()) == 4
    scores = UncertaintyJudge().score(images, ps)
    masks = ps.masks[0, :, 0]
    others = [(p[0, 1] + p[0, 2]) / 2, (p[0, 0] + p[0, 2]) / 2, (p[0, 0] + p[0, 1]) / 2]
    expected = [_loglik(others[0], masks[0]), _loglik(others[1], masks[1]), _loglik(others[2], masks[2]),
                _loglik(others[0], masks[3]), _loglik(mean[0], masks[4])]
    torch.testing.assert_close(scores, torch.tensor([expected]), atol=1e-5, rtol=1e-5)
    assert scores[0, 3] == scores[0, 0]  # same mask, same source
    assert scores[0, 3] < full[0, 3] - 0.1  # no credit for agreeing with itself
    assert scores[0, 4] == full[0, 4]  # the threshold of the mean has no pass to leave out


@pytest.mark.parametrize("judge", ["agreement", "uncertainty", "oracle"])
def test_judges_check_shapes(judge):
    images, ps, truth = _graded(n=3)
    judge = {"agreement": AgreementJudge(), "uncertainty": UncertaintyJudge(), "oracle": OracleJudge(truth=truth)}[judge]
    assert isinstance(judge, Judge)
    with pytest.raises(ValueError, match=r"images have shape \(2, 1, 16, 16\).*\(3, 5, 16, 16\)"):
        judge.score(images[:2], ps)
    out = judge.score(images, ps)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_build_judge(tmp_path):
    assert isinstance(build_judge(JudgeConfig(kind="agreement"), tmp_path), AgreementJudge)
    assert isinstance(build_judge(JudgeConfig(kind="uncertainty"), tmp_path), UncertaintyJudge)
    oracle = build_judge(JudgeConfig(kind="oracle", noise_std=0.2, flip_prob=0.1, invert=True, seed=5), tmp_path)
    assert (oracle.noise_std, oracle.flip_prob, oracle.invert, oracle.seed) == (0.2, 0.1, True, 5)
    with pytest.raises(ValueError, match="not one of agreement, uncertainty, learned, federated, oracle"):
        build_judge(JudgeConfig(kind="psychic"), tmp_path)
