"""shared/config.py: strict YAML -> frozen dataclasses; every error names the file and the key."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shared.config import (
    SPLITS,
    AggregationConfig,
    ConfigError,
    ConsortiumConfig,
    DeploymentConfig,
    Folder,
    Groups,
    JudgeConfig,
    ModelConfig,
    PreferenceConfig,
    SiteConfig,
    SplitFractions,
    load_consortium,
    load_consortium_sites,
    load_site,
    to_dict,
    to_yaml,
)
from shared.data import check_site_data

REPO = Path(__file__).resolve().parents[1]
SITES = REPO / "sites"
EXAMPLE = SITES / "example-site.yaml"
UNSET = "FEDRNDPO_TEST_SURELY_UNSET"

# A minimal valid site and consortium; the malformed cases below change one thing each.
SITE = """\
name: a
work_dir: work
data:
  source: {images: all/images, masks: all/masks}
  split: {labeled: 0.25, calibration: 0.25, unlabeled: 0.25, test: 0.25}
"""
CONSORTIUM = """\
name: c
sites: [a.yaml]
run_dir: runs
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _load(path: Path):
    return load_consortium(path) if path.name.startswith("c") else load_site(path)


def _strip(cfg):
    """The config without the file it was read from (two loads of the same content compare equal)."""
    return dataclasses.replace(cfg, source_file=None)


# ----------------------------------------------------------------------------- malformed files

