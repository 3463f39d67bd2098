"""Uncertainty judge: how likely a proposal is under the probability map of the passes that did not make it."""

from __future__ import annotations

import math

import torch

from shared.judges.base import check_inputs
from shared.proposals import ProposalSet

__all__ = ["UncertaintyJudge"]

_BLOCK = 64  # images per matrix product


class UncertaintyJudge:
    """Entropy-weighted mean log-likelihood of each proposal under a leave-one-out probability map.

    For proposal ``a`` made from pass ``s`` (``ProposalSet.sources``), ``q_p`` is the mean
    foreground probability of pixel ``p`` over the P passes *other than* ``s`` (leave-one-out;
    over every pass for a threshold of the mean, or when the set carries no per-pass maps),
    clamped to ``[eps, 1 - eps]``. With its normalized binary entropy
    ``H_p = -(q_p log q_p + (1 - q_p) log(1 - q_p)) / log 2`` in [0, 1] and the confidence weight
    ``w_p = 1 - H_p``, the score of mask ``m`` is

        score(m) = sum_p w_p [m_p log q_p + (1 - m_p) log(1 - q_p)] / (sum_p w_p + 1e-6)

    a weighted mean per-pixel log-likelihood (<= 0, higher is better). Pixels where the passes
    disagree (q near 0.5) weigh little; going against a confident pixel costs up to ``-log(eps)``.
    Under one map the mask ``q > 0.5`` maximises the score, which is why each proposal is scored
    against the passes that did not produce it: the mean over all passes would make the proposal
    closest to it the built-in winner. Computed as one matrix product per source:
    ``m . (w * logit(q)) + sum_p w_p log(1 - q_p)``.
    """

    name = "uncertainty"

    def __init__(self, eps: float = 1e-4):
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.eps = float(eps)

    def score(self, images: torch.Tensor, proposals: ProposalSet) -> torch.Tensor:
        """(N, C, H, W) images (unused), proposals with masks (N, K, H, W) -> (N, K) float32."""
        check_inputs(images, proposals)
        n, k = proposals.masks.shape[:2]
        passes = proposals.n_passes
        sources = proposals.sources if passes >= 2 and proposals.sources is not None else (-1,) * k
        out = torch.empty((n, k), dtype=torch.float32)
        for source in sorted(set(sources)):
            cols = [a for a in range(k) if sources[a] == source]
            q = proposals.mean_prob.double()
            if 0 <= source < passes:
                q = (passes * q - proposals.pass_probs[:, source].double()) / (passes - 1)
            out[:, cols] = self._score(q, proposals.masks[:, cols])
        return out

    def _score(self, q: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        q = q.clamp(self.eps, 1 - self.eps).flatten(1)  # (N, P)
        log_q, log_1mq = q.log(), (-q).log1p()
        weight = 1 + (q * log_q + (1 - q) * log_1mq) / math.log(2)  # 1 - normalized entropy
        weight = weight.clamp_min(0)
        slope = (weight * (log_q - log_1mq)).float()  # (N, P)
        n = q.shape[0]
        ll = torch.empty((n, masks.shape[1]), dtype=torch.float64)
        for start in range(0, n, _BLOCK):  # bounds the float copy of the masks
            m = masks[start : start + _BLOCK].flatten(2).float()  # (b, K, P)
            ll[start : start + _BLOCK] = torch.einsum("nkp,np->nk", m, slope[start : start + _BLOCK]).double()
        ll = ll + (weight * log_1mq).sum(1, keepdim=True)
        return (ll / (weight.sum(1, keepdim=True) + 1e-6)).float()
