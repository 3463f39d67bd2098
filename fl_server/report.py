"""Read a run directory and present it: the HTML report, ``fl-server status`` and fl-sim's round table.

The run directory (DESIGN.md section 6) is written by the server; this module only reads it::

    run_dir/
      metrics.jsonl     one JSON object per line: "site" lines (one per site and round) and
                        "global" lines (one per round); after a resume a (kind, round, site) may
                        repeat and the last occurrence wins
      ledger.json       the judge-reliability ledger (EMA, state, history per site)
      config.yaml       the resolved consortium config (name, aggregation thresholds)
      overlays/*.png    <site>_round<NNN>_<i>.png, chosen outline green, rejected red (simulations)
      report.html       written by ``build_report``: one self-contained page, plots and overlays
                        embedded as base64 PNG, no external CSS or JS

Every reader tolerates missing pieces (no ledger yet, no preference round, no overlays, a site
with failed rounds and no evaluation): the report and the tables still build and say what is
absent. Plots use matplotlib's object API on the Agg canvas, never ``pyplot``, so nothing here
touches global state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
LEDGER_FILE = "ledger.json"
CONFIG_FILE = "config.yaml"
OVERLAY_DIR = "overlays"
REPORT_FILE = "report.html"
MAX_OVERLAYS = 9
CHANCE = 0.5
_OVERLAY_NAME = re.compile(r"^(?P<site>.+)_round(?P<round>\d+)_(?P<index>\d+)\.png$")
_MISSING = "-"
SITES_MARKER = re.compile(r"^# sites, as resolved", re.MULTILINE)  # written by fl_server/run_dir.py

HOW_TO_READ = (
    "Each round ends with every site scoring the global model on its own held-out test split. "
    "The first plot shows that test Dice per site (higher is better) and their mean; the shaded "
    "part is the preference phase, where sites fine-tune on unlabelled images ranked by their "
    "local judge. The second plot shows how often each site's judge ranked mask pairs correctly on "
    "its labelled calibration split: 0.5 is chance, and the judge of a site under the exclusion "
    "threshold steers nothing until it recovers. The third plot shows each site's share of the averaged update "
    "per round. The overlays are examples of the pairs a site trained on: the green outline is "
    "the mask its judge preferred, the red one the mask it rejected. Rounds a site failed, or whose "
    "update the server rejected or excluded, are listed at the end."
)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
code { background: #f3f3f3; padding: 0 .2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img.plot { max-width: 100%; }
.gallery { display: flex; flex-wrap: wrap; gap: .8em; }
figure { margin: 0; } figcaption { font-size: .85em; color: #555; }
.swatch { display: inline-block; width: 1em; height: .6em; margin: 0 .3em 0 .8em; }
.note { color: #666; font-style: italic; }
"""


# ----------------------------------------------------------------------------- reading


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """All lines of ``run_dir/metrics.jsonl``, deduplicated and ordered by round.

    The last occurrence of each (kind, round, site) wins (a resumed server repeats rounds).
    A line that is not a JSON object with ``kind`` and ``round`` (typically the truncated last
    line of a run killed mid-write) is skipped with a ``UserWarning`` naming file and line.
    Returns ``[]`` when the file does not exist yet.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            record = _parse_metrics_line(text, path, number)
            if record is not None:
                records.append(record)
    return _dedup(records)


def read_ledger(run_dir: str | os.PathLike) -> dict:
    """``run_dir/ledger.json``; ``{"rounds_completed": 0, "sites": {}}`` when it does not exist yet."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        return {"rounds_completed": 0, "sites": {}}
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(ledger, dict):
        raise ValueError(f"{path}: expected a JSON object with 'sites', got {type(ledger).__name__}")
    ledger.setdefault("rounds_completed", 0)
    ledger.setdefault("sites", {})
    return ledger


def read_config(run_dir: str | os.PathLike) -> dict:
    """The consortium config from ``run_dir/config.yaml`` as a plain dict.

    The file's first YAML document is the consortium; the resolved site configs may follow as
    further documents, after a ``# sites, as resolved`` comment (the text from that comment on
    is ignored, so a site's ``name`` can never be taken for the consortium's). Returns ``{}``
    when the file is absent or unreadable (with a warning).
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    text = re.split(SITES_MARKER, text, maxsplit=1)[0]
    try:
        config = next(iter(yaml.safe_load_all(text)), None)
    except yaml.YAMLError as err:
        warnings.warn(f"{path}: not valid YAML, report built without it ({err})", stacklevel=2)
        return {}
    return config if isinstance(config, dict) else {}


def _parse_metrics_line(text: str, path: Path, number: int) -> dict | None:
    """One metrics line as a dict, or None (with a warning) when it is unreadable."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        warnings.warn(f"{path}:{number}: skipped an unreadable line (truncated write?): {err}", stacklevel=3)
        return None
    if not isinstance(record, dict) or "kind" not in record or "round" not in record:
        warnings.warn(f"{path}:{number}: skipped a line without 'kind' and 'round'", stacklevel=3)
        return None
    return record


