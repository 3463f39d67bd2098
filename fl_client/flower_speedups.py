"""Opt-in speed-ups that patch flwr 1.42 internals (site YAML ``deployment: {fast_start: true}``).

Everything here reaches into Flower's private modules, so it is off by default: without
``fast_start`` a site runs ``flower-supernode`` and its SuperExec exactly as shipped. Two
patches, each checked by ``missing_targets`` before use and by tests/test_flower_speedups.py
(which fails when a patched attribute is gone or a patch stops changing behaviour):

* idle poll: ``run_flower_supernode(idle_poll)`` is ``flower-supernode`` with the ``time``
  module of ``flwr.supernode.start_client_internal`` replaced by ``ShorterSleeps``: the main
  loop's hard-coded ``time.sleep(3)`` when idle (and the 0.5 s waits for the reply) last at
  most ``idle_poll`` s. Each idle poll is one small HTTPS request to the SuperLink.
* warm ClientApp: ``run_warm_superexec`` is Flower's SuperExec loop with
  ``run_superexec.get_executor`` returning ``ForkExecutor``, which forks a process that
  already imported Flower, torch, MONAI and our ClientApp for each ClientApp task; the child
  runs Flower's own ``run_clientapp``. The fork happens after Flower started threads in the
  parent (gRPC/HTTP client, parent monitor): the child only runs ``run_clientapp`` and exits.

Flower upgrades: when ``missing_targets`` finds a target gone, the SuperNode refuses to start
with a one-line error naming it; set ``fast_start: false`` (Flower as shipped) meanwhile.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.processes import port_open, spawn, split_address

FORK_MARKER = "flower_speedups: forked ClientApp"  # one line in supernode.log per forked task


def missing_targets() -> list[str]:
    """The flwr internals the patches need that are missing or changed shape (empty: all there)."""
    problems: list[str] = []

    def need(module: str, attr: str, params: tuple[str, ...] = ()) -> None:
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            problems.append(f"{module}.{attr}")
            return
        if params:
            have = inspect.signature(obj).parameters
            gone = [p for p in params if p not in have]
            if gone:
                problems.append(f"{module}.{attr}({', '.join(gone)})")

    need("flwr.supernode.start_client_internal", "time")
    need("flwr.supernode.start_client_internal", "start_client_internal")
    need("flwr.supernode.cli", "flower_supernode")
    need("flwr.supercore.superexec.run_superexec", "get_executor")
    need("flwr.supercore.superexec.run_superexec", "run_superexec",
         ("runtime_api_address", "insecure", "parent_pid"))
    need("flwr.supercore.superexec.executor", "SubprocessExecutor")
    need("flwr.supercore.superexec.executor.types", "LaunchResult")
    need("flwr.supernode.runtime.run_clientapp", "run_clientapp",
         ("runtime_api_address", "token", "insecure", "parent_pid"))
    return problems


def _require_targets() -> None:
    missing = missing_targets()
    if missing:
        sys.exit(f"fast_start: this flwr lacks {', '.join(missing)} (written for flwr 1.42); "
                 "set deployment.fast_start: false to run Flower as shipped")


# ---------------------------------------------------------------------------- idle poll


class ShorterSleeps:
    """Stands in for the ``time`` module of ``flwr.supernode.start_client_internal``:
    every ``sleep`` there lasts at most ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.limit))


def install_idle_poll(idle_poll: float) -> None:
    """Cap the SuperNode main loop's sleeps at ``idle_poll`` s (this process only)."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    loop.time = ShorterSleeps(idle_poll)


def supernode_command(idle_poll: float) -> list[str]:
    """The argv prefix that runs ``flower-supernode`` through ``run_flower_supernode``."""
    code = f"from fl_client.flower_speedups import run_flower_supernode; run_flower_supernode({idle_poll!r})"
    return [sys.executable, "-c", code]


def run_flower_supernode(idle_poll: float) -> None:
    """``flower-supernode`` (arguments from ``sys.argv``) with ``install_idle_poll``."""
    _require_targets()
    from flwr.supernode.cli import flower_supernode

    install_idle_poll(idle_poll)
    print(f"flower_speedups: SuperNode idle poll {idle_poll} s (Flower: 3 s)", flush=True)
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


# ---------------------------------------------------------------------------- warm ClientApp


def make_fork_executor() -> Any:
    """A ``SubprocessExecutor`` whose ClientApp tasks run in a fork of this process."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    class ForkExecutor(SubprocessExecutor):
        """Fork for a ClientApp task; anything else as Flower's subprocess executor."""

        def launch(self, spec: ExecutionSpec) -> LaunchResult:
            if spec.task_type != TaskType.CLIENT_APP or not spec.insecure:
                return super().launch(spec)
            pid = os.fork()
            if pid == 0:  # the child never returns into the SuperExec loop
                code = 1
                try:
                    run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token,
                                  insecure=True, parent_pid=spec.parent_pid)
                    code = 0
                except SystemExit as exc:  # Flower ends every task with sys.exit
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            print(f"{FORK_MARKER} (pid {pid})", flush=True)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            """Reap finished children."""
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass

    return ForkExecutor()


def install_fork_executor() -> None:
    """Make Flower's SuperExec loop (this process) use ``make_fork_executor``."""
    from flwr.supercore.superexec import run_superexec as superexec

    executor = make_fork_executor()
    superexec.get_executor = lambda *args, **kwargs: executor


def spawn_warm_superexec(runtime_address: str, supernode_pid: int, log_path: Path,
                         env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start ``run_warm_superexec`` in the SuperNode's process group (stopped with it),
    its output appended to the SuperNode's log. The SuperNode must run ``--isolation process``."""
    code = ("from fl_client.flower_speedups import run_warm_superexec; "
            f"run_warm_superexec({runtime_address!r}, {supernode_pid})")
    return spawn([sys.executable, "-c", code], log_path, env, cwd, process_group=supernode_pid)


def run_warm_superexec(runtime_address: str, supernode_pid: int, timeout: float = 60.0) -> None:
    """Flower's ``run_superexec`` with ``install_fork_executor``, after importing our ClientApp
    (torch, MONAI) and ``torch._dynamo`` (the first torch.optim optimizer imports it: 2-6 s)
    once; exits when the SuperNode ``supernode_pid`` does."""
    _require_targets()
    import fl_client.client_app  # noqa: F401  the ClientApp and everything it imports
    import torch._dynamo  # noqa: F401
    from flwr.supercore.superexec import run_superexec as superexec

    host, port = split_address(runtime_address)
    deadline = time.monotonic() + timeout
    while not port_open(host, port):  # the SuperNode opens its Runtime API first
        if time.monotonic() > deadline or not _pid_alive(supernode_pid):
            sys.exit(f"warm SuperExec: no SuperNode Runtime API on {runtime_address}")
        time.sleep(0.1)
    install_fork_executor()
    print("flower_speedups: warm SuperExec ready (ClientApp tasks are forked)", flush=True)
    superexec.run_superexec(runtime_api_address=runtime_address, insecure=True,
                            parent_pid=supernode_pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
