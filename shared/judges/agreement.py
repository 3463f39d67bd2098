"""Agreement judge: a proposal is good when the passes that did not produce it agree with it."""

from __future__ import annotations

import torch

from shared.judges.base import check_inputs
from shared.proposals import ProposalSet
from shared.reliability import pairwise_overlaps

__all__ = ["AgreementJudge", "comparison_weights"]


class AgreementJudge:
    """Mean Dice of each proposal against the raw passes that did not produce it (leave-one-out).

    ``score[n, a] = mean_{j in C(a)} 2 |m_a & m_j| / (|m_a| + |m_j|)``, with the Dice of two empty
    masks taken as 1, where ``C(a)`` are the pass proposals (TTA views and MC samples) other
    than ``a`` and other than the pass ``a`` was made from (``ProposalSet.sources``): a mask made
    from the identity pass is not credited for agreeing with the identity pass. A threshold of the
    mean over every pass has no pass left out and is compared with all of them. Without pass
    information (``pass_probs`` None) ``C(a)`` is every other proposal. Pairwise intersections
    come from one batched matrix product over the flattened masks. With K = 1 every score is 1.
    """

    name = "agreement"

    def score(self, images: torch.Tensor, proposals: ProposalSet) -> torch.Tensor:
        """(N, C, H, W) images (unused), proposals with masks (N, K, H, W) -> (N, K) float32."""
        check_inputs(images, proposals)
        n, k = proposals.masks.shape[:2]
        if k < 2:
            return torch.ones((n, k), dtype=torch.float32)
        inter, size = pairwise_overlaps(proposals.masks)  # (N, K, K), (N, K)
        denom = size.unsqueeze(2) + size.unsqueeze(1)
        dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
        weights = comparison_weights(proposals).to(dice.dtype)  # (K, K)
        return ((dice * weights).sum(2) / weights.sum(1)).float()


def comparison_weights(proposals: ProposalSet) -> torch.Tensor:
    """(K, K) bool: row a marks the proposals ``a`` is compared with (see AgreementJudge)."""
    k, passes = proposals.k, proposals.n_passes
    others = ~torch.eye(k, dtype=torch.bool)
    if passes == 0 or proposals.sources is None:
        return others
    weights = others.clone()
    weights[:, passes:] = False
    for a, source in enumerate(proposals.sources):
        if 0 <= source < passes:
            weights[a, source] = False
        if not weights[a].any():  # nothing independent left (one pass): every other proposal
            weights[a] = others[a]
    return weights