# (file name, content, the expected message after the folder: `file: key.path: problem`)
MALFORMED = {
    "unknown key": (
        "a.yaml", SITE + "colour: red\n",
        "a.yaml: colour: unknown key; valid keys here are name, data, work_dir, image_size, channels, judge, device, min_images, deployment",
    ),
    "unknown nested key": (
        "a.yaml", SITE + "judge: {kind: oracle, nois_std: 0.1}\n",
        "a.yaml: judge.nois_std: unknown key; valid keys here are kind, noise_std, flip_prob, invert, seed, train_steps, folds",
    ),
    "string for int": ("a.yaml", SITE + "image_size: big\n", "a.yaml: image_size: expected an integer, got str 'big'"),
    "bool for int": ("a.yaml", SITE + "image_size: true\n", "a.yaml: image_size: expected an integer, got bool True"),
    "string for number": ("c.yaml", CONSORTIUM + "preference: {beta: high}\n", "c.yaml: preference.beta: expected a number, got str 'high'"),
    "scalar for mapping": ("a.yaml", SITE + "judge: oracle\n", "a.yaml: judge: expected a mapping, got str 'oracle'"),
    "not in choices (README)": (
        "a.yaml", SITE + "judge: {kind: agrement}\n",
        "a.yaml: judge.kind: 'agrement' is not one of agreement, uncertainty, learned, federated, oracle",
    ),
    "device not in choices": ("a.yaml", SITE + "device: gpu\n", "a.yaml: device: 'gpu' is not one of auto, cpu, cuda"),
    "channels 2": ("a.yaml", SITE + "channels: 2\n", "a.yaml: channels: 2 must be 1 or 3"),
    "missing required key": ("a.yaml", SITE.replace("work_dir: work\n", ""), "a.yaml: work_dir: is required"),
    "missing consortium run_dir": ("c.yaml", "name: c\nsites: [a.yaml]\n", "c.yaml: run_dir: is required"),
    "deployment without private_key": (
        "a.yaml", SITE + "deployment: {superlink: 'fl.example.org:8000', ca_cert: keys/ca.crt}\n",
        "a.yaml: deployment.private_key: is required",
    ),
    "model in_channels 2": ("c.yaml", CONSORTIUM + "model: {in_channels: 2}\n", "c.yaml: model.in_channels: 2 must be 1 or 3"),
    "invalid YAML (line number)": (
        "a.yaml", "name: a\nwork_dir: work\njudge: {kind: oracle\ndata: {}\n",
        "a.yaml: line 4: not valid YAML: expected ',' or '}', but got ':'",
    ),
    "duplicate key": ("a.yaml", SITE + "name: b\n", "a.yaml: line 6: not valid YAML: key 'name' is given twice in the same mapping"),
    "empty file": ("a.yaml", "", "a.yaml: the file is empty"),
    "only comments": ("c.yaml", "# nothing yet\n", "c.yaml: the file is empty"),
    "top level is a list": ("a.yaml", "- name: a\n", "a.yaml: expected a mapping of keys at the top level, got list"),
    "source and split folders": (
        "a.yaml", SITE + "  labeled: {images: l/images, masks: l/masks}\n",
        "a.yaml: data.labeled: give either data.source with data.split, or the four split folders, not both",
    ),
    "source without split": (
        "a.yaml", "name: a\nwork_dir: w\ndata: {source: {images: i, masks: m}}\n",
        "a.yaml: data.split: is required with data.source",
    ),
    "split fractions sum": (
        "a.yaml", SITE.replace("{labeled: 0.25,", "{labeled: 0.5,"),
        "a.yaml: data.split: fractions sum to 1.25, they must sum to 1",
    ),
    "split fraction above 1": (
        "a.yaml", SITE.replace("test: 0.25", "test: 1.5"), "a.yaml: data.split.test: 1.5 must be between 0 and 1",
    ),
    "missing split folder": (
        "a.yaml", "name: a\nwork_dir: w\ndata:\n  labeled: {images: i, masks: m}\n",
        "a.yaml: data.calibration: is required (or give data.source and data.split)",
    ),
    "test split without masks": (
        "a.yaml",
        "name: a\nwork_dir: w\ndata:\n" + "".join(f"  {s}: {{images: {s}/i, masks: {s}/m}}\n" for s in SPLITS[:3]) + "  test: {images: t}\n",
        "a.yaml: data.test.masks: is required: the test split needs ground truth",
    ),
    "groups with split folders": (
        "a.yaml",
        "name: a\nwork_dir: w\ndata:\n" + "".join(f"  {s}: {{images: {s}/i, masks: {s}/m}}\n" for s in SPLITS) + "  groups: {pattern: '(p)'}\n",
        "a.yaml: data.groups: only applies with data.source",
    ),
    "groups csv and pattern": (
        "a.yaml", SITE + "  groups: {csv: g.csv, pattern: '^(p\\d+)'}\n", "a.yaml: data.groups: give exactly one of csv or pattern",
    ),
    "bad site name": ("a.yaml", SITE.replace("name: a", "name: 'st mary'"), "a.yaml: name: 'st mary' must be letters, digits"),
    "unset environment variable": (
        "a.yaml", SITE.replace("work_dir: work", f"work_dir: ${{{UNSET}}}/work"),
        f"a.yaml: work_dir: environment variable {UNSET} is not set (needed by '${{{UNSET}}}/work')",
    ),
    "strides/channels mismatch": (
        "c.yaml", CONSORTIUM + "model: {channels: [16, 32, 64, 128], strides: [2, 2]}\n",
        "c.yaml: model.strides: needs one stride fewer than model.channels (4 channels, 2 strides)",
    ),
    "exclude_below > probation_below": (
        "c.yaml", CONSORTIUM + "aggregation: {probation_below: 0.6, exclude_below: 0.7}\n",
        "c.yaml: aggregation.exclude_below: 0.7 must not exceed probation_below (0.6)",
    ),
    "informative gap 0": (
        "c.yaml", CONSORTIUM + "aggregation: {informative_gap: 0}\n",
        "c.yaml: aggregation.informative_gap: 0.0 must be > 0 and at most 1",
    ),
    "unknown ledger statistic": (
        "c.yaml", CONSORTIUM + "aggregation: {statistic: mean}\n",
        "c.yaml: aggregation.statistic: 'mean' is not one of wilson, ema_point",
    ),
    "negative lr": ("c.yaml", CONSORTIUM + "preference: {lr: -1e-4}\n", "c.yaml: preference.lr: -0.0001 must be > 0"),
    "threshold 1.0": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {thresholds: [0.5, 1.0]}}\n",
        "c.yaml: preference.proposals.thresholds[1]: 1.0 must be between 0 and 1",
    ),
    "threshold 0": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {thresholds: [0]}}\n",
        "c.yaml: preference.proposals.thresholds[0]: 0.0 must be between 0 and 1",
    ),
    "unknown tta transform": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {tta: [identity, rot45]}}\n",
        "c.yaml: preference.proposals.tta: 'rot45' is not one of identity, hflip, vflip, hvflip, rot90, rot270",
    ),
    "method not in choices": (
        "c.yaml", CONSORTIUM + "preference: {method: rndpo}\n",
        "c.yaml: preference.method: 'rndpo' is not one of rn_dpo, dpo, pseudo_label, entropy, none",
    ),
    "no warm-up and no checkpoint": (
        "c.yaml", CONSORTIUM + "supervised: {rounds: 0}\n",
        "c.yaml: supervised.rounds: is 0 and no base_checkpoint is given",
    ),
    "oracle at a deployed site": (
        "a.yaml",
        SITE + "judge: {kind: oracle}\n"
        "deployment: {superlink: 'fl.example.org:8000', ca_cert: keys/ca.crt, private_key: keys/a_auth}\n",
        "a.yaml: judge.kind: 'oracle' reads the ground truth of the frames it judges: it is for simulation only",
    ),
    "morph without the identity pass": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {tta: [hflip, vflip], morph: [1, -1]}}\n",
        "c.yaml: preference.proposals.tta: must list identity",
    ),
    "threshold_of identity without the identity pass": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {tta: [hflip], threshold_of: identity}}\n",
        "c.yaml: preference.proposals.tta: must list identity",
    ),
    "top_identity without the identity pass": (
        "c.yaml", CONSORTIUM + "preference: {mining: {strategy: top_identity}, proposals: {tta: [hflip, vflip]}}\n",
        "c.yaml: preference.proposals.tta: must list identity",
    ),
    "threshold_of not in choices": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {threshold_of: median}}\n",
        "c.yaml: preference.proposals.threshold_of: 'median' is not one of mean, identity",
    ),
    "default thresholds without the identity pass": (  # the default thresholds cut the identity pass's map
        "c.yaml", CONSORTIUM + "preference: {proposals: {tta: [hflip, vflip]}}\n",
        "c.yaml: preference.proposals.tta: must list identity",
    ),
    "supervise_unlabeled with a judge-following method": (
        "c.yaml", CONSORTIUM + "preference: {method: rn_dpo, supervise_unlabeled: true}\n",
        "c.yaml: preference.supervise_unlabeled: is the all_labelled control: it needs method none and lambda_sup > 0",
    ),
    "supervise_unlabeled with the default method": (
        "c.yaml", CONSORTIUM + "preference: {supervise_unlabeled: true}\n",
        "c.yaml: preference.supervise_unlabeled: is the all_labelled control: it needs method none",
    ),
    "supervise_unlabeled with lambda_sup 0": (
        "c.yaml", CONSORTIUM + "preference: {method: none, lambda_sup: 0, supervise_unlabeled: true}\n",
        "c.yaml: preference.supervise_unlabeled: is the all_labelled control: it needs method none and lambda_sup > 0",
    ),
    "min_pick_gain above 1": (
        "c.yaml", CONSORTIUM + "preference: {min_pick_gain: 1.5}\n",
        "c.yaml: preference.min_pick_gain: 1.5 must be between -1 and 1",
    ),
    "min_pick_gain below -1": (
        "c.yaml", CONSORTIUM + "preference: {min_pick_gain: -2}\n",
        "c.yaml: preference.min_pick_gain: -2.0 must be between -1 and 1",
    ),
    "morph radius repeated": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {morph: [1, -1, 1]}}\n",
        "c.yaml: preference.proposals.morph: radii must be distinct and non-zero",
    ),
    "morph radius 0": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {morph: [1, 0]}}\n",
        "c.yaml: preference.proposals.morph: radii must be distinct and non-zero (0 is the identity mask)",
    ),
    "max_unlabeled 0": ("c.yaml", CONSORTIUM + "preference: {max_unlabeled: 0}\n", "c.yaml: preference.max_unlabeled: 0 must be > 0"),
    "max_area_ratio 1": (
        "c.yaml", CONSORTIUM + "preference: {proposals: {max_area_ratio: 1.0}}\n",
        "c.yaml: preference.proposals.max_area_ratio: 1.0 must be > 1",
    ),
    "sites not a list": ("c.yaml", CONSORTIUM.replace("[a.yaml]", "a.yaml"), "c.yaml: sites: expected a list, got str 'a.yaml'"),
    "no sites at all": (
        "c.yaml", CONSORTIUM.replace("[a.yaml]", "[]"),
        "c.yaml: sites: list at least one site YAML (simulation) or name sites under server.sites (deployment)",
    ),
}


