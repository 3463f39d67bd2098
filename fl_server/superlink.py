"""Run a Flower 1.42 SuperLink with TLS and SuperNode authentication, and drive it.

Flower 1.42 serves the Fleet, Control and ServerAppIo/Runtime APIs over HTTPS on ONE
port (``--host``/``--port``, default 127.0.0.1:8000); the old 9091/9092/9093 gRPC
ports and ``--*-api-address`` flags are deprecated or gone. ``flower-superlink`` starts
its own ``flower-superexec`` (found on PATH), which connects back to
``https://127.0.0.1:<port>`` with ``--ssl-ca-certfile`` as root, so the server certificate
must name 127.0.0.1 (``provision`` adds it).

With ``--enable-supernode-auth`` SuperNodes cannot self-register: the operator registers
each site's public key through the Control API (``flwr supernode register <pub>``, which
returns a node id) and revokes it with ``flwr supernode unregister <node id>``. A
revoked key can never be registered again. ``flwr supernode list`` shows no keys or
names, so ``register_site_key`` keeps a small ``registered_sites.json`` (site -> node
id) next to the CLI's ``config.toml``.

``PollingGrid`` (used by our ServerApp) shortens the wait for replies and packs the weights
into one buffer per message (``pack_arrays``; the ClientApp's ``packed_arrays_mod`` undoes it).

The ``flwr`` CLI reads connections from ``$FLWR_HOME/config.toml``
(``[superlink.<name>] address, root-certificates``); ``write_connection`` writes one.
Every command here runs ``flwr ... --format json``; note that it exits 0 even on failure,
so the JSON ``success`` field is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from shared.tls import certificate_problems
from shared.processes import (
    ManagedProcess, flower_bin, flower_env, free_port, log_length, port_open, spawn, strip_ansi,
)
from shared.wire import pack_arrays, unpack_arrays
RUN_FINISHED_PREFIX = "finished"


class SuperLinkError(RuntimeError):
    """The SuperLink could not be started or did not answer as expected."""


class FlwrCliError(RuntimeError):
    """A ``flwr`` CLI command failed; the message is Flower's own, on one line."""


# ---------------------------------------------------------------------------- helpers


def _connect_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def stop_all(handles: list[ManagedProcess], timeout: float = 10.0) -> None:
    """Stop several Flower processes: all SuperNodes in parallel first (so they can
    deactivate themselves at the SuperLink), then the SuperLinks."""
    links = [h for h in handles if isinstance(h, SuperLinkHandle)]
    for group in ([h for h in handles if h not in links], links):
        for handle in group:
            handle.terminate()
        deadline = time.monotonic() + timeout
        for handle in group:
            handle.stop(max(0.1, deadline - time.monotonic()))


# ---------------------------------------------------------------------------- SuperLink


@dataclass
class SuperLinkHandle(ManagedProcess):
    """A running ``flower-superlink``: one HTTPS port for Fleet, Control and Runtime."""

    host: str = "127.0.0.1"
    port: int = 0
    state_dir: Path = Path(".")
    ca_cert: Path = Path("ca.crt")
    database: Path | None = None

    @property
    def address(self) -> str:
        """``host:port`` that SuperNodes and the ``flwr`` CLI on this machine use."""
        host = _connect_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def __enter__(self) -> SuperLinkHandle:
        return self


