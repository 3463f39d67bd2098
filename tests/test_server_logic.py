"""The server's decisions without a simulation: ledger, update checks, weighting, timeouts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from types import SimpleNamespace

from fl_server.federation import ConsortiumStrategy, SiteOutcome, calibration_settings, exclusion_reason
from shared.aggregation import norm_outliers, update_norm, update_problem, weighted_average
from shared.config import AggregationConfig, ConsortiumConfig, PreferenceConfig, to_dict
from shared.ledger import (EXCLUDED, PROBATION, TRUSTED, Ledger, harm_streak, outcome_evidence, pooled_counts,
                           weight_factor)

AGG = AggregationConfig(ema=0.5, probation_below=0.65, exclude_below=0.55, statistic="ema_point")  # the EMA rule


@pytest.mark.parametrize("accuracy, expected", [
    (0.0, 0.0),   # adversarial judge: nothing
    (0.5, 0.0),   # chance: nothing
    (0.75, 0.5),  # halfway between chance and perfect
    (1.0, 1.0),
])
def test_weight_factor_rises_from_chance_to_perfect(accuracy, expected):
    assert weight_factor(accuracy) == pytest.approx(expected)


def figures(acc, n=10):
    return {"pair_accuracy": acc, "spearman": 0.3, "pair_gain": 0.1, "n_pairs": n}


def test_ledger_moves_a_site_through_probation_to_exclusion_and_back():
    ledger = Ledger()
    ledger.record_reliability("a", 1, figures(0.9), AGG)
    assert ledger.site("a").state == TRUSTED and ledger.factor("a", "ema_point") == pytest.approx(0.8)
    ledger.record_reliability("a", 2, figures(0.4), AGG)  # EMA 0.65: still trusted at the boundary
    assert ledger.site("a").ema["pair_accuracy"] == pytest.approx(0.65)
    assert ledger.site("a").state == TRUSTED
    ledger.record_reliability("a", 3, figures(0.5), AGG)  # EMA 0.575
    assert ledger.site("a").state == PROBATION
    ledger.record_reliability("a", 4, figures(0.3), AGG)  # EMA 0.4375
    assert ledger.site("a").state == EXCLUDED and ledger.factor("a", "ema_point") == 0.0
    ledger.record_reliability("a", 5, figures(1.0), AGG)  # EMA 0.71875: recovered
    assert ledger.site("a").state == TRUSTED
    assert [h["round"] for h in ledger.site("a").history] == [1, 2, 3, 4, 5]


def test_a_round_without_calibration_pairs_carries_no_evidence():
    ledger = Ledger()
    ledger.record_reliability("a", 1, figures(0.9), AGG)
    ledger.record_reliability("a", 2, figures(0.5, n=0), AGG)
    assert ledger.site("a").ema["pair_accuracy"] == pytest.approx(0.9)


def test_probation_sites_get_conservative_settings():
    ledger = Ledger()
    base = PreferenceConfig(beta=2.0)
    ledger.record_reliability("weak", 1, figures(0.6), AGG)
    ledger.record_reliability("good", 1, figures(0.95), AGG)
    weak = ledger.settings_for("weak", base)
    assert (weak.mining.strategy, weak.mining.min_gap, weak.beta) == ("skip_top", 0.05, 1.0)
    assert ledger.settings_for("good", base) == base


def test_an_excluded_site_takes_anchor_steps_unless_the_consortium_keeps_the_rule_before():
    ledger = Ledger()
    base = PreferenceConfig(beta=2.0)
    for r in (1, 2):
        ledger.record_reliability("bad", r, figures(0.0), AGG)
    ledger.record_reliability("weak", 1, figures(0.6), AGG)
    assert ledger.site("bad").state == EXCLUDED and ledger.site("weak").state == PROBATION
    # the default (excluded_steps: anchor): the control's anchor-only steps
    held = ledger.settings_for("bad", base)
    assert held.method == "none" and held.steps == base.steps and held.lambda_sup == base.lambda_sup
    assert AggregationConfig().excluded_steps == "anchor"
    # the rule before: it keeps its judge's (conservative) preference steps, whose update weighs nothing
    assert ledger.settings_for("bad", base, "preference").method == "rn_dpo"
    # without anchor steps (lambda_sup 0) there is nothing to hold it to: the rule before
    pure = dataclasses.replace(base, lambda_sup=0.0)
    assert ledger.settings_for("bad", pure) == ledger.settings_for("bad", pure, "preference")
    assert ledger.settings_for("bad", pure).method == "rn_dpo"
    # probation and trust are unchanged by the option
    assert ledger.settings_for("weak", base, "anchor") == ledger.settings_for("weak", base, "preference")
    assert ledger.settings_for("good", base, "anchor") == base


def test_the_server_sends_an_excluded_site_anchor_steps_and_marks_it_held(monkeypatch):
    """configure_train under excluded_steps: anchor; a real Message needs a running Flower run, so
    the test reads the content it would carry."""
    from flwr.app import ArrayRecord

    from fl_server import federation

    monkeypatch.setattr(federation, "Message", lambda content, message_type, dst_node_id: SimpleNamespace(
        content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id)))
    sent_methods = {}
    for steps in ("preference", "anchor", "anchor under fedavg"):
        aggregation = (AggregationConfig(kind="fedavg") if steps == "anchor under fedavg"  # excluded_steps: the default
                       else AggregationConfig(excluded_steps=steps))
        assert aggregation.excluded_steps == ("anchor" if steps != "preference" else "preference")
        strategy = ConsortiumStrategy(consortium(aggregation=aggregation), Ledger())
        strategy.node_sites = {11: "bad", 12: "good"}
        strategy.ready_nodes = lambda grid: [11, 12]
        for r in (1, 2):
            strategy.ledger.record_reliability("bad", r, informative(0.0, 100), WILSON)
            strategy.ledger.record_reliability("good", r, informative(1.0, 100), WILSON)
        messages = strategy.configure_train(3, ArrayRecord(), {"phase": "preference"}, grid=None)
        sent_methods[steps] = {strategy.node_sites[m.metadata.dst_node_id]:
                               json.loads(m.content["config"]["preference"])["method"] for m in messages}
        assert strategy.held == ({"bad"} if steps == "anchor" else set())
        outcomes = strategy.collect(3, "preference", messages, [], state())  # no reply: failed, still marked
        assert outcomes["bad"].held is (steps == "anchor") and outcomes["good"].held is False
    # fedavg never acts on an exclusion, so the default does not hold a site back there either
    assert sent_methods == {"preference": {"bad": "rn_dpo", "good": "rn_dpo"}, "anchor": {"bad": "none", "good": "rn_dpo"},
                            "anchor under fedavg": {"bad": "rn_dpo", "good": "rn_dpo"}}


def test_an_update_without_pairs_weighs_its_labelled_images_also_from_an_excluded_site():
    """What an excluded site sends under excluded_steps: anchor (no pairs) is weighed like a gated
    one: site_weights counts an update as judged only when pairs steered it."""
    strategy = ConsortiumStrategy(consortium(aggregation=AggregationConfig(excluded_steps="anchor")), Ledger())
    for r in (1, 2):
        strategy.ledger.record_reliability("bad", r, informative(0.0, 100), WILSON)
        strategy.ledger.record_reliability("good", r, informative(1.0, 100), WILSON)
    assert strategy.ledger.site("bad").state == EXCLUDED
    outcomes = {"good": SiteOutcome("good", train={"num-examples": 30.0, "pairs_used": 30.0}, state=state(1.0)),
                "bad": SiteOutcome("bad", train={"num-examples": 10.0, "pairs_used": 0.0}, state=state(4.0))}
    new_state, changed = strategy.aggregate("preference", outcomes, state(0.0))
    assert changed and outcomes["bad"].status == "ok" and outcomes["bad"].weight > 0
    factor = strategy.ledger.factor("good")
    # damped: good 30 * g, bad its 10 labelled images, the global model keeps 30 * (1 - g)
    assert outcomes["bad"].weight == pytest.approx(10 / 40)
    assert torch.allclose(new_state["w"], torch.full((2, 3), (30 * factor * 1.0 + 10 * 4.0) / 40))


def test_excluded_steps_loads_with_every_aggregation_and_refuses_unknown_values(tmp_path):
    """The default, anchor, must not make a consortium that does not weigh by reliability (fedavg)
    or has no anchor steps (lambda_sup 0) invalid: there the server and the ledger leave an
    excluded site its preference steps (tests above)."""
    from shared.config import ConfigError, load_consortium

    def write(aggregation, preference="{}"):
        (tmp_path / "c.yaml").write_text(f"name: c\nsites: [a.yaml]\nrun_dir: run\naggregation: {aggregation}\npreference: {preference}\n")
        return tmp_path / "c.yaml"

    assert load_consortium(write("{}")).aggregation.excluded_steps == "anchor"
    assert load_consortium(write("{excluded_steps: preference}")).aggregation.excluded_steps == "preference"
    assert load_consortium(write("{kind: fedavg}")).aggregation.excluded_steps == "anchor"
    assert load_consortium(write("{}", "{lambda_sup: 0}")).preference.lambda_sup == 0
    with pytest.raises(ConfigError, match=r"c\.yaml.*excluded_steps"):
        load_consortium(write("{excluded_steps: sometimes}"))


def test_runs_made_before_excluded_steps_keep_their_fingerprint():
    import hashlib

    from fl_server.run_dir import config_hash

    cfg = consortium(aggregation=AggregationConfig(excluded_steps="preference"))  # the rule every earlier run had
    before = to_dict(cfg)  # what config_hash hashed before the option existed
    before.pop("run_dir"), before.pop("quality_judge"), before["aggregation"].pop("excluded_steps")
    before["aggregation"].pop("bound_counts")  # added later too, at the rule before (pairs, still the default)
    assert config_hash(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    # the default since, anchor, behaves differently: a run made before it does not resume under it
    assert config_hash(consortium()) != config_hash(cfg)


def test_ledger_survives_save_and_load(tmp_path):
    ledger = Ledger(rounds_completed=4)
    ledger.record_reliability("a", 4, figures(0.7), AGG)
    ledger.record_problem("b", 4, "failed")
    ledger.save(tmp_path / "ledger.json")
    again = Ledger.load(tmp_path / "ledger.json")
    assert again.to_dict() == ledger.to_dict()
    assert json.loads((tmp_path / "ledger.json").read_text())["sites"]["b"]["failures"] == 1


def state(value=0.0):
    return {"w": torch.full((2, 3), value), "b": torch.full((3,), value), "n": torch.tensor(7)}


@pytest.mark.parametrize("update, problem", [
    ({"w": torch.zeros(2, 3), "n": torch.tensor(7)}, "missing weight 'b'"),
    ({**state(), "extra": torch.zeros(1)}, "unexpected weight 'extra'"),
    ({**state(), "w": torch.zeros(3, 2)}, "has shape (3, 2), expected (2, 3)"),
    ({**state(), "b": torch.tensor([0.0, float("nan"), 0.0])}, "NaN or Inf"),
    ({**state(), "b": torch.tensor([0.0, float("inf"), 0.0])}, "NaN or Inf"),
])
def test_bad_updates_are_named(update, problem):
    assert problem in update_problem(update, state())


def test_good_update_passes_and_norm_is_l2_of_the_change():
    assert update_problem(state(1.0), state()) is None
    assert update_norm(state(1.0), state()) == pytest.approx(3.0)  # sqrt(6 + 3) ones


def test_norm_outliers_need_three_sites_and_a_large_factor():
    assert norm_outliers({"a": 1.0, "b": 100.0}, 5.0) == set()
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 100.0}, 5.0) == {"c"}
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 4.0}, 5.0) == set()


def test_weighted_average_keeps_dtypes_and_weights():
    avg = weighted_average([state(0.0), state(3.0)], [1.0, 2.0])
    assert torch.allclose(avg["w"], torch.full((2, 3), 2.0))
    assert avg["w"].dtype == torch.float32 and avg["n"].dtype == torch.int64 and int(avg["n"]) == 7
    with pytest.raises(ValueError, match="sum to zero"):
        weighted_average([state()], [0.0])


def consortium(**kw) -> ConsortiumConfig:
    from pathlib import Path

    return ConsortiumConfig(name="t", run_dir=Path("/tmp/unused"), sites=(Path("a.yaml"),), **kw)


def test_a_site_that_never_replies_is_failed_and_the_round_goes_on():
    strategy = ConsortiumStrategy(consortium(), Ledger())
    strategy.node_sites = {11: "slow", 12: "fast"}
    # only the destination of a sent message matters here (a real Message needs a running Flower run)
    sent = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)) for node in (11, 12)]
    outcomes = strategy.collect(1, "supervised", sent, [], state())
    assert outcomes["slow"].status == "failed" and "no reply within" in outcomes["slow"].reason
    assert strategy.ledger.site("slow").failures == 1


def good_half_bad(strategy) -> dict:
    """Three sites of 10 pairs each whose judges measured pair accuracy 1, 0.75 and 0 (factors 1,
    0.5 and excluded), with updates at 1, 4 and 100."""
    for name, accuracy in (("good", 1.0), ("half", 0.75), ("bad", 0.0)):
        strategy.ledger.record_reliability(name, 2, figures(accuracy), AGG)
    return {name: SiteOutcome(name, train={"num-examples": 10.0}, state=state(value))
            for name, value in (("good", 1.0), ("half", 4.0), ("bad", 100.0))}


def test_reliability_weighting_and_exclusion():
    strategy = ConsortiumStrategy(consortium(aggregation=AggregationConfig(damped=False, statistic="ema_point")), Ledger())
    outcomes = good_half_bad(strategy)
    new_state, changed = strategy.aggregate("preference", outcomes, state())
    assert changed
    assert outcomes["bad"].status == "excluded" and outcomes["bad"].weight == 0.0
    assert outcomes["good"].weight == pytest.approx(2 / 3) and outcomes["half"].weight == pytest.approx(1 / 3)
    assert torch.allclose(new_state["w"], torch.full((2, 3), 2.0))  # (2*1 + 1*4) / 3


def test_damped_reliability_keeps_the_lost_weight_on_the_global_model():
    strategy = ConsortiumStrategy(consortium(aggregation=AggregationConfig(damped=True, statistic="ema_point")), Ledger())
    outcomes = good_half_bad(strategy)
    new_state, changed = strategy.aggregate("preference", outcomes, state(0.0))
    assert changed and outcomes["bad"].status == "excluded"
    # factors 1, 0.5, 0 on 10 pairs each: good 10/30, half 5/30, the global model the other 15/30
    assert [outcomes[s].weight for s in ("good", "half", "bad")] == pytest.approx([1 / 3, 1 / 6, 0.0])
    assert torch.allclose(new_state["w"], torch.full((2, 3), 1.0))  # (10*1 + 5*4 + 15*0) / 30
    # one weak site left among excluded ones takes a small step, not the whole update
    strategy.ledger.record_reliability("good", 3, figures(0.0), AGG)
    strategy.ledger.record_reliability("good", 4, figures(0.0), AGG)
    lone = {"good": SiteOutcome("good", train={"num-examples": 10.0}, state=state(9.0)),
            "half": SiteOutcome("half", train={"num-examples": 10.0}, state=state(9.0)),
            "bad": SiteOutcome("bad", train={"num-examples": 10.0}, state=state(9.0))}
    new_state, changed = strategy.aggregate("preference", lone, state(0.0))
    assert changed and lone["good"].status == lone["bad"].status == "excluded"
    assert torch.allclose(new_state["w"], torch.full((2, 3), 1.5))  # 9 * (10*0.5 / 30)


def test_plain_fedavg_ignores_reliability():
    strategy = ConsortiumStrategy(consortium(aggregation=AggregationConfig(kind="fedavg", statistic="ema_point")), Ledger())
    strategy.ledger.record_reliability("bad", 2, figures(0.0), AGG)
    outcomes = {"bad": SiteOutcome("bad", train={"num-examples": 5.0}, state=state(2.0)),
                "ok": SiteOutcome("ok", train={"num-examples": 15.0}, state=state(6.0))}
    new_state, _ = strategy.aggregate("preference", outcomes, state())
    assert torch.allclose(new_state["w"], torch.full((2, 3), 5.0))


def test_too_few_sites_leave_the_global_model_unchanged():
    from shared.config import FederationConfig

    strategy = ConsortiumStrategy(consortium(federation=FederationConfig(min_sites=2)), Ledger())
    outcomes = {"a": SiteOutcome("a", train={"num-examples": 5.0}, state=state(9.0)),
                "b": SiteOutcome("b", "failed", "client error")}
    before = state()
    new_state, changed = strategy.aggregate("supervised", outcomes, before)
    assert not changed and new_state is before


# ----------------------------------------------------------------------------- the weighing policy
# (shared.aggregation.site_weights: a pure function; expected shares derived by hand)

@pytest.mark.parametrize("reliability, damped, expected_sites, expected_kept", [
    # judged a: 10 pairs x g 0.5 = 5; anchor-only b: 20 images, no judge factor; excluded c: 0
    (True, False, {"a": 5 / 25, "b": 20 / 25, "c": 0.0}, 0.0),
    # damped: the judged updates' lost weight (a: 5, c: 10) stays on the global model: 40 in all
    (True, True, {"a": 5 / 40, "b": 20 / 40, "c": 0.0}, 15 / 40),
    # no reliability (supervised round, kind fedavg): examples only, nobody excluded
    (False, True, {"a": 10 / 40, "b": 20 / 40, "c": 10 / 40}, 0.0),
])
def test_site_weights(reliability, damped, expected_sites, expected_kept):
    from shared.aggregation import Contribution, site_weights

    weights = site_weights({
        "a": Contribution(10.0, judged=True, judge_factor=0.5),
        "b": Contribution(20.0, judged=False, judge_factor=0.1),
        "c": Contribution(10.0, judged=True, judge_factor=0.9, excluded=True),
    }, reliability, damped)
    assert weights.sites == pytest.approx(expected_sites)
    assert weights.kept == pytest.approx(expected_kept)
    assert weights.total == pytest.approx(1.0)
    assert weights.excluded == ({"c"} if reliability else set())


def test_site_weights_all_zero_is_nothing_to_aggregate():
    from shared.aggregation import Contribution, site_weights

    weights = site_weights({"a": Contribution(10.0, judged=True, judge_factor=0.0)}, True, True)
    assert weights.total == 0.0 and weights.sites == {"a": 0.0}


def test_anchor_only_updates_are_weighed_without_the_judge_factor():
    """A gated site (or the method-none control) took anchor-only steps: its judge steered nothing,
    so neither its factor nor its exclusion damps it; a judged site beside it still is damped."""
    strategy = ConsortiumStrategy(consortium(aggregation=AggregationConfig(damped=True, statistic="ema_point")), Ledger())
    strategy.ledger.record_reliability("gated", 2, figures(0.0), AGG)
    strategy.ledger.record_reliability("gated", 3, figures(0.0), AGG)  # excluded judge
    strategy.ledger.record_reliability("judged", 2, figures(0.75), AGG)  # g = 0.5
    outcomes = {"gated": SiteOutcome("gated", train={"num-examples": 10.0, "pairs_used": 0.0, "gated": 1.0},
                                     state=state(3.0)),
                "judged": SiteOutcome("judged", train={"num-examples": 10.0, "pairs_used": 10.0}, state=state(6.0))}
    new_state, changed = strategy.aggregate("preference", outcomes, state(0.0))
    assert changed and outcomes["gated"].status == "ok"
    # gated 10, judged 10 x 0.5 = 5, kept on the global model 5: (10*3 + 5*6 + 5*0) / 20
    assert [outcomes[s].weight for s in ("gated", "judged")] == pytest.approx([0.5, 0.25])
    assert torch.allclose(new_state["w"], torch.full((2, 3), 3.0))


def fake_reply(node: int, site: str, value: float):
    """A train reply as collect reads it (a real Message needs a running Flower run)."""
    content = {"site": {"name": site}, "metrics": {"num-examples": 10.0},
               "arrays": SimpleNamespace(to_torch_state_dict=lambda: state(value))}
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=content)


def test_an_update_from_a_site_revoked_during_the_round_is_discarded(tmp_path):
    from fl_server.federation import _metric_lines
    from fl_server.report import round_table

    strategy = ConsortiumStrategy(consortium(), Ledger(), revoked_file=tmp_path / "revoked_sites.json")
    sent = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node)) for node in (11, 12)]
    # the reply left the site before `fl-server revoke`; the server collects it after
    strategy.revoked_file.write_text(json.dumps({"gone": "ecdsa-sha2-nistp384 AAAA", "stranger": "x"}))
    outcomes = strategy.collect(1, "supervised", sent, [fake_reply(11, "honest", 1.0), fake_reply(12, "gone", 50.0)],
                                state())
    assert outcomes["gone"].status == "revoked" and outcomes["gone"].state is None
    assert "update was discarded" in outcomes["gone"].reason and "stranger" not in outcomes
    new_state, changed = strategy.aggregate("supervised", outcomes, state())
    assert changed and torch.allclose(new_state["w"], torch.full((2, 3), 1.0))  # the honest site only
    assert outcomes["gone"].weight == 0.0 and strategy.ledger.site("gone").revoked == 1

    # next round its node is gone (unregistered): it keeps a row, status revoked
    later = strategy.collect(2, "supervised", sent[:1], [fake_reply(11, "honest", 2.0)], state())
    assert later["gone"].status == "revoked" and later["honest"].status == "ok"
    lines = _metric_lines(2, "supervised", later, strategy.ledger, True, 1.0)
    table = round_table(lines)
    assert any(row.split()[:3] == ["gone", "supervised", "revoked"] for row in table.splitlines())
    assert "1 ok/0 failed/1 revoked" in table


def test_a_site_readmitted_with_a_new_key_is_no_longer_revoked(tmp_path):
    """The way back in (README): fl-client keygen --force, then fl-server add-site."""
    from fl_server import operator as op
    from fl_server.federation import read_revoked
    from shared.config import ConfigError
    from shared.site_keys import write_key_pair

    yaml_file = tmp_path / "consortium.yaml"
    yaml_file.write_text(f"name: Demo\nrun_dir: {tmp_path / 'run'}\nserver: {{sites: [s1], hosts: [127.0.0.1]}}\n")
    op.provision_consortium(yaml_file, tmp_path / "prov")
    paths = op.OperatorPaths.of(tmp_path / "prov")
    said = []
    _, pub, old_line = write_key_pair(tmp_path / "site" / "s1_auth")
    old_pub = tmp_path / "old.pub"
    old_pub.write_bytes(old_line)
    op.add_site(yaml_file, tmp_path / "prov", "s1", old_pub, say=said.append)
    op.revoke_site("s1", paths, say=said.append)
    revoked_file = paths.flwr_home / op.REVOKED_FILE
    strategy = ConsortiumStrategy(consortium(), Ledger(), revoked_file=revoked_file)
    sent = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=11))]
    assert read_revoked(revoked_file) == {"s1"}
    assert strategy.collect(1, "supervised", sent, [fake_reply(11, "s1", 1.0)], state())["s1"].status == "revoked"

    _, new_pub, _ = write_key_pair(tmp_path / "site" / "s1_auth", force=True)
    with pytest.raises(ConfigError, match="s1' was revoked"):
        op.add_site(yaml_file, tmp_path / "prov", "s1", old_pub, say=said.append)
    op.add_site(yaml_file, tmp_path / "prov", "s1", new_pub, say=said.append)
    assert read_revoked(revoked_file) == set()
    later = strategy.collect(2, "supervised", sent, [fake_reply(11, "s1", 2.0)], state())
    assert later["s1"].status == "ok" and strategy.ledger.site("s1").revoked == 0
    assert op.registration_plan(paths, "run-x") == [("s1", "register")]
    # revoked again: both keys stay revoked
    op.revoke_site("s1", paths, say=said.append)
    assert read_revoked(revoked_file) == {"s1"} and len(op._revoked(paths)["s1"]) == 2


def test_superlink_refusals_are_one_line_each_naming_the_site():
    """Lines as Flower 1.42's SuperLink wrote them (provoked on loopback)."""
    from cryptography.hazmat.primitives import serialization

    from fl_server.refusals import RefusalReader
    from shared.site_keys import make_site_key

    private, public = make_site_key()
    pem = serialization.load_ssh_private_key(private, None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    activate = ("\x1b[91mERROR \x1b[0m:     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode "
                f"with public key: b'{pem.replace(chr(10), chr(92) + 'n')}', exception: No SuperNode found with the "
                "given public key.")
    access = '2026-11-30T18:54:55.861Z INFO [uvicorn.access] 10.0.0.9:35242 - "POST /v1/fleet/activate-node HTTP/1.1" 412'
    for keys, expected in (({}, "refused: unregistered SuperNode key"),
                           ({public.decode().strip(): ("gone", True)}, "refused: revoked key of site gone from 10.0.0.9")):
        reader = RefusalReader(lambda: keys)
        assert reader.feed(activate) is None
        assert reader.feed(access).startswith(expected)
    # a registered key whose node is still counted online (a restart within two heartbeats)
    held = activate.replace("No SuperNode found with the given public key.",
                            "SuperNode with node ID 9987046455811028928 could not be activated.")
    reader = RefusalReader(lambda: {public.decode().strip(): ("lyon", False)})
    assert reader.feed(held) is None
    assert reader.feed(access).startswith("refused: site lyon reconnected while this SuperLink still counts its "
                                          "previous connection as online")
    dropped = '... INFO [uvicorn.access] 127.0.0.1:41932 - "POST /v1/fleet/pull-messages HTTP/1.1" 401'
    assert "unregistered while it was connected" in RefusalReader(dict).feed(dropped)
    assert RefusalReader(dict).feed(dropped.replace("pull-messages", "deactivate-node")) is None
    assert RefusalReader(dict).feed(dropped.replace("401", "200")) is None


# ----------------------------------------------------------------------------- the Wilson ledger and the outcome check

WILSON = AggregationConfig(ema=0.5, probation_below=0.65, exclude_below=0.55)  # statistic: wilson


def informative(acc, n, **extra):
    return {"pair_accuracy": acc, "spearman": 0.3, "pair_gain": 0.1, "n_pairs": 9,
            "informative_pairs": n, "informative_pair_accuracy": acc, **extra}


def test_pooled_counts_decay_like_the_ema():
    # C <- c + 0.5 C, N <- n + 0.5 N
    assert pooled_counts(8.0, 10.0, 4.0, 10.0, 0.5) == (8.0, 15.0)
    assert pooled_counts(0.0, 0.0, 8.0, 10.0, 0.5) == (8.0, 10.0)


def test_the_wilson_ledger_acts_on_evidence_not_on_the_point_estimate():
    ledger = Ledger()
    # 8 of 10 informative pairs right, every round: the estimate is 0.8 throughout
    ledger.record_reliability("few", 1, informative(0.8, 10), WILSON)  # (8, 10): bound 0.4902
    assert ledger.site("few").state == EXCLUDED and ledger.factor("few") == 0.0
    ledger.record_reliability("few", 2, informative(0.8, 10), WILSON)  # (12, 15): bound 0.5481
    assert ledger.site("few").bound() == pytest.approx(0.5481, abs=1e-4) and ledger.site("few").state == EXCLUDED
    ledger.record_reliability("few", 3, informative(0.8, 10), WILSON)  # (14, 17.5): bound 0.5679
    assert ledger.site("few").estimate() == pytest.approx(0.8) and ledger.site("few").state == PROBATION
    assert ledger.factor("few") == pytest.approx((0.5679 - 0.5) / 0.5, abs=1e-3)
    # the same accuracy on 100 pairs: (80, 100), bound 0.7112: trusted at once
    ledger.record_reliability("many", 1, informative(0.8, 100), WILSON)
    assert ledger.site("many").state == TRUSTED
    assert ledger.factor("many") == pytest.approx((0.7112 - 0.5) / 0.5, abs=1e-3)
    history = ledger.site("many").history[-1]
    assert history["bound"] == pytest.approx(0.7112, abs=1e-4) and history["informative_pairs"] == 100


def test_under_bound_counts_units_the_ledger_counts_images_not_pairs():
    units = dataclasses.replace(WILSON, bound_counts="units")
    ledger = Ledger()
    # 100 pairs right 80 % of the time, from 10 images: 10 trials, (8, 10): bound 0.4902
    ledger.record_reliability("images", 1, informative(0.8, 100, informative_units=10), units)
    assert ledger.site("images").pooled == {"correct": pytest.approx(8.0), "pairs": 10.0}
    assert ledger.site("images").bound() == pytest.approx(0.4902, abs=1e-4) and ledger.site("images").state == EXCLUDED
    history = ledger.site("images").history[-1]
    assert history["informative_pairs"] == 100 and history["informative_units"] == 10 and history["evidence"] == 10.0
    # a reply without the figure (a site of an earlier version) counts its pairs: (80, 100), bound 0.7112
    ledger.record_reliability("old", 1, informative(0.8, 100), units)
    assert ledger.site("old").bound() == pytest.approx(0.7112, abs=1e-4)
    # a site cannot claim more units than pairs
    ledger.record_reliability("boast", 1, informative(0.8, 10, informative_units=1000), units)
    assert ledger.site("boast").pooled["pairs"] == 10.0
    # the default, `bound_counts: pairs`: every informative pair a trial, whatever the units
    ledger.record_reliability("default", 1, informative(0.8, 100, informative_units=10), WILSON)
    assert WILSON.bound_counts == "pairs"
    assert ledger.site("default").bound() == pytest.approx(0.7112, abs=1e-4) and ledger.site("default").state == TRUSTED


def test_a_round_without_informative_pairs_leaves_the_bound_and_state_alone():
    ledger = Ledger()
    ledger.record_reliability("a", 1, informative(1.0, 100), WILSON)
    before = (ledger.site("a").pooled, ledger.site("a").state)
    ledger.record_reliability("a", 2, informative(0.0, 0), WILSON)
    assert (ledger.site("a").pooled, ledger.site("a").state) == before
    assert Ledger().factor("nobody") == 0.0  # no evidence yet: no weight


def test_probation_settings_do_not_change_what_is_measured():
    base = PreferenceConfig()
    on_probation = dataclasses.replace(base, mining=dataclasses.replace(base.mining, strategy="skip_top"))
    assert calibration_settings(WILSON, base) == {"informative_gap": 0.05, "mining": to_dict(base.mining)}
    # a site on probation trains with skip_top but is measured with the consortium's mining
    strategy = ConsortiumStrategy(consortium(aggregation=WILSON, preference=base), Ledger())
    config = strategy.round_config(2, "preference", on_probation)
    assert json.loads(config["preference"])["mining"]["strategy"] == "skip_top"
    assert json.loads(config["calibration"])["mining"] == to_dict(base.mining)
    # the earlier rule measured with the settings sent
    assert calibration_settings(AggregationConfig(statistic="ema_point"), base)["mining"] is None


@pytest.mark.parametrize("streak, gain, margin, expected", [
    (0, -0.02, 0.01, 1),    # lowered calibration Dice by 0.02 > 0.01: harmful
    (1, -0.02, 0.01, 2),
    (2, -0.005, 0.01, 0),   # within the margin: harmless, the count restarts
    (1, 0.03, 0.01, 0),
    (1, None, 0.01, 1),     # no judged update: no evidence
    (1, -0.5, None, 1),     # the check is off
])
def test_harm_streak_by_hand(streak, gain, margin, expected):
    assert harm_streak(streak, gain, margin) == expected


def test_outcome_evidence_needs_a_judged_update():
    assert outcome_evidence({"outcome_gain": -0.1, "pairs_used": 9}) == -0.1
    assert outcome_evidence({"outcome_gain": -0.1, "pairs_used": 0}) is None  # nothing judged
    assert outcome_evidence({"outcome_gain": -0.1, "pairs_used": 9, "gated": 1.0}) is None  # anchor-only
    assert outcome_evidence({"pairs_used": 9}) is None  # withheld (too few images) or an older site


def test_a_judge_that_ranks_well_but_hurts_is_excluded_by_its_outcome():
    ledger = Ledger()
    hurt = informative(1.0, 100, outcome_gain=-0.03, pairs_used=9)
    ledger.record_reliability("a", 1, hurt, WILSON)  # 1 harmful round of 2
    assert ledger.site("a").state == TRUSTED and ledger.site("a").harm_streak == 1
    ledger.record_reliability("a", 2, hurt, WILSON)  # 2 in a row: excluded whatever the bound
    assert ledger.site("a").state == EXCLUDED and ledger.factor("a") == 0.0
    assert "lowered calibration Dice by more than 0.01 in 2 rounds" in exclusion_reason(ledger.site("a"), WILSON)
    ledger.record_reliability("a", 3, informative(1.0, 100, outcome_gain=0.0, pairs_used=9), WILSON)
    assert ledger.site("a").state == TRUSTED and ledger.site("a").harm_streak == 0  # its update did no harm: back
    off = dataclasses.replace(WILSON, outcome_margin=None)
    quiet = Ledger()
    for r in (1, 2, 3):
        quiet.record_reliability("a", r, hurt, off)
    assert quiet.site("a").state == TRUSTED


def test_a_site_the_outcome_check_excluded_stays_excluded_on_anchor_steps():
    """Anchor-only rounds carry no outcome evidence about the judge: the harm streak stands."""
    ledger = Ledger()
    hurt = informative(1.0, 100, outcome_gain=-0.03, pairs_used=9)
    for r in (1, 2):
        ledger.record_reliability("a", r, hurt, WILSON)
    assert ledger.site("a").state == EXCLUDED
    anchor_round = informative(1.0, 100, outcome_gain=0.05, pairs_used=0)  # what method none reports
    ledger.record_reliability("a", 3, anchor_round, WILSON)
    assert ledger.site("a").state == EXCLUDED and ledger.site("a").harm_streak == 2
    assert ledger.settings_for("a", PreferenceConfig(), "anchor").method == "none"


def test_a_failure_reason_is_read_from_the_simulation_engines_wrapper():
    from fl_server.federation import _failure

    wrapped = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'site 'shenzhen_a': data'>"
    assert _failure(wrapped) == ("shenzhen_a", "data")
    assert _failure("site 'a': data (see site log, id 1f2e3d4c)") == ("a", "data (see site log, id 1f2e3d4c)")
