"""Experiment grid in simulation: arms x tasks x seeds from one preset YAML, one results table.

    python benchmarks/experiments.py --preset benchmarks/presets/full.yaml [--quick] [--out DIR]
                                     [--report-only] [--dry-run]

For every task (a consortium of sites) and seed the supervised base model is trained once
(`fl-sim` with preference rounds 0; cached under `<out>/bases/`, keyed by everything that decides
it) and its last checkpoint becomes `base_checkpoint` of every arm of that task and seed, so every
arm starts from the same weights, on the same data split. Each arm is then one `fl-sim` run (a
subprocess: a crash or a hang ends that run, not the grid) with its own consortium and site YAMLs
written into its run directory. After a run, the global model of every round is scored directly on
the task's unseen centres (`unseen:` site YAMLs, test-only; never federated sites) with
`shared.evaluation.evaluate`.

An arm whose method is `none` with `lambda_sup: 0` is the untouched base: it is not simulated, its
figures are the base model's at every round.

Outputs in the run directory (`--out`, default the preset's `out`):

    results.md      tables: summary per arm, per-site and unseen-centre Dice/HD95 at the peak and
                    the last round, judge reliability per site; mean +- sample std over seeds
    results.csv     one row per (task, arm): the summary figures
    runs.csv        one row per (task, arm, seed), with the commit that finished the run
    rounds.csv      one row per (task, arm, seed, round): mean Dice, per-site and unseen Dice
    plots/*.png     Dice over rounds per arm (mean over seeds, band +- std), one plot per task
                    and arm group
    <task>/<arm>/seed<k>/   the fl-sim run (metrics.jsonl, ledger, checkpoints, sim.log)

Definitions: *peak* is the preference round with the highest mean test Dice over the training
sites (chosen on the test splits, so it is an optimistic, oracle choice of round); *last* is the
final round ("sustained"); *falls* counts rounds whose mean Dice is lower than the round before
(by more than 1e-4; round 0 is the base). Re-running the same command skips finished runs and
resumes interrupted ones, so a grid can be stopped and continued.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_server.run_dir import ADDED_LATER, OPTIONS_ADDED_LATER as SERVER_OPTIONS_ADDED_LATER  # noqa: E402
from shared.config import ConfigError, load_consortium, load_site, to_dict  # noqa: E402

PRESET_KEYS = {"name", "seeds", "cpus", "out", "tasks", "arm_defaults", "arms", "quick", "timeout_s"}
TASK_KEYS = {"consortium", "sites", "unseen", "image_size", "set", "site_set", "vary_split"}
ARM_KEYS = {"name", "groups", "tasks", "set", "judge", "site_judges", "note", "seeds", "tier"}
FALL_TOLERANCE = 1e-4
CONTROL_ARM, REFERENCE_ARM = "sup_only", "rn_dpo"  # the paired differences of the tables are against these
UPPER_ARM = "all_labelled"  # the control given the unlabelled pool's true masks: label efficiency's 100 %
HEADROOM_KEYS = ("dice_identity", "dice_best", "dice_pick")  # calibration Dice: own mask, best of K, judge's pick


class PresetError(ValueError):
    """A problem in the preset file, phrased `file: key: what is wrong`."""


# ----------------------------------------------------------------------------- the preset


@dataclass
class Task:
    name: str
    consortium: Path
    sites: list[str] | None
    unseen: list[Path]
    image_size: int | None
    set: dict
    site_set: dict
    vary_split: bool = True


@dataclass
class Arm:
    name: str
    groups: list[str]
    tasks: list[str]
    set: dict  # arm_defaults' set with the arm's own merged over it
    judge: dict | None
    site_judges: dict
    note: str = ""
    own_set: dict = field(default_factory=dict)  # the arm's own changes, for the tables
    seeds: list[int] | None = None  # None: every seed of the preset
    tier: int | dict = 0  # run order: lower tiers first, one for all tasks or {task: tier} (see run_order)

    def tier_of(self, task: str) -> int:
        return int(self.tier.get(task, 0)) if isinstance(self.tier, dict) else int(self.tier)

    @property
    def is_untouched_base(self) -> bool:
        pref = self.set.get("preference", {})
        return pref.get("method") == "none" and float(pref.get("lambda_sup", 1.0)) == 0.0


@dataclass
class Preset:
    name: str
    file: Path
    seeds: list[int]
    cpus: int
    out: Path
    tasks: dict[str, Task]
    arms: list[Arm]
    timeout_s: float = 3600.0


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of `base` with `update` merged in, mappings recursively, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_preset(path: Path, quick: bool = False) -> Preset:
    """Read a preset; with `quick`, its `quick:` section is merged over it first (`quick.arms`
    is a list of arm names to keep, not arm definitions)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PresetError(f"{path}: cannot read the preset: {exc}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: expected a mapping at the top level")
    _known(raw, PRESET_KEYS, path, "")
    quick_section = raw.pop("quick", None) or {}
    if quick:
        if not quick_section:
            raise PresetError(f"{path}: quick: --quick needs a quick: section in the preset")
        keep = quick_section.pop("arms", None)
        raw = deep_merge(raw, quick_section)
        if keep is not None:
            names = {a.get("name") for a in raw.get("arms", [])}
            missing = [n for n in keep if n not in names]
            if missing:
                raise PresetError(f"{path}: quick.arms: {missing[0]!r} is not an arm of the preset")
            raw["arms"] = [a for a in raw["arms"] if a.get("name") in keep]
    base_dir = path.resolve().parent
    tasks = {}
    for name, spec in (raw.get("tasks") or {}).items():
        _known(spec, TASK_KEYS, path, f"tasks.{name}")
        if "consortium" not in spec:
            raise PresetError(f"{path}: tasks.{name}.consortium: is required (a consortium YAML)")
        tasks[name] = Task(
            name=name,
            consortium=(base_dir / spec["consortium"]).resolve(),
            sites=spec.get("sites"),
            unseen=[(base_dir / p).resolve() for p in spec.get("unseen") or []],
            image_size=spec.get("image_size"),
            set=spec.get("set") or {},
            site_set=spec.get("site_set") or {},
            vary_split=bool(spec.get("vary_split", True)),
        )
    if not tasks:
        raise PresetError(f"{path}: tasks: list at least one task")
    defaults = raw.get("arm_defaults") or {}
    _known(defaults, {"set", "judge"}, path, "arm_defaults")
    arms, seen = [], set()
    for i, spec in enumerate(raw.get("arms") or []):
        _known(spec, ARM_KEYS, path, f"arms[{i}]")
        name = spec.get("name")
        if not name or name in seen:
            raise PresetError(f"{path}: arms[{i}].name: missing or given twice ({name!r})")
        seen.add(name)
        arm_tasks = spec.get("tasks") or list(tasks)
        unknown = [t for t in arm_tasks if t not in tasks]
        if unknown:
            raise PresetError(f"{path}: arms[{i}].tasks: {unknown[0]!r} is not one of {', '.join(tasks)}")
        groups = spec.get("groups") or ["other"]
        arms.append(Arm(
            name=name,
            groups=[groups] if isinstance(groups, str) else list(groups),
            tasks=arm_tasks,
            set=deep_merge(defaults.get("set") or {}, spec.get("set") or {}),
            judge=spec.get("judge", defaults.get("judge")),
            site_judges=spec.get("site_judges") or {},
            note=spec.get("note", ""),
            own_set=spec.get("set") or {},
            seeds=None if spec.get("seeds") is None else [int(x) for x in spec["seeds"]],
            tier=spec.get("tier", 0),
        ))
    if not arms:
        raise PresetError(f"{path}: arms: list at least one arm")
    seeds = raw.get("seeds") or [0]
    out = raw.get("out") or f"../../runs/experiments/{raw.get('name', path.stem)}"
    return Preset(
        name=str(raw.get("name", path.stem)) + ("-quick" if quick else ""),
        file=path.resolve(),
        seeds=[int(s) for s in seeds],
        cpus=int(raw.get("cpus", 2)),
        out=(base_dir / out).resolve(),
        tasks=tasks,
        arms=arms,
        timeout_s=float(raw.get("timeout_s", 3600)),
    )


