"""The ServerApp: validate the run config, then run the chain (see chain_server.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from contract.config import RunConfig, RunConfigError

from .chain_server import ChainServer, run_chain
from .checkpoint import FILE
from .rounds import FlowerRounds
from .secure import SecureRounds


def run_directory(cfg: RunConfig) -> Path:
    """`output-dir/run-name`; with `resume` and no name, the latest run with a checkpoint."""
    root = Path(cfg.output.output_dir).expanduser().resolve()
    if cfg.output.run_name:
        return root / cfg.output.run_name
    if cfg.output.resume:
        runs = sorted(root.glob(f"*/{FILE}"), key=lambda f: f.stat().st_mtime)
        if not runs:
            raise RunConfigError(f"resume: no checkpoint under output-dir {root}")
        return runs[-1].parent
    return root / time.strftime("%Y%m%d-%H%M%S")


def build_server_app(
    overrides: Mapping[str, Any] | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp; `overrides` (dash keys) win over the run config, for in-process use
    (`flwr.simulation.run_simulation` passes no run config of its own). `wrap_grid` lets a
    benchmark time the grid (simulation.probe.TimedGrid)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flower({**context.run_config, **(overrides or {})})
        out_dir = run_directory(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        log(INFO, "seedlora run %s -> %s", context.run_id, out_dir)
        server = ChainServer(cfg, context.run_id, out_dir)
        grid = wrap_grid(grid) if wrap_grid else grid
        secure = cfg.secagg.secure_aggregation
        run_chain(server, SecureRounds(grid, context) if secure else FlowerRounds(grid))

    return server_app


app = build_server_app()
