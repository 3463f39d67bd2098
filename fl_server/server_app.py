"""The Flower ServerApp of a deployed consortium (`flwr run` / `fl-server start`).

Run config keys: `consortium` (path of the consortium YAML on the server), optional
`run-dir` (defaults to the YAML's run_dir) and `resume` (true to continue from the last
checkpoint). The work is in fl_server.federation.
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from shared.config import load_consortium
from fl_server.federation import run_federation
from fl_server.report import round_table

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_consortium(str(context.run_config["consortium"]))
    run_dir = Path(str(context.run_config.get("run-dir") or cfg.run_dir))
    run_federation(grid, cfg, run_dir, resume=bool(context.run_config.get("resume", False)),
                   on_round=lambda lines: print(round_table(lines), flush=True))
