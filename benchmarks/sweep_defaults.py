"""Measured sweep for the preference-round defaults (beta, lr, steps, lambda_sup, mining filters).

    python benchmarks/sweep_defaults.py --out runs/sweep_defaults --threads 1 --jobs 2

Single-site engine only (no Flower): `shared.site.train_round` / `evaluate_round`, as
`fl-client local` calls them. For every site:

1. A supervised base is trained once (SupervisedConfig rounds x steps, lr 1e-3, batch 8, seed 0)
   and cached in OUT/<site>/base.pt (a rerun reuses it; its Dice curve is in base.json).
2. Every arm runs ROUNDS preference rounds from that same base, with the oracle judge at
   noise_std 0.1 on every site (the site YAML's own judge is replaced), and the test Dice is
   recorded after every round. Arms are one factor at a time around the current defaults
   (`DEFAULT`), plus the supervised-only controls (method `none`, lambda_sup 1: the same
   anchor steps without the preference term) at each step budget / lr that an arm changes.
3. Round r of seed s runs with seed 1000 s + r in every arm (same judge noise draws for the
   base round, same batches), so the arms differ only by their settings.
4. If time allows, a second seed for the top 3 arms (by last test Dice), their matched
   controls and the default arm.

The calibration split is not used for anything here (it only feeds the reliability report,
which does not change training), so it is emptied to save proposal time; instead the model is
also scored on it and `test+cal` Dice (more images, less noise) is reported next to test Dice.

Every (site, arm, seed) result is a JSON file under OUT/<site>/: a rerun skips what is done.
The report (docs/DEFAULTS.md by default) is rebuilt from those files at the end, or alone
with --report-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = {
    "montgomery": ROOT / "sites" / "demo" / "montgomery.yaml",
    "shenzhen_a": ROOT / "sites" / "demo" / "shenzhen_a.yaml",
    "kvasir_seg": ROOT / "sites" / "polyp" / "kvasir_seg.yaml",
}
# supervised base per site: (rounds, steps); lr 1e-3, batch 8 (SupervisedConfig defaults)
BASE = {"montgomery": (3, 40), "shenzhen_a": (3, 40), "kvasir_seg": (8, 50)}
JUDGE_NOISE = 0.1
ROUNDS = 4

# the current defaults (shared/config.py PreferenceConfig, sites/demo/consortium.yaml)
DEFAULT = dict(method="rn_dpo", beta=2.0, lr=1e-4, steps=20, batch_pairs=8, lambda_sup=1.0,
               min_gap=0.0, min_disagreement=0.001)

# name -> changes from DEFAULT; order = run order, most informative first (an arm that would
# end past the time budget is skipped, so the last ones are the first to go)
ARMS = {
    "control": dict(method="none"),
    "default": {},
    "beta0.5": dict(beta=0.5),
    "beta5": dict(beta=5.0),
    "lr3e-4": dict(lr=3e-4),
    "gap0.05": dict(min_gap=0.05),
    "lam0": dict(lambda_sup=0.0),
    "dpo_b0.01": dict(method="dpo", beta=0.01),
    "steps50": dict(steps=50),
    "control_steps50": dict(method="none", steps=50),
    "control_lr3e-4": dict(method="none", lr=3e-4),
    "disagree0.01": dict(min_disagreement=0.01),
}
# the second lung site (same modality as montgomery) runs the method against its control and
# the no-anchor arm only: on a shared 2-core machine the budget does not stretch further
SITE_ARMS = {"shenzhen_a": ("control", "default", "lam0")}


def arm_settings(name: str) -> dict:
    return DEFAULT | ARMS[name]


def matched_control(name: str) -> str:
    """The control with the same step budget and lr as the arm."""
    s = arm_settings(name)
    if s["steps"] != DEFAULT["steps"]:
        return "control_steps50"
    if s["lr"] != DEFAULT["lr"]:
        return "control_lr3e-4"
    return "control"


def describe(name: str) -> str:
    s = arm_settings(name)
    if s["method"] == "none":
        return f"none, lambda_sup {s['lambda_sup']:g}, lr {s['lr']:g}, {s['steps']} steps"
    return (f"{s['method']} beta {s['beta']:g}, lr {s['lr']:g}, {s['steps']} steps, lambda_sup {s['lambda_sup']:g}, "
            f"min_gap {s['min_gap']:g}, min_dis {s['min_disagreement']:g}")


# ----------------------------------------------------------------------------- running


def load(site_name: str):
    from shared.config import JudgeConfig, ModelConfig, load_site
    from shared.data import SplitData, load_site_data

    site = load_site(SITES[site_name])
    site = dataclasses.replace(site, judge=JudgeConfig(kind="oracle", noise_std=JUDGE_NOISE, seed=0), device="cpu")
    splits = load_site_data(site)
    cal = splits["calibration"]
    held = {"test": splits["test"], "cal": cal}
    # training never reads the calibration split except for the reliability report
    splits["calibration"] = SplitData(names=[], images=cal.images[:0].clone(), masks=cal.masks[:0].clone())
    model_cfg = ModelConfig(in_channels=site.channels)  # the demo consortium's UNet 16-32-64-128, dropout 0.1
    return site, splits, held, model_cfg


def score(site, model_cfg, state, held) -> dict:
    from shared.site import evaluate_round

    t = evaluate_round(site, model_cfg, state, {"test": held["test"]})
    c = evaluate_round(site, model_cfg, state, {"test": held["cal"]})
    n_t, n_c = t["n_images"], c["n_images"]
    return {"dice": t["dice"], "hd95": t["hd95"],
            "dice_testcal": (t["dice"] * n_t + c["dice"] * n_c) / (n_t + n_c)}


def train_base(site_name: str, out: Path, log) -> tuple[dict, dict]:
    import torch

    from shared.config import PreferenceConfig, SupervisedConfig
    from shared.site import load_model, train_round

    site, splits, held, model_cfg = load(site_name)
    path, meta_path = out / "base.pt", out / "base.json"
    if path.exists() and meta_path.exists():
        return torch.load(path), json.loads(meta_path.read_text())
    rounds, steps = BASE[site_name]
    sup = SupervisedConfig(rounds=rounds, steps=steps)
    torch.manual_seed(0)
    from shared.model import seed_everything
    seed_everything(0)
    state = load_model(model_cfg).state_dict()
    curve, t0 = [], time.time()
    for r in range(1, rounds + 1):
        state, _ = train_round(site, model_cfg, "supervised", state, sup, PreferenceConfig(), seed=r, splits=splits)
        curve.append(score(site, model_cfg, state, held))
        log(f"{site_name} base round {r}/{rounds}: test dice {curve[-1]['dice']:.4f}")
    meta = {"rounds": rounds, "steps": steps, "lr": sup.lr, "batch_size": sup.batch_size, "curve": curve,
            "final": curve[-1], "seconds": time.time() - t0,
            "n": {k: len(v) for k, v in splits.items()} | {"calibration": len(held["cal"])}}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return state, meta


def run_arm(site_name: str, arm: str, seed: int, base_state: dict, base_meta: dict, out: Path, log) -> dict:
    from shared.config import MiningConfig, PreferenceConfig, SupervisedConfig
    from shared.site import train_round

    path = out / f"{arm}_s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    site, splits, held, model_cfg = load(site_name)
    s = arm_settings(arm)
    pref = PreferenceConfig(
        rounds=ROUNDS, method=s["method"], beta=s["beta"], steps=s["steps"], lr=s["lr"],
        batch_pairs=s["batch_pairs"], lambda_sup=s["lambda_sup"],
        mining=MiningConfig(min_gap=s["min_gap"], min_disagreement=s["min_disagreement"]),
    )
    state, rounds, t0 = base_state, [], time.time()
    for r in range(1, ROUNDS + 1):
        state, result = train_round(site, model_cfg, "preference", state, SupervisedConfig(), pref,
                                    seed=1000 * seed + r, splits=splits)
        m = result.metrics
        rec = score(site, model_cfg, state, held) | {
            "pairs": m.get("pairs_used", 0), "pair_acc": m.get("mining_pair_accuracy"),
            "pair_gain": m.get("mining_pair_gain"), "pref_loss": m.get("pref_loss"),
            "margin": m.get("margin"), "disagree_q50": m.get("mining_disagreement_q50"),
        }
        rounds.append(rec)
        log(f"{site_name} {arm} s{seed} round {r}: test dice {rec['dice']:.4f} pairs {rec['pairs']}")
    res = {"site": site_name, "arm": arm, "seed": seed, "settings": s, "base": base_meta["final"],
           "rounds": rounds, "seconds": time.time() - t0}
    path.write_text(json.dumps(res, indent=1))
    return res


class SiteRunner:
    """One site's base and arm runs, with a log file; arms are skipped past the deadline."""

    def __init__(self, site_name: str, out_root: Path, arms: list[str], deadline: float):
        self.site = site_name
        self.out = out_root / site_name
        self.out.mkdir(parents=True, exist_ok=True)
        self.arms = [a for a in arms if a in SITE_ARMS.get(site_name, ARMS)]
        self.deadline = deadline
        self.durations: list[float] = []  # seconds per 20-step-equivalent arm
        self.logf = open(self.out / "log.txt", "a")
        self.base_state = self.base_meta = None

    def log(self, msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def run(self, arm: str, seed: int) -> None:
        if (self.out / f"{arm}_s{seed}.json").exists():
            return
        if self.base_state is None:
            self.base_state, self.base_meta = train_base(self.site, self.out, self.log)
        scale = arm_settings(arm)["steps"] / DEFAULT["steps"]
        scale = 1.0 if scale == 1 else 0.5 + 0.5 * scale  # proposals cost the same, steps scale
        if self.durations and time.time() + scale * max(self.durations) > self.deadline:
            self.log(f"{self.site}: {arm} seed {seed} would end past the time budget: skipped")
            return
        t = time.time()
        run_arm(self.site, arm, seed, self.base_state, self.base_meta, self.out, self.log)
        if arm_settings(arm)["method"] != "none":
            self.durations.append((time.time() - t) / scale)

    def second_seed_arms(self, top: int) -> list[str]:
        done = {a: json.loads(p.read_text()) for a in self.arms if (p := self.out / f"{a}_s0.json").exists()}
        ranked = sorted((a for a in done if arm_settings(a)["method"] != "none"),
                        key=lambda a: -done[a]["rounds"][-1]["dice"])
        chosen = ["control"]
        for a in [*ranked[:top], "default"]:
            chosen += [matched_control(a), a]  # an arm's second seed is only useful with its control's
        return [a for a in dict.fromkeys(chosen) if a in done]


def run_sites(sites: list[str], out_root: Path, arms: list[str], second_seed_top: int, deadline: float) -> None:
    """Seed 0 of every arm at every site first (arm by arm across the sites, so that the time
    budget cuts the same, least important, arms everywhere), then seed 1 of the best arms."""
    t0 = time.time()
    runners = [SiteRunner(s, out_root, arms, deadline) for s in sites]
    for arm in arms:
        for r in runners:
            if arm in r.arms:
                r.run(arm, 0)
    if second_seed_top > 0:
        for r in runners:
            for arm in r.second_seed_arms(second_seed_top):
                r.run(arm, 1)
    for r in runners:
        r.log(f"{r.site} worker done after {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------- report


def summarize(res: dict) -> dict:
    base = res["base"]["dice"]
    dice = [r["dice"] for r in res["rounds"]]
    prev = [base, *dice[:-1]]
    peak = max(range(len(dice)), key=lambda i: dice[i])
    return {"base": base, "peak": dice[peak], "peak_round": peak + 1, "last": dice[-1],
            "falls": sum(d < p for d, p in zip(dice, prev)), "curve": dice,
            "last_tc": res["rounds"][-1]["dice_testcal"], "base_tc": res["base"]["dice_testcal"],
            "pair_acc": _mean([r["pair_acc"] for r in res["rounds"] if r["pair_acc"] is not None]),
            "pairs": _mean([r["pairs"] for r in res["rounds"]]),
            "pair_gain": _mean([r["pair_gain"] for r in res["rounds"]]),
            "disagree": _mean([r["disagree_q50"] for r in res["rounds"]])}


def _fmt(x):
    return "-" if x != x else f"{x:.3f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def report(out_root: Path, doc: Path, meta: dict) -> str:
    lines = ["# Preference-round defaults: a measured sweep", "",
             "Written by `benchmarks/sweep_defaults.py` (the numbers below are regenerated by it; the "
             "recommendation at the end is written by hand from them).", "",
             "## Setup", "",
             f"- Command(s): {meta['command']}",
             f"- Threads: torch.set_num_threads({meta['threads']}) (and OMP_NUM_THREADS) in each worker process; "
             "two workers at once (kvasir_seg in one, the lung sites in the other), CPU only, on a 2-core machine "
             f"shared with other jobs (load average 7-14 during the run); Python {platform.python_version()}, "
             f"torch {meta['torch']}.",
             f"- Wall time: {meta['wall']}.",
             f"- Model: the demo consortium's MONAI UNet 16-32-64-128, 2 res units, dropout 0.1, 128 px.",
             f"- Judge: oracle, true Dice + N(0, {JUDGE_NOISE}) noise, on every site (the site YAML's judge replaced).",
             f"- Preference rounds per arm: {ROUNDS}, each from the received model (proposals K = 11: "
             "4 flips, 4 MC-dropout, 3 thresholds; top_bottom mining, 1 pair per image, batch 8 pairs).",
             "- Seeds: base trained with seed 0 (round r: seed r). Preference round r of seed s: seed "
             "1000 s + r, the same in every arm (judge noise, MC dropout, batches). Seed 0 for every arm; "
             "seed 1 (top 3 arms, the default and their matched controls) only where the time budget "
             "allowed: the `seeds` column says how many ran.",
             "- Dice: mean test Dice (threshold 0.5 of sigmoid) after each round. `test+cal`: Dice over "
             "test and calibration images together (the calibration split is not used by these runs), "
             "a less noisy figure. Where 2 seeds ran, figures are the mean of the seeds.",
             "- Delta vs control: last Dice minus the last Dice of the supervised-only control with the same "
             "lr and step budget (method none, lambda_sup 1: the same anchor steps, no preference term).",
             "- Falls: rounds whose test Dice is below the previous round's (round 1 against the base).",
             ""]
    for site_name in SITES:
        out = out_root / site_name
        if not (out / "base.json").exists():
            continue
        base_meta = json.loads((out / "base.json").read_text())
        by_arm: dict[str, list[dict]] = {}
        for arm in ARMS:
            for seed in (0, 1):
                p = out / f"{arm}_s{seed}.json"
                if p.exists():
                    by_arm.setdefault(arm, []).append(summarize(json.loads(p.read_text())))
        if not by_arm:
            continue

        def avg(arm, key):
            return _mean([s[key] for s in by_arm[arm]])

        n = base_meta["n"]
        curve = ", ".join(f"{c['dice']:.3f}" for c in base_meta["curve"])
        lines += [f"## {site_name}", "",
                  f"Splits: {n['labeled']} labelled, {n['unlabeled']} unlabelled, {n['test']} test, "
                  f"{n['calibration']} calibration. Base: {base_meta['rounds']} supervised rounds x "
                  f"{base_meta['steps']} steps, lr {base_meta['lr']:g}, batch {base_meta['batch_size']} "
                  f"(test Dice per round: {curve}); base test Dice **{base_meta['final']['dice']:.4f}**, "
                  f"test+cal {base_meta['final']['dice_testcal']:.4f}.", "",
                  "| arm | settings | seeds | base Dice | peak Dice (round) | last Dice | last - base | "
                  "last - control | falls | test+cal: last - base / - control | pairs/round | pair acc | "
                  "pair gain | \\|D\\| median | Dice per round (seed 0) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, sums in by_arm.items():
            ctrl = matched_control(arm)
            if arm_settings(arm)["method"] == "none":
                dctl = dtc = "-"
            elif ctrl in by_arm:
                # compare seed for seed: only the seeds both have
                seeds = min(len(sums), len(by_arm[ctrl]))
                d = _mean([sums[i]["last"] - by_arm[ctrl][i]["last"] for i in range(seeds)])
                dctl = f"{d:+.4f}" + ("" if ctrl == "control" else f" (vs {ctrl})")
                dtc = f"{_mean([sums[i]['last_tc'] - by_arm[ctrl][i]['last_tc'] for i in range(seeds)]):+.4f}"
            else:
                dctl = dtc = f"n/a ({ctrl} not run)"
            peak_rounds = "/".join(str(s["peak_round"]) for s in sums)
            falls = "/".join(str(s["falls"]) for s in sums)
            pa = avg(arm, "pair_acc")
            lines.append(
                f"| {arm} | {describe(arm)} | {len(sums)} | {avg(arm, 'base'):.4f} | {avg(arm, 'peak'):.4f} ({peak_rounds}) "
                f"| {avg(arm, 'last'):.4f} | {avg(arm, 'last') - avg(arm, 'base'):+.4f} | {dctl} | {falls} "
                f"| {avg(arm, 'last_tc') - avg(arm, 'base_tc'):+.4f} / {dtc} | {avg(arm, 'pairs'):.0f} "
                f"| {'-' if pa != pa else f'{pa:.2f}'} | {_fmt(avg(arm, 'pair_gain'))} | {_fmt(avg(arm, 'disagree'))} "
                f"| {' '.join(f'{d:.3f}' for d in sums[0]['curve'])} |")
        missing = [a for a in SITE_ARMS.get(site_name, ARMS) if a not in by_arm]
        if missing:
            lines.append(f"\nNot run here (time budget): {', '.join(missing)}.")
        lines.append("")
    text = "\n".join(lines)
    marker = "## Recommendation"
    old = doc.read_text() if doc.exists() else ""
    tail = old[old.index(marker):] if marker in old else f"{marker}\n\n(to be written from the tables above)\n"
    doc.write_text(text + "\n" + tail)
    return text


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    global ROUNDS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep_defaults")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "DEFAULTS.md")
    p.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="sites run in this many parallel worker processes")
    p.add_argument("--second-seed-top", type=int, default=3)
    p.add_argument("--budget-min", type=float, default=35.0, help="no second-seed run starts that would end past this")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="preference rounds per arm")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    ROUNDS = args.rounds
    os.environ.setdefault("POLYP_DATA", str(ROOT.parent / "shared" / "data" / "polyp"))

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    start = time.time()
    deadline = args.deadline or start + 60 * args.budget_min
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_sites(args.sites, args.out, args.arms, args.second_seed_top, deadline)
        return 0
    if not args.report_only:
        def worker(group):
            cmd = [sys.executable, __file__, "--worker", "--out", str(args.out), "--sites", *group,
                   "--threads", str(args.threads), "--rounds", str(args.rounds), "--second-seed-top", str(args.second_seed_top),
                   "--deadline", str(deadline), "--arms", *args.arms]
            return subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": str(args.threads)}).returncode

        # kvasir (the costliest: 90 unlabelled RGB images) alone, the lung sites together
        jobs = max(1, args.jobs)
        groups = [[s for s in args.sites if s == "kvasir_seg"], [s for s in args.sites if s != "kvasir_seg"]]
        groups = [g for g in groups if g] if jobs > 1 else [list(args.sites)]
        with ThreadPoolExecutor(jobs) as pool:
            codes = list(pool.map(worker, groups))
        if any(codes):
            print(f"worker exit codes {codes}", file=sys.stderr)
        runs_file = args.out / "invocations.json"
        runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
        runs.append({"argv": sys.argv[1:], "start": start, "end": time.time(), "threads": args.threads,
                     "jobs": args.jobs, "exit_codes": codes})
        runs_file.write_text(json.dumps(runs, indent=1))
    runs_file = args.out / "invocations.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    commands = "; ".join(f"`python benchmarks/sweep_defaults.py {' '.join(shlex.quote(a) for a in r['argv'])}`"
                         f" ({time.strftime('%H:%M', time.localtime(r['start']))}-"
                         f"{time.strftime('%H:%M', time.localtime(r['end']))}"
                         f"{'' if all(c == 0 for c in r['exit_codes']) else ', ' + str(r['exit_codes'][0])})"
                         for r in runs)
    span = (max(r["end"] for r in runs) - min(r["start"] for r in runs)) / 60 if runs else float("nan")
    meta = {"command": commands or "(none recorded)", "threads": args.threads, "jobs": args.jobs,
            "torch": torch.__version__, "wall": f"{span:.1f} min from the first start to the last end"}
    print(report(args.out, args.doc, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
