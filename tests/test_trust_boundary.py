"""The site's trust boundary, through our real ClientApp (Flower's ClientApp with its mods).

Each test calls `fl_client.client_app.app` with real Flower Messages and a Context shaped like
a deployed SuperNode's (`site-config` in the node config) or a simulated node's
(`partition-id`, fl-sim's environment). Tiny 32 px sites, a few steps: nothing depends on speed.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
from pathlib import Path

os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))
os.environ.update(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
                  FLWR_DISABLE_UPDATE_CHECK="1")

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from PIL import Image

from fl_client import client_app, reply_policy, site_context
from fl_client.supernode import SENT_LOG
from shared.config import ConfigError, ModelConfig, PreferenceConfig, SupervisedConfig, from_dict, load_site, to_dict
from shared.site import model_from_config

PATIENT = "Doe_Jane_MRN0012345"
MODEL = from_dict(ModelConfig, {"name": "unet", "channels": [8, 16], "strides": [2], "num_res_units": 1})
SUPERVISED = from_dict(SupervisedConfig, {"rounds": 1, "steps": 2, "batch_size": 4})
PREFERENCE = from_dict(PreferenceConfig, {"rounds": 1, "steps": 2, "batch_pairs": 4, "proposals": {
    "tta": ["identity", "hflip"], "mc_samples": 2, "thresholds": [0.3, 0.5, 0.7]}})
SPLITS = ("labeled", "calibration", "unlabeled", "test")


def _pair(folder: Path, stem: str, rng, mask_size: int = 40) -> None:
    """A 40 px gray image with a bright disk, and the disk's mask (another size: a broken pair)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:40, :40]
    cy, cx, r = rng.integers(12, 28), rng.integers(12, 28), rng.integers(5, 10)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
    image = np.clip(rng.normal(60, 15, (40, 40)) + 120 * disk, 0, 255).astype("uint8")
    Image.fromarray(image).save(folder / "images" / f"{stem}.png")
    mask = Image.fromarray((disk * 255).astype("uint8")).resize((mask_size, mask_size), Image.NEAREST)
    mask.save(folder / "masks" / f"{stem}.png")


def write_site(root: Path, name: str, per_split: int | dict = 6, min_images: int | None = None,
               broken_patient_file: bool = True, groups_pattern: str | None = None) -> Path:
    """A site YAML with four split folders of `per_split` pairs each (or per split, from a dict); the labelled split also holds
    a pair named like a patient identifier whose mask does not match its image. With
    `groups_pattern`, the site instead cuts one source folder by a pattern that does not match
    that file's name: loading the data fails with an error naming the file."""
    rng = np.random.default_rng(len(name))
    data = root / f"{name}-data"
    for split in SPLITS:
        for i in range(per_split[split] if isinstance(per_split, dict) else per_split):
            _pair(data / split, f"P{i:03d}_{split}", rng)
    if broken_patient_file:
        _pair(data / "labeled", PATIENT, rng, mask_size=24)
    if groups_pattern:
        data_yaml = (f"{{source: {{images: {data / 'labeled' / 'images'}, masks: {data / 'labeled' / 'masks'}}}, "
                     f"split: {{labeled: 0.25, calibration: 0.25, unlabeled: 0.25, test: 0.25}}, "
                     f"groups: {{pattern: '{groups_pattern}'}}}}")
    else:
        data_yaml = "{" + ", ".join(f"{s}: {{images: {data / s / 'images'}, masks: {data / s / 'masks'}}}"
                                    for s in SPLITS) + "}"
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        work_dir: {root / 'work' / name}
        image_size: 32
        device: cpu
        judge: {{kind: oracle}}
        """) + f"data: {data_yaml}\n" + (f"min_images: {min_images}\n" if min_images else ""))
    return path


def deployed(site_yaml: Path) -> Context:
    """The Context a deployed SuperNode gives the ClientApp (fl-client start's node config)."""
    return Context(run_id=1, node_id=7, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})


def simulated(partition: int) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 1},
                   state=RecordDict(), run_config={})