@pytest.mark.parametrize("name, text, expected", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_file_is_one_error_naming_file_and_key(tmp_path, monkeypatch, name, text, expected):
    monkeypatch.delenv(UNSET, raising=False)
    path = _write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        _load(path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}/"), message
    assert expected in message
    assert "\n" not in message


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read: No such file or directory"):
        load_site(tmp_path / "missing.yaml")


def test_duplicate_site_names_across_the_consortium(tmp_path):
    _write(tmp_path, "a.yaml", SITE)
    _write(tmp_path, "b.yaml", SITE)  # also named `a`
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM.replace("[a.yaml]", "[a.yaml, b.yaml]")))
    with pytest.raises(ConfigError) as info:
        load_consortium_sites(cfg)
    assert str(info.value) == (
        f"{tmp_path / 'c.yaml'}: sites[1]: site name 'a' is used by both {tmp_path / 'a.yaml'} and {tmp_path / 'b.yaml'}"
    )


def test_a_bad_site_of_the_consortium_names_the_site_file(tmp_path):
    _write(tmp_path, "sub/a.yaml", SITE + "judge: {kind: agrement}\n")
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM.replace("[a.yaml]", "[sub/a.yaml]")))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'sub' / 'a.yaml'}: judge.kind: 'agrement'")):
        load_consortium_sites(cfg)


