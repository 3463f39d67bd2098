"""Do a judge's training masks look like the masks it grades? (prints figures; not a test)

    python benchmarks/oof_shift.py --base runs/experiments/signal/bases/polyp-seed0-<digest> --cache DIR
                                   [--fold-steps 300] [--folds 3]

A learned or federated judge learns from out-of-fold proposals on a site's labelled split and
grades the current model's proposals on unseen images. Per site and proposal source this prints
the mean true Dice of both, how often the source is the image's best, the rank correlation of the
sources' mean gain over the identity mask on the two sides, and how much each identity mask
over-segments (predicted / true foreground). `--cache` is `benchmarks/judges.py`'s: the
out-of-fold proposals are read from it, or made and kept there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from headroom import load_base  # noqa: E402  (benchmarks/, this script's folder)
from judges import site_out_of_fold  # noqa: E402  (the same cache, the same key)
from shared.config import QualityJudgeConfig, load_site  # noqa: E402
from shared.data import load_site_data  # noqa: E402
from shared.proposals import generate_proposals, proposal_labels  # noqa: E402
from shared.reliability import dice_scores  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="a cached base folder of benchmarks/experiments.py")
    parser.add_argument("--cache", required=True, type=Path, help="benchmarks/judges.py's --cache folder")
    parser.add_argument("--fold-steps", type=int, default=300, help="steps of each out-of-fold segmenter")
    parser.add_argument("--folds", type=int, default=QualityJudgeConfig.folds, help="out-of-fold segmenters a site")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")
    cfg, _, model = load_base(args.base)
    quality = dataclasses.replace(cfg.quality_judge or QualityJudgeConfig(), fold_steps=args.fold_steps,
                                  folds=args.folds)
    labels = proposal_labels(cfg.preference.proposals)
    for path in cfg.sites:
        site = load_site(path)
        data = load_site_data(site, splits=("labeled", "calibration"))
        oof = site_out_of_fold(args.cache, site.name, data["labeled"], cfg,
                               dataclasses.replace(cfg.supervised, steps=quality.fold_steps), quality)
        graded = generate_proposals(model.eval(), data["calibration"].images, cfg.preference.proposals, "cpu", seed=0).masks
        train, use = dice_scores(oof, data["labeled"].masks), dice_scores(graded, data["calibration"].masks)
        best_train = torch.bincount(train.argmax(1), minlength=len(labels)).float() / len(train)
        best_use = torch.bincount(use.argmax(1), minlength=len(labels)).float() / len(use)
        print(f"\n{site.name}: out of fold on {len(train)} labelled images, the base on {len(use)} calibration images")
        print("| source | out-of-fold Dice | best of image | base Dice | best of image |\n|---|---|---|---|---|")
        for k, name in enumerate(labels):
            print(f"| {name} | {train[:, k].mean():.3f} | {best_train[k]:.0%} | {use[:, k].mean():.3f} | {best_use[k]:.0%} |")
        gains = [(d - d[:, :1]).mean(0) for d in (train, use)]
        over = [float(m[:, 0].float().sum() / t.float().sum()) for m, t in ((oof, data["labeled"].masks),
                                                                             (graded, data["calibration"].masks))]
        print(f"rank correlation of the sources' gain over identity: {spearmanr(*gains)[0]:.3f}; "
              f"identity over-segments {over[0]:.2f}x out of fold, {over[1]:.2f}x by the base")
    return 0


if __name__ == "__main__":
    sys.exit(main())
