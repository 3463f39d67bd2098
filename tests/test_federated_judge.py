"""The consortium's quality judge (`judge.kind: federated`, consortium `quality_judge:`).

Unit tests of its schedule, its site round and its out-of-fold cache; a real simulated
consortium (Flower ServerApp and ClientApps, tiny demo X-rays at 32 px) that trains it at every
site, scores with it at the federated site, keeps it in the checkpoints and resumes it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fl_server.federation import judge_due
from fl_server.run_dir import config_hash
from shared import judge_training
from shared.config import (ConfigError, ProposalConfig, QualityJudgeConfig, SupervisedConfig, load_consortium,
                           load_consortium_sites, to_dict)
from shared.data import SplitData
from shared.judge_training import OOF_FILE, consortium_judge, initial_judge_state, judge_round
from shared.site import model_from_config, site_judge
from test_federation import metric_lines, run_sim, write_consortium

QUALITY = "quality_judge: {rounds: 1, steps: 6, batch_size: 4, folds: 2, fold_steps: 3, refresh_every: 1}\n"


def _consortium(tmp_path, quality: str | None = QUALITY, **judges):
    path = write_consortium(tmp_path, judges or {"montgomery": "{kind: federated}", "shenzhen_a": "{kind: agreement}"})
    if quality:
        path.write_text(path.read_text() + quality)
    return path


def test_the_judge_is_trained_before_the_first_preference_round_and_refreshed_on_schedule(tmp_path):
    cfg = load_consortium(_consortium(tmp_path))  # 1 supervised round, refresh_every 1
    assert [judge_due(cfg, r, trained=r > 2) for r in (1, 2, 3)] == [False, True, True]
    every_two = dataclasses.replace(cfg, quality_judge=dataclasses.replace(cfg.quality_judge, refresh_every=2),
                                    preference=dataclasses.replace(cfg.preference, rounds=5))
    # preference rounds 1..5 are server rounds 2..6: trained before 1, refreshed before 3 and 5
    assert [judge_due(every_two, r, trained=r > 2) for r in range(2, 7)] == [True, False, True, False, True]
    once = dataclasses.replace(every_two, quality_judge=dataclasses.replace(cfg.quality_judge, refresh_every=0))
    assert [judge_due(once, r, trained=r > 2) for r in range(2, 7)] == [True, False, False, False, False]
    assert judge_due(once, 4, trained=False)  # a resume that finds no judge trains one first
    assert not judge_due(dataclasses.replace(cfg, quality_judge=None), 2, trained=False)


def test_a_federated_site_needs_the_consortiums_judge(tmp_path):
    with pytest.raises(ConfigError, match=r"montgomery.yaml: judge.kind: 'federated' .* has no quality_judge: section"):
        load_consortium_sites(load_consortium(_consortium(tmp_path, quality=None)))
    cfg = load_consortium(_consortium(tmp_path, quality="quality_judge: {}\n"))
    assert cfg.quality_judge == QualityJudgeConfig()
    site = load_consortium_sites(cfg)[0]
    with pytest.raises(ValueError, match="the server sent none"):
        site_judge(site, {}, cfg.model, cfg.supervised, cfg.preference, "cpu")


def test_runs_made_before_quality_judge_existed_keep_their_fingerprint(tmp_path):
    import hashlib
    import json

    cfg = load_consortium(_consortium(tmp_path, quality=None, montgomery="{kind: agreement}"))
    # excluded_steps and bound_counts at the rule every earlier run had (anchor is the default since; bound_counts: pairs is the default)
    cfg = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, excluded_steps="preference",
                                                                   bound_counts="pairs"))
    before = to_dict(cfg)  # what config_hash hashed before the key existed (and before excluded_steps)
    before.pop("run_dir"), before.pop("quality_judge"), before["aggregation"].pop("excluded_steps")
    before["aggregation"].pop("bound_counts")
    assert config_hash(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(dataclasses.replace(cfg, quality_judge=QualityJudgeConfig())) != config_hash(cfg)
    # a run made before the bound counted units does not resume under the new rule
    units = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation, bound_counts="units"))
    assert config_hash(units) != config_hash(cfg)
    # a run made with a quality judge before its ranking term existed: the term at 0 hashes as before
    judged = dataclasses.replace(cfg, quality_judge=QualityJudgeConfig())
    before = to_dict(judged)
    before.pop("run_dir"), before["quality_judge"].pop("rank_weight"), before["aggregation"].pop("excluded_steps")
    before["aggregation"].pop("bound_counts")
    assert config_hash(judged) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    ranked = dataclasses.replace(judged, quality_judge=QualityJudgeConfig(rank_weight=1.0))
    assert config_hash(ranked) != config_hash(judged)


def _labeled(n=6, size=32, seed=0) -> SplitData:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        r, c, h = 4 + 2 * i % 10, 6 + 3 * i % 12, 8 + i % 6
        masks[i, 0, r:r + h, c:c + h] = 1
    images = masks.float() * 0.6 + 0.4 * torch.rand(n, 1, size, size, generator=g)
    return SplitData(names=[f"img{i}.png" for i in range(n)], images=images, masks=masks)


def test_a_judge_round_trains_the_received_weights_and_keeps_its_proposals_at_the_site(tmp_path, monkeypatch):
    cfg = load_consortium(_consortium(tmp_path))
    quality, labeled = cfg.quality_judge, _labeled()
    factory = lambda: model_from_config(cfg.model)  # noqa: E731
    received = initial_judge_state(1, quality.seed)
    args = (factory, {"model": "tiny"}, quality, SupervisedConfig(steps=1, batch_size=2), ProposalConfig(mc_samples=0))
    state, figures = judge_round(received, labeled, *args, tmp_path / "work", "cpu", seed=1)
    assert state.keys() == received.keys()
    assert any(not torch.equal(state[k], received[k]) for k in state if state[k].is_floating_point())
    assert set(figures) == {"judge_loss", "judge_steps"} and 0 <= figures["judge_loss"] < 1
    assert (tmp_path / "work" / OOF_FILE).is_file()

    made = []
    real = judge_training.out_of_fold_proposals
    monkeypatch.setattr(judge_training, "out_of_fold_proposals", lambda *a, **k: made.append(1) or real(*a, **k))
    again, _ = judge_round(received, labeled, *args, tmp_path / "work", "cpu", seed=1)
    assert made == []  # the next round (a fresh process in deployment) reads them back
    for key, value in state.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0)  # same draws for the same seed
    other, _ = judge_round(received, labeled, *args, tmp_path / "work", "cpu", seed=2)
    assert any(not torch.equal(other[k], state[k]) for k in state if state[k].is_floating_point())
    judge_round(received, _labeled(n=7), *args, tmp_path / "work", "cpu", seed=1)
    assert made == [1]  # a changed labelled split makes them again
    ranked = (factory, {"model": "tiny"}, dataclasses.replace(quality, rank_weight=1.0)) + args[3:]
    with_ranking, _ = judge_round(received, labeled, *ranked, tmp_path / "work", "cpu", seed=1)
    assert made == [1, 1]  # (the split changed back)
    assert any(not torch.equal(with_ranking[k], state[k]) for k in state if state[k].is_floating_point())


def test_out_of_fold_segmenters_never_saw_a_frame_of_the_group_they_propose_for(tmp_path, monkeypatch, caplog):
    """A site with data.groups: each fold's segmenter trains on other groups only, the cache tells
    grouped folds from folds by image, and one group alone falls back to folds by image."""
    from shared import training
    labeled = dataclasses.replace(_labeled(n=6), groups=["v1", "v1", "v2", "v2", "v3", "v3"])
    trained_on, real = [], training.supervised_round
    # the real training, recording what each fold's segmenter was trained on
    monkeypatch.setattr(training, "supervised_round", lambda model, split, *a, **k: trained_on.append(split)
                        or real(model, split, *a, **k))
    args = (lambda: model_from_config(load_consortium(_consortium(tmp_path)).model), SupervisedConfig(steps=1),
            ProposalConfig(mc_samples=0), 3, "cpu", 0)
    judge_training.out_of_fold_proposals(labeled, *args)
    assert len(trained_on) == 3
    assert sorted(tuple(sorted(set(split.groups))) for split in trained_on) == [("v1", "v2"), ("v1", "v3"), ("v2", "v3")]
    assert training.subset(labeled, [0, 2]).groups == ["v1", "v2"]  # subsets carry the groups

    trained_on.clear()
    judge_training.cached_out_of_fold_proposals(tmp_path / "w", labeled, *args[:1], {}, *args[1:])
    judge_training.cached_out_of_fold_proposals(tmp_path / "w", dataclasses.replace(labeled, groups=None),
                                                *args[:1], {}, *args[1:])
    assert len(trained_on) == 6  # grouped and by-image proposals are different caches
    for split in trained_on[3:]:
        assert split.groups is None

    trained_on.clear()
    one = dataclasses.replace(labeled, groups=["v1"] * 6)
    with caplog.at_level("WARNING", logger="shared.judge_training"):
        judge_training.out_of_fold_proposals(one, *args)
    assert len(trained_on) == 3 and all(len(split.names) == 4 for split in trained_on)  # by image, 3 folds
    assert "every labelled image comes from one group" in caplog.text and "v1" not in caplog.text
    trained_on.clear()
    judge_training.cached_out_of_fold_proposals(tmp_path / "w", one, *args[:1], {}, *args[1:])
    assert trained_on == []  # one group: folds by image, the by-image cache above serves it


def test_the_consortium_judge_scores_with_the_weights_it_was_given():
    state = initial_judge_state(1, seed=5)
    judge = consortium_judge(state, channels=1, image_size=32)
    assert judge.name == "federated"
    labeled = _labeled(n=3)
    proposals = type("P", (), {"masks": torch.cat([labeled.masks, 1 - labeled.masks], dim=1)})()
    scores = judge.score(labeled.images, proposals)
    assert scores.shape == (3, 2)
    other = consortium_judge(initial_judge_state(1, seed=6), channels=1, image_size=32).score(labeled.images, proposals)
    assert not torch.equal(scores, other)


def test_every_site_trains_the_judge_it_is_checkpointed_and_resumes(tmp_path):
    consortium = _consortium(tmp_path)
    straight = run_sim(consortium, run_dir=tmp_path / "straight")
    judge_lines = [line for line in metric_lines(straight) if line["kind"] == "judge"]
    # before preference round 1 (server round 2) and, refresh_every 1, before round 3
    assert [(line["round"], line["judge_round"]) for line in judge_lines] == [(2, 1), (3, 1)]
    for line in judge_lines:  # the agreement site trains the consortium's judge too
        assert set(line["sites"]) == {"montgomery", "shenzhen_a"}
        assert all(s["status"] == "ok" and s["num-examples"] >= 5 for s in line["sites"].values())
        assert 0 <= line["mean_loss"] < 1
    checkpoints = {r: torch.load(straight / "checkpoints" / f"round_00{r}.pt", weights_only=True) for r in (1, 2, 3)}
    assert checkpoints[1]["judge_state"] is None
    assert checkpoints[2]["judge_state"].keys() == initial_judge_state(1, 0).keys()
    assert any(not torch.equal(checkpoints[3]["judge_state"][k], v)
               for k, v in checkpoints[2]["judge_state"].items() if v.is_floating_point())  # refreshed
    from fl_server.report import round_table

    round_two = [line for line in metric_lines(straight) if line["round"] == 2]
    title = round_table(round_two).splitlines()[0]
    assert f"quality judge trained (1 rounds, 2 sites, loss {judge_lines[0]['mean_loss']:.3f})" in title
    federated = [line for line in metric_lines(straight) if line.get("site") == "montgomery" and line["phase"] == "preference"]
    # measured with the consortium's judge every round (a site the ledger holds to anchor-only steps
    # still measures its judge)
    assert len(federated) == 2 and all(line["status"] in ("ok", "excluded", "anchor") and "rel_spearman" in line["train"]
                                       for line in federated)

    stopped = run_sim(consortium, run_dir=tmp_path / "stopped", stop_after=2)
    run_sim(consortium, run_dir=stopped, resume=True)
    resumed = torch.load(stopped / "checkpoints" / "round_003.pt", weights_only=True)
    for key in ("state_dict", "judge_state"):
        for name, value in checkpoints[3][key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=0, atol=0)
    assert [line for line in metric_lines(stopped) if line["kind"] == "judge"] == judge_lines


class _JudgeGrid:
    """A Grid whose nodes answer a judge round as scripted: node -> (site, weights value,
    labelled count) or an error text; what collect_judge reads of a real reply."""

    def __init__(self, script: dict):
        self.script = script

    def get_node_ids(self):
        return list(self.script)

    def send_and_receive(self, messages, timeout):
        from types import SimpleNamespace

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            answer = self.script[node]
            if answer is None:  # never answers
                continue
            if isinstance(answer, str):
                replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: True,
                                               error=SimpleNamespace(reason=answer)))
                continue
            site, value, count = answer
            weights = {k: torch.full_like(v, value) if v.is_floating_point() else v.clone()
                       for k, v in message.content["arrays"].to_torch_state_dict().items()}
            content = {"site": {"name": site}, "metrics": {"num-examples": count, "judge_loss": 0.1},
                       "arrays": SimpleNamespace(to_torch_state_dict=lambda w=weights: w)}
            replies.append(SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False,
                                           content=content))
        return replies


def _strategy(tmp_path, min_sites=2, revoked=()):
    import json

    from fl_server.federation import ConsortiumStrategy
    from shared.ledger import Ledger

    cfg = load_consortium(_consortium(tmp_path))
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, min_sites=min_sites, round_timeout=5),
                              quality_judge=dataclasses.replace(cfg.quality_judge, rounds=1))
    revoked_file = tmp_path / "revoked_sites.json"
    revoked_file.write_text(json.dumps({site: "ecdsa-sha2-nistp384 AAAA" for site in revoked}))
    strategy = ConsortiumStrategy(cfg, Ledger(), revoked_file=revoked_file)
    strategy.node_sites = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f"}
    return strategy


@pytest.fixture
def plain_messages(monkeypatch):
    """Messages as plain objects: a real flwr Message needs a running Flower run."""
    from types import SimpleNamespace

    from fl_server import federation

    monkeypatch.setattr(federation, "Message", lambda content, message_type, dst_node_id: SimpleNamespace(
        content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id)))


def test_only_sound_updates_of_enough_sites_train_the_judge(tmp_path, plain_messages):
    start = initial_judge_state(1, seed=0)
    lines = []
    strategy = _strategy(tmp_path, revoked=("f",))
    grid = _JudgeGrid({1: ("a", 1.0, 10.0), 2: ("b", 4.0, 30.0), 3: ("c", float("nan"), 10.0),
                       4: ("d", 9.0, 0.0), 5: "site 'e': training (see site log, id 1234abcd)", 6: ("f", 50.0, 10.0)})
    state, changed = strategy.train_judge(grid, 2, start, lines.append)
    assert changed
    floats = [k for k, v in state.items() if v.is_floating_point()]
    for key in floats:  # a and b only, by labelled images: (1 x 10 + 4 x 30) / 40
        torch.testing.assert_close(state[key], torch.full_like(state[key], 3.25))
    statuses = {site: row["status"] for site, row in lines[0]["sites"].items()}
    assert statuses == {"a": "ok", "b": "ok", "c": "rejected", "d": "rejected", "e": "failed", "f": "revoked"}
    assert "not a positive count" in lines[0]["sites"]["d"]["reason"]

    # one usable site is not the consortium: the judge stays as it was, and says so
    (tmp_path / "alone").mkdir()
    alone = _strategy(tmp_path / "alone")
    kept, changed = alone.train_judge(_JudgeGrid({1: ("a", 1.0, 10.0), 2: None}), 2, start, lines.append)
    assert not changed and all(torch.equal(kept[k], start[k]) for k in start)
    assert lines[-1]["sites"]["b"]["status"] == "failed"


def test_an_untrained_judge_is_not_sent_and_the_title_says_so(tmp_path):
    from fl_server.report import round_table

    lines = [{"kind": "site", "round": 2, "phase": "preference", "site": "a", "status": "ok", "train": {}, "eval": {}},
             {"kind": "global", "round": 2, "phase": "preference",
              "quality_judge": {"rounds": 1, "loss": None, "sites": 1, "trained": False}}]
    assert "quality judge NOT trained (too few sites trained it: 1)" in round_table(lines).splitlines()[0]


def test_fl_client_local_trains_the_judge_at_the_one_site_and_says_when_it_cannot(tmp_path, capsys):
    from fl_client import cli as client

    consortium = _consortium(tmp_path, montgomery="{kind: federated}")
    site = tmp_path / "montgomery.yaml"
    code = client.main(["local", "--site", str(site), "--consortium", str(consortium), "--rounds", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["2", "preference"])
    assert len(row.split()) == 11  # the calibration figures of a round scored with the trained judge
    assert (tmp_path / "work" / "montgomery" / OOF_FILE).is_file()

    tiny = consortium.read_text().replace("folds: 2", "folds: 200")  # more folds than labelled images
    consortium.write_text(tiny)
    code = client.main(["local", "--site", str(site), "--consortium", str(consortium), "--rounds", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"fl-client: {site}: the quality judge cannot be trained here: ")
