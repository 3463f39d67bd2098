"""The Flower ClientApp a site runs: straight-line handlers around shared.site.

Settings arrive in three channels (STYLE.md): the site YAML path in `context.node_config`
(`site-config`; in simulation `partition-id` picks one of the consortium's sites), and the
per-round settings in the ConfigRecord the server sends. The reply carries the weights, numbers
and the site's name: never an image, a mask or a per-image score. In deployment every reply is
also summarised in the site's own `<work_dir>/sent.log` (fl_client.supernode.sent_log_mod), and
its weights travel packed in one buffer when the server packed its own (packed_arrays_mod).
"""

from __future__ import annotations

import functools
import json
import resource
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.supernode import packed_arrays_mod, sent_log_mod
from shared.config import ModelConfig, PreferenceConfig, SupervisedConfig, from_dict, load_site
from shared.site import evaluate_round, save_overlays, train_round

app = ClientApp(mods=[sent_log_mod, packed_arrays_mod])


class SiteFailure(RuntimeError):
    """A handler's failure, phrased `site 'NAME': Error: message` so that the server can record
    which site failed and why in one line (Flower forwards only the error text)."""


def _named_failures(handler):
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        name = "unknown"
        try:
            started = time.perf_counter()
            site = _site(msg.content["config"], context)
            name = site.name
            reply = handler(msg, site)
            # operational figures (this process, not any image): local compute time and memory
            metrics = reply.content["metrics"]
            metrics["compute_s"] = time.perf_counter() - started
            metrics["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return reply
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise SiteFailure(f"site '{name}': {type(exc).__name__}: {first_line}") from exc

    return run


@app.train()
@_named_failures
def train(msg: Message, site) -> Message:
    config = msg.content["config"]
    weights, result = train_round(
        site,
        _settings(config, "model", ModelConfig),
        str(config["phase"]),
        msg.content["arrays"].to_torch_state_dict(),
        _settings(config, "supervised", SupervisedConfig),
        _settings(config, "preference", PreferenceConfig),
        seed=int(config["seed"]),
        reference_state=msg.content["reference"].to_torch_state_dict() if "reference" in msg.content.array_records else None,
    )
    if "sim-run-dir" in config and result.pairs is not None:  # simulation only: overlays stay local
        from shared.data import load_site_data

        calibration = load_site_data(site, splits=("calibration",))["calibration"]
        save_overlays(result.pairs, calibration.images, Path(str(config["sim-run-dir"])) / "overlays",
                      site.name, int(config["server-round"]))
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics["num-examples"] = float(result.num_examples)
    return _reply(msg, site.name, metrics, ArrayRecord(weights))


@app.evaluate()
@_named_failures
def evaluate(msg: Message, site) -> Message:
    config = msg.content["config"]
    scores = evaluate_round(site, _settings(config, "model", ModelConfig), msg.content["arrays"].to_torch_state_dict())
    metrics = {k: float(v) for k, v in scores.items()}
    metrics["num-examples"] = float(scores["n_images"])
    return _reply(msg, site.name, metrics)


@app.query()
@_named_failures
def identify(msg: Message, site) -> Message:
    """Tell the server which site this node is, so it can send the site its own settings."""
    return _reply(msg, site.name, {"channels": float(site.channels)})


def _site(config: ConfigRecord, context: Context):
    if "site-config" in context.node_config:
        return load_site(str(context.node_config["site-config"]))
    sites = list(config["sim-sites"])  # simulation: the consortium's site list, by partition
    return load_site(sites[int(context.node_config["partition-id"])])


def _settings(config: ConfigRecord, key: str, cls):
    return from_dict(cls, json.loads(str(config[key])), origin=f"server config '{key}'")


def _reply(msg: Message, site_name: str, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site_name})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)
