"""The consortium's round loop on Flower's Grid: phases, ledger, checks, checkpoints.

`ConsortiumStrategy` is a plain class, not a Flower Strategy: it builds each round's messages
(each site gets its own preference settings chosen from the ledger), checks every update before it
is averaged, and hands the weighing to `shared.aggregation` (DESIGN.md section 4: pairs_used x
g(judge reliability), the weight weak judges lose staying on the current global model). The loop in
`run_federation` drives supervised then preference rounds on Flower's Grid, evaluates every round,
and writes metrics, ledger and a checkpoint after each, so `resume=True` continues a stopped run.
The evaluation's calibration Dice selects the best round (best.pt) and can roll a round back
(`shared.selection` decides; this loop stores and applies it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared.aggregation import (Contribution, combine, norm_outliers, site_weights, update_norm, update_problem,
                                weighted_average)
from shared.config import AggregationConfig, ConsortiumConfig, PreferenceConfig, to_dict
from shared.ledger import EXCLUDED, Ledger
from shared.model import load_state
from shared.selection import Selection, consortium_dice, select
from shared.site_keys import revoked_keys
from fl_server.run_dir import RunDir, config_hash

log = logging.getLogger(__name__)


@dataclass
class SiteOutcome:
    """What the server learned about one site in one round."""

    site: str
    status: str = "ok"  # ok | failed | rejected | excluded | revoked (key revoked by the operator)
    reason: str = ""
    train: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    weight: float = 0.0
    state: dict | None = None  # the update, dropped once aggregated
    held: bool = False  # sent anchor-only steps because the ledger excluded its judge (excluded_steps: anchor)


class ConsortiumStrategy:
    """The server's round policy over Flower's Grid: messages out, checked outcomes in, weights."""

    def __init__(self, cfg: ConsortiumConfig, ledger: Ledger, extra_config: dict | None = None,
                 revoked_file: Path | None = None):
        self.min_available_nodes = cfg.federation.min_sites
        self.cfg = cfg
        self.ledger = ledger
        self.extra_config = extra_config or {}
        self.revoked_file = revoked_file  # the operator's revoked_sites.json (fl-server revoke)
        self.node_sites: dict[int, str] = {}  # learned from replies; a reply names its site
        self.held: set[str] = set()  # sites this round's settings hold to anchor-only steps

    def round_config(self, server_round: int, phase: str, preference: PreferenceConfig) -> ConfigRecord:
        return ConfigRecord({
            "phase": phase,
            "server-round": server_round,
            "seed": self.cfg.seed * 100_003 + server_round,
            "model": json.dumps(to_dict(self.cfg.model)),
            "supervised": json.dumps(to_dict(self.cfg.supervised)),
            "preference": json.dumps(to_dict(preference)),
            "calibration": json.dumps(calibration_settings(self.cfg.aggregation, self.cfg.preference)),
            **({"quality_judge": json.dumps(to_dict(self.cfg.quality_judge))} if self.cfg.quality_judge else {}),
            **self.extra_config,
        })

    def ready_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes that said which site they are, once at least `min_sites` have
        (waiting up to `round_timeout`). A node the SuperLink lists but that cannot answer is
        asked again, not sent the round: after a restart the SuperLink still counts a stopped
        SuperNode as online until it misses two heartbeats (Flower: 60 s), and its site comes
        back under the same node id."""
        timeout = self.cfg.federation.round_timeout
        deadline = time.time() + timeout
        while True:
            nodes = _wait_for_nodes(grid, self.min_available_nodes, deadline, timeout)
            self.identify(grid, nodes)
            named = [n for n in nodes if n in self.node_sites]
            if len(named) >= self.min_available_nodes:
                return named
            if time.time() > deadline:
                raise TimeoutError(f"only {len(named)} of the required {self.min_available_nodes} sites answered "
                                   f"within {timeout:g} s")
            log.info("waiting for sites: %d answered, %d required", len(named), self.min_available_nodes)
            time.sleep(1)

    def identify(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes we cannot name yet which site they are (after a start, a resume, a join)."""
        unknown = [n for n in nodes if n not in self.node_sites]
        if not unknown:
            return
        config = ConfigRecord({"phase": "identify", **self.extra_config})
        messages = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n)
                    for n in unknown]
        for reply in grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout):
            if reply.has_error():
                site, reason = _failure(reply.error.reason)
                log.warning("a node could not say which site it is (%s): %s", site or "unknown", reason)
                if site:
                    self.node_sites[reply.metadata.src_node_id] = site
            else:
                self.node_sites[reply.metadata.src_node_id] = str(reply.content["site"]["name"])

    def configure_train(self, server_round, arrays, config, grid, reference: ArrayRecord | None = None,
                        judge: ArrayRecord | None = None) -> Iterable[Message]:
        """One message per node; each site gets the settings its ledger state calls for, the
        fixed DPO reference when one is given (`preference.reference: base`), and the consortium's
        quality judge when there is one (scored with at sites whose judge.kind is federated)."""
        phase = str(config["phase"])
        messages = []
        self.held = set()
        # only reliability weighting acts on an exclusion; fedavg, median and krum weigh the update as before
        excluded_steps = self.cfg.aggregation.excluded_steps if self.cfg.aggregation.kind == "reliability" else "preference"
        for node_id in self.ready_nodes(grid):
            site = self.node_sites.get(node_id)
            preference = (self.ledger.settings_for(site, self.cfg.preference, excluded_steps)
                          if site else self.cfg.preference)
            if phase == "preference" and preference.method != self.cfg.preference.method:
                self.held.add(site)
            record = RecordDict({"arrays": arrays, "config": self.round_config(server_round, phase, preference)})
            if reference is not None:
                record["reference"] = reference
            if judge is not None:
                record["judge"] = judge
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node_id))
        return messages

    def collect(self, server_round: int, phase: str, sent: list[Message], replies: Iterable[Message],
                global_state: dict) -> dict[str, SiteOutcome]:
        """Sort replies into accepted updates and failures/rejections, updating the ledger. A
        site whose key the operator revoked (``revoked_file``, read now: a revocation during
        the round counts) gets status ``revoked``: its update is dropped, and it keeps a row."""
        outcomes = self._sort_replies(sent, replies, global_state)
        self._mark_revoked(server_round, outcomes)
        self._reject_outliers(outcomes, global_state)
        for site, outcome in outcomes.items():
            outcome.held = site in self.held
            if outcome.status in ("failed", "rejected", "revoked"):
                log.warning("round %d: %s %s: %s", server_round, site, outcome.status, outcome.reason)
                self.ledger.record_problem(site, server_round, outcome.status)
            elif phase == "preference":
                figures = {k[len("rel_"):]: v for k, v in outcome.train.items() if k.startswith("rel_")}
                figures.update({k: v for k, v in outcome.train.items()
                                if k.startswith("outcome_") or k in ("pairs_used", "gated")})
                self.ledger.record_reliability(site, server_round, figures, self.cfg.aggregation)
        return outcomes

    def train_judge(self, grid: Grid, server_round: int, judge_state: dict,
                    on_line: Callable[[dict], None]) -> tuple[dict, bool]:
        """`quality_judge.rounds` rounds of the consortium's quality judge before preference round
        `server_round` (every site trains it on its labelled split, shared.judge_training); the
        updates are averaged by labelled images. A failed, malformed, outlying or revoked site's
        update is left out; a round with fewer than `min_sites` usable updates leaves the judge
        as it was (one hospital's judge is not the consortium's). Each round's figures go to
        `on_line`. Returns the judge and whether any round changed it."""
        quality = self.cfg.quality_judge
        changed = False
        for judge_round in range(1, quality.rounds + 1):
            config = self.round_config(server_round, "judge", self.cfg.preference)
            config["seed"] = self.cfg.seed * 100_003 + server_round * 101 + judge_round  # new draws each round
            arrays = ArrayRecord(judge_state)
            sent = [Message(RecordDict({"arrays": arrays, "config": config}), message_type=MessageType.TRAIN,
                            dst_node_id=node) for node in self.ready_nodes(grid)]
            replies = grid.send_and_receive(sent, timeout=self.cfg.federation.round_timeout)
            outcomes = self.collect_judge(sent, replies, judge_state)
            usable = sorted(site for site, o in outcomes.items() if o.status == "ok")
            if len(usable) >= self.cfg.federation.min_sites:
                judge_state = weighted_average([outcomes[s].state for s in usable],
                                               [outcomes[s].train["num-examples"] for s in usable])
                changed = True
            else:
                log.warning("round %d, judge round %d: %d of the required %d sites trained the quality judge: "
                            "it is unchanged", server_round, judge_round, len(usable), self.cfg.federation.min_sites)
            on_line(judge_metric_line(server_round, judge_round, outcomes))
        return judge_state, changed

    def collect_judge(self, sent: list[Message], replies: Iterable[Message], judge_state: dict) -> dict[str, SiteOutcome]:
        """A judge round's replies as outcomes: ok (with the update), failed, rejected or revoked; an
        update is weighed by its labelled count, which must be a positive number."""
        outcomes = self._sort_replies(sent, replies, judge_state)
        for site in read_revoked(self.revoked_file) & set(outcomes):
            outcomes[site] = SiteOutcome(site, "revoked", "key revoked by the operator (fl-server revoke)")
        for outcome in outcomes.values():
            examples = outcome.train.get("num-examples", 0.0)
            if outcome.status == "ok" and not (math.isfinite(examples) and examples > 0):
                outcome.status, outcome.state = "rejected", None
                outcome.reason = f"num-examples {examples:g} is not a positive count"
        self._reject_outliers(outcomes, judge_state)
        for site, outcome in outcomes.items():
            if outcome.status != "ok":
                log.warning("quality judge: %s %s: %s", site, outcome.status, outcome.reason)
        return outcomes

    def _sort_replies(self, sent: list[Message], replies: Iterable[Message], reference: dict) -> dict[str, SiteOutcome]:
        """Each reply as an outcome, by site: ok (with its update), rejected (wrong shapes, NaN/Inf
        against `reference`) or failed (an error, or no reply within round_timeout)."""
        outcomes: dict[str, SiteOutcome] = {}
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                site, reason = _failure(reply.error.reason)
                site = site or self.node_sites.get(node, f"node-{node}")
                self.node_sites.setdefault(node, site)
                outcomes[site] = SiteOutcome(site, "failed", reason)
                continue
            site = str(reply.content["site"]["name"])
            self.node_sites[node] = site
            train = {k: float(v) for k, v in reply.content["metrics"].items()}
            state = reply.content["arrays"].to_torch_state_dict()
            problem = update_problem(state, reference)
            outcomes[site] = (SiteOutcome(site, "rejected", problem, train) if problem
                              else SiteOutcome(site, "ok", train=train, state=state))
        for message in sent:
            node = message.metadata.dst_node_id
            if node not in answered:  # a site that answered from another node (a new key) keeps its reply
                site = self.node_sites.get(node, f"node-{node}")
                outcomes.setdefault(site, SiteOutcome(site, "failed", f"no reply within {self.cfg.federation.round_timeout:g} s"))
        return outcomes

    def _reject_outliers(self, outcomes: dict[str, SiteOutcome], reference: dict) -> None:
        """Reject the accepted updates whose norm (distance to `reference`) is an outlier."""
        accepted = {s: o for s, o in outcomes.items() if o.status == "ok"}
        norms = {s: update_norm(o.state, reference) for s, o in accepted.items()}
        for site in norm_outliers(norms, self.cfg.aggregation.norm_outlier_factor):
            outcomes[site].status, outcomes[site].state = "rejected", None
            outcomes[site].reason = f"update norm {norms[site]:.3g} is an outlier (median {sorted(norms.values())[len(norms) // 2]:.3g})"

    def _mark_revoked(self, server_round: int, outcomes: dict[str, SiteOutcome]) -> None:
        """Status ``revoked`` (no update, weight 0) for every revoked site this run knows: one
        that replied (its update is discarded), and one gone since its revocation."""
        revoked = read_revoked(self.revoked_file)
        for site, record in self.ledger.sites.items():
            if record.revoked and site not in revoked:
                record.revoked = 0  # re-admitted with a new key (fl-server add-site)
        known = set(self.node_sites.values()) | set(self.ledger.sites) | set(outcomes)
        for site in sorted(revoked & known):
            old = outcomes.get(site)
            outcomes[site] = SiteOutcome(site, "revoked", "key revoked by the operator (fl-server revoke)"
                                         + ("; its update was discarded" if old and old.state is not None else ""),
                                         train=old.train if old else {})

    def aggregate(self, phase: str, outcomes: dict[str, SiteOutcome], global_state: dict) -> tuple[dict, bool]:
        """The new global weights, and whether they changed this round (`aggregation.site_weights`
        and `aggregation.combine` decide; this only reads the ledger and records the weights)."""
        accepted = sorted((s for s, o in outcomes.items() if o.status == "ok"))
        agg = self.cfg.aggregation
        preference = phase == "preference"
        contributions = {site: Contribution(
            examples=outcomes[site].train.get("num-examples", 0.0),
            judged=preference and outcomes[site].train.get("pairs_used", 1.0) > 0,
            judge_factor=self.ledger.factor(site, agg.statistic),
            excluded=self.ledger.site(site).state == EXCLUDED,
        ) for site in accepted}
        weights = site_weights(contributions, reliability=preference and agg.kind == "reliability",
                               damped=agg.damped)
        for site in accepted:
            outcomes[site].weight = weights.sites[site]
        for site in weights.excluded:
            outcomes[site].status = "excluded"
            outcomes[site].reason = exclusion_reason(self.ledger.site(site), agg)
        if len(accepted) < self.cfg.federation.min_sites:
            log.warning("only %d of the required %d sites replied usefully: global model unchanged",
                        len(accepted), self.cfg.federation.min_sites)
            return global_state, False
        if weights.total <= 0:
            log.warning("every aggregation weight is zero this round: global model unchanged")
            return global_state, False
        kind = agg.kind if preference and agg.kind in ("median", "krum") else "weighted"
        state, shares = combine(kind, {s: outcomes[s].state for s in accepted}, weights, global_state,
                                agg.krum_byzantine)
        for site in accepted:
            outcomes[site].weight = shares[site]
        return state, True


def judge_metric_line(server_round: int, judge_round: int, outcomes: dict[str, SiteOutcome]) -> dict:
    """metrics.jsonl's line for one judge round: each site's status, loss and labelled images."""
    sites = {site: {"status": o.status, **({"reason": o.reason} if o.reason else {}),
                    **{k: o.train[k] for k in ("judge_loss", "num-examples") if k in o.train}}
             for site, o in sorted(outcomes.items())}
    return {"kind": "judge", "round": server_round, "judge_round": judge_round, "sites": sites,
            "mean_loss": _mean([o.train.get("judge_loss") for o in outcomes.values() if o.status == "ok"])}


def judge_due(cfg: ConsortiumConfig, server_round: int, trained: bool) -> bool:
    """Whether the consortium's quality judge is (re)trained before round `server_round`: before
    the first preference round it meets untrained (also after a resume), then every
    `refresh_every` preference rounds."""
    quality = cfg.quality_judge
    preference_round = server_round - cfg.supervised.rounds
    if quality is None or preference_round < 1:
        return False
    if not trained:
        return True
    return quality.refresh_every > 0 and preference_round > 1 and (preference_round - 1) % quality.refresh_every == 0


def calibration_settings(agg: AggregationConfig, preference: PreferenceConfig) -> dict:
    """What a site measures its judge with, whatever its ledger state: the informative gap and, under
    the wilson statistic, the consortium's base mining (probation changes what a site trains on,
    not what is measured; `ema_point` keeps the earlier behaviour: calibration mined as trained)."""
    return {"informative_gap": agg.informative_gap,
            "mining": to_dict(preference.mining) if agg.statistic == "wilson" else None}


def exclusion_reason(record, agg: AggregationConfig) -> str:
    """One line saying why the ledger excludes a site: its harmful outcomes, or its judge figure."""
    if agg.statistic == "ema_point":
        return (f"judge excluded by the ledger: EMA pair accuracy {record.ema.get('pair_accuracy', float('nan')):.2f} "
                f"< exclude_below {agg.exclude_below:g}")
    if agg.outcome_margin is not None and record.harm_streak >= agg.outcome_rounds:
        return (f"judge excluded by the ledger: its updates lowered calibration Dice by more than "
                f"{agg.outcome_margin:g} in {record.harm_streak} rounds in a row")
    bound = record.bound()
    return (f"judge excluded by the ledger: Wilson bound of informative-pair accuracy "
            f"{float('nan') if bound is None else bound:.2f} < exclude_below {agg.exclude_below:g}")


def run_federation(
    grid: Grid,
    cfg: ConsortiumConfig,
    run_dir: Path,
    resume: bool = False,
    extra_config: dict | None = None,
    on_round: Callable[[list[dict]], None] | None = None,
    stop_after: int | None = None,
    revoked_file: Path | None = None,
    sites: list | None = None,
) -> Path:
    """Run (or resume) the consortium's rounds; returns the run directory. `sites`: the resolved
    site configs to record in config.yaml (a simulation knows them; a deployed server does not)."""
    from shared.checkpoints import initial_model

    from shared.judge_training import initial_judge_state

    run = RunDir(run_dir)
    cfg_hash = config_hash(cfg)
    judge_state = None  # the consortium's quality judge, once trained (cfg.quality_judge)
    if resume and run.latest_checkpoint() is not None:
        done, state, ledger = run.resume(cfg_hash)
        selection, state = run.resume_selection(done, state)
        judge_state = run.judge_state(done)
        log.info("resuming %s after round %d", run_dir, done)
    else:
        run.start(cfg, sites)
        ledger, done, selection = Ledger(), 0, Selection()
        torch.manual_seed(cfg.seed)
        model = initial_model(cfg)  # backbone weights, base_checkpoint: each checked against the network
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    strategy = ConsortiumStrategy(cfg, ledger, extra_config, revoked_file)  # read in every collect
    total = cfg.supervised.rounds + cfg.preference.rounds
    last = total if stop_after is None else min(total, stop_after)
    reference = None  # the fixed DPO reference under `preference.reference: base`, set at first use
    for server_round in range(done + 1, last + 1):
        phase = "supervised" if server_round <= cfg.supervised.rounds else "preference"
        started = time.time()
        arrays = ArrayRecord(state)
        if phase == "preference" and cfg.preference.reference == "base" and reference is None:
            reference = ArrayRecord(_preference_base(run, cfg, state, server_round))
        judge_lines: list[dict] = []
        changed = False
        if judge_due(cfg, server_round, trained=judge_state is not None):
            start = judge_state if judge_state is not None else initial_judge_state(cfg.model.in_channels,
                                                                                    cfg.quality_judge.seed)
            trained, changed = strategy.train_judge(grid, server_round, start,
                                                    lambda line: (run.append(line), judge_lines.append(line)))
            # an untrained judge is never sent: federated sites then fail as a config problem, and
            # the next round tries again
            judge_state = trained if changed else judge_state
        judge = ArrayRecord(judge_state) if phase == "preference" and judge_state is not None else None
        sent = list(strategy.configure_train(server_round, arrays, ConfigRecord({"phase": phase}), grid, reference,
                                             judge))
        replies = grid.send_and_receive(sent, timeout=cfg.federation.round_timeout)
        outcomes = strategy.collect(server_round, phase, sent, replies, state)
        state, aggregated = strategy.aggregate(phase, outcomes, state)
        _evaluate(strategy, grid, server_round, ArrayRecord(state), outcomes)
        calib_reports = {site: (o.eval.get("calib_dice"), o.eval.get("calib_images"))
                         for site, o in outcomes.items() if o.status != "revoked"}
        calib_dice, calib_images = consortium_dice(calib_reports.values())
        selection = select(selection, server_round, phase, calib_dice, cfg.selection, calib_reports)
        lines = _metric_lines(server_round, phase, outcomes, strategy.ledger, aggregated, time.time() - started)
        lines[-1].update(calib_dice=calib_dice, calib_images=calib_images, **_selection_fields(selection))
        if judge_lines:  # the round table's title says the judge was (re)trained
            lines[-1]["quality_judge"] = {"rounds": len(judge_lines), "loss": judge_lines[-1]["mean_loss"],
                                          "sites": sum(s["status"] == "ok" for s in judge_lines[-1]["sites"].values()),
                                          "trained": changed}
        for line in lines:
            run.append(line)
        run.save_round(server_round, state, strategy.ledger, cfg_hash, selection, calib_dice, judge_state)
        if selection.rolled_back:
            log.warning("round %d: consortium calibration Dice %.3f fell more than %g below round %d's %.3f: "
                        "rolled back, the next round starts from round %d", server_round, calib_dice,
                        cfg.selection.rollback_margin, selection.best_round, selection.best_dice, selection.best_round)
            state = run.start_state(server_round)
        if on_round:
            on_round(lines)
    return run.path


def _selection_fields(selection: Selection) -> dict:
    """The global metrics line's view of model selection (fl_server.report marks it)."""
    return {"best_round": selection.best_round, "best_calib_dice": selection.best_dice,
            "rolled_back": selection.rolled_back}


