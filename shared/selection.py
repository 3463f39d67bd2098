"""Model selection on the consortium's calibration Dice, and the rollback of a round that falls.

Every round each site scores the new global model on its labelled calibration split (the
federated evaluate; a site under its `min_images` reports nothing). The consortium figure is
the image-weighted mean of those reports; the best round is kept as best.pt, and a round that
falls too far below it can be undone (`SelectionConfig`). Selection never looks at test Dice,
so the test score of the chosen model stays an honest estimate. Pure functions: the server
(fl_server.federation) stores the `Selection` in every checkpoint and acts on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from shared.config import SelectionConfig

# a fall of exactly the margin is kept, whatever the float rounding of `best - dice`
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Selection:
    """Where selection stands after a round; stored in its checkpoint, so a resume continues it."""

    best_round: int | None = None
    best_dice: float | None = None
    rolled_back: bool = False  # this round was undone: the next one starts from best_round's model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> Selection:
        """From a checkpoint's payload; a checkpoint made before selection existed gives none."""
        raw = raw or {}
        best_round, best_dice = raw.get("best_round"), raw.get("best_dice")
        return cls(None if best_round is None else int(best_round),
                   None if best_dice is None else float(best_dice), bool(raw.get("rolled_back", False)))


def consortium_dice(reports: Iterable[tuple[float | None, float | None]]) -> tuple[float | None, int]:
    """The image-weighted mean of (calibration Dice, images) reports, and the images behind it;
    a report without a finite Dice or with no images is no evidence and is left out."""
    total, images = 0.0, 0
    for dice, count in reports:
        if dice is None or count is None or not math.isfinite(dice) or not count > 0:
            continue
        total += dice * count
        images += int(count)
    return (total / images if images else None), images


def select(previous: Selection, server_round: int, phase: str, dice: float | None,
           cfg: SelectionConfig) -> Selection:
    """The selection after `server_round`, whose consortium calibration Dice is `dice`.

    A higher Dice than the best so far makes this round the best (a tie keeps the earlier one). A
    round without a figure is kept as it is. Otherwise a round of a phase in `cfg.rollback_phases`
    that falls more than `cfg.rollback_margin` below the best is rolled back."""
    if dice is None or not math.isfinite(dice):
        return Selection(previous.best_round, previous.best_dice, False)
    if previous.best_dice is None or dice > previous.best_dice:
        return Selection(server_round, dice, False)
    fell = previous.best_dice - dice
    rolled_back = (cfg.rollback_margin is not None and phase in cfg.rollback_phases
                   and fell > cfg.rollback_margin + _TOLERANCE)
    return Selection(previous.best_round, previous.best_dice, rolled_back)
