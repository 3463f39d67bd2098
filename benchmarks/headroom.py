"""Headroom of the proposals, per proposal source and per mining strategy (prints figures; not a test).

    python benchmarks/headroom.py --base runs/experiments/signal/bases/polyp-seed0-<digest> [--frames 128]
                                  [--out docs/results/headroom-polyp-seed0.md]

A preference round can only teach what its proposals hold. On a cached supervised base of
`benchmarks/experiments.py` (its `consortium.yaml`, `sites/` and last checkpoint) this scores,
at every training site, the calibration split plus a fixed sample of `--frames` unlabelled frames
(frames the base never trained on; their masks are used only to measure):

1. **per proposal source**, each set of proposals on its own: K, the Dice of the identity
   proposal (the model's own prediction), of the best plausible proposal (best-of-K, what a
   perfect judge would pick), the headroom best-of-K minus identity, the share of proposals
   the plausibility filter drops, and the Dice of the pick of each judge (oracle with noise 0.1,
   agreement, uncertainty) and the share of the headroom it captures, (pick - identity) /
   (best - identity);
2. **per mining strategy** on the full set with the oracle at noise 0.1 and each label-free
   judge: pair accuracy, the mean true Dice gap chosen - rejected, the Dice of the chosen masks
   and their gain over the identity prediction of the same image (what moving the model toward
   the chosen mask would gain). Each strategy gets a fresh oracle of the same seed, so the
   strategies are compared on the same noisy scores.

Everything runs through `shared.mining.mine_split`, the pipeline a preference round uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.config import MiningConfig, ProposalConfig, load_consortium, load_site  # noqa: E402
from shared.data import SplitData, load_site_data  # noqa: E402
from shared.judges import AgreementJudge, OracleJudge, UncertaintyJudge  # noqa: E402
from shared.judges.oracle import bind_to  # noqa: E402
from shared.mining import headroom, mine_pairs, mine_split  # noqa: E402
from shared.proposals import generate_proposals, plausible  # noqa: E402
from shared.reliability import dice_scores  # noqa: E402
from shared.site import load_model  # noqa: E402
from shared.training import concat_splits, sample_unlabeled  # noqa: E402

TTA = ("identity", "hflip", "vflip", "hvflip")
RATIO = 3.0  # the plausibility filter's max_area_ratio for every set below
SOURCES = {
    "tta (4 flips)": ProposalConfig(tta=TTA, mc_samples=0, thresholds=()),
    "mc (identity + 4 MC-dropout)": ProposalConfig(tta=("identity",), mc_samples=4, thresholds=()),
    "thr of the mean 0.3/0.5/0.7 (+ identity)": ProposalConfig(tta=("identity",), mc_samples=4, thresholds=(0.3, 0.5, 0.7)),
    "thr of identity 0.3/0.5/0.7 (+ identity)": ProposalConfig(tta=("identity",), mc_samples=0, thresholds=(0.3, 0.5, 0.7),
                                                               threshold_of="identity"),
    "morph +-1, +-2 (+ identity)": ProposalConfig(tta=("identity",), mc_samples=0, thresholds=(), morph=(-2, -1, 1, 2)),
    "default before: tta + mc + thr of the mean": ProposalConfig(tta=TTA, mc_samples=4, thresholds=(0.3, 0.5, 0.7)),
    "tta + mc + thr of identity + morph": ProposalConfig(tta=TTA, mc_samples=4, thresholds=(0.3, 0.5, 0.7),
                                                         threshold_of="identity", morph=(-2, -1, 1, 2)),
}
FULL = "tta + mc + thr of identity + morph"
STRATEGIES = ("top_bottom", "top_identity", "skip_top", "top_random")


def _judges(seed: int):
    return {"oracle 0.1": OracleJudge(noise_std=0.1, seed=seed), "agreement": AgreementJudge(),
            "uncertainty": UncertaintyJudge()}


def _frames(site, frames: int, seed: int) -> SplitData:
    splits = load_site_data(site, splits=("calibration", "unlabeled"))
    pool = sample_unlabeled(splits["unlabeled"], frames, seed)
    return concat_splits(splits["calibration"], pool)


def _source_figures(model, data: SplitData, cfg: ProposalConfig, seed: int) -> dict:
    """Headroom of one proposal set on one site's frames, with the pick of every judge; the
    proposals are made once and scored by each judge (as mine_split would score them)."""
    proposals = generate_proposals(model, data.images, cfg, "cpu", seed=seed)
    allowed = plausible(proposals, cfg.max_area_ratio)
    identity = proposals.labels.index("tta:identity")
    allowed[:, identity] = True
    true_dice = dice_scores(proposals.masks, data.masks)
    identity_dice = dice_scores((proposals.ref_logits > 0).to(torch.uint8), data.masks)[:, 0]
    figures = {"k": proposals.k, "implausible": float((~allowed).double().mean())}
    for name, judge in _judges(seed).items():
        scores = bind_to(judge, data.masks).score(data.images, proposals)
        pairs = mine_pairs(scores, proposals.masks, MiningConfig(strategy="top_bottom"), None, allowed, identity)
        figures[name] = headroom(scores, true_dice, allowed, identity_dice, pairs)
    return figures


def _run(model, data: SplitData, judge, mining: MiningConfig, proposals: ProposalConfig, seed: int) -> dict:
    _, stats = mine_split(model, data.images, bind_to(judge, data.masks), mining, proposals, "cpu",
                          truth=data.masks, seed=seed)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="a cached base folder of benchmarks/experiments.py")
    parser.add_argument("--frames", type=int, default=128, help="unlabelled frames a site, besides its calibration split")
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--part", choices=("all", "sources", "mining"), default="all",
                        help="both tables (default), or only the per-source or the per-strategy one")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    consortium, checkpoint, model = load_base(args.base)
    seed = consortium.seed
    data = {site.name: _frames(site, args.frames, seed) for site in map(load_site, consortium.sites)}
    lines = [f"Base: `{args.base.name}` ({checkpoint.name}); frames a site: "
             + ", ".join(f"{name} {len(d.names)}" for name, d in data.items())
             + f" (calibration + {args.frames} unlabelled); plausibility max_area_ratio {RATIO:g}.", ""]

    if args.part != "mining":
        lines += _source_table(model, data, seed)
    if args.part != "sources":
        lines += _mining_table(model, data, seed)
    return print_tables(lines, args.out)


def print_tables(lines: list[str], out: Path | None) -> int:
    """Print the markdown lines and, with `out`, write them there too; exit code 0."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return 0


