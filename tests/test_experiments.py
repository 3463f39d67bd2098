"""The experiment harness end to end on a tiny preset (plumbing, not results).

Two demo lung sites at 32 px, a tiny UNet, two arms (the untouched base and RN-DPO), one seed,
1 supervised + 2 preference rounds, a third demo site as the unseen centre. Real fl-sim runs.
"""

from __future__ import annotations

import csv
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from benchmarks import experiments

ROOT = Path(__file__).resolve().parents[1]


def write_preset(tmp_path: Path) -> Path:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(textwrap.dedent(f"""\
        name: tiny
        seeds: [3]
        cpus: 2
        out: {tmp_path / 'out'}
        timeout_s: 3600
        tasks:
          lung:
            consortium: {ROOT / 'sites' / 'demo' / 'consortium.yaml'}
            sites: [montgomery, shenzhen_a]
            unseen: [{ROOT / 'sites' / 'demo' / 'shenzhen_b.yaml'}]
            image_size: 32
            set:
              model: {{name: unet, channels: [8, 16, 32], strides: [2, 2], num_res_units: 1, dropout: 0.1}}
              supervised: {{rounds: 1, steps: 15, lr: 0.01, batch_size: 4}}
              preference:
                rounds: 2
                steps: 4
                batch_pairs: 4
                max_unlabeled: 12
                proposals: {{tta: [identity, hflip], mc_samples: 2, thresholds: [0.3, 0.5, 0.7]}}
              federation: {{min_sites: 2, round_timeout: 1800}}  # never hit: not a speed test
            site_set: {{device: cpu}}
        arm_defaults:
          set: {{preference: {{method: rn_dpo, lambda_sup: 1.0}}}}
          judge: {{kind: oracle, noise_std: 0.1}}
        arms:
          - {{name: base, groups: [method], set: {{preference: {{method: none, lambda_sup: 0.0}}}}}}
          - {{name: rn_dpo, groups: [method]}}
        quick:
          arms: [rn_dpo]
        """))
    return preset