def start_superlink(
    ca_cert: Path | str,
    server_cert: Path | str,
    server_key: Path | str,
    state_dir: Path | str,
    host: str = "127.0.0.1",
    port: int | None = None,
    enable_supernode_auth: bool = True,
    persistent: bool = True,
    startup_timeout: float = 30.0,
    task_poll_interval: float | None = None,
    extra_env: dict[str, str] | None = None,
) -> SuperLinkHandle:
    """Start ``flower-superlink`` with TLS (and SuperNode auth) and wait until it serves.

    ``state_dir`` holds ``superlink.log``, the LinkState database ``superlink.db`` (with
    ``persistent``: registered SuperNodes and runs survive a restart) and the SuperLink's
    FLWR_HOME (where it unpacks submitted apps). ``port=None`` picks a free port.
    ``task_poll_interval`` sets FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's default 1 s):
    how often the SuperExec looks for a ServerApp to launch.
    """
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    paths = {"ca_cert": Path(ca_cert), "server_cert": Path(server_cert),
             "server_key": Path(server_key)}
    for name, path in paths.items():
        if not path.is_file():
            raise SuperLinkError(f"{name} file {path} does not exist")
    # The SuperLink's own SuperExec connects to the loopback name over TLS.
    problems = certificate_problems(ca_cert, server_cert, _connect_host(host))
    if problems:
        raise SuperLinkError("; ".join(problems))
    if port is None:
        port = free_port(_connect_host(host))
    elif port_open(_connect_host(host), port):
        raise SuperLinkError(f"port {port} on {host} is already in use")

    database = state / "superlink.db" if persistent else None
    cmd = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(Path(ca_cert).resolve()),
        "--ssl-certfile", str(Path(server_cert).resolve()),
        "--ssl-keyfile", str(Path(server_key).resolve()),
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    if enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    extra = dict(extra_env or {})
    if task_poll_interval is not None:
        extra["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll_interval)
    env = flower_env(state / "flwr_home", extra)
    log_path = state / "superlink.log"
    offset = log_length(log_path)
    handle = SuperLinkHandle(
        process=spawn(cmd, log_path, env, cwd=state), log_path=log_path, host=host,
        port=port, state_dir=state, ca_cert=Path(ca_cert).resolve(), database=database,
    )
    try:
        _wait_superlink_ready(handle, startup_timeout, offset)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_superlink_ready(handle: SuperLinkHandle, timeout: float, offset: int) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.is_running():
            tail = handle.log_text()[offset:].strip().splitlines()[-5:]
            raise SuperLinkError(
                f"flower-superlink exited with code {handle.process.returncode}: "
                + " | ".join(tail)
            )
        if "Uvicorn running on" in handle.log_text()[offset:] and port_open(
            _connect_host(handle.host), handle.port
        ):
            return
        time.sleep(0.1)
    raise SuperLinkError(
        f"flower-superlink did not start serving on {handle.address} within "
        f"{timeout:.0f}s; see {handle.log_path}"
    )


# ---------------------------------------------------------------------------- flwr CLI


def write_connection(
    flwr_home: Path | str,
    name: str,
    address: str,
    ca_cert: Path | str,
    make_default: bool = True,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` (TLS with the
    consortium CA as root certificate). Other connections are kept."""
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink[name] = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
    if make_default or "default" not in superlink:
        superlink["default"] = name
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text(tomli_w.dumps(config))
    os.replace(tmp, path)
    return path


def run_flwr(
    args: list[str], flwr_home: Path | str, timeout: float = 60.0, json_output: bool = True
) -> Any:
    """Run ``flwr <args>`` with FLWR_HOME set; return its parsed JSON (``--format json``)
    or its stdout. Raises FlwrCliError with Flower's message when it reports a failure."""
    cmd = [flower_bin("flwr"), *args] + (["--format", "json"] if json_output else [])
    proc = subprocess.run(
        cmd, env=flower_env(flwr_home, {"NO_COLOR": "1", "COLUMNS": "200"}),
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    out = strip_ansi(proc.stdout)
    if not json_output:
        if proc.returncode != 0:
            raise FlwrCliError(_one_line(strip_ansi(proc.stderr) or out))
        return out
    start = out.find("{")
    try:
        data = json.loads(out[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise FlwrCliError(
            f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): "
            + _one_line(strip_ansi(proc.stderr) or out or "no output")
        )
    if not data.get("success", False):
        raise FlwrCliError(_one_line(str(data.get("error-message", data))))
    return data


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Using SuperLink:")]
    return " ".join(lines)[:500]


def _registry_path(flwr_home: Path | str) -> Path:
    return Path(flwr_home) / "registered_sites.json"


def _load_registry(flwr_home: Path | str) -> dict[str, dict[str, dict[str, Any]]]:
    path = _registry_path(flwr_home)
    return json.loads(path.read_text()) if path.exists() else {}


def _save_registry(flwr_home: Path | str, registry: dict[str, Any]) -> None:
    path = _registry_path(flwr_home)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True))
    os.replace(tmp, path)


def registered_sites(flwr_home: Path | str, connection: str) -> dict[str, dict[str, Any]]:
    """site -> {"node_id", "public_key", "status"} as recorded by register/revoke."""
    return _load_registry(flwr_home).get(connection, {})


def forget_registrations(flwr_home: Path | str, connection: str) -> None:
    """Drop the recorded node ids of ``connection`` (its SuperLink database is new)."""
    registry = _load_registry(flwr_home)
    if registry.pop(connection, None) is not None:
        _save_registry(flwr_home, registry)


def register_site_key(
    site: str, public_key: Path | str, flwr_home: Path | str, connection: str
) -> int:
    """Register a site's OpenSSH EC public key with the SuperLink (``flwr supernode
    register``) and return its node id. Registering the same key again for the same
    site returns the recorded node id."""
    key_text = Path(public_key).read_text().strip()
    registry = _load_registry(flwr_home)
    known = registry.get(connection, {}).get(site)
    try:
        data = run_flwr(
            ["supernode", "register", str(Path(public_key).resolve()), connection,
             "--name", site],
            flwr_home,
        )
    except FlwrCliError as err:
        if "already in use" not in str(err):
            raise
        if known and known["public_key"] == key_text and known["status"] == "registered":
            return int(known["node_id"])
        raise FlwrCliError(
            f"the public key {public_key} of site {site!r} is already known to the "
            "SuperLink (registered under another name, or revoked; a revoked key can "
            f"never be registered again: the site makes a new key with `fl-client keygen "
            f"--force`, then fl-server add-site {site} --public-key FILE)"
        ) from err
    node_id = int(data["node-id"])
    registry.setdefault(connection, {})[site] = {
        "node_id": node_id, "public_key": key_text, "status": "registered",
    }
    _save_registry(flwr_home, registry)
    return node_id


def revoke_site_key(
    site: str, flwr_home: Path | str, connection: str, node_id: int | None = None
) -> int:
    """Unregister a site's SuperNode (``flwr supernode unregister <node id>``). A running
    SuperNode with that key is refused at its next request (HTTP 401) and exits; the
    key can never be registered again. Returns the node id."""
    registry = _load_registry(flwr_home)
    entry = registry.get(connection, {}).get(site)
    if node_id is None:
        if entry is None:
            raise FlwrCliError(
                f"site {site!r} has no recorded node id for connection {connection!r} "
                f"in {_registry_path(flwr_home)}; pass node_id (see `flwr supernode list`)"
            )
        node_id = int(entry["node_id"])
    run_flwr(["supernode", "unregister", str(node_id), connection], flwr_home)
    if entry is not None:
        entry["status"] = "revoked"
        _save_registry(flwr_home, registry)
    return node_id


def list_supernodes(flwr_home: Path | str, connection: str) -> list[dict[str, Any]]:
    """``flwr supernode list``: node-id, status (registered/online/offline/unregistered)."""
    return list(run_flwr(["supernode", "list", connection], flwr_home)["nodes"])


def submit_app(
    app_dir: Path | str,
    flwr_home: Path | str,
    connection: str,
    run_config: dict[str, Any] | None = None,
) -> int:
    """``flwr run <app_dir> <connection>``: build the app into a FAB, submit it, return
    the run id. ``run_config`` overrides keys of ``[tool.flwr.app.config]`` (unknown
    keys are refused by the SuperLink)."""
    args = ["run", str(Path(app_dir).resolve()), connection]
    tmp_path = None
    try:
        if run_config:
            fd, tmp_path = tempfile.mkstemp(suffix=".toml", prefix="run-config-")
            with os.fdopen(fd, "w") as fh:
                fh.write(tomli_w.dumps(run_config))
            args += ["--run-config", tmp_path]
        data = run_flwr(args, flwr_home)
    finally:
        if tmp_path:
            Path(tmp_path).unlink(missing_ok=True)
    return int(data["run-id"])


def run_status(run_id: int, flwr_home: Path | str, connection: str) -> dict[str, Any]:
    """The run's entry from ``flwr list --run-id``: status ("pending", "starting",
    "running", "finished:completed|failed|stopped"), timings, traffic."""
    data = run_flwr(["list", connection, "--run-id", str(run_id)], flwr_home)
    return dict(data["runs"][0])


def wait_for_run(
    run_id: int,
    flwr_home: Path | str,
    connection: str,
    timeout: float = 600.0,
    poll: float = 1.0,
) -> str:
    """Block until the run finishes; return its final status (``finished:...``)."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(run_status(run_id, flwr_home, connection)["status"])
        if status.startswith(RUN_FINISHED_PREFIX):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {status!r} after {timeout:.0f}s")
        time.sleep(poll)


def run_logs(run_id: int, flwr_home: Path | str, connection: str) -> str:
    """The ServerApp's log so far (``flwr log <run id> --show``)."""
    out = run_flwr(["log", str(run_id), connection, "--show"], flwr_home, json_output=False)
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith("Using SuperLink:"))


