"""The consortium on Flower's deployment engine, end to end, with real processes on 127.0.0.1.

`fl-server provision`, then `fl-server start` (flower-superlink with TLS and SuperNode
authentication, our app submitted with `flwr run`) and two `fl-client start` (authenticated
flower-supernodes running our ClientApp) for two tiny demo sites: one supervised and one
preference round. Then the refusals against a second SuperLink started with the functions
`fl-server start` uses: a key never registered, a client trusting another CA, a site revoked
with `fl-server revoke` while connected. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fl_client.flower_speedups import FORK_MARKER
from fl_client.supernode import SENT_LOG
from fl_server import operator as op
from fl_server import superlink as sl
from fl_server.provision import make_site_key, provision
from shared import wire
from shared.config import load_consortium, load_site
from shared.flower_env import FLOWER_ENV

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "lung_cxr"
BIN = Path(sys.executable).parent
SITES = ("montgomery", "shenzhen_a")
IMAGE_SIZE = 32


# ---------------------------------------------------------------------------- processes


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Procs:
    """Processes this test module started: each in its own session, output in a file;
    stopped with SIGTERM (as Ctrl-C would), then SIGKILL for it and everything it started."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.procs = root, env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen([*args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, cwd=self.root, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return sl.strip_ansi((self.root / f"{name}.log").read_text(errors="replace"))

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output(name):
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited ({self.procs[name].returncode}):\n{self.output(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: no {text!r} after {timeout:.0f}s:\n{self.output(name)[-3000:]}")
            time.sleep(0.2)

    def stop(self, name: str, timeout: float = 20.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        stragglers = _descendants(proc.pid)
        if proc.poll() is None:
            stragglers.append(proc.pid)
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(5)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


# ---------------------------------------------------------------------------- fixtures


def write_site(root: Path, name: str, port: int, superlink: str, key: Path | None = None,
               ca: Path | None = None, label: str | None = None, data: str | None = None) -> Path:
    files = root / "prov" / "sites" / name
    path = root / f"{label or name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        work_dir: {root / 'work' / (label or name)}
        image_size: {IMAGE_SIZE}
        device: cpu
        data:
          source: {{images: {DEMO / (data or name) / 'images'}, masks: {DEMO / (data or name) / 'masks'}}}
          split: {{labeled: 0.2, calibration: 0.15, unlabeled: 0.45, test: 0.2}}
        judge: {{kind: agreement}}
        deployment:
          superlink: {superlink}
          ca_cert: {ca or files / 'ca.crt'}
          private_key: {key or files / f'{name}_auth'}
          port: {port}
        """))
    return path


def _run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """Site and consortium YAMLs, provisioned with `fl-server provision`. Each site makes its
    own key (`fl-client keygen`): montgomery before provision (`--public-key`), shenzhen_a in
    the folder provision made for it, registered with `fl-server add-site`."""
    root = tmp_path_factory.mktemp("deployment")
    port = sl.free_port()
    env = dict(os.environ, **FLOWER_ENV, FLWR_HOME=str(root / "flwr_home"), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    keygen = _run(env, BIN / "fl-client", "keygen", "--name", "montgomery", "--out", root / "keys")
    assert keygen.returncode == 0, keygen.stderr
    own_keys = {"montgomery": root / "keys" / "montgomery_auth",
                "shenzhen_a": root / "hospital-shenzhen_a" / "shenzhen_a_auth"}
    sites = [write_site(root, name, sl.free_port(), f"127.0.0.1:{port}", key=own_keys[name]) for name in SITES]
    # montgomery runs Flower as shipped (the default); shenzhen_a opts in to flower_speedups
    sites[1].write_text(sites[1].read_text() + "  fast_start: true\n")  # the deployment: block is last
    path = root / "consortium.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: deploy-test
        sites: [{', '.join(p.name for p in sites)}]
        run_dir: {root / 'run'}
        seed: 1
        model: {{name: unet, channels: [8, 16], strides: [2], num_res_units: 1, dropout: 0.1}}
        supervised: {{rounds: 1, steps: 2, lr: 0.01, batch_size: 4}}
        preference:
          rounds: 1
          steps: 1
          batch_pairs: 4
          proposals: {{tta: [identity, hflip], mc_samples: 1, thresholds: [0.3, 0.5, 0.7]}}
        federation: {{min_sites: 2, round_timeout: 120}}
        server: {{hosts: [127.0.0.1], address: 127.0.0.1, port: {port}}}
        """))
    done = _run(env, BIN / "fl-server", "provision", "--consortium", path, "--out", root / "prov",
                "--public-key", f"montgomery={root / 'keys' / 'montgomery_auth.pub'}")
    assert done.returncode == 0, done.stderr
    shutil.copytree(root / "prov" / "sites" / "shenzhen_a", root / "hospital-shenzhen_a")  # sent to the site
    made = _run(env, BIN / "fl-client", "keygen", "--site", root / "hospital-shenzhen_a" / "site.yaml")
    assert made.returncode == 0 and "fl-server add-site shenzhen_a" in made.stdout, made.stderr
    added = _run(env, BIN / "fl-server", "add-site", "shenzhen_a", "--public-key",
                 own_keys["shenzhen_a"].with_name("shenzhen_a_auth.pub"), "--consortium", path,
                 "--provisioned", root / "prov")
    assert added.returncode == 0 and "registered at the next fl-server start" in added.stdout, added.stderr
    return {"root": root, "path": path, "sites": dict(zip(SITES, sites)), "env": env,
            "provision_output": done.stdout, "port": port, "own_keys": own_keys}


@pytest.fixture(scope="module")
def run(consortium):
    """`fl-server start` and two `fl-client start`, until the run ends."""
    root = consortium["root"]
    procs = Procs(root, consortium["env"])
    try:
        started = time.monotonic()
        for name, site in consortium["sites"].items():  # sites first: they wait for the server
            procs.start(f"client-{name}", str(BIN / "fl-client"), "start", "--site", str(site))
        server = procs.start("server", str(BIN / "fl-server"), "start", "--consortium",
                             str(consortium["path"]), "--provisioned", str(root / "prov"))
        server.wait(420)  # montgomery, Flower as shipped: a fresh ClientApp process per message
        seconds = time.monotonic() - started
        client_codes = {name: procs.stop(f"client-{name}") for name in SITES}  # SIGTERM = Ctrl-C
        yield {"server_code": server.returncode, "server": procs.output("server"), "seconds": seconds,
               "client_codes": client_codes, "run_dir": root / "run",
               "clients": {name: procs.output(f"client-{name}") for name in SITES}}
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def link(consortium, run):
    """A second SuperLink (new database, every key registered), started by the functions
    `fl-server start` uses, for the refusal tests; and a Procs for their clients."""
    cfg = load_consortium(consortium["path"])
    paths = op.OperatorPaths.of(consortium["root"] / "prov")
    said: list[str] = []  # what `fl-server start` prints on the operator's console
    handle, connection = op.start_consortium_superlink(
        cfg, paths, consortium["root"] / "run2", say=said.append,
        host="127.0.0.1", port=sl.free_port())
    procs = Procs(consortium["root"], consortium["env"])
    try:
        yield {"handle": handle, "connection": connection, "paths": paths, "procs": procs,
               "address": handle.address, "said": said}
    finally:
        procs.stop_all()
        handle.stop()
        assert not handle.is_running()


# ---------------------------------------------------------------------------- provision


def test_provision_holds_only_public_keys_and_writes_site_yaml(consortium):
    prov = consortium["root"] / "prov"
    assert "_auth (private" not in consortium["provision_output"]
    assert "no public key yet for shenzhen_a" in consortium["provision_output"]
    assert not list((prov / "sites").rglob("*_auth"))  # the operator never holds a site's private key
    for name in SITES:
        folder = prov / "sites" / name
        assert consortium["own_keys"][name].stat().st_mode & 0o777 == 0o600
        assert (prov / "server" / "supernode_keys" / f"{name}.pub").read_text() == \
            consortium["own_keys"][name].with_name(f"{name}_auth.pub").read_text()
        skeleton = load_site(folder / "site.yaml")  # loads; data paths are placeholders
        assert skeleton.name == name
        assert skeleton.deployment.superlink == f"127.0.0.1:{consortium['port']}"
        assert skeleton.deployment.ca_cert == folder / "ca.crt"
        assert skeleton.deployment.private_key == folder / f"{name}_auth"
        assert "/path/to/labeled/images" in (folder / "site.yaml").read_text()
        assert "README.txt" in os.listdir(folder)

    keys = {p: p.read_bytes() for p in (prov / "server" / "supernode_keys").iterdir()}
    again = _run(consortium["env"], BIN / "fl-server", "provision", "--consortium", consortium["path"],
                 "--out", prov)
    assert again.returncode == 0 and "no public key yet" not in again.stdout, again.stderr
    assert {p: p.read_bytes() for p in keys} == keys


# ---------------------------------------------------------------------------- the run


def test_run_completes_over_tls_with_authenticated_sites(run):
    assert run["server_code"] == 0, run["server"][-4000:]
    assert "key registered" in run["server"] and "finished:completed" in run["server"]
    assert "Round 2 (preference)" in run["server"]  # the ServerApp's tables were streamed
    for name in SITES:
        assert f"site {name}: connected" in run["clients"][name]
        assert run["client_codes"][name] == 0  # SIGTERM stops it cleanly
        assert f"site {name}: stopped; rejoin with: fl-client start --site" in run["clients"][name]
    print(f"\nfl-server start + 2 x fl-client start, 2 rounds: {run['seconds']:.0f}s")


def test_flower_speedups_only_where_the_site_opted_in(consortium, run):
    logs = {name: (consortium["root"] / "work" / name / "supernode" / "supernode.log").read_text()
            for name in SITES}
    assert "flower_speedups" not in logs["montgomery"]  # Flower as shipped
    assert FORK_MARKER in logs["shenzhen_a"] and "idle poll 0.5 s" in logs["shenzhen_a"]


def test_run_directory_is_complete(run):
    run_dir = run["run_dir"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for round_number in (1, 2):
        # every site replied with a usable update (its agreement judge may be excluded by the ledger)
        ok = {line["site"] for line in lines if line["kind"] == "site"
              and line["round"] == round_number and line["status"] in ("ok", "excluded")}
        assert ok == set(SITES), lines
        assert all("dice" in line["eval"] for line in lines if line["kind"] == "site")
    assert json.loads((run_dir / "ledger.json").read_text())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_001.pt", "round_002.pt"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "superlink" / "superlink.db").is_file()


def test_sites_sent_only_weights_scalar_metrics_and_their_name(consortium, run):
    """Every reply each site sent (its sent.log, written by the ClientApp's mod around every
    handler; as many entries as its SuperNode's "Sending:" lines) holds the model's arrays,
    scalar metrics and the site's name: no image-shaped array, no per-image value."""
    import torch

    from shared.site import model_from_config

    cfg = load_consortium(consortium["path"])
    torch.manual_seed(0)
    shapes = {k: list(v.shape) for k, v in model_from_config(cfg.model).state_dict().items()}
    for name in SITES:
        work = consortium["root"] / "work" / name
        entries = [json.loads(line) for line in (work / SENT_LOG).read_text().splitlines()]
        supernode_log = sl.strip_ansi((work / "supernode" / "supernode.log").read_text())
        assert len(entries) == supernode_log.count("Sending: ") > 0
        assert sorted(e["message_type"] for e in entries) == ["evaluate"] * 2 + ["query"] + ["train"] * 2
        stems = {p.stem for p in (DEMO / name / "images").iterdir()}
        for entry in entries:
            assert "error" not in entry, entry
            records = entry["records"]
            expected = {"metrics", "site"} | ({"arrays"} if entry["message_type"] == "train" else set())
            assert set(records) == expected
            assert records["site"] == {"kind": "config", "items": {"name": name}}
            metrics = records["metrics"]["items"]
            for key, value in metrics.items():
                assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
                assert re.fullmatch(r"[a-z0-9_-]+", key) and not any(stem in key for stem in stems)
            if "arrays" in records:
                assert records["arrays"]["packed"] is True  # one buffer, layout checked against it
                arrays = records["arrays"]["items"]
                assert {k: v["shape"] for k, v in arrays.items()} == shapes
                assert not any(v["shape"][-2:] == [IMAGE_SIZE, IMAGE_SIZE] for v in arrays.values())


def test_packed_arrays_round_trip_in_fewer_objects():
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from shared.site import model_from_config

    cfg = load_consortium(Path(__file__).resolve().parents[1] / "sites" / "demo" / "consortium.yaml")
    state = model_from_config(cfg.model).state_dict()  # 49 tensors

    def content():
        return RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"phase": "x"})})

    packed = wire.pack_arrays(content())
    assert len(get_all_nested_objects(packed)) <= 6 < 50 < len(get_all_nested_objects(content()))
    back = wire.unpack_arrays(packed)
    assert set(back) == {"arrays", "config"} and back["config"]["phase"] == "x"
    restored = back["arrays"].to_torch_state_dict()
    assert list(restored) == list(state) and all(torch.equal(restored[k], state[k]) for k in state)
    assert wire.unpack_arrays(content())["arrays"].keys() == state.keys()  # unpacked: unchanged

    layout = json.loads(str(packed[wire.PACKED_LAYOUT]["layout"]))
    layout["arrays"][0][4] += 4  # a layout that does not match the buffer
    packed[wire.PACKED_LAYOUT] = ConfigRecord({"layout": json.dumps(layout)})
    with pytest.raises(ValueError, match="bytes, layout says"):
        wire.unpack_arrays(packed)


