"""Run the app in this process with `flwr.simulation.run_simulation` (Ray backend).

`flwr run .` is the normal way; this path is for sweeps, tests and benchmarks, which need
many runs with different run-config overrides and want the results back as files.
`ray_address` attaches the run to a running Ray cluster (`ray start --head` on one machine,
`ray start --address` on the others) instead of starting a private local Ray.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import build_client_app
from server.app import build_server_app
from simulation.launch import gpu_share_problem


def backend_config(
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ray_address: str | None = None,
    init_args: Mapping[str, Any] | None = None,
) -> dict:
    """Ray resources per virtual client (k clients share a GPU at num_gpus = 1/k) and the
    arguments of Flower's `ray.init`: `address` ("auto", "host:port") joins a running cluster,
    which then owns the resources (`init_args` such as num_cpus must not be given with it)."""
    if num_cpus <= 0:
        raise ValueError(f"num-cpus: must be > 0, got {num_cpus}")
    gpu_problem = gpu_share_problem(num_gpus)
    if gpu_problem:
        raise ValueError(gpu_problem)
    config: dict[str, Any] = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    init = dict(init_args or {})
    if ray_address:
        if init.keys() & {"num_cpus", "num_gpus", "resources"}:
            raise ValueError("ray-address: an existing cluster owns its resources; drop init_args")
        init["address"] = ray_address
    if init:
        config["init_args"] = init
    return config


def simulate(
    overrides: Mapping[str, Any],
    num_supernodes: int = 8,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    *,
    ray_address: str | None = None,
    init_args: Mapping[str, Any] | None = None,
    server_app: ServerApp | None = None,
    client_app: ClientApp | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> dict:
    """Run one configuration; returns its metrics.json (needs `output-dir` and `run-name`).

    The apps default to this project's, built with `overrides`; a benchmark may pass
    wrapped ones, or have the server's grid wrapped (simulation.probe)."""
    from flwr.simulation import run_simulation

    if not overrides.get("run-name"):
        raise ValueError("run-name: set it so the run's outputs can be found")
    run_simulation(
        server_app=server_app or build_server_app(overrides, wrap_grid=wrap_grid),
        client_app=client_app or build_client_app(overrides),
        num_supernodes=num_supernodes,
        backend_config=backend_config(num_cpus, num_gpus, ray_address, init_args),
    )
    out = Path(overrides.get("output-dir", "outputs")) / str(overrides["run-name"])
    metrics = out / "metrics.json"
    if not metrics.exists():
        raise RuntimeError(f"the run wrote no {metrics}; see the log above")
    return json.loads(metrics.read_text())
