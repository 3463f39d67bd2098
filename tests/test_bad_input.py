"""A bad day's inputs give one line naming the file and the key, never a traceback (issue 15,
item 4), and every command-line option says what it is for (item 6).

Each case runs the installed console script, as a hospital or an operator would; none of them
reaches Ray, a SuperLink or a SuperNode, so none depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl_client.cli import build_parser as client_parser
from fl_server.cli import build_parser as server_parser
from fl_server.run_dir import RunDir, config_hash
from fl_sim.cli import build_parser as sim_parser
from shared.config import load_consortium
from shared.ledger import Ledger

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO = REPO / "data" / "demo" / "lung_cxr" / "montgomery"
LATIN1_COMMENT = "# Hôpital de la Croix-Rousse\n".encode("latin-1")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    path = BIN / script
    exe = str(path) if path.exists() else shutil.which(script)
    if exe is None:
        pytest.skip(f"console script {script} is not installed (pip install -e .)")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _site(folder: Path, name: str = "lyon", extra: str = "", work_dir: str = "work") -> Path:
    """A valid site YAML on the bundled demo images (fl-client check finds nothing wrong with them)."""
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nwork_dir: {work_dir}\n{extra}"
        f"data:\n  source: {{images: {DEMO / 'images'}, masks: {DEMO / 'masks'}}}\n"
        "  split: {labeled: 0.2, calibration: 0.15, unlabeled: 0.45, test: 0.2}\n"
    )
    return path


def _consortium(folder: Path, sites: list[Path], rounds: int = 2, name: str = "consortium.yaml") -> Path:
    path = folder / name
    path.write_text(f"name: bad-day\nrun_dir: run\nsites: [{', '.join(str(s) for s in sites)}]\n"
                    f"supervised: {{rounds: 1, steps: 1}}\npreference: {{rounds: {rounds}}}\n")
    return path


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- not UTF-8


def _latin1(path: Path) -> Path:
    path.write_bytes(LATIN1_COMMENT + path.read_bytes())
    return path


def _expected_encoding_error(path: Path) -> str:
    offset = LATIN1_COMMENT.index("ô".encode("latin-1"))
    return f"{path}: not UTF-8 text (byte 0xf4 at offset {offset}, line 1); save it as UTF-8"


@pytest.mark.parametrize("command", ["check", "local", "start"])
def test_latin1_site_yaml_is_one_line_in_fl_client(tmp_path, command):
    site = _latin1(_site(tmp_path))
    line = _one_line(_run("fl-client", command, "--site", str(site)))
    assert line == f"fl-client: {_expected_encoding_error(site)}"


@pytest.mark.parametrize("latin1", ["site", "consortium"])
def test_latin1_yaml_is_one_line_in_fl_sim(tmp_path, latin1):
    site = _site(tmp_path)
    consortium = _consortium(tmp_path, [site])
    bad = _latin1(site if latin1 == "site" else consortium)
    line = _one_line(_run("fl-sim", "--consortium", str(consortium)))
    assert line == f"fl-sim: {_expected_encoding_error(bad)}"


@pytest.mark.parametrize("command, latin1", [("provision", "site"), ("provision", "consortium"),
                                             ("start", "consortium"), ("revoke", "consortium")])
def test_latin1_yaml_is_one_line_in_fl_server(tmp_path, command, latin1):
    """(provision is the one fl-server command that reads the site YAMLs: for their names.)"""
    site = _site(tmp_path)
    consortium = _consortium(tmp_path, [site])
    bad = _latin1(site if latin1 == "site" else consortium)
    args = {"provision": ["--out", str(tmp_path / "p")], "start": [], "revoke": []}[command]
    site_arg = ["lyon"] if command == "revoke" else []
    line = _one_line(_run("fl-server", command, *site_arg, "--consortium", str(consortium), *args))
    assert line == f"fl-server: {_expected_encoding_error(bad)}"


# ----------------------------------------------------------------------------- device and work_dir

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: device cuda is usable")


def _bad_machine_site(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A site YAML whose `device` or `work_dir` is unusable here, and the key that says so."""
    if case == "device":
        return _site(tmp_path, extra="device: cuda\n"), "device"
    (tmp_path / "blocker").write_text("a file, where work_dir wants a folder\n")
    return _site(tmp_path, work_dir="blocker/work"), "work_dir"


@no_cuda
@pytest.mark.parametrize("case", ["device", "work_dir"])
def test_check_reports_an_unusable_device_or_work_dir(tmp_path, case):
    site, key = _bad_machine_site(tmp_path, case)
    result = _run("fl-client", "check", "--site", str(site))
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stdout
    assert errors[0].startswith(f"error: {site}: {key}: "), errors
    assert "ready" not in result.stdout and "Traceback" not in result.stderr


@no_cuda
@pytest.mark.parametrize("command", ["local", "start"])
@pytest.mark.parametrize("case", ["device", "work_dir"])
def test_local_and_start_refuse_an_unusable_device_or_work_dir(tmp_path, command, case):
    site, key = _bad_machine_site(tmp_path, case)
    line = _one_line(_run("fl-client", command, "--site", str(site)))
    assert line.startswith(f"fl-client: {site}: {key}: "), line
    if case == "device":
        assert "'cuda'" in line and "auto" in line and "cpu" in line  # says what would be valid


