"""Run a hospital's Flower 1.42 SuperNode and explain, in one line, why it cannot connect.

``flower-supernode --superlink HOST:PORT --root-certificates ca.crt
--auth-supernode-private-key <site>_auth --node-config <file.toml> --port <P>``:
the SuperNode talks HTTPS to the SuperLink's single port, and serves the ClientApp
Runtime API (formerly ClientAppIo) on 127.0.0.1:P (default 9094), so every SuperNode on
one host needs its own P. For each message it launches a fresh ``flwr-clientapp``
process through its own ``flower-superexec``; the app (FAB) is unpacked into
``$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/`` and imported with this
environment (runtime dependency installation is off).

How failures show up (and how ``diagnose_supernode`` words them):

* SuperLink down: retries with backoff forever, or until ``--max-wait-time``, then exit 1
  with "Exit Code: 305 ... Connection refused";
* wrong CA / expired / wrong host: exit 1, "CERTIFICATE_VERIFY_FAILED";
* key never registered, or revoked before start: exit 1, "[code: 2004] Failed to
  activate SuperNode";
* key revoked while connected: the next request gets HTTP 401, the SuperNode SIGINTs
  itself and exits 0 ("SuperNode terminated gracefully.").

Two ClientApp mods live here (registered on our ClientApp): ``sent_log_mod`` appends one
JSON line per reply to the site's ``<work_dir>/sent.log`` (what left the site, never the
data itself), and ``packed_arrays_mod`` unpacks the arrays the ServerApp packed into one
buffer and packs the reply's the same way (fewer objects to move, see
``shared.wire.pack_arrays``).

By default Flower runs as shipped (``flower-supernode``, its own SuperExec), tuned only
through public settings (``task_poll_interval``). ``warm_clientapp`` / ``idle_poll`` (a
site's ``deployment.fast_start``) opt in to ``fl_client.flower_speedups``, which patches
flwr 1.42 internals (docs/deployment-notes.md).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.processes import ManagedProcess, split_address, flower_bin, flower_env, free_port, log_length, spawn
from shared.tls import server_certificate_problems
from shared.wire import PACKED_LAYOUT, pack_arrays, packed_layout, unpack_arrays

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


class SuperNodeError(RuntimeError):
    """The SuperNode could not connect, or was refused; the message is one line. ``refused``:
    the SuperLink refused its activation (code 2004: a key it does not accept, or a node it
    still counts as online from an earlier connection)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class SuperLinkConnectionError(RuntimeError):
    """``wait_for_superlink`` failed. ``kind`` is one of: unreachable, tls_ca_mismatch,
    tls_expired, tls_host_mismatch, tls_other."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------- preflight


def _fetch_server_cert(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The certificate the server presents, fetched without verifying it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def check_superlink(
    address: str, ca_cert: Path | str, timeout: float = 5.0
) -> tuple[str, str] | None:
    """One TLS handshake with the SuperLink, verified against ``ca_cert``.

    Returns None when it succeeds, else ``(kind, one-line message)``; kinds as in
    ``SuperLinkConnectionError``. Does not authenticate the site key (that happens when
    the SuperNode activates)."""
    host, port = split_address(address)
    ca_path = Path(ca_cert)
    try:
        ctx = ssl.create_default_context(cafile=str(ca_path))
    except FileNotFoundError:
        return "tls_other", f"CA certificate file {ca_path} does not exist"
    except ssl.SSLError as err:
        return "tls_other", f"CA certificate file {ca_path} is not a PEM certificate ({err})"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as err:
        return _describe_verify_error(err, host, port, ca_path, timeout)
    except ssl.SSLError as err:
        return "tls_other", (
            f"TLS handshake with SuperLink {address} failed ({err.reason or err}); is a "
            "TLS-enabled flower-superlink listening on that port?"
        )
    except socket.gaierror as err:
        return "unreachable", f"SuperLink {address} unreachable: cannot resolve {host} ({err})"
    except ConnectionRefusedError:
        return "unreachable", (
            f"SuperLink {address} unreachable: connection refused (is flower-superlink "
            "running, and is the port right?)"
        )
    except TimeoutError:
        return "unreachable", (
            f"SuperLink {address} unreachable: no answer within {timeout:.0f}s "
            "(firewall or wrong host?)"
        )
    except OSError as err:
        return "unreachable", f"SuperLink {address} unreachable: {err.strerror or err}"


def _describe_verify_error(
    err: ssl.SSLCertVerificationError, host: str, port: int, ca_path: Path, timeout: float
) -> tuple[str, str]:
    reason = err.verify_message or str(err)
    code = err.verify_code
    if code in (62, 64) or "mismatch" in reason.lower():
        kind = "tls_host_mismatch"
    elif code == 10 or "expired" in reason.lower():
        kind = "tls_expired"
    elif code in (2, 18, 19, 20, 21):
        kind = "tls_ca_mismatch"
    else:
        kind = "tls_other"
    detail = ""
    server = _fetch_server_cert(host, port, timeout)
    if server is not None:
        try:
            ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        except ValueError:
            ca = None
        if ca is not None:
            problems = server_certificate_problems(
                ca, server, host, ca_label=str(ca_path),
                server_label=f"the SuperLink's certificate at {host}:{port}",
            )
            if problems:
                detail = "; ".join(problems)
    if not detail:
        detail = {
            "tls_ca_mismatch": f"the SuperLink's certificate is not signed by the CA in "
                               f"{ca_path}",
            "tls_expired": "the SuperLink's certificate has expired",
            "tls_host_mismatch": f"host {host} is not in the SuperLink's certificate SANs",
        }.get(kind, reason)
    hint = {
        "tls_ca_mismatch": " (use the ca.crt from the same provisioning as the server)",
        "tls_expired": " (the operator must renew server.crt: re-run provision)",
        "tls_host_mismatch": " (connect with a name in the certificate, or re-provision)",
    }.get(kind, "")
    return kind, f"TLS certificate verify failed: {detail}{hint}"


def wait_for_superlink(
    address: str,
    ca_cert: Path | str,
    timeout: float = 60.0,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
) -> int:
    """Retry ``check_superlink`` with exponential backoff while the SuperLink is
    unreachable; TLS problems fail at once. Returns the number of attempts; raises
    SuperLinkConnectionError with a one-line message."""
    deadline = time.monotonic() + timeout
    attempt, delay = 0, backoff
    while True:
        attempt += 1
        problem = check_superlink(address, ca_cert, timeout=min(5.0, max(timeout, 0.5)))
        if problem is None:
            return attempt
        kind, message = problem
        remaining = deadline - time.monotonic()
        if kind != "unreachable" or remaining <= 0:
            if kind == "unreachable":
                message += f" (gave up after {attempt} attempts in {timeout:.0f}s)"
            raise SuperLinkConnectionError(kind, message)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_backoff)


# ---------------------------------------------------------------------------- SuperNode


def load_site_key(private_key: Path | str) -> ec.EllipticCurvePrivateKey:
    """Load the site's auth key, or raise SuperNodeError saying what is wrong with it."""
    path = Path(private_key)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise SuperNodeError(f"site private key {path} does not exist") from None
    except (ValueError, TypeError) as err:
        raise SuperNodeError(
            f"site private key {path} is not an unencrypted OpenSSH private key ({err})"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SuperNodeError(
            f"site private key {path} is a {type(key).__name__}; Flower needs an EC "
            "(NIST P-256/P-384/P-521) key"
        )
    return key


@dataclass
class SuperNodeHandle(ManagedProcess):
    """A running ``flower-supernode``."""

    site: str = ""
    superlink_address: str = ""
    clientappio_port: int = 0
    ca_cert: Path = Path("ca.crt")
    private_key: Path = Path("key")
    log_offset: int = 0

    def new_log(self) -> str:
        """This run's part of the log file."""
        return self.log_text()[self.log_offset:]

    @property
    def node_id(self) -> int | None:
        """The node id once the SuperLink accepted the SuperNode."""
        match = _NODE_ID.search(self.new_log())
        return int(match.group(1)) if match else None

    def failure(self) -> str | None:
        """One-line reason if the SuperNode exited on its own, else None."""
        if self.is_running() or self.stopped_by_us:
            return None
        return diagnose_supernode(
            self.new_log(), self.process.returncode, self.superlink_address,
            self.ca_cert, self.private_key, self.site,
        )

    def wait_connected(self, timeout: float = 60.0) -> int:
        """Block until the SuperLink accepted this SuperNode; return its node id. Raises
        SuperNodeError (one line) if it exits first, TimeoutError if neither happens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node_id = self.node_id
            if node_id is not None:
                return node_id
            if not self.is_running():
                raise SuperNodeError(self.failure() or "SuperNode exited", refused=activation_refused(self.new_log()))
            time.sleep(0.1)
        raise TimeoutError(
            f"SuperNode of site {self.site!r} not connected to {self.superlink_address} "
            f"after {timeout:.0f}s; see {self.log_path}"
        )

    def wait_exit(self, timeout: float) -> str:
        """Block until the SuperNode exits on its own (e.g. after its key was revoked);
        return the one-line reason. Raises TimeoutError if it keeps running."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise TimeoutError(
                f"SuperNode of site {self.site!r} still running after {timeout:.0f}s"
            ) from err
        return self.failure() or "SuperNode stopped"

    def __enter__(self) -> SuperNodeHandle:
        return self


