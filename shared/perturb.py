"""Realistic corruptions of ground-truth masks, and the batched Dice that measures them.

The learned judge (``shared/judges/learned.py``) learns to predict a mask's Dice against an
unseen ground truth. Besides out-of-fold model proposals it trains on ground truth corrupted
the way segmenters err: a boundary too tight or too loose (erosion / dilation), a misplaced
object (shift, small rotation and scale), a missed part (a blob dropped, a side cropped away),
a false positive (a blob added next to or away from the object), and now and then nothing
found at all (an empty mask).

Each variant draws a *severity* in [0, 1]; every corruption scales with it and with the size
of the object (its equivalent radius ``sqrt(area / pi)``), so that small polyps and large lungs
get a similar spread of Dice, from about 0.2 to 1.0. All variants are computed at once with
torch ops; random draws come from the given ``torch.Generator`` only (on its device, CPU by
default), so a seed fixes the output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["perturb_masks", "mask_dice"]


def mask_dice(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks over their last two dims: ``(..., H, W)`` x ``(..., H, W)`` -> ``(...)``.

    Nonzero counts as foreground, any dtype. Two empty masks agree perfectly (Dice 1); an
    empty mask against a non-empty one has Dice 0. Shapes must broadcast. Returns float32.
    """
    if pred.shape[-2:] != truth.shape[-2:]:
        raise ValueError(
            f"mask_dice: pred has spatial shape {tuple(pred.shape[-2:])} but truth has {tuple(truth.shape[-2:])}"
        )
    a = (pred != 0).float()
    b = (truth != 0).float()
    inter = (a * b).sum(dim=(-2, -1))
    total = a.sum(dim=(-2, -1)) + b.sum(dim=(-2, -1))
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))


def perturb_masks(
    masks: torch.Tensor,
    n_variants: int,
    generator: torch.Generator,
    *,
    p_empty: float = 0.03,
) -> torch.Tensor:
    """Corrupt each ground-truth mask ``n_variants`` times.

    Args:
        masks: ``(N, 1, H, W)`` ground truth, uint8 / bool / float, nonzero is foreground.
        n_variants: corrupted versions per mask (``V``).
        generator: the only source of randomness (a CPU generator unless the masks live on
            the generator's device); the same seed gives the same output.
        p_empty: probability that a variant is replaced by an empty mask.

    Returns:
        ``(N, V, H, W)`` uint8 in {0, 1}, on the device of ``masks``. Memory is about
        ``20 * N * V * H * W`` bytes at the peak: chunk very large inputs.
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or masks.shape[1] != 1:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"perturb_masks: masks must be a (N, 1, H, W) tensor, got {shape}")
    if n_variants < 1:
        raise ValueError(f"perturb_masks: n_variants must be >= 1, got {n_variants}")
    if not 0.0 <= p_empty <= 1.0:
        raise ValueError(f"perturb_masks: p_empty must be between 0 and 1, got {p_empty}")
    n, _, h, w = masks.shape
    device = masks.device
    m = n * n_variants
    if m == 0:
        return torch.zeros((n, n_variants, h, w), dtype=torch.uint8, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(device)

    x = (masks != 0).float().repeat_interleave(n_variants, dim=0)  # (M, 1, H, W), image-major
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )

    # object geometry: area, equivalent radius, centroid (image centre for empty masks)
    area = x.sum(dim=(1, 2, 3))
    present = area > 0
    fallback = max(h, w) / 8.0
    r_obj = torch.where(present, torch.sqrt(area / math.pi), torch.full_like(area, fallback)).clamp_min(1.0)
    safe_area = area.clamp_min(1.0)
    cy = torch.where(present, (x[:, 0] * ys).sum(dim=(1, 2)) / safe_area, torch.full_like(area, (h - 1) / 2))
    cx = torch.where(present, (x[:, 0] * xs).sum(dim=(1, 2)) / safe_area, torch.full_like(area, (w - 1) / 2))

    severity = rand(m)
    # every variant gets one primary corruption, and each other one with probability p_extra
    primary = (rand(m) * 5).long()
    p_extra = 0.25

    def switch(k: int) -> torch.Tensor:
        return (primary == k) | (rand(m) < p_extra)

    # 1. misplacement: rotation and scale about the centroid, then a shift (nearest sampling)
    on = switch(0)
    angle = (rand(m) * 2 - 1) * math.radians(20) * severity * on
    scale = torch.exp((rand(m) * 2 - 1) * 0.4 * severity * on)
    shift_r = rand(m) * severity * r_obj * 1.2 * on
    shift_a = rand(m) * 2 * math.pi
    ty, tx = shift_r * torch.sin(shift_a), shift_r * torch.cos(shift_a)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    dy = ys[None] - (cy + ty)[:, None, None]
    dx = xs[None] - (cx + tx)[:, None, None]
    sy = (cos * dy - sin * dx) / scale[:, None, None] + cy[:, None, None]
    sx = (sin * dy + cos * dx) / scale[:, None, None] + cx[:, None, None]
    grid = torch.stack(((2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1), dim=-1)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    # 2. boundary too loose (dilation, radius > 0) or too tight (erosion, radius < 0)
    on = switch(1)
    sign = torch.where(rand(m) < 0.5, -1.0, 1.0).to(device)
    max_radius = max(1, min(h, w) // 8)
    radius = torch.round(sign * severity * r_obj * 0.7 * rand(m).sqrt() * on).clamp(-max_radius, max_radius)
    x = _morphology(x, radius.long())

    # 3. a part missed: an ellipse dropped around a random foreground pixel
    on = switch(2) & present
    centre = _random_foreground_pixel(x, rand(m, h * w))
    drop = _ellipses(ys, xs, centre, r_obj * severity * (0.4 + 0.8 * rand(m)), rand(m), rand(m))
    x = torch.where(drop & on[:, None, None, None], torch.zeros_like(x), x)

    # 4. a part missed: a side cropped away beyond a random line near the centroid
    on = switch(3) & present
    theta = rand(m) * 2 * math.pi
    offset = r_obj * (1.0 - 1.5 * severity * rand(m))
    side = (ys[None] - cy[:, None, None]) * torch.sin(theta)[:, None, None] + (
        xs[None] - cx[:, None, None]
    ) * torch.cos(theta)[:, None, None]
    cut = (side > offset[:, None, None])[:, None]
    x = torch.where(cut & on[:, None, None, None], torch.zeros_like(x), x)

    # 5. a false positive: an ellipse added next to the object (a leak) or anywhere
    on = switch(4)
    near = rand(m) < 0.6
    edge = _random_foreground_pixel(x, rand(m, h * w))
    jitter_r, jitter_a = rand(m) * r_obj, rand(m) * 2 * math.pi
    near_centre = edge + torch.stack((jitter_r * torch.sin(jitter_a), jitter_r * torch.cos(jitter_a)), dim=1)
    far_centre = torch.stack((rand(m) * (h - 1), rand(m) * (w - 1)), dim=1)
    centre = torch.where(near[:, None], near_centre, far_centre)
    add = _ellipses(ys, xs, centre, r_obj * severity * (0.3 + 0.7 * rand(m)), rand(m), rand(m))
    x = torch.where(add & on[:, None, None, None], torch.ones_like(x), x)

    # 6. nothing found
    empty = rand(m) < p_empty
    x = torch.where(empty[:, None, None, None], torch.zeros_like(x), x)

    return x.reshape(n, n_variants, h, w).to(torch.uint8)


def _morphology(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Dilate ``x`` (M, 1, H, W) by ``radius[i]`` steps where positive, erode where negative.

    One step is a 3x3 square and a plus-shaped element in turn, so the structuring element
    grows as an octagon (closer to a disc than a square). Erosion is dilation of the complement.
    Step ``k`` runs only on the masks that need at least ``k`` steps (boolean shifts, not
    ``max_pool2d``, which is ten times slower on CPU).
    """
    out = x.clone()
    for sign in (1, -1):
        steps = (radius * sign).clamp_min(0)
        rows = torch.nonzero(steps > 0).flatten()
        if rows.numel() == 0:
            continue
        steps = steps[rows]
        cur = x[rows] > 0.5 if sign == 1 else x[rows] < 0.5
        result = torch.zeros_like(cur)
        active = torch.arange(rows.numel(), device=x.device)
        for k in range(1, int(steps.max().item()) + 1):
            cur = _dilate_step(cur, square=(k % 2 == 1))
            done = steps[active] == k
            result[active[done]] = cur[done]
            keep = ~done
            active, cur = active[keep], cur[keep]
            if active.numel() == 0:
                break
        out[rows] = result.float() if sign == 1 else (~result).float()
    return out


