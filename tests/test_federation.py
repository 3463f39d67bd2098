"""The federation end to end in Flower's simulation engine, on tiny real demo sites.

Each test runs a real consortium: Flower ServerApp and ClientApps, a real MONAI network,
real chest X-rays from data/demo (resized to 32 px so that a run takes seconds).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from flwr.clientapp import ClientApp

from fl_client import client_app as our_client
from fl_server.report import round_table
from fl_sim import cli as sim
from shared.config import load_consortium, load_consortium_sites

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "lung_cxr"


def write_consortium(tmp_path: Path, judges: dict[str, str], *, supervised=1, preference=2,
                     min_sites=1, timeout=900, aggregation="reliability", missing_data: str | None = None,
                     reference="round", excluded_steps: str | None = None) -> Path:
    """Site YAMLs (one per entry of `judges`: site name -> judge mapping) and a consortium YAML
    (`excluded_steps` None: the option's default)."""
    folders = {"montgomery": "montgomery", "shenzhen_a": "shenzhen_a", "shenzhen_b": "shenzhen_b"}
    site_files = []
    for name, judge in judges.items():
        images = DEMO / folders[name] / "images"
        if name == missing_data:
            images = tmp_path / "gone"  # the site crashes when it loads its data
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(f"""\
            name: {name}
            work_dir: {tmp_path / 'work' / name}
            image_size: 32
            device: cpu
            data:
              source: {{images: {images}, masks: {DEMO / folders[name] / 'masks'}}}
              split: {{labeled: 0.2, calibration: 0.15, unlabeled: 0.45, test: 0.2}}
            judge: {judge}
            """))
        site_files.append(path.name)
    consortium = tmp_path / "consortium.yaml"
    consortium.write_text(textwrap.dedent(f"""\
        name: tiny
        sites: {site_files}
        run_dir: {tmp_path / 'run'}
        seed: 3
        model: {{name: unet, channels: [8, 16, 32], strides: [2, 2], num_res_units: 1, dropout: 0.1}}
        supervised: {{rounds: {supervised}, steps: 15, lr: 0.01, batch_size: 4}}
        preference:
          rounds: {preference}
          steps: 4
          batch_pairs: 4
          reference: {reference}
          proposals: {{tta: [identity, hflip], mc_samples: 2, thresholds: [0.3, 0.5, 0.7]}}
        aggregation: {{kind: {aggregation}{f', excluded_steps: {excluded_steps}' if excluded_steps else ''}}}
        federation: {{min_sites: {min_sites}, round_timeout: {timeout}}}
        """))
    return consortium


def run_sim(consortium: Path, run_dir: Path | None = None, resume=False, client_app=None, stop_after=None) -> Path:
    cfg = load_consortium(consortium)
    sites = load_consortium_sites(cfg)
    run_dir = run_dir or cfg.run_dir
    code = sim.run(cfg, sites, run_dir, resume, cpus=2, client_app=client_app, stop_after=stop_after)
    assert code == 0
    return run_dir


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def site_lines(run_dir: Path, site: str) -> list[dict]:
    return [line for line in metric_lines(run_dir) if line["kind"] == "site" and line["site"] == site]


