"""Federation benchmarks: memory over many rounds, non-compute share of a round (prints figures; not a test).

    python benchmarks/federation.py [--rounds 100] [--share-rounds 3] [--share-cpus N]
                                    [--skip-memory] [--skip-share]

Both parts run our real federation in Flower's simulation engine (`fl_sim.cli.run`: our
ServerApp round loop, our ClientApp in Ray actors), each in a fresh Python process so that one
part's Ray session and memory do not touch the other's, with every file in a temporary folder.

1. Memory over rounds. Two tiny sites (montgomery and shenzhen_a from data/demo at 32 x 32,
   oracle judges, UNet 8-16-32) run 1 supervised round (2 steps) then `rounds - 1` preference
   rounds of 1 RN-DPO step each (proposals: identity + hflip + 1 MC sample, threshold 0.5; at
   most 8 unlabelled images mined), on 2 actors (one per site). Each round is as small as the
   round loop allows, so that the run is dominated by what is kept from round to round. At the
   end of each round (`on_round`) the server process reads its own /proc/self/status: VmRSS
   (resident now), RssAnon (of which heap) and VmHWM (peak). The client figure is `rss_mb` of
   each site's train and evaluate replies (the peak RSS of the Ray actor process that ran the
   handler; actors persist across rounds, so a leak in the ClientApp shows as growth; Flower
   hands a message to any free actor, so a site's figure is whichever actor ran it); per site
   and round we take the larger of the two. Growth = (value at round R - value at round
   10) / value at round 10, with R = --rounds. Target: at most 10 % for each.
2. Non-compute share of a round at the demo size: sites/demo/consortium.yaml as it is (3 sites,
   128 x 128, UNet 16-32-64-128, 40 supervised / 20 preference steps, K = 11 proposals), except
   the rounds: 1 supervised round then `share-rounds - 1` preference rounds. A round is two
   barriers, train then evaluate (the server waits for every reply of one before it sends the
   next), so with at least one actor per site (the default, --share-cpus = number of sites) the
   critical path of local compute is
       C = max over sites of train compute_s + max over sites of evaluate compute_s
   (compute_s: wall time inside the ClientApp handler: load data + train or evaluate, as
   reported in each reply; on a machine with fewer cores than actors it includes waiting for a
   core). The round's wall time D is the global line's `duration_s` (from building the train
   messages to the evaluate replies' results; the checkpoint write after it is printed apart). Non-compute = D - C: messaging, serialisation, Flower's 0.1 s polling,
   update checks and aggregation, actor start and imports (round 1), identify queries.
   Share = sum of (D - C) / sum of D, over all rounds (round 1 carries the one-off engine start:
   Ray, the actor processes, their imports) and over rounds 2.. (steady state). With fewer actors
   than sites the makespan of each barrier is not known, so two bounds are printed: pessimistic
   (C from the lower bound max(max c, sum c / actors)) and optimistic (C from the worst greedy
   order of the jobs on the actors); the table uses the pessimistic one. Target: below 10 %.
   To show where round 1's time goes, this part runs our ClientApp with one more mod that logs
   each message's actor process, its start time and the handler's entry and exit (microseconds).

The machine is shared: run it when it is quiet, and compare figures from the same machine only.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_DATA = ROOT / "data" / "demo" / "lung_cxr"
DEMO_CONSORTIUM = ROOT / "sites" / "demo" / "consortium.yaml"
TINY_SITES = ("montgomery", "shenzhen_a")
EARLY_ROUND = 10
GROWTH_TARGET = 0.10  # at most, between round 10 and the last
SHARE_TARGET = 0.10  # below
PROGRESS = "  .. "


# ----------------------------------------------------------------------------- helpers


def proc_status_mb(*fields: str) -> dict[str, float]:
    """Fields of /proc/self/status in MB (VmRSS, RssAnon, VmHWM, ...)."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            found[key] = int(value.split()[0]) / 1024  # kB
    missing = set(fields) - set(found)
    if missing:
        raise RuntimeError(f"/proc/self/status has no {sorted(missing)}")
    return found


