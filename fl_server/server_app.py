"""The Flower ServerApp of a deployed consortium (`flwr run` / `fl-server start`).

Run config keys: `consortium` (path of the consortium YAML on the server), optional
`run-dir` (defaults to the YAML's run_dir), `resume` (true to continue from the last
checkpoint), and two transport settings (fl_server.superlink.PollingGrid):
`reply-poll-interval` (seconds between looks for the sites' replies: 0.2; Flower's Grid
waits 3 s) and `pack-arrays` (weights travel as one buffer: true); `revoked-sites`: the
operator's revoked_sites.json, read every round so that an update from a site revoked
during the round is discarded (fl-server revoke). The work is in
fl_server.federation.
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.config import load_consortium
from fl_server.federation import run_federation
from fl_server.report import round_table
from fl_server.superlink import PollingGrid

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_consortium(str(context.run_config["consortium"]))
    run_dir = Path(str(context.run_config.get("run-dir") or cfg.run_dir))
    grid = PollingGrid(grid, float(context.run_config.get("reply-poll-interval", 0.2)),
                       pack=bool(context.run_config.get("pack-arrays", True)))
    revoked = str(context.run_config.get("revoked-sites", ""))
    run_federation(grid, cfg, run_dir, resume=bool(context.run_config.get("resume", False)),
                   on_round=lambda lines: print(round_table(lines), flush=True),
                   revoked_file=Path(revoked) if revoked else None)