def test_consortium_writes_consistent_ledger_metrics_and_checkpoints(tmp_path):
    # excluded_steps preference (the rule before): the excluded site's updates weigh nothing in every round
    consortium = write_consortium(tmp_path, {
        "montgomery": "{kind: oracle}",
        "shenzhen_b": "{kind: oracle, invert: true}",
    }, excluded_steps="preference")
    run_dir = run_sim(consortium)

    lines = metric_lines(run_dir)
    rounds = sorted({line["round"] for line in lines})
    assert rounds == [1, 2, 3]
    for r in rounds:
        per_round = [line for line in lines if line["round"] == r]
        assert {line["site"] for line in per_round if line["kind"] == "site"} == {"montgomery", "shenzhen_b"}
        (global_line,) = [line for line in per_round if line["kind"] == "global"]
        assert global_line["phase"] == ("supervised" if r == 1 else "preference")
        assert 0.0 < global_line["mean_dice"] <= 1.0
    for line in lines:
        if line["kind"] == "site":
            assert line["status"] in ("ok", "excluded")
            assert 0.0 <= line["eval"]["dice"] <= 1.0

    # the inverted judge is seen on the calibration split: weight drops, state leaves trusted
    honest = {line["round"]: line for line in site_lines(run_dir, "montgomery")}
    inverted = {line["round"]: line for line in site_lines(run_dir, "shenzhen_b")}
    for r in (2, 3):
        assert inverted[r]["train"]["rel_pair_accuracy"] < 0.5
        assert honest[r]["train"]["rel_pair_accuracy"] > 0.5
        assert inverted[r]["weight"] == 0.0 < honest[r]["weight"]
        assert inverted[r]["state"] != "trusted"
    assert inverted[1]["weight"] == pytest.approx(0.5)  # supervised rounds weigh by labelled images

    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["rounds_completed"] == 3
    assert ledger["sites"]["shenzhen_b"]["state"] == "excluded"
    assert ledger["sites"]["montgomery"]["state"] == "trusted"
    assert [h["round"] for h in ledger["sites"]["shenzhen_b"]["history"]] == [2, 3]

    checkpoints = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    assert [c.name for c in checkpoints] == ["round_001.pt", "round_002.pt", "round_003.pt"]
    last = torch.load(checkpoints[-1], weights_only=True)
    assert last["round"] == 3 and last["ledger"]["rounds_completed"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert (run_dir / "config.yaml").exists()
    report = (run_dir / "report.html").read_text()
    assert "montgomery" in report and "shenzhen_b" in report
    assert list((run_dir / "overlays").glob("montgomery_round002_*.png"))


def test_an_excluded_site_keeps_its_labels_in_the_consortium_with_anchor_steps(tmp_path):
    """excluded_steps: anchor, the default (not written in the YAML). The inverted judge is excluded
    after its first preference round (its update then weighs nothing); from the next round it takes
    the control's anchor-only steps, weighed by its labelled images, and still measures its judge."""
    consortium = write_consortium(tmp_path, {
        "montgomery": "{kind: oracle}",
        "shenzhen_b": "{kind: oracle, invert: true}",
    }, preference=2)
    assert "excluded_steps" not in consortium.read_text()
    run_dir = run_sim(consortium)
    inverted = {line["round"]: line for line in site_lines(run_dir, "shenzhen_b")}
    assert inverted[2]["status"] == "excluded" and inverted[2]["weight"] == 0.0
    assert inverted[2]["train"]["pairs_used"] > 0  # it followed its judge: discarded
    held = inverted[3]
    assert held["status"] == "ok" and held["state"] == "excluded"
    assert held["train"]["pairs_used"] == 0 and held["train"]["steps"] == 4
    assert held["train"]["num-examples"] == inverted[1]["train"]["num-examples"]  # its labelled images
    assert held["weight"] > 0
    assert held["train"]["rel_pair_accuracy"] < 0.5  # still measured, so it could recover
    table = round_table([line for line in metric_lines(run_dir) if line["round"] == 3])
    assert [row.split()[2] for row in table.splitlines() if row.startswith("shenzhen_b")] == ["anchor"]


def test_crashed_and_nan_sites_do_not_stop_the_round(tmp_path):
    consortium = write_consortium(
        tmp_path,
        {"montgomery": "{kind: oracle}", "shenzhen_a": "{kind: oracle}", "shenzhen_b": "{kind: oracle}"},
        supervised=1, preference=1, missing_data="shenzhen_a",
    )  # the faults are injected: no site is slow on purpose, so no short round timeout races the machine

    def nan_weights_at_shenzhen_b(msg, context, call_next):
        """A site whose update is garbage: every weight of its reply is NaN."""
        reply = call_next(msg, context)
        if reply.has_content() and "arrays" in reply.content and reply.content["site"]["name"] == "shenzhen_b":
            from flwr.app import ArrayRecord

            state = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in state.items()})
        return reply

    faulty = ClientApp(mods=[nan_weights_at_shenzhen_b])
    faulty.train()(our_client.train)
    faulty.evaluate()(our_client.evaluate)
    faulty.query()(our_client.identify)
    run_dir = run_sim(consortium, client_app=faulty)

    crashed = site_lines(run_dir, "shenzhen_a")
    assert {line["status"] for line in crashed} == {"failed"}
    # a category only (fl_client.reply_policy): the missing folder's path stays in the site's log
    assert crashed[0]["reason"].startswith("data") and "gone" not in crashed[0]["reason"]
    garbage = site_lines(run_dir, "shenzhen_b")
    assert {line["status"] for line in garbage} == {"rejected"}
    assert all("NaN" in line["reason"] and line["weight"] == 0.0 for line in garbage)
    healthy = site_lines(run_dir, "montgomery")
    assert {line["status"] for line in healthy} == {"ok"}
    # the only update averaged in: all of the supervised round; in the preference round its judge's
    # g (from the ledger's Wilson bound, under 1 with a finite count of pairs), the rest kept on
    # the global model (damped)
    assert healthy[0]["weight"] == pytest.approx(1.0)
    assert healthy[1]["weight"] == pytest.approx(min(1.0, (healthy[1]["bound"] - 0.5) / 0.5))
    assert healthy[1]["weight"] > 0.5

    globals_ = [line for line in metric_lines(run_dir) if line["kind"] == "global"]
    assert all(line["aggregated"] for line in globals_)
    final = torch.load(run_dir / "checkpoints" / "round_002.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["sites"]["shenzhen_b"]["rejected"] == 2
    assert ledger["sites"]["shenzhen_a"]["failures"] >= 1


def test_resume_after_a_stop_gives_the_uninterrupted_result(tmp_path):
    consortium = write_consortium(tmp_path, {"montgomery": "{kind: oracle, noise_std: 0.1}",
                                             "shenzhen_a": "{kind: agreement}"})
    straight = run_sim(consortium, run_dir=tmp_path / "straight")
    stopped = run_sim(consortium, run_dir=tmp_path / "stopped", stop_after=2)
    assert sorted(p.name for p in (stopped / "checkpoints").glob("*.pt")) == ["round_001.pt", "round_002.pt"]
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"kind": "site", "round": 3, "site": "montg')  # killed mid-write in round 3
    run_sim(consortium, run_dir=stopped, resume=True)

    a = torch.load(straight / "checkpoints" / "round_003.pt", weights_only=True)
    b = torch.load(stopped / "checkpoints" / "round_003.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0)
    assert a["ledger"]["sites"] == b["ledger"]["sites"]
    assert a["selection"] == b["selection"] and a["calib_dice"] == b["calib_dice"]
    best_a, best_b = (torch.load(run / "best.pt", weights_only=True) for run in (straight, stopped))
    assert best_a["round"] == best_b["round"] and best_a["calib_dice"] == best_b["calib_dice"]
    rows = [(line["kind"], line["round"], line.get("site")) for line in metric_lines(stopped)]
    assert len(rows) == len(set(rows)) == len(metric_lines(straight))


def test_a_fixed_reference_is_the_preference_phase_start_also_after_a_resume(tmp_path):
    """`preference.reference: base`: the first preference round is the same as with a refreshed
    reference (both are the received model), the second is not; a server restarted between them
    sends the same fixed reference (from the last supervised round's checkpoint)."""
    judges = {"montgomery": "{kind: oracle, noise_std: 0.1}", "shenzhen_a": "{kind: oracle, noise_std: 0.1}"}
    (tmp_path / "round").mkdir(), (tmp_path / "base").mkdir()
    refreshed = run_sim(write_consortium(tmp_path / "round", judges))
    fixed_consortium = write_consortium(tmp_path / "base", judges, reference="base")
    fixed = run_sim(fixed_consortium)
    restarted = run_sim(fixed_consortium, run_dir=tmp_path / "restarted", stop_after=2)
    run_sim(fixed_consortium, run_dir=restarted, resume=True)

    def weights(run_dir: Path, round_number: int) -> dict:
        return torch.load(run_dir / "checkpoints" / f"round_{round_number:03d}.pt", weights_only=True)["state_dict"]

    for key, value in weights(refreshed, 2).items():
        torch.testing.assert_close(weights(fixed, 2)[key], value, rtol=0, atol=0)
    assert any(not torch.equal(weights(fixed, 3)[k], v) for k, v in weights(refreshed, 3).items())
    for key, value in weights(fixed, 3).items():
        torch.testing.assert_close(weights(restarted, 3)[key], value, rtol=0, atol=0)


def test_resume_refuses_a_changed_config(tmp_path):
    consortium = write_consortium(tmp_path, {"montgomery": "{kind: oracle}"}, preference=1)
    run_dir = run_sim(consortium, stop_after=1)
    consortium.write_text(consortium.read_text().replace("seed: 3", "seed: 4"))
    cfg = load_consortium(consortium)
    with pytest.raises(ValueError, match="different consortium config"):
        from fl_server.run_dir import RunDir, config_hash

        RunDir(run_dir).resume(config_hash(cfg))


def test_best_pt_is_chosen_on_calibration_dice_and_a_fallen_round_is_rolled_back_also_across_a_resume(tmp_path):
    """Rounds 2 and 4 (preference) come back as an all-zero model: bad but finite, it predicts
    no foreground, so its calibration Dice is 0. Round 2 falls more than the default margin and is
    rolled back (round 3 receives the best model, round 1's); the last round, 4, is worse than
    an earlier one and best.pt stays on the best calibration round. A server stopped right after
    the rollback resumes to the same rounds 3 and 4."""
    from flwr.app import ArrayRecord

    from fl_client.reply_policy import reply_policy_mod
    from fl_server.report import round_table, status_table

    consortium = write_consortium(tmp_path, {"montgomery": "{kind: oracle}"}, supervised=1, preference=3,
                                  aggregation="fedavg")  # one site under fedavg: its zeros are the model
    received = tmp_path / "received"
    received.mkdir()

    def zero_rounds_2_and_4(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        server_round = int(msg.content["config"]["server-round"])
        if server_round == 3:
            torch.save(msg.content["arrays"].to_torch_state_dict(), received / f"{len(list(received.iterdir()))}.pt")
        if server_round in (2, 4):
            state = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: torch.zeros_like(v) for k, v in state.items()})
        return reply

    faulty = ClientApp(mods=[reply_policy_mod, zero_rounds_2_and_4])  # the policy lets calib_* out
    faulty.train()(our_client.train)
    faulty.evaluate()(our_client.evaluate)
    faulty.query()(our_client.identify)
    straight = run_sim(consortium, run_dir=tmp_path / "straight", client_app=faulty)

    globals_ = {line["round"]: line for line in metric_lines(straight) if line["kind"] == "global"}
    calib = {r: line["calib_dice"] for r, line in globals_.items()}
    assert calib[2] == calib[4] == 0.0 and calib[1] > 0.1 and calib[3] > 0.1
    assert all(line["calib_images"] >= 5 for line in globals_.values())  # montgomery's calibration split
    assert [globals_[r]["rolled_back"] for r in (1, 2, 3, 4)] == [False, True, False, True]
    best_round = max(calib, key=lambda r: (calib[r], -r))
    assert best_round in (1, 3) and globals_[4]["best_round"] == best_round
    best = torch.load(straight / "best.pt", weights_only=True)
    assert best["round"] == best_round and best["calib_dice"] == pytest.approx(calib[best_round])
    assert {k: v for k, v in best["selection"].items() if k != "best_reports"} == {
        "best_round": best_round, "best_dice": best["calib_dice"], "rolled_back": False}
    assert set(best["selection"]["best_reports"]) == {"montgomery"}  # per-site figures behind the best
    on_disk = torch.load(straight / "checkpoints" / f"round_{best_round:03d}.pt", weights_only=True)["state_dict"]
    for key, value in on_disk.items():
        torch.testing.assert_close(best["state_dict"][key], value, rtol=0, atol=0)
    round_1 = torch.load(straight / "checkpoints" / "round_001.pt", weights_only=True)["state_dict"]
    for key, value in torch.load(received / "0.pt", weights_only=True).items():  # round 3 started from round 1
        torch.testing.assert_close(value, round_1[key], rtol=0, atol=0)
    assert "ROLLED BACK" in round_table([line for line in metric_lines(straight) if line["round"] == 2]).splitlines()[0]
    assert status_table(straight).splitlines()[-1].startswith(f"best round: {best_round} (calibration Dice ")

    stopped = run_sim(consortium, run_dir=tmp_path / "stopped", client_app=faulty, stop_after=2)
    run_sim(consortium, run_dir=stopped, resume=True, client_app=faulty)
    for key, value in torch.load(received / "1.pt", weights_only=True).items():  # the resumed round 3 too
        torch.testing.assert_close(value, round_1[key], rtol=0, atol=0)
    for name in ("checkpoints/round_003.pt", "checkpoints/round_004.pt", "best.pt"):
        a = torch.load(straight / name, weights_only=True)
        b = torch.load(stopped / name, weights_only=True)
        assert a["round"] == b["round"] and a["selection"] == b["selection"] and a["calib_dice"] == b["calib_dice"]
        for key, value in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0)
