"""A run config checked against its model, data and federation before anything runs.

`RunConfig.from_flower` checks each value; these checks look at what the values point
to, cheaply (tasks/preflight.py: file headers and JSON, no weights): the model folder,
the adapter's target layers, the data columns, and the number of clients the split can
serve. The launcher calls them before it starts a process, the ServerApp before round 1.
Every failure is a `RunConfigError` whose one-line message names the key (or flag) to fix.
"""

from __future__ import annotations

from tasks import preflight

from .config import RunConfig, RunConfigError


def check_run(cfg: RunConfig) -> None:
    """The model folder, its target layers and the data columns."""
    targets = None if cfg.adapter.method == "full" else cfg.adapter.targets
    try:
        preflight.check_task(cfg.task_config(), targets)
    except (ValueError, OSError) as err:
        raise RunConfigError(str(err)) from None


def check_nodes(cfg: RunConfig, count: int, what: str = "nodes") -> None:
    """`count` clients (each holding one partition) against the split's natural ids;
    `what` names where the count comes from (`--num-supernodes`, `nodes`)."""
    if count < 1:  # no node known yet (a deployment before its SuperNodes connect)
        return
    try:
        preflight.check_partitions(cfg.task_config(count), count, what)
    except (ValueError, OSError) as err:
        raise RunConfigError(str(err)) from None
