"""The learned judge (shared/judges/learned.py) and the mask corruptions it trains on (shared/perturb.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shared.judges.learned import JUDGE_FILE, LearnedJudge, QualityNet, out_of_fold_indices, pair_accuracy, rank_loss
from shared.perturb import mask_dice, perturb_masks


def discs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, size, size) bright discs on Gaussian noise, and their (n, 1, size, size) uint8 masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    centre = torch.rand(n, 2, generator=g) * (size / 2) + size / 4
    radius = torch.rand(n, generator=g) * (size / 6) + size / 8
    inside = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2 <= radius[:, None, None] ** 2
    images = 0.3 * torch.randn(n, 1, size, size, generator=g) + inside[:, None].float()
    return images, inside[:, None].to(torch.uint8)


def proposals(masks: torch.Tensor) -> SimpleNamespace:
    """The judge reads only `.masks` of a ProposalSet."""
    return SimpleNamespace(masks=masks)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a CPU shared with other jobs run 10-20x slower with 2 intra-op
    threads than with 1 (threads wait on each other); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread) -> tuple[LearnedJudge, dict]:
    images, truth = discs(40, 32, seed=0)
    judge = LearnedJudge(in_channels=1, image_size=32, seed=0)
    stats = judge.fit(images, truth, None, steps=150, batch_size=32)
    return judge, stats


# ----------------------------------------------------------------------------- mask_dice


@pytest.mark.parametrize(
    "pred, truth, expected",
    [
        # 2 of 3 predicted pixels overlap 2 of 2 true ones: 2 * 2 / (3 + 2)
        ([[1, 1, 1, 0]], [[1, 1, 0, 0]], 0.8),
        ([[0, 0, 0, 0]], [[0, 0, 0, 0]], 1.0),  # both empty: perfect agreement
        ([[0, 0, 0, 0]], [[0, 1, 0, 0]], 0.0),
        ([[1, 0, 0, 0]], [[0, 1, 0, 0]], 0.0),
    ],
)
def test_mask_dice_by_hand(pred, truth, expected):
    got = mask_dice(torch.tensor(pred, dtype=torch.uint8), torch.tensor(truth, dtype=torch.uint8))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected)


def test_mask_dice_broadcasts_and_checks_shapes():
    truth = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    truth[:, :, :2] = 1
    masks = truth.expand(2, 3, 4, 4).clone()
    masks[:, 1] = 0
    assert mask_dice(masks, truth).tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(5, 5\)"):
        mask_dice(masks, torch.zeros(2, 1, 5, 5))


# ----------------------------------------------------------------------------- perturb_masks


def test_perturb_masks_shape_dtype_binary_and_deterministic():
    _, truth = discs(10, 32, seed=1)
    out = perturb_masks(truth, 6, torch.Generator().manual_seed(3))
    assert out.shape == (10, 6, 32, 32)
    assert out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {0, 1}
    again = perturb_masks(truth, 6, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    other = perturb_masks(truth, 6, torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)


def test_perturb_masks_spread_of_dice():
    _, truth = discs(40, 32, seed=2)
    dice = mask_dice(perturb_masks(truth, 8, torch.Generator().manual_seed(0)), truth).flatten()
    assert (dice > 0.95).float().mean() > 0.05  # some nearly untouched
    assert (dice < 0.6).float().mean() > 0.1  # and a fair share of bad ones
    assert ((dice > 0.6) & (dice < 0.95)).float().mean() > 0.3  # and plenty in between
    assert dice.min() < 0.2


def test_perturb_masks_handles_empty_truth_and_rejects_bad_shapes():
    out = perturb_masks(torch.zeros(3, 1, 32, 32, dtype=torch.uint8), 4, torch.Generator().manual_seed(0))
    assert out.shape == (3, 4, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*\(3, 32, 32\)"):
        perturb_masks(torch.zeros(3, 32, 32), 4, torch.Generator())
    with pytest.raises(ValueError, match="n_variants"):
        perturb_masks(torch.zeros(3, 1, 32, 32), 0, torch.Generator())


# ----------------------------------------------------------------------------- out_of_fold_indices


def test_out_of_fold_indices_partition_and_determinism():
    splits = out_of_fold_indices(10, 3, seed=7)
    assert len(splits) == 3
    held = [i for _, h in splits for i in h]
    assert sorted(held) == list(range(10))  # every image held out exactly once
    assert sorted(len(h) for _, h in splits) == [3, 3, 4]
    for train, h in splits:
        assert sorted(train + h) == list(range(10)) and not set(train) & set(h)
    assert splits == out_of_fold_indices(10, 3, seed=7)
    assert splits != out_of_fold_indices(10, 3, seed=8)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        out_of_fold_indices(10, 1)
    with pytest.raises(ValueError, match="cannot be split into 5 folds"):
        out_of_fold_indices(4, 5)


def test_out_of_fold_folds_keep_each_group_whole():
    """Frames of one video are near duplicates: a fold's segmenter must not have seen the group."""
    groups = ["a", "b", "a", "c", "c", "a", "d", "b", "c", "a"]  # a 4 images, c 3, b 2, d 1
    splits = out_of_fold_indices(10, 3, seed=1, groups=groups)
    assert len(splits) == 3 and sorted(i for _, h in splits for i in h) == list(range(10))
    for train, held in splits:
        assert not {groups[i] for i in train} & {groups[i] for i in held}
        assert sorted(train + held) == list(range(10))
    # largest group first, each to the fold with the fewest images: a | c | b + d
    assert sorted(len(h) for _, h in splits) == [3, 3, 4]
    assert splits == out_of_fold_indices(10, 3, seed=1, groups=groups)
    two = out_of_fold_indices(5, 3, seed=0, groups=["x", "y", "x", "y", "y"])  # folds capped at the groups
    assert sorted(h for _, h in two) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="come from 1 group"):
        out_of_fold_indices(4, 2, groups=["x"] * 4)
    with pytest.raises(ValueError, match="3 group keys for 4 images"):
        out_of_fold_indices(4, 2, groups=["x", "y", "z"])


