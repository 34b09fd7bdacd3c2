"""A real deployment on 127.0.0.1: one `flower-superlink`, two `flower-supernode`
processes with their own node config, a run submitted with `flwr run`. Every process
started here is stopped by pid at the end, also on failure."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seedlora import relative_error
from seedlora.serialize import state_from_bytes
from server import checkpoint
from simulation.launch import (
    OFFLINE_ENV,
    flwr_json,
    free_port,
    run_status,
    stop_process_tree,
    wait_until_ready,
    write_flower_config,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start(cmd: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
    with log.open("wb") as handle:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def deployment(tmp_path):
    """(env, processes) of a SuperLink and two SuperNodes; all stopped afterwards."""
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "SEEDLORA_CACHE": str(tmp_path / "cache"),
    }
    port = free_port()
    write_flower_config(tmp_path / "flwr-home", port)
    procs = []
    try:
        link = start(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            env,
            tmp_path / "superlink.log",
            tmp_path,
        )
        procs.append(link)
        wait_until_ready(link, port, tmp_path / "superlink.log")
        for i in range(2):
            procs.append(
                start(
                    [
                        str(BIN / "flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f"partition-id={i} num-partitions=2",
                    ],
                    env,
                    tmp_path / f"supernode-{i}.log",
                    tmp_path,
                )
            )
        yield env, procs
    finally:
        for proc in reversed(procs):
            stop_process_tree(proc)
        assert all(p.poll() is not None for p in procs)


def test_two_supernodes_run_and_average_exactly(deployment, tmp_path, tiny_lm_dir, tiny_text_dir):
    env, procs = deployment
    out = tmp_path / "outputs"
    overrides = (
        f"model-name='{tiny_lm_dir}' dataset='{tiny_text_dir}' partitioner='iid' "
        f"output-dir='{out}' run-name='dep' num-links=1 "
        "rounds-per-link=2 local-steps=2 seq-len=32 max-train-blocks=16 max-eval-blocks=8 "
        "rank=4 alpha=8.0 save-client-updates=true fraction-evaluate=1.0 export=false "
        "a-kind='gaussian'"
    )
    flwr = str(BIN / "flwr")
    run_id = str(
        flwr_json(
            [flwr, "run", str(REPO), "launch", "--format", "json", "--run-config", overrides], env
        )["run-id"]
    )
    deadline = time.monotonic() + 420
    status = ""
    while time.monotonic() < deadline:
        status, details = run_status(flwr, run_id, env)
        if status.startswith("finished"):
            break
        assert all(p.poll() is None for p in procs), "a Flower process died"
        time.sleep(2)
    logs = "\n".join((tmp_path / f).read_text()[-3000:] for f in ("superlink.log",))
    assert status == "finished:completed", f"{status}: {logs}"

    run_dir = out / "dep"
    import json

    doc = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert all(r["accepted"] == 2 for r in doc["rounds"][1:])
    assert doc["rounds"][2]["client_eval"]  # both nodes evaluated their own held-out files

    tensors, meta = state_from_bytes(
        (run_dir / "client-updates" / "round-0002.safetensors").read_bytes()
    )
    weights = {int(k): v for k, v in meta["weights"].items()}
    assert sorted(weights) == [0, 1]  # each node trained its own partition
    link = checkpoint.load(run_dir).links[0]
    total = sum(weights.values())
    errors = []
    for spec in link.specs:
        mean_b = sum(
            w / total * tensors[f"{i}/{spec.layer}.lora_B"].double() for i, w in weights.items()
        )
        a = spec.dense().double()
        scale = link.alpha / spec.rank
        errors.append(
            relative_error(scale * link.factors[spec.layer].double() @ a, scale * mean_b @ a)
        )
    print(f"deployment: max relative error of the merged update {max(errors):.2e}")
    assert max(errors) <= 1e-6
    assert any(torch.count_nonzero(f) for f in link.factors.values())