def stream_run_logs(
    run_id: int, flwr_home: Path | str, connection: str, sink: TextIO = sys.stdout
) -> int:
    """Stream the ServerApp's log (``flwr log <run id> --stream``) into ``sink`` until
    the run finishes; returns the CLI's exit code."""
    proc = subprocess.Popen(
        [flower_bin("flwr"), "log", str(run_id), connection, "--stream"],
        env=flower_env(flwr_home, {"NO_COLOR": "1"}), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("Using SuperLink:"):
                sink.write(strip_ansi(line))
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)


# ---------------------------------------------------------------------------- ServerApp

class PollingGrid:
    """The ServerApp's Grid for a deployment: ``send_and_receive`` packs each message's
    arrays (``pack_arrays``; our ClientApp's ``packed_arrays_mod`` unpacks them and packs
    its reply) and looks for replies every ``interval`` seconds, where Flower 1.42's HTTP
    Grid sleeps a fixed 3 s (1.5 s more per round trip on average). Everything else is
    the Grid's."""

    def __init__(self, grid: Any, interval: float = 0.2, pack: bool = True) -> None:
        self._grid = grid
        self._interval = interval
        self._pack = pack

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        messages = list(messages)
        if self._pack:
            for message in messages:
                if message.has_content():
                    message.content = pack_arrays(message.content)
        pending = {i for i in self._grid.push_messages(messages) if i is not None}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        while pending:
            found = list(self._grid.pull_messages(pending))
            for reply in found:
                if reply.has_content():
                    reply.content = unpack_arrays(reply.content)
            replies += found
            pending -= {m.metadata.reply_to_message_id for m in found}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return replies