def _preference_base(run: RunDir, cfg: ConsortiumConfig, state: dict, server_round: int) -> dict:
    """The global model the preference phase started from (also after a resume past that point)."""
    if server_round == cfg.supervised.rounds + 1:
        return state
    if cfg.supervised.rounds == 0:
        return load_state(cfg.base_checkpoint)
    return run.start_state(cfg.supervised.rounds)


def _evaluate(strategy: ConsortiumStrategy, grid: Grid, server_round: int, arrays: ArrayRecord,
              outcomes: dict[str, SiteOutcome]) -> None:
    config = strategy.round_config(server_round, "evaluate", strategy.cfg.preference)
    messages = [Message(RecordDict({"arrays": arrays, "config": config}), message_type=MessageType.EVALUATE,
                        dst_node_id=node) for node in grid.get_node_ids()]
    for reply in grid.send_and_receive(messages, timeout=strategy.cfg.federation.round_timeout):
        if reply.has_error():
            log.warning("round %d: evaluation failed at node %d: %s", server_round,
                        reply.metadata.src_node_id, reply.error.reason)
            continue
        site = str(reply.content["site"]["name"])
        strategy.node_sites[reply.metadata.src_node_id] = site
        outcome = outcomes.setdefault(site, SiteOutcome(site, "failed", "did not train this round"))
        outcome.eval = {k: float(v) for k, v in reply.content["metrics"].items() if k != "num-examples"}


