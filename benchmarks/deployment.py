"""Rounds over a real SuperLink and SuperNodes on loopback vs the same rounds in simulation.

Two demo sites (montgomery, shenzhen_a at --image-size px), a UNet (--model tiny: 15
tensors; demo: the demo consortium's, 49 tensors), --rounds supervised rounds of --steps
steps, run these ways on this machine:

* simulation: `fl-sim` (Flower's simulation engine, Ray), one process;
* deployment, default: `flower-superlink` with TLS and SuperNode authentication, two
  `flower-supernode`s as `fl-client start` runs them by default: Flower as shipped (its own
  SuperExec, a fresh `flwr-clientapp` process per message, 3 s idle poll) with public
  settings only: SuperExec polling every 0.2 s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL), the
  ServerApp looking for replies every 0.2 s and sending the weights packed in one buffer;
* deployment, fast_start: the same plus the opt-in patches of fl_client/flower_speedups.py
  (site YAML `deployment: {fast_start: true}`): a warm forked ClientApp process, 0.5 s idle poll;
* deployment, Flower's defaults (with --flower-defaults): as default, but SuperExec polling
  every 1 s, replies looked for every 3 s, one object per tensor.

For each it prints the wall time and, per round, the round's duration as the server measured
it (metrics.jsonl `duration_s`), the sites' compute (per message, the slowest site's
`compute_s`, summed over the round's messages) and the fixed overhead: duration - compute.
Round 1 also asks each node which site it is (one more message). Timings depend on the
machine's load, which is printed.

    .venv/bin/python benchmarks/deployment.py --rounds 4 --steps 5 --flower-defaults
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "lung_cxr"
SITES = ("montgomery", "shenzhen_a")
sys.path.insert(0, str(ROOT))

from shared.flower_env import apply_flower_env  # noqa: E402


MODELS = {  # tiny: 15 tensors; demo: the demo consortium's UNet, 49 tensors, 0.4 M weights
    "tiny": "{name: unet, channels: [8, 16], strides: [2], num_res_units: 1, dropout: 0.1}",
    "demo": "{name: unet, channels: [16, 32, 64, 128], strides: [2, 2, 2], num_res_units: 2, dropout: 0.1}",
}


def write_configs(work: Path, rounds: int, steps: int, image_size: int, model: str) -> Path:
    from fl_server.superlink import free_port

    work.mkdir(parents=True, exist_ok=True)
    for name in SITES:
        (work / f"{name}.yaml").write_text(textwrap.dedent(f"""\
            name: {name}
            work_dir: {work / 'sites' / name}
            image_size: {image_size}
            device: cpu
            data:
              source: {{images: {DEMO / name / 'images'}, masks: {DEMO / name / 'masks'}}}
              split: {{labeled: 0.2, calibration: 0.15, unlabeled: 0.45, test: 0.2}}
            judge: {{kind: agreement}}
            deployment:
              superlink: 127.0.0.1:1
              ca_cert: {work / 'prov' / 'sites' / name / 'ca.crt'}
              private_key: {work / 'prov' / 'sites' / name / f'{name}_auth'}
              port: {free_port()}
            """))
    consortium = work / "consortium.yaml"
    consortium.write_text(textwrap.dedent(f"""\
        name: bench
        sites: [{', '.join(f'{n}.yaml' for n in SITES)}]
        run_dir: {work / 'run'}
        seed: 0
        model: {MODELS[model]}
        supervised: {{rounds: {rounds}, steps: {steps}, lr: 0.01, batch_size: 4}}
        preference: {{rounds: 0}}
        federation: {{min_sites: 2, round_timeout: 300}}
        server: {{hosts: [127.0.0.1]}}
        """))
    return consortium


def round_figures(run_dir: Path) -> list[dict]:
    """Per round: duration (server), compute (slowest site per message, summed), overhead."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = []
    for glob in (line for line in lines if line["kind"] == "global"):
        sites = [line for line in lines if line["kind"] == "site" and line["round"] == glob["round"]]
        compute = sum(max((s.get(part, {}).get("compute_s", 0.0) for s in sites), default=0.0)
                      for part in ("train", "eval"))
        out.append({"round": glob["round"], "duration": glob["duration_s"], "compute": compute,
                    "overhead": glob["duration_s"] - compute})
    return out