@no_cuda
@pytest.mark.parametrize("case", ["device", "work_dir"])
def test_fl_sim_refuses_a_site_its_machine_cannot_run(tmp_path, case):
    site, key = _bad_machine_site(tmp_path, case)
    line = _one_line(_run("fl-sim", "--consortium", str(_consortium(tmp_path, [site]))))
    assert line.startswith(f"fl-sim: {site}: {key}: "), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_reports_a_read_only_work_dir(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o500)
    try:
        result = _run("fl-client", "check", "--site", str(_site(tmp_path)))
    finally:
        work.chmod(0o700)
    assert result.returncode == 1
    assert [line for line in result.stdout.splitlines() if line.startswith("error: ")] == [
        line for line in result.stdout.splitlines() if line.startswith(f"error: {tmp_path / 'lyon.yaml'}: work_dir: ")]


def test_check_creates_a_missing_work_dir_and_leaves_nothing_in_it(tmp_path):
    result = _run("fl-client", "check", "--site", str(_site(tmp_path, work_dir="new/work")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "new" / "work").is_dir() and not list((tmp_path / "new" / "work").iterdir())


# ----------------------------------------------------------------------------- resume


def _run_with_checkpoint(tmp_path: Path, rounds_done: int) -> tuple[Path, Path]:
    """A consortium YAML and a run dir whose last checkpoint is round `rounds_done`."""
    consortium = _consortium(tmp_path, [_site(tmp_path)])
    cfg = load_consortium(consortium)
    run = RunDir(tmp_path / "run")
    run.start(cfg)
    run.save_round(rounds_done, {"w": torch.zeros(1)}, Ledger(), config_hash(cfg))
    return consortium, run.path


def test_fl_sim_resume_with_a_changed_config_is_one_line_naming_what_changed(tmp_path):
    _, run_dir = _run_with_checkpoint(tmp_path, 1)
    changed = _consortium(tmp_path, [tmp_path / "lyon.yaml"], rounds=3, name="changed.yaml")
    line = _one_line(_run("fl-sim", "--consortium", str(changed), "--run-dir", str(run_dir), "--resume"))
    assert line.startswith(f"fl-sim: {run_dir}: "), line
    assert "preference.rounds: 2 -> 3" in line and "new --run-dir" in line


def test_fl_sim_resume_of_a_finished_run_says_so_and_exits_0(tmp_path):
    consortium, run_dir = _run_with_checkpoint(tmp_path, 3)  # 1 supervised + 2 preference
    result = _run("fl-sim", "--consortium", str(consortium), "--run-dir", str(run_dir), "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"fl-sim: {run_dir}: the run is already finished (3 of 3 rounds), nothing to resume; "
        f"report: {run_dir / 'report.html'}"]
    assert result.stderr == ""  # no Ray, no Flower


@pytest.mark.parametrize("finished", [False, True])
def test_fl_server_start_resume_checks_the_run_before_the_superlink(tmp_path, finished):
    consortium, run_dir = _run_with_checkpoint(tmp_path, 3 if finished else 1)
    provisioned = tmp_path / "p"  # what start looks for; never used, the check comes first
    (provisioned / "server" / "supernode_keys").mkdir(parents=True)
    for name in ("ca.crt", "server.crt", "server.key"):
        (provisioned / "server" / name).write_text("not used\n")
    target = consortium if finished else _consortium(tmp_path, [tmp_path / "lyon.yaml"], rounds=3, name="c2.yaml")
    result = _run("fl-server", "start", "--consortium", str(target), "--provisioned", str(provisioned),
                  "--run-dir", str(run_dir), "--resume")
    if finished:
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1].startswith(f"fl-server: {run_dir}: the run is already finished")
        assert not (run_dir / "superlink").exists()
    else:
        line = _one_line(result)
        assert line.startswith(f"fl-server: {run_dir}: ") and "preference.rounds: 2 -> 3" in line


# ----------------------------------------------------------------------------- help texts


def _options():
    """(command, option, action) for every option of every subcommand of the three CLIs."""
    found = []

    def walk(parser: argparse.ArgumentParser, name: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not isinstance(action, argparse._HelpAction):
                found.append(pytest.param(action, id=f"{name} {'/'.join(action.option_strings) or action.dest}"))

    for prog, build in (("fl-server", server_parser), ("fl-client", client_parser), ("fl-sim", sim_parser)):
        walk(build(), prog)
    return found


@pytest.mark.parametrize("action", _options())
def test_every_option_has_help(action):
    assert action.help and action.help.strip() and action.help != argparse.SUPPRESS


def test_server_start_help_says_where_host_port_and_sites_are_set():
    result = _run("fl-server", "start", "--help")
    assert result.returncode == 0
    for words in ("server:", "address", "port", "hosts", "sites", "provision"):
        assert words in result.stdout, words
