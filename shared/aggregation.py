"""Checking, weighing and averaging site updates (DESIGN.md section 4), over plain torch state dicts.

The policy is two pure functions the server's round loop calls: `site_weights` (labelled images or
pairs used x g(judge reliability), exclusion, damping) and `combine` (the weighted average, or
Flower's own median / Krum for `aggregation.kind: median | krum`).

An update is rejected, never averaged in, when its keys or shapes differ from the global
model's, when it holds NaN or Inf, or when the norm of its change is more than `factor` times
the median change of the round (a site that diverged or sends garbage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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


# ---------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Contribution:
    """One accepted update as the policy sees it.

    examples: what the site reported as `num-examples` (labelled images for supervised and
    anchor-only steps, pairs used for preference steps). judged: the update followed a judge's
    pairs (a preference round with pairs); an anchor-only update (method none, or a site its
    calibration gate held back) did not, so its judge's reliability has no say over it.
    judge_factor: g from the ledger; excluded: the ledger excludes the site's judge."""

    examples: float
    judged: bool = False
    judge_factor: float = 1.0
    excluded: bool = False


@dataclass
class Weights:
    """Each site's share of the new global model and the share kept on the current one (sum 1)."""

    sites: dict[str, float] = field(default_factory=dict)
    kept: float = 0.0
    excluded: set[str] = field(default_factory=set)  # judged updates of sites whose judge is excluded

    @property
    def total(self) -> float:
        return sum(self.sites.values()) + self.kept


def site_weights(contributions: Mapping[str, Contribution], reliability: bool, damped: bool) -> Weights:
    """Aggregation weights of one round.

    Without `reliability` (supervised rounds, `kind: fedavg | median | krum`) a site weighs its
    examples. With it, a judged update weighs examples x judge_factor and an anchor-only update
    its examples; under `damped` the weight judged updates lose stays on the current global model
    (new = global + sum_i n_i g_i (w_i - global) / sum_i n_i), so weak judges shrink the step
    instead of handing it to the other sites; an excluded judge's update weighs nothing. All zero:
    nothing to aggregate (total 0)."""
    excluded = {site for site, c in contributions.items() if reliability and c.judged and c.excluded}
    raw = {site: 0.0 if site in excluded else c.examples * (c.judge_factor if reliability and c.judged else 1.0)
           for site, c in contributions.items()}
    kept = sum(c.examples for c in contributions.values()) - sum(raw.values()) if reliability and damped else 0.0
    total = sum(raw.values()) + kept
    if sum(raw.values()) <= 0:
        return Weights({site: 0.0 for site in raw}, 0.0, excluded)
    return Weights({site: w / total for site, w in raw.items()}, kept / total, excluded)


def combine(kind: str, states: Mapping[str, State], weights: Weights, global_state: State,
            krum_byzantine: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The new global weights from the sites' states, and each site's final share of them.

    `weighted`: the weighted average (with the kept share on `global_state`). `median` and
    `krum` are Flower's own functions over the sites with a positive weight: the coordinate-wise
    median (each such site counts once) and Krum (the one update closest to its
    n - krum_byzantine - 2 nearest others, taken whole)."""
    contributing = [site for site in sorted(states) if weights.sites.get(site, 0.0) > 0]
    if not contributing:
        raise ValueError("no site has a positive aggregation weight: nothing to combine")
    if kind == "median":
        share = {site: (1.0 / len(contributing) if site in contributing else 0.0) for site in states}
        return _flower_median([states[s] for s in contributing]), share
    if kind == "krum":
        chosen = contributing[_flower_krum([states[s] for s in contributing], krum_byzantine)]
        return {k: v.clone() for k, v in states[chosen].items()}, {site: float(site == chosen) for site in states}
    if kind != "weighted":
        raise ValueError(f"aggregation kind {kind!r}: expected weighted, median or krum")
    updates = [states[s] for s in contributing] + ([global_state] if weights.kept > 0 else [])
    shares = [weights.sites[s] for s in contributing] + ([weights.kept] if weights.kept > 0 else [])
    return weighted_average(updates, shares), {site: weights.sites.get(site, 0.0) for site in states}


def _flower_median(updates: Sequence[State]) -> dict[str, torch.Tensor]:
    """Flower's FedMedian maths (`aggregate_median`: numpy's median per coordinate, the mean of the
    two middle values for an even count), in float64, cast back to each dtype; integer buffers
    (counters) are taken from the first update."""
    from flwr.server.strategy.aggregate import aggregate_median

    keys = [k for k, v in updates[0].items() if v.is_floating_point()]
    layers = aggregate_median([([u[k].double().numpy() for k in keys], 1) for u in updates])
    median = {k: v.clone() for k, v in updates[0].items()}
    for key, layer in zip(keys, layers):
        median[key] = torch.from_numpy(layer).to(updates[0][key].dtype)
    return median


def _flower_krum(updates: Sequence[State], byzantine: int) -> int:
    """Index of the update Flower's Krum (`select_multikrum` with one to select) keeps."""
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    contents = [RecordDict({"arrays": ArrayRecord({k: v.detach().cpu() for k, v in u.items()
                                                   if v.is_floating_point()})}) for u in updates]
    chosen = select_multikrum(contents, byzantine, 1)[0]
    return next(i for i, content in enumerate(contents) if content is chosen)
