"""bench.federation: the deployment's log reader and goals, the GPU runs' arithmetic, and
(integration) every subcommand's tiny mode end to end on the CPU.

Why: the deployment and GPU benchmarks say whether separate machines and shared GPUs run at
the simulation's speed; a parser or a goal that silently misreads would hide a regression,
and the GPU runs happen on machines this repository's CI never sees."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench import federation as fed

pytestmark = pytest.mark.bench


def test_worker_lines_are_read_with_their_counters(tmp_path):
    line = {"served": 3, "type": "train", "partition": 1, "seconds": 0.5, "builds": 1}
    line["tokenized"] = {"train": 2}
    (tmp_path / "worker-1.log").write_text(
        "2026-12-06 05:00:00,123 worker ready on /x (pid 7, protocol 1)\n"
        f"2026-12-06 05:00:01,456 worker message {json.dumps(line)}\n"
    )
    restarted = f"2026-12-06 05:00:00,001 worker message {json.dumps({**line, 'partition': 0})}\n"
    (tmp_path / "worker-0.1765000000000.log").write_text(restarted)
    (tmp_path / "worker-0.log").write_text(restarted.replace("05:00:00", "05:00:02"))
    workers = fed.worker_stats(tmp_path)
    assert sorted(workers) == ["worker-0", "worker-1"]  # one entry per worker, not per log
    assert [r["log"] for r in workers["worker-0"]] == ["worker-0.1765000000000.log", "worker-0.log"]
    (row,) = workers["worker-1"]
    assert row["builds"] == 1 and row["tokenized"] == {"train": 2}


def _run(walls: list[float], builds: int = 2) -> dict:
    rounds = [
        {"round": i + 1, "round_in_link": i % 3 + 1, "wall_time": w} for i, w in enumerate(walls)
    ]
    line = {"at": 0.0, "partition": 0, "seconds": 0.1, "builds": builds}
    return {
        "rounds": rounds,
        "workers": {"owner-0": [line | {"tokenized": {"train": 1, "eval": 1}}]},
    }


def test_goals_use_steady_rounds_and_the_flower_floor():
    row = {
        "simulated": fed.summary(_run([30.0, 2.0, 2.0, 30.0, 2.0, 2.0])),
        "floor": fed.summary(_run([9.0, 5.0, 5.0, 9.0, 5.0, 5.0])),
        "deployed_host": fed.summary(_run([40.0, 8.0, 8.0, 40.0, 8.0, 8.2])),
        "deployed_node": fed.summary(_run([40.0, 9.0, 9.0, 40.0, 9.0, 9.0], builds=3)),
    }
    goals = fed.goals(row, {"num-links": 2})
    assert goals["simulated_s"] == 2.0 and goals["floor_s"] == 5.0  # first rounds left out
    host, node = goals["deployed_host"], goals["deployed_node"]
    assert host["bound_s"] == pytest.approx(5.0 + 1.1 * 2.0 + 1.0)
    assert host["round_met"] and host["builds_met"] and host["tokenized_met"]
    assert host["over_simulated"] == pytest.approx(4.0)
    assert not node["round_met"] and not node["builds_met"]  # 9 s > 8.2 s; 3 builds > 2 links


def test_deploy_resume_runs_only_the_parts_the_file_lacks(tmp_path, monkeypatch):
    """A first call measures the simulation and the deployment; `--resume` adds the floor
    without running either again, and refuses a file of another run config."""
    calls: list[str] = []
    walls = {"sim": 2.0, "partition": 8.0, "floor": 5.0}

    def fake(name: str) -> dict:
        calls.append(name)
        return _run([30.0, walls[name], walls[name], 30.0, walls[name], walls[name]])

    monkeypatch.setattr(fed, "launch", lambda overrides, *a: fake("sim"))
    monkeypatch.setattr(
        fed, "deployed", lambda root, ov, n, layout, *a: fake(ov["run-name"].split("-")[-1])
    )
    argv = ["deploy", "--tiny", "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    fed.main([*argv, "--floors", ""])
    assert calls == ["sim", "partition"]
    (row,) = json.loads((tmp_path / "deploy-tiny.json").read_text())["rows"]
    assert "floor" not in row and row["goals"]["deployed_partition"]["bound_s"] is None
    fed.main([*argv, "--floors", "floor", "--resume"])
    assert calls == ["sim", "partition", "floor"]
    assert len(list((tmp_path / "work").glob("tiny-assets-*"))) == 1  # one model for both calls
    (row,) = json.loads((tmp_path / "deploy-tiny.json").read_text())["rows"]
    goal = row["goals"]["deployed_partition"]
    assert goal["bound_s"] == pytest.approx(5.0 + 1.1 * 2.0 + 1.0) and goal["round_met"]
    with pytest.raises(SystemExit, match="another run.*local-steps"):
        fed.main([*argv, "--resume", "--set", "local-steps=7"])
    path = tmp_path / "deploy-tiny.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(doc | {"environment": doc["environment"] | {"cpu_count": 999}}))
    with pytest.raises(SystemExit, match="cpu_count 999 there"):  # another machine's timings
        fed.main([*argv, "--resume"])
    assert len(calls) == 3


def test_trained_tokens_and_union():
    assert fed.trained_tokens(40, 4, 10, 512) == 40 * 512
    assert fed.trained_tokens(5, 2, 4, 10) == (2 + 2 + 1 + 2) * 10  # short last batch
    assert fed.trained_tokens(0, 2, 4, 10) == 0
    assert fed.union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert fed.union_length([(0, 10), (2, 3)]) == 10


@pytest.mark.integration  # a child process per run
def test_sim_tiny_times_the_plain_run(tmp_path):
    fed.main(["sim", "--tiny", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "sim_overhead.json").read_text())
    run = doc["overhead"]["runs"]["plain-1-thread"]
    assert run["completed"] and run["all_accepted"], run.get("log_tail")
    assert [r["clients"] for r in run["rounds"]] == [2, 2] and run["steady_rounds"] == [2]
    assert run["round_s"] > 0 and run["tokens_per_s"] > 0 and run["peak_rss_mb"] > 50
    assert doc["overhead"]["best_plain_steady_round_s"] == run["round_s"]


@pytest.mark.integration  # real flower-superlink and node commands
def test_deploy_tiny_end_to_end(tmp_path):
    work = tempfile.mkdtemp(prefix="bd-", dir="/tmp")  # Unix socket paths must stay short
    try:
        args = ["--nodes", "2", "--floors", "floor", "--set", "rounds-per-link=2"]
        fed.main(["deploy", "--tiny", *args, "--out", str(tmp_path), "--work", work])
        assert not list(Path(work).rglob("masters"))  # each part's master files removed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (row,) = json.loads((tmp_path / "deploy-tiny.json").read_text())["rows"]
    assert {"simulated", "deployed_partition", "floor", "goals"} <= row.keys()
    assert [r["round_in_link"] for r in row["floor"]["rounds"]] == [1, 2, 1, 2]
    workers = row["deployed_partition"]["workers"]
    assert sorted(workers) == ["owner-0/worker-0", "owner-0/worker-1"]  # a worker per node
    for worker in workers.values():  # one build a link, its own partition tokenized once
        assert worker["builds"] == 2 and worker["tokenized"] == {"train": 1, "eval": 1}
    goals = row["goals"]["deployed_partition"]
    assert goals["builds_met"] and goals["tokenized_met"] and goals["over_simulated"] > 0
    assert all(s > 0 for s in row["deployed_partition"]["steady_s"])


@pytest.mark.integration  # Ray and a child process per run
def test_gpu_clients_tiny_writes_every_figure(tmp_path):
    fed.main(["gpu-clients", "--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_clients.json").read_text())
    assert {"options", "model", "floor", "ray", "a_digests", "comparison"} <= set(data)
    ov = data["run_config"]
    per_client = ov["local-steps"] * ov["batch-size"] * ov["seq-len"]
    for mode, runs in (("floor", data["floor"]), ("ray", data["ray"]["1"])):
        assert set(runs) == {"1", "2"}
        for n, run in runs.items():
            assert run["completed"] and run["all_accepted"], (mode, n, run.get("why"))
            for r in run["rounds"]:
                assert r["clients"] == int(n) and r["tokens"] == int(n) * per_client
                assert math.isclose(sum(r["split_s"].values()), r["round_s"], rel_tol=1e-9)
                assert r["split_s"]["client_compute"] > 0
            assert run["tokens_per_s"] > 0 and run["gpu_memory_grows"] is False
    for n, run in data["ray"]["1"].items():  # 1/N of Ray's logical GPU each, all at once
        assert run["client_resources"]["num_gpus"] == 1 / int(n) and run["logical_gpus"]
        assert len(run["rounds"][-1]["pids"]) == int(n)  # one actor per client
    assert len(data["floor"]["2"]["rounds"][-1]["pids"]) == 1  # the floor: one process
    assert data["a_digests"]["moved_equal"] and data["a_digests"]["equal_to_reference"]
    (row,) = [r for r in data["comparison"] if r["clients"] == 2]
    ray, floor = data["ray"]["1"]["2"]["tokens_per_s"], data["floor"]["2"]["tokens_per_s"]
    assert math.isclose(row["ray_1gpu_per_gpu_over_floor"], ray / floor)


@pytest.mark.integration  # the launcher (Ray) in a child process
@pytest.mark.skipif(not os.environ.get("SEEDLORA_BENCH_RAY"), reason="set SEEDLORA_BENCH_RAY=1")
def test_gpu_sim_tiny_reports_host_memory_by_role(tmp_path):
    fed.main(["gpu-sim", "--tiny", "--configs", "2x2", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "gpu_sim-after-tiny.json").read_text())["rows"]
    assert row["rc"] == 0 and row["round_time_mean"] > 0 and row["tokens_per_s_over_floor"] > 0
    assert row["host_pss"]["clients"]["processes"] == 2 and row["host_pss"]["server"]["peak_gb"] > 0
