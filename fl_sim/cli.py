"""`fl-sim`: the whole consortium on one machine with Flower's simulation engine.

Each site of the consortium YAML becomes a simulated SuperNode running our ClientApp on its
own site config; the ServerApp is the same round loop a deployed server runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from fl_sim.stop import resume_hint, stop_on_signals
from shared.flower_env import apply_flower_env


def build_parser() -> argparse.ArgumentParser:
    """Every option with a help text (tests/test_bad_input.py walks them all)."""
    parser = argparse.ArgumentParser(prog="fl-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--consortium", required=True, type=Path, help="consortium YAML (e.g. sites/demo/consortium.yaml)")
    parser.add_argument("--run-dir", type=Path, help="where the run is written (default: run_dir of the YAML)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPU cores the simulation may use")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


RAY_NICENESS = "RAY_worker_niceness"


def main(argv=None) -> int:
    with ExitStack() as held:  # the run dir lock and our signal handler, until we return
        return _main(argv, held)


def _main(argv, held: ExitStack) -> int:
    args = parse_args(argv)
    hint = [lambda: "fl-sim: stopped before the run started"]
    held.callback(stop_on_signals(lambda: hint[0]()))
    apply_flower_env()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints its own INFO lines; no DEBUG echo

    from shared.config import ConfigError, load_consortium, load_consortium_sites, require_usable_site

    try:
        cfg = load_consortium(args.consortium)
        sites = load_consortium_sites(cfg)
        for site in sites:  # every simulated site runs here: its device and work_dir must work here
            require_usable_site(site)
        if cfg.base_checkpoint is not None or cfg.model.pretrained_weights is not None:
            from shared.checkpoints import initial_model

            initial_model(cfg)  # the files fit the network: one line now, not after Ray has started
    except ConfigError as exc:
        print(f"fl-sim: {exc}", file=sys.stderr)
        return 2
    run_dir = (args.run_dir or cfg.run_dir).resolve()
    from fl_server.run_dir import RunDirLocked, run_dir_lock

    try:  # before anything reads or starts: a second run on this run dir stops here
        held.enter_context(run_dir_lock(run_dir))
    except RunDirLocked as exc:
        print(f"fl-sim: {exc}", file=sys.stderr)
        return 2
    total_rounds = cfg.supervised.rounds + cfg.preference.rounds
    hint[0] = lambda: resume_hint(args.consortium, run_dir, total_rounds)
    if not args.resume and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        print(f"fl-sim: {run_dir} already holds a run: pass --resume, or another --run-dir", file=sys.stderr)
        return 2
    if args.resume:  # before Ray starts: a changed config or a finished run is one line, not 20 s and a traceback
        from fl_server.run_dir import ResumeError, RunDir

        try:
            done = RunDir(run_dir).resume_point(cfg)
        except ResumeError as exc:
            print(f"fl-sim: {exc}", file=sys.stderr)
            return 2
        total = cfg.supervised.rounds + cfg.preference.rounds
        if done is not None and done >= total:
            print(f"fl-sim: {run_dir}: the run is already finished ({done} of {total} rounds), nothing to resume; "
                  f"report: {run_dir / 'report.html'}")
            return 0
    return run(cfg, sites, run_dir, args.resume, args.cpus, stop_hint=hint[0])


def run(cfg, sites, run_dir: Path, resume: bool, cpus: int, client_app=None, stop_after: int | None = None,
        on_round=None, stop_hint=None) -> int:
    """Simulate the consortium; `client_app` replaces ours (tests inject faults with Flower mods),
    `stop_after` ends the run after that round as if the server had been stopped, `on_round`
    is called with each round's metric lines in place of printing the round table (benchmarks).
    With `stop_hint` (fl-sim), SIGINT/SIGTERM end the process at once and print that line."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if client_app is None:
        from fl_client.client_app import app as client_app
    from fl_server.federation import run_federation
    from fl_server.report import build_report, round_table

    if on_round is None:
        on_round = lambda lines: print(round_table(lines), flush=True)  # noqa: E731
    # the simulated sites learn which site they are and where they may write from this process's
    # environment (the engine's workers inherit it), never from the server's messages
    from fl_client.site_context import sim_environment

    os.environ.update(sim_environment([s.source_file for s in sites], run_dir))
    failure: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        try:
            run_federation(grid, cfg, run_dir, resume=resume, sites=sites, stop_after=stop_after,
                           on_round=on_round)
        except BaseException as exc:  # surfaced after the simulation engine shuts down
            failure.append(exc)
            raise

    print(f"fl-sim: {cfg.name}: {len(sites)} sites, {cfg.supervised.rounds} supervised + "
          f"{cfg.preference.rounds} preference rounds -> {run_dir}", flush=True)
    # Sites train in parallel, one core each; their torch threads must not oversubscribe.
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ray starts its workers (here: the simulated sites, where all the training runs) at nice 15,
    # so any other busy process on the machine starves the simulation (benchmarks/sim_under_load.py);
    # RAY_worker_niceness is Ray's own setting for it: the sites run at fl-sim's priority instead
    os.environ.setdefault(RAY_NICENESS, "0")
    if stop_hint is not None:
        _start_ray(cpus)  # ray.init takes SIGTERM for itself: our handler goes back after it
        stop_on_signals(stop_hint)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(sites),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": max(1, cpus), "include_dashboard": False},
            },
        )
    except RuntimeError as exc:
        print(f"fl-sim: the simulation engine failed: {exc.__cause__ or exc}", file=sys.stderr, flush=True)
        os._exit(1)  # the ServerApp thread may still be waiting on sites that will never answer
    if failure:
        print(f"fl-sim: the run stopped: {failure[0]}", file=sys.stderr)
        return 1
    report = build_report(run_dir)
    print(f"fl-sim: done. Report: {report}\n        Ledger: fl-server status {run_dir}")
    return 0


def _start_ray(cpus: int) -> None:
    """Start Ray as Flower's RayBackend would (it then skips its own ray.init)."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)  # the workers import our packages as we do
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(num_cpus=max(1, cpus), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})


if __name__ == "__main__":
    sys.exit(main())
