"""The composition root of the server side: every entry point builds and runs it here.

`build_server` makes the four objects of a run, each with one job: the chain loop's
`ChainServer` (state, master, the steps), the `Evaluator` (central set, device,
evaluation), the `RunStore` (run folder, metrics.json, checkpoints, resume) and the
`Exporter`. `run_server` is a whole run as the ServerApp (server/app.py) and the
in-process harness (simulation/local.py) both run it: the preflight checks, the run
folder claimed and locked, the server built, the node count checked, then `run_chain`
over the runner the config picks (Flower's message rounds, or SecAgg+ rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid

from contract.config import RunConfig, RunConfigError
from contract.preflight import check_nodes, check_run
from seedlora import prepare
from tasks import build_task

from . import rundir
from .chain_server import ChainServer, LinkRunner, run_chain
from .evaluator import Evaluator
from .exporter import Exporter
from .rounds import FlowerRounds
from .secure import SecureRounds
from .store import RunStore


def build_master(cfg: RunConfig, task) -> torch.nn.Module:
    """The server's one float32 master: the task's W0 with the run's adapters (link 0)."""
    a = cfg.adapter
    try:
        model = prepare(
            task.load_model(cache=False),  # the process's one float32 master
            a.method,
            a.targets(task.target_modules),
            kind=a.kind,
            seed=a.seed,
            rank=a.rank,
            alpha=a.alpha,
            heads=a.heads(task.modules_to_save),
            frozen=a.frozen_factor,
        )
    except ValueError as err:
        raise RunConfigError(f"run-config: {err}") from None
    return model.eval()


def build_server(cfg: RunConfig, run_id: int, out_dir: Path) -> ChainServer:
    """The chain loop of run `run_id` writing to `out_dir`, with its evaluator, store and
    exporter (and, with `resume`, the checkpoint in `out_dir` adopted)."""
    task = build_task(cfg.task_config())
    model = build_master(cfg, task)
    evaluator = Evaluator(task, model, cfg)  # checks server-device before any round
    store = RunStore(out_dir, cfg, run_id)
    exporter = Exporter(task, cfg, out_dir)
    return ChainServer(cfg, run_id, task, model, evaluator, store, exporter)


def build_runner(cfg: RunConfig, grid: Grid, context: Context) -> LinkRunner:
    """How the rounds reach the clients: SecAgg+ rounds, or Flower's message rounds."""
    return SecureRounds(grid, context) if cfg.secagg.secure_aggregation else FlowerRounds(grid)


def run_server(
    cfg: RunConfig,
    grid: Grid,
    context: Context,
    *,
    folder: Path | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ChainServer:
    """One whole run (module docstring); returns the server as the run left it.

    `folder`: the run folder (the in-process harness's own), else the one the config
    names (`output-dir`/`run-name`, or a new one). `wrap_grid` wraps the grid the rounds
    use (a benchmark's timer, the simulation's stoppable grid)."""
    check_run(cfg)
    with rundir.claim(cfg, folder) as out_dir:
        log(INFO, "seedlora run %s -> %s", context.run_id, out_dir)
        server = build_server(cfg, context.run_id, out_dir)
        # Simulated nodes are registered by now (the server's model and data took
        # longer); each holds one of that many partitions.
        check_nodes(cfg, len(list(grid.get_node_ids())))
        grid = wrap_grid(grid) if wrap_grid else grid
        run_chain(server, build_runner(cfg, grid, context))
    return server