def test_preset_loading_merges_defaults_quick_and_rejects_unknown_keys(tmp_path):
    preset = experiments.load_preset(write_preset(tmp_path))
    assert [a.name for a in preset.arms] == ["base", "rn_dpo"]
    assert preset.arms[0].is_untouched_base and not preset.arms[1].is_untouched_base
    assert preset.arms[1].set["preference"]["method"] == "rn_dpo"
    assert preset.arms[1].judge == {"kind": "oracle", "noise_std": 0.1}
    assert [a.name for a in experiments.load_preset(write_preset(tmp_path), quick=True).arms] == ["rn_dpo"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(write_preset(tmp_path).read_text().replace("timeout_s:", "timeout:"))
    with pytest.raises(experiments.PresetError, match="timeout: unknown key"):
        experiments.load_preset(bad)


def test_tiny_grid_writes_table_csv_and_plots(tmp_path, capsys):
    preset = write_preset(tmp_path)
    out = tmp_path / "out"
    assert experiments.main(["--preset", str(preset)]) == 0

    with (out / "results.csv").open() as f:
        rows = {row["arm"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"base", "rn_dpo"}  # one row per arm
    for row in rows.values():
        assert row["task"] == "lung" and row["seeds_done"] == "1"
        for key in ("base_dice_mean", "peak_dice_mean", "last_dice_mean", "last_unseen_dice_mean"):
            assert 0.0 < float(row[key]) <= 1.0, (key, row[key])
    base, rn = rows["base"], rows["rn_dpo"]
    assert float(base["last_dice_mean"]) == pytest.approx(float(base["base_dice_mean"]))
    assert float(base["falls_mean"]) == 0
    assert float(rn["n_rounds_mean"]) == 2 and 1 <= float(rn["peak_round_mean"]) <= 2
    assert 0 <= float(rn["falls_mean"]) <= 2
    assert float(rn["peak_dice_mean"]) >= float(rn["last_dice_mean"])
    assert float(rn["base_dice_mean"]) == pytest.approx(float(base["base_dice_mean"]))  # same base weights
    assert 0.0 <= float(rn["rel_montgomery_pair_accuracy_mean"]) <= 1.0
    # the round's headroom on calibration: the best of K is at least the model's own mask and the pick
    identity, best, pick = (float(rn[f"{k}_mean"]) for k in ("dice_identity", "dice_best", "dice_pick"))
    assert 0.0 < identity <= best and pick <= best

    # each simulated run records the commit that finished it (a cached run is keyed by settings, not code)
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:  # no git on this machine
        head = subprocess.CompletedProcess([], 1)
    with (out / "runs.csv").open() as f:
        codes = {row["arm"]: row["code"] for row in csv.DictReader(f)}
    assert codes["base"] == ""  # the untouched base is not simulated
    if head.returncode == 0:
        assert re.fullmatch(re.escape(head.stdout.strip()) + r"(\+changes)?", codes["rn_dpo"]), codes
        assert f"`{codes['rn_dpo']}` (1 run)" in (out / "results.md").read_text()
    else:  # not a git checkout
        assert codes["rn_dpo"] == ""

    with (out / "rounds.csv").open() as f:
        rounds = [r for r in csv.DictReader(f) if r["arm"] == "rn_dpo"]
    assert [r["round"] for r in rounds] == ["0", "1", "2"]
    assert all(0.0 < float(r["shenzhen_b_dice"]) <= 1.0 for r in rounds)

    table = (out / "results.md").read_text()
    assert "| rn_dpo |" in table and "| base |" in table and "Not finished" not in table
    assert "### Headroom on the calibration splits" in table and "label eff." in table
    assert "python benchmarks/experiments.py --preset" in table
    # Dice after every round, not only peak and last: the row matches rounds.csv
    per_round = next(line for line in table.splitlines() if line.startswith("| rn_dpo |") and line.count("|") == 5)
    assert per_round.split("|")[2:5] == [f" {float(r['mean_dice']):.3f} " for r in rounds]
    plots = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["lung_method.png"]
    assert plots[0].stat().st_size > 1000

    # a second call finds every run finished and only rebuilds the outputs
    assert experiments.main(["--preset", str(preset), "--report-only"]) == 0
    assert "| rn_dpo |" in (out / "results.md").read_text()

    # a changed arm: a dry run names the run it would discard and deletes nothing
    changed = tmp_path / "changed.yaml"
    changed.write_text(preset.read_text().replace("{name: rn_dpo, groups: [method]}",
                                                  "{name: rn_dpo, groups: [method], set: {preference: {lr: 0.003}}}"))
    run_folder = out / "lung" / "rn_dpo" / "seed3"
    assert experiments.main(["--preset", str(changed), "--out", str(out), "--dry-run"]) == 0
    assert "would discard lung/rn_dpo/seed3" in capsys.readouterr().out
    assert (run_folder / "run" / "checkpoints" / "round_002.pt").exists()
    # --arms runs only the arms named: the changed rn_dpo is neither discarded nor run
    assert experiments.main(["--preset", str(changed), "--out", str(out), "--arms", "nonesuch"]) == 2
    assert experiments.main(["--preset", str(changed), "--out", str(out), "--arms", "base"]) == 0
    assert (run_folder / "run" / "checkpoints" / "round_002.pt").exists()
    assert "lung/rn_dpo/seed3 (its run folder was made with other settings" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------- median aggregation
# (the robust aggregation arm of the grid: aggregation.kind median, Flower's FedMedian maths)


def test_median_is_flowers_median():
    import numpy as np
    import torch

    from shared.aggregation import Weights, combine

    def median(updates):
        weights = Weights({str(i): 1.0 / len(updates) for i in range(len(updates))})
        return combine("median", {str(i): u for i, u in enumerate(updates)}, weights, updates[0])[0]

    # odd count: the middle value per coordinate; an outlier (1000) cannot move it
    updates = [{"w": torch.tensor([1.0, 5.0]), "n": torch.tensor(7)},
               {"w": torch.tensor([2.0, 1000.0]), "n": torch.tensor(8)},
               {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(9)}]
    got = median(updates)
    assert got["w"].tolist() == [2.0, 5.0]  # by hand: sorted (1,2,3) and (4,5,1000)
    assert got["n"].item() == 7  # integer buffers come from the first update
    # even count: numpy's median, the mean of the two middle values (so two updates -> their mean)
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)]
    got = median([{"w": torch.from_numpy(a)} for a in arrays])["w"]
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np.median(np.stack(arrays), axis=0), rtol=1e-6)
    with pytest.raises(ValueError, match="no site has a positive"):
        combine("median", {"a": updates[0]}, Weights({"a": 0.0}), updates[0])