# ----------------------------------------------------------------------------- the judge


def test_quality_net_size_and_any_multiple_of_16():
    net = QualityNet(in_channels=4).eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert 50_000 <= n_params <= 150_000
    with torch.no_grad():
        for size in (16, 48, 64):
            y = net(torch.randn(2, 4, size, size))
            assert y.shape == (2,) and ((y >= 0) & (y <= 1)).all()
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 4, 40, 40))


def test_judge_ranks_masks_of_unseen_images(trained):
    judge, stats = trained
    assert stats["holdout_spearman"] > 0.5  # the site-side figure agrees with the test below
    images, truth = discs(20, 32, seed=1)  # images the judge never saw
    masks = perturb_masks(truth, 8, torch.Generator().manual_seed(5))
    scores = judge.score(images, proposals(masks))
    true_dice = mask_dice(masks, truth)
    assert spearman(scores.flatten().numpy(), true_dice.flatten().numpy()) > 0.5
    assert pair_accuracy(scores.numpy(), true_dice.numpy()) > 0.7
    # it looks at the image, not only at the mask's shape: an image's own disc beats the
    # (equally well-formed) disc of another image
    own_vs_other = torch.stack((truth[:, 0], truth.roll(1, dims=0)[:, 0]), dim=1)
    scores = judge.score(images, proposals(own_vs_other))
    assert (scores[:, 0] > scores[:, 1]).float().mean() >= 0.8


