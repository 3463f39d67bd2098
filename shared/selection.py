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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from shared.config import SelectionConfig

# a fall of exactly the margin is kept, whatever the float rounding of `best - dice`
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Selection:
    """Where selection stands after a round; stored in its checkpoint, so a resume continues it."""

    best_round: int | None = None
    best_dice: float | None = None
    rolled_back: bool = False  # this round was undone: the next one starts from best_round's model
    # the best round's (calibration Dice, images) per site: a later round is compared with it over
    # the sites both heard from, so a site that drops out or joins cannot fake a fall or a best
    best_reports: dict = field(default_factory=dict, compare=True)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> Selection:
        """From a checkpoint's payload; a checkpoint made before selection existed gives none."""
        raw = raw or {}
        best_round, best_dice = raw.get("best_round"), raw.get("best_dice")
        reports = {str(site): (float(d), float(n)) for site, (d, n) in (raw.get("best_reports") or {}).items()}
        return cls(None if best_round is None else int(best_round),
                   None if best_dice is None else float(best_dice), bool(raw.get("rolled_back", False)), reports)


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
           cfg: SelectionConfig, reports: Mapping[str, tuple[float | None, float | None]] | None = None) -> Selection:
    """The selection after `server_round`, whose consortium calibration Dice is `dice` (from the
    per-site `reports`, site -> (Dice, images), when given).

    The round is compared with the best so far over the sites both heard from (with no per-site
    reports on either side, on the consortium figures). A higher figure makes this round the best
    (a tie keeps the earlier one). A round without a figure, or with no site in common, is kept as
    it is. Otherwise a round of a phase in `cfg.rollback_phases` that falls more than
    `cfg.rollback_margin` below the best is rolled back."""
    reports = {site: r for site, r in (reports or {}).items() if consortium_dice([r])[0] is not None}
    keep = Selection(previous.best_round, previous.best_dice, False, previous.best_reports)
    if dice is None or not math.isfinite(dice):
        return keep
    if previous.best_dice is None:
        return Selection(server_round, dice, False, reports)
    now, best = _comparable(previous, dice, reports)
    if now is None:
        return keep
    if now > best:
        return Selection(server_round, dice, False, reports)
    fell = best - now
    rolled_back = (cfg.rollback_margin is not None and phase in cfg.rollback_phases
                   and fell > cfg.rollback_margin + _TOLERANCE)
    return Selection(previous.best_round, previous.best_dice, rolled_back, previous.best_reports)


def _comparable(previous: Selection, dice: float, reports: Mapping) -> tuple[float | None, float | None]:
    """(this round, the best round) over the sites both reported; the consortium figures when
    either round has no per-site reports (a checkpoint from before they were kept)."""
    if not (reports and previous.best_reports):
        return dice, previous.best_dice
    common = [site for site in reports if site in previous.best_reports]
    if not common:
        return None, None
    return (consortium_dice(reports[s] for s in common)[0],
            consortium_dice(previous.best_reports[s] for s in common)[0])
