"""Ray simulation: the launcher's real `flwr run` path, and the in-process sweep."""

import json
import os
import signal
import subprocess
import sys
import time
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
    # Flower's "changed from 10 to 2" warning and its resize hint are dropped; the size stays.
    assert "changed from 10 to 2" not in result.stdout
    assert "flwr federation simulation-config" not in result.stdout
    assert "Federation `@none/default` (3 simulated SuperNodes)" in result.stdout
    assert ": completed after " in result.stdout.splitlines()[-1]
    pids = [line for line in result.stdout.splitlines() if "SuperLink pid" in line]
    pid = int(pids[0].split("pid ")[1].split()[0])
    assert not Path(f"/proc/{pid}").exists()  # the launcher stopped its SuperLink


@pytest.mark.integration
def test_launcher_fails_clearly_on_a_bad_key(tmp_path):
    cmd = [sys.executable, "-m", "simulation.launch", "--run-config", "rank=0"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2  # refused before anything started (tests/test_launch_checks)
    assert result.stderr.strip().splitlines() == [
        "[launch] error: run-config key 'rank': Input should be greater than 0 (got 0)"
    ]


@pytest.mark.integration
def test_launcher_run_without_an_accepted_update_exits_1_with_the_reason(
    tmp_path, tiny_lm_dir, tiny_text_dir
):
    """Every round times out (round-timeout far shorter than a round): the run fails in
    round 1 instead of "completing", says why in its last line, and leaves no folder."""
    overrides = tiny_overrides(tiny_lm_dir, tiny_text_dir, tmp_path, "empty")
    cmd = [
        sys.executable,
        "-m",
        "simulation.launch",
        "--num-supernodes",
        "2",
        "--run-config",
        overrides + " round-timeout=0.001",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(
        "[launch] run failed: round 1 accepted no client update (2 sent, 2 "
        "without a reply in time (round-timeout 0.001 s))"
    ), last
    assert not (tmp_path / "empty").exists()


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _with_environ(entry: bytes) -> list[int]:
    """Processes whose environment holds `entry` (b"KEY=VALUE"); Linux /proc."""
    found = []
    for pid in _pids():
        try:
            if entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:  # gone, or not ours to read
            continue
    return found


def _holding(folder: Path) -> list[int]:
    """Processes with a file under `folder` open, or it as their working directory."""
    found = []
    for pid in _pids():
        try:
            links = [Path(f"/proc/{pid}/cwd"), *Path(f"/proc/{pid}/fd").iterdir()]
            if any(os.readlink(link).startswith(str(folder)) for link in links):
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.integration
def test_launcher_sigkill_leaves_no_process_and_no_second_writer(
    tmp_path, tiny_lm_dir, tiny_text_dir
):
    """SIGKILL the launcher's process group mid-run (an OOM kill, a closed terminal): the
    SuperLink, the simulation, Ray and its actors all end, and the run folder is free."""
    from contract.config import RunConfig
    from runtime.processes import descendants, wait_gone
    from server import rundir
    from simulation.launch import WATCH_PID
    from tests.processes import wait_for

    overrides = tiny_overrides(tiny_lm_dir, tiny_text_dir, tmp_path, "killed")
    overrides = overrides.replace("num-links=2", "num-links=8") + " export=false"
    cmd = [sys.executable, "-m", "simulation.launch", "--num-supernodes", "2"]
    log = (tmp_path / "launch.log").open("wb")
    launcher = subprocess.Popen(
        [*cmd, "--run-config", overrides],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"  # rewritten every round
    try:
        wait_for(checkpoint.exists, 400, "the first round's checkpoint")
        tree = descendants([launcher.pid])
        names = {
            Path(f"/proc/{pid}/comm").read_text().strip()
            for pid in tree
            if Path(f"/proc/{pid}").exists()
        }
        print(f"{len(tree)} processes below the launcher: {sorted(names)}")
        assert len(tree) >= 4  # SuperLink, SuperExec, flwr-simulation, Ray, ...
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        began = time.monotonic()
        left = wait_gone(tree, 60)
        print(f"all gone after {time.monotonic() - began:.1f}s")
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    home = [
        line for line in (tmp_path / "launch.log").read_text().splitlines() if "FLWR_HOME=" in line
    ]
    assert home and not Path(home[0].split("FLWR_HOME=")[1].rstrip(")")).exists()  # cleaned up
    # Nobody trains on: no process the launcher started is left anywhere (not only in the
    # tree: each inherited its pid in WATCH_PID), and none holds a file of the run open.
    mark = f"{WATCH_PID}={launcher.pid}".encode()
    wait_for(lambda: not _with_environ(mark), 60, "the launcher's processes to end")
    assert not _holding(tmp_path / "killed")
    cfg = RunConfig.from_flower({"output-dir": str(tmp_path), "run-name": "killed", "resume": True})
    with rundir.claim(cfg):  # the lock died with its holder: a resume may take the folder
        pass


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


def test_launcher_relays_the_log_without_flowers_size_warning_and_hint():
    """Flower 1.42 logs these on every simulation, also when --num-supernodes set the size."""
    import io

    from simulation.launch import relay_log

    flower = [
        b"\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
        b"\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed "
        b"from 10 to 2.\n",
        b"\x1b[92mINFO \x1b[0m:      Federation `@none/default` (3 simulated SuperNodes)\n",
        b"\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:\n",
        b"\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default "
        b"<superlink> --num-supernodes <N>\n",
        b"\x1b[92mINFO \x1b[0m:      link 0 round 1\n",
    ]
    out = io.BytesIO()
    relay_log(io.BytesIO(b"".join(flower)), out)
    assert out.getvalue() == flower[0] + flower[2] + flower[5]


def test_failure_reason_is_flowers_first_line_or_says_there_is_none():
    from simulation.launch import failure_reason

    details = "Simulation failed with exception: RuntimeError: round 1 accepted no update\nTrace"
    assert failure_reason(details) == "RuntimeError: round 1 accepted no update"
    for none in ("N/A", "", "Simulation failed with exception: "):  # `flwr ls`: no details
        assert failure_reason(none) == "(Flower gave no reason; see the log above)"


def fake_metrics(ppl: float) -> dict:
    rounds = [{"round": 0, "central": {"ppl": 100.0}}]
    rounds.append({"round": 1, "central": {"ppl": ppl}, "bytes_up": 2e6, "bytes_down": 3e6})
    return {"rounds": rounds}


def test_sweep_keeps_finished_rows_and_prints_a_table(tmp_path, monkeypatch, capsys):
    """A failed run is reported and the others kept: sweep.json holds the finished rows,
    the table their mean and spread over seeds; the exit code says a run failed."""
    from server.outcome import RunFailed
    from simulation import inprocess, sweep

    def simulate(overrides, *args):
        if overrides["strategy"] == "fedadam" and overrides["seed"] == 1:
            raise RunFailed("round 1 accepted no client update (2 sent, 2 rejected)")
        return fake_metrics(60.0 + overrides["seed"] * 2)

    monkeypatch.setattr(inprocess, "simulate", simulate)
    argv = ["--strategies", "fedavg,fedadam", "--seeds", "0,1", "--out", str(tmp_path)]
    assert sweep.main(argv) == 1
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "sweep.json").read_text())
    names = ["fedavg-circulant-s0", "fedavg-circulant-s1", "fedadam-circulant-s0"]
    assert [r["name"] for r in rows] == names
    assert rows[0]["bytes_up"] == 2e6 and "rounds" not in rows[0]
    assert "FAILED fedadam-circulant-s1: RunFailed: round 1 accepted no client update" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("fedavg ", "fedadam "))]
    assert table[0][:4] == ["fedavg", "circulant", "2", "ppl"]
    assert table[0][5:8] == ["61", "+-", "1.4"]  # mean and sample sd of 60 and 62
    assert table[1][2] == "1"
    # Runs never share a folder: a second sweep into the same --out needs --resume.
    (tmp_path / "fedavg-circulant-s0").mkdir()
    assert sweep.main(argv) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.integration  # imports Ray, runs the in-process simulation
