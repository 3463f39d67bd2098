"""Every judge on the same proposals of the same base, one table (prints figures; not a test).

    python benchmarks/judges.py --base runs/experiments/signal/bases/polyp-seed0-<digest>
                                [--fold-steps 600] [--folds 3] [--rounds 3] [--steps 100] [--rank-weight 0]
                                [--cache DIR] [--pool N] [--out FILE.md]

On a cached supervised base of `benchmarks/experiments.py` (its `consortium.yaml`, `sites/` and
last checkpoint) this measures, at every training site, on its calibration split, with the
consortium's own proposal and mining settings (`shared.training.calibration_reliability`, the
figures a preference round reports and the ledger reads):

- `learned`: the site's own quality judge, trained on its labelled split alone
  (`rounds x steps` Adam steps);
- `federated`: the consortium's quality judge, `rounds` rounds of `steps` steps at every site,
  averaged by labelled images between rounds (`shared.judge_training`, in process: the maths of
  the server's judge rounds without Flower);
- `agreement` and `uncertainty`, the label-free judges.

Both learned judges train on the same out-of-fold proposals (k segmenters trained `--fold-steps`
steps on k-1 folds of each site's labelled split) and the same number of steps per site, so the
only difference between them is whose labels taught them. The within-image Spearman, the
informative pairs (true-Dice gap >= the consortium's informative_gap, both masks plausible), their
accuracy, the images or groups that hold them (the units), the Wilson bound with a trial a pair
(the ledger's default, `bound_counts: pairs`) and with a trial a unit (`bound_counts: units`), and
the Dice of each judge's pick against identity and best-of-K.
`--pool N` measures every judge again on N frames of each site's unlabelled split, where a
simulated site has the masks (the judge is used there, never measured there): whether the
calibration bound holds on the frames the judge steers the model with.
`--rank-weight` adds the within-image ranking term to both learned judges' training; `--cache DIR`
keeps each site's out-of-fold proposals there (`DIR/<site>/judge_oof.pt`, the sites' own cache), so
a second run with other judge settings skips the segmenters.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headroom import load_base, print_tables  # noqa: E402  (benchmarks/, this script's folder)
from shared.aggregation import weighted_average  # noqa: E402
from shared.config import QualityJudgeConfig, load_site, to_dict  # noqa: E402
from shared.data import load_site_data  # noqa: E402
from shared.judge_training import (  # noqa: E402
    cached_out_of_fold_proposals, consortium_judge, initial_judge_state, out_of_fold_proposals)
from shared.judges import AgreementJudge, UncertaintyJudge  # noqa: E402
from shared.site import model_from_config  # noqa: E402
from shared.reliability import wilson_lower_bound  # noqa: E402
from shared.training import calibration_reliability, sample_unlabeled  # noqa: E402

KINDS = ("federated", "learned", "agreement", "uncertainty")
COLUMNS = ("spearman", "informative_pairs", "informative_units", "informative_pair_accuracy", "pair_accuracy",
           "dice_identity", "dice_best", "dice_pick")
POOL_COLUMNS = ("spearman", "informative_pair_accuracy", "dice_identity", "dice_pick")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="a cached base folder of benchmarks/experiments.py")
    parser.add_argument("--fold-steps", type=int, default=QualityJudgeConfig.fold_steps,
                        help="steps of each out-of-fold segmenter (default: quality_judge's default)")
    parser.add_argument("--folds", type=int, default=QualityJudgeConfig.folds,
                        help="out-of-fold segmenters a site (default: quality_judge's default)")
    parser.add_argument("--rounds", type=int, default=QualityJudgeConfig.rounds, help="judge rounds (federated)")
    parser.add_argument("--steps", type=int, default=QualityJudgeConfig.steps, help="local steps a judge round")
    parser.add_argument("--rank-weight", type=float, default=QualityJudgeConfig.rank_weight,
                        help="weight of the within-image ranking term of both learned judges")
    parser.add_argument("--judge-seed", type=int, default=0,
                        help="seeds both learned judges' starting weights and draws (not the out-of-fold segmenters)")
    parser.add_argument("--judges", default=",".join(KINDS), help=f"which judges to measure (default {','.join(KINDS)})")
    parser.add_argument("--cache", type=Path, help="keep the out-of-fold proposals here, per site")
    parser.add_argument("--pool", type=int, default=0,
                        help="also measure on this many frames of each site's unlabelled split (it needs their masks)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")
    kinds = [kind for kind in KINDS if kind in args.judges.split(",")]
    if not kinds or set(args.judges.split(",")) - set(KINDS):
        parser.error(f"--judges takes a comma-separated subset of {','.join(KINDS)}, got {args.judges!r}")
    cfg, checkpoint, model = load_base(args.base)
    quality = dataclasses.replace(cfg.quality_judge or QualityJudgeConfig(), fold_steps=args.fold_steps,
                                  folds=args.folds, rounds=args.rounds, steps=args.steps, rank_weight=args.rank_weight)
    sites = [load_site(path) for path in cfg.sites]
    if args.pool < 0:
        parser.error(f"--pool must be >= 0, got {args.pool}")
    data = {site.name: load_site_data(site, splits=("labeled", "calibration") + (("unlabeled",) if args.pool else ()))
            for site in sites}
    unmasked = [name for name, d in data.items() if args.pool and d["unlabeled"].masks is None]
    if unmasked:
        parser.error(f"--pool: the unlabelled split of {', '.join(unmasked)} has no masks to measure with")
    # drawn as a preference round draws its frames (shared.training.sample_unlabeled), seeded by the consortium
    pools = {name: sample_unlabeled(d["unlabeled"], args.pool, cfg.seed) for name, d in data.items()} if args.pool else {}
    started = time.perf_counter()
    fold_training = dataclasses.replace(cfg.supervised, steps=quality.fold_steps)
    oof = {name: site_out_of_fold(args.cache, name, d["labeled"], cfg, fold_training, quality) for name, d in data.items()}
    print(f"out-of-fold proposals: {time.perf_counter() - started:.0f} s", flush=True)

    judges = {name: {"agreement": AgreementJudge(), "uncertainty": UncertaintyJudge()} for name in data}
    judge_seed, draws = quality.seed + args.judge_seed, 1000 * args.judge_seed  # judge seed 0: as before
    for name, d in data.items() if "learned" in kinds else ():  # the site's own: all its steps on its own labels
        local = consortium_judge(initial_judge_state(d["labeled"].images.shape[1], judge_seed),
                                 d["labeled"].images.shape[1], d["labeled"].images.shape[-1])
        local.fit(d["labeled"].images, d["labeled"].masks, oof[name], steps=quality.rounds * quality.steps,
                  lr=quality.lr, batch_size=quality.batch_size, holdout=0.0, draw_seed=draws + 1,
                  rank_weight=quality.rank_weight)
        judges[name]["learned"] = local
    state = initial_judge_state(cfg.model.in_channels, judge_seed)
    for judge_round in range(1, quality.rounds + 1 if "federated" in kinds else 1):  # the server's judge rounds
        updates, counts = [], []
        for name, d in data.items():
            judge = consortium_judge(state, d["labeled"].images.shape[1], d["labeled"].images.shape[-1])
            judge.fit(d["labeled"].images, d["labeled"].masks, oof[name], steps=quality.steps, lr=quality.lr,
                      batch_size=quality.batch_size, holdout=0.0, draw_seed=draws + judge_round,
                      rank_weight=quality.rank_weight)
            updates.append({k: v.detach().clone() for k, v in judge.net.state_dict().items()})
            counts.append(len(d["labeled"].names))
        state = weighted_average(updates, counts)
    for name, d in data.items():
        judges[name]["federated"] = consortium_judge(state, d["labeled"].images.shape[1], d["labeled"].images.shape[-1])
    print(f"judges trained: {time.perf_counter() - started:.0f} s", flush=True)

    lines = [f"Base `{args.base.name}` ({checkpoint.name}); calibration images: "
             + ", ".join(f"{name} {len(d['calibration'].names)}" for name, d in data.items())
             + "; labelled: " + ", ".join(f"{name} {len(d['labeled'].names)}" for name, d in data.items())
             + f"; judges trained {quality.rounds} x {quality.steps} steps, out-of-fold segmenters "
               f"{quality.folds} x {quality.fold_steps} steps, ranking term weight {quality.rank_weight:g}, "
               f"judge seed {args.judge_seed}.", "",
             "| judge | site | within-image Spearman | informative pairs | units | "
             "informative pair acc. | pair acc. (mined) | identity | best-of-K | pick | "
             "Wilson bound (a trial a unit) | Wilson bound (a trial a pair) |"
             + (" pool: Spearman | pool: informative acc. | pool: identity | pool: pick |" if pools else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if pools else "")]
    if pools:
        lines[0] += (" Pool: " + ", ".join(f"{name} {len(pool.names)}" for name, pool in pools.items())
                     + " unlabelled frames, measured with their masks.")
    for kind in kinds:
        for name, d in data.items():
            figures = measure(model, d["calibration"], judges[name][kind], cfg)
            units = figures["informative_units"]
            bounds = [wilson_lower_bound(figures["informative_pair_accuracy"] * units, units),
                      figures["informative_wilson"]]
            cells = [kind, name] + [_cell(figures.get(key)) for key in COLUMNS] + [_cell(b) for b in bounds]
            if pools:
                pool_figures = measure(model, pools[name], judges[name][kind], cfg)
                cells += [_cell(pool_figures.get(key)) for key in POOL_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return print_tables(lines, args.out)


def measure(model, split, judge, cfg) -> dict:
    """The judge on one split with masks, as a preference round measures it on calibration."""
    figures, _ = calibration_reliability(model, split, judge, cfg.preference.mining, cfg.preference.proposals, "cpu",
                                         seed=cfg.seed, informative_gap=cfg.aggregation.informative_gap)
    return figures


def site_out_of_fold(cache: Path | None, site: str, labeled, cfg, fold_training, quality):
    """The site's out-of-fold proposals, made again, or kept in ``cache/<site>`` when given."""
    model_factory = lambda: model_from_config(cfg.model)  # noqa: E731
    if cache is None:
        return out_of_fold_proposals(labeled, model_factory, fold_training, cfg.preference.proposals, quality.folds,
                                     "cpu", quality.seed)
    (cache / site).mkdir(parents=True, exist_ok=True)
    return cached_out_of_fold_proposals(cache / site, labeled, model_factory, {"model": to_dict(cfg.model)},
                                        fold_training, cfg.preference.proposals, quality.folds, "cpu", quality.seed)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) > 1:
        return str(int(value))
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