def _known(raw, allowed: set[str], path: Path, where: str) -> None:
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: {where}: expected a mapping")
    for key in raw:
        if key not in allowed:
            raise PresetError(f"{path}: {where + '.' if where else ''}{key}: unknown key; valid keys are "
                              f"{', '.join(sorted(allowed))}")


# ----------------------------------------------------------------------------- configs


def site_dicts(task: Task, seed: int) -> list[dict]:
    """The task's training sites, resolved (absolute paths), with the task's overrides and seed."""
    cfg = load_consortium(task.consortium)
    sites = []
    for path in cfg.sites:
        site = to_dict(load_site(path))
        if task.sites is not None and site["name"] not in task.sites:
            continue
        sites.append(_site_overrides(site, task, seed))
    if not sites:
        raise PresetError(f"{task.consortium}: task {task.name}: no site left after `sites: {task.sites}`")
    return sites


def _site_overrides(site: dict, task: Task, seed: int) -> dict:
    site = deep_merge(site, task.site_set)
    if task.image_size:
        site["image_size"] = int(task.image_size)
    if task.vary_split:
        site["data"]["seed"] = int(seed)
    return site


def consortium_dict(task: Task, seed: int, arm: Arm | None) -> dict:
    """The consortium as a plain dict: the task's YAML, the task's `set`, then the arm's."""
    raw = to_dict(load_consortium(task.consortium))
    raw = deep_merge(raw, task.set)
    if arm is not None:
        raw = deep_merge(raw, arm.set)
    raw["seed"] = int(seed)
    return raw


# Consortium options added after grids were cached, each with the behaviour every run had before it
# existed. At that value they do not change what a run does, so they stay out of its digest and
# the cached runs remain valid (`damped` has since become the default: the full preset sets it
# back to false for its reference arm). The `selection` section came with model selection: every
# cached run had no rollback (rollback_margin null, which the presets set in each task, bases
# included); the phases only matter with a margin, so at their default they stay out too, and a
# section left empty drops out of the digest. The Wilson ledger (issue 12) changes behaviour
# unconditionally, so it has a switch: `aggregation.statistic: ema_point` is every cached run's rule
# (the presets set it per task, as `rollback_margin`); the informative gap and the outcome check
# act only under `wilson`, so under ema_point any value reproduces the earlier runs: recorded at
# the values they came with.
OPTIONS_ADDED_LATER = {("preference", "reference"): "round", ("aggregation", "krum_byzantine"): 1,
                       ("aggregation", "damped"): False, ("preference", "min_pick_gain"): None,
                       ("selection", "rollback_margin"): None, ("selection", "rollback_phases"): ["preference"],
                       ("model", "args"): {}, ("model", "pretrained_weights"): None,
                       ("aggregation", "statistic"): "ema_point", ("aggregation", "informative_gap"): 0.05,
                       ("aggregation", "outcome_margin"): 0.01, ("aggregation", "outcome_rounds"): 2,
                       **SERVER_OPTIONS_ADDED_LATER}


