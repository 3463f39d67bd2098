"""Judges that score mask proposals without ground truth (DESIGN.md section 3, step 2).

``build_judge(cfg, work_dir)`` makes the judge a site's config asks for. The learned judge is
imported only when asked for (it trains and loads a network from the site's work_dir).
"""

from __future__ import annotations

from pathlib import Path

from shared.config import JUDGE_KINDS, JudgeConfig
from shared.judges.agreement import AgreementJudge
from shared.judges.base import Judge, check_inputs, check_scores
from shared.judges.oracle import OracleJudge
from shared.judges.uncertainty import UncertaintyJudge

__all__ = ["Judge", "AgreementJudge", "UncertaintyJudge", "OracleJudge", "build_judge", "check_inputs", "check_scores"]


def build_judge(cfg: JudgeConfig, work_dir: Path | str, site: str | None = None) -> Judge:
    """The judge of kind ``cfg.kind``.

    Args:
        cfg: the site's judge settings (noise_std / flip_prob / invert / seed for the oracle).
        work_dir: the site's work folder, where the learned judge is stored.
        site: the site's name, used in error messages.
    """
    if cfg.kind == "agreement":
        return AgreementJudge()
    if cfg.kind == "uncertainty":
        return UncertaintyJudge()
    if cfg.kind == "oracle":
        return OracleJudge(noise_std=cfg.noise_std, flip_prob=cfg.flip_prob, invert=cfg.invert, seed=cfg.seed, site=site)
    if cfg.kind == "learned":
        from shared.judges.learned import LearnedJudge

        return LearnedJudge.load(Path(work_dir))
    if cfg.kind == "federated":
        raise ValueError("judge.kind 'federated' is the consortium's judge: it comes with each round from the "
                         "server (shared.judge_training.consortium_judge), not from the site's work_dir")
    raise ValueError(f"judge.kind {cfg.kind!r} is not one of {', '.join(JUDGE_KINDS)}")
