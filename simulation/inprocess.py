"""Run the app in this process with `flwr.simulation.run_simulation` (Ray backend).

`flwr run .` is the normal way; this path is for sweeps and tests, which need many
runs with different run-config overrides and want the results back as files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.app import build_client_app
from server.app import build_server_app


def backend_config(num_cpus: float = 1.0, num_gpus: float = 0.0) -> dict:
    """Ray resources per virtual client: k clients share a GPU at num_gpus = 1/k."""
    return {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}


def simulate(
    overrides: Mapping[str, Any],
    num_supernodes: int = 8,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> dict:
    """Run one configuration; returns its metrics.json (needs `output-dir` and `run-name`)."""
    from flwr.simulation import run_simulation

    if not overrides.get("run-name"):
        raise ValueError("run-name: set it so the run's outputs can be found")
    run_simulation(
        server_app=build_server_app(overrides),
        client_app=build_client_app(overrides),
        num_supernodes=num_supernodes,
        backend_config=backend_config(num_cpus, num_gpus),
    )
    out = Path(overrides.get("output-dir", "outputs")) / str(overrides["run-name"])
    metrics = out / "metrics.json"
    if not metrics.exists():
        raise RuntimeError(f"the run wrote no {metrics}; see the log above")
    return json.loads(metrics.read_text())