def _metric_lines(server_round: int, phase: str, outcomes: dict[str, SiteOutcome], ledger: Ledger,
                  aggregated: bool, duration: float) -> list[dict]:
    lines = []
    for site in sorted(outcomes):
        o = outcomes[site]
        line = {"kind": "site", "round": server_round, "phase": phase, "site": site, "status": o.status,
                "train": o.train, "eval": o.eval, "weight": o.weight,
                "state": ledger.site(site).state}
        if ledger.site(site).bound() is not None:
            line["bound"] = ledger.site(site).bound()  # the pooled Wilson bound the state comes from
        if o.reason:
            line["reason"] = o.reason
        if o.held:
            line["held"] = True  # the server sent it anchor-only steps: its judge is excluded
        lines.append(line)
    evals = [o.eval for o in outcomes.values() if o.eval]
    lines.append({
        "kind": "global", "round": server_round, "phase": phase,
        "mean_dice": _mean([e.get("dice") for e in evals]),
        "mean_hd95": _mean([e.get("hd95") for e in evals]),
        "sites_ok": sum(o.status in ("ok", "excluded") for o in outcomes.values()),
        "sites_failed": sum(o.status in ("failed", "rejected") for o in outcomes.values()),
        "sites_revoked": sum(o.status == "revoked" for o in outcomes.values()),
        "duration_s": round(duration, 2), "aggregated": aggregated,
    })
    return lines


