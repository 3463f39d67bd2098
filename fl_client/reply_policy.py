"""The site's trust boundary: every reply that leaves is checked against an allowlist.

A reply may carry only the weights (ArrayRecord `arrays`, named as the server sent them), the
site's name (ConfigRecord `site`) and the scalar metrics named below. Anything else is kept
back: an unlisted metric is dropped (and noted in the site's own log) rather than failing the
round, because a new diagnostic figure is a code change to review, not a reason to lose a
site's update; a record the allowlist does not know fails the reply. A failure leaves as an
error category and a log id only; the message and traceback, which can name files (hospital
file names carry patient identifiers) and paths, stay in `<work_dir>/site.log`.

No figure computed from fewer than the site's `min_images` images leaves: a metric group whose
image count is below it is withheld and replaced by a `too_few_<split>` flag of 1 (the server's
round table and ledger already treat a missing figure as "no evidence"). Training on too few
images fails the reply with the category `too-few-images` (client_app checks that).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import secrets
import sys
import traceback
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fl_client.site_context import resolve_site
from shared.wire import PACKED_LAYOUT, pack_arrays, packed_layout, unpack_arrays

SITE_LOG = "site.log"
CATEGORIES = ("config", "data", "training", "evaluation", "out-of-memory", "too-few-images", "internal")

# What shared.training / shared.mining / shared.evaluation and client_app send today. Written
# out, not imported: a figure someone adds there stays at the site until it is listed here.
_CALIBRATION = ("pair_accuracy", "spearman", "pair_gain", "n_pairs", "n_images", "n_ranked_images",
                "dice_identity", "dice_best", "dice_pick", "dice_chosen", "chosen_over_identity",
                "implausible_fraction", "informative_pairs", "informative_pair_accuracy", "informative_units",
                "informative_wilson")
_MINING = ("images", "proposals_per_image", "pairs", "pairs_per_image", "images_with_pairs", "score_gap_mean",
           "disagreement_q10", "disagreement_q50", "disagreement_q90", "implausible_fraction",
           "seconds_proposals", "seconds_judge", "seconds_mining",
           "pair_accuracy", "spearman", "pair_gain", "n_pairs", "n_ranked_images",
           "dice_identity", "dice_best", "dice_pick", "dice_chosen", "chosen_over_identity",
           "informative_pairs", "informative_pair_accuracy", "informative_units", "informative_wilson")
_STEPS = ("loss", "pref_loss", "sup_loss", "margin", "reward_acc", "steps")
_TEST = ("dice", "hd95", "hd95_undefined", "n_images")
# the evaluate reply's calibration Dice of the global model (the server's model selection)
_CALIB = ("calib_dice", "calib_images")
# a preference round's outcome check: calibration Dice of the received model and of the update
_OUTCOME = ("outcome_dice_before", "outcome_dice_after", "outcome_gain", "outcome_images")

# a judge round's (shared.judge_training): the consortium judge's mean loss on the labelled split
_JUDGE = ("judge_loss", "judge_steps")

# split -> (the metric holding its image count, the metrics computed from it)
GROUPS = {
    "test": ("n_images", _TEST),
    # `gated` is the calibration pick's gain over identity against a margin: a calibration figure too
    "calibration": ("rel_n_images", tuple(f"rel_{k}" for k in _CALIBRATION) + ("gated",)),
    "unlabeled": ("mining_images", tuple(f"mining_{k}" for k in _MINING) + ("pref_loss", "margin", "reward_acc")),
    "calib": ("calib_images", _CALIB),  # the calibration split again, on an evaluate reply
    "outcome": ("outcome_images", _OUTCOME),  # and on a preference round's reply
}

ALLOWED_METRICS = frozenset(
    ("num-examples", "skipped_files", "gated", "pairs_used", "channels", "compute_s", "rss_mb")
    + _STEPS + _TEST + _CALIB + _OUTCOME + _JUDGE
    + GROUPS["calibration"][1] + GROUPS["unlabeled"][1]
    + tuple(f"too_few_{split}" for split in GROUPS)
)


class SiteFailure(RuntimeError):
    """A handler's failure as it may leave the site: `site 'NAME': category` (Flower's own
    error text, should this mod be missing, then names the site and nothing else). `detail`
    and the chained cause are for the site's own log only."""

    def __init__(self, category: str, detail: str = "", site: str | None = None) -> None:
        assert category in CATEGORIES, category
        super().__init__(f"site '{site}': {category}" if site else category)
        self.category = category
        self.detail = detail


@contextmanager
def failing_as(category: str):
    """Any exception in the block becomes a SiteFailure of `category` (out of memory is told
    apart wherever it happens); the original stays chained for the local log."""
    try:
        yield
    except SiteFailure:
        raise
    except Exception as exc:
        raise SiteFailure(category_of(exc, category)) from exc


def category_of(exc: BaseException, default: str) -> str:
    if isinstance(exc, SiteFailure):
        return exc.category
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out-of-memory"
    return default


