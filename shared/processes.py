"""Flower processes and addresses, as both the operator's and a site's commands need them.

Every Flower process (SuperLink, SuperNode, their SuperExec) is started in its own
process group with its output appended to a log file, so one signal stops it and all it
started; SIGTERM is turned into the KeyboardInterrupt Ctrl-C gives, so both stop the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from shared.flower_env import FLOWER_ENV

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FlowerMissing(RuntimeError):
    """A Flower console script is not installed where we look."""


def strip_ansi(text: str) -> str:
    """Remove the colour codes Flower's logger always writes."""
    return _ANSI.sub("", text)


def flower_bin(name: str) -> str:
    """Path of a Flower console script, preferring the running interpreter's venv."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FlowerMissing(
            f"{name} not found next to {sys.executable} nor on PATH; install flwr 1.42"
        )
    return found


def flower_env(flwr_home: Path | str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no telemetry, no update check,
    no runtime dependency installation, and this venv's bin first on PATH (Flower starts
    ``flower-superexec``/``flwr-clientapp`` by name)."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env.update(
        FLWR_HOME=str(flwr_home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class ManagedProcess:
    """A Flower process started in its own process group, with its log file."""

    process: subprocess.Popen
    log_path: Path
    stopped_by_us: bool = field(default=False, init=False)
    _group_killed: bool = field(default=False, init=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return strip_ansi(self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        """Send SIGTERM to the process group (the process and the SuperExec/app
        processes it started) without waiting."""
        self.stopped_by_us = True
        if self.process.poll() is None:
            signal_group(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL the group and
        whatever the process had started outside it. Returns the exit code. Calling it again
        does nothing."""
        if self._group_killed:
            return self.process.returncode
        # flower-superlink starts its SuperExec in a session of its own: that group is not
        # ours to signal, and the ServerApp it launched would outlive the SuperLink
        below = [(pid, _start_time(pid)) for pid in descendants(self.process.pid)]
        self.terminate()
        pgid = self.process.pid  # spawn(): the process leads its own group
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            self.process.wait(5)
        # Children (SuperExec, app processes) may outlive the leader for a moment.
        signal_group(pgid, signal.SIGKILL)
        for pid, started in below:
            if started is not None and _start_time(pid) == started:  # not a reused pid
                _kill(pid, signal.SIGKILL)
        self._group_killed = True
        return self.process.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def log_length(log_path: Path) -> int:
    """Length of a log's ANSI-stripped text, to read only what a new process appends."""
    return len(strip_ansi(log_path.read_text(errors="replace"))) if log_path.exists() else 0


def signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):  # already gone, or no longer ours
        os.killpg(pgid, sig)


def _kill(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), from /proc: Ray's raylet starts its
    workers itself, so they are not in any list we keep. [] where /proc is missing."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in tree.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks after boot), None when it is gone: with the pid,
    it names one process even if the pid is reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def kill_descendants(pid: int | None = None, rounds: int = 3) -> None:
    """SIGKILL everything below ``pid`` (default: this process), again while a parent that
    was still alive may have started something new."""
    pid = os.getpid() if pid is None else pid
    for _ in range(rounds):
        found = descendants(pid)
        if not found:
            return
        for child in found:
            _kill(child, signal.SIGKILL)


def spawn(
    cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path,
    process_group: int | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (own process group) with output appended to
    ``log_path``; with ``process_group``, in that process group of this session instead
    (0: a new group led by the process)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    group = {"start_new_session": True} if process_group is None else {"process_group": process_group}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, **group,
        )


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does (main thread only), so that the
    operator's and a site's long-running commands stop their processes the same way. SIGINT
    raises it too even when the command was started with SIGINT ignored (Python then installs
    no handler: a background job of a script, a service manager), so one `kill -INT` stops it."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    match = re.fullmatch(r"\[(?P<h6>[^\]]+)\]:(?P<p6>\d+)|(?P<h>[^:\[\]]+):(?P<p>\d+)",
                         address.strip())
    if not match:
        raise ValueError(f"SuperLink address {address!r} is not host:port")
    host = match.group("h6") or match.group("h")
    return host, int(match.group("p6") or match.group("p"))
