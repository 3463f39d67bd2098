"""`fl-client start`: check the site, check the TLS connection, run the site's SuperNode.

In order: the site YAML and every data file are checked as `fl-client check` does; the
deployment files (CA, private key, local port) are checked; `wait_for_superlink` waits,
with backoff, until the consortium server answers and its certificate is the right one;
then `flower-supernode` runs with the CA, the site's key, node config
`site-config=<absolute path of the site YAML>` and the ClientApp port `deployment.port`.
It runs until Ctrl-C (or SIGTERM). Each reply the site sends is summarised on the console
from `<work_dir>/sent.log` (written by the ClientApp's `sent_log_mod`).

If the SuperLink drops the SuperNode (its database was replaced, or the key was revoked),
the SuperNode is started once more: a revoked key is then refused at activation, which
ends `fl-client start` with a one-line error. Every failure is one line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fl_client.supernode import (
    SENT_LOG,
    SuperLinkConnectionError,
    SuperNodeError,
    SuperNodeHandle,
    check_superlink,
    load_site_key,
    start_supernode,
    wait_for_superlink,
)
from shared.config import SiteConfig, load_site
from shared.processes import sigterm_as_interrupt, split_address

WAIT_TIMEOUT = 600.0  # how long to wait for an unreachable consortium server, seconds
TASK_POLL_INTERVAL = 0.2  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's default: 1 s)
IDLE_POLL = 0.5  # with deployment.fast_start: the idle SuperNode polls this often (Flower: 3 s)
# Set to 1 to run Flower's SuperNode with every Flower default (1 s SuperExec poll) and
# without deployment.fast_start, whatever the site YAML says.
FLOWER_DEFAULTS_ENV = "FL_CLIENT_FLOWER_DEFAULTS"
SUPERNODE_DIR = "supernode"  # under work_dir: supernode.log, node_config.toml, FLWR_HOME
STOP_TIMEOUT = 5.0  # seconds the SuperNode's group gets after SIGTERM before SIGKILL
# how long a SuperLink may count a vanished SuperNode as online (Flower: 2 missed heartbeats of
# 30 s), plus a margin: a site it accepted before retries a refused activation for this long
HELD_ONLINE = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0
RETRY_WAIT = 5.0
LAST_CONNECTION = "last_connection.json"  # under work_dir/supernode: superlink, public key, node id


class StartError(RuntimeError):
    """Why the site cannot start, in one line."""


def _say(text: str) -> None:
    print(f"fl-client: {text}", flush=True)


def _fail(text: str) -> int:
    print(f"fl-client: {text}", file=sys.stderr, flush=True)
    return 1


def check_deployment(site: SiteConfig, superlink: str | None) -> str:
    """The SuperLink address to use; raises StartError when the deployment section, the
    key or the local port cannot work."""
    source = site.source_file
    dep = site.deployment
    if dep is None:
        raise StartError(f"{source}: deployment: is required by fl-client start (superlink, "
                         "ca_cert, private_key: see the site.yaml made by fl-server provision)")
    address = superlink or dep.superlink
    try:
        split_address(address)
    except ValueError as err:
        raise StartError(f"{source}: deployment.superlink: {err}") from None
    if not dep.ca_cert.is_file():
        raise StartError(f"{source}: deployment.ca_cert: {dep.ca_cert} does not exist")
    try:
        load_site_key(dep.private_key)
    except SuperNodeError as err:
        raise StartError(f"{source}: deployment.private_key: {err}") from None
    if dep.private_key.stat().st_mode & 0o077:
        _say(f"warning: {dep.private_key} is readable by other accounts; chmod 600 it")
    if _port_taken(dep.port):
        raise StartError(f"{source}: deployment.port: port {dep.port} on 127.0.0.1 is in use "
                         "(another SuperNode on this machine?); give this site another port")
    return address


def _port_taken(port: int) -> bool:
    """Whether something listens on the port. SO_REUSEADDR as the SuperNode's own gRPC server
    binds: connections of a SuperNode stopped a moment ago (TIME_WAIT) do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def check_site(site: SiteConfig) -> list[str]:
    """`fl-client check`'s problems, errors first; raises StartError listing the errors."""
    from shared.data import check_site_data

    problems = check_site_data(site)
    errors = [p for p in problems if p.level == "error"]
    if errors:
        lines = "\n".join(f"  error: {p}" for p in errors)
        raise StartError(f"{site.source_file}: {len(errors)} problem(s) in the site's data "
                         f"(fix them, then run fl-client check --site {site.source_file}):\n{lines}")
    return [str(p) for p in problems]