def test_site_channels_must_match_the_model(tmp_path):
    _write(tmp_path, "a.yaml", SITE + "channels: 3\n")
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM))  # model.in_channels defaults to 1
    with pytest.raises(ConfigError) as info:
        load_consortium_sites(cfg)
    assert str(info.value) == (
        f"{tmp_path / 'a.yaml'}: channels: 3 does not match model.in_channels (1) in {tmp_path / 'c.yaml'}"
    )


def test_oracle_is_refused_only_at_a_deployed_site(tmp_path):
    """Simulation keeps the oracle; a site with a deployment: section may run any label-free judge."""
    deployment = "deployment: {superlink: 'fl.example.org:8000', ca_cert: keys/ca.crt, private_key: keys/a_auth}\n"
    assert load_site(_write(tmp_path, "sim.yaml", SITE + "judge: {kind: oracle, noise_std: 0.1}\n")).judge.kind == "oracle"
    for kind in ("agreement", "uncertainty", "learned"):
        site = load_site(_write(tmp_path, f"{kind}.yaml", SITE + f"judge: {{kind: {kind}}}\n" + deployment))
        assert site.judge.kind == kind and site.deployment is not None
    path = _write(tmp_path, "deployed.yaml", SITE + "judge: {kind: oracle}\n" + deployment)
    with pytest.raises(ConfigError) as info:
        load_site(path)
    assert str(info.value).startswith(f"{path}: judge.kind: 'oracle'") and "deployment: section" in str(info.value)


def test_identity_derived_proposals_need_the_identity_pass(tmp_path):
    for extra in ("proposals: {morph: [1, -1], max_area_ratio: 3}", "proposals: {threshold_of: identity}",
                  "mining: {strategy: top_identity}"):
        cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + f"preference: {{{extra}}}\n"))  # default tta lists identity
        assert "identity" in cfg.preference.proposals.tta
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + (
        "preference:\n"
        "  max_unlabeled: 64\n"
        "  method: none\n"  # supervise_unlabeled is the all_labelled control: method none only
        "  supervise_unlabeled: true\n"
        "  mining: {strategy: top_identity}\n"
        "  proposals: {tta: [hflip, identity], threshold_of: identity, morph: [2, -1], max_area_ratio: 2.5}\n"
    )))
    pref = cfg.preference
    assert (pref.max_unlabeled, pref.method, pref.supervise_unlabeled, pref.mining.strategy) == (64, "none", True, "top_identity")
    assert (pref.proposals.threshold_of, pref.proposals.morph, pref.proposals.max_area_ratio) == ("identity", (2, -1), 2.5)
    # thresholds of the identity pass need it only when there are thresholds
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + (
        "preference: {proposals: {tta: [hflip], threshold_of: identity, thresholds: []}}\n")))
    assert cfg.preference.proposals.thresholds == ()


