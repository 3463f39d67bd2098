"""The judge-reliability ledger the server keeps per site (DESIGN.md section 4).

Each preference round a site reports how its judge did on its calibration split. The ledger
keeps those figures, an exponential moving average of them, and a state:

- `trusted`   : EMA pair accuracy >= probation_below; full weight factor, the consortium's
                mining strategy and beta;
- `probation` : exclude_below <= EMA pair accuracy < probation_below; still aggregated with its
                (small) weight factor, but sent conservative settings for the next round:
                `skip_top` mining (second-best vs worst, a hedge against a wrong top-1), a
                minimum score gap of at least 0.05, and beta halved;
- `excluded`  : EMA pair accuracy < exclude_below; contributes nothing to preference rounds
                until its EMA recovers above exclude_below (it keeps training and reporting,
                so recovery is seen).

The weight factor g rises linearly from 0 at chance (pair accuracy 0.5) to 1 at perfect:
g = clip((acc - 0.5) / 0.5, 0, 1). A site's aggregation weight is pairs_used x g.
The ledger is a plain JSON file in the run directory, rewritten atomically after every round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import AggregationConfig, MiningConfig, PreferenceConfig

FIGURES = ("pair_accuracy", "spearman", "pair_gain")
TRUSTED, PROBATION, EXCLUDED = "trusted", "probation", "excluded"


def weight_factor(pair_accuracy: float) -> float:
    """g: 0 at chance-level pair accuracy (0.5) or worse, rising linearly to 1 at 1.0."""
    return min(max((pair_accuracy - 0.5) / 0.5, 0.0), 1.0)


@dataclass
class SiteRecord:
    state: str = TRUSTED
    ema: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    rejected: int = 0
    last_round: int = 0
    history: list[dict] = field(default_factory=list)
    revoked: int = 0  # the round its key was first seen revoked (fl-server revoke), 0: never


@dataclass
class Ledger:
    rounds_completed: int = 0
    sites: dict[str, SiteRecord] = field(default_factory=dict)

    def site(self, name: str) -> SiteRecord:
        return self.sites.setdefault(name, SiteRecord())

    def record_reliability(self, name: str, round_number: int, figures: dict, cfg: AggregationConfig) -> None:
        """Fold one round's calibration figures into the EMA and update the state.

        A round whose calibration produced no pairs carries no evidence and leaves the EMA alone.
        """
        record = self.site(name)
        record.last_round = round_number
        if figures.get("n_pairs", 0) > 0:
            for key in FIGURES:
                value = float(figures[key])
                old = record.ema.get(key)
                record.ema[key] = value if old is None else cfg.ema * value + (1 - cfg.ema) * old
            record.state = _state(record.ema["pair_accuracy"], cfg)
        record.history.append(
            {"round": round_number, **{k: float(figures.get(k, float("nan"))) for k in FIGURES},
             "n_pairs": int(figures.get("n_pairs", 0)), "state": record.state,
             "weight_factor": self.factor(name)}
        )

    def record_problem(self, name: str, round_number: int, kind: str) -> None:
        record = self.site(name)
        record.last_round = round_number
        if kind == "failed":
            record.failures += 1
        elif kind == "revoked":
            record.revoked = record.revoked or round_number
        else:
            record.rejected += 1

    def factor(self, name: str) -> float:
        """The reliability factor of a site's preference update (0 when excluded)."""
        record = self.site(name)
        if record.state == EXCLUDED or "pair_accuracy" not in record.ema:
            return 0.0
        return weight_factor(record.ema["pair_accuracy"])

    def settings_for(self, name: str, preference: PreferenceConfig) -> PreferenceConfig:
        """The preference settings this site gets next round (see the module docstring)."""
        if self.site(name).state == TRUSTED:
            return preference
        mining: MiningConfig = dataclasses.replace(
            preference.mining, strategy="skip_top", min_gap=max(preference.mining.min_gap, 0.05)
        )
        return dataclasses.replace(preference, mining=mining, beta=preference.beta / 2)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {"rounds_completed": self.rounds_completed,
                "sites": {k: dataclasses.asdict(v) for k, v in self.sites.items()}}

    @classmethod
    def from_dict(cls, raw: dict) -> "Ledger":
        return cls(rounds_completed=int(raw.get("rounds_completed", 0)),
                   sites={k: SiteRecord(**v) for k, v in raw.get("sites", {}).items()})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Ledger":
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else cls()


def _state(pair_accuracy: float, cfg: AggregationConfig) -> str:
    if pair_accuracy < cfg.exclude_below:
        return EXCLUDED
    if pair_accuracy < cfg.probation_below:
        return PROBATION
    return TRUSTED