# Site options added later, likewise: `min_images` (no figure from fewer images leaves a site) at
# 5 changes nothing in these grids, whose smallest split holds 9 images.
SITE_OPTIONS_ADDED_LATER = {"min_images": 5}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Top-level sections added later, at the value that means "absent" (the consortium's quality
# judge, `quality_judge: null`: no judge rounds): the server's own list, which keeps such runs
# resumable, keeps cached runs valid here too.
SECTIONS_ADDED_LATER = ADDED_LATER


def _identity(consortium: dict) -> dict:
    """The consortium dict without the later-added options that sit at their earlier behaviour."""
    kept = {k: dict(v) if isinstance(v, dict) else v for k, v in consortium.items()
            if not (k in SECTIONS_ADDED_LATER and v == SECTIONS_ADDED_LATER[k])}
    for (section, key), default in OPTIONS_ADDED_LATER.items():
        if kept.get(section, {}).get(key, default) == default:
            kept.get(section, {}).pop(key, None)
    for section in {section for section, _ in OPTIONS_ADDED_LATER}:
        if kept.get(section) == {}:  # a section added later, every option at its earlier behaviour
            kept.pop(section)
    return kept


def _site_identity(site: dict) -> dict:
    """The site dict without the later-added options that sit at their earlier behaviour."""
    return {k: v for k, v in site.items() if SITE_OPTIONS_ADDED_LATER.get(k, object()) != v}


def _write_configs(folder: Path, consortium: dict, sites: list[dict]) -> Path:
    """Write site YAMLs and the consortium YAML into `folder`; check them by loading."""
    (folder / "sites").mkdir(parents=True, exist_ok=True)
    files = []
    for site in sites:
        target = folder / "sites" / f"{site['name']}.yaml"
        target.write_text(yaml.safe_dump(site, sort_keys=False))
        files.append(str(target))
    consortium = dict(consortium, sites=files)
    path = folder / "consortium.yaml"
    path.write_text(yaml.safe_dump(consortium, sort_keys=False))
    try:
        load_consortium(path)
        for f in files:
            load_site(f)
    except ConfigError as exc:
        raise PresetError(f"the preset makes an invalid config: {exc}") from None
    return path


# ----------------------------------------------------------------------------- running


@dataclass
class Run:
    task: str
    arm: str
    seed: int
    folder: Path  # holds consortium.yaml, sites/, work/ and the fl-sim run in run/
    rounds: int
    simulated: bool = True
    status: str = "pending"  # pending | done | failed | skipped
    wall_s: float = 0.0
    reason: str = ""
    code: str = ""  # code_version() of the harness call that finished the run ("": not recorded)

    @property
    def run_dir(self) -> Path:
        return self.folder / "run"


def code_version() -> str:
    """The commit of this checkout, "+changes" appended when its tracked Python files differ from
    it ("+unknown" when git cannot say), "" outside a git checkout. A cached run is keyed by its
    settings, not by the code, so each run records the code of the harness call that finished it,
    taken when that call starts the run (`wall.json`, the `code` column of runs.csv)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return ""
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "*.py")
    return head + ("+unknown" if changed is None else "+changes" if changed else "")


def _last_round(run_dir: Path) -> int:
    from fl_server.report import read_metrics

    rounds = [int(r["round"]) for r in read_metrics(run_dir) if r.get("kind") == "global"]
    return max(rounds, default=0)


def _simulate(consortium: Path, run_dir: Path, total_rounds: int, cpus: int, timeout_s: float,
              log_path: Path) -> tuple[bool, float, str]:
    """One fl-sim run in a subprocess; resumes a run dir that holds checkpoints already."""
    done = _last_round(run_dir) if run_dir.exists() else 0
    if done >= total_rounds:
        return True, 0.0, "already complete"
    cmd = [sys.executable, "-m", "fl_sim", "--consortium", str(consortium), "--run-dir", str(run_dir),
           "--cpus", str(cpus)]
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("round_*.pt")):
        cmd.append("--resume")
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1",
               # Ray starts its workers (our sites) at nice 15; run them at the same priority as
               # any other job instead, so that a shared machine does not starve the grid
               RAY_worker_niceness=os.environ.get("RAY_worker_niceness", "0"))
    started = time.time()
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            return False, time.time() - started, f"timed out after {timeout_s:g} s"
    wall = time.time() - started
    if code != 0 or _last_round(run_dir) < total_rounds:
        return False, wall, f"fl-sim exited with {code} after round {_last_round(run_dir)} (see {log_path})"
    return True, wall, ""


def base_digest(consortium: dict, sites: list[dict]) -> str:
    """What decides a supervised base: not the preference settings (0 rounds of them) nor the quality
    judge (trained before preference rounds only), nor the sites' judges and folders, nor an option added later at its earlier behaviour (site options
    too: `min_images` once made every cached base look changed), so that cached bases stay valid."""
    return _digest({"consortium": {k: v for k, v in _identity(consortium).items()
                                   if k not in ("run_dir", "name", "sites", "preference", "quality_judge")},
                    "sites": [{k: v for k, v in _site_identity(s).items() if k not in ("judge", "work_dir")}
                              for s in sites]})


def ensure_base(preset: Preset, task: Task, seed: int, bases: Path, say) -> tuple[Path, Path]:
    """Train (or reuse) the supervised base of a task and seed; returns (its run dir, last checkpoint)."""
    consortium = consortium_dict(task, seed, None)
    consortium["preference"]["rounds"] = 0
    consortium["base_checkpoint"] = None
    sites = site_dicts(task, seed)
    folder = bases / f"{task.name}-seed{seed}-{base_digest(consortium, sites)}"
    rounds = int(consortium["supervised"]["rounds"])
    if rounds < 1:
        raise PresetError(f"{preset.file}: tasks.{task.name}: supervised.rounds must be >= 1 to train the base")
    for site in sites:
        site["work_dir"] = str(folder / "work" / site["name"])
    consortium.update(name=f"{task.name}-base-seed{seed}", run_dir=str(folder / "run"))
    path = _write_configs(folder, consortium, sites)
    if _last_round(folder / "run") < rounds:
        others = sorted(f.name for f in bases.glob(f"{task.name}-seed{seed}-*") if f != folder)
        if others:  # every cached run of this task and seed starts from the old base: all will rerun
            say(f"WARNING: the supervised settings of {task.name} changed since base {', '.join(others)}: "
                f"a new base is trained and every cached {task.name} run of seed {seed} will be discarded")
        say(f"base {task.name} seed {seed}: {rounds} supervised rounds -> {folder}")
        ok, wall, reason = _simulate(path, folder / "run", rounds, preset.cpus, preset.timeout_s, folder / "sim.log")
        if not ok:
            raise RuntimeError(f"base model of task {task.name}, seed {seed} failed: {reason}")
        say(f"base {task.name} seed {seed}: done in {wall:.0f} s")
    return folder / "run", folder / "run" / "checkpoints" / f"round_{rounds:03d}.pt"


def prepare_run(preset: Preset, task: Task, arm: Arm, seed: int, base_ckpt: Path,
                read_only: bool = False) -> tuple[Run, Path]:
    """The run's folder with its consortium and site YAMLs (rewritten unless `read_only`)."""
    consortium = consortium_dict(task, seed, arm)
    consortium["supervised"]["rounds"] = 0
    consortium["base_checkpoint"] = str(base_ckpt)
    sites = site_dicts(task, seed)
    names = [s["name"] for s in sites]
    for index, site in enumerate(sites):
        judge = arm.judge if arm.judge is not None else site["judge"]
        judge = arm.site_judges.get(site["name"], judge)
        site["judge"] = {**judge, "seed": int(seed) * 1000 + index}
    folder = preset.out / task.name / arm.name / f"seed{seed}"
    for site in sites:
        site["work_dir"] = str(folder / "work" / site["name"])
    consortium.update(name=f"{task.name}-{arm.name}-seed{seed}", run_dir=str(folder / "run"))
    missing = [s for s in arm.site_judges if s not in names]
    if missing and all(s not in [x["name"] for x in site_dicts(preset.tasks[t], seed)] for t in arm.tasks for s in missing):
        raise PresetError(f"{preset.file}: arm {arm.name}: site_judges: {missing[0]!r} is no site of its tasks")
    stamp = _digest({"consortium": _identity(consortium), "sites": [_site_identity(s) for s in sites]})
    rounds = int(consortium["preference"]["rounds"])
    stale = (folder / "spec.json").exists() and json.loads((folder / "spec.json").read_text()).get("digest") != stamp
    if stale and read_only:  # report what is there; never delete or rewrite in a report
        run = Run(task.name, arm.name, seed, folder, rounds, simulated=not arm.is_untouched_base, status="stale")
        return run, folder / "consortium.yaml"
    if stale:
        shutil.rmtree(folder)  # the preset changed since: this run no longer matches it
    path = folder / "consortium.yaml"
    if not read_only:
        path = _write_configs(folder, consortium, sites)
        (folder / "spec.json").write_text(json.dumps({"digest": stamp, "task": task.name, "arm": arm.name, "seed": seed}))
    return Run(task.name, arm.name, seed, folder, rounds, simulated=not arm.is_untouched_base), path


