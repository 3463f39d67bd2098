"""The judge-reliability ledger the server keeps per site (DESIGN.md section 4).

Each preference round a site reports how its judge did on its calibration split. Under
`aggregation.statistic: wilson` (the default) the ledger acts on a confidence bound:

- evidence: the informative pairs of calibration (plausible proposals whose true Dice differs by
  at least `informative_gap`; shared.reliability), scored by the site with the consortium's base
  mining settings, so probation never changes what is measured, and counted as pairs (`bound_counts:
  pairs`, the default) or as units (`units`: the images that hold them, or their videos or
  patients where the site sets `data.groups`, since the pairs of one unit share its errors; a
  reply without `informative_units`, from a site before it, counts its pairs);
- pooling: correct and total counts are decayed sums, C <- c + (1 - ema) C and N <- n + (1 - ema) N.
  The point estimate C / N then weighs rounds exactly as the EMA of the accuracy did (recent rounds
  count more, since the model and its proposals change), but by their evidence, and N says how
  much evidence there is; `bound` is the 95 % Wilson lower bound of C / N;
- state from the bound: `trusted` (bound >= probation_below), `probation` (exclude_below <= bound <
  probation_below: still aggregated with its small factor, sent conservative settings for the next
  round: `skip_top` mining, a score gap of at least 0.05, beta halved), `excluded` (bound <
  exclude_below: its judge steers nothing until its bound recovers; it keeps measuring its judge on
  calibration and reporting, so recovery is seen. Under `excluded_steps: anchor` (the default) it
  takes the control's anchor-only steps, weighed by its labelled images, so the consortium keeps
  its labels; under `preference` it keeps taking preference steps whose update weighs nothing);
- outcome check (`outcome_margin`, `outcome_rounds`): a judge can rank calibration masks well and
  still pull the model down. A round whose judged update lowered the site's calibration Dice by more
  than outcome_margin is harmful; outcome_rounds harmful rounds in a row exclude the site whatever
  its bound (a harmless round resets the count; a round without a judged update leaves it, so a
  site held to anchor-only steps, `excluded_steps: anchor`, stays excluded for the run).

The weight factor g rises linearly from 0 at chance (0.5) to 1 at perfect: g = clip((x - 0.5) / 0.5,
0, 1), x the bound. A site's aggregation weight is pairs_used x g.
`statistic: ema_point` is the rule before: state and g from the EMA of mined-pair accuracy.
The ledger is a plain JSON file in the run directory, rewritten atomically after every round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import AggregationConfig, MiningConfig, PreferenceConfig
from shared.reliability import wilson_lower_bound

FIGURES = ("pair_accuracy", "spearman", "pair_gain")
TRUSTED, PROBATION, EXCLUDED = "trusted", "probation", "excluded"
_SEVERITY = (TRUSTED, PROBATION, EXCLUDED)


def pooled_counts(correct: float, pairs: float, round_correct: float, round_pairs: float, ema: float) -> tuple[float, float]:
    """Fold one round's informative-pair counts into the decayed sums (module docstring)."""
    keep = 1.0 - ema
    return round_correct + keep * correct, round_pairs + keep * pairs


def harm_streak(streak: int, outcome_gain: float | None, margin: float | None) -> int:
    """Consecutive harmful rounds: +1 when the judged update lowered calibration Dice by more than
    `margin`, 0 after a harmless one, unchanged without evidence (or with the check off)."""
    if margin is None or outcome_gain is None:
        return streak
    return streak + 1 if outcome_gain < -margin else 0


def outcome_evidence(figures: dict) -> float | None:
    """The round's outcome gain when the judge steered the update (pairs used, not gated), else None:
    an anchor-only or empty round says nothing about the judge."""
    if "outcome_gain" not in figures or figures.get("pairs_used", 0) <= 0 or figures.get("gated", 0) >= 1:
        return None
    return float(figures["outcome_gain"])


def worse(a: str, b: str) -> str:
    return max(a, b, key=_SEVERITY.index)


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
    pooled: dict[str, float] = field(default_factory=dict)  # decayed informative counts (units or pairs): correct, pairs
    harm_streak: int = 0  # consecutive rounds whose judged update lowered calibration Dice

    def bound(self) -> float | None:
        """The Wilson lower bound of the pooled informative-pair accuracy (None: no evidence yet)."""
        if self.pooled.get("pairs", 0.0) <= 0:
            return None
        return wilson_lower_bound(self.pooled["correct"], self.pooled["pairs"])

    def estimate(self) -> float | None:
        """The pooled informative-pair accuracy the bound belongs to (None: no evidence yet)."""
        pairs = self.pooled.get("pairs", 0.0)
        return self.pooled["correct"] / pairs if pairs > 0 else None


