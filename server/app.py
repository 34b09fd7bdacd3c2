"""The ServerApp: check the run config, take the run folder, then run the chain
(see chain_server.py).

Errors a user can fix (a bad run-config value, a missing model path, a busy run folder,
more clients than the split allows) and a run in which no update was accepted
(server/outcome.py) are logged as one line before the exception propagates, so that
line heads the log; Flower marks the run failed with the same message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import ERROR, INFO
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from contract.config import RunConfig, RunConfigError
from contract.preflight import check_nodes, check_run
from runtime import watchdog

from . import rundir
from .chain_server import ChainServer, run_chain
from .outcome import RunFailed
from .rounds import FlowerRounds
from .secure import SecureRounds


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
            check_run(cfg)
            with rundir.claim(cfg) as out_dir:
                log(INFO, "seedlora run %s -> %s", context.run_id, out_dir)
                server = ChainServer(cfg, context.run_id, out_dir)
                # Simulated nodes are registered by now (the server's model and data took
                # longer); each holds one of that many partitions.
                check_nodes(cfg, len(list(grid.get_node_ids())))
                grid = wrap_grid(grid) if wrap_grid else grid
                secure = cfg.secagg.secure_aggregation
                run_chain(server, SecureRounds(grid, context) if secure else FlowerRounds(grid))
        except (RunConfigError, RunFailed) as err:
            log(ERROR, "seedlora: %s", err)
            raise

    return server_app


app = build_server_app()