def withhold_small(metrics: Mapping[str, float], min_images: int) -> tuple[dict, list[str]]:
    """The metrics without any group computed from fewer than `min_images` images (a
    `too_few_<split>` flag in its place); the names withheld. A withheld test group also zeroes
    `num-examples` (on an evaluate reply it is the test image count)."""
    out = dict(metrics)
    withheld = []
    for split, (count_key, members) in GROUPS.items():
        if count_key in out and out[count_key] < min_images:
            withheld += [k for k in members if k in out]
            out = {k: v for k, v in out.items() if k not in members}
            out[f"too_few_{split}"] = 1.0
            if split == "test" and "num-examples" in out:
                out["num-examples"] = 0.0
    return out, withheld


def allowed_metrics(metrics: Mapping) -> tuple[dict, list[str]]:
    """The listed scalar metrics; the names dropped (unlisted, or not a finite-or-NaN number)."""
    kept, dropped = {}, []
    for key, value in metrics.items():
        scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in ALLOWED_METRICS and scalar and not math.isinf(value):
            kept[key] = value
        else:
            dropped.append(key)
    return kept, dropped


def reply_policy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: run the handler; let out only what the allowlist allows (module docstring)."""
    site = None
    try:
        with failing_as("config"):
            site = resolve_site(context)
        received = _array_keys(msg.content) if msg.has_content() else set()
        reply = call_next(msg, context)
        if reply.has_error():  # Flower's or a mod's own error text: not ours to forward
            raise SiteFailure("internal", f"an inner mod replied with an error: {reply.error.reason}")
        return _checked(reply, site, received)
    except Exception as exc:  # noqa: BLE001 - every failure leaves as a category and an id
        return _failure_reply(msg, site, exc)


def _checked(reply: Message, site, received: set[str]) -> Message:
    content = reply.content
    unknown = [name for name in content.keys() if name not in ("arrays", "site", "metrics", PACKED_LAYOUT)]
    if unknown:
        raise SiteFailure("internal", f"reply records not on the allowlist: {unknown}")
    if not isinstance(content.get("site"), ConfigRecord) or dict(content["site"]) != {"name": site.name}:
        raise SiteFailure("internal", f"the reply's site record is not exactly the site's name: {dict(content.get('site', {}))}")
    if not isinstance(content.get("metrics"), MetricRecord):
        raise SiteFailure("internal", "the reply has no metrics record")
    if "arrays" in content or PACKED_LAYOUT in content:
        _check_arrays(content, received)
    metrics, dropped = allowed_metrics(content["metrics"])
    metrics, withheld = withhold_small(metrics, site.min_images)
    if dropped or withheld:
        _log(site, {"dropped_unlisted": dropped, "withheld_too_few_images": withheld,
                    "min_images": site.min_images})
    content["metrics"] = MetricRecord(metrics)
    return reply


def _check_arrays(content: RecordDict, received: set[str]) -> None:
    """`arrays` holds only weights the server sent (by name); a packed reply's layout is
    exactly what our own packing of those arrays writes (shared.wire)."""
    view = unpack_arrays(content)  # raises when the buffer does not match its layout
    if not isinstance(view.get("arrays"), ArrayRecord):
        raise SiteFailure("internal", "the reply's weights are not an ArrayRecord named 'arrays'")
    extra = set(view["arrays"].keys()) - received
    if extra:
        raise SiteFailure("internal", f"the reply's weights name arrays the server did not send: {sorted(extra)[:5]}")
    if PACKED_LAYOUT in content:
        expected = pack_arrays(RecordDict({"arrays": view["arrays"]}))[PACKED_LAYOUT]
        if dict(content[PACKED_LAYOUT]) != dict(expected):
            raise SiteFailure("internal", "the reply's packed layout is not the layout of its weights")


def _array_keys(content: RecordDict) -> set[str]:
    layout = packed_layout(content)
    if layout is not None:
        return {entry[0] for entry in layout.get("arrays", [])}
    return set(content["arrays"].keys()) if "arrays" in content.array_records else set()


def _failure_reply(msg: Message, site, exc: BaseException) -> Message:
    """An error reply naming the site, a category and a log id; the rest goes to the site log."""
    category = category_of(exc, "internal")
    log_id = secrets.token_hex(4)
    where = _log(site, {"log_id": log_id, "category": category,
                        "message_type": msg.metadata.message_type,
                        "detail": getattr(exc, "detail", ""),
                        "traceback": "".join(traceback.format_exception(exc))})
    print(f"reply_policy: site failure {log_id} ({category}), full text in {where}", file=sys.stderr, flush=True)
    name = site.name if site is not None else "unknown"
    reason = f"site '{name}': {category} (see site log, id {log_id})"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _log(site, entry: dict) -> str:
    """Append to `<work_dir>/site.log` (stderr, which stays on this machine, when the site
    is unknown or its work_dir unwritable); returns where it went."""
    entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
    line = json.dumps(entry)
    if site is not None:
        try:
            Path(site.work_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(site.work_dir) / SITE_LOG, "a") as log:
                log.write(line + "\n")
            return str(Path(site.work_dir) / SITE_LOG)
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)
    return "this process's stderr"
