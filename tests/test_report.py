"""Tests for fl_server/report.py: reading a run directory, the HTML report and the text tables."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from PIL import Image

from fl_server.report import (
    _fmt,
    build_report,
    _site_styles,
    find_overlays,
    plot_dice,
    problem_rows,
    read_config,
    read_ledger,
    read_metrics,
    round_table,
    status_table,
)

SITES = ("montgomery", "shenzhen", "jsrt")
FAIL_REASON = "CUDA out of memory while mining pairs"
EXCLUDE_REASON = "judge pair accuracy 0.450 below exclude_below 0.55"
CONSORTIUM = "chest-xray-consortium"
# judge pair accuracy per preference round (3, 4, 5); jsrt's judge degrades until it is excluded
PAIR_ACC = {"montgomery": (0.88, 0.91, 0.93), "shenzhen": (0.80, None, 0.84), "jsrt": (0.70, 0.52, 0.45)}
STATE = {"montgomery": ("trusted",) * 3, "shenzhen": ("trusted",) * 3, "jsrt": ("trusted", "probation", "excluded")}


def _site_line(rnd: int, phase: str, site: str, dice: float | None, status: str = "ok", **extra) -> dict:
    line = {"kind": "site", "round": rnd, "phase": phase, "site": site, "status": status}
    if dice is not None:
        line["eval"] = {"dice": dice, "hd95": 10.0 - 5 * dice, "n_images": 12}
    line.update(extra)
    return line


def _global_line(rnd: int, phase: str, mean_dice: float, ok: int = 3, failed: int = 0) -> dict:
    return {"kind": "global", "round": rnd, "phase": phase, "mean_dice": mean_dice, "mean_hd95": 6.0,
            "sites_ok": ok, "sites_failed": failed, "duration_s": 41.2, "aggregated": rnd > 0}


def _dice(site: str, rnd: int) -> float:
    """Deterministic Dice that rises with the round, a little different per site."""
    return round(0.60 + 0.05 * rnd + 0.01 * SITES.index(site), 3)


def _lines(preference_rounds: int = 3) -> list[dict]:
    """Round 0 (initial), 2 supervised rounds, then up to 3 preference rounds."""
    lines = []
    for site in SITES:
        lines.append(_site_line(0, "initial", site, _dice(site, 0), weight=0.0, state="trusted"))
    lines.append(_global_line(0, "initial", 0.61))
    for rnd in (1, 2):
        for site in SITES:
            lines.append(_site_line(rnd, "supervised", site, _dice(site, rnd), weight=1 / 3, state="trusted",
                                    train={"loss": 0.3, "n_examples": 40}))
        lines.append(_global_line(rnd, "supervised", 0.6 + 0.05 * rnd))
    for k, rnd in enumerate(range(3, 3 + preference_rounds)):
        for site in SITES:
            acc, state = PAIR_ACC[site][k], STATE[site][k]
            if acc is None:  # shenzhen fails round 4: no train, no eval
                lines.append(_site_line(rnd, "preference", site, None, status="failed", reason=FAIL_REASON,
                                        weight=0.0, state=state))
            elif state == "excluded":
                lines.append(_site_line(rnd, "preference", site, _dice(site, rnd), status="excluded",
                                        reason=EXCLUDE_REASON, weight=0.0, state=state,
                                        train={"pairs_used": 9, "rel_pair_accuracy": acc, "rel_n_pairs": 9}))
            else:
                contributing = sum(PAIR_ACC[s][k] is not None and STATE[s][k] != "excluded" for s in SITES)
                lines.append(_site_line(rnd, "preference", site, _dice(site, rnd), weight=1 / contributing,
                                        state=state,
                                        train={"loss": 0.2, "pairs_used": 9, "rel_pair_accuracy": acc,
                                               "rel_spearman": 0.6, "rel_pair_gain": 0.05, "rel_n_pairs": 9,
                                               "margin": 1.3, "rel_dice_identity": 0.7, "rel_dice_best": 0.8,
                                               "rel_dice_pick": 0.7 + 0.1 * acc}))
        lines.append(_global_line(rnd, "preference", 0.75 + 0.01 * k, ok=3 - (rnd == 4), failed=int(rnd == 4)))
    return lines


def _ledger(rounds_completed: int) -> dict:
    sites = {}
    for site in SITES:
        sites[site] = {
            "state": STATE[site][-1],
            "ema": {"pair_accuracy": {"montgomery": 0.9, "shenzhen": 0.82, "jsrt": 0.5}[site],
                    "spearman": 0.6, "pair_gain": 0.05},
            "failures": int(site == "shenzhen"),
            "rejected": 0,
            "history": [{"round": 3, "pair_accuracy": PAIR_ACC[site][0], "spearman": 0.6, "pair_gain": 0.05,
                         "n_pairs": 9, "state": STATE[site][0], "weight_factor": 0.8}],
        }
    return {"rounds_completed": rounds_completed, "sites": sites}


def _write_overlay(path: Path, color: tuple[int, int, int]) -> None:
    image = Image.new("RGB", (8, 8), (40, 40, 40))
    for i in range(8):
        image.putpixel((i, 2), color)
    image.save(path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A full run: 3 sites, 2 supervised + 3 preference rounds, a failure, an exclusion, a resume
    that repeats round 5 with different numbers, a truncated last line, two overlays."""
    lines = _lines()
    before_resume = dict(lines[-4], eval={"dice": 0.111, "hd95": 99.0, "n_images": 12})  # montgomery, round 5
    text = "\n".join(json.dumps(x) for x in lines[:-4]) + "\n"
    text += json.dumps(before_resume) + "\n"  # the killed run got this far in round 5 ...
    text += "\n".join(json.dumps(x) for x in lines[-4:]) + "\n"  # ... the resumed run redid round 5
    text += '{"kind": "site", "round": 6, "phase": "preference", "site": "montg'  # killed mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / "ledger.json").write_text(json.dumps(_ledger(5)))
    (tmp_path / "config.yaml").write_text(
        f"name: {CONSORTIUM}\naggregation:\n  kind: reliability\n  exclude_below: 0.55\n  probation_below: 0.65\n")
    (tmp_path / "overlays").mkdir()
    _write_overlay(tmp_path / "overlays" / "montgomery_round003_0.png", (30, 230, 50))
    _write_overlay(tmp_path / "overlays" / "jsrt_round004_0.png", (240, 40, 25))
    (tmp_path / "checkpoints").mkdir()
    return tmp_path


