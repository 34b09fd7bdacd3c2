"""A run config checked against its model, data and federation before anything runs.

`RunConfig.from_flower` checks each value; these checks look at what the values point
to, cheaply (tasks/preflight.py: file headers and JSON, no weights): the model folder,
the adapter's target layers and the rank they allow, the data columns, and the number of
clients the split can serve. The launcher calls them before it starts a process, the
ServerApp before round 1.
Every failure is a `RunConfigError` whose one-line message names the key (or flag) to fix.
"""

from __future__ import annotations

from collections.abc import Mapping

from seedlora.names import rank_limit
from tasks import preflight

from .config import AdapterConfig, RunConfig, RunConfigError


def check_run(cfg: RunConfig) -> None:
    """The model folder, its target layers, the rank they allow and the data columns."""
    targets = None if cfg.adapter.method == "full" else cfg.adapter.targets
    try:
        layers = preflight.check_task(cfg.task_config(), targets)
    except (ValueError, OSError) as err:
        raise RunConfigError(str(err)) from None
    if layers:
        check_rank(cfg.adapter, layers)


def check_rank(adapter: AdapterConfig, layers: Mapping[str, tuple[int, int]]) -> None:
    """`rank` against each adapted layer `name -> (n_in, n_out)`: at most the side of the
    seeded factor (`seedlora.names.rank_limit`); the error names the tightest layer."""
    a = adapter
    limits = {
        name: limit
        for name, (n_in, n_out) in layers.items()
        if (limit := rank_limit(a.method, a.frozen_factor, n_in, n_out)) is not None
    }
    if not limits:
        return
    name = min(limits, key=limits.__getitem__)
    if a.rank > limits[name]:
        n_in, n_out = layers[name]
        seeded = "A0 and B0" if a.method == "seedcore" else f"{a.frozen_factor} factor"
        raise RunConfigError(
            f"rank: {a.rank} exceeds what layer {name!r} ({n_in} -> {n_out}) allows with "
            f"method {a.method!r} (its seeded {seeded}: r <= the side it spans); "
            f"set rank <= {limits[name]}"
        )


def check_nodes(cfg: RunConfig, count: int, what: str = "nodes") -> None:
    """`count` clients (each holding one partition) against the split's natural ids;
    `what` names where the count comes from (`--num-supernodes`, `nodes`)."""
    if count < 1:  # no node known yet (a deployment before its SuperNodes connect)
        return
    try:
        preflight.check_partitions(cfg.task_config(count), count, what)
    except (ValueError, OSError) as err:
        raise RunConfigError(str(err)) from None
