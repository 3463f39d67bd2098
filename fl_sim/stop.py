"""One Ctrl-C (or SIGTERM) ends `fl-sim` at once, with one line saying how to resume.

Flower's `run_simulation` has no stop: a KeyboardInterrupt in its main thread leaves the
ServerApp thread (not a daemon) waiting for sites whose Ray workers are gone, so the process
hangs, and Ray prints tracebacks. Every round is already checkpointed when it completes
(`RunDir.save_round`, atomic), so nothing is lost by ending the process outright: the handler
waits for a checkpoint being written, kills every process below us (Ray's GCS, raylet and the
site workers), prints the line and leaves with 128 + the signal number (130, 143).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from shared.processes import kill_descendants

SAVE_WAIT = 5.0  # seconds a checkpoint being written may delay the stop


def completed_round(run_dir: Path) -> int:
    """The last round with a checkpoint in ``run_dir`` (0: none)."""
    found = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    try:
        return int(found[-1].stem.split("_")[1]) if found else 0
    except ValueError:
        return 0


def resume_hint(consortium: Path, run_dir: Path, total_rounds: int) -> str:
    """The one line printed on a stop: where the run is, and the command that continues it."""
    done = completed_round(run_dir)
    command = f"fl-sim --consortium {consortium} --run-dir {run_dir}"
    if done == 0:
        return f"fl-sim: stopped before round 1 of {total_rounds} completed; start again with: {command}"
    if done >= total_rounds:
        return f"fl-sim: stopped after the last round ({done} of {total_rounds}); nothing to resume"
    return f"fl-sim: stopped after round {done} of {total_rounds}; resume with: {command} --resume"


def stop_on_signals(hint) -> Callable[[], None]:
    """Install the handler for SIGINT and SIGTERM (main thread); ``hint()`` gives the line.
    Call it again after anything that installs its own (``ray.init`` takes SIGTERM). Returns
    a function that puts the previous handlers back (fl-sim's main called in-process)."""

    def stop(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut this short
            signal.signal(sig, signal.SIG_IGN)
        run_dir_module = sys.modules.get("fl_server.run_dir")  # not loaded: nothing is saving
        saving = getattr(run_dir_module, "SAVING", None)
        # held until we exit, so no new checkpoint starts either
        saving = saving.acquire(timeout=SAVE_WAIT) if saving is not None else True
        kill_descendants()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        try:
            line = hint()
        except Exception as exc:  # noqa: BLE001 - the stop must happen whatever the hint does
            line = f"fl-sim: stopped ({exc})"
        if not saving:
            line += " (a checkpoint was still being written; the last complete one is used)"
        print(line, file=sys.stderr, flush=True)
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