def test_the_new_refusals_leave_the_settings_they_are_for(tmp_path):
    """supervise_unlabeled loads with method none; min_pick_gain with every judge-following method and
    at the bounds; distinct non-zero morph radii of either sign."""
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + "preference: {method: none, supervise_unlabeled: true}\n"))
    assert (cfg.preference.method, cfg.preference.supervise_unlabeled, cfg.preference.lambda_sup) == ("none", True, 1.0)
    for method in ("rn_dpo", "dpo", "pseudo_label"):
        for gain in (-1, 0.0, 0.02, 1):
            cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + f"preference: {{method: {method}, min_pick_gain: {gain}}}\n"))
            assert (cfg.preference.method, cfg.preference.min_pick_gain) == (method, gain)
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + "preference: {proposals: {morph: [2, 1, -1, -2]}}\n"))
    assert cfg.preference.proposals.morph == (2, 1, -1, -2)
    for method in ("none", "entropy"):  # a consortium-wide gate loads with them (it has nothing to gate there)
        cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + f"preference: {{method: {method}, min_pick_gain: 0.01}}\n"))
        assert cfg.preference.min_pick_gain == 0.01


def test_deployment_only_consortium_lists_no_site_files(tmp_path):
    cfg = load_consortium(_write(tmp_path, "c.yaml", "name: c\nrun_dir: runs\nserver: {sites: [a, b]}\n"))
    assert cfg.sites == () and cfg.server.sites == ("a", "b")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'c.yaml'}: sites: a simulation needs the site YAMLs")):
        load_consortium_sites(cfg)


# ----------------------------------------------------------------------------- values


def test_defaults_are_filled(tmp_path):
    site = load_site(_write(tmp_path, "a.yaml", SITE))
    assert (site.image_size, site.channels, site.device) == (128, 1, "auto")
    assert site.judge == JudgeConfig() and site.judge.kind == "agreement"
    assert site.data.seed == 0 and site.data.groups is None and site.deployment is None
    assert site.data.labeled is None and site.data.split == SplitFractions(0.25, 0.25, 0.25, 0.25)
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM))
    assert cfg.model == ModelConfig() and cfg.preference == PreferenceConfig() and cfg.aggregation == AggregationConfig()
    assert cfg.seed == 0 and cfg.base_checkpoint is None
    assert cfg.preference.lr == 1e-4 and cfg.model.strides == (2, 2, 2) and cfg.model.in_channels == 1
    proposals = cfg.preference.proposals
    # thresholds of the identity pass's own map by default: 0.3 and 0.7 (0.5 would be the identity mask itself)
    assert (proposals.thresholds, proposals.threshold_of) == ((0.3, 0.7), "identity") and "identity" in proposals.tta
    assert (proposals.morph, proposals.max_area_ratio) == ((), None)
    assert cfg.preference.max_unlabeled is None and cfg.preference.supervise_unlabeled is False
    assert cfg.preference.min_pick_gain is None


def test_exponent_numbers_load_as_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; config turns it into the float meant
    cfg = load_consortium(_write(tmp_path, "c.yaml", CONSORTIUM + (
        "supervised: {lr: 1e-3}\n"
        "preference: {lr: 1e-4, beta: 2, proposals: {thresholds: [3e-1, 0.5, 7E-1]}}\n"
    )))
    assert cfg.supervised.lr == 1e-3 and isinstance(cfg.supervised.lr, float)
    assert cfg.preference.lr == 1e-4 and isinstance(cfg.preference.lr, float)
    assert cfg.preference.beta == 2.0 and isinstance(cfg.preference.beta, float)  # an integer is a number too
    assert cfg.preference.proposals.thresholds == (0.3, 0.5, 0.7)


def test_relative_paths_resolve_against_the_yaml_folder_not_the_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    site = load_site(_write(tmp_path, "conf/sites/a.yaml", SITE + "  groups: {csv: ../groups.csv}\n"))
    assert site.work_dir == tmp_path / "conf" / "sites" / "work"
    assert site.data.source == Folder(tmp_path / "conf/sites/all/images", tmp_path / "conf/sites/all/masks")
    assert site.data.groups.csv == tmp_path / "conf" / "groups.csv"
    assert site.source_file == tmp_path / "conf" / "sites" / "a.yaml"
    cfg = load_consortium(_write(tmp_path, "conf/c.yaml", CONSORTIUM.replace("[a.yaml]", "[sites/a.yaml, /abs/b.yaml]")))
    assert cfg.sites == (tmp_path / "conf" / "sites" / "a.yaml", Path("/abs/b.yaml"))
    assert cfg.run_dir == tmp_path / "conf" / "runs"