# ---------------------------------------------------------------------------- refusals


def test_unregistered_key_is_refused(consortium, link):
    root = consortium["root"]
    private, public = make_site_key()
    key = root / "intruder_auth"
    key.write_bytes(private)
    key.chmod(0o600)
    site = write_site(root, "montgomery", sl.free_port(), "127.0.0.1:1", key=key, label="intruder")
    proc = link["procs"].start("client-intruder", str(BIN / "fl-client"), "start", "--site", str(site),
                               "--superlink", link["address"])  # the command line wins over the YAML
    assert proc.wait(60) == 1
    error = link["procs"].output("client-intruder").strip().splitlines()[-1]
    assert error.startswith("fl-client: SuperNode of site 'montgomery' refused by the SuperLink")
    assert f"its key {key} is not registered (or was revoked)" in error
    assert "fl-server add-site montgomery --public-key intruder_auth.pub" in error
    said_within(link, "refused: unregistered SuperNode key (no site has it", 30)


def said_within(link, text: str, timeout: float) -> str:
    """The operator's console line containing ``text``, waited for (the log is followed every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while not (found := [line for line in link["said"] if text in line]):
        assert time.monotonic() < deadline, f"no {text!r} on the operator's console: {link['said']}"
        time.sleep(0.2)
    assert "\n" not in found[0]
    return found[0]


def test_site_added_while_the_superlink_runs_connects(consortium, link):
    root, env = consortium["root"], consortium["env"]
    assert _run(env, BIN / "fl-client", "keygen", "--name", "latecomer", "--out", root / "keys").returncode == 0
    added = _run(env, BIN / "fl-server", "add-site", "latecomer", "--public-key", root / "keys" / "latecomer_auth.pub",
                 "--consortium", consortium["path"], "--provisioned", root / "prov")
    assert added.returncode == 0 and "site latecomer: key registered" in added.stdout, added.stdout + added.stderr
    site = write_site(root, "latecomer", sl.free_port(), link["address"], key=root / "keys" / "latecomer_auth",
                      data="montgomery")
    link["procs"].start("client-latecomer", str(BIN / "fl-client"), "start", "--site", str(site))
    link["procs"].wait_for("client-latecomer", "site latecomer: connected", 60)
    link["procs"].stop("client-latecomer")


def test_client_trusting_another_ca_fails_clearly(consortium, link):
    root = consortium["root"]
    other = provision(root / "other-prov", "Another Consortium", ["montgomery"], ["127.0.0.1"],
                      operator_keys=True)
    site = write_site(root, "montgomery", sl.free_port(), link["address"], ca=other.ca_cert,
                      label="wrong-ca", key=consortium["own_keys"]["montgomery"])
    proc = link["procs"].start("client-wrong-ca", str(BIN / "fl-client"), "start", "--site", str(site))
    assert proc.wait(60) == 1
    error = link["procs"].output("client-wrong-ca").strip().splitlines()[-1]
    assert error.startswith("fl-client: TLS certificate verify failed:")
    assert f"not signed by the CA in {other.ca_cert}" in error


def test_plain_text_client_gets_no_answer(link):
    """A client speaking plain HTTP to the TLS port: the connection is closed unanswered
    (Flower logs nothing for it, nor for a wrong CA: see fl_server/refusals.py)."""
    import socket

    with socket.create_connection(("127.0.0.1", link["handle"].port), timeout=10) as sock:
        sock.sendall(b"POST /v1/fleet/activate-node HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(100) == b""


def test_revoked_site_is_refused(consortium, link):
    root, procs = consortium["root"], link["procs"]
    site = write_site(root, "shenzhen_a", sl.free_port(), link["address"], label="to-revoke",
                      key=consortium["own_keys"]["shenzhen_a"])
    proc = procs.start("client-to-revoke", str(BIN / "fl-client"), "start", "--site", str(site))
    procs.wait_for("client-to-revoke", "site shenzhen_a: connected", 60)

    revoked = subprocess.run([str(BIN / "fl-server"), "revoke", "shenzhen_a", "--consortium",
                              str(consortium["path"]), "--provisioned", str(root / "prov")],
                             env=consortium["env"], capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    assert "site shenzhen_a: key unregistered" in revoked.stdout
    assert proc.wait(60) == 1  # dropped at its next request, then refused at activation
    output = procs.output("client-to-revoke")
    assert "the SuperLink dropped this SuperNode" in output and "was revoked" in output
    assert output.strip().splitlines()[-1].startswith(
        "fl-client: SuperNode of site 'shenzhen_a' refused by the SuperLink")
    assert "fl-server add-site shenzhen_a" in output.strip().splitlines()[-1]
    said_within(link, "its SuperNode key was unregistered while it was connected (revoked)", 30)
    said_within(link, "refused: revoked key of site shenzhen_a from 127.0.0.1", 30)

    # it stays revoked: a later `fl-server start`, even on a new database, does not register it
    fresh = op.connection_name(root / "run3" / "superlink")
    plan = op.registration_plan(link["paths"], fresh)
    assert ("shenzhen_a", "register") not in plan and ("montgomery", "register") in plan