_ids = iter(range(1, 10_000))


def message(kind: str, phase: str = "supervised", server_round: int = 1, **extra) -> Message:
    """What the ServerApp sends (fl_server.federation's round_config), as Flower delivers it."""
    config = ConfigRecord({"phase": phase, "server-round": server_round, "seed": 3,
                           "model": json.dumps(to_dict(MODEL)), "supervised": json.dumps(to_dict(SUPERVISED)),
                           "preference": json.dumps(to_dict(PREFERENCE)), **extra})
    content = RecordDict({"config": config})
    if kind != MessageType.QUERY:
        content["arrays"] = ArrayRecord(model_from_config(MODEL).state_dict())
    metadata = Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


def send(msg: Message, context: Context) -> Message:
    return client_app.app(msg, context)


def reply_text(reply: Message) -> str:
    """Everything a reply carries that could hold text: every record, key and value (arrays by
    name, dtype, shape and raw bytes), or the error code and reason."""
    if reply.has_error():
        return f"{reply.error.code} {reply.error.reason}"
    parts = []
    for name, record in reply.content.items():
        for key, value in record.items():
            if hasattr(value, "data"):
                value = f"{value.dtype} {value.shape} {value.data.decode('latin-1')}"
            parts.append(f"{name}.{key}={value}")
    return "\n".join(parts)


def assert_nothing_identifying(reply: Message, *paths: Path) -> None:
    text = reply_text(reply)
    assert PATIENT not in text and "MRN" not in text
    for path in paths:
        assert str(path) not in text


def site_log(site_yaml: Path) -> str:
    return (load_site(site_yaml).work_dir / reply_policy.SITE_LOG).read_text()


# ----------------------------------------------------------------------------- allowlist


def test_replies_of_a_site_with_a_patient_named_file_carry_no_name_or_path(tmp_path):
    site = write_site(tmp_path, "general", per_split=6)
    context = deployed(site)
    replies = {
        "query": send(message(MessageType.QUERY), context),
        "supervised": send(message(MessageType.TRAIN), context),
        "preference": send(message(MessageType.TRAIN, phase="preference", server_round=2), context),
        "evaluate": send(message(MessageType.EVALUATE), context),
    }
    for kind, reply in replies.items():
        assert not reply.has_error(), (kind, reply.error.reason if reply.has_error() else "")
        assert_nothing_identifying(reply, tmp_path)
        assert set(reply.content.keys()) <= {"arrays", "site", "metrics"}
        assert dict(reply.content["site"]) == {"name": "general"}
        assert set(reply.content["metrics"].keys()) <= reply_policy.ALLOWED_METRICS
    supervised = replies["supervised"].content["metrics"]
    assert supervised["skipped_files"] == 1.0  # the broken pair was skipped: counted, never named
    assert supervised["num-examples"] == 6.0
    preference = replies["preference"].content["metrics"]
    assert preference["rel_n_images"] == 6.0 and "rel_pair_accuracy" in preference
    assert replies["evaluate"].content["metrics"]["n_images"] == 6.0 and "dice" in replies["evaluate"].content["metrics"]
    # sent.log (deployment) records what left: the same keys, nothing more
    sent = [json.loads(line) for line in (load_site(site).work_dir / SENT_LOG).read_text().splitlines()]
    assert len(sent) == 4 and PATIENT not in json.dumps(sent)
    assert set(sent[1]["records"]["metrics"]["items"]) == set(supervised.keys())


