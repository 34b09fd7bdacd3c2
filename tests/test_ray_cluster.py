"""A simulation joins a running Ray cluster (Ray's `address`) instead of starting its own.

The test starts `ray start --head --block` on 127.0.0.1 with its own ports and temp dir,
declaring 2 CPUs and one *logical* GPU (this machine has none), and runs a 2-client,
1-round simulation against it with `num_gpus = 0.5`: through `simulation.inprocess`
(`ray_address`) and through the launcher (`--ray-address`). Why this proves the cluster
was used: a private local Ray would see no GPU and could place no client at all
("ActorPool is empty"); and the clients' probe records the cluster's GCS address and the
GPU Ray gave them. Everything the test started is stopped by pid, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from runtime.processes import stop_process_tree, wait_gone
from simulation.launch import OFFLINE_ENV, free_port
from testing.probe import CLIENT, GRID, read

REPO = Path(__file__).resolve().parents[1]
# Ray replaces 127.0.0.1 by the machine's address unless told this is a one-machine
# "cluster"; with it, every process of the test cluster (and its clients) stays on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}
PORT_FLAGS = (
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
)


def _cluster_ports(worker_span: int = 200) -> tuple[int, int, list[int]]:
    """(GCS port, lowest worker port, one port per PORT_FLAGS): all distinct.

    Ray refuses to start when a component port falls inside the worker range, and free
    ports from the OS can land anywhere, so draw until none of them does.
    """
    while True:
        singles = [free_port() for _ in range(len(PORT_FLAGS) + 1)]
        low = free_port()
        clash = any(low <= p <= low + worker_span for p in singles)
        if len(set(singles)) == len(singles) and not clash:
            return singles[0], low, singles[1:]


def _cluster_pids(temp_dir: str) -> list[int]:
    """Processes whose command line names this cluster's temp dir (its daemons)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, env) of a private one-node Ray cluster: 2 CPUs, 1 logical GPU."""
    # Unix socket paths must stay under ~107 bytes, so the temp dir is short, not tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    port, low, flag_ports = _cluster_ports()
    env = {**os.environ, **OFFLINE_ENV, **LOOPBACK_ENV}
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--num-cpus=2",
        "--num-gpus=1",
        "--disable-usage-stats",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 200}",
        *(f"{flag}={p}" for flag, p in zip(PORT_FLAGS, flag_ports, strict=True)),
    ]
    log = Path(temp_dir) / "ray-start.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "ray start --head: not up after 90 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env, temp_dir
    finally:
        stop_process_tree(proc)
        leftovers = [p for p in _cluster_pids(temp_dir) if p != os.getpid()]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not wait_gone(leftovers, 10.0), "cluster processes survived SIGKILL"
        shutil.rmtree(temp_dir, ignore_errors=True)


def _overrides(tiny_lm_dir: str, tiny_text_dir: str, out: Path, name: str) -> dict:
    return {
        "model-name": tiny_lm_dir,
        "dataset": tiny_text_dir,
        "partitioner": "iid",
        "num-links": 1,
        "rounds-per-link": 1,
        "local-steps": 1,
        "seq-len": 32,
        "max-train-blocks": 4,
        "rank": 4,
        "fraction-evaluate": 0.0,
        "central-eval": False,
        "export": False,
        "device": "auto",
        "output-dir": str(out),
        "run-name": name,
    }


DRIVER = """
import json, sys
from pathlib import Path
from client.compose import build_client_app
from server.app import build_server_app
from simulation.inprocess import simulate
from testing.probe import TimedGrid, probed_client_app

spec = json.loads(Path(sys.argv[1]).read_text())
ov, log = spec["overrides"], spec["log"]
simulate(
    ov,
    num_supernodes=2,
    num_cpus=1,
    num_gpus=0.5,
    ray_address=spec["address"],
    server_app=build_server_app(ov, wrap_grid=lambda grid: TimedGrid(grid, log)),
    client_app=probed_client_app(build_client_app(ov), log),
)
"""


@pytest.mark.integration
def test_simulate_runs_on_the_cluster(ray_cluster, tiny_lm_dir, tiny_text_dir, tmp_path):
    address, env, temp_dir = ray_cluster
    log = tmp_path / "probe.jsonl"
    spec = {
        "overrides": _overrides(tiny_lm_dir, tiny_text_dir, tmp_path / "out", "inproc"),
        "log": str(log),
        "address": address,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "spec.json")],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read(log)
    clients = [r for r in records if r["kind"] == CLIENT]
    assert sorted(r["partition"] for r in clients) == [0, 1]
    for r in clients:
        assert r["error"] is None
        assert r["ray"]["gcs_address"] == address  # the clients ran in that cluster
        assert r["ray"]["gpu_ids"] == ["0"]  # half of its one (logical) GPU each
        assert r["cuda_visible_devices"] == "0"
        assert r["train_time"] > 0
    assert any(r["kind"] == GRID and r["replies"] == 2 for r in records)
    doc = json.loads((tmp_path / "out" / "inproc" / "metrics.json").read_text())
    assert [r["accepted"] for r in doc["rounds"] if r["round"] == 1] == [2]
    assert _cluster_pids(temp_dir), "the cluster should still be up: the run only joined it"


@pytest.mark.integration
def test_launcher_runs_on_the_cluster(ray_cluster, tiny_lm_dir, tiny_text_dir, tmp_path):
    address, env, _ = ray_cluster
    ov = _overrides(tiny_lm_dir, tiny_text_dir, tmp_path / "out", "launch")
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in ov.items())
    cmd = [sys.executable, "-m", "simulation.launch", "--ray-address", address]
    cmd += ["--num-supernodes", "2", "--num-cpus", "1", "--num-gpus", "0.5"]
    cmd += ["--run-config", run_config]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    doc = json.loads((tmp_path / "out" / "launch" / "metrics.json").read_text())
    assert [r["accepted"] for r in doc["rounds"] if r["round"] == 1] == [2]


def test_client_resources_and_address_reach_flower():
    from simulation.inprocess import backend_config
    from simulation.launch import parse_args

    assert backend_config(2, 0.25) == {"client_resources": {"num_cpus": 2, "num_gpus": 0.25}}
    joined = backend_config(1, 0.5, ray_address="auto", init_args={"log_to_driver": False})
    assert joined["init_args"] == {"address": "auto", "log_to_driver": False}
    with pytest.raises(ValueError, match="ray-address"):
        backend_config(1, 0.5, ray_address="auto", init_args={"num_gpus": 1})
    with pytest.raises(ValueError, match="num-gpus"):
        backend_config(1, 1.5)
    assert parse_args(["--num-gpus", "0.25", "--ray-address", "h:6379"]).ray_address == "h:6379"
    with pytest.raises(SystemExit):
        parse_args(["--num-gpus", "1.5"])
