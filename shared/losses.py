"""Losses for preference fine-tuning of binary segmenters (no Flower import).

Every pair tensor is shaped ``(P, 1, H, W)``: ``P`` pairs of the same image, logits
float, masks in {0, 1} of any dtype (uint8, bool, float; nonzero counts as foreground).

The maths is DESIGN.md section 2. A logit map ``z`` read as independent Bernoulli pixels
gives ``log pi(m) = sum_p m_p log sigmoid(z_p) + (1 - m_p) log sigmoid(-z_p)``. For a pair
(chosen ``m+``, rejected ``m-``) the agreement pixels cancel and, with ``D = {m+ != m-}``
and ``s_p = +1`` where ``m+_p = 1`` else ``-1``,

    h = [log pi(m+) - log pi(m-)] - [log pi_ref(m+) - log pi_ref(m-)]
      = sum_{p in D} s_p (z_p - z_ref_p)

    DPO    (Rafailov et al. 2023, "Direct Preference Optimization"): L = -log sigmoid(beta h)
    RN-DPO (Region-Normalized DPO, DESIGN.md section 2):            L = -log sigmoid(beta h / |D|)

Losses are computed in float32 (float64 if the logits are float64), whatever the
precision of the forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

__all__ = [
    "mask_log_likelihood",
    "dpo_loss",
    "rn_dpo_loss",
    "preference_stats",
    "supervised_loss",
    "entropy_loss",
]

REDUCTIONS = ("mean", "sum", "none")
_PIXEL_DIMS = (1, 2, 3)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (float16 / bfloat16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_shapes(**tensors: torch.Tensor) -> None:
    """The first tensor must be (P, 1, H, W) with P >= 1; every other one must match it."""
    (ref_name, ref), *others = tensors.items()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ref.dim() != 4 or ref.shape[1] != 1:
        raise ValueError(f"{ref_name} must have shape (P, 1, H, W), got {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError(f"{ref_name} has shape {tuple(ref.shape)}: at least one pair is needed")
    for name, t in others:
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    return beta


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def mask_log_likelihood(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bernoulli log-likelihood of ``mask`` under ``logits`` (DESIGN.md section 2).

    ``sum_p m_p log sigmoid(z_p) + (1 - m_p) log sigmoid(-z_p)``, i.e. minus the
    pixel-summed ``BCEWithLogits``.

    Args:
        logits: (P, 1, H, W) float logits ``z``.
        mask: (P, 1, H, W) mask in {0, 1}, any dtype.

    Returns:
        (P,) log-likelihoods, float32 (float64 if ``logits`` is float64).
    """
    _check_shapes(logits=logits, mask=mask)
    dtype = _compute_dtype(logits)
    z = logits.to(dtype)
    m = (mask != 0).to(dtype)
    return -F.binary_cross_entropy_with_logits(z, m, reduction="none").sum(dim=_PIXEL_DIMS)


def _pair_margin(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO margin over the disagreement region, shared by ``dpo_loss`` and ``rn_dpo_loss``.

    Returns ``(h, n)``, both (P,): ``h = sum_{p in D} s_p (z_p - z_ref_p)`` and ``n = |D|``
    with ``D = {chosen != rejected}`` and ``s_p = +1`` where chosen is 1, else -1
    (DESIGN.md section 2). Agreement pixels are excluded by selection, not multiplied by
    zero, so a non-finite logit outside ``D`` cannot turn ``h`` into NaN.
    Computed in float32 (float64 if either logit tensor is float64).
    """
    _check_shapes(policy_logits=policy_logits, ref_logits=ref_logits, chosen=chosen, rejected=rejected)
    dtype = _compute_dtype(policy_logits, ref_logits)
    c, r = chosen != 0, rejected != 0
    in_d = c != r
    delta = policy_logits.to(dtype) - ref_logits.to(dtype)
    signed = torch.where(c, delta, -delta)
    h = torch.where(in_d, signed, torch.zeros((), dtype=dtype, device=delta.device)).sum(dim=_PIXEL_DIMS)
    n = in_d.sum(dim=_PIXEL_DIMS).to(dtype)
    return h, n


def dpo_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Plain DPO loss ``-log sigmoid(beta * h)`` (Rafailov et al. 2023; DESIGN.md section 2).

    The margin ``h`` grows with the disagreement size ``|D|``, so ``beta`` must be small
    (about 1e-3..1e-2).

    Args:
        policy_logits: (P, 1, H, W) logits of the model being trained.
        ref_logits: (P, 1, H, W) logits of the frozen reference (computed under no_grad).
        chosen, rejected: (P, 1, H, W) masks in {0, 1}, any dtype.
        beta: inverse temperature, > 0.
        reduction: "mean" | "sum" | "none" (the (P,) per-pair losses).

    Returns:
        The reduced loss, float32 (float64 if the logits are float64).
    """
    beta = _check_beta(beta)
    _check_reduction(reduction)
    h, _ = _pair_margin(policy_logits, ref_logits, chosen, rejected)
    return _reduce(-F.logsigmoid(beta * h), reduction)


def rn_dpo_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Region-Normalized DPO loss ``-log sigmoid(beta * h / |D|)`` (DESIGN.md section 2).

    The gradient on a pixel of ``D`` is ``-beta * sigmoid(-beta h / |D|) * s_p / |D|``, so
    one pair's total push is bounded by ``beta`` whatever ``|D|`` (typical beta 0.5..5).
    A pair with empty ``D`` gives ``log 2`` and zero gradient (``|D|`` is clamped to 1).

    Args: as :func:`dpo_loss`.

    Returns:
        The reduced loss, float32 (float64 if the logits are float64).
    """
    beta = _check_beta(beta)
    _check_reduction(reduction)
    h, n = _pair_margin(policy_logits, ref_logits, chosen, rejected)
    return _reduce(-F.logsigmoid(beta * h / n.clamp_min(1)), reduction)


@torch.no_grad()
def preference_stats(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, float]:
    """Detached logging figures over a batch of (P, 1, H, W) pairs.

    Returns:
        ``norm_margin``: mean of ``h / max(|D|, 1)``;
        ``d_frac``: mean of ``|D| / (H * W)``;
        ``reward_acc``: fraction of pairs with ``h > 0`` (an empty ``D`` counts as not).
    """
    h, n = _pair_margin(policy_logits, ref_logits, chosen, rejected)
    pixels = chosen.shape[-1] * chosen.shape[-2]
    return {
        "norm_margin": (h / n.clamp_min(1)).mean().item(),
        "d_frac": (n / pixels).mean().item(),
        "reward_acc": (h > 0).to(h.dtype).mean().item(),
    }


def supervised_loss() -> DiceCELoss:
    """MONAI Dice + BCE on logits: call with logits (B, 1, H, W) and a float {0, 1} target.

    Used for warm-up and for the optional ``lambda_sup`` anchor. Pass float32 logits
    (``logits.float()``) when the forward ran under autocast.
    """
    return DiceCELoss(sigmoid=True)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of ``sigmoid(logits)`` (TENT-style baseline, Wang et al. 2021).

    ``H = -[p log p + (1 - p) log(1 - p)]`` with ``log p = log sigmoid(z)`` and
    ``log(1 - p) = log sigmoid(-z)`` for stability. Logits of any shape, e.g. (B, 1, H, W).

    Returns:
        Scalar, float32 (float64 if ``logits`` is float64).
    """
    z = logits.to(_compute_dtype(logits))
    p = torch.sigmoid(z)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean()