def test_a_failure_leaves_as_a_category_and_a_log_id_and_the_site_log_keeps_the_text(tmp_path):
    site = write_site(tmp_path, "general", groups_pattern=r"^(P\d+)_")  # cannot group the patient file
    with pytest.raises(ConfigError, match=PATIENT):  # what the site's own check would say
        from shared.data import load_site_data

        load_site_data(load_site(site))
    reply = send(message(MessageType.TRAIN), deployed(site))
    assert reply.has_error()
    assert_nothing_identifying(reply, tmp_path)
    reason = reply.error.reason
    prefix = "site 'general': data (see site log, id "
    assert reason.startswith(prefix) and reason.endswith(")"), reason
    log_id = reason[len(prefix):-1]
    assert len(log_id) == 8 and int(log_id, 16) >= 0
    entry = [json.loads(line) for line in site_log(site).splitlines() if log_id in line]
    assert len(entry) == 1 and entry[0]["category"] == "data"
    assert PATIENT in entry[0]["traceback"]  # the full message stays at the site
    sent = (load_site(site).work_dir / SENT_LOG).read_text()
    assert log_id in sent and PATIENT not in sent

    from fl_server.federation import _failure  # the server still names the failed site
    assert _failure(reason) == ("general", f"data (see site log, id {log_id})")


def test_an_unknown_site_fails_as_config_without_its_path(tmp_path):
    context = deployed(tmp_path / "secret-ward" / f"{PATIENT}.yaml")
    reply = send(message(MessageType.QUERY), context)
    assert reply.has_error() and reply.error.reason.startswith("site 'unknown': config (see site log, id ")
    assert_nothing_identifying(reply, tmp_path)


def test_an_unlisted_or_non_scalar_metric_is_dropped_and_noted_locally(tmp_path, monkeypatch):
    site = write_site(tmp_path, "general")

    def chatty_evaluate(*args, **kwargs):
        return {"dice": 0.5, "hd95": 2.0, "hd95_undefined": 0, "n_images": 6, "worst_image_dice": 0.01}

    monkeypatch.setattr(client_app, "evaluate_round", chatty_evaluate)
    reply = send(message(MessageType.EVALUATE), deployed(site))
    metrics = dict(reply.content["metrics"])
    assert "worst_image_dice" not in metrics and metrics["dice"] == 0.5
    assert "worst_image_dice" in site_log(site)

    kept, dropped = reply_policy.allowed_metrics({"dice": 0.4, "loss": [0.1, 0.2], "n_images": True, "x": 1.0})
    assert kept == {"dice": 0.4} and set(dropped) == {"loss", "n_images", "x"}


def test_a_reply_with_an_unknown_record_or_foreign_arrays_is_refused(tmp_path):
    site = write_site(tmp_path, "general")
    load = load_site(site)

    def handler_with(content):
        return lambda msg, context: Message(content=content, reply_to=msg)

    msg = message(MessageType.TRAIN)
    base = {"site": ConfigRecord({"name": "general"}), "metrics": MetricRecord({"num-examples": 6.0})}
    for extra in ({"config": ConfigRecord({"files": f"{PATIENT}.png"})},
                  {"arrays": ArrayRecord({PATIENT: torch.zeros(3)})},
                  {"site": ConfigRecord({"name": "general", "file": PATIENT})}):
        reply = reply_policy.reply_policy_mod(msg, deployed(site), handler_with(RecordDict({**base, **extra})))
        assert reply.has_error() and reply.error.reason.startswith("site 'general': internal"), extra
        assert_nothing_identifying(reply, tmp_path)
    assert load.work_dir.joinpath(reply_policy.SITE_LOG).is_file()


# ----------------------------------------------------------------------------- min images


def test_figures_from_fewer_than_min_images_are_withheld(tmp_path):
    site = write_site(tmp_path, "small", per_split=6, min_images=7, broken_patient_file=False)
    context = deployed(site)
    evaluation = send(message(MessageType.EVALUATE), context).content["metrics"]
    assert evaluation["too_few_test"] == 1.0 and evaluation["num-examples"] == 0.0
    assert not {"dice", "hd95", "hd95_undefined", "n_images"} & set(evaluation.keys())

    supervised = send(message(MessageType.TRAIN), context)  # 6 labelled images < 7: no weights
    assert supervised.has_error() and "too-few-images (see site log, id " in supervised.error.reason

    # a preference round trains its anchor on the 6 labelled images too: no weights either
    preference = send(message(MessageType.TRAIN, phase="preference", server_round=2), context)
    assert preference.has_error() and "too-few-images (see site log, id " in preference.error.reason
    assert "labeled 6" in site_log(site)  # the detail stays local