def _dedup(records: Iterable[dict]) -> list[dict]:
    """Keep the last occurrence of each (kind, round, site, judge round), then sort stably by round."""
    latest: dict[tuple, dict] = {}
    for record in records:
        key = (record.get("kind"), record.get("round"), record.get("site"), record.get("judge_round"))
        latest.pop(key, None)  # re-insert so that order follows the last occurrence
        latest[key] = record
    return sorted(latest.values(), key=lambda r: _as_int(r.get("round")))


# ----------------------------------------------------------------------------- small helpers


def _as_int(value: Any, default: int = -1) -> int:
    """``int(value)`` or ``default`` for anything that is not a number."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _number(value: Any) -> float | None:
    """A float for int/float values (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value: Any, decimals: int = 3) -> str:
    """Numbers with ``decimals`` decimals (ints as ints), ``inf``/``nan`` spelled out, '-' for missing."""
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{decimals}f}"
    return str(value) if str(value) else _MISSING


def _get(record: dict | None, section: str, key: str) -> Any:
    """``record[section][key]`` or None when any level is missing or not a dict."""
    if not isinstance(record, dict):
        return None
    inner = record.get(section)
    return inner.get(key) if isinstance(inner, dict) else None


def _site_lines(lines: Iterable[dict]) -> list[dict]:
    """The ``kind == "site"`` lines that name a site."""
    return [r for r in lines if r.get("kind") == "site" and r.get("site") is not None]


def _global_lines(lines: Iterable[dict]) -> list[dict]:
    """The ``kind == "global"`` lines."""
    return [r for r in lines if r.get("kind") == "global"]


def _site_names(lines: list[dict], ledger: dict) -> list[str]:
    """Every site seen in the metrics or the ledger, sorted."""
    names = {str(r["site"]) for r in _site_lines(lines)}
    names.update(str(name) for name in ledger.get("sites", {}))
    return sorted(names)


def _by_site(lines: list[dict]) -> dict[str, list[dict]]:
    """Site lines grouped by site, each group ordered by round."""
    groups: dict[str, list[dict]] = {}
    for record in _site_lines(lines):
        groups.setdefault(str(record["site"]), []).append(record)
    for group in groups.values():
        group.sort(key=lambda r: _as_int(r.get("round")))
    return dict(sorted(groups.items()))


def _site_colors(lines: list[dict]) -> dict[str, str]:
    """One matplotlib colour per site (sorted names), the same in every plot of a report."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted({str(r["site"]) for r in _site_lines(lines)}))}


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def _site_styles(lines: list[dict]) -> dict[str, dict]:
    """Line-plot style per site: colour, hollow marker and line style all differ, markers shrink
    from site to site and lines are slightly transparent, so two sites with the same values (both
    at 1.0) stay visible one over the other; the data are drawn where they are, never offset."""
    styles = {}
    for i, (name, color) in enumerate(_site_colors(lines).items()):
        styles[name] = {"color": color, "marker": _MARKERS[i % len(_MARKERS)],
                        "linestyle": _LINESTYLES[i % len(_LINESTYLES)], "markerfacecolor": "none",
                        "markersize": max(11 - 1.5 * (i % 5), 4), "markeredgewidth": 1.5,
                        "linewidth": 1.6, "alpha": 0.85}
    return styles


def _preference_start(lines: list[dict]) -> int | None:
    """The first round whose phase is "preference", or None if there is none yet."""
    rounds = [_as_int(r.get("round")) for r in lines if r.get("phase") == "preference"]
    return min(rounds) if rounds else None


def _latest_global(lines: list[dict]) -> dict | None:
    """The global line of the highest round that has a mean Dice, or None."""
    scored = [r for r in _global_lines(lines) if _number(r.get("mean_dice")) is not None]
    return max(scored, key=lambda r: _as_int(r.get("round"))) if scored else None


def _text_table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    """Aligned plain-text table: columns in ``numeric`` right-aligned, the others left-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(row) for row in rows])


