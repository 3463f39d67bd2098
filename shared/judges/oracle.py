"""Oracle judge: true Dice with controlled noise, for simulation and experiments only."""

from __future__ import annotations

import numpy as np
import torch

from shared.judges.base import check_inputs
from shared.proposals import ProposalSet
from shared.reliability import dice_scores

__all__ = ["OracleJudge"]


class OracleJudge:
    """True Dice against ground truth, degraded on purpose to sweep judge reliability.

    ``score = dice + noise_std * N(0, 1)`` per proposal; then each image, with probability
    ``flip_prob``, has its scores negated (its ranking reversed); ``invert`` negates every score
    (an adversarial judge). ``noise_std = 0, flip_prob = 0`` ranks exactly by true Dice.

    Randomness: call ``c`` (counted from 0 on this instance) draws from a generator seeded with
    ``(seed, c)``, unless ``score`` is given an explicit ``seed``; a run that makes the same
    calls gets the same scores.
    """

    name = "oracle"

    def __init__(self, noise_std: float = 0.0, flip_prob: float = 0.0, invert: bool = False, seed: int = 0,
                 site: str | None = None):
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be between 0 and 1, got {flip_prob}")
        self.noise_std = float(noise_std)
        self.flip_prob = float(flip_prob)
        self.invert = bool(invert)
        self.seed = int(seed)
        self.site = site
        self.calls = 0

    def score(self, images: torch.Tensor, proposals: ProposalSet, truth: torch.Tensor | None = None,
              seed: int | None = None) -> torch.Tensor:
        """(N, C, H, W) images (unused), proposals with masks (N, K, H, W), truth (N, 1, H, W) -> (N, K)."""
        if truth is None:
            where = f"the split being judged at site {self.site!r}" if self.site else "the split being judged"
            raise ValueError(
                f"the oracle judge needs ground-truth masks: {where} has none. The oracle is for "
                f"simulation, where the unlabeled split has masks; otherwise use judge.kind "
                f"agreement, uncertainty or learned"
            )
        check_inputs(images, proposals, truth)
        scores = dice_scores(proposals.masks, truth)
        n, k = scores.shape
        if seed is None:
            seed, self.calls = _mix(self.seed, self.calls), self.calls + 1
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, k), generator=generator)
        flips = torch.rand((n, 1), generator=generator) < self.flip_prob
        scores = scores + self.noise_std * noise
        scores = torch.where(flips, -scores, scores)
        return -scores if self.invert else scores


def _mix(seed: int, call: int) -> int:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, call]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
