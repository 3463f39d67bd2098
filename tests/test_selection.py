"""Model selection on calibration Dice and the rollback margin (shared.selection), by hand;
best.pt and its repair on resume (fl_server.run_dir); the marks in the round table, status and report."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fl_server import report
from fl_server.run_dir import RunDir
from shared.config import ConfigError, SelectionConfig, load_consortium
from shared.ledger import Ledger
from shared.selection import Selection, consortium_dice, select

ON = SelectionConfig()  # margin 0.02, preference rounds only


def test_consortium_dice_weighs_sites_by_their_calibration_images():
    # (0.8 x 10 + 0.5 x 30) / 40 = 23 / 40 = 0.575; a plain mean of the sites would say 0.65
    dice, images = consortium_dice([(0.8, 10.0), (0.5, 30.0)])
    assert dice == pytest.approx(0.575) and images == 40
    # a site that withheld its figure (too few images), a NaN and an empty split are no evidence
    dice, images = consortium_dice([(0.8, 10.0), (None, None), (math.nan, 12.0), (0.3, 0.0)])
    assert dice == pytest.approx(0.8) and images == 10
    assert consortium_dice([]) == (None, 0)


def test_the_best_round_is_the_highest_calibration_dice_and_a_tie_keeps_the_earlier():
    s = select(Selection(), 1, "supervised", 0.60, ON)
    assert s == Selection(1, 0.60, False)
    s = select(s, 2, "supervised", 0.70, ON)
    assert s == Selection(2, 0.70, False)
    s = select(s, 3, "preference", 0.70, ON)  # equal: round 2 stays the best, no fall
    assert s == Selection(2, 0.70, False)
    s = select(s, 4, "preference", None, ON)  # no site reported: kept as it is
    assert s == Selection(2, 0.70, False)


def test_a_fall_of_more_than_the_margin_is_rolled_back_and_less_is_kept():
    best = Selection(2, 0.80, False)
    # 0.80 - 0.77 = 0.03 > 0.02: rolled back; 0.80 - 0.79 = 0.01 <= 0.02: kept
    assert select(best, 3, "preference", 0.77, ON) == Selection(2, 0.80, True)
    assert select(best, 3, "preference", 0.79, ON) == Selection(2, 0.80, False)
    # exactly the margin (0.80 - 0.78 is 0.0200000000000000018 in floats) is kept
    assert select(best, 3, "preference", 0.78, ON) == Selection(2, 0.80, False)
    # a wider margin keeps the 0.03 fall; a rolled-back round that recovers is simply kept
    assert not select(best, 3, "preference", 0.77, SelectionConfig(rollback_margin=0.05)).rolled_back
    assert select(Selection(2, 0.80, True), 4, "preference", 0.795, ON) == Selection(2, 0.80, False)


def test_rollback_is_off_for_supervised_rounds_and_when_the_margin_is_null():
    best = Selection(2, 0.80, False)
    assert not select(best, 3, "supervised", 0.10, ON).rolled_back  # default phases: preference only
    assert select(best, 3, "supervised", 0.10, SelectionConfig(rollback_phases=("supervised", "preference"))).rolled_back
    assert not select(best, 3, "preference", 0.10, SelectionConfig(rollback_margin=None)).rolled_back


def test_selection_round_trips_through_a_checkpoint_payload():
    s = Selection(4, 0.75, True)
    assert Selection.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert Selection.from_dict(None) == Selection()  # a checkpoint from before model selection


def test_the_selection_config_is_checked_at_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nrun_dir: run\nserver: {sites: [a]}\nselection: {rollback_margin: 1.5}\n")
    with pytest.raises(ConfigError, match="selection.rollback_margin: 1.5 must be between 0 and 1"):
        load_consortium(path)
    path.write_text("name: c\nrun_dir: run\nserver: {sites: [a]}\nselection: {rollback_phases: [pref]}\n")
    with pytest.raises(ConfigError, match="selection.rollback_phases: .* must list distinct phases"):
        load_consortium(path)
    path.write_text("name: c\nrun_dir: run\nserver: {sites: [a]}\nselection: {rollback_margin: null}\n")
    cfg = load_consortium(path)
    assert cfg.selection.rollback_margin is None and cfg.selection.rollback_phases == ("preference",)


def test_best_pt_follows_the_best_round_and_a_stop_between_the_writes_is_repaired(tmp_path):
    run = RunDir(tmp_path)
    run.checkpoints.mkdir()
    weights = {r: {"w": torch.full((2,), float(r))} for r in (1, 2, 3)}
    run.save_round(1, weights[1], Ledger(), "h", Selection(1, 0.6), 0.6)
    run.save_round(2, weights[2], Ledger(), "h", Selection(2, 0.7), 0.7)
    best = torch.load(run.best, weights_only=True)
    assert best["round"] == 2 and best["calib_dice"] == 0.7 and best["state_dict"]["w"].tolist() == [2.0, 2.0]
    assert best["selection"] == {"best_round": 2, "best_dice": 0.7, "rolled_back": False, "best_reports": {}}
    assert run.latest_checkpoint().name == "round_002.pt"  # best.pt is no round checkpoint

    run.save_round(3, weights[3], Ledger(), "h", Selection(2, 0.7, True), 0.5)  # rolled back
    assert torch.load(run.best, weights_only=True)["round"] == 2
    selection, state = run.resume_selection(3, weights[3])
    assert selection == Selection(2, 0.7, True) and state["w"].tolist() == [2.0, 2.0]  # starts from the best

    # a stop after round 2's checkpoint but before its best.pt: the resume rewrites best.pt
    torch.save(torch.load(run.checkpoint(1), weights_only=True), run.best)
    run.checkpoint(3).unlink()
    selection, state = run.resume_selection(2, weights[2])
    assert selection == Selection(2, 0.7, False) and state["w"].tolist() == [2.0, 2.0]
    assert torch.load(run.best, weights_only=True)["round"] == 2


def _global(round_number, calib, best_round, best_dice, rolled_back=False, phase="preference"):
    return {"kind": "global", "round": round_number, "phase": phase, "mean_dice": 0.5, "duration_s": 1.0,
            "aggregated": True, "calib_dice": calib, "calib_images": 20, "best_round": best_round,
            "best_calib_dice": best_dice, "rolled_back": rolled_back}


def test_the_round_table_status_and_report_mark_the_best_and_the_rolled_back_rounds(tmp_path):
    lines = [_global(1, 0.70, 1, 0.70, phase="supervised"), _global(2, 0.80, 2, 0.80),
             _global(3, 0.60, 2, 0.80, rolled_back=True), _global(4, 0.79, 2, 0.80)]
    titles = [report.round_table([line]).splitlines()[0] for line in lines]
    assert titles[1] == "Round 2 (preference), 1.0 s, aggregated, calibration Dice 0.800 * best"
    assert titles[2] == ("Round 3 (preference), 1.0 s, aggregated, calibration Dice 0.600: ROLLED BACK, "
                         "the next round starts from the best (round 2, 0.800)")
    assert titles[3].endswith("calibration Dice 0.790 (best: round 2, 0.800)")

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "ledger.json").write_text(json.dumps({"rounds_completed": 4, "sites": {}}))
    status = report.status_table(tmp_path)
    assert status.splitlines()[-1] == ("best round: 2 (calibration Dice 0.800, best.pt); "
                                       "rolled back: round 3")
    assert report.selection_rows(lines) == [
        ["1", "supervised", "0.500", "0.700", ""], ["2", "preference", "0.500", "0.800", "* best"],
        ["3", "preference", "0.500", "0.600", "rolled back"], ["4", "preference", "0.500", "0.790", ""]]
    page = report.render_report(tmp_path)
    assert "Model selection" in page and "best round: 2" in page and "rolled back</td>" in page


def test_a_site_sends_calibration_dice_only_from_at_least_min_images_images():
    from fl_client.reply_policy import allowed_metrics, withhold_small

    reply = {"dice": 0.7, "n_images": 12.0, "num-examples": 12.0, "calib_dice": 0.8, "calib_images": 4.0}
    kept, dropped = allowed_metrics(reply)
    assert kept == reply and dropped == []  # on the allowlist
    out, withheld = withhold_small(kept, min_images=5)
    assert sorted(withheld) == ["calib_dice", "calib_images"] and out["too_few_calib"] == 1.0
    assert out["dice"] == 0.7 and out["num-examples"] == 12.0  # the test figures are unaffected
    assert withhold_small(dict(kept, calib_images=5.0), min_images=5)[1] == []


def test_a_site_that_drops_out_or_joins_is_no_fall_and_no_best():
    """Rounds are compared over the sites both heard from: by hand, the best round 2 has a 0.80 (10
    images) and b 0.60 (10), 0.70 in all."""
    best = select(Selection(), 2, "preference", 0.70, ON, {"a": (0.80, 10.0), "b": (0.60, 10.0)})
    assert best.best_round == 2 and best.best_reports == {"a": (0.80, 10.0), "b": (0.60, 10.0)}
    # b withholds its figure: a alone at 0.79 is 0.79 > 0.70 overall, but 0.01 under a's 0.80: kept, no best
    s = select(best, 3, "preference", 0.79, ON, {"a": (0.79, 10.0), "b": (None, None)})
    assert s.best_round == 2 and not s.rolled_back
    # a drops out: b alone at 0.75 looks better than 0.70, but is 0.15 above b's 0.60: a new best
    assert select(best, 3, "preference", 0.75, ON, {"b": (0.75, 10.0)}).best_round == 3
    # a alone at 0.75 is more than 0.02 under a's 0.80 though it beats 0.70: rolled back
    assert select(best, 3, "preference", 0.75, ON, {"a": (0.75, 10.0)}).rolled_back
    # a new site c only: nothing in common, kept as it is
    assert select(best, 3, "preference", 0.10, ON, {"c": (0.10, 10.0)}) == Selection(2, 0.70, False, best.best_reports)
    # the per-site reports survive a checkpoint
    assert Selection.from_dict(json.loads(json.dumps(best.to_dict()))) == best