@dataclass
class Ledger:
    rounds_completed: int = 0
    sites: dict[str, SiteRecord] = field(default_factory=dict)

    def site(self, name: str) -> SiteRecord:
        return self.sites.setdefault(name, SiteRecord())

    def record_reliability(self, name: str, round_number: int, figures: dict, cfg: AggregationConfig) -> None:
        """Fold one round's calibration figures (and outcome) into the record and update the state.

        A round whose calibration produced no pairs carries no judge evidence and leaves the
        EMA and pooled counts alone.
        """
        record = self.site(name)
        record.last_round = round_number
        if figures.get("n_pairs", 0) > 0:
            for key in FIGURES:
                value = float(figures[key])
                old = record.ema.get(key)
                record.ema[key] = value if old is None else cfg.ema * value + (1 - cfg.ema) * old
        n_informative = float(figures.get("informative_pairs", 0))
        n_evidence = (min(float(figures.get("informative_units", n_informative)), n_informative)
                      if cfg.bound_counts == "units" else n_informative)
        if n_informative > 0 and n_evidence > 0:
            correct = float(figures["informative_pair_accuracy"]) * n_evidence
            c, n = pooled_counts(record.pooled.get("correct", 0.0), record.pooled.get("pairs", 0.0),
                                 correct, n_evidence, cfg.ema)
            record.pooled = {"correct": c, "pairs": n}
        gain = outcome_evidence(figures)
        if cfg.statistic == "ema_point":
            if figures.get("n_pairs", 0) > 0:
                record.state = _state(record.ema["pair_accuracy"], cfg)
        else:
            record.harm_streak = harm_streak(record.harm_streak, gain, cfg.outcome_margin)
            bound = record.bound()
            judged = _state(bound, cfg) if bound is not None else TRUSTED  # no evidence yet: g is 0 anyway
            harmed = EXCLUDED if cfg.outcome_margin is not None and record.harm_streak >= cfg.outcome_rounds else TRUSTED
            record.state = worse(judged, harmed)
        record.history.append(
            {"round": round_number, **{k: float(figures.get(k, float("nan"))) for k in FIGURES},
             "n_pairs": int(figures.get("n_pairs", 0)),
             "informative_pairs": int(n_informative), "informative_units": figures.get("informative_units"),
             "evidence": n_evidence,
             "informative_pair_accuracy": figures.get("informative_pair_accuracy"),
             "bound": record.bound(), "outcome_gain": gain, "harm_streak": record.harm_streak,
             "state": record.state, "weight_factor": self.factor(name, cfg.statistic)}
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

    def factor(self, name: str, statistic: str = "wilson") -> float:
        """The reliability factor of a site's preference update (0 when excluded or without evidence)."""
        record = self.site(name)
        if record.state == EXCLUDED:
            return 0.0
        if statistic == "ema_point":
            return weight_factor(record.ema["pair_accuracy"]) if "pair_accuracy" in record.ema else 0.0
        bound = record.bound()
        return 0.0 if bound is None else weight_factor(bound)

    def settings_for(self, name: str, preference: PreferenceConfig, excluded_steps: str = "anchor") -> PreferenceConfig:
        """The preference settings this site gets next round (see the module docstring). Under
        `excluded_steps: anchor` an excluded site gets `method: none`: the control's anchor-only
        steps, which its judge does not steer (it is still measured on calibration); without
        anchor steps (`lambda_sup: 0`) it keeps its conservative preference settings."""
        state = self.site(name).state
        if state == TRUSTED:
            return preference
        mining: MiningConfig = dataclasses.replace(
            preference.mining, strategy="skip_top", min_gap=max(preference.mining.min_gap, 0.05)
        )
        conservative = dataclasses.replace(preference, mining=mining, beta=preference.beta / 2)
        if state == EXCLUDED and excluded_steps == "anchor" and preference.lambda_sup > 0:
            return dataclasses.replace(conservative, method="none")
        return conservative

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