def test_simulate_fails_fast_when_ray_cannot_start(tmp_path, monkeypatch):
    import ray

    from simulation.inprocess import SimulationFailed, simulate

    def no_ray(*args, **kwargs):
        raise RuntimeError("node timed out during startup")

    monkeypatch.setattr(ray, "init", no_ray)
    began = time.monotonic()
    with pytest.raises(SimulationFailed, match="Ray could not start: .*node timed out"):
        simulate({"output-dir": str(tmp_path), "run-name": "x"}, num_supernodes=2)
    assert time.monotonic() - began < 30  # no round-timeout waited
    assert not (tmp_path / "x").exists()  # the ServerApp never ran


def test_a_stopped_engine_ends_the_waiting_server(monkeypatch):
    """`StoppableGrid` gives up a round once the simulation engine is gone."""
    import threading

    from simulation.inprocess import SimulationFailed, StoppableGrid

    stop = threading.Event()

    class Silent:  # pushes, and never gets a reply; the engine stops while it waits
        def push_messages(self, messages):
            return ["m1"]

        def pull_messages(self, ids):
            stop.set()
            return []

    grid = StoppableGrid(Silent(), stop)
    began = time.monotonic()
    with pytest.raises(SimulationFailed, match="engine stopped"):
        grid.send_and_receive([], timeout=600)
    assert time.monotonic() - began < 60  # not the round's 600 s timeout
    assert grid.thread is threading.current_thread()
