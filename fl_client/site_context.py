"""Which site this ClientApp is, and whether it is simulated: decided at the site, never by the server.

A deployed SuperNode names its site YAML in its node config (`site-config`, written by
`fl-client start`). Flower's simulation engine gives each virtual node only `partition-id`;
`fl-sim` (the process the simulated sites run in) puts the consortium's site list and the run
directory in the environment before it starts the engine, and the engine's workers inherit
it. The server's message is never read here: a server must not choose which YAML a site loads
or where on the site's disk it writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context

from shared.config import SiteConfig, load_site

SIM_SITES_ENV = "FEDRNDPO_SIM_SITES"  # JSON list of site YAML paths, by partition id
SIM_RUN_DIR_ENV = "FEDRNDPO_SIM_RUN_DIR"  # the simulation's run directory (overlays go under it)
OVERLAYS = "overlays"


def is_deployed(context: Context) -> bool:
    """A deployed site names its YAML in its node config; a simulated node has only a partition."""
    return "site-config" in context.node_config


def resolve_site(context: Context) -> SiteConfig:
    """The site's config: from the node config in deployment, from fl-sim's environment in
    simulation. Raises ValueError when neither says which site this is."""
    if is_deployed(context):
        return load_site(str(context.node_config["site-config"]))
    if "partition-id" not in context.node_config or SIM_SITES_ENV not in os.environ:
        raise ValueError("this node has no site-config in its node config and is not a node of an fl-sim run")
    sites = json.loads(os.environ[SIM_SITES_ENV])
    return load_site(sites[int(context.node_config["partition-id"])])


def overlay_dir(context: Context) -> Path | None:
    """Where this site may write its calibration overlays: `<run dir>/overlays` in an fl-sim
    simulation, None in deployment (a deployed site writes no images, whatever it is sent).
    Raises ValueError when the overlays folder resolves outside the run directory (a link)."""
    if is_deployed(context) or "partition-id" not in context.node_config:
        return None
    run_dir = os.environ.get(SIM_RUN_DIR_ENV)
    if not run_dir:
        return None
    root = Path(run_dir).resolve()
    target = (root / OVERLAYS).resolve()
    if not target.is_relative_to(root):
        raise ValueError("the overlays folder resolves outside the simulation's run directory")
    return target


def sim_environment(site_files: list, run_dir: Path) -> dict[str, str]:
    """The variables fl-sim sets for its simulated sites (see the module docstring)."""
    return {SIM_SITES_ENV: json.dumps([str(p) for p in site_files]), SIM_RUN_DIR_ENV: str(Path(run_dir).resolve())}