def load_base(base: Path):
    """A cached base of benchmarks/experiments.py: its consortium config, last checkpoint and
    network (eval mode); exits with one line when it has no checkpoint yet."""
    from shared.model import load_state

    consortium = load_consortium(base / "consortium.yaml")
    checkpoints = sorted((base / "run" / "checkpoints").glob("round_*.pt"))
    if not checkpoints:
        raise SystemExit(f"{base}: no checkpoint under run/checkpoints: train the base first")
    return consortium, checkpoints[-1], load_model(consortium.model, load_state(checkpoints[-1])).eval()


def _source_table(model, data: dict[str, SplitData], seed: int) -> list[str]:
    lines = ["### Per proposal source (mean over sites)", "",
              "| source | K | identity | best-of-K | headroom | implausible | oracle 0.1 pick (capture) | "
              "agreement pick (capture) | uncertainty pick (capture) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, cfg in SOURCES.items():
        cfg = dataclasses.replace(cfg, max_area_ratio=RATIO)
        per_site = [_source_figures(model, d, cfg, seed) for d in data.values()]
        per_judge = {name: [f[name] for f in per_site] for name in _judges(seed)}
        first = per_judge["oracle 0.1"]
        identity, best = _mean(first, "dice_identity"), _mean(first, "dice_best")
        cells = [label, str(per_site[0]["k"]), f"{identity:.3f}", f"{best:.3f}", f"{best - identity:+.3f}",
                 f"{_mean(per_site, 'implausible'):.2f}"]
        for name in ("oracle 0.1", "agreement", "uncertainty"):
            pick = _mean(per_judge[name], "dice_pick")
            capture = (pick - identity) / (best - identity) if best - identity > 1e-9 else float("nan")
            cells.append(f"{pick:.3f} ({capture:+.0%})")
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines + [""]


def _mining_table(model, data: dict[str, SplitData], seed: int) -> list[str]:
    lines = [f"### Per mining strategy (proposals: {FULL}; mean over sites)", "",
              "| judge | strategy | pairs | pair accuracy | Dice gap chosen - rejected | Dice chosen | "
              "chosen - identity |", "|---|---|---|---|---|---|---|"]
    cfg = dataclasses.replace(SOURCES[FULL], max_area_ratio=RATIO)
    for name in _judges(seed):
        for strategy in STRATEGIES:
            judge = _judges(seed)[name]  # fresh: every strategy sees the same oracle noise
            stats = [_run(model, d, judge, MiningConfig(strategy=strategy), cfg, seed) for d in data.values()]
            lines.append(f"| {name} | {strategy} | {sum(s['pairs'] for s in stats)} | {_mean(stats, 'pair_accuracy'):.3f} | "
                         f"{_mean(stats, 'pair_gain'):+.3f} | {_mean(stats, 'dice_chosen'):.3f} | "
                         f"{_mean(stats, 'chosen_over_identity'):+.3f} |")
            print(lines[-1], flush=True)
    return lines


def _mean(stats: list[dict], key: str) -> float:
    return sum(float(s[key]) for s in stats) / len(stats)


if __name__ == "__main__":
    sys.exit(main())