def wait_until_reachable(address: str, ca_cert: Path, timeout: float) -> None:
    """``wait_for_superlink`` with a line on the console while the server is unreachable."""
    problem = check_superlink(address, ca_cert)
    if problem is None:
        return
    if problem[0] == "unreachable":
        _say(f"waiting for the consortium server ({problem[1]}); retrying for up to {timeout:.0f}s")
    try:
        wait_for_superlink(address, ca_cert, timeout=timeout)
    except SuperLinkConnectionError as err:
        raise StartError(str(err)) from None


def start_site(site_path: Path | str, superlink: str | None = None,
               wait_timeout: float = WAIT_TIMEOUT) -> int:
    """`fl-client start`; returns the exit code (0 when stopped with Ctrl-C/SIGTERM)."""
    site = load_site(site_path)
    try:
        with sigterm_as_interrupt():
            for warning in check_site(site):
                _say(f"warning: {warning}")
            address = check_deployment(site, superlink)
            wait_until_reachable(address, site.deployment.ca_cert, wait_timeout)
    except StartError as err:
        return _fail(str(err))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while checking or waiting for the server
        print(stopped_line(site), file=sys.stderr, flush=True)
        return 0

    handle: SuperNodeHandle | None = None
    with sigterm_as_interrupt():
        try:
            dropped = False  # after the SuperLink dropped us, a refusal is final: our node is not online
            while True:
                handle = _connect(site, address, wait_timeout, retry_refused=not dropped)
                reason = _follow(handle, site.work_dir / SENT_LOG)
                if handle.node_id is None or handle.process.returncode != 0:
                    return _fail(reason)
                # HTTP 401: the server runs on a new database, or the key was revoked (then
                # the next activation is refused, which ends fl-client start)
                _say(f"site {site.name}: the SuperLink dropped this SuperNode (its key was revoked, "
                     "or the server started a new database); connecting again")
                handle.stop()
                dropped = True
                wait_until_reachable(address, site.deployment.ca_cert, wait_timeout)
        except (StartError, SuperNodeError, TimeoutError) as err:
            return _fail(str(err))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the SuperNode's group, one line
            for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut this short
                signal.signal(sig, signal.SIG_IGN)
            if handle is not None:
                handle.stop(timeout=STOP_TIMEOUT)
            print(stopped_line(site), file=sys.stderr, flush=True)
            return 0
        finally:
            if handle is not None:
                handle.stop()


def stopped_line(site: SiteConfig) -> str:
    """The one line `fl-client start` prints when stopped: how the site joins again (the
    server keeps the run's checkpoints; a site keeps nothing it needs to resume)."""
    return f"fl-client: site {site.name}: stopped; rejoin with: fl-client start --site {site.source_file}"