_SITE_FAILURE = re.compile(r"site '([A-Za-z0-9_.-]+|unknown)': ([^\n]*)")


def _failure(reason: str) -> tuple[str | None, str]:
    """(site name, one-line reason) from a failed reply's error text (see client_app.SiteFailure)."""
    found = _SITE_FAILURE.findall(reason or "")
    if not found:
        lines = [line for line in (reason or "").splitlines() if line.strip()]
        return None, lines[-1].strip()[:300] if lines else "client error"
    site, text = found[-1]
    # the simulation engine quotes the exception's text in its own wrapper (`...: data'>`)
    return (None if site == "unknown" else site), text.strip().rstrip("'>\"").strip()[:300]


def read_revoked(path: Path | None, keys_dir: Path | None = None) -> set[str]:
    """Sites whose key on file (``keys_dir``/SITE.pub, default the provisioned folder's
    server/supernode_keys beside server/flwr_home/revoked_sites.json) is one of their revoked
    keys, or that have no key on file: a site re-admitted with a new key (fl-server add-site)
    is no longer revoked. An unreadable file is logged and counts as none revoked rather than
    stopping the run."""
    if path is None or not Path(path).exists():
        return set()
    keys_dir = Path(keys_dir) if keys_dir is not None else Path(path).resolve().parent.parent / "supernode_keys"
    try:
        revoked = revoked_keys(path)
        filed = {site: (keys_dir / f"{site}.pub") for site in revoked}
        return {site for site, keys in revoked.items()
                if not filed[site].exists() or filed[site].read_text().strip() in keys}
    except (OSError, ValueError) as err:
        log.warning("%s: cannot read the revoked sites (%s)", path, err)
        return set()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


def _wait_for_nodes(grid: Grid, minimum: int, deadline: float, timeout: float) -> list[int]:
    """At least `minimum` connected nodes, by `deadline` (time.time(); `timeout` is for the message)."""
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.time() > deadline:
            raise TimeoutError(f"only {len(nodes)} of the required {minimum} sites connected within {timeout:g} s")
        log.info("waiting for sites: %d connected, %d required", len(nodes), minimum)
        time.sleep(1)
    return sorted(nodes)
