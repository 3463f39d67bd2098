"""Judge reliability against ground truth, and the mask overlaps it rests on (DESIGN.md section 3, step 5).

On the calibration split the proposals are judged and mined exactly as on unlabelled data, and
the result is compared with the true Dice of every proposal:

- ``pair_accuracy``: fraction of mined pairs whose chosen mask truly has the higher Dice
  (a true tie counts one half); 0.5 is chance, 1.0 a perfect judge, 0.0 an adversarial one;
- ``spearman``: per-image Spearman rank correlation of judge score and true Dice, averaged over
  the images where both vary;
- ``pair_gain``: mean true Dice(chosen) - Dice(rejected) over the mined pairs.

Mined pairs depend on the mining settings (and top-vs-bottom pairs often include a degenerate
mask any judge ranks last), so the ledger acts on figures that do not:

- ``informative_pairs``: every within-image pair of plausible proposals whose TRUE Dice differs
  by at least ``gap`` (a gap on true Dice, so it cannot depend on a judge's score scale);
- ``informative_pair_accuracy``: the share of them the judge orders like the truth (a score tie
  counts one half); ``informative_wilson``: its 95 % Wilson lower bound, which is low when the
  pairs are few, so a handful of pairs cannot earn trust. The pairs of one image share its image
  and the judge's errors on it, and the images of one video or patient (`data.groups`) share
  theirs: ``informative_units`` counts the images (or groups) that hold informative pairs, the
  trials of the ledger's bound under `aggregation.bound_counts: units` (nine images are nine
  trials however many pairs they hold, three videos are three).

Dice of two empty masks is 1 throughout. Masks may be uint8, bool or float; nonzero is foreground.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "dice_scores",
    "pairwise_overlaps",
    "pair_accuracy",
    "pair_gain",
    "spearman",
    "spearman_per_image",
    "reliability_report",
    "wilson_lower_bound",
    "informative_pairs",
    "informative_report",
]

_BLOCK_BYTES = 64 * 2**20  # float working memory per block of images
_EXACT_FLOAT32 = 2**24  # pixel counts up to this are exact in float32


def dice_scores(masks: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """True Dice of every proposal against the ground truth.

    Args:
        masks: (N, K, H, W) proposals.
        truth: (N, 1, H, W) ground truth (or (N, H, W)).

    Returns:
        (N, K) float32: ``2 |m & t| / (|m| + |t|)``, 1 where both masks are empty.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, K, H, W), got {tuple(masks.shape)}")
    if truth.dim() == 3:
        truth = truth.unsqueeze(1)
    n, k, h, w = masks.shape
    if tuple(truth.shape) != (n, 1, h, w):
        raise ValueError(f"truth has shape {tuple(truth.shape)} but masks {tuple(masks.shape)} need ({n}, 1, {h}, {w})")
    out = torch.empty((n, k), dtype=torch.float32)
    dtype = _count_dtype(h * w)
    for sl in _blocks(n, k * h * w):
        m = (masks[sl] != 0).flatten(2).to(dtype)  # (b, K, P)
        t = (truth[sl] != 0).flatten(1).to(dtype)  # (b, P)
        inter = torch.einsum("bkp,bp->bk", m, t)
        denom = m.sum(-1) + t.sum(-1, keepdim=True)
        out[sl] = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).float().cpu()
    return out