def _dilate_step(x: torch.Tensor, square: bool) -> torch.Tensor:
    """One dilation step of a bool (M, 1, H, W) tensor: 3x3 square or plus-shaped element."""
    p = F.pad(x.to(torch.uint8), (1, 1, 1, 1)).bool()
    vertical = p[:, :, :-2, :] | p[:, :, 1:-1, :] | p[:, :, 2:, :]
    if square:
        return vertical[:, :, :, :-2] | vertical[:, :, :, 1:-1] | vertical[:, :, :, 2:]
    horizontal = p[:, :, 1:-1, :-2] | p[:, :, 1:-1, 1:-1] | p[:, :, 1:-1, 2:]
    return vertical[:, :, :, 1:-1] | horizontal


def _random_foreground_pixel(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(M, 2) float (row, col) of a uniformly drawn foreground pixel of each mask (any pixel if empty)."""
    m, _, h, w = x.shape
    flat = x.reshape(m, h * w)
    score = noise + flat  # every foreground pixel beats every background pixel
    index = score.argmax(dim=1)
    return torch.stack(((index // w).float(), (index % w).float()), dim=1)


def _ellipses(
    ys: torch.Tensor, xs: torch.Tensor, centre: torch.Tensor, size: torch.Tensor, aspect: torch.Tensor, angle: torch.Tensor
) -> torch.Tensor:
    """(M, 1, H, W) bool filled ellipses: semi-axes ``size`` and ``size * (0.4 + 0.6 aspect)``."""
    a = size.clamp_min(1.0)[:, None, None]
    b = (size * (0.4 + 0.6 * aspect)).clamp_min(1.0)[:, None, None]
    phi = (angle * math.pi)[:, None, None]
    dy = ys[None] - centre[:, 0, None, None]
    dx = xs[None] - centre[:, 1, None, None]
    u = dx * torch.cos(phi) + dy * torch.sin(phi)
    v = -dx * torch.sin(phi) + dy * torch.cos(phi)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1.0)[:, None]