# ----------------------------------------------------------------------------- text tables


def round_table(lines: list[dict]) -> str:
    """fl-sim's live table for one round: one row per site, then a mean row from the global line.

    Columns: site, phase, status, dice, hd95, pair_acc (mined pairs), inf_acc (this round's
    informative-pair accuracy), bound (the ledger's pooled Wilson bound its state comes from),
    pairs, weight, state, outcome (calibration Dice of the site's update minus the received
    model's), then the round's headroom on calibration: identity (Dice of the model's own mask), best_k (of the best of its
    K plausible proposals) and pick (of the judge's top proposal). Numbers have 3 decimals,
    missing values are '-'. ``lines`` holds the site lines of one round and,
    optionally, its global line; duplicates are resolved as in ``read_metrics``.
    """
    lines = _dedup(lines)
    rounds = sorted({_as_int(r.get("round")) for r in lines})
    if len(rounds) > 1:
        raise ValueError(f"round_table: expected the lines of one round, got rounds {rounds}")
    header = ["site", "phase", "status", "dice", "hd95", "pair_acc", "inf_acc", "bound", "pairs", "weight", "state",
              "outcome", "identity", "best_k", "pick"]
    sites = sorted(_site_lines(lines), key=lambda r: str(r["site"]))
    rows = [_round_row(r) for r in sites]
    glob = next(iter(_global_lines(lines)), None)
    rows.append(_mean_row(glob, sites))
    title = _round_title(rounds[0] if rounds else None, glob)
    return title + "\n" + _text_table(header, rows, numeric={3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14})


HEADROOM = ("rel_dice_identity", "rel_dice_best", "rel_dice_pick")


def _round_row(record: dict) -> list[str]:
    """One site line as a row of ``round_table``; an ok site whose round was gated (anchor-only
    steps: its judge's calibration pick did not beat its own mask) shows status ``gated``, and
    one the server held to anchor-only steps because its judge was excluded
    (`aggregation.excluded_steps: anchor`; the line says `held`) ``anchor``."""
    status = record.get("status")
    if status == "ok" and _number(_get(record, "train", "gated")) == 1.0:
        status = "gated"
    elif status == "ok" and record.get("held") is True:
        status = "anchor"
    return [
        str(record["site"]),
        _fmt(record.get("phase")),
        _fmt(status),
        _fmt(_get(record, "eval", "dice")),
        _fmt(_get(record, "eval", "hd95")),
        _fmt(_get(record, "train", "rel_pair_accuracy")),
        _fmt(_number(_get(record, "train", "rel_informative_pair_accuracy"))),
        _fmt(_number(record.get("bound"))),
        _fmt(_as_count(_get(record, "train", "pairs_used"))),
        _fmt(record.get("weight")),
        _fmt(record.get("state")),
        _fmt(_number(_get(record, "train", "outcome_gain"))),
    ] + [_fmt(_number(_get(record, "train", key))) for key in HEADROOM]


def _mean_row(glob: dict | None, sites: list[dict]) -> list[str]:
    """The closing row of ``round_table``: global means, mean pair accuracy, total pairs."""
    accuracies = [a for a in (_number(_get(r, "train", "rel_pair_accuracy")) for r in sites) if a is not None]
    pairs = [p for p in (_number(_get(r, "train", "pairs_used")) for r in sites) if p is not None]
    glob = glob or {}
    if glob.get("sites_ok") is not None or glob.get("sites_failed") is not None:
        status = f"{_fmt(glob.get('sites_ok'))} ok/{_fmt(glob.get('sites_failed'))} failed"
        if glob.get("sites_revoked"):
            status += f"/{_fmt(glob['sites_revoked'])} revoked"
    else:
        status = _MISSING
    return [
        "mean",
        _fmt(glob.get("phase")),
        status,
        _fmt(_number(glob.get("mean_dice"))),
        _fmt(_number(glob.get("mean_hd95"))),
        _fmt(sum(accuracies) / len(accuracies) if accuracies else None),
        _fmt(_site_mean(sites, "rel_informative_pair_accuracy")),
        _MISSING,
        _fmt(int(sum(pairs)) if pairs else None),
        _MISSING,
        _MISSING,
        _fmt(_site_mean(sites, "outcome_gain")),
    ] + [_fmt(_site_mean(sites, key)) for key in HEADROOM]