def _quiet(fn, *args):
    """Call ``fn`` ignoring the truncated-line warning (tested on its own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


# ----------------------------------------------------------------------------- reading


def test_read_metrics_dedups_and_skips_truncated_line(run_dir):
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: skipped an unreadable line"):
        lines = read_metrics(run_dir)
    assert len(lines) == 6 * 4  # rounds 0..5, 3 site lines + 1 global line each, no round 6
    assert max(line["round"] for line in lines) == 5
    montgomery_5 = [x for x in lines if x.get("site") == "montgomery" and x["round"] == 5]
    assert len(montgomery_5) == 1
    assert montgomery_5[0]["eval"]["dice"] == pytest.approx(_dice("montgomery", 5))  # the resumed run's line
    assert [x["round"] for x in lines] == sorted(x["round"] for x in lines)


def test_read_metrics_skips_garbled_middle_line(tmp_path):
    # a killed run leaves a line without newline; the resumed server appends onto it
    good = json.dumps(_global_line(1, "supervised", 0.7))
    text = '{"kind": "site", "rou' + good + "\n" + json.dumps(_global_line(2, "supervised", 0.8)) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:1:"):
        lines = read_metrics(tmp_path)
    assert [x["round"] for x in lines] == [2]


def test_read_missing_files(tmp_path):
    assert read_metrics(tmp_path) == []
    assert read_ledger(tmp_path) == {"rounds_completed": 0, "sites": {}}


def test_read_ledger_names_file_on_bad_json(tmp_path):
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(ValueError, match="ledger.json"):
        read_ledger(tmp_path)


@pytest.mark.parametrize("sites_part", [
    "",                                                       # consortium only
    "\n# sites, as resolved\nname: siteA\n",                  # one site appended
    "\n# sites, as resolved\nname: siteA\n---\nname: siteB\n",  # several sites, one per document
    "\n# sites, as resolved\n---\nname: siteA\n---\nname: siteB\n",
])
def test_read_config_takes_the_consortium_document(tmp_path, sites_part):
    (tmp_path / "config.yaml").write_text(f"name: {CONSORTIUM}\naggregation:\n  exclude_below: 0.55\n" + sites_part)
    config = read_config(tmp_path)
    assert config["name"] == CONSORTIUM and config["aggregation"]["exclude_below"] == 0.55


# ----------------------------------------------------------------------------- report


def test_report_is_self_contained_and_complete(run_dir):
    path = _quiet(build_report, run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 4 + 2  # dice, pair accuracy, headroom, weights + 2 overlays
    assert "Headroom" in page
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert CONSORTIUM in page and str(run_dir.resolve()) in page
    assert "How to read this" in page
    for site in SITES:
        assert site in page
    assert FAIL_REASON in page and EXCLUDE_REASON in page
    assert "montgomery_round003_0.png" in page and "jsrt_round004_0.png" in page
    assert "chosen mask" in page and "rejected mask" in page
    assert not list(run_dir.glob(".report.*"))  # no temporary file left behind


def test_report_summary_uses_final_and_best_dice(run_dir):
    page = _quiet(build_report, run_dir).read_text()
    row = re.search(r"<tr><td>shenzhen</td>(.*?)</tr>", page).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    # final Dice, at round, best Dice, best round, final HD95, state, EMA pair acc.
    assert cells == [f"{_dice('shenzhen', 5):.3f}", "5", f"{_dice('shenzhen', 5):.3f}", "5",
                     f"{10 - 5 * _dice('shenzhen', 5):.3f}", "trusted", "0.820"]


def test_report_builds_without_preference_rounds_or_overlays(tmp_path):
    lines = _lines(preference_rounds=0)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    page = build_report(tmp_path).read_text()  # no ledger, no config, no overlays
    assert "No preference round yet" in page
    assert "No overlays" in page
    assert page.count("data:image/png;base64,") == 2  # dice and weights only
    assert tmp_path.name in page  # no config.yaml: the title falls back to the folder name
    for site in SITES:
        assert site in page


def test_report_builds_for_site_that_never_evaluated(tmp_path):
    lines = [_site_line(1, "supervised", "montgomery", 0.8, weight=1.0, state="trusted"),
             _site_line(1, "supervised", "jsrt", None, status="failed", reason="data folder missing",
                        weight=0.0, state="trusted"),
             _global_line(1, "supervised", 0.8, ok=1, failed=1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    page = build_report(tmp_path).read_text()
    assert "<tr><td>jsrt</td><td class=\"num\">-</td>" in page
    assert "data folder missing" in page


def test_report_builds_in_empty_run_dir(tmp_path):
    page = build_report(tmp_path).read_text()
    assert "No site has reported yet" in page and "No evaluated round yet" in page


def test_find_overlays_caps_and_groups_by_site(tmp_path):
    (tmp_path / "overlays").mkdir()
    for site in SITES:
        for rnd in (3, 4, 5):
            for i in range(2):
                _write_overlay(tmp_path / "overlays" / f"{site}_round{rnd:03d}_{i}.png", (0, 255, 0))
    (tmp_path / "overlays" / "notes.png").write_bytes(b"")  # not an overlay name: ignored
    found = find_overlays(tmp_path)
    assert sorted(found) == sorted(SITES)
    assert sum(len(v) for v in found.values()) <= 9
    assert all(rnd == 5 for v in found.values() for rnd, _ in v[:2])  # latest rounds first


# ----------------------------------------------------------------------------- text tables


def test_status_table_lists_each_site(run_dir):
    table = _quiet(status_table, run_dir)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:] if line.split()[0] in SITES}
    assert set(rows) == set(SITES)
    # site, state, inf_acc, bound, ema_acc, ema_spearman, ema_gain, last_weight, failures, rejected, last_round
    # (a ledger written before the informative pairs: no pooled figure, no bound)
    assert rows["montgomery"] == ["montgomery", "trusted", "-", "-", "0.900", "0.600", "0.050", "0.500", "0", "0", "5"]
    assert rows["shenzhen"][1] == "trusted" and rows["shenzhen"][8] == "1"
    assert rows["jsrt"][1] == "excluded" and rows["jsrt"][7] == "0.000"
    assert table.splitlines()[-1] == "rounds completed: 5   latest mean Dice: 0.770 (round 5)"


def test_status_table_without_ledger(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_site_line(1, "supervised", "jsrt", 0.8, weight=1.0,
                                                                  state="trusted")) + "\n")
    table = status_table(tmp_path)
    assert "jsrt" in table and "trusted" in table
    assert table.endswith("rounds completed: 0   latest mean Dice: -")


def test_missing_run_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        status_table(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_report(tmp_path / "nowhere")


def _cells(table: str) -> list[list[str]]:
    """Split an aligned table by the column spans of its dashed rule, checking the gaps are blank."""
    title, header, rule, *rows = table.splitlines()
    spans = [m.span() for m in re.finditer(r"-+", rule)]
    out = []
    for line in [header] + rows:
        line = line.ljust(len(rule))
        assert len(line) == len(rule), line
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert line[end:start].strip() == "", f"misaligned: {line!r}"
        out.append([line[a:b].strip() for a, b in spans])
    return out


def test_round_table_aligns_and_marks_missing():
    lines = [x for x in _lines() if x["round"] == 4]
    table = round_table(lines)
    assert table.splitlines()[0] == "Round 4 (preference), 41.2 s, aggregated"
    header, *rows = _cells(table)
    assert header == ["site", "phase", "status", "dice", "hd95", "pair_acc", "inf_acc", "bound", "pairs", "weight",
                      "state", "outcome", "identity", "best_k", "pick"]
    by_site = {row[0]: row for row in rows}
    assert list(by_site) == ["jsrt", "montgomery", "shenzhen", "mean"]
    assert by_site["shenzhen"] == ["shenzhen", "preference", "failed", "-", "-", "-", "-", "-", "-", "0.000", "trusted",
                                   "-", "-", "-", "-"]
    assert by_site["montgomery"][3:10] == [f"{_dice('montgomery', 4):.3f}", f"{10 - 5 * _dice('montgomery', 4):.3f}",
                                           "0.910", "-", "-", "9", "0.500"]
    # headroom on calibration: the model's own mask, the best of K, the judge's pick
    assert by_site["montgomery"][12:] == ["0.700", "0.800", "0.791"]
    # mean row: global means, mean pair accuracy of the sites that have one, total pairs, mean headroom
    assert by_site["mean"] == ["mean", "preference", "2 ok/1 failed", "0.760", "6.000", "0.715", "-", "-", "18", "-", "-",
                               "-", "0.700", "0.800", "0.771"]
    # numeric columns are right-aligned: every value ends where its header ends
    header_line, rule = table.splitlines()[1:3]
    dice_end = header_line.index("dice") + len("dice")
    assert all(line[dice_end - 1] != " " for line in table.splitlines()[3:])


def test_round_table_dedups_and_rejects_several_rounds():
    lines = [x for x in _lines() if x["round"] == 3]
    stale = dict(lines[0], eval={"dice": 0.1, "hd95": 50.0, "n_images": 12})
    table = round_table([stale] + lines)
    assert "0.100" not in table
    with pytest.raises(ValueError, match=r"rounds \[2, 3\]"):
        round_table([x for x in _lines() if x["round"] in (2, 3)])


def test_round_table_without_global_line():
    table = round_table([_site_line(1, "supervised", "jsrt", 0.8123)])
    header, jsrt, mean = _cells(table)
    assert jsrt == ["jsrt", "supervised", "ok", "0.812", "5.938"] + ["-"] * 10
    assert mean == ["mean"] + ["-"] * 14


@pytest.mark.parametrize("value, expected", [
    (None, "-"),
    (0.91234, "0.912"),      # 3 decimals
    (7, "7"),                # counts stay integers
    (float("inf"), "inf"),   # HD95 of an empty prediction
    (float("nan"), "nan"),
    ("trusted", "trusted"),
    ("", "-"),
])
def test_fmt(value, expected):
    assert _fmt(value) == expected


def test_round_table_marks_a_gated_site():
    """A site whose round took anchor-only steps (preference.min_pick_gain) shows status gated."""
    lines = [x for x in _lines() if x["round"] == 3]
    for line in lines:
        if line.get("site") == "montgomery":
            line["train"] = dict(line["train"], gated=1.0)
        elif line.get("kind") == "site" and line.get("train"):
            line["train"] = dict(line["train"], gated=0.0)
    rows = {row[0]: row for row in _cells(round_table(lines))[1:]}
    assert rows["montgomery"][2] == "gated"
    assert all(row[2] != "gated" for name, row in rows.items() if name != "montgomery")


def test_round_table_marks_a_site_the_server_held_to_anchor_steps():
    """status anchor: the server sent the site anchor-only steps (excluded_steps: anchor; the line
    says held). An excluded site of the method-none control took the same kind of steps unasked:
    it stays ok."""
    held = _site_line(4, "preference", "montgomery", 0.8, state="excluded", weight=0.4, held=True,
                      train={"pairs_used": 0, "num-examples": 12.0})
    control = _site_line(4, "preference", "jsrt", 0.8, state="excluded", weight=0.4,
                         train={"pairs_used": 0, "num-examples": 12.0})
    rows = {row[0]: row for row in _cells(round_table([held, control]))[1:]}
    assert (rows["montgomery"][2], rows["jsrt"][2]) == ("anchor", "ok")


# ----------------------------------------------------------------------------- exclusions and overlaps


def test_an_exclusion_without_a_recorded_reason_gets_one_from_the_ledger():
    """Runs written before the server recorded a reason: the EMA is recomputed from the ledger's
    history with the config's `ema`, 0.70 -> 0.61 -> 0.53, and compared with exclude_below."""
    lines = [_site_line(5, "preference", "jsrt", 0.7, status="excluded", state="excluded",
                        train={"rel_pair_accuracy": 0.45, "rel_n_pairs": 9}),
             _site_line(5, "preference", "montgomery", 0.8, status="failed", reason=FAIL_REASON)]
    history = [{"round": r, "pair_accuracy": a, "n_pairs": 9, "state": "x"}
               for r, a in ((3, 0.70), (4, 0.52), (5, 0.45), (6, 0.1))]  # round 6: after the line
    history.insert(1, {"round": 3, "pair_accuracy": 0.0, "n_pairs": 0})  # no pairs: no evidence
    ledger = {"sites": {"jsrt": {"history": history}}}
    config = {"aggregation": {"ema": 0.5, "exclude_below": 0.55}}
    rows = problem_rows(lines, ledger, config)
    assert rows == [["5", "jsrt", "preference", "excluded", "judge excluded by the ledger: EMA pair accuracy 0.53 "
                                                              "< exclude_below 0.55"],
                    ["5", "montgomery", "preference", "failed", FAIL_REASON]]
    # without a ledger: this round's figure; without anything: the ledger state, never "-"
    assert problem_rows(lines[:1], {}, config)[0][-1] == ("judge excluded by the ledger: EMA pair accuracy 0.45 "
                                                          "< exclude_below 0.55")
    bare = [_site_line(5, "preference", "jsrt", None, status="excluded", state="excluded")]
    assert problem_rows(bare)[0][-1] == "judge excluded by the ledger (state excluded)"


