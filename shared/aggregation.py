"""Checking and averaging site updates (DESIGN.md section 4), over plain torch state dicts.

`coordinate_median` is the robust alternative (`aggregation.kind: median`): Flower's FedMedian
maths (numpy's median per coordinate, so the mean of the two middle values for an even count).
`krum_select` is Flower's Krum (`aggregation.kind: krum`): the one update with the smallest sum of
squared distances to its n - f - 2 nearest others is taken whole.

An update is rejected, never averaged in, when its keys or shapes differ from the global
model's, when it holds NaN or Inf, or when the norm of its change is more than `factor` times
the median change of the round (a site that diverged or sends garbage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def update_problem(update: State, reference: State) -> str | None:
    """Why this update cannot be averaged with the global model, or None if it can."""
    missing = [k for k in reference if k not in update]
    if missing:
        return f"missing weight {missing[0]!r}"
    extra = [k for k in update if k not in reference]
    if extra:
        return f"unexpected weight {extra[0]!r}"
    for key, ref in reference.items():
        value = update[key]
        if tuple(value.shape) != tuple(ref.shape):
            return f"weight {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"weight {key!r} holds NaN or Inf"
    return None


def update_norm(update: State, reference: State) -> float:
    """L2 norm of the change an update makes to the global model."""
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            total += float((update[key].double() - ref.double()).pow(2).sum())
    return total ** 0.5


def norm_outliers(norms: Mapping[str, float], factor: float) -> set[str]:
    """Sites whose change norm exceeds `factor` x the median norm of the round.

    Needs at least three updates: with two, neither can be told to be the odd one out.
    """
    if len(norms) < 3:
        return set()
    median = float(torch.tensor(list(norms.values()), dtype=torch.float64).median())
    if median <= 0:
        return set()
    return {site for site, norm in norms.items() if norm > factor * median}


def weighted_average(updates: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts, accumulated in float64 and cast back to each dtype.

    Integer buffers (counters) are taken from the first update instead of averaged.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update, got {len(updates)} updates and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the aggregation weights sum to zero: nothing to average")
    averaged = {}
    for key, first in updates[0].items():
        if not first.is_floating_point():
            averaged[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for update, weight in zip(updates, weights):
            acc += update[key].double() * (weight / total)
        averaged[key] = acc.to(first.dtype)
    return averaged


def coordinate_median(updates: Sequence[State]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median of state dicts, computed in float64 and cast back to each dtype.

    Matches Flower's FedMedian (`np.median` over the clients' arrays): with an even number of
    updates it is the mean of the two middle values, so with two updates it equals their plain
    mean. Unweighted by design: one site's update cannot pull a coordinate past the middle.
    Integer buffers (counters) are taken from the first update.
    """
    if not updates:
        raise ValueError("need at least one update to take a median")
    median = {}
    for key, first in updates[0].items():
        if not first.is_floating_point():
            median[key] = first.clone()
            continue
        ordered = torch.stack([update[key].double() for update in updates]).sort(dim=0).values
        mid = len(updates) // 2
        middle = ordered[mid] if len(updates) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        median[key] = middle.to(first.dtype)
    return median


def krum_select(updates: Sequence[State], byzantine: int) -> int:
    """Index of the update Krum keeps (Blanchard et al. 2017), as Flower's Krum computes it.

    Each update scores the sum of squared L2 distances (over its floating-point tensors) to its
    `max(1, n - byzantine - 2)` nearest other updates; the lowest score wins, the first on a tie.
    With two updates both score the same, so Krum needs three or more to tell anything apart.
    """
    if not updates:
        raise ValueError("need at least one update to choose from")
    flat = torch.stack([
        torch.cat([t.double().flatten() for t in update.values() if t.is_floating_point()])
        for update in updates
    ])
    distances = torch.cdist(flat, flat).pow(2)
    closest = max(1, len(updates) - byzantine - 2)
    scores = [distances[i][torch.arange(len(updates)) != i].sort().values[:closest].sum()
              for i in range(len(updates))]
    return int(torch.stack(scores).argmin()) if len(updates) > 1 else 0