def pairwise_overlaps(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersections and sizes of the K masks of each image.

    Args:
        masks: (N, K, H, W).

    Returns:
        ``(inter, size)``: inter (N, K, K) with ``inter[n, a, b] = |m_a & m_b|`` and size (N, K)
        with ``size[n, a] = |m_a|``; float32 (float64 for images over 2**24 pixels), exact counts.
        The disagreement ``|m_a xor m_b|`` is ``size_a + size_b - 2 inter_ab``.
    """
    if masks.dim() != 4:
        raise ValueError(f"masks must have shape (N, K, H, W), got {tuple(masks.shape)}")
    n, k, h, w = masks.shape
    dtype = _count_dtype(h * w)
    inter = torch.empty((n, k, k), dtype=dtype)
    size = torch.empty((n, k), dtype=dtype)
    for sl in _blocks(n, k * h * w):
        m = (masks[sl] != 0).flatten(2).to(dtype)  # (b, K, P)
        inter[sl] = torch.bmm(m, m.transpose(1, 2)).cpu()
        size[sl] = m.sum(-1).cpu()
    return inter, size


def pair_accuracy(true_dice: torch.Tensor, pairs: torch.Tensor) -> float:
    """Fraction of pairs whose chosen proposal truly has the higher Dice (ties count 1/2).

    Args:
        true_dice: (N, K).
        pairs: (P, 3) rows of (image index, chosen k, rejected k).

    Returns:
        a float in [0, 1]; 0.5 (chance) when there are no pairs.
    """
    chosen, rejected = _pair_dice(true_dice, pairs)
    if chosen.numel() == 0:
        return 0.5
    return float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean())


def pair_gain(true_dice: torch.Tensor, pairs: torch.Tensor) -> float:
    """Mean true Dice(chosen) - Dice(rejected) over the pairs; 0.0 when there are none."""
    chosen, rejected = _pair_dice(true_dice, pairs)
    if chosen.numel() == 0:
        return 0.0
    return float((chosen.double() - rejected.double()).mean())


def spearman_per_image(scores: torch.Tensor, true_dice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spearman rank correlation of scores and true Dice within each image.

    Ranks are average ranks (tied values share the mean of their positions), and the
    correlation is Pearson's on the ranks.

    Args:
        scores, true_dice: (N, K).

    Returns:
        ``(rho, valid)``: rho (N,) float64, 0 where undefined; valid (N,) bool, False for images
        whose scores or true Dice are constant (or K < 2).
    """
    _check_table(scores, true_dice)
    rx, ry = _average_ranks(scores.double()), _average_ranks(true_dice.double())
    rx = rx - rx.mean(dim=1, keepdim=True)
    ry = ry - ry.mean(dim=1, keepdim=True)
    sxx, syy = (rx * rx).sum(1), (ry * ry).sum(1)
    valid = (sxx > 0) & (syy > 0)
    rho = torch.where(valid, (rx * ry).sum(1) / (sxx * syy).sqrt().clamp_min(1e-300), torch.zeros_like(sxx))
    return rho, valid


def spearman(scores: torch.Tensor, true_dice: torch.Tensor) -> float:
    """Per-image Spearman correlation, averaged over the images where it is defined; 0.0 if none."""
    rho, valid = spearman_per_image(scores, true_dice)
    return float(rho[valid].mean()) if bool(valid.any()) else 0.0


def reliability_report(scores: torch.Tensor, true_dice: torch.Tensor, pairs: torch.Tensor) -> dict:
    """The reliability figures a site reports (all plain floats and ints, never NaN).

    Args:
        scores: (N, K) judge scores; true_dice: (N, K); pairs: (P, 3) mined from ``scores``.

    Returns:
        ``{"pair_accuracy", "spearman", "pair_gain", "n_pairs", "n_images", "n_ranked_images"}``.
        With no pairs, pair_accuracy is 0.5 (chance: the judge has shown nothing) and
        pair_gain 0.0; with no image where both scores and truth vary, spearman is 0.0.
        ``n_ranked_images`` counts the images spearman averages over.
    """
    _check_table(scores, true_dice)
    rho, valid = spearman_per_image(scores, true_dice)
    n_ranked = int(valid.sum())
    return {
        "pair_accuracy": pair_accuracy(true_dice, pairs),
        "spearman": float(rho[valid].mean()) if n_ranked else 0.0,
        "pair_gain": pair_gain(true_dice, pairs),
        "n_pairs": int(_check_pairs(pairs, true_dice).shape[0]),
        "n_images": int(scores.shape[0]),
        "n_ranked_images": n_ranked,
    }


def wilson_lower_bound(successes: float, n: float, z: float = 1.96) -> float:
    """Wilson score lower bound of a proportion: what the accuracy is at least, given how few
    trials back it (8/10 -> 0.490, 80/100 -> 0.711). 0.0 with no trials: no evidence, no trust.
    Successes may be fractional (ties count one half) and n an effective (decayed) count."""
    if n <= 0:
        return 0.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


def informative_pairs(true_dice: torch.Tensor, allowed: torch.Tensor, gap: float) -> torch.Tensor:
    """The within-image pairs that carry information: both proposals plausible and their true
    Dice at least ``gap`` apart (a true tie says nothing about a judge).

    Args:
        true_dice: (N, K); allowed: (N, K) bool, the plausible proposals; gap: > 0, on true Dice.

    Returns:
        (P, 3) int64 rows of (image, truly better k, truly worse k), by image, then k.
    """
    _check_table(true_dice, allowed)
    if gap <= 0:
        raise ValueError(f"the informative gap must be positive, got {gap}")
    n, k = true_dice.shape
    d = true_dice.double()
    better = (d.unsqueeze(2) - d.unsqueeze(1) >= gap - 1e-9) & allowed.unsqueeze(2) & allowed.unsqueeze(1)
    img, a, b = better.nonzero(as_tuple=True)
    return torch.stack([img, a, b], dim=1).long().reshape(-1, 3)


def informative_report(scores: torch.Tensor, true_dice: torch.Tensor, allowed: torch.Tensor, gap: float,
                       units: torch.Tensor | None = None) -> dict:
    """The judge on the informative pairs: ``informative_pairs`` (count),
    ``informative_pair_accuracy`` (0.5 with none), ``informative_units`` (the images, or groups,
    that hold them) and ``informative_wilson`` (the 95 % lower bound of the accuracy with one
    trial a pair, 0.0 with none). ``units``: (N,) each image's unit (its `data.groups` group);
    None: every image is its own. Independent of the mining settings by construction."""
    _check_table(scores, true_dice)
    if units is not None and tuple(units.shape) != (scores.shape[0],):
        raise ValueError(f"units must have one entry per image ({scores.shape[0]}), got {tuple(units.shape)}")
    pairs = informative_pairs(true_dice, allowed, gap)
    n = int(pairs.shape[0])
    if n == 0:
        return {"informative_pairs": 0, "informative_pair_accuracy": 0.5, "informative_units": 0,
                "informative_wilson": 0.0}
    s = scores.double()
    sa, sb = s[pairs[:, 0], pairs[:, 1]], s[pairs[:, 0], pairs[:, 2]]
    accuracy = float(((sa > sb).double() + 0.5 * (sa == sb).double()).sum()) / n
    n_units = int(torch.unique(pairs[:, 0] if units is None else units.long()[pairs[:, 0]]).numel())
    return {"informative_pairs": n, "informative_pair_accuracy": accuracy, "informative_units": n_units,
            "informative_wilson": wilson_lower_bound(accuracy * n, n)}


# ----------------------------------------------------------------------------- internals


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K) 1-based average ranks along K (ties get the mean of their positions)."""
    less = (x.unsqueeze(2) > x.unsqueeze(1)).sum(2)  # how many are smaller than x[n, a]
    equal = (x.unsqueeze(2) == x.unsqueeze(1)).sum(2)  # including itself
    return less.double() + (equal.double() + 1) / 2


def _pair_dice(true_dice: torch.Tensor, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = _check_pairs(pairs, true_dice)
    return true_dice[pairs[:, 0], pairs[:, 1]], true_dice[pairs[:, 0], pairs[:, 2]]


def _check_pairs(pairs: torch.Tensor, true_dice: torch.Tensor) -> torch.Tensor:
    if true_dice.dim() != 2:
        raise ValueError(f"true_dice must have shape (N, K), got {tuple(true_dice.shape)}")
    pairs = torch.as_tensor(pairs)
    if pairs.numel() == 0:
        return pairs.reshape(0, 3).long()
    if pairs.dim() != 2 or pairs.shape[1] != 3 or pairs.dtype.is_floating_point:
        raise ValueError(f"pairs must be a (P, 3) integer tensor of (image, chosen k, rejected k), got {tuple(pairs.shape)} {pairs.dtype}")
    pairs = pairs.long()
    n, k = true_dice.shape
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= n or pairs[:, 1:].min() < 0 or pairs[:, 1:].max() >= k:
        raise ValueError(f"pairs index images 0..{pairs[:, 0].max().item()} and proposals up to {pairs[:, 1:].max().item()}, "
                         f"but true_dice has shape {tuple(true_dice.shape)}")
    return pairs


def _check_table(scores: torch.Tensor, true_dice: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape != true_dice.shape:
        raise ValueError(f"tables of shapes {tuple(scores.shape)} and {tuple(true_dice.shape)} must both be (N, K)")


def _count_dtype(pixels: int) -> torch.dtype:
    return torch.float32 if pixels <= _EXACT_FLOAT32 else torch.float64


def _blocks(n: int, per_image: int):
    """Slices of images whose float working copy stays around _BLOCK_BYTES."""
    size = max(1, _BLOCK_BYTES // max(1, 8 * per_image))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