# ----------------------------------------------------------------------------- unseen centres


class UnseenEvaluator:
    """Scores checkpoints on a task's unseen centres; images are loaded once per task."""

    def __init__(self, task: Task, model_cfg: dict):
        from shared.config import ModelConfig, from_dict
        from shared.data import load_site_data

        self.model_cfg = from_dict(ModelConfig, model_cfg, origin="experiment model")
        self.splits = {}
        for path in task.unseen:
            site = load_site(path)
            if task.image_size:
                import dataclasses

                site = dataclasses.replace(site, image_size=int(task.image_size))
            self.splits[site.name] = load_site_data(site, splits=("test",))["test"]

    def __call__(self, checkpoint: Path) -> dict[str, dict]:
        import torch

        from shared.model import load_state
        from shared.evaluation import evaluate
        from shared.site import load_model

        model = load_model(self.model_cfg, load_state(checkpoint))
        return {name: evaluate(model, split, torch.device("cpu")) for name, split in self.splits.items()}


def unseen_scores(run_dir: Path, base_ckpt: Path, evaluator: UnseenEvaluator | None, cache: dict) -> dict:
    """{round: {centre: {dice, hd95, ...}}} for round 0 (the base) and every checkpoint of the run."""
    if evaluator is None or not evaluator.splits:
        return {}
    store = run_dir / "unseen.json"
    scores = {int(k): v for k, v in json.loads(store.read_text()).items()} if store.exists() else {}
    key = str(base_ckpt)
    if key not in cache:
        cache[key] = evaluator(base_ckpt)
    scores[0] = cache[key]
    for ckpt in sorted((run_dir / "checkpoints").glob("round_*.pt")) if run_dir.exists() else []:
        r = int(ckpt.stem.split("_")[1])
        if r not in scores:
            scores[r] = evaluator(ckpt)
    if run_dir.exists():
        store.write_text(json.dumps({str(k): v for k, v in sorted(scores.items())}))
    return scores


# ----------------------------------------------------------------------------- collecting


def run_record(run: Run, base_run: Path, unseen: dict) -> dict:
    """Everything the tables need from one run: per-round figures, peak, last, falls."""
    from fl_server.report import read_metrics

    base_lines = read_metrics(base_run)
    base_round = max(int(r["round"]) for r in base_lines if r.get("kind") == "global")
    rounds = {0: _round_figures([r for r in base_lines if int(r["round"]) == base_round], unseen.get(0, {}))}
    if run.simulated:
        lines = read_metrics(run.run_dir)
        if not run.wall_s:  # no wall time recorded (a run finished by an earlier harness): sum of round times
            run.wall_s = sum(float(x.get("duration_s") or 0) for x in lines if x.get("kind") == "global")
        for r in sorted({int(x["round"]) for x in lines if x.get("kind") == "global"}):
            rounds[r] = _round_figures([x for x in lines if int(x["round"]) == r], unseen.get(r, {}))
    mean = {r: f["mean_dice"] for r, f in rounds.items()}
    prefs = [r for r in rounds if r > 0]
    peak = max(prefs, key=lambda r: (_num(mean[r]), -r)) if prefs else 0
    last = max(rounds)
    falls = sum(1 for r in prefs if r - 1 in mean and _num(mean[r]) < _num(mean[r - 1]) - FALL_TOLERANCE)
    reliability = {}
    for site in {s for f in rounds.values() for s in f["reliability"]}:
        per_round = [rounds[r]["reliability"][site] for r in prefs if site in rounds[r]["reliability"]]
        reliability[site] = {k: _mean([x.get(k) for x in per_round])
                             for k in ("pair_accuracy", "spearman", "pair_gain", "n_pairs", "weight", "gated",
                                       *HEADROOM_KEYS)}
        reliability[site]["state_last"] = per_round[-1].get("state") if per_round else None
    return {"task": run.task, "arm": run.arm, "seed": run.seed, "status": run.status, "wall_s": run.wall_s,
            "code": run.code if run.simulated else None,  # None: the untouched base, not simulated
            "rounds": rounds, "peak": peak, "last": last, "falls": falls, "reliability": reliability}


def _round_figures(lines: list[dict], unseen: dict) -> dict:
    glob = next((x for x in lines if x.get("kind") == "global"), {})
    sites, reliability = {}, {}
    for x in lines:
        if x.get("kind") != "site":
            continue
        ev, tr = x.get("eval") or {}, x.get("train") or {}
        if ev:
            sites[x["site"]] = {"dice": ev.get("dice"), "hd95": ev.get("hd95")}
        if x.get("phase") == "preference" and "rel_pair_accuracy" in tr:
            reliability[x["site"]] = {"pair_accuracy": tr.get("rel_pair_accuracy"), "spearman": tr.get("rel_spearman"),
                                      "pair_gain": tr.get("rel_pair_gain"), "n_pairs": tr.get("rel_n_pairs"),
                                      "weight": x.get("weight"), "state": x.get("state"),
                                      "gated": tr.get("gated"), **{k: tr.get(f"rel_{k}") for k in HEADROOM_KEYS}}
    unseen = {c: {"dice": v.get("dice"), "hd95": v.get("hd95")} for c, v in unseen.items()}
    return {"mean_dice": glob.get("mean_dice"), "mean_hd95": glob.get("mean_hd95"), "sites": sites,
            "unseen": unseen, "unseen_mean_dice": _mean([v["dice"] for v in unseen.values()]),
            "reliability": reliability}


def _num(value) -> float:
    return float(value) if value is not None and value == value else -math.inf


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- summarising


def _stats(values) -> tuple[float | None, float | None, int]:
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def _fmt(values, decimals=3) -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return "-"
    text = f"{mean:.{decimals}f}"
    return text + (f" ± {std:.{decimals}f}" if std is not None else "")


