"""Run the app in this process with `flwr.simulation.run_simulation` (Ray backend).

`flwr run .` is the normal way; this path is for sweeps, tests and benchmarks, which need
many runs with different run-config overrides and want the results back as files.
`ray_address` attaches the run to a running Ray cluster (`ray start --head` on one machine,
`ray start --address` on the others) instead of starting a private local Ray.

A run fails fast (`SimulationFailed`, one line) instead of waiting out round-timeouts:
Ray is started here first, so a Ray that cannot start ("node timed out during startup"
on a loaded machine) fails before the ServerApp runs; and when Flower's simulation engine
stops during the run, the ServerApp's grid (`StoppableGrid`) ends the ServerApp thread,
which `run_simulation` would otherwise leave waiting for replies that never come.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.compose import build_client_app
from server.app import build_server_app
from simulation.grid_wrapper import GridWrapper
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


# Flower's defaults for ray.init in a simulation (flwr.supercore.constant).
RAY_DEFAULTS = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
STOP_JOIN_S = 60.0  # how long to wait for a stopped ServerApp thread to end


class SimulationFailed(RuntimeError):
    """The simulation could not run (Ray did not start, the engine stopped); one line."""


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__


def start_ray(backend: Mapping[str, Any]) -> None:
    """`ray.init` as Flower's RayBackend would call it (which then finds Ray running), so
    that a Ray that cannot start fails here, before the ServerApp runs."""
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            **{**RAY_DEFAULTS, **dict(backend.get("init_args", {}))},
        )
    except Exception as err:  # noqa: BLE001 - Ray raises many kinds; all mean the same here
        ray.shutdown()
        raise SimulationFailed(f"Ray could not start: {_first_line(err)}") from err


class StoppableGrid(GridWrapper):
    """The ServerApp's grid, whose pushes and pulls (so every exchange) give up once
    `stop` is set (the simulation engine is gone); it remembers the thread that uses it."""

    def __init__(self, inner: Grid, stop: threading.Event):
        super().__init__(inner)
        self.stop = stop
        self.thread: threading.Thread | None = None

    def _seen(self) -> None:
        self.thread = threading.current_thread()
        if self.stop.is_set():
            raise SimulationFailed("the simulation engine stopped")

    def get_node_ids(self) -> Iterable[int]:
        self._seen()
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._seen()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._seen()
        return self.inner.pull_messages(message_ids)


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
    wrapped ones, or have the server's grid wrapped (testing.probe). A run that fails
    raises: `SimulationFailed` (Ray, the engine), `server.outcome.RunFailed` (no update
    accepted), `RunConfigError` (a bad value)."""
    from flwr.simulation import run_simulation

    if not overrides.get("run-name"):
        raise ValueError("run-name: set it so the run's outputs can be found")
    backend = backend_config(num_cpus, num_gpus, ray_address, init_args)
    stop, grids = threading.Event(), []

    def stoppable(grid: Grid) -> Grid:
        grids.append(StoppableGrid(wrap_grid(grid) if wrap_grid else grid, stop))
        return grids[-1]

    start_ray(backend)
    try:
        run_simulation(
            server_app=server_app or build_server_app(overrides, wrap_grid=stoppable),
            client_app=client_app or build_client_app(overrides),
            num_supernodes=num_supernodes,
            backend_config=backend,
        )
    except Exception as err:
        stop.set()  # end a ServerApp thread left waiting on a dead engine
        for grid in grids:
            if grid.thread is not None and grid.thread is not threading.current_thread():
                grid.thread.join(STOP_JOIN_S)
        if type(err) is RuntimeError:  # Flower's "An error was encountered": say which
            cause: BaseException = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise SimulationFailed(f"the simulation stopped: {_first_line(cause)}") from err
        raise
    finally:
        import ray

        if ray.is_initialized():  # Flower shuts it down unless it failed before its engine ran
            ray.shutdown()
    out = Path(overrides.get("output-dir", "outputs")) / str(overrides["run-name"])
    metrics = out / "metrics.json"
    if not metrics.exists():
        raise SimulationFailed(f"the run wrote no {metrics}; see the log above")
    return json.loads(metrics.read_text())
