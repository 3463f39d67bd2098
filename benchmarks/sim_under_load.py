"""fl-sim on a busy machine: Ray's default worker priority against fl-sim's (prints figures).

    python benchmarks/sim_under_load.py [--spinners 2] [--rounds 2]

Ray starts its worker processes at nice 15; in fl-sim those workers are the simulated sites,
where all the training runs. With other busy processes on the machine (a shared CI runner, a
second experiment) nice-15 workers get a few percent of a core. fl-sim sets Ray's own setting
`RAY_worker_niceness=0`. This runs the same tiny consortium (the bundled lung X-rays at 32 px)
with `--spinners` busy-looping processes at normal priority, once with `RAY_worker_niceness=15`
(Ray's default) and once with fl-sim's default, and prints both wall times, their ratio and the
niceness the sites' processes had.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.federation import tiny_consortium  # noqa: E402


def site_niceness(pid: int) -> set[int]:
    """The niceness of the simulated sites' processes (Ray's ClientAppActor workers) below pid."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if b"ClientAppActor" not in (stat.parent / "cmdline").read_bytes():
                continue
            found.add(int(stat.read_text().rsplit(")", 1)[1].split()[16]))  # field 19: nice
        except (OSError, ValueError, IndexError):
            continue
    return found


def timed_run(consortium: Path, run_dir: Path, niceness: str) -> tuple[float, set[int]]:
    env = dict(os.environ, RAY_worker_niceness=niceness, FLWR_HOME=str(run_dir.parent / "flwr_home"),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    started = time.monotonic()
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fl_sim", "--consortium", str(consortium), "--run-dir",
                                 str(run_dir), "--cpus", "2"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    while proc.poll() is None:
        seen |= site_niceness(proc.pid)
        time.sleep(0.5)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"fl-sim failed ({proc.returncode}) with RAY_worker_niceness={niceness}:\n" + "\n".join(tail))
    return time.monotonic() - started, seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spinners", type=int, default=2, help="busy-looping processes at normal priority (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="preference rounds after 1 supervised round (default 2)")
    args = parser.parse_args(argv)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.spinners)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            consortium = tiny_consortium(folder, args.rounds + 1, supervised_steps=30, preference_steps=10,
                                         round_timeout=3600)  # a starved round must still finish
            results = {label: timed_run(consortium, folder / f"run-{label}", value)
                       for label, value in (("ray-default-15", "15"), ("fl-sim-default-0", "0"))}
    finally:
        for spinner in spinners:
            spinner.kill()
    slow, fast = results["ray-default-15"][0], results["fl-sim-default-0"][0]
    print(f"{args.spinners} busy processes, 1 supervised + {args.rounds} preference rounds, 2 sites at 32 px")
    for label, (seconds, nice) in results.items():
        print(f"  RAY_worker_niceness {label:17s}: {seconds:6.1f} s (sites ran at nice {sorted(nice)})")
    print(f"  ratio: {slow / fast:.2f}x faster at fl-sim's default")
    return 0


if __name__ == "__main__":
    sys.exit(main())
