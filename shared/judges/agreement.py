"""Agreement judge: a proposal is good when the other proposals agree with it."""

from __future__ import annotations

import torch

from shared.judges.base import check_inputs
from shared.proposals import ProposalSet
from shared.reliability import pairwise_overlaps

__all__ = ["AgreementJudge"]


class AgreementJudge:
    """Mean Dice of each proposal against the other K - 1 proposals of its image.

    ``score[n, a] = 1/(K-1) * sum_{b != a} 2 |m_a & m_b| / (|m_a| + |m_b|)``, with the Dice of
    two empty masks taken as 1. Pairwise intersections come from one batched matrix product
    over the flattened masks. With K = 1 every score is 1.
    """

    name = "agreement"

    def score(self, images: torch.Tensor, proposals: ProposalSet, truth: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) images (unused), proposals with masks (N, K, H, W) -> (N, K) float32."""
        check_inputs(images, proposals)
        n, k = proposals.masks.shape[:2]
        if k < 2:
            return torch.ones((n, k), dtype=torch.float32)
        inter, size = pairwise_overlaps(proposals.masks)  # (N, K, K), (N, K)
        denom = size.unsqueeze(2) + size.unsqueeze(1)
        dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))
        others = dice.sum(2) - dice.diagonal(dim1=1, dim2=2)
        return (others / (k - 1)).float()
