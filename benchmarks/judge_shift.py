"""Does a judge rank the unlabelled frames it is used on as well as the calibration frames it is
measured on? (prints figures; not a test)

    python benchmarks/judge_shift.py --runs runs/experiments/signal/polyp --arms federated_ranked_gated,rn_dpo

For every finished run `<runs>/<arm>/seed<k>/run` of `benchmarks/experiments.py`, per site, over
the preference rounds that took preference steps (a gated round mines nothing), the mean
within-image Spearman and informative-pair accuracy of the judge on the calibration split
(`rel_*`, what the ledger and the gate read) and on that round's unlabelled sample (`mining_*`,
a simulation's diagnostic from the true masks of the unlabelled frames), and the range of the
round's Wilson bound on calibration (`rel_informative_wilson`, as the site reported it: a trial a
pair, except in runs made at commit e8c2df2, where it was a trial an image or video).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_server.report import read_metrics  # noqa: E402

FIGURES = ("rel_spearman", "mining_spearman", "rel_informative_pair_accuracy", "mining_informative_pair_accuracy")


def shift_rows(run_dir: Path) -> dict[str, dict]:
    """Per site: site-rounds with preference steps, mean of each of FIGURES, Wilson bound range."""
    per_site: dict[str, dict[str, list[float]]] = {}
    for line in read_metrics(run_dir):
        train = line.get("train") or {}
        if line.get("kind") != "site" or line.get("phase") != "preference" or "mining_spearman" not in train:
            continue
        if any(train.get(key) is None for key in (*FIGURES, "rel_informative_wilson")):
            continue
        site = per_site.setdefault(line["site"], {key: [] for key in (*FIGURES, "rel_informative_wilson")})
        for key in site:
            site[key].append(float(train[key]))
    return {name: {"rounds": len(values["rel_spearman"]),
                   **{key: statistics.mean(values[key]) for key in FIGURES},
                   "wilson": (min(values["rel_informative_wilson"]), max(values["rel_informative_wilson"]))}
            for name, values in per_site.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, type=Path, help="a task folder of benchmarks/experiments.py")
    parser.add_argument("--arms", required=True, help="comma-separated arm names")
    args = parser.parse_args(argv)
    print("| arm | seed | site | site-rounds | Spearman, calibration / unlabelled | "
          "informative-pair acc., calibration / unlabelled | Wilson bound on calibration |")
    print("|---|---|---|---|---|---|---|")
    for arm in args.arms.split(","):
        for run_dir in sorted((args.runs / arm).glob("seed*/run")):
            if not (run_dir / "metrics.jsonl").is_file():
                continue
            for site, row in sorted(shift_rows(run_dir).items()):
                print(f"| {arm} | {run_dir.parent.name[4:]} | {site} | {row['rounds']} | "
                      f"{row['rel_spearman']:.2f} / {row['mining_spearman']:.2f} | "
                      f"{row['rel_informative_pair_accuracy']:.2f} / {row['mining_informative_pair_accuracy']:.2f} | "
                      f"{row['wilson'][0]:.2f}-{row['wilson'][1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