def _site_mean(sites: list[dict], key: str) -> float | None:
    values = [v for v in (_number(_get(r, "train", key)) for r in sites) if v is not None]
    return sum(values) / len(values) if values else None


def _round_title(round_number: int | None, glob: dict | None) -> str:
    """``Round 4 (preference), 41.2 s, aggregated`` from the global line, as far as known."""
    glob = glob or {}
    parts = [f"Round {round_number if round_number is not None else '?'}"]
    if glob.get("phase"):
        parts[0] += f" ({glob['phase']})"
    if _number(glob.get("duration_s")) is not None:
        parts.append(f"{glob['duration_s']:.1f} s")
    if "aggregated" in glob:
        parts.append("aggregated" if glob["aggregated"] else "not aggregated")
    selection = selection_text(glob)
    if selection:
        parts.append(selection)
    judge = glob.get("quality_judge")
    if isinstance(judge, dict) and judge.get("trained", True):  # the consortium's judge was (re)trained
        parts.append(f"quality judge trained ({_fmt(judge.get('rounds'))} rounds, {_fmt(judge.get('sites'))} sites, "
                     f"loss {_fmt(_number(judge.get('loss')))})")
    elif isinstance(judge, dict):
        parts.append(f"quality judge NOT trained (too few sites trained it: {_fmt(judge.get('sites'))})")
    return ", ".join(parts)


def selection_text(glob: dict) -> str:
    """How a round's global line stands in model selection ('' before selection existed):
    ``calibration Dice 0.812 * best`` for a new best round, otherwise the calibration Dice and
    the best round so far, with ``ROLLED BACK`` when the next round starts from that best."""
    if "best_round" not in glob:
        return ""
    dice, best_round = _number(glob.get("calib_dice")), glob.get("best_round")
    text = f"calibration Dice {_fmt(dice)}"
    if best_round is None:
        return text + " (no best round yet)"
    if best_round == glob.get("round"):
        return text + " * best"
    best = f"round {best_round}, {_fmt(_number(glob.get('best_calib_dice')))}"
    if glob.get("rolled_back"):
        return text + f": ROLLED BACK, the next round starts from the best ({best})"
    return text + f" (best: {best})"


def best_round_line(lines: list[dict]) -> str:
    """``best round: 2 (calibration Dice 0.812, best.pt); rolled back: rounds 3, 5``
    from the latest global line that knows a best round ('' when none does)."""
    known = [r for r in _global_lines(lines) if r.get("best_round") is not None]
    if not known:
        return ""
    latest = max(known, key=lambda r: _as_int(r.get("round")))
    rolled = sorted(_as_int(r.get("round")) for r in _global_lines(lines) if r.get("rolled_back"))
    text = (f"best round: {latest['best_round']} (calibration Dice "
            f"{_fmt(_number(latest.get('best_calib_dice')))}, best.pt)")
    return text + (f"; rolled back: round{'s' if len(rolled) > 1 else ''} {', '.join(map(str, rolled))}"
                   if rolled else "; no round rolled back")


def status_table(run_dir: str | os.PathLike) -> str:
    """``fl-server status RUN_DIR``: the ledger per site, then rounds completed and latest mean Dice."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    lines = read_metrics(run_dir)
    ledger = read_ledger(run_dir)
    groups = _by_site(lines)
    header = ["site", "state", "inf_acc", "bound", "ema_acc", "ema_spearman", "ema_gain", "last_weight",
              "failures", "rejected", "last_round"]
    rows = [_status_row(name, ledger.get("sites", {}).get(name, {}), groups.get(name, []))
            for name in _site_names(lines, ledger)]
    table = _text_table(header, rows, numeric={2, 3, 4, 5, 6, 7, 8, 9, 10}) if rows else "(no sites yet)"
    latest = _latest_global(lines)
    mean = f"{_fmt(_number(latest['mean_dice']))} (round {latest['round']})" if latest else _MISSING
    best = best_round_line(lines)
    return (f"{table}\nrounds completed: {ledger.get('rounds_completed', 0)}   latest mean Dice: {mean}"
            + (f"\n{best}" if best else ""))


def _status_row(name: str, entry: dict, records: list[dict]) -> list[str]:
    """One row of ``status_table`` from the site's ledger entry and its metrics lines."""
    history = entry.get("history") or []
    seen = [_as_int(h.get("round")) for h in history if isinstance(h, dict)]
    seen += [_as_int(r.get("round")) for r in records]
    weights = [r.get("weight") for r in records if _number(r.get("weight")) is not None]
    state = entry.get("state") or next((r["state"] for r in reversed(records) if r.get("state")), None)
    if entry.get("revoked"):
        state = f"revoked (round {entry['revoked']})"
    return [
        name,
        _fmt(state),
        _fmt(_pooled(entry, bound=False)),
        _fmt(_pooled(entry, bound=True)),
        _fmt(_number(_get(entry, "ema", "pair_accuracy"))),
        _fmt(_number(_get(entry, "ema", "spearman"))),
        _fmt(_number(_get(entry, "ema", "pair_gain"))),
        _fmt(_number(weights[-1]) if weights else None),
        _fmt(entry.get("failures")),
        _fmt(entry.get("rejected")),
        _fmt(max(seen) if seen and max(seen) >= 0 else None),
    ]


