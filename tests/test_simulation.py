"""Ray simulation: the launcher's real `flwr run` path, and the in-process sweep."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(model: str, data: str, out: Path, name: str) -> str:
    return (
        f"model-name='{model}' dataset='{data}' partitioner='iid' output-dir='{out}' "
        f"run-name='{name}' num-links=2 rounds-per-link=1 local-steps=2 seq-len=32 "
        "max-train-blocks=16 max-eval-blocks=8 rank=4 alpha=8.0"
    )


@pytest.mark.integration
def test_launcher_runs_flwr_run_and_stops_everything(tmp_path, tiny_lm_dir, tiny_text_dir):
    cmd = [
        sys.executable,
        "-m",
        "simulation.launch",
        "--num-supernodes",
        "3",
        "--run-config",
        tiny_overrides(tiny_lm_dir, tiny_text_dir, tmp_path, "sim"),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert doc["links_merged"] == 2
    assert [r["accepted"] for r in doc["rounds"][1:]] == [3, 3]
    assert (tmp_path / "sim" / "peft-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "sim" / "merged-model" / "config.json").exists()
    pids = [line for line in result.stdout.splitlines() if "SuperLink pid" in line]
    pid = int(pids[0].split("pid ")[1].split()[0])
    assert not Path(f"/proc/{pid}").exists()  # the launcher stopped its SuperLink


@pytest.mark.integration
def test_launcher_fails_clearly_on_a_bad_key(tmp_path):
    cmd = [sys.executable, "-m", "simulation.launch", "--run-config", "rank=0"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "rank" in result.stdout + result.stderr


@pytest.mark.integration
def test_sweep_runs_configurations_through_ray(tmp_path, tiny_lm_dir, tiny_text_dir):
    from simulation.sweep import main

    out = tmp_path / "sweep"
    sets = ["--set", f"model-name={tiny_lm_dir}", "--set", f"dataset={tiny_text_dir}"]
    for kv in (
        "partitioner=iid",
        "num-links=1",
        "rounds-per-link=1",
        "local-steps=2",
        "seq-len=32",
        "max-train-blocks=16",
        "max-eval-blocks=8",
        "rank=4",
    ):
        sets += ["--set", kv]
    code = main(
        [
            "--strategies",
            "fedavg,fedmedian",
            "--kinds",
            "gaussian",
            "--num-supernodes",
            "2",
            "--out",
            str(out),
            *sets,
        ]
    )
    assert code == 0
    table = json.loads((out / "sweep.json").read_text())
    assert [row["name"] for row in table] == ["fedavg-gaussian-s0", "fedmedian-gaussian-s0"]
    assert all(row["final"]["ppl"] > 0 for row in table)
    assert (out / "sweep.png").stat().st_size > 0


def test_launcher_env_runs_ray_workers_at_normal_priority_unless_told(tmp_path, monkeypatch):
    from simulation.launch import launch_env

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = launch_env(tmp_path, None)
    assert env["RAY_worker_niceness"] == "0" and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert "RAY_ADDRESS" not in env and env["FLWR_HOME"] == str(tmp_path)
    monkeypatch.setenv("RAY_worker_niceness", "10")
    env = launch_env(tmp_path, "127.0.0.1:6379")
    assert env["RAY_worker_niceness"] == "10" and env["RAY_ADDRESS"] == "127.0.0.1:6379"