def makespan_bounds(jobs: list[float], actors: int) -> tuple[float, float]:
    """(lower, upper) bound of the time `actors` parallel workers need for `jobs` (seconds).

    Lower: no schedule beats the longest job or the perfectly balanced load. Upper: the worst
    order in which a greedy pool (a free actor takes the next job) could have received them.
    """
    if not jobs:
        return 0.0, 0.0
    lower = max(max(jobs), sum(jobs) / actors)
    if actors >= len(jobs):
        return lower, lower
    upper = 0.0
    orders = itertools.permutations(jobs) if len(jobs) <= 7 else [sorted(jobs)]
    for order in orders:
        free = [0.0] * actors
        for job in order:
            i = free.index(min(free))
            free[i] += job
        upper = max(upper, max(free))
    return lower, upper


def growth(early: float, late: float) -> float:
    return (late - early) / early


def run_worker(part: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one part in a fresh Python process; it writes its figures as JSON to `out`."""
    command = [sys.executable, __file__, "--worker", part, "--worker-out", str(out),
               "--rounds", str(args.rounds), "--share-rounds", str(args.share_rounds)]
    if args.share_cpus:
        command += ["--share-cpus", str(args.share_cpus)]
    log = []  # Flower's and Ray's own lines: shown only if the part fails
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as worker:
        for line in worker.stdout:
            if line.startswith(PROGRESS):
                print(line.rstrip(), flush=True)
            else:
                log.append(line.rstrip())
    if worker.returncode != 0 or not out.exists():
        tail = "\n".join(log[-30:])
        raise RuntimeError(f"the {part} part failed (exit {worker.returncode}); its last lines:\n{tail}")
    return json.loads(out.read_text())


def simulate(cfg, run_dir: Path, cpus: int, on_round, client_app=None) -> None:
    from fl_sim import cli as sim
    from shared.config import load_consortium_sites

    code = sim.run(cfg, load_consortium_sites(cfg), run_dir, resume=False, cpus=cpus, client_app=client_app,
                   on_round=on_round)
    if code != 0:
        raise RuntimeError(f"the simulation failed (exit {code})")


def progress(text: str) -> None:
    print(PROGRESS + text, flush=True)  # the parent shows these lines of the worker's output


def process_started_at() -> float:
    """Wall-clock time this process started (Linux; about 1 s resolution: boot time is in seconds)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def timeline_mod(msg, context, call_next):
    """ClientApp mod (part 2 only): one JSON line per message in $BENCH_FEDERATION_TIMELINE: which
    actor process, when it started, when the handler was entered and left. Costs microseconds."""
    entered = time.time()
    reply = call_next(msg, context)
    config = msg.content.config_records.get("config") if msg.has_content() else None
    line = {"pid": os.getpid(), "process_started": process_started_at(), "entered": entered, "left": time.time(),
            "type": msg.metadata.message_type, "round": config.get("server-round") if config is not None else None}
    with open(os.environ["BENCH_FEDERATION_TIMELINE"], "a") as f:
        f.write(json.dumps(line) + "\n")
    return reply


def timed_client_app():
    """Our ClientApp's handlers and mod, plus `timeline_mod`."""
    from flwr.clientapp import ClientApp

    from fl_client import client_app as ours
    from fl_client.supernode import sent_log_mod

    app = ClientApp(mods=[sent_log_mod, timeline_mod])
    app.train()(ours.train)
    app.evaluate()(ours.evaluate)
    app.query()(ours.identify)
    return app


# ----------------------------------------------------------------------------- 1. memory


def tiny_consortium(folder: Path, rounds: int, supervised_steps: int = 2, preference_steps: int = 1,
                    round_timeout: float = 120) -> Path:
    """Two demo sites at 32 px, a tiny UNet, one step a round (by default): 1 supervised +
    rounds-1 preference."""
    for name in TINY_SITES:
        (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
            name: {name}
            work_dir: {folder / 'work' / name}
            image_size: 32
            device: cpu
            data:
              source: {{images: {DEMO_DATA / name / 'images'}, masks: {DEMO_DATA / name / 'masks'}}}
              split: {{labeled: 0.2, calibration: 0.15, unlabeled: 0.45, test: 0.2}}
            judge: {{kind: oracle}}
            """))
    consortium = folder / "consortium.yaml"
    consortium.write_text(textwrap.dedent(f"""\
        name: memory-bench
        sites: {[f'{name}.yaml' for name in TINY_SITES]}
        run_dir: {folder / 'run'}
        seed: 3
        model: {{name: unet, channels: [8, 16, 32], strides: [2, 2], num_res_units: 1, dropout: 0.1}}
        supervised: {{rounds: 1, steps: {supervised_steps}, lr: 0.01, batch_size: 4}}
        preference:
          rounds: {rounds - 1}
          steps: {preference_steps}
          batch_pairs: 4
          max_unlabeled: 8
          proposals: {{tta: [identity, hflip], mc_samples: 1, thresholds: [0.5]}}
        aggregation: {{kind: reliability}}
        federation: {{min_sites: 2, round_timeout: {round_timeout}}}
        """))
    return consortium


def memory_worker(rounds: int) -> dict:
    from shared.config import load_consortium

    with tempfile.TemporaryDirectory(prefix="bench-federation-memory-") as tmp:
        cfg = load_consortium(tiny_consortium(Path(tmp), rounds))
        server: dict[int, dict] = {}
        clients: dict[int, dict[str, float]] = {}
        started = time.time()

        def on_round(lines: list[dict]) -> None:
            r = lines[0]["round"]
            server[r] = proc_status_mb("VmRSS", "RssAnon", "VmHWM")
            clients[r] = {
                line["site"]: max(line["train"].get("rss_mb", 0.0), line["eval"].get("rss_mb", 0.0))
                for line in lines if line["kind"] == "site"
            }
            if r == 1 or r % 10 == 0:
                progress(f"memory: round {r}/{rounds}, server RSS {server[r]['VmRSS']:.0f} MB, "
                         f"{time.time() - started:.0f} s")

        simulate(cfg, Path(tmp) / "run", cpus=len(TINY_SITES), on_round=on_round)
        metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    durations = [line["duration_s"] for line in metrics if line["kind"] == "global"]
    return {"rounds": rounds, "seconds": time.time() - started, "server": server, "clients": clients,
            "mean_round_s": sum(durations) / len(durations)}


# ----------------------------------------------------------------------------- 2. share


def share_worker(share_rounds: int, cpus: int | None) -> dict:
    from shared.config import load_consortium

    demo = load_consortium(DEMO_CONSORTIUM)
    supervised = 1 if share_rounds > 1 else share_rounds
    with tempfile.TemporaryDirectory(prefix="bench-federation-share-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = dataclasses.replace(
            demo, run_dir=run_dir,
            supervised=dataclasses.replace(demo.supervised, rounds=supervised),
            preference=dataclasses.replace(demo.preference, rounds=share_rounds - supervised),
        )
        actors = cpus or len(cfg.sites)
        timeline = Path(tmp) / "timeline.jsonl"
        os.environ["BENCH_FEDERATION_TIMELINE"] = str(timeline)  # inherited by Ray's worker processes
        app = timed_client_app()  # imports torch, MONAI and Flower here, before the clock starts
        ended: dict[int, float] = {}
        started = time.time()

        def on_round(lines: list[dict]) -> None:
            r = lines[0]["round"]
            ended[r] = time.time()
            progress(f"share: round {r}/{share_rounds} ({lines[0]['phase']}) done, {ended[r] - started:.0f} s")

        simulate(cfg, run_dir, cpus=actors, on_round=on_round, client_app=app)
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        messages = [json.loads(x) for x in timeline.read_text().splitlines()]
    rounds = []
    for r in sorted({line["round"] for line in metrics}):
        sites = [line for line in metrics if line["round"] == r and line["kind"] == "site"]
        (glob,) = [line for line in metrics if line["round"] == r and line["kind"] == "global"]
        train = [s["train"]["compute_s"] for s in sites if "compute_s" in s["train"]]
        evaluate = [s["eval"]["compute_s"] for s in sites if "compute_s" in s["eval"]]
        (train_lo, train_hi), (eval_lo, eval_hi) = makespan_bounds(train, actors), makespan_bounds(evaluate, actors)
        rounds.append({
            "round": r, "phase": glob["phase"], "duration_s": glob["duration_s"],
            "train_s": train, "eval_s": evaluate, "sites": [s["site"] for s in sites],
            "statuses": [s["status"] for s in sites],
            "critical_lo": train_lo + eval_lo, "critical_hi": train_hi + eval_hi,
            # between two rounds' ends, outside duration_s: checkpoint, ledger and metrics writes
            "outside_s": ended[r] - ended[r - 1] - glob["duration_s"] if r - 1 in ended else None,
        })
    # round 1 from its start: when the actor processes started, when each first ran a handler
    first = rounds[0]
    zero = ended[first["round"]] - first["duration_s"]
    pids = sorted({m["pid"] for m in messages})
    start_up = {
        "processes_started": [min(m["process_started"] for m in messages if m["pid"] == p) - zero for p in pids],
        "first_handler": [min(m["entered"] for m in messages if m["pid"] == p) - zero for p in pids],
        "first_train": min(m["entered"] for m in messages if m["type"] == "train") - zero,
        "identify": [m["left"] - m["entered"] for m in messages if m["type"] == "query"],
        "simulate_to_round_1": zero - started,
    }
    return {"rounds": rounds, "actors": actors, "sites": len(cfg.sites), "supervised": supervised,
            "preference": share_rounds - supervised, "seconds": time.time() - started, "start_up": start_up}


# ----------------------------------------------------------------------------- report


def cpu_info() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} logical CPUs ({usable} usable), load average {load}"


def report_memory(mem: dict) -> list[tuple]:
    rounds = mem["rounds"]
    early = min(EARLY_ROUND, rounds)
    server = {int(k): v for k, v in mem["server"].items()}
    clients = {int(k): v for k, v in mem["clients"].items()}
    print(f"1. memory over {rounds} rounds: 2 sites at 32 px, 1 supervised + {rounds - 1} preference rounds "
          f"of 1 step, 2 actors; {mem['seconds']:.0f} s in all, mean round duration_s {mem['mean_round_s']:.2f} s")
    marks = sorted({1, early, *range(25, rounds, 25), rounds})
    sites = sorted(clients[rounds])
    print(f"   {'round':>5} {'server VmRSS':>12} {'RssAnon':>8} {'VmHWM':>8} " +
          " ".join(f"{s + ' rss_mb':>18}" for s in sites))
    for r in marks:
        s = server[r]
        print(f"   {r:5d} {s['VmRSS']:9.0f} MB {s['RssAnon']:5.0f} MB {s['VmHWM']:5.0f} MB " +
              " ".join(f"{clients[r].get(site, float('nan')):15.0f} MB" for site in sites))
    rows = []
    for key, name in (("VmRSS", "server RSS now"), ("VmHWM", "server peak RSS")):
        g = growth(server[early][key], server[rounds][key])
        rows.append((f"{name}, round {early} -> {rounds}",
                     f"{server[early][key]:.0f} -> {server[rounds][key]:.0f} MB ({100 * g:+.1f} %)",
                     f"<= {100 * GROWTH_TARGET:.0f} % growth", g <= GROWTH_TARGET))
    for site in sites:
        g = growth(clients[early][site], clients[rounds][site])
        rows.append((f"client {site} rss_mb (peak), round {early} -> {rounds}",
                     f"{clients[early][site]:.0f} -> {clients[rounds][site]:.0f} MB ({100 * g:+.1f} %)",
                     f"<= {100 * GROWTH_TARGET:.0f} % growth", g <= GROWTH_TARGET))
    return rows


def report_share(share: dict) -> list[tuple]:
    actors, n = share["actors"], share["sites"]
    exact = actors >= n
    print(f"2. non-compute share at the demo size: {n} sites, {share['supervised']} supervised + "
          f"{share['preference']} preference rounds, {actors} actors; {share['seconds']:.0f} s in all")
    print("   D = duration_s (train + evaluate of the round); C = critical path of client compute = "
          "makespan(train compute_s) + makespan(evaluate compute_s)" +
          ("; with one actor per site, makespan = max" if exact else
           f"; {n} jobs on {actors} actors: C between max(max c, sum c / {actors}) and the worst greedy order"))
    print(f"   {'round':>5} {'phase':<10} {'D s':>7} {'train compute_s per site':>28} "
          f"{'eval compute_s per site':>26} {'C s':>13} {'D - C s':>13} {'share':>13} {'ckpt s':>7}")
    for r in share["rounds"]:
        d = r["duration_s"]
        c = f"{r['critical_lo']:.2f}" if exact else f"{r['critical_lo']:.1f}-{r['critical_hi']:.1f}"
        nc = f"{d - r['critical_lo']:.2f}" if exact else f"{d - r['critical_hi']:.1f}-{d - r['critical_lo']:.1f}"
        sh = (f"{100 * (d - r['critical_lo']) / d:.1f} %" if exact else
              f"{100 * (d - r['critical_hi']) / d:.0f}-{100 * (d - r['critical_lo']) / d:.0f} %")
        outside = "-" if r["outside_s"] is None else f"{r['outside_s']:.2f}"
        print(f"   {r['round']:5d} {r['phase']:<10} {d:7.2f} {' '.join(f'{x:6.2f}' for x in r['train_s']):>28} "
              f"{' '.join(f'{x:6.2f}' for x in r['eval_s']):>26} {c:>13} {nc:>13} {sh:>13} {outside:>7}")
    print(f"   sites (column order): {', '.join(share['rounds'][0]['sites'])}; "
          f"statuses: {sorted({s for r in share['rounds'] for s in r['statuses']})}; "
          "ckpt s = time between two rounds' ends outside D (checkpoint, ledger, metrics writes)")
    up = share["start_up"]
    spread = lambda xs: f"{min(xs):+.1f}..{max(xs):+.1f} s"  # noqa: E731
    print(f"   round 1 timeline from its start (the ServerApp starts it while the engine is still starting; "
          f"sim.run to round 1 start: {up['simulate_to_round_1']:.1f} s):")
    print(f"     actor processes started {spread(up['processes_started'])} (+-1 s), ran their first handler "
          f"{spread(up['first_handler'])} (Ray start + unpickling our ClientApp: torch, MONAI, Flower imports),")
    print(f"     identify handlers took {' '.join(f'{x:.2f}' for x in up['identify'])} s, first train handler at "
          f"{up['first_train']:+.1f} s of the round's {share['rounds'][0]['duration_s']:.1f} s")

    rows = []
    target = f"< {100 * SHARE_TARGET:.0f} %"
    for label, part in ((f"all {len(share['rounds'])} rounds (with engine start)", share["rounds"]),
                        (f"rounds 2-{len(share['rounds'])} (steady state)", share["rounds"][1:])):
        if not part:
            continue
        d = sum(r["duration_s"] for r in part)
        pessimistic = (d - sum(r["critical_lo"] for r in part)) / d
        optimistic = (d - sum(r["critical_hi"] for r in part)) / d
        if exact:
            rows.append((f"non-compute share, demo, {label}", f"{100 * pessimistic:.1f} %", target,
                         pessimistic < SHARE_TARGET))
        else:
            print(f"   {label}: optimistic {100 * optimistic:.1f} %, pessimistic {100 * pessimistic:.1f} %")
            rows.append((f"non-compute share, demo, {label}, pessimistic", f"{100 * pessimistic:.1f} %", target,
                         pessimistic < SHARE_TARGET))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100, help="rounds of the memory run (default 100)")
    parser.add_argument("--share-rounds", type=int, default=3,
                        help="rounds of the demo-size run: 1 supervised, the rest preference (default 3)")
    parser.add_argument("--share-cpus", type=int, default=None,
                        help="actors of the demo-size run (default: one per site, so that the critical path is exact)")
    parser.add_argument("--skip-memory", action="store_true", help="skip part 1")
    parser.add_argument("--skip-share", action="store_true", help="skip part 2 (the demo-size share)")
    parser.add_argument("--worker", choices=("memory", "share"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.share_rounds < 1:
        parser.error("--rounds must be at least 2 and --share-rounds at least 1")

    if args.worker:
        figures = memory_worker(args.rounds) if args.worker == "memory" else share_worker(args.share_rounds, args.share_cpus)
        args.worker_out.write_text(json.dumps(figures))
        return 0

    import flwr
    import ray
    import torch

    print(f"flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, python "
          f"{platform.python_version()}; CPU: {cpu_info()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp:
        if not args.skip_memory:
            mem = run_worker("memory", args, Path(tmp) / "memory.json")
            print()
            rows += report_memory(mem)
        if not args.skip_share:
            share = run_worker("share", args, Path(tmp) / "share.json")
            print()
            rows += report_share(share)
    print()
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'figure':<{width}}  {'value':>{vwidth}}  {'target':<16} result")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {target:<16} {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
