"""The SuperLink a plain `flwr` command starts and leaves running is found and stopped."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.processes import alive, descendants
from simulation.launch import free_port
from simulation.local_superlink import managed_pids

REPO = Path(__file__).resolve().parents[1]


def module(action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "simulation.local_superlink", action]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_no_managed_superlink_in_an_empty_home(tmp_path):
    assert managed_pids(tmp_path) == []


@pytest.mark.integration
def test_stop_ends_the_superlink_that_flwr_started(tmp_path):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),  # fresh: flwr writes the `local` connection
        # Flower's managed SuperLink on ports of its own (39091/39093 may be in use).
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    # Any command on the `local` connection starts it, detached, as `flwr run .` does.
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    pids = managed_pids(tmp_path / "flwr-home")
    try:
        assert "Starting local SuperLink" in listed.stdout + listed.stderr
        assert len(pids) == 1 and alive(pids[0])
        below = [p for p in descendants(pids) if alive(p)]  # its SuperExec
        assert below
        status = module("status", env)
        assert f"pid {pids[0]} and" in status.stdout
        stopped = module("stop", env)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped the managed local SuperLink" in stopped.stdout
        assert not any(alive(p) for p in pids + below)
        assert managed_pids(tmp_path / "flwr-home") == []
        assert "no managed local SuperLink" in module("status", env).stdout
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, 9)