def test_score_shape_range_no_grad_and_checks(trained):
    judge, _ = trained
    images, truth = discs(3, 32, seed=3)
    masks = perturb_masks(truth, 5, torch.Generator().manual_seed(0))
    scores = judge.score(images, proposals(masks))
    assert scores.shape == (3, 5) and scores.dtype == torch.float32
    with pytest.raises(TypeError, match="truth"):  # a judge never receives ground truth
        judge.score(images, proposals(masks), truth=truth)
    assert ((scores >= 0) & (scores <= 1)).all()
    assert not scores.requires_grad
    # one batch or many: the same scores
    assert torch.allclose(judge._predict(images, masks, batch_size=4), scores, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\).*\(3, 1, 64, 64\)"):
        judge.score(torch.zeros(3, 1, 64, 64), proposals(torch.zeros(3, 5, 64, 64, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"proposals.masks.*\(2, 5, 32, 32\)"):
        judge.score(images, proposals(masks[:2]))


def test_a_full_proposal_set_scores_as_its_masks(trained):
    """Pass maps, sources and positions ride along in a real ProposalSet; the judge reads the masks only."""
    from shared.proposals import ProposalSet

    judge, _ = trained
    images, truth = discs(3, 32, seed=6)
    masks = perturb_masks(truth, 4, torch.Generator().manual_seed(1))
    full = ProposalSet(masks=masks, mean_prob=masks.float().mean(1), ref_logits=torch.zeros(3, 1, 32, 32),
                       labels=("a", "b", "c", "d"), positions=torch.tensor([7, 2, 5]),
                       pass_probs=masks[:, :2].half(), sources=(0, 1, 0, -1))
    assert torch.equal(judge.score(images, full), judge.score(images, proposals(masks)))


def test_fit_with_out_of_fold_proposals_is_reproducible():
    images, truth = discs(12, 32, seed=4)
    oof = perturb_masks(truth, 3, torch.Generator().manual_seed(9))  # stands in for fold models' masks
    state = torch.random.get_rng_state()
    a, b = LearnedJudge(1, 32, seed=1), LearnedJudge(1, 32, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded without touching the global RNG
    stats = a.fit(images, truth, oof, steps=4, batch_size=8)
    b.fit(images, truth, oof, steps=4, batch_size=8)
    assert stats["oof_per_image"] == 3 and stats["train_images"] + stats["holdout_images"] == 12
    assert stats["holdout_images"] == 2 and np.isfinite(stats["final_loss"])
    assert "holdout_oof_pair_accuracy" in stats and stats["holdout_mae"] is not None
    masks = proposals(oof)
    assert torch.equal(a.score(images, masks), b.score(images, masks))
    assert b.fit(images, truth, oof, steps=1, holdout=0.0)["holdout_spearman"] is None  # nothing held out
    with pytest.raises(ValueError, match=r"oof_masks must be \(N, K, H, W\) = \(12, K, 32, 32\)"):
        a.fit(images, truth, oof[:5], steps=1)


def test_rank_loss_by_hand():
    import torch.nn.functional as F

    scores = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 3.0]], requires_grad=True)
    truth = torch.tensor([[0.9, 0.5, 0.5], [0.7, 0.7, 0.705]])  # row 2: differences under the 0.01 margin
    loss = rank_loss(scores, truth)
    # row 1: mask 0 truly beats masks 1 and 2 (scores 2 - 0 and 2 - 1); masks 1 and 2 tie
    expected = (F.softplus(torch.tensor(-2.0)) + F.softplus(torch.tensor(-1.0))) / 2
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1] and torch.all(scores.grad[1] == 0)  # raise the better
    # a wrong order costs more than the right one; all ties cost nothing and still backpropagate
    assert rank_loss(torch.tensor([[0.0, 2.0, 1.0]]), truth[:1]) > loss
    tied = torch.zeros(1, 3, requires_grad=True)
    tied_loss = rank_loss(tied, torch.full((1, 3), 0.5))
    tied_loss.backward()
    assert tied_loss.item() == 0.0 and torch.equal(tied.grad, torch.zeros(1, 3))


def test_the_ranking_term_changes_training_and_is_checked():
    images, truth = discs(12, 32, seed=4)
    oof = perturb_masks(truth, 3, torch.Generator().manual_seed(9))
    plain, ranked, again = (LearnedJudge(1, 32, seed=1) for _ in range(3))
    plain.fit(images, truth, oof, steps=3, batch_size=8)
    stats = ranked.fit(images, truth, oof, steps=3, batch_size=8, rank_weight=1.0)
    again.fit(images, truth, oof, steps=3, batch_size=8, rank_weight=1.0)
    assert np.isfinite(stats["final_loss"])
    masks = proposals(oof)
    assert torch.equal(ranked.score(images, masks), again.score(images, masks))  # seeded
    assert not torch.equal(ranked.score(images, masks), plain.score(images, masks))
    with pytest.raises(ValueError, match="rank_weight must be >= 0"):
        plain.fit(images, truth, oof, steps=1, rank_weight=-1.0)


def test_save_load_round_trip(trained, tmp_path):
    judge, stats = trained
    path = judge.save(tmp_path / "site")
    assert path == tmp_path / "site" / JUDGE_FILE
    assert os.listdir(tmp_path / "site") == [JUDGE_FILE]  # no temporary file left behind
    loaded = LearnedJudge.load(tmp_path / "site", in_channels=1, image_size=32)
    assert loaded.name == "learned" and loaded.stats == stats
    images, truth = discs(4, 32, seed=5)
    masks = proposals(perturb_masks(truth, 3, torch.Generator().manual_seed(0)))
    assert torch.equal(loaded.score(images, masks), judge.score(images, masks))


def test_load_missing_or_mismatched(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="has not been trained at this site yet.*fl-client"):
        LearnedJudge.load(tmp_path)
    judge, _ = trained
    judge.save(tmp_path)
    with pytest.raises(ValueError, match="trained for image_size = 32 but this site uses image_size = 64"):
        LearnedJudge.load(tmp_path, image_size=64)
    with pytest.raises(ValueError, match="trained for in_channels = 1 but this site uses in_channels = 3"):
        LearnedJudge.load(tmp_path, in_channels=3)
    (tmp_path / JUDGE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the learned judge"):
        LearnedJudge.load(tmp_path)


def test_pair_accuracy_by_hand():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.5, 0.5, 0.5]])
    true = np.array([[0.8, 0.3, 0.5], [0.9, 0.1, 0.5], [0.1, 0.9, 0.5]])
    # image 0: best 0 (0.8) beats worst 1 (0.3); image 1: best 1 (0.1) loses to worst 0 (0.9);
    # image 2: all scores equal, no pair
    assert pair_accuracy(scores, true) == pytest.approx(0.5)