def run_simulation(consortium: Path, run_dir: Path) -> float:
    env = dict(os.environ, FLWR_HOME=str(run_dir.parent / "sim_flwr_home"))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fl_sim", "--consortium", str(consortium),
                           "--run-dir", str(run_dir), "--cpus", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"fl-sim failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def run_deployment(consortium: Path, work: Path, run_dir: Path, tuned: bool,
                   fast: bool = False) -> tuple[float, float]:
    """(wall from `flwr run` to the run's end, SuperLink + SuperNodes start-up) for one run.
    tuned: our public settings (polls, packing); fast: the opt-in flower_speedups too."""
    from fl_client.start import IDLE_POLL
    from fl_client.supernode import start_supernode
    from fl_server import operator as op
    from fl_server import superlink as sl
    from shared.config import load_consortium, load_site

    cfg = load_consortium(consortium)
    paths = op.OperatorPaths.of(work / "prov")
    poll = op.TASK_POLL_INTERVAL if tuned else 1.0
    handles = []
    started = time.monotonic()
    link, connection = op.start_consortium_superlink(
        cfg, paths, run_dir, say=lambda text: None, host="127.0.0.1", port=sl.free_port(),
        task_poll_interval=poll)
    handles.append(link)
    try:
        for name in SITES:
            site = load_site(consortium.parent / f"{name}.yaml")
            dep = site.deployment
            handles.insert(0, start_supernode(
                link.address, dep.ca_cert, dep.private_key, {"site-config": str(site.source_file)},
                clientappio_port=dep.port, work_dir=site.work_dir / f"supernode-{run_dir.name}",
                site=name, wait=False, task_poll_interval=poll, warm_clientapp=fast,
                idle_poll=IDLE_POLL if fast else None, extra_env={"OMP_NUM_THREADS": "1"}))
        for handle in handles[:-1]:
            handle.wait_connected(60)
        startup = time.monotonic() - started
        if fast:
            time.sleep(3)  # let the warm SuperExecs finish importing torch before the clock starts
        started = time.monotonic()
        run_id = op.submit_consortium_run(cfg, paths, run_dir, connection, resume=False,
                                          extra_config={"reply-poll-interval": 0.2 if tuned else 3.0,
                                                        "pack-arrays": tuned})
        status = sl.wait_for_run(run_id, paths.flwr_home, connection, timeout=900, poll=0.2)
        wall = time.monotonic() - started
        if status != "finished:completed":
            raise SystemExit(f"deployment run {status}:\n{sl.run_logs(run_id, paths.flwr_home, connection)[-3000:]}")
    finally:
        sl.stop_all(handles)
    return wall, startup


def report(label: str, wall: float, figures: list[dict], extra: str = "") -> None:
    rounds = "  ".join(f"r{f['round']}: {f['duration']:.1f}s (compute {f['compute']:.1f}, "
                       f"overhead {f['overhead']:.1f})" for f in figures)
    print(f"{label:28s} wall {wall:6.1f}s{extra}\n{'':28s} {rounds}", flush=True)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="supervised rounds (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per round (default 5)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--flower-defaults", action="store_true",
                        help="also run the deployment with Flower's default settings")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)
    apply_flower_env()
    work = (args.keep or Path(tempfile.mkdtemp(prefix="bench-deploy-"))).resolve()
    os.environ["FLWR_HOME"] = str(work / "flwr_home")
    try:
        from fl_server.operator import provision_consortium

        consortium = write_configs(work, args.rounds, args.steps, args.image_size, args.model)
        import inspect  # the sites' keys: made here by the operator where provision can (test keys)

        keys = {"operator_keys": True} if "operator_keys" in inspect.signature(provision_consortium).parameters else {}
        provision_consortium(consortium, work / "prov", **keys)
        print(f"{len(SITES)} sites, {args.model} model, {args.rounds} rounds x {args.steps} steps, "
              f"{args.image_size}px; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; work in {work}",
              flush=True)

        sim_wall = run_simulation(consortium, work / "run-sim")
        sim = round_figures(work / "run-sim")
        report("simulation (fl-sim)", sim_wall, sim)

        runs = [("deployment, default", "default", True, False),
                ("deployment, fast_start", "fast", True, True)]
        if args.flower_defaults:
            runs.append(("deployment, Flower defaults", "flower", False, False))
        results = {}
        for label, name, tuned, fast in runs:
            run_dir = work / f"run-{name}"
            wall, startup = run_deployment(consortium, work, run_dir, tuned, fast)
            results[label] = round_figures(run_dir)
            report(label, wall, results[label], f" (+{startup:.1f}s SuperLink/SuperNodes start)")

        later = slice(1, None) if args.rounds > 1 else slice(None)
        sim_round = mean([f["duration"] for f in sim[later]])
        print(f"\nper round (rounds {'2+' if args.rounds > 1 else '1'}; round 1 also identifies "
              f"the sites), load average now {os.getloadavg()[0]:.1f}:")
        print(f"  simulation                   {sim_round:6.1f}s, overhead "
              f"{mean([f['overhead'] for f in sim[later]]):.1f}s")
        for label, figures in results.items():
            dep_round = mean([f["duration"] for f in figures[later]])
            print(f"  {label:28s} {dep_round:6.1f}s, overhead "
                  f"{mean([f['overhead'] for f in figures[later]]):.1f}s "
                  f"(first round {figures[0]['overhead']:.1f}s), "
                  f"ratio to simulation {dep_round / sim_round:.2f}")
        default, fast = ([mean([f["duration"] for f in results[k][later]])
                          for k in ("deployment, default", "deployment, fast_start")])
        print(f"  default (Flower as shipped) / fast_start (opt-in patches): {default / fast:.2f}x "
              "per round, same run")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