def test_median_aggregation_in_the_strategy(tmp_path):
    import torch

    from fl_server.federation import ConsortiumStrategy, SiteOutcome
    from shared.config import load_consortium
    from shared.ledger import Ledger

    path = tmp_path / "c.yaml"
    path.write_text("name: m\nrun_dir: run\nserver: {sites: [a, b, c]}\naggregation: {kind: median}\n")
    cfg = load_consortium(path)
    strategy = ConsortiumStrategy(cfg, Ledger())
    values = {"a": [0.0, 1.0], "b": [1.0, 2.0], "c": [-50.0, 90.0]}
    outcomes = {s: SiteOutcome(s, train={"num-examples": 10.0}, state={"w": torch.tensor(v)}) for s, v in values.items()}
    outcomes["d"] = SiteOutcome("d", train={"num-examples": 0.0}, state={"w": torch.tensor([9.0, 9.0])})  # no pairs
    state, changed = strategy.aggregate("preference", outcomes, {"w": torch.zeros(2)})
    assert changed and state["w"].tolist() == [0.0, 2.0]
    assert [outcomes[s].weight for s in "abcd"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    # supervised rounds stay a weighted average
    outcomes = {s: SiteOutcome(s, train={"num-examples": 10.0}, state={"w": torch.tensor(v)}) for s, v in values.items()}
    state, _ = strategy.aggregate("supervised", outcomes, {"w": torch.zeros(2)})
    assert state["w"].tolist() == pytest.approx([-49 / 3, 31.0])


# ----------------------------------------------------------------------------- Krum aggregation


def test_krum_keeps_the_update_flowers_krum_selects():
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    from shared.aggregation import Weights, combine

    def krum(updates, byzantine):
        weights = Weights({str(i): 1.0 / len(updates) for i in range(len(updates))})
        state, shares = combine("krum", {str(i): u for i, u in enumerate(updates)}, weights, updates[0], byzantine)
        return state, [i for i in range(len(updates)) if shares[str(i)] == 1.0]

    rng = np.random.default_rng(3)
    for n, byzantine in [(3, 1), (4, 1), (5, 1), (6, 2)]:
        for _ in range(5):
            updates = [{"w": torch.from_numpy(rng.normal(size=(4, 3))), "b": torch.from_numpy(rng.normal(size=2) * 3)}
                       for _ in range(n)]
            contents = [RecordDict({"arrays": ArrayRecord(u)}) for u in updates]
            flower_pick = contents.index(select_multikrum(contents, byzantine, 1)[0])
            state, chosen = krum(updates, byzantine)
            assert chosen == [flower_pick] and torch.equal(state["w"], updates[flower_pick]["w"])
    # an update far from two close ones is never the one kept
    close = [{"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([0.1, 1.1])}, {"w": torch.tensor([40.0, -9.0])}]
    assert krum(close, 1)[1] in ([0], [1])
    assert krum(close[:1], 1)[1] == [0]


def test_krum_aggregation_takes_one_update_whole(tmp_path):
    import torch

    from fl_server.federation import ConsortiumStrategy, SiteOutcome
    from shared.config import load_consortium
    from shared.ledger import Ledger

    path = tmp_path / "c.yaml"
    path.write_text("name: k\nrun_dir: run\nserver: {sites: [a, b, c]}\naggregation: {kind: krum}\n")
    strategy = ConsortiumStrategy(load_consortium(path), Ledger())
    values = {"a": [0.0, 1.0], "b": [0.2, 1.0], "c": [-50.0, 90.0]}
    outcomes = {s: SiteOutcome(s, train={"num-examples": 10.0}, state={"w": torch.tensor(v)}) for s, v in values.items()}
    state, changed = strategy.aggregate("preference", outcomes, {"w": torch.zeros(2)})
    assert changed and state["w"].tolist() == [0.0, 1.0]  # a and b tie; the first wins
    assert [outcomes[s].weight for s in "abc"] == [1.0, 0.0, 0.0]


def test_options_added_later_at_their_defaults_keep_cached_runs_valid():
    from shared.config import ConsortiumConfig, to_dict

    full = to_dict(ConsortiumConfig(name="c", run_dir=Path("run")))
    assert full["preference"]["reference"] == "round" and full["aggregation"]["krum_byzantine"] == 1
    identity = experiments._identity(full)
    assert "reference" not in identity["preference"] and "krum_byzantine" not in identity["aggregation"]
    assert identity["aggregation"]["damped"] is True  # the default now, not the earlier behaviour
    assert "damped" not in experiments._identity(dict(full, aggregation={**full["aggregation"], "damped": False}))["aggregation"]
    assert full["preference"]["reference"] == "round"  # the caller's dict is left alone
    changed = dict(full, preference={**full["preference"], "reference": "base"})
    assert experiments._digest(experiments._identity(changed)) != experiments._digest(identity)
    assert experiments._identity(changed)["preference"]["reference"] == "base"
    assert full["quality_judge"] is None and "quality_judge" not in identity  # no judge rounds: as before
    judged = dict(full, quality_judge={"rounds": 3})
    assert experiments._digest(experiments._identity(judged)) != experiments._digest(identity)
    site = {"name": "a", "image_size": 64, "judge": {"kind": "oracle"}, "work_dir": "w"}
    base = experiments.base_digest(full, [site])
    assert experiments.base_digest(full, [dict(site, min_images=5)]) == base  # a cached base stays valid
    assert experiments.base_digest(judged, [site]) == base  # and the judge settings do not decide a base
    assert experiments.base_digest(full, [dict(site, image_size=128)]) != base


def _record(arm: str, seed: int, last: float, headroom=(0.5, 0.7, 0.6)) -> dict:
    """A finished run as run_record returns it: base 0.5, `last` at round 1, one site's headroom."""
    figures = lambda dice: {"mean_dice": dice, "mean_hd95": 5.0, "sites": {}, "unseen": {},  # noqa: E731
                            "unseen_mean_dice": None, "reliability": {}}
    reliability = {"a": dict(zip(experiments.HEADROOM_KEYS, headroom))}
    return {"task": "lung", "arm": arm, "seed": seed, "status": "done", "wall_s": 1.0,
            "rounds": {0: figures(0.5), 1: figures(last)}, "peak": 1, "last": 1, "falls": 0,
            "reliability": reliability}


def test_label_efficiency_and_headroom_capture_are_paired_by_seed(tmp_path):
    preset = experiments.load_preset(write_preset(tmp_path))
    for name in ("sup_only", "all_labelled"):
        preset.arms.append(experiments.Arm(name=name, groups=["method"], tasks=["lung"], set={}, judge=None,
                                           site_judges={}))
    records = [_record("sup_only", 0, 0.60), _record("all_labelled", 0, 0.70), _record("rn_dpo", 0, 0.65),
               _record("sup_only", 1, 0.50), _record("all_labelled", 1, 0.60), _record("rn_dpo", 1, 0.59),
               _record("rn_dpo", 2, 0.99)]  # seed 2 has no control: it has no label efficiency
    rows = {r["arm"]: r for r in experiments.summarise(records, preset)}
    assert rows["rn_dpo"]["label_efficiency"] == pytest.approx([0.5, 0.9])
    assert rows["all_labelled"]["label_efficiency"] == pytest.approx([1.0, 1.0])
    assert rows["rn_dpo"]["headroom_capture"] == pytest.approx([0.5] * 3)  # (0.6 - 0.5) / (0.7 - 0.5)
    assert experiments._efficiency(0.6, 0.6, 0.6) is None  # labelling gains nothing: undefined, not infinite
    assert experiments._capture(0.6, 0.6, 0.6) is None
    table = experiments.markdown(list(rows.values()), records, preset, "cmd", [])
    line = next(x for x in table.splitlines() if x.startswith("| rn_dpo | 3/1 |"))
    assert "0.70 ± 0.28" in line  # the label efficiency column, mean ± std over the two paired seeds


def test_judge_shift_averages_only_the_rounds_that_mined(tmp_path):
    """benchmarks/judge_shift.py: a gated round (no mining_* figures) is left out, calibration and
    unlabelled figures are averaged over the rest, by hand."""
    import json

    from benchmarks import judge_shift

    def site(rnd, gated, rel, mining=None, wilson=0.8):
        train = {"gated": float(gated), "rel_spearman": rel, "rel_informative_pair_accuracy": rel,
                 "rel_informative_wilson": wilson}
        if mining is not None:
            train.update(mining_spearman=mining, mining_informative_pair_accuracy=mining)
        return {"kind": "site", "round": rnd, "phase": "preference", "site": "a", "train": train}

    lines = [{"kind": "global", "round": 1, "phase": "preference"},
             site(1, 0, 0.9, 0.5, wilson=0.7), site(2, 1, 0.1), site(3, 0, 0.7, 0.3, wilson=0.9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    row = judge_shift.shift_rows(tmp_path)["a"]
    assert row["rounds"] == 2
    assert row["rel_spearman"] == pytest.approx(0.8) and row["mining_spearman"] == pytest.approx(0.4)
    assert row["wilson"] == (0.7, 0.9)