def start_supernode(
    superlink_address: str,
    ca_cert: Path | str,
    private_key: Path | str,
    node_config: dict[str, Any],
    clientappio_port: int | None = None,
    work_dir: Path | str = ".",
    site: str | None = None,
    max_wait_time: float | None = None,
    wait: bool = True,
    connect_timeout: float = 60.0,
    task_poll_interval: float | None = None,
    extra_env: dict[str, str] | None = None,
    warm_clientapp: bool = False,
    idle_poll: float | None = None,
) -> SuperNodeHandle:
    """Start ``flower-supernode`` for one site.

    ``work_dir`` holds ``supernode.log``, ``node_config.toml`` and the SuperNode's
    FLWR_HOME (unpacked apps). ``clientappio_port=None`` picks a free port for the
    ClientApp Runtime API. ``max_wait_time`` bounds the SuperNode's own reconnect
    retries (Flower's default: retry forever). With ``wait`` this returns once the
    SuperLink accepted the node, or raises SuperNodeError with a one-line reason.
    ``task_poll_interval`` sets FLWR_SUPEREXEC_TASK_POLL_INTERVAL (how often the
    SuperExec looks for a ClientApp to launch; Flower's default 1 s). Opt-in, patching
    Flower internals (``fl_client.flower_speedups``): ``warm_clientapp`` replaces Flower's
    SuperExec by ``run_warm_superexec`` (same process group, same log); ``idle_poll`` makes
    the idle SuperNode ask the SuperLink for work every ``idle_poll`` s instead of 3 s.
    """
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    ca_path, key_path = Path(ca_cert).resolve(), Path(private_key).resolve()
    if not ca_path.is_file():
        raise SuperNodeError(f"CA certificate {ca_path} does not exist")
    load_site_key(key_path)
    site = site or str(node_config.get("site", key_path.stem))
    port = clientappio_port if clientappio_port is not None else free_port()

    config_path = work / "node_config.toml"
    config_path.write_text(tomli_w.dumps(node_config))
    if warm_clientapp or idle_poll is not None:
        from fl_client import flower_speedups
    launcher = ([flower_bin("flower-supernode")] if idle_poll is None
                else flower_speedups.supernode_command(idle_poll))
    cmd = [
        *launcher,
        "--superlink", superlink_address,
        "--root-certificates", str(ca_path),
        "--auth-supernode-private-key", str(key_path),
        "--node-config", str(config_path),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    if warm_clientapp:
        cmd += ["--isolation", "process"]
    extra = dict(extra_env or {})
    if task_poll_interval is not None:
        extra["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll_interval)
    log_path = work / "supernode.log"
    offset = log_length(log_path)
    env = flower_env(work / "flwr_home", extra)
    # warm: the SuperNode leads a new group in this session, which the SuperExec joins
    process = spawn(cmd, log_path, env, cwd=work, process_group=0 if warm_clientapp else None)
    handle = SuperNodeHandle(
        process=process, log_path=log_path, site=site, superlink_address=superlink_address,
        clientappio_port=port, ca_cert=ca_path, private_key=key_path, log_offset=offset,
    )
    if warm_clientapp:
        try:
            flower_speedups.spawn_warm_superexec(f"127.0.0.1:{port}", process.pid, log_path, env, work)
        except BaseException:
            handle.stop()
            raise
    if wait:
        try:
            handle.wait_connected(connect_timeout)
        except BaseException:
            handle.stop()
            raise
    return handle


def activation_refused(log: str) -> bool:
    """Whether a SuperNode's log ends in a refused activation (Flower's code 2004)."""
    return "Failed to activate SuperNode" in log or "code: 2004" in log


def diagnose_supernode(
    log: str,
    returncode: int | None,
    superlink_address: str,
    ca_cert: Path | str,
    private_key: Path | str,
    site: str = "",
) -> str:
    """One line saying why a SuperNode stopped, from its log and exit code."""
    who = f"SuperNode of site {site!r}" if site else "SuperNode"
    pub = f"{private_key}.pub"
    if activation_refused(log):
        return (
            f"{who} refused by the SuperLink at {superlink_address}: its key "
            f"{private_key} is not registered (or was revoked). Send {pub} to the operator, "
            f"who runs `fl-server add-site {site or 'SITE'} --public-key {Path(pub).name}`; a revoked "
            "key is never accepted again: first make a new pair with `fl-client keygen --force`"
        )
    if "CERTIFICATE_VERIFY_FAILED" in log or "SSL/TLS handshake error" in log:
        problem = check_superlink(superlink_address, ca_cert)
        if problem is not None and problem[0] != "unreachable":
            return f"{who}: {problem[1]}"
        line = next((ln for ln in log.splitlines() if "CERTIFICATE_VERIFY_FAILED" in ln), "")
        return f"{who}: TLS certificate verify failed with CA {ca_cert}: {line.strip()}"
    if "Unable to parse the private key file" in log:
        return f"{who}: private key {private_key} is not an EC key in OpenSSH format"
    if returncode == 0:
        if _NODE_ID.search(log):
            return (
                f"{who} was disconnected by the SuperLink at {superlink_address} (HTTP 401 "
                f"on its next request): its key {private_key} was revoked (`fl-server revoke`)"
            )
        return f"{who} exited cleanly before connecting (stopped by a signal?)"
    if "Connection refused" in log or "Giving up reconnection" in log:
        return (
            f"{who}: SuperLink {superlink_address} unreachable (connection refused; is "
            "flower-superlink running, and are host and port right?)"
        )
    exit_line = re.search(r"Exit Code: (\d+)\s*\n(.*)\n(.*)", log)
    if exit_line:
        return f"{who} exited (Flower exit code {exit_line.group(1)}): " + " ".join(
            s.strip() for s in exit_line.groups()[1:]
        )
    tail = " | ".join(ln.strip() for ln in log.strip().splitlines()[-3:])
    return f"{who} exited with code {returncode}: {tail}"



# ---------------------------------------------------------------------------- sent log

SENT_LOG = "sent.log"
_MAX_TEXT = 200


def describe_reply(reply: Message) -> dict[str, Any]:
    """What a reply carries, without its array contents: per record its kind and, per
    entry, an array's shape/dtype/bytes, a metric's value (a list only by its length)
    or a config value (long text cut). Arrays packed into one buffer (``pack_arrays``)
    are listed one by one from the layout sent with them, which is checked against the
    buffer; the layout record itself is not listed."""
    if reply.has_error():
        return {"error": f"code {reply.error.code}: {reply.error.reason}"[:_MAX_TEXT]}
    records: dict[str, Any] = {}
    total = 0
    layout = packed_layout(reply.content) or {}
    for name, record in reply.content.items():
        total += record.count_bytes()
        if name in layout:
            buffer = len(record["packed"].data)
            items = {key: {"shape": shape, "dtype": dtype, "bytes": size}
                     for key, dtype, shape, _stype, size in layout[name]}
            if buffer != sum(item["bytes"] for item in items.values()):
                items = {"packed": {"shape": [buffer], "dtype": "uint8", "bytes": buffer}}
            records[name] = {"kind": "arrays", "packed": True, "items": items}
        elif name in reply.content.array_records:
            items = {key: {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": len(arr.data)}
                     for key, arr in record.items()}
            records[name] = {"kind": "arrays", "items": items}
        elif name == PACKED_LAYOUT and layout:
            continue
        else:
            kind = "metrics" if name in reply.content.metric_records else "config"
            records[name] = {"kind": kind, "items": {k: _value(v) for k, v in record.items()}}
    return {"bytes": total, "records": records}


def _value(value: Any) -> Any:
    if isinstance(value, list):
        return {"list": len(value)}
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + "..."
    return value


def sent_log_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: run the handler, then append to ``<work_dir>/sent.log`` what the
    reply carries (message type, round, array names/shapes/sizes, metric names and
    values, or the error text Flower sends when the handler raises) and the handler's
    time. Only in deployment, where ``node_config`` names the site YAML; a failure to
    write the log never fails the reply."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    entry = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": msg.metadata.run_id,
        "message_type": msg.metadata.message_type,
        "round": config.get("server-round") if config is not None else None,
    }
    started = time.monotonic()
    try:
        reply = call_next(msg, context)
    except Exception as exc:  # Flower replies with the exception's text: log that too
        entry["handler_s"] = round(time.monotonic() - started, 3)
        entry["error"] = f"{type(exc).__name__}: {exc}"[:_MAX_TEXT]
        _append_sent_log(context, entry)
        raise
    entry["handler_s"] = round(time.monotonic() - started, 3)
    entry.update(describe_reply(reply))
    _append_sent_log(context, entry)
    return reply


def packed_arrays_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a message whose arrays the ServerApp packed into one buffer
    (``fl_server.superlink.PollingGrid``) reaches the handler unpacked, and its reply's
    arrays travel packed the same way. Unpacked messages (simulation) pass untouched."""
    packed = msg.has_content() and packed_layout(msg.content) is not None
    if packed:
        msg.content = unpack_arrays(msg.content)
    reply = call_next(msg, context)
    if packed and reply.has_content():
        reply.content = pack_arrays(reply.content)
    return reply


def _append_sent_log(context: Context, entry: dict[str, Any]) -> None:
    site_config = context.node_config.get("site-config")
    if site_config is None:  # simulation: nothing leaves the machine
        return
    from shared.config import load_site  # the site's work_dir; no torch import

    try:
        work_dir = load_site(str(site_config)).work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        with open(work_dir / SENT_LOG, "a") as log:
            log.write(json.dumps(entry) + "\n")
    except Exception as err:  # noqa: BLE001 - the log must not cost the round
        print(f"sent_log_mod: could not write {SENT_LOG}: {err}", flush=True)