@pytest.mark.parametrize(
    "environment, expected",
    [
        ({}, "fallback/data"),  # unset: the default, relative to the YAML's folder
        ({"ROOT_FOR_TEST": ""}, "fallback/data"),  # set but empty: the default, as in sh
        ({"ROOT_FOR_TEST": "/mnt/x"}, "/mnt/x/data"),
        ({"ROOT_FOR_TEST": "rel"}, "rel/data"),  # a relative value is relative to the YAML's folder too
    ],
)
def test_environment_variable_with_default(tmp_path, monkeypatch, environment, expected):
    monkeypatch.delenv("ROOT_FOR_TEST", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    site = load_site(_write(tmp_path, "a.yaml", SITE.replace("work_dir: work", "work_dir: ${ROOT_FOR_TEST:-fallback}/data")))
    assert site.work_dir == (tmp_path / expected).resolve()


def test_environment_variable_without_default_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ROOT_FOR_TEST", str(tmp_path / "set"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    site = load_site(_write(tmp_path, "a.yaml", SITE.replace("work_dir: work", "work_dir: ${ROOT_FOR_TEST}/w").replace(
        "all/images", "~/images")))
    assert site.work_dir == tmp_path / "set" / "w"
    assert site.data.source.images == tmp_path / "home" / "images"


def _all_configs():
    demo = load_consortium(SITES / "demo" / "consortium.yaml")
    polyp = load_consortium(SITES / "polyp" / "consortium.yaml")
    extra = [load_site(SITES / "polyp" / f"{n}.yaml") for n in ("etis_larib", "cvc_colondb")] + [load_site(EXAMPLE)]
    return [demo, *load_consortium_sites(demo), polyp, *load_consortium_sites(polyp), *extra]