def test_a_preference_round_withholds_its_small_calibration_figures(tmp_path):
    """Enough labelled and unlabelled images to train on, a calibration split under min_images:
    the update leaves, the calibration figures (and the gate decided from them) do not."""
    site = write_site(tmp_path, "calsmall", per_split={"labeled": 7, "calibration": 4, "unlabeled": 7, "test": 7},
                      min_images=6, broken_patient_file=False)
    preference = send(message(MessageType.TRAIN, phase="preference", server_round=2), deployed(site))
    assert not preference.has_error()
    metrics = preference.content["metrics"]
    assert metrics["too_few_calibration"] == 1.0
    assert not [k for k in metrics.keys() if k.startswith("rel_")] and "gated" not in metrics
    assert "rel_n_images" in site_log(site)  # noted locally as withheld


def test_withhold_small_groups_by_their_own_count():
    metrics = {"rel_n_images": 4.0, "rel_pair_accuracy": 0.9, "mining_images": 20.0, "mining_pairs": 9.0,
               "num-examples": 9.0, "gated": 0.0}
    out, withheld = reply_policy.withhold_small(metrics, 5)
    assert out == {"mining_images": 20.0, "mining_pairs": 9.0, "num-examples": 9.0, "too_few_calibration": 1.0}
    assert set(withheld) == {"rel_n_images", "rel_pair_accuracy", "gated"}


def test_the_outcome_check_is_its_own_group():
    metrics = {"outcome_images": 4.0, "outcome_gain": -0.1, "outcome_dice_before": 0.8, "outcome_dice_after": 0.7,
               "rel_n_images": 9.0, "rel_informative_wilson": 0.6}
    out, withheld = reply_policy.withhold_small(metrics, 5)
    assert out == {"rel_n_images": 9.0, "rel_informative_wilson": 0.6, "too_few_outcome": 1.0}
    assert set(withheld) == {"outcome_images", "outcome_gain", "outcome_dice_before", "outcome_dice_after"}
    assert reply_policy.allowed_metrics(metrics)[1] == []  # all listed


def test_min_images_is_validated(tmp_path):
    site = write_site(tmp_path, "general", min_images=None, broken_patient_file=False)
    assert load_site(site).min_images == 5
    site.write_text(site.read_text() + "min_images: 1\n")
    with pytest.raises(ConfigError, match="min_images"):
        load_site(site)


def test_the_allowlist_covers_what_training_reports():
    from shared.training import CALIBRATION_FIGURES

    rel = {f"rel_{'n_images' if k == 'images' else k}" for k in CALIBRATION_FIGURES}
    assert rel <= reply_policy.ALLOWED_METRICS


# ----------------------------------------------------------------------------- where a site writes


