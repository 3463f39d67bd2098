"""`fl-server`: what the consortium operator runs.

  fl-server provision --consortium FILE --out DIR   CA, server certificate, the sites' public keys
  fl-server start --consortium FILE [--resume]      SuperLink with TLS + site authentication, run the rounds
  fl-server add-site SITE --public-key FILE --consortium FILE   register a site's own key
  fl-server revoke SITE --consortium FILE           refuse a site's key from now on
  fl-server report RUN_DIR                          rebuild RUN_DIR/report.html
  fl-server status RUN_DIR                          print the judge-reliability ledger
  fl-server export RUN_DIR --out DIR [--round N|best]   the model as a MONAI bundle
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared.flower_env import apply_flower_env
from shared.processes import sigterm_as_interrupt


CONSORTIUM_HELP = "the consortium YAML (e.g. sites/demo/consortium.yaml)"
PROVISIONED_HELP = "folder made by fl-server provision --out (default: <run_dir>/../provisioned)"
REVOKE_HELP = ("refuse a site's key at once: the running round discards its pending update, and a running "
               "SuperLink refuses its SuperNode at its next request (else from the next fl-server start)")
START_DESCRIPTION = """\
Start the SuperLink (TLS, only provisioned site keys accepted) and run the consortium's rounds.

Where things are set: the consortium YAML's `server:` section gives `address` (interface the
SuperLink listens on, default 0.0.0.0), `port` (default 8000), `hosts` (names the server
certificate is valid for, default 127.0.0.1 and localhost; the first is the address written
into each site's deployment.superlink by provision) and `sites` (site names that get keys,
default the `name` of each site YAML under `sites:`). Rounds and `min_sites`/`round_timeout`
come from `supervised:`, `preference:` and `federation:`; `run_dir` from the top level.
Host, port and sites also go into what provision writes (the certificate, the keys, each
site.yaml's superlink): after changing them, run provision again."""


def build_parser() -> argparse.ArgumentParser:
    """Every option with a help text (tests/test_bad_input.py walks them all)."""
    parser = argparse.ArgumentParser(prog="fl-server", description="Run the consortium server.")
    sub = parser.add_subparsers(dest="command", required=True)

    provision = sub.add_parser("provision", help="create the CA and server certificate, file the sites' public keys")
    provision.add_argument("--consortium", required=True, type=Path, help=CONSORTIUM_HELP)
    provision.add_argument("--out", required=True, type=Path,
                           help="folder to write: ca/ (keep ca.key offline), server/ (SuperLink certificate, site "
                                "public keys) and sites/<site>/ (the CA, a site.yaml and README to hand over; the "
                                "site makes its own key with fl-client keygen, only --operator-keys puts one here)")
    provision.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    provision.add_argument("--public-key", action="append", metavar="NAME=FILE",
                           help="a site's public key (the .pub it made with fl-client keygen); repeat per "
                                "site; sites without one are added later with fl-server add-site")
    provision.add_argument("--operator-keys", action="store_true",
                           help="DEMO/TEST ONLY: make each site's private key here and put it in its folder "
                                "(you then hold every site's secret); by default sites make their own")

    add_site = sub.add_parser("add-site", help="file a site's own public key and register it (now, if the "
                                               "SuperLink runs, else at the next start)")
    add_site.add_argument("site", help="the site's name (a new one gets its folder and site.yaml under sites/)")
    add_site.add_argument("--public-key", required=True, type=Path,
                          help="the site's .pub file, made at the site with fl-client keygen")
    add_site.add_argument("--consortium", required=True, type=Path, help=CONSORTIUM_HELP)
    add_site.add_argument("--provisioned", type=Path, help=PROVISIONED_HELP)

    start = sub.add_parser("start", help="start the SuperLink and run the consortium's rounds",
                           description=START_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    start.add_argument("--consortium", required=True, type=Path,
                       help=CONSORTIUM_HELP + "; its server: section sets host, port and sites")
    start.add_argument("--provisioned", type=Path, help=PROVISIONED_HELP)
    start.add_argument("--run-dir", type=Path,
                       help="where metrics, ledger, checkpoints and report go (default: run_dir of the YAML)")
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir after its last checkpoint (same consortium YAML)")

    revoke = sub.add_parser("revoke", help=REVOKE_HELP, description=REVOKE_HELP)
    revoke.add_argument("site", help="the site's name, as in the consortium (server.sites or its YAML's name)")
    revoke.add_argument("--consortium", required=True, type=Path, help=CONSORTIUM_HELP)
    revoke.add_argument("--provisioned", type=Path, help=PROVISIONED_HELP)

    report = sub.add_parser("report", help="rebuild the HTML report of a run directory")
    report.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")

    status = sub.add_parser("status", help="print the judge-reliability ledger of a run directory")
    status.add_argument("run_dir", type=Path, help="a run directory (holds ledger.json and metrics.jsonl)")

    export = sub.add_parser("export", help="write a run's model as a MONAI bundle (python -m monai.bundle run)")
    export.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and checkpoints/)")
    export.add_argument("--out", required=True, type=Path, help="bundle folder to write (configs/, models/, docs/)")
    export.add_argument("--round", metavar="N|best",
                        help="round N, or best (RUN_DIR/best.pt, the round chosen on calibration Dice); default: best.pt "
                             "when the run has one, else the last round")
    export.add_argument("--force", action="store_true", help="replace the files of an existing bundle in --out")
    return parser


def main(argv=None) -> int:
    apply_flower_env()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from shared.config import ConfigError

    try:
        with sigterm_as_interrupt():  # from the first line: a signal before a command's own
            return _dispatch(args)  # handler is set stops it with one line too, not a traceback
    except KeyboardInterrupt:
        print(f"fl-server: {args.command} stopped", file=sys.stderr, flush=True)
        return 130
    except ConfigError as exc:
        print(f"fl-server: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    """The command's function; main() turns config errors and signals into one line."""
    if args.command in ("report", "status"):
        if not (args.run_dir / "metrics.jsonl").exists():
            print(f"fl-server: {args.run_dir}: not a run directory (no metrics.jsonl)", file=sys.stderr)
            return 2
        from fl_server.report import build_report, status_table

        if args.command == "report":
            print(build_report(args.run_dir))
        else:
            print(status_table(args.run_dir))
        return 0
    if args.command == "export":
        from fl_server.export import cmd_export

        return cmd_export(args)
    from fl_server import operator

    return getattr(operator, f"cmd_{args.command.replace('-', '_')}")(args)


if __name__ == "__main__":
    sys.exit(main())