def _paths(value):
    """Every Path in a loaded config."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if not f.metadata.get("internal"):
                yield from _paths(getattr(value, f.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _paths(item)
    elif isinstance(value, Path):
        yield value


def test_to_yaml_round_trips_with_absolute_paths(tmp_path):
    for i, cfg in enumerate(_all_configs()):
        text = to_yaml(cfg)
        assert "source_file" not in yaml.safe_load(text)
        paths = list(_paths(cfg))
        assert paths and all(p.is_absolute() and (f": {p}\n" in text or f"- {p}\n" in text) for p in paths), text
        # written somewhere else entirely: absolute paths mean nothing moves
        path = _write(tmp_path / f"copy{i}", "c.yaml" if isinstance(cfg, ConsortiumConfig) else "a.yaml", text)
        again = _load(path)
        assert _strip(again) == _strip(cfg)
        assert to_dict(again) == to_dict(cfg)


def test_demo_consortium_and_sites_load():
    cfg = load_consortium(SITES / "demo" / "consortium.yaml")
    sites = load_consortium_sites(cfg)
    assert [s.name for s in sites] == ["montgomery", "shenzhen_a", "shenzhen_b"]
    assert cfg.run_dir == REPO / "runs" / "demo" and cfg.federation.min_sites == 2
    assert all(s.data.source.images.is_dir() and s.channels == 1 for s in sites)
    assert [s.judge.kind for s in sites] == ["oracle", "agreement", "oracle"] and sites[2].judge.invert


POLYP_SITES = ("kvasir_seg", "cvc_clinicdb", "etis_larib", "cvc_colondb")


@pytest.mark.parametrize("polyp_data", [None, "/elsewhere/polyp"])
def test_polyp_sites_take_their_root_from_POLYP_DATA(monkeypatch, polyp_data):
    monkeypatch.delenv("POLYP_DATA", raising=False)
    if polyp_data:
        monkeypatch.setenv("POLYP_DATA", polyp_data)
    root = Path(polyp_data) if polyp_data else (REPO.parent / "shared" / "data" / "polyp").resolve()
    for name in POLYP_SITES:
        site = load_site(SITES / "polyp" / f"{name}.yaml")
        assert (site.name, site.channels, site.image_size) == (name, 3, 128)
        assert site.data.source == Folder(root / name / "images", root / name / "masks")
        assert (site.judge.kind, site.judge.noise_std) == ("oracle", 0.1)
    clinic = load_site(SITES / "polyp" / "cvc_clinicdb.yaml")
    assert clinic.data.groups == Groups(csv=root / "cvc_clinicdb" / "sequences.csv", key_column="image", column="sequence")
    for name in ("etis_larib", "cvc_colondb"):  # unseen centres: everything is test
        assert load_site(SITES / "polyp" / f"{name}.yaml").data.split == SplitFractions(0.0, 0.0, 0.0, 1.0)
    cfg = load_consortium(SITES / "polyp" / "consortium.yaml")
    assert [s.name for s in load_consortium_sites(cfg)] == ["kvasir_seg", "cvc_clinicdb"]


# ----------------------------------------------------------------------------- the template


def _field_names(cls) -> set[str]:
    """Every key a YAML of `cls` may hold, nested dataclasses included."""
    names = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        names.add(f.name)
        for sub in (hints[f.name], *typing.get_args(hints[f.name])):
            if dataclasses.is_dataclass(sub):
                names |= _field_names(sub)
    return names


def test_example_site_documents_every_key():
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^[#\s]*([a-z_]+):", text, flags=re.M))
    assert _field_names(SiteConfig) <= keys, _field_names(SiteConfig) - keys


def test_example_site_loads_and_check_reports_the_missing_folders():
    site = load_site(EXAMPLE)  # loading never looks at the folders
    assert site.name == "hospital-a" and site.work_dir == Path("/data/hospital/fl-work")
    assert site.data.labeled == Folder(Path("/data/hospital/labeled/images"), Path("/data/hospital/labeled/masks"))
    assert site.data.unlabeled == Folder(Path("/data/hospital/unlabeled/images"), None)
    assert site.data.source is None and site.judge == JudgeConfig()
    assert site.deployment == DeploymentConfig(
        "fl.consortium.example.org:8000", Path("/data/hospital/fl-keys/ca.crt"), Path("/data/hospital/fl-keys/hospital-a_auth"), 9094
    )
    problems = [str(p) for p in check_site_data(site)]
    for split in SPLITS:
        assert f"/data/hospital/{split}/images: folder does not exist" in problems
    assert len(problems) == 7  # four image folders, three mask folders


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_example_site_passes_check_once_the_folders_exist(tmp_path):
    root = tmp_path / "hospital"
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 24), np.uint8)
    mask[5:15, 8:16] = 255
    for split in SPLITS:
        for stem in ("case1", "case2", "case3", "case4", "case5"):  # min_images (5) a split: no warning
            _png(root / split / "images" / f"{stem}.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
            if split != "unlabeled":
                _png(root / split / "masks" / f"{stem}.png", mask)
    path = _write(tmp_path, "my-site.yaml", EXAMPLE.read_text().replace("/data/hospital", str(root)))
    site = load_site(path)
    assert site.data.test.masks == root / "test" / "masks"
    assert check_site_data(site) == []


def _alternative(text: str) -> str:
    """The template with its commented-out `source` block in place of the four split folders."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# >>> alternative"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("# <<< alternative"))
    block = [re.sub(r"^  # ?", "  ", line) for line in lines[start + 1 : end]]
    data = next(i for i, line in enumerate(lines) if line == "data:")
    return "\n".join(lines[: data + 1] + block + lines[end + 1 :]) + "\n"


def test_example_site_alternative_source_form_loads(tmp_path):
    text = _alternative(EXAMPLE.read_text())
    site = load_site(_write(tmp_path, "csv.yaml", text))
    data = site.data
    assert data.labeled is None and data.source == Folder(Path("/data/hospital/all/images"), Path("/data/hospital/all/masks"))
    assert data.split == SplitFractions() and data.seed == 0
    assert data.groups == Groups(csv=Path("/data/hospital/all/patients.csv"), key_column="image", column="patient")
    # the pattern variant: uncomment `pattern`, drop the csv keys
    lines = [line for line in text.splitlines() if not re.match(r"\s+(csv|key_column|column):", line)]
    lines = [re.sub(r"^(\s+)# (pattern:)", r"\1\2", line) for line in lines]
    site = load_site(_write(tmp_path, "pattern.yaml", "\n".join(lines) + "\n"))
    assert site.data.groups == Groups(pattern=r"^(P\d+)_")
