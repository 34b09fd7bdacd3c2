"""The ServerApp: validate the run config, then run the chain (see chain_server.py)."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .chain_server import ChainServer
from .checkpoint import FILE
from .config import RunConfig, RunConfigError

app = ServerApp()


def run_directory(cfg: RunConfig) -> Path:
    """`output-dir/run-name`; with `resume` and no name, the latest run with a checkpoint."""
    root = Path(cfg.output_dir).expanduser().resolve()
    if cfg.run_name:
        return root / cfg.run_name
    if cfg.resume:
        runs = sorted(root.glob(f"*/{FILE}"), key=lambda f: f.stat().st_mtime)
        if not runs:
            raise RunConfigError(f"resume: no checkpoint under output-dir {root}")
        return runs[-1].parent
    return root / time.strftime("%Y%m%d-%H%M%S")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flower(context.run_config)
    out_dir = run_directory(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(INFO, "seedlora run %s -> %s", context.run_id, out_dir)
    ChainServer(cfg, context.run_id, out_dir).run(grid)