def _connect(site: SiteConfig, address: str, timeout: float, retry_refused: bool = True) -> SuperNodeHandle:
    """``_run_supernode``, retried while the SuperLink may still count this site's previous
    connection as online. A SuperLink that stopped (or a SuperNode that vanished) leaves the
    node online in its database until two heartbeats are missed (Flower: 2 x 30 s), and refuses
    to activate it again until then; a site that was accepted by this server with this key
    before waits that out instead of being told its key is not registered."""
    previous = _last_connection(site, address) if retry_refused else None
    deadline, said = time.monotonic() + HELD_ONLINE, False
    while True:
        try:
            handle = _run_supernode(site, address, timeout)
        except SuperNodeError as err:
            if not (err.refused and previous is not None and time.monotonic() < deadline):
                raise
            if not said:
                _say(f"site {site.name}: activation refused: the server still counts this site's previous "
                     f"connection (node {previous}) as online, or this key was revoked; retrying for up to "
                     f"{deadline - time.monotonic():.0f} s")
                said = True
            time.sleep(RETRY_WAIT)
            continue
        _remember_connection(site, address, handle.node_id)
        return handle


def _connection_file(site: SiteConfig) -> Path:
    return site.work_dir / SUPERNODE_DIR / LAST_CONNECTION


def _key_line(site: SiteConfig) -> str:
    pub = Path(f"{site.deployment.private_key}.pub")
    return pub.read_text().strip() if pub.is_file() else ""


def _last_connection(site: SiteConfig, address: str) -> int | None:
    """The node id this SuperLink gave this site's current key the last time, or None."""
    try:
        last = json.loads(_connection_file(site).read_text())
    except (OSError, ValueError):
        return None
    same = last.get("superlink") == address and last.get("public_key") == _key_line(site)
    return last.get("node_id") if same else None


def _remember_connection(site: SiteConfig, address: str, node_id: int | None) -> None:
    path = _connection_file(site)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"superlink": address, "public_key": _key_line(site), "node_id": node_id}))


def _run_supernode(site: SiteConfig, address: str, timeout: float) -> SuperNodeHandle:
    dep = site.deployment
    tuned = os.environ.get(FLOWER_DEFAULTS_ENV, "") not in ("1", "true", "yes")
    fast = tuned and dep.fast_start  # opt-in: patches Flower internals (fl_client.flower_speedups)
    handle = start_supernode(
        address, dep.ca_cert, dep.private_key, {"site-config": str(site.source_file)},
        clientappio_port=dep.port, work_dir=site.work_dir / SUPERNODE_DIR, site=site.name,
        wait=True, connect_timeout=timeout,
        task_poll_interval=TASK_POLL_INTERVAL if tuned else None,
        warm_clientapp=fast, idle_poll=IDLE_POLL if fast else None,
    )
    _say(f"site {site.name}: connected to {address} as node {handle.node_id}; log in "
         f"{handle.log_path}, what is sent in {site.work_dir / SENT_LOG}; Ctrl-C stops")
    return handle


def _follow(handle: SuperNodeHandle, sent_log: Path) -> str:
    """Print a line per reply the site sends until the SuperNode exits; why it exited."""
    offset = sent_log.stat().st_size if sent_log.exists() else 0
    while True:
        running = handle.is_running()
        offset = _print_sent(sent_log, offset)
        if not running:
            return handle.failure() or "SuperNode stopped"
        time.sleep(1.0)


def _print_sent(sent_log: Path, offset: int) -> int:
    if not sent_log.exists():
        return offset
    with open(sent_log) as log:
        log.seek(offset)
        for line in log:
            if line.endswith("\n"):
                offset += len(line.encode())
                _say(summarise_sent(json.loads(line)))
    return offset


def summarise_sent(entry: dict) -> str:
    """One console line for one sent.log entry."""
    where = f"round {entry['round']} " if entry.get("round") is not None else ""
    head = f"sent {where}{entry['message_type']} reply"
    if "error" in entry:
        return f"{head}: error ({entry['error']})"
    parts = []
    for record in entry["records"].values():
        items = record["items"]
        if record["kind"] == "arrays":
            parts.append(f"{len(items)} weight arrays")
        elif record["kind"] == "metrics":
            parts.append(f"{len(items)} metrics")
    return f"{head}: {', '.join(parts)} ({entry['bytes'] / 1024:.0f} kB, handler {entry['handler_s']:.1f}s)"
