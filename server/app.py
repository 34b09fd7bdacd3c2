"""The ServerApp: the run config from Flower's context, then the run as
server/compose.py builds and runs it (checks, run folder, the chain).

Errors a user can fix (a bad run-config value, a missing model path, a busy run folder,
more clients than the split allows) and a run in which no update was accepted
(server/outcome.py) are logged as one line before the exception propagates, so that
line heads the log; Flower marks the run failed with the same message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import ERROR
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from contract.config import RunConfig, RunConfigError
from runtime import watchdog

from .compose import run_server
from .outcome import RunFailed


def build_server_app(
    overrides: Mapping[str, Any] | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp; `overrides` (dash keys) win over the run config, for in-process use
    (`flwr.simulation.run_simulation` passes no run config of its own). `wrap_grid` lets a
    benchmark time the grid (testing.probe.TimedGrid)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        watchdog.start_from_env()  # under simulation.launch: die with the launcher
        try:
            cfg = RunConfig.from_flower({**context.run_config, **(overrides or {})})
            run_server(cfg, grid, context, wrap_grid=wrap_grid)
        except (RunConfigError, RunFailed) as err:
            log(ERROR, "seedlora: %s", err)
            raise

    return server_app


app = build_server_app()
