"""The Flower ClientApp a site runs: straight-line handlers around shared.site.

Settings arrive in three channels (STYLE.md): the site YAML path in `context.node_config`
(`site-config`; in simulation `partition-id` picks one of the sites fl-sim put in the
environment, see fl_client.site_context), and the per-round settings in the ConfigRecord the
server sends; which site this is and where it may write never come from the server. Every
reply passes fl_client.reply_policy's allowlist (weights, site name, listed scalar metrics; a
failure as a category and a log id). In deployment every reply is also summarised in the
site's own `<work_dir>/sent.log` (fl_client.supernode.sent_log_mod, outside the policy so it
records what left), and its weights travel packed in one buffer when the server packed its
own (packed_arrays_mod).
"""

from __future__ import annotations

import functools
import json
import resource
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.reply_policy import SiteFailure, category_of, failing_as, reply_policy_mod
from fl_client.site_context import overlay_dir, resolve_site
from fl_client.supernode import packed_arrays_mod, sent_log_mod
from shared.config import MiningConfig, ModelConfig, PreferenceConfig, QualityJudgeConfig, SupervisedConfig, from_dict
from shared.data import load_site_data
from shared.site import evaluate_round, save_overlays, train_judge_round, train_round

# sent_log_mod outermost: it only records, and must record the reply the policy let out
app = ClientApp(mods=[sent_log_mod, reply_policy_mod, packed_arrays_mod])


def _named_failures(handler):
    """Resolve the site (site-side channels only), run the handler, add operational figures;
    a failure leaves as a SiteFailure category (reply_policy_mod logs the rest locally)."""
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        with failing_as("config"):
            site = resolve_site(context)
        try:
            reply = handler(msg, site, context)
        except Exception as exc:  # named, so that the server can tell which site failed
            raise SiteFailure(category_of(exc, "internal"), getattr(exc, "detail", ""), site.name) from exc
        # operational figures (this process, not any image): local compute time and memory
        metrics = reply.content["metrics"]
        metrics["compute_s"] = time.perf_counter() - started
        metrics["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return reply

    return run


@app.train()
@_named_failures
def train(msg: Message, site, context: Context) -> Message:
    config = msg.content["config"]
    with failing_as("config"):
        phase = str(config["phase"])
        settings = [_settings(config, key, cls) for key, cls in
                    (("model", ModelConfig), ("supervised", SupervisedConfig), ("preference", PreferenceConfig))]
        calibration = _calibration(config)
    if phase == "judge":
        return _train_judge(msg, site, settings, config)
    if phase == "preference" and site.judge.kind == "federated" and "judge" not in msg.content.array_records:
        raise SiteFailure("config", f"{site.source_file}: judge.kind: 'federated' scores with the consortium's "
                                    "quality judge, but the server sent none (its consortium YAML has no quality_judge:)")
    with failing_as("data"):
        splits = load_site_data(site)
    small = [f"{name} {count}" for name, count in trained_on(phase, settings[2], splits).items() if count < site.min_images]
    if small:  # the weights (and the losses) are aggregates of every split they trained on
        raise SiteFailure("too-few-images", f"{phase} round trains on {', '.join(small)} images; "
                                            f"min_images is {site.min_images}")
    with failing_as("training"):
        weights, result = train_round(
            site, settings[0], phase, msg.content["arrays"].to_torch_state_dict(), settings[1], settings[2],
            seed=int(config["seed"]), splits=splits,
            reference_state=_arrays(msg, "reference"), judge_state=_arrays(msg, "judge"), **calibration,
        )
    overlays = overlay_dir(context)  # simulation only, inside fl-sim's run dir; None in deployment
    if overlays is not None and result.pairs is not None:
        save_overlays(result.pairs, splits["calibration"].images, overlays, site.name, int(config["server-round"]))
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["num-examples"] = float(result.num_examples)
    return _reply(msg, site.name, metrics, ArrayRecord(weights))


def _train_judge(msg: Message, site, settings, config: ConfigRecord) -> Message:
    """A round of the consortium's quality judge (shared.judge_training): its weights in and
    out, trained on the labelled split only."""
    with failing_as("config"):
        quality = _settings(config, "quality_judge", QualityJudgeConfig)
    with failing_as("data"):
        splits = load_site_data(site, splits=("labeled",))
    if len(splits["labeled"]) < site.min_images:
        raise SiteFailure("too-few-images", f"judge round trains on labeled {len(splits['labeled'])} images; "
                                            f"min_images is {site.min_images}")
    with failing_as("training"):
        weights, result = train_judge_round(site, settings[0], settings[1], settings[2], quality,
                                            msg.content["arrays"].to_torch_state_dict(), seed=int(config["seed"]),
                                            splits=splits)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["num-examples"] = float(result.num_examples)
    return _reply(msg, site.name, metrics, ArrayRecord(weights))


def _arrays(msg: Message, name: str):
    """The state dict the server sent as ArrayRecord `name`, or None."""
    return msg.content[name].to_torch_state_dict() if name in msg.content.array_records else None


def trained_on(phase: str, preference: PreferenceConfig, splits) -> dict[str, int]:
    """The splits a round's weights are computed from, and their sizes: the labelled split in a
    supervised round; in a preference round the labelled split when its anchor steps run (an
    anchor, the `method: none` control, or a site its gate holds back) and the unlabelled pool
    when preference pairs (or its true masks, for the all_labelled control) are used."""
    if phase != "preference":
        return {"labeled": len(splits["labeled"])}
    used = {}
    if preference.lambda_sup > 0:
        used["labeled"] = len(splits["labeled"])
    if preference.method != "none" or preference.supervise_unlabeled:
        used["unlabeled"] = len(splits["unlabeled"])
    return used


@app.evaluate()
@_named_failures
def evaluate(msg: Message, site, context: Context) -> Message:
    config = msg.content["config"]
    with failing_as("config"):
        model_cfg = _settings(config, "model", ModelConfig)
    with failing_as("data"):
        splits = load_site_data(site, splits=("test", "calibration"))
    # a test or calibration split under min_images: reply_policy withholds its scores
    with failing_as("evaluation"):
        scores = evaluate_round(site, model_cfg, msg.content["arrays"].to_torch_state_dict(), splits=splits)
    metrics = {k: float(v) for k, v in scores.items()}
    metrics["num-examples"] = float(scores["n_images"])
    return _reply(msg, site.name, metrics)


@app.query()
@_named_failures
def identify(msg: Message, site, context: Context) -> Message:
    """Tell the server which site this node is, so it can send the site its own settings."""
    return _reply(msg, site.name, {"channels": float(site.channels)})


def _calibration(config: ConfigRecord) -> dict:
    """How the server asks the judge to be measured (train_round's keywords); {} from an older server."""
    if "calibration" not in config:
        return {}
    raw = json.loads(str(config["calibration"]))
    mining = raw.get("mining")
    return {"informative_gap": float(raw["informative_gap"]),
            "calibration_mining": from_dict(MiningConfig, mining, origin="server config 'calibration'") if mining else None}


def _settings(config: ConfigRecord, key: str, cls):
    return from_dict(cls, json.loads(str(config[key])), origin=f"server config '{key}'")


def _reply(msg: Message, site_name: str, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site_name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)