def test_report_gives_every_exclusion_a_reason(run_dir):
    text = (run_dir / "metrics.jsonl").read_text().replace(f', "reason": "{EXCLUDE_REASON}"', "")
    (run_dir / "metrics.jsonl").write_text(text)
    page = _quiet(build_report, run_dir).read_text()
    assert EXCLUDE_REASON not in page
    table = page.split("Failures, rejections and exclusions")[1]
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)]
    excluded = [row for row in rows if row and row[3] == "excluded"]
    # the fixture's ledger history stops at round 3 (EMA 0.70): no figure is claimed that contradicts the state
    assert excluded == [["5", "jsrt", "preference", "excluded",
                         "judge excluded by the ledger (state excluded: exclude_below 0.55)"]], rows


def test_sites_are_drawn_distinctly_so_equal_lines_stay_visible():
    lines = [_site_line(1, "supervised", f"site{i}", 1.0) for i in range(8)]
    styles = _site_styles(lines)
    assert len({(s["marker"], s["linestyle"], s["color"]) for s in styles.values()}) == 8
    assert len({s["marker"] for s in styles.values()}) == 8
    assert all(s["markerfacecolor"] == "none" and s["alpha"] < 1 for s in styles.values())
    sizes = [styles[f"site{i}"]["markersize"] for i in range(3)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3  # a smaller marker inside a larger one


def test_overlapping_sites_both_show_in_the_dice_and_accuracy_plots(monkeypatch):
    """Two sites with identical values every round (both at 1.0): as drawn, their lines differ in
    marker, line style and size, are see-through, and the mean lies under them, not over them."""
    import fl_server.report as report

    figures = []
    monkeypatch.setattr(report, "_figure_png", lambda fig: figures.append(fig) or b"png")
    lines = []
    for rnd in range(1, 5):
        phase = "supervised" if rnd < 3 else "preference"
        train = {"rel_pair_accuracy": 1.0, "rel_n_pairs": 9}
        lines += [_site_line(rnd, phase, s, 1.0, state="trusted", train=train) for s in ("a", "b")]
        lines.append(_global_line(rnd, phase, 1.0))
    plot_dice(lines), report.plot_pair_accuracy(lines, {})
    for fig in figures:
        drawn = {line.get_label(): line for line in fig.axes[0].get_lines()}
        a, b = drawn["a"], drawn["b"]
        assert list(a.get_ydata()) == list(b.get_ydata())  # the data are drawn where they are
        assert a.get_marker() != b.get_marker() and a.get_linestyle() != b.get_linestyle()
        assert a.get_markersize() > b.get_markersize() and a.get_markerfacecolor() == "none"
        assert a.get_alpha() < 1 and b.get_alpha() < 1
        if "mean" in drawn:
            assert drawn["mean"].get_zorder() < min(a.get_zorder(), b.get_zorder())
