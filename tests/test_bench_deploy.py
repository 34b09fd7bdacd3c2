"""bench/deploy.py reads the workers' logs and judges its goals right, and (integration)
runs end to end on the tiny preset: simulated, deployed and both floors, with the builds
and tokenized datasets it reports.

Why: the deployment benchmark is the one that says whether separate machines run at the
simulation's speed; a parser or a goal that silently misreads would hide a regression.
"""

import json
import shutil
import tempfile

import pytest

from bench import deploy

pytestmark = pytest.mark.bench


def test_worker_lines_are_read_with_their_counters(tmp_path):
    line = {"served": 3, "type": "train", "partition": 1, "seconds": 0.5, "builds": 1}
    line["tokenized"] = {"train": 2}
    (tmp_path / "worker-1.log").write_text(
        "2026-12-06 05:00:00,123 worker ready on /x (pid 7, protocol 1)\n"
        f"2026-12-06 05:00:01,456 worker message {json.dumps(line)}\n"
    )
    (tmp_path / "worker-0.1765000000000.log").write_text(  # a restarted worker's first log
        f"2026-12-06 05:00:00,001 worker message {json.dumps({**line, 'partition': 0})}\n"
    )
    (tmp_path / "worker-0.log").write_text(
        f"2026-12-06 05:00:02,001 worker message {json.dumps({**line, 'partition': 0})}\n"
    )
    workers = deploy.worker_stats(tmp_path)
    assert sorted(workers) == ["worker-0", "worker-1"]  # one entry per worker, not per log
    assert [r["log"] for r in workers["worker-0"]] == ["worker-0.1765000000000.log", "worker-0.log"]
    (row,) = workers["worker-1"]
    assert row["builds"] == 1 and row["tokenized"] == {"train": 2}


def _run(walls: list[float], builds: int = 2, tokenized: int = 1) -> dict:
    rounds = [
        {"round": i + 1, "round_in_link": i % 3 + 1, "wall_time": w} for i, w in enumerate(walls)
    ]
    worker = {"builds": builds, "tokenized": {"train": tokenized, "eval": tokenized}}
    line = {"at": 0.0, "partition": 0, "seconds": 0.1, **worker}
    return {"rounds": rounds, "workers": {"owner-0": [line]}}


def test_goals_use_steady_rounds_and_the_flower_floor():
    row = {
        "simulated": deploy.summary(_run([30.0, 2.0, 2.0, 30.0, 2.0, 2.0])),
        "floor": deploy.summary(_run([9.0, 5.0, 5.0, 9.0, 5.0, 5.0])),
        "deployed_host": deploy.summary(_run([40.0, 8.0, 8.0, 40.0, 8.0, 8.2])),
        "deployed_node": deploy.summary(_run([40.0, 9.0, 9.0, 40.0, 9.0, 9.0], builds=3)),
    }
    goals = deploy.goals(row, {"num-links": 2})
    assert goals["simulated_s"] == 2.0 and goals["floor_s"] == 5.0  # first rounds left out
    host = goals["deployed_host"]
    assert host["bound_s"] == pytest.approx(5.0 + 1.1 * 2.0 + 1.0)
    assert host["round_met"] and host["builds_met"] and host["tokenized_met"]
    node = goals["deployed_node"]
    assert not node["round_met"] and not node["builds_met"]  # 9 s > 8.2 s; 3 builds > 2 links


@pytest.mark.integration
def test_tiny_preset_end_to_end(tmp_path):
    work = tempfile.mkdtemp(prefix="bd-", dir="/tmp")  # Unix socket paths must stay short
    try:
        deploy.main(["--preset", "tiny", "--nodes", "2", "--out", str(tmp_path), "--work", work])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = json.loads((tmp_path / "deploy-tiny.json").read_text())
    (row,) = doc["rows"]
    assert {"simulated", "deployed_partition", "floor", "floor_fast_poll", "goals"} <= row.keys()
    workers = row["deployed_partition"]["workers"]
    assert sorted(workers) == ["owner-0/worker-0", "owner-0/worker-1"]  # a worker per node
    for worker in workers.values():  # one build a link, its own partition tokenized once
        assert worker["builds"] == 2 and worker["tokenized"] == {"train": 1, "eval": 1}
    assert row["goals"]["deployed_partition"]["builds_met"]
    assert all(s > 0 for s in row["deployed_partition"]["steady_s"])