def summarise(records: list[dict], preset: Preset) -> list[dict]:
    """One row per (task, arm) with mean and std over its seeds."""
    rows = []
    control = {(r["task"], r["seed"]): r for r in records if r["arm"] == CONTROL_ARM}
    reference = {(r["task"], r["seed"]): r for r in records if r["arm"] == REFERENCE_ARM}
    upper = {(r["task"], r["seed"]): r for r in records if r["arm"] == UPPER_ARM}
    for task in preset.tasks:
        for arm in preset.arms:
            if task not in arm.tasks:
                continue
            recs = [r for r in records if r["task"] == task and r["arm"] == arm.name]
            row = {"task": task, "arm": arm.name, "groups": " ".join(arm.groups), "note": arm.note,
                   "seeds_done": len(recs), "seeds_planned": len(_arm_seeds(arm, preset))}
            fig = lambda rec, which: rec["rounds"][rec[which]]  # noqa: E731
            row["base_dice"] = [r["rounds"][0]["mean_dice"] for r in recs]
            row["peak_dice"] = [fig(r, "peak")["mean_dice"] for r in recs]
            row["peak_round"] = [r["peak"] for r in recs]
            row["last_dice"] = [fig(r, "last")["mean_dice"] for r in recs]
            row["last_minus_base"] = [fig(r, "last")["mean_dice"] - r["rounds"][0]["mean_dice"] for r in recs]
            row["last_minus_sup_only"] = [
                fig(r, "last")["mean_dice"] - fig(c, "last")["mean_dice"]
                for r in recs if (c := control.get((task, r["seed"]))) is not None]
            row["last_minus_rn_dpo"] = [
                fig(r, "last")["mean_dice"] - fig(c, "last")["mean_dice"]
                for r in recs if (c := reference.get((task, r["seed"]))) is not None]
            row["label_efficiency"] = [
                _efficiency(fig(r, "last")["mean_dice"], fig(c, "last")["mean_dice"], fig(u, "last")["mean_dice"])
                for r in recs if (c := control.get((task, r["seed"]))) is not None
                and (u := upper.get((task, r["seed"]))) is not None]
            row["falls"] = [r["falls"] for r in recs]
            row["n_rounds"] = [r["last"] for r in recs]
            row["peak_hd95"] = [fig(r, "peak")["mean_hd95"] for r in recs]
            row["last_hd95"] = [fig(r, "last")["mean_hd95"] for r in recs]
            row["peak_unseen_dice"] = [fig(r, "peak")["unseen_mean_dice"] for r in recs]
            row["last_unseen_dice"] = [fig(r, "last")["unseen_mean_dice"] for r in recs]
            for kind in ("sites", "unseen"):
                row[f"_{kind}"] = sorted({s for r in recs for x in r["rounds"].values() for s in x[kind]})
            for which in ("peak", "last"):
                for kind in ("sites", "unseen"):
                    for s in row[f"_{kind}"]:
                        for metric in ("dice", "hd95"):
                            row[f"{which}_{s}_{metric}"] = [fig(r, which)[kind].get(s, {}).get(metric) for r in recs]
            row["_reliability"] = sorted({s for r in recs for s in r["reliability"]})
            for s in row["_reliability"]:
                for metric in ("pair_accuracy", "spearman", "pair_gain", "n_pairs", "weight", *HEADROOM_KEYS):
                    row[f"rel_{s}_{metric}"] = [r["reliability"].get(s, {}).get(metric) for r in recs]
            for key in HEADROOM_KEYS:  # per seed, the mean over sites and preference rounds
                row[key] = [_mean([x.get(key) for x in r["reliability"].values()]) for r in recs]
            row["gated_share"] = [_mean([x.get("gated") for x in r["reliability"].values()]) for r in recs]
            row["headroom_capture"] = [_capture(*seed_figures) for seed_figures in zip(*(row[k] for k in HEADROOM_KEYS))]
            row["wall_s"] = [r["wall_s"] for r in recs]
            rows.append(row)
    return rows


def _efficiency(method: float | None, control: float | None, upper: float | None) -> float | None:
    """(method - control) / (upper - control): the share of the gain labelling the pool would bring
    that the method gets without labels; None where labelling gains nothing (upper <= control)."""
    if None in (method, control, upper) or upper - control <= 1e-9:
        return None
    return (method - control) / (upper - control)


def _capture(identity: float | None, best: float | None, pick: float | None) -> float | None:
    """(pick - identity) / (best - identity): the share of the best-of-K headroom the judge's pick takes."""
    if None in (identity, best, pick) or best - identity <= 1e-9:
        return None
    return (pick - identity) / (best - identity)


TEXT_FIELDS = ("task", "arm", "groups", "note", "seeds_done", "seeds_planned")


def write_csvs(out: Path, rows: list[dict], records: list[dict]) -> None:
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys and not k.startswith("_")]
    fields = []
    for k in keys:
        fields += [k] if k in TEXT_FIELDS else [f"{k}_mean", f"{k}_std"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            line = {}
            for k in keys:
                if k in TEXT_FIELDS:
                    line[k] = row.get(k, "")
                else:
                    mean, std, _ = _stats(row.get(k) or [])
                    line[f"{k}_mean"] = _r(mean)
                    line[f"{k}_std"] = _r(std)
            writer.writerow(line)
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "arm", "seed", "status", "wall_s", "base_dice", "peak_round", "peak_dice",
                         "last_round", "last_dice", "falls", "peak_unseen_dice", "last_unseen_dice", "code"])
        for r in records:
            rd = r["rounds"]
            writer.writerow([r["task"], r["arm"], r["seed"], r["status"], round(r["wall_s"], 1), _r(rd[0]["mean_dice"]),
                             r["peak"], _r(rd[r["peak"]]["mean_dice"]), r["last"], _r(rd[r["last"]]["mean_dice"]),
                             r["falls"], _r(rd[r["peak"]]["unseen_mean_dice"]), _r(rd[r["last"]]["unseen_mean_dice"]),
                             r.get("code") or ""])
    with (out / "rounds.csv").open("w", newline="") as f:
        sites = sorted({s for r in records for x in r["rounds"].values() for s in x["sites"]})
        centres = sorted({s for r in records for x in r["rounds"].values() for s in x["unseen"]})
        writer = csv.writer(f)
        writer.writerow(["task", "arm", "seed", "round", "mean_dice", "mean_hd95", "unseen_mean_dice"]
                        + [f"{s}_dice" for s in sites] + [f"{c}_dice" for c in centres])
        for r in records:
            for n, x in sorted(r["rounds"].items()):
                writer.writerow([r["task"], r["arm"], r["seed"], n, _r(x["mean_dice"]), _r(x["mean_hd95"]),
                                 _r(x["unseen_mean_dice"])]
                                + [_r(x["sites"].get(s, {}).get("dice")) for s in sites]
                                + [_r(x["unseen"].get(c, {}).get("dice")) for c in centres])


def _r(value, digits=5):
    return "" if value is None or value != value else round(float(value), digits)