def test_a_deployed_site_writes_no_overlays_wherever_the_server_points(tmp_path, monkeypatch):
    site = write_site(tmp_path, "general", broken_patient_file=False)
    target = tmp_path / "server-chosen"
    monkeypatch.setenv(site_context.SIM_RUN_DIR_ENV, str(tmp_path / "sim-run"))  # ignored in deployment too
    reply = send(message(MessageType.TRAIN, phase="preference", server_round=2, **{
        "sim-run-dir": str(target), "sim-sites": [str(tmp_path / "other.yaml")]}), deployed(site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["rel_n_pairs"] > 0  # pairs were mined: a simulation would draw them
    assert not target.exists() and not (tmp_path / "sim-run").exists()
    assert not list(tmp_path.rglob("*_round002_*.png"))


def test_a_simulated_site_is_chosen_and_writes_overlays_only_inside_the_run_dir(tmp_path, monkeypatch):
    site = write_site(tmp_path, "general", broken_patient_file=False)
    run_dir = tmp_path / "run"
    for key, value in site_context.sim_environment([site], run_dir).items():  # what fl-sim sets
        monkeypatch.setenv(key, value)
    reply = send(message(MessageType.TRAIN, phase="preference", server_round=2,
                         **{"sim-run-dir": str(tmp_path / "server-chosen")}), simulated(0))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert sorted(p.name for p in (run_dir / "overlays").iterdir())[0].startswith("general_round002_")
    assert not (tmp_path / "server-chosen").exists()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for png in (run_dir / "overlays").iterdir():
        png.unlink()
    (run_dir / "overlays").rmdir()
    (run_dir / "overlays").symlink_to(outside)  # a link out of the run dir is refused
    with pytest.raises(ValueError, match="outside"):
        site_context.overlay_dir(simulated(0))
    reply = send(message(MessageType.TRAIN, phase="preference", server_round=3), simulated(0))
    assert reply.has_error() and not list(outside.iterdir())


def test_the_server_message_never_picks_the_site(tmp_path, monkeypatch):
    """A simulated node with no fl-sim environment is no site, whatever the server sends."""
    monkeypatch.delenv(site_context.SIM_SITES_ENV, raising=False)
    site = write_site(tmp_path, "general", broken_patient_file=False)
    reply = send(message(MessageType.QUERY, **{"sim-sites": [str(site)]}), simulated(0))
    assert reply.has_error() and reply.error.reason.startswith("site 'unknown': config")


def test_packed_weights_pass_the_policy_and_leave_packed(tmp_path):
    """Deployment packs the weights into one buffer (shared.wire): the policy checks the packed
    reply against the names the server sent and lets it out."""
    from shared.wire import PACKED_LAYOUT, pack_arrays, unpack_arrays

    site = write_site(tmp_path, "general", broken_patient_file=False)
    msg = message(MessageType.TRAIN)
    sent_keys = set(msg.content["arrays"].keys())
    msg.content = pack_arrays(msg.content)
    reply = send(msg, deployed(site))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert PACKED_LAYOUT in reply.content
    assert set(unpack_arrays(reply.content)["arrays"].keys()) == sent_keys


def test_the_consortium_judge_travels_as_weights_only(tmp_path):
    """A judge round and a federated site's preference round through the real ClientApp: the
    judge's weights under the names the server sent, listed figures, nothing identifying; its
    out-of-fold proposals stay in the site's work_dir. Without the judge, a federated site's
    round fails as a config problem."""
    from shared.config import QualityJudgeConfig
    from shared.judge_training import OOF_FILE, initial_judge_state

    site = write_site(tmp_path, "general", per_split=6)
    site.write_text(site.read_text().replace("judge: {kind: oracle}", "judge: {kind: federated}"))
    context = deployed(site)
    quality = json.dumps(to_dict(QualityJudgeConfig(rounds=1, steps=3, batch_size=4, folds=2, fold_steps=2)))
    judge = initial_judge_state(1, seed=0)
    msg = message(MessageType.TRAIN, phase="judge", server_round=2, quality_judge=quality)
    msg.content["arrays"] = ArrayRecord(judge)
    reply = send(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert_nothing_identifying(reply, tmp_path)
    assert set(reply.content["arrays"].keys()) == set(judge)
    assert set(reply.content["metrics"].keys()) == {"judge_loss", "judge_steps", "num-examples", "compute_s", "rss_mb"}
    assert reply.content["metrics"]["num-examples"] == 6.0  # the labelled split (the broken pair skipped)
    assert (load_site(site).work_dir / OOF_FILE).is_file()

    preference = message(MessageType.TRAIN, phase="preference", server_round=2)
    preference.content["judge"] = reply.content["arrays"]
    scored = send(preference, context)
    assert not scored.has_error(), scored.error.reason if scored.has_error() else ""
    assert_nothing_identifying(scored, tmp_path)
    assert "rel_spearman" in scored.content["metrics"]
    missing = send(message(MessageType.TRAIN, phase="preference", server_round=3), context)
    assert missing.has_error() and missing.error.reason.startswith("site 'general': config (see site log, id ")
    assert "the server sent none" in site_log(site)
