"""The opt-in patches of fl_client.flower_speedups still hit flwr and still change what it does.

Each test runs Flower's own code (its SuperNode main loop, its SuperExec entry point) with
only the network stubbed, so it fails when a patched attribute is gone, changed signature, or
is no longer what Flower's code looks up. The end-to-end run of a fast_start site is in
tests/test_deployment_transport.py and tests/test_deployment.py.
"""

import importlib
import inspect
import os
import time
from contextlib import contextmanager
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

from fl_client import flower_speedups as fs

LOOP = importlib.import_module("flwr.supernode.start_client_internal")
SUPEREXEC = importlib.import_module("flwr.supercore.superexec.run_superexec")


class _Stop(Exception):
    pass


def test_every_patch_target_exists_with_the_expected_signature():
    assert fs.missing_targets() == []
    assert LOOP.time is time  # what install_idle_poll replaces is Flower's `time` module
    params = inspect.signature(SUPEREXEC.get_executor).parameters
    assert {"executor_config", "insecure", "root_certificates_path"} <= set(params)


def _idle_loop(monkeypatch, idle_polls: int) -> list[float]:
    """Flower's SuperNode main loop with the connection stubbed and no message ever waiting;
    the times at which it polled the SuperLink."""
    polls: list[float] = []

    def pull(**kwargs):
        polls.append(time.monotonic())
        if len(polls) > idle_polls:
            raise _Stop
        return None  # no message: the loop sleeps before polling again

    @contextmanager
    def connection(**kwargs):
        yield (1, None, None, None, None, None, None, None)

    monkeypatch.setattr(LOOP, "_pull_and_store_message", pull)
    monkeypatch.setattr(LOOP, "_init_connection", connection)
    monkeypatch.setattr(LOOP, "register_signal_handlers", lambda **kwargs: None)
    factory = SimpleNamespace(state=MagicMock, objectstore_factory=SimpleNamespace(store=MagicMock))
    with pytest.raises(_Stop):
        LOOP.start_client_internal(state_factory=factory, server_address="127.0.0.1:1",
                                   node_config={}, insecure=True, isolation="process")
    return polls


def test_flower_idle_loop_sleeps_3s_through_its_time_module(monkeypatch):
    asked = []
    monkeypatch.setattr(LOOP, "time", SimpleNamespace(sleep=asked.append, monotonic=time.monotonic))
    _idle_loop(monkeypatch, idle_polls=2)
    assert asked == [3, 3]  # the sleep the patch shortens is still there, still 3 s


def test_idle_poll_patch_shortens_the_sleep_between_polls(monkeypatch):
    monkeypatch.setattr(LOOP, "time", time)  # restored after the test
    fs.install_idle_poll(0.05)
    assert isinstance(LOOP.time, fs.ShorterSleeps)
    polls = _idle_loop(monkeypatch, idle_polls=3)
    gaps = [b - a for a, b in zip(polls, polls[1:])]
    assert len(gaps) == 3 and max(gaps) < 1.0, gaps  # Flower as shipped: 3 s each


def test_superexec_takes_its_executor_from_the_patched_attribute(monkeypatch):
    monkeypatch.setattr(SUPEREXEC, "get_executor", SUPEREXEC.get_executor)  # restored after
    fs.install_fork_executor()
    patched, used = SUPEREXEC.get_executor, []

    def spy(*args, **kwargs):
        used.append(patched(*args, **kwargs))
        return used[-1]

    def no_network(**kwargs):
        raise _Stop

    monkeypatch.setattr(SUPEREXEC, "get_executor", spy)
    monkeypatch.setattr(SUPEREXEC.RuntimeHttpClient, "from_server_address", no_network)
    with pytest.raises(_Stop):
        SUPEREXEC.run_superexec(runtime_api_address="127.0.0.1:1", insecure=True)
    assert [type(e).__name__ for e in used] == ["ForkExecutor"]


def test_fork_executor_runs_flowers_run_clientapp_in_a_forked_child(monkeypatch, tmp_path):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

    out = tmp_path / "child.txt"

    def fake_run_clientapp(runtime_api_address, token, insecure, parent_pid):
        tmp = out.with_suffix(".tmp")  # written whole, then renamed: the parent never reads half a file
        tmp.write_text(f"{os.getpid()} {runtime_api_address} {token}")
        os.replace(tmp, out)

    monkeypatch.setattr("flwr.supernode.runtime.run_clientapp.run_clientapp", fake_run_clientapp)
    executor = fs.make_fork_executor()
    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9", token="t0k",
                         insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=None, suppress_output=False, task_id=1)
    assert executor.launch(spec).status == LaunchResultStatus.ACCEPTED
    deadline = time.monotonic() + 300  # a bound on a hung child, not a race with a busy machine
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.reconcile()
    pid, address, token = out.read_text().split()
    assert int(pid) != os.getpid() and (address, token) == ("127.0.0.1:9", "t0k")
