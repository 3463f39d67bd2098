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

    The oracle is the one judge that reads ground truth, and it gets it when it is built, never
    through ``score``: ``OracleJudge(truth=masks)`` or ``oracle.bind(masks)`` holds the (N, 1, H, W)
    masks of one split, and ``score`` looks up the rows of the images it is given by
    ``proposals.positions`` (their positions in that split). An oracle without truth is a template of
    settings: ``score`` refuses, ``bind`` makes a scoring one.

    Randomness: call ``c`` (counted from 0 on this instance) draws from a generator seeded with
    ``(seed, c)``, unless ``score`` is given an explicit ``seed``; a run that makes the same
    calls gets the same scores. The ``b``-th ``bind`` of an instance gets the seed ``(seed, b)``.
    """

    name = "oracle"

    def __init__(self, noise_std: float = 0.0, flip_prob: float = 0.0, invert: bool = False, seed: int = 0,
                 site: str | None = None, truth: torch.Tensor | None = None):
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be between 0 and 1, got {flip_prob}")
        if truth is not None and (truth.dim() != 4 or truth.shape[1] != 1):
            raise ValueError(f"truth must be (N, 1, H, W) masks, got {tuple(truth.shape)}")
        self.noise_std = float(noise_std)
        self.flip_prob = float(flip_prob)
        self.invert = bool(invert)
        self.seed = int(seed)
        self.site = site
        self.truth = truth
        self.calls = 0
        self.binds = 0

    def bind(self, truth: torch.Tensor | None) -> OracleJudge:
        """An oracle with these settings that scores the split whose masks are ``truth``."""
        if truth is None:
            where = f"the split being judged at site {self.site!r}" if self.site else "the split being judged"
            raise ValueError(
                f"the oracle judge needs ground-truth masks: {where} has none. The oracle is for "
                f"simulation, where the unlabeled split has masks; otherwise use judge.kind "
                f"agreement, uncertainty or learned"
            )
        seed, self.binds = _mix(self.seed, self.binds), self.binds + 1
        return OracleJudge(self.noise_std, self.flip_prob, self.invert, seed, self.site, truth)

    def score(self, images: torch.Tensor, proposals: ProposalSet, seed: int | None = None) -> torch.Tensor:
        """(N, C, H, W) images (unused), proposals with masks (N, K, H, W) -> (N, K)."""
        if self.truth is None:
            raise ValueError("this oracle judge holds no ground truth: bind it to a split's masks first "
                             "(OracleJudge.bind, or OracleJudge(truth=...))")
        check_inputs(images, proposals)
        index = proposals.positions
        out_of_range = index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.truth))
        if out_of_range or tuple(self.truth.shape[2:]) != tuple(proposals.masks.shape[2:]):
            span = f"{index.min().item()}..{index.max().item()}" if index.numel() else "none"
            raise ValueError(f"the proposals (images {span}, size "
                             f"{tuple(proposals.masks.shape[2:])}) are not of the split this oracle holds "
                             f"(masks {tuple(self.truth.shape)})")
        scores = dice_scores(proposals.masks, self.truth.index_select(0, index))
        n, k = scores.shape
        if seed is None:
            seed, self.calls = _mix(self.seed, self.calls), self.calls + 1
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, k), generator=generator)
        flips = torch.rand((n, 1), generator=generator) < self.flip_prob
        scores = scores + self.noise_std * noise
        scores = torch.where(flips, -scores, scores)
        return -scores if self.invert else scores


def bind_to(judge, truth: torch.Tensor | None):
    """The judge to score one split with: an oracle bound to that split's masks; any other judge
    as it is (it never sees them)."""
    return judge.bind(truth) if isinstance(judge, OracleJudge) else judge


def _mix(seed: int, call: int) -> int:
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, call]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
