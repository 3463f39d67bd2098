"""Environment every Flower process we start must run with (no installs, no telemetry)."""

import os

FLOWER_ENV = {
    # Flower would otherwise install an app's dependencies with uv at run time, ignoring
    # our CPU torch pin and pulling multi-GB GPU builds onto hospital machines.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Nothing leaves a site that we did not decide to send.
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def apply_flower_env() -> None:
    """Set FLOWER_ENV in this process, so that it and every child process inherit it."""
    os.environ.update(FLOWER_ENV)