def markdown(rows: list[dict], records: list[dict], preset: Preset, command: str, pending: list[str]) -> str:
    out = [f"# Experiment results: {preset.name}", "",
           f"Command: `{command}`", "",
           f"Preset: `{_rel(preset.file)}`; seeds {preset.seeds}. Figures are mean ± sample std over the "
           "seeds that finished (no ± with one seed). *peak*: the preference round with the best mean "
           "test Dice of the training sites (an optimistic, test-chosen round); *last*: the final round; "
           "*falls*: rounds whose mean Dice fell below the round before; Δ base / Δ sup_only / Δ rn_dpo: "
           "last-round mean Dice minus that of the base / the supervised-only control / the RN-DPO "
           "reference arm on the same seed (paired differences); *label eff.*: (arm - sup_only) / "
           "(all_labelled - sup_only) at the last round, paired by seed: the share of the gain that "
           "labelling the unlabelled pool would bring which the arm gets without labels.", ""]
    if pending:
        out += ["**Not finished:** " + ", ".join(pending), ""]
    for task in preset.tasks:
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        out += [f"## Task `{task}`", "", "### Summary (mean test Dice of the training sites)", "",
                "| arm | seeds | base | peak (round) | last | Δ base | Δ sup_only | Δ rn_dpo | label eff. | falls | HD95 last | unseen Dice peak | unseen Dice last |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in trows:
            out.append(f"| {r['arm']} | {r['seeds_done']}/{r['seeds_planned']} | {_fmt(r['base_dice'])} | "
                       f"{_fmt(r['peak_dice'])} ({_fmt(r['peak_round'], 1)}) | {_fmt(r['last_dice'])} | "
                       f"{_fmt(r['last_minus_base'])} | {_fmt(r['last_minus_sup_only'])} | {_fmt(r['last_minus_rn_dpo'])} | "
                       f"{_fmt(r['label_efficiency'], 2)} | {_fmt(r['falls'], 1)} | "
                       f"{_fmt(r['last_hd95'], 1)} | {_fmt(r['peak_unseen_dice'])} | {_fmt(r['last_unseen_dice'])} |")
        headroom_rows = [r for r in trows if any(v is not None for v in r.get("dice_best", []))]
        if headroom_rows:
            out += ["", "### Headroom on the calibration splits (mean over sites and preference rounds)", "",
                    "Dice of the model's own mask (*identity*), of the best of its K plausible proposals "
                    "(*best of K*: what a perfect judge would pick) and of the judge's pick; *capture* = "
                    "(pick - identity) / (best - identity); *gated*: share of site-rounds that took anchor-only "
                    "steps because the pick did not beat the model's own mask (`min_pick_gain`).", "",
                    "| arm | identity | best of K | judge's pick | capture | gated |", "|---|---|---|---|---|---|"]
            for r in headroom_rows:
                out.append(f"| {r['arm']} | {_fmt(r['dice_identity'])} | {_fmt(r['dice_best'])} | "
                           f"{_fmt(r['dice_pick'])} | {_fmt(r['headroom_capture'], 2)} | {_fmt(r['gated_share'], 2)} |")
        out += _round_table(records, task, [r["arm"] for r in trows])
        for kind, title in (("sites", "Per training site (test split)"), ("unseen", "Unseen centres (all frames, never federated)")):
            names = sorted({n for r in trows for n in r[f"_{kind}"]})
            if not names:
                continue
            out += ["", f"### {title}: Dice / HD95 (px) at peak and last round", "",
                    "| arm | " + " | ".join(f"{n} Dice peak | {n} Dice last | {n} HD95 peak | {n} HD95 last"
                                            for n in names) + " |",
                    "|---|" + "---|" * (4 * len(names))]
            for r in trows:
                cells = []
                for n in names:
                    cells += [_fmt(r.get(f"peak_{n}_dice", [])), _fmt(r.get(f"last_{n}_dice", [])),
                              _fmt(r.get(f"peak_{n}_hd95", []), 1), _fmt(r.get(f"last_{n}_hd95", []), 1)]
                out.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
        rel_sites = sorted({n for r in trows for n in r["_reliability"]})
        if rel_sites:
            out += ["", "### Judge reliability on the calibration splits (mean over preference rounds)", "",
                    "| arm | judge | " + " | ".join(f"{s} pair acc | {s} Spearman | {s} weight" for s in rel_sites) + " |",
                    "|---|---|" + "---|" * (3 * len(rel_sites))]
            arms = {a.name: a for a in preset.arms}
            for r in trows:
                if not any(r.get(f"rel_{s}_pair_accuracy") for s in rel_sites):
                    continue
                cells = []
                for s in rel_sites:
                    cells += [_fmt(r.get(f"rel_{s}_pair_accuracy", [])), _fmt(r.get(f"rel_{s}_spearman", [])),
                              _fmt(r.get(f"rel_{s}_weight", []), 2)]
                out.append(f"| {r['arm']} | {_judge_text(arms[r['arm']], rel_sites)} | " + " | ".join(cells) + " |")
        out += ["", "Plots: " + ", ".join(f"`plots/{p.name}`" for p in sorted((preset.out / "plots").glob(f"{task}_*.png"))), ""]
    out += ["## Arms", "", "Every arm is the reference arm with the change shown (`arm_defaults` of the preset: "
            f"`{json.dumps(_defaults_set(preset), sort_keys=True)}`).", "",
            "| arm | tasks | change | judge | note |", "|---|---|---|---|---|"]
    for arm in preset.arms:
        out.append(f"| {arm.name} | {', '.join(arm.tasks)} | `{json.dumps(arm.own_set, sort_keys=True) if arm.own_set else '-'}` | "
                   f"{_judge_text(arm)} | {arm.note} |")
    walls = [r["wall_s"] for r in records if r["wall_s"]]
    out += ["", f"Simulation time of the runs in this table: {sum(walls) / 60:.1f} min "
            f"({len(walls)} runs, median {statistics.median(walls) if walls else 0:.0f} s)." , ""]
    codes = {}
    for r in records:
        if r.get("code") is not None:
            codes[r["code"] or "not recorded"] = codes.get(r["code"] or "not recorded", 0) + 1
    if codes:
        out += ["Code that finished the runs (commit; `+changes`: its Python files differed from it): "
                + ", ".join(f"`{c}` ({n} run{'s' * (n != 1)})" for c, n in sorted(codes.items())) + ".", ""]
    return "\n".join(out)


def _round_table(records: list[dict], task: str, arms: list[str]) -> list[str]:
    """Mean test Dice after every round (0: the base), averaged over the seeds that finished:
    sustained improvement or drift shows here, not in the peak."""
    runs = {a: [r for r in records if r["task"] == task and r["arm"] == a] for a in arms}
    last = max((max(r["rounds"]) for rs in runs.values() for r in rs), default=0)
    if last == 0:
        return []
    out = ["", "### Mean test Dice of the training sites after every preference round (0: the base; mean over seeds)", "",
           "| arm | " + " | ".join(str(i) for i in range(last + 1)) + " |", "|---|" + "---|" * (last + 1)]
    for arm, rs in runs.items():
        if rs:
            means = [_stats([r["rounds"][i]["mean_dice"] for r in rs if i in r["rounds"]])[0] for i in range(last + 1)]
            out.append(f"| {arm} | " + " | ".join("-" if m is None else f"{m:.3f}" for m in means) + " |")
    return out


def _defaults_set(preset: Preset) -> dict:
    ref = next((a for a in preset.arms if not a.own_set), None)
    return ref.set if ref is not None else {}


def _judge_text(arm: Arm, sites: list[str] | None = None) -> str:
    judge = arm.judge or {"kind": "(site YAML)"}
    text = ", ".join(f"{k} {v}" for k, v in judge.items())
    for site, j in arm.site_judges.items():
        if sites is not None and site not in sites:
            continue
        text += f"; {site}: " + ", ".join(f"{k} {v}" for k, v in j.items())
    return text


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def plot(records: list[dict], preset: Preset, plots: Path) -> list[Path]:
    """Dice over rounds per arm (mean over seeds, band +- std): one PNG per task and arm group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for task in preset.tasks:
        trecs = [r for r in records if r["task"] == task]
        if not trecs:
            continue
        groups = []
        for arm in preset.arms:
            if any(r["arm"] == arm.name for r in trecs):
                groups += [g for g in arm.groups if g not in groups]
        has_unseen = any(x["unseen"] for r in trecs for x in r["rounds"].values())
        for group in groups:
            arms = [a for a in preset.arms if group in a.groups and task in a.tasks]
            if sum(any(r["arm"] == a.name for r in trecs) for a in arms) < 2:
                continue  # one arm alone (e.g. the reference arm of a group run on the other task)
            # (key, title, paired change vs the same seed's base?): absolute Dice without bands (the
            # seeds' splits differ, so their spread hides the arms' differences), then the paired
            # change vs the base with a +- std band
            panels = [("mean_dice", "mean test Dice, training sites", False),
                      ("mean_dice", "change vs base (same seed), training sites", True)]
            if has_unseen:
                panels.append(("unseen_mean_dice", "change vs base (same seed), unseen centres", True))
            fig = Figure(figsize=(4.2 * len(panels) + 1.6, 3.4), dpi=80)
            axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
            last = max((r["last"] for r in trecs), default=1)
            for index, arm in enumerate(arms):
                arecs = [r for r in trecs if r["arm"] == arm.name]
                if not arecs:
                    continue
                # ten colours, then the same colours dashed, then dotted: no two arms look alike
                color, style = f"C{index % 10}", ("-", "--", ":")[index // 10 % 3]
                for ax, (key, _, delta) in zip(axes, panels):
                    def value(r, n):
                        v, b = r["rounds"][n][key], r["rounds"][0][key]
                        return None if v is None or (delta and b is None) else v - (b if delta else 0.0)

                    if all(set(r["rounds"]) == {0} for r in arecs):  # the untouched base: flat
                        ys = [value(r, 0) for r in arecs if value(r, 0) is not None]
                        if ys:
                            ax.plot([0, last], [statistics.fmean(ys)] * 2, "--", color="grey", label=arm.name)
                        continue
                    xs = sorted({n for r in arecs for n in r["rounds"]})
                    mean, lo, hi = [], [], []
                    for n in xs:
                        m, sd, _ = _stats([value(r, n) for r in arecs if n in r["rounds"]])
                        mean.append(m if m is not None else math.nan)
                        lo.append((m - sd) if sd is not None else mean[-1])
                        hi.append((m + sd) if sd is not None else mean[-1])
                    ax.plot(xs, mean, style, marker="o", markersize=3, label=arm.name, color=color)
                    if delta:
                        ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
            for ax, (_, title, delta) in zip(axes, panels):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel("round (0 = supervised base)", fontsize=8)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                ax.set_ylabel("Δ Dice" if delta else "Dice", fontsize=8)
            if axes[0].get_legend_handles_labels()[0]:  # outside the panels, right of the last
                axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper left",
                                bbox_to_anchor=(1.02, 1.0))
            seeds = sorted({r["seed"] for r in trecs if r["arm"] in {a.name for a in arms}})
            fig.suptitle(f"{task}: {group} (mean over seeds {seeds}; band: ± std of the paired change)", fontsize=10)
            fig.tight_layout()
            path = plots / f"{task}_{group}.png"
            FigureCanvasAgg(fig).print_png(str(path))
            written.append(path)
    return written


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, type=Path, help="preset YAML (benchmarks/presets/*.yaml)")
    parser.add_argument("--quick", action="store_true", help="merge the preset's quick: section (a < 15 min grid)")
    parser.add_argument("--out", type=Path, help="run directory (default: the preset's out, with -quick for --quick)")
    parser.add_argument("--report-only", action="store_true", help="build the tables from the finished runs; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and write the configs of new ones; run nothing")
    parser.add_argument("--arms", type=lambda text: set(text.split(",")),
                        help="comma-separated arm names: only these are run; every other finished run is still "
                             "reported (the tables stay whole)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        preset = load_preset(args.preset, quick=args.quick)
    except (PresetError, ConfigError) as exc:
        print(f"experiments: {exc}", file=sys.stderr)
        return 2
    unknown = sorted((args.arms or set()) - {arm.name for arm in preset.arms})
    if unknown:
        print(f"experiments: --arms: {', '.join(unknown)} not in {args.preset} (its arms: "
              f"{', '.join(arm.name for arm in preset.arms)})", file=sys.stderr)
        return 2
    if args.out:
        preset.out = args.out.resolve()
    elif args.quick:
        preset.out = preset.out.with_name(preset.out.name + "-quick")
    preset.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/experiments.py " + " ".join(
        [f"--preset {_rel(args.preset)}"] + (["--quick"] if args.quick else []) + ([f"--out {args.out}"] if args.out else []))
    log = (preset.out / "experiments.log").open("a")

    def say(text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    try:
        return _run_grid(preset, args, command, say)
    except (PresetError, ConfigError) as exc:
        print(f"experiments: {exc}", file=sys.stderr)
        return 2


def _run_grid(preset: Preset, args, command: str, say) -> int:
    import torch

    torch.set_num_threads(max(1, preset.cpus))
    bases = preset.out / "bases"
    records, pending, evaluators, base_cache = [], {}, {}, {}
    order = run_order(preset)
    planned = [f"{t.name}/{a.name}/seed{seed}" for a, seed, t in order]
    started = time.time()
    say(f"{command}: {len(preset.tasks)} task(s), {len(preset.arms)} arm(s), seeds {preset.seeds} -> {preset.out}")
    base_runs: dict[tuple[str, int], tuple[Path | None, Path | None]] = {}
    for index, (arm, seed, task) in enumerate(order):
        if (task.name, seed) not in base_runs:  # trained when first needed, then cached on disk
            if args.report_only or args.dry_run:
                base_runs[task.name, seed] = _existing_base(preset, task, seed, bases)
            else:
                try:
                    base_runs[task.name, seed] = ensure_base(preset, task, seed, bases, say)
                except RuntimeError as exc:
                    say(f"FAILED: {exc}")
                    base_runs[task.name, seed] = (None, None)
        base_run, base_ckpt = base_runs[task.name, seed]
        label = f"{task.name}/{arm.name}/seed{seed}"
        if base_run is None and not args.dry_run:
            if not (args.report_only):
                pending[label] = "base model failed"
            continue
        run, consortium = prepare_run(preset, task, arm, seed, base_ckpt or Path("base.pt"), read_only=True)
        if run.status == "stale" and args.dry_run:  # a dry run never deletes anything
            say(f"would discard {label}: its run folder was made with other settings than the preset's now")
            continue
        # an arm left out by --arms is only reported: its folder is neither written nor discarded
        writes = not args.report_only and (args.arms is None or arm.name in args.arms)
        if run.status == "stale" and writes:
            say(f"discarding {label}: its run folder was made with other settings than the preset's now")
        # (re)write its configs; a stale folder is emptied first. A dry run writes only folders that do
        # not exist yet: the site YAMLs of a run in progress (another harness) are reloaded every round
        if writes and not (args.dry_run and (run.folder / "spec.json").exists()):
            run, consortium = prepare_run(preset, task, arm, seed, base_ckpt or Path("base.pt"))
        if run.status == "stale":
            pending[label] = "its run folder was made with other settings than the preset's now"
            continue
        if args.dry_run:
            say(f"would run {label}: {consortium}")
            continue
        if run.simulated:
            complete = _last_round(run.run_dir) >= run.rounds if run.run_dir.exists() else False
            if not complete and args.report_only:
                if run.run_dir.exists():
                    pending[label] = f"stopped after round {_last_round(run.run_dir)} of {run.rounds}"
                continue
            if not complete and not writes:
                pending[label] = "not run (--arms)"
                continue
            if not complete:
                say(f"run {label}: {run.rounds} preference rounds")
                run.code = code_version()
                ok, run.wall_s, reason = _simulate(consortium, run.run_dir, run.rounds, preset.cpus,
                                                   preset.timeout_s, run.folder / "sim.log")
                if not ok:
                    say(f"FAILED {label}: {reason}")
                    pending[label] = f"failed: {reason}"
                    continue
                say(f"done {label} in {run.wall_s:.0f} s")
                (run.folder / "wall.json").write_text(json.dumps({"wall_s": run.wall_s, "code": run.code}))
            elif (run.folder / "wall.json").exists():
                finished = json.loads((run.folder / "wall.json").read_text())
                run.wall_s, run.code = finished["wall_s"], finished.get("code", "")
        run.status = "done"
        if task.name not in evaluators:
            evaluators[task.name] = UnseenEvaluator(task, consortium_dict(task, seed, None)["model"]) if task.unseen else None
        unseen = unseen_scores(run.run_dir if run.simulated else run.folder / "base-only", base_ckpt,
                               evaluators[task.name], base_cache)
        records.append(run_record(run, base_run, unseen))
        if not args.report_only:  # tables after every run, plots after every block of a tier and seed
            following = order[index + 1] if index + 1 < len(order) else None
            block_ends = following is None or (following[1], following[0].tier_of(following[2].name)) != (
                seed, arm.tier_of(task.name))
            _write_outputs(preset, records, command, _not_done(planned, records, pending), say, final=False,
                           plots=block_ends)
    if args.dry_run:
        return 0
    not_done = _not_done(planned, records, pending)
    _write_outputs(preset, records, command, not_done, say, final=True)
    say(f"finished in {(time.time() - started) / 60:.1f} min: {len(records)} run(s) done, {len(not_done)} not")
    return 1 if any("failed" in p for p in pending.values()) else 0


def _not_done(planned: list[str], records: list[dict], reasons: dict[str, str]) -> list[str]:
    done = {f"{r['task']}/{r['arm']}/seed{r['seed']}" for r in records}
    return [f"{label} ({reasons.get(label, 'not run yet')})" for label in planned if label not in done]


def run_order(preset: Preset) -> list[tuple[Arm, int, Task]]:
    """(arm, seed, task) in the order they run: tier by tier (the arms' `tier`), seed-major within
    a tier, then the tasks and arms in the preset's order, so a grid cut short has the first tiers
    on every seed and the next tier on its first seeds."""
    order = []
    for tier in sorted({a.tier_of(t) for a in preset.arms for t in a.tasks}):
        for seed in preset.seeds:
            for task in preset.tasks.values():
                order += [(arm, seed, task) for arm in preset.arms
                          if task.name in arm.tasks and arm.tier_of(task.name) == tier and seed in _arm_seeds(arm, preset)]
    return order


def _arm_seeds(arm: Arm, preset: Preset) -> list[int]:
    """The preset's seeds, or the arm's own subset of them (e.g. a one-seed lr sweep)."""
    return [s for s in preset.seeds if arm.seeds is None or s in arm.seeds]


def _existing_base(preset: Preset, task: Task, seed: int, bases: Path):
    for folder in sorted(bases.glob(f"{task.name}-seed{seed}-*")):
        rounds = _last_round(folder / "run")
        ckpt = folder / "run" / "checkpoints" / f"round_{rounds:03d}.pt"
        if rounds and ckpt.exists():
            return folder / "run", ckpt
    return None, None


def _write_outputs(preset: Preset, records: list[dict], command: str, pending: list[str], say, final: bool,
                   plots: bool = True) -> None:
    rows = summarise(records, preset)
    if plots:
        written = plot(records, preset, preset.out / "plots")
        for old in (preset.out / "plots").glob("*.png"):
            if old not in written:
                old.unlink()  # a plot of a group this grid no longer has
    if rows:
        write_csvs(preset.out, rows, records)
    (preset.out / "results.md").write_text(markdown(rows, records, preset, command, pending))
    if final:
        say(f"results: {preset.out / 'results.md'}, {preset.out / 'results.csv'}, plots in {preset.out / 'plots'}")


if __name__ == "__main__":
    sys.exit(main())