def _pooled(entry: dict, bound: bool) -> float | None:
    """The ledger's pooled informative-pair accuracy, or its Wilson bound as the last history entry
    recorded it (None: no evidence, or a ledger written before the bound existed)."""
    if bound:
        history = [h for h in entry.get("history") or [] if isinstance(h, dict)]
        value = _number(history[-1].get("bound")) if history else None
        return None if value is None or math.isnan(value) else value
    pooled = entry.get("pooled") or {}
    pairs, correct = _number(pooled.get("pairs")), _number(pooled.get("correct"))
    return correct / pairs if pairs and correct is not None else None


# ----------------------------------------------------------------------------- plots


def _png_data_uri(data: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_png(fig: Figure) -> bytes:
    """Render a matplotlib figure on the Agg canvas and return PNG bytes."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _series(records: list[dict], rounds: list[int], value) -> list[float]:
    """``value(record)`` per round in ``rounds`` (NaN where the site has no value: a gap)."""
    by_round = {_as_int(r.get("round")): _number(value(r)) for r in records}
    return [by_round.get(k) if by_round.get(k) is not None else math.nan for k in rounds]


def _mark_preference(ax, start: int | None, last_round: int) -> None:
    """Shade the preference phase from its first round on, with a dashed line where it starts."""
    if start is None:
        return
    ax.axvspan(start - 0.5, last_round + 0.5, color="tab:orange", alpha=0.08, zorder=0,
               label="preference phase")
    ax.axvline(start - 0.5, color="tab:orange", linestyle="--", linewidth=1)


def plot_dice(lines: list[dict]) -> bytes | None:
    """Test Dice per site over rounds plus the global mean; None if no round has a Dice yet."""
    groups = _by_site(lines)
    rounds = sorted({_as_int(r.get("round")) for r in lines if _as_int(r.get("round")) >= 0})
    has_dice = any(_number(_get(r, "eval", "dice")) is not None for g in groups.values() for r in g)
    if not rounds or not has_dice:
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    styles = _site_styles(lines)
    mean = _series(_global_lines(lines), rounds, lambda r: r.get("mean_dice"))
    ax.plot(rounds, mean, color="black", linewidth=2.5, alpha=0.35, zorder=1, label="mean")  # under the sites
    for name, records in groups.items():
        ax.plot(rounds, _series(records, rounds, lambda r: _get(r, "eval", "dice")), zorder=2,
                label=name, **styles[name])
    _mark_preference(ax, _preference_start(lines), rounds[-1])
    ax.set(xlabel="round", ylabel="test Dice", title="Test Dice per site")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _figure_png(fig)


def plot_pair_accuracy(lines: list[dict], config: dict) -> bytes | None:
    """Judge pair accuracy per site over preference rounds, with chance and thresholds; None if none."""
    preference = [r for r in _site_lines(lines) if r.get("phase") == "preference"]
    groups = _by_site(preference)
    rounds = sorted({_as_int(r.get("round")) for r in preference})
    values = {n: _series(g, rounds, lambda r: _get(r, "train", "rel_pair_accuracy")) for n, g in groups.items()}
    if not rounds or all(math.isnan(v) for series in values.values() for v in series):
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    styles = _site_styles(lines)
    for name, series in values.items():
        ax.plot(rounds, series, label=name, **styles[name])
        excluded = [(k, v) for k, v, r in zip(rounds, series, _aligned(groups[name], rounds))
                    if r is not None and r.get("state") == "excluded" and not math.isnan(v)]
        if excluded:
            ax.scatter(*zip(*excluded), marker="x", s=80, color="black", zorder=3)
    ax.axhline(CHANCE, color="grey", linestyle=":", label="chance (0.5)")
    aggregation = config.get("aggregation") if isinstance(config.get("aggregation"), dict) else {}
    if _number(aggregation.get("exclude_below")) is not None:
        ax.axhline(aggregation["exclude_below"], color="tab:red", linestyle="--",
                   label=f"exclusion threshold ({aggregation['exclude_below']:g})")
    if _number(aggregation.get("probation_below")) is not None:
        ax.axhline(aggregation["probation_below"], color="tab:orange", linestyle="--",
                   label=f"probation threshold ({aggregation['probation_below']:g})")
    ax.set(xlabel="round", ylabel="pair accuracy", title="Judge pair accuracy on calibration pairs "
           "(x: site excluded)", ylim=(0, 1.06))  # room for markers at 1.0
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    return _figure_png(fig)


def plot_headroom(lines: list[dict]) -> bytes | None:
    """Per preference round, the calibration Dice of the model's own mask, of the best of its K
    proposals and of the judge's pick, averaged over the sites; None before a preference round."""
    preference = [r for r in _site_lines(lines) if r.get("phase") == "preference"]
    rounds = sorted({_as_int(r.get("round")) for r in preference})
    series = {}
    for key, label in zip(HEADROOM, ("identity (the model's own mask)", "best of K (a perfect judge)",
                                     "judge's pick")):
        per_round = [_site_mean([r for r in preference if _as_int(r.get("round")) == k], key) for k in rounds]
        series[label] = [math.nan if v is None else v for v in per_round]
    if not rounds or all(math.isnan(v) for values in series.values() for v in values):
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    for (label, values), style in zip(series.items(), ("o-", "s--", "^-")):
        ax.plot(rounds, values, style, label=label)
    ax.set(xlabel="round", ylabel="calibration Dice (mean over sites)",
           title="Headroom: what a round could gain, and what the judge picks")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    return _figure_png(fig)


def _aligned(records: list[dict], rounds: list[int]) -> list[dict | None]:
    """The record of each round in ``rounds`` (None where absent)."""
    by_round = {_as_int(r.get("round")): r for r in records}
    return [by_round.get(k) for k in rounds]


def plot_weights(lines: list[dict]) -> bytes | None:
    """Aggregation weight per site over rounds, as stacked bars; None if no round has weights."""
    weighted = [r for r in _site_lines(lines)
                if r.get("phase") != "initial" and _number(r.get("weight")) is not None]
    rounds = sorted({_as_int(r.get("round")) for r in weighted})
    if not rounds:
        return None
    fig = Figure(figsize=(8, 3.5))
    ax = fig.add_subplot()
    bottom = [0.0] * len(rounds)
    colors = _site_colors(lines)
    for name, records in _by_site(weighted).items():
        heights = [0.0 if math.isnan(v) else v for v in _series(records, rounds, lambda r: r.get("weight"))]
        ax.bar(rounds, heights, bottom=bottom, color=colors[name], label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    _mark_preference(ax, _preference_start(weighted), rounds[-1])
    ax.set(xlabel="round", ylabel="weight", title="Aggregation weight per site (stacked)")
    ax.set_xticks(rounds)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _figure_png(fig)


# ----------------------------------------------------------------------------- overlays


def find_overlays(run_dir: str | os.PathLike, limit: int = MAX_OVERLAYS) -> dict[str, list[tuple[int, Path]]]:
    """Up to ``limit`` overlay PNGs grouped by site: ``{site: [(round, path), ...]}``.

    The budget is shared evenly between sites; each site shows its latest rounds first.
    Files whose names do not follow ``<site>_round<NNN>_<i>.png`` are ignored.
    """
    folder = Path(run_dir) / OVERLAY_DIR
    if not folder.is_dir():
        return {}
    found: dict[str, list[tuple[int, int, Path]]] = {}
    for path in folder.glob("*.png"):
        match = _OVERLAY_NAME.match(path.name)
        if match:
            found.setdefault(match["site"], []).append((int(match["round"]), int(match["index"]), path))
    if not found:
        return {}
    per_site = max(1, limit // len(found))
    chosen = {}
    for site in sorted(found)[:limit]:
        latest = sorted(found[site], key=lambda t: (-t[0], t[1]))[:per_site]
        chosen[site] = [(round_number, path) for round_number, _, path in latest]
    return chosen


def _gallery_html(overlays: dict[str, list[tuple[int, Path]]]) -> str:
    """The overlay gallery section: a legend, then one row of figures per site."""
    if not overlays:
        return '<p class="note">No overlays in this run directory (only simulations write them).</p>'
    legend = ('<p>Legend:<span class="swatch" style="background:#1ae633"></span>chosen mask'
              '<span class="swatch" style="background:#f2261a"></span>rejected mask</p>')
    parts = [legend]
    for site, items in overlays.items():
        figures = []
        for round_number, path in items:
            try:
                data = path.read_bytes()
            except OSError as err:
                warnings.warn(f"{path}: overlay skipped ({err})", stacklevel=2)
                continue
            figures.append(f'<figure><img src="{_png_data_uri(data)}" alt="{html.escape(path.name)}" width="256">'
                           f"<figcaption>round {round_number}: {html.escape(path.name)}</figcaption></figure>")
        parts.append(f"<h3>{html.escape(site)}</h3><div class=\"gallery\">{''.join(figures)}</div>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- HTML


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    """An HTML table; cells are escaped, columns in ``numeric`` right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' if i in numeric else f"<td>{html.escape(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_rows(lines: list[dict], ledger: dict) -> list[list[str]]:
    """Per site: final Dice, best Dice and its round, final HD95, final state, EMA pair accuracy."""
    groups = _by_site(lines)
    rows = []
    for name in _site_names(lines, ledger):
        evaluated = [r for r in groups.get(name, []) if _number(_get(r, "eval", "dice")) is not None]
        final = evaluated[-1] if evaluated else None
        best = max(evaluated, key=lambda r: _get(r, "eval", "dice")) if evaluated else None
        entry = ledger.get("sites", {}).get(name, {})
        state = entry.get("state") or next((r["state"] for r in reversed(groups.get(name, [])) if r.get("state")), None)
        rows.append([
            name,
            _fmt(_get(final, "eval", "dice")),
            _fmt(final.get("round") if final else None),
            _fmt(_get(best, "eval", "dice")),
            _fmt(best.get("round") if best else None),
            _fmt(_number(_get(final, "eval", "hd95"))),
            _fmt(state),
            _fmt(_number(_get(entry, "ema", "pair_accuracy"))),
        ])
    return rows


def problem_rows(lines: list[dict], ledger: dict | None = None, config: dict | None = None) -> list[list[str]]:
    """Site lines whose status is not "ok": round, site, phase, status, reason (an exclusion
    always has one: see `_exclusion_reason`)."""
    rows = []
    for r in _site_lines(lines):
        if r.get("status") in (None, "ok"):
            continue
        reason = r.get("reason")
        if not reason and r.get("status") == "excluded":
            reason = _exclusion_reason(r, ledger or {}, config or {})
        rows.append([_fmt(r.get("round")), str(r["site"]), _fmt(r.get("phase")), _fmt(r.get("status")),
                     _fmt(reason)])
    return rows


def _exclusion_reason(record: dict, ledger: dict, config: dict) -> str:
    """Why the ledger excluded a site, for lines written before the server recorded it: the EMA
    of the judge's pair accuracy up to that round (from the ledger's history, the config's `ema`)
    against `exclude_below`, phrased as the server phrases it."""
    aggregation = config.get("aggregation") if isinstance(config.get("aggregation"), dict) else {}
    weight = _number(aggregation.get("ema"))
    weight = 0.5 if weight is None else weight
    site = ledger.get("sites", {}).get(str(record["site"]))
    history = site.get("history", []) if isinstance(site, dict) else []
    ema = None
    for entry in sorted((h for h in history if isinstance(h, dict)), key=lambda h: _as_int(h.get("round"))):
        value = _number(entry.get("pair_accuracy"))
        if _as_int(entry.get("round")) > _as_int(record.get("round")) or not _as_int(entry.get("n_pairs"), 0) \
                or value is None or math.isnan(value):
            continue
        ema = value if ema is None else weight * value + (1 - weight) * ema
    if ema is None:
        ema = _number(_get(record, "train", "rel_pair_accuracy"))
    threshold = _number(aggregation.get("exclude_below"))
    bound = f" < exclude_below {threshold:g}" if threshold is not None else ""
    if ema is None or (threshold is not None and ema >= threshold):  # an incomplete history: claim no figure
        return f"judge excluded by the ledger (state {_fmt(record.get('state'))}{bound.replace(' <', ':', 1)})"
    return f"judge excluded by the ledger: EMA pair accuracy {ema:.2f}{bound}"


def _plot_html(png: bytes | None, alt: str, missing: str) -> str:
    """An embedded plot, or a note saying why there is none."""
    if png is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    return f'<img class="plot" src="{_png_data_uri(png)}" alt="{html.escape(alt)}">'


def render_report(run_dir: str | os.PathLike) -> str:
    """The report page for ``run_dir`` as one self-contained HTML string."""
    run_dir = Path(run_dir)
    lines, ledger, config = read_metrics(run_dir), read_ledger(run_dir), read_config(run_dir)
    name = str(config.get("name") or run_dir.name)
    latest = _latest_global(lines)
    problems = problem_rows(lines, ledger, config)
    summary_header = ["site", "final Dice", "at round", "best Dice", "best round", "final HD95",
                      "state", "EMA pair acc."]
    sections = [
        f"<h1>{html.escape(name)}: federated RN-DPO run</h1>",
        f"<p>Run directory: <code>{html.escape(str(run_dir.resolve()))}</code><br>"
        f"Rounds completed: {html.escape(_fmt(ledger.get('rounds_completed', 0)))}; latest mean Dice: "
        f"{html.escape(_fmt(_number(latest['mean_dice'])) if latest else _MISSING)}</p>",
        "<h2>How to read this</h2>", f"<p>{html.escape(HOW_TO_READ)}</p>",
        "<h2>Model selection</h2>", _selection_html(lines),
        "<h2>Sites</h2>",
        _html_table(summary_header, summary_rows(lines, ledger), numeric={1, 2, 3, 4, 5, 7})
        if _site_names(lines, ledger) else '<p class="note">No site has reported yet.</p>',
        "<h2>Test Dice over rounds</h2>",
        _plot_html(plot_dice(lines), "test Dice per site over rounds", "No evaluated round yet."),
        "<h2>Judge reliability</h2>",
        _plot_html(plot_pair_accuracy(lines, config), "judge pair accuracy per site",
                   "No preference round yet: judge reliability is measured from the first preference round on."),
        "<h2>Headroom</h2>",
        _plot_html(plot_headroom(lines), "headroom over preference rounds",
                   "No preference round yet: headroom is measured on calibration from the first preference round on."),
        "<h2>Aggregation weights</h2>",
        _plot_html(plot_weights(lines), "aggregation weight per site", "No aggregated round yet."),
        "<h2>Example pairs (chosen vs rejected)</h2>",
        _gallery_html(find_overlays(run_dir)),
        "<h2>Failures, rejections and exclusions</h2>",
        _html_table(["round", "site", "phase", "status", "reason"], problems, numeric={0})
        if problems else '<p class="note">None: every site reported every round.</p>',
    ]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(name)}: report</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def selection_rows(lines: list[dict]) -> list[list[str]]:
    """One row per round that has a calibration Dice: round, phase, mean test Dice, consortium
    calibration Dice, and a mark: ``* best`` for the best round, ``rolled back`` for an undone one."""
    rows = []
    known = [r for r in _global_lines(lines) if "best_round" in r]
    best = max(known, key=lambda r: _as_int(r.get("round"))).get("best_round") if known else None
    for record in sorted(known, key=lambda r: _as_int(r.get("round"))):
        mark = "* best" if record.get("round") == best else ("rolled back" if record.get("rolled_back") else "")
        rows.append([_fmt(record.get("round")), _fmt(record.get("phase")), _fmt(_number(record.get("mean_dice"))),
                     _fmt(_number(record.get("calib_dice"))), mark])
    return rows


def _selection_html(lines: list[dict]) -> str:
    rows = selection_rows(lines)
    if not rows:
        return '<p class="note">No round has a consortium calibration Dice yet.</p>'
    return (f"<p>{html.escape(best_round_line(lines) or 'No best round yet.')}. The best round is chosen on the "
            "sites' calibration Dice (image-weighted), never on test Dice.</p>"
            + _html_table(["round", "phase", "mean test Dice", "calibration Dice", ""], rows, numeric={0, 2, 3}))


def build_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.html`` (atomically: a temporary file moved into place) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory does not exist")
    page = render_report(run_dir)
    target = run_dir / REPORT_FILE
    fd, tmp = tempfile.mkstemp(prefix=".report.", suffix=".html", dir=run_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the report is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _as_count(value):
    """Counts travel as floats in Flower's MetricRecord; show them as whole numbers (None: absent)."""
    number = _number(value)
    return None if number is None else int(number)
