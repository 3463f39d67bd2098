"""The judge interface: score K mask proposals per image without ground truth (DESIGN.md section 3, step 2).

A judge maps images (N, C, H, W) and their ProposalSet (K proposals per image) to scores
(N, K) float32, higher is better. Scores are compared only within an image (mining ranks the
K proposals of one image), but a judge should keep a comparable scale across images so that a
mining ``min_gap`` means the same everywhere.

A judge never receives ground truth: ``score`` takes the images and their proposals only. The
oracle, which ranks by true Dice for experiments, is given the masks of the split it scores when
it is built (``OracleJudge.bind``), and a site with a ``deployment:`` section refuses it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from shared.proposals import ProposalSet

__all__ = ["Judge", "check_inputs", "check_scores"]


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and a ``score`` method of this signature is a judge."""

    name: str

    def score(self, images: torch.Tensor, proposals: ProposalSet) -> torch.Tensor:
        """Score the proposals.

        Args:
            images: (N, C, H, W).
            proposals: N images' K proposals, ``masks`` (N, K, H, W).

        Returns:
            (N, K) float32 on the CPU, higher is better.
        """
        ...


def check_inputs(images: torch.Tensor | None, proposals: ProposalSet) -> None:
    """Raise ValueError naming the shapes when images and proposals do not match.

    ``images`` may be None for judges that do not look at the image.
    """
    if not isinstance(proposals, ProposalSet):
        raise TypeError(f"proposals must be a ProposalSet, got {type(proposals).__name__}")
    n, k, h, w = proposals.masks.shape
    if images is not None:
        if images.dim() != 4 or images.shape[0] != n or tuple(images.shape[2:]) != (h, w):
            raise ValueError(
                f"images have shape {tuple(images.shape)} but the proposals' masks are {tuple(proposals.masks.shape)}: "
                f"expected ({n}, C, {h}, {w})"
            )


def check_scores(scores: torch.Tensor, proposals: ProposalSet, judge_name: str) -> torch.Tensor:
    """Return scores as (N, K) float32 on the CPU, or raise naming the judge and the shapes."""
    expected = tuple(proposals.masks.shape[:2])
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"judge {judge_name!r} returned scores of shape {got}, expected (N, K) = {expected}")
    scores = scores.detach().float().cpu()
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).any(1).nonzero().flatten()
        raise ValueError(f"judge {judge_name!r} returned NaN or Inf scores for images {bad[:10].tolist()}")
    return scores
