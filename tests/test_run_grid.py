"""simulation.sweep.run_grid in worker processes: rows in plan order whatever order the
runs finish in, a failure reported without losing the others, resume, the time budget.

The runs are `fake_run` (module level, so a spawned worker can unpickle it): it sleeps
`sleep` seconds, raises when tagged `fail`, exits its process when tagged `die`, and
returns its worker's process id."""

from __future__ import annotations

import json
import os
import time

from simulation.sweep import Point, run_grid


def fake_run(point: Point) -> dict:
    time.sleep(point.tags.get("sleep", 0.0))
    if point.tags.get("die"):
        os._exit(3)  # the worker process dies (as when the OOM killer ends it)
    if point.tags.get("fail"):
        raise ValueError(f"run {point.tags['i']} failed")
    return {"value": 10 * point.tags["i"], "pid": os.getpid()}


def _plan(*sleeps: float, fail: tuple[int, ...] = ()) -> list[Point]:
    return [
        Point({"lr": i}, tags={"i": i, "sleep": s, "fail": i in fail}) for i, s in enumerate(sleeps)
    ]


def _written(results) -> list[int]:
    """The runs in the order the file got them (completion order)."""
    return [json.loads(line)["row"]["i"] for line in results.read_text().splitlines()]


def test_parallel_rows_in_plan_order_and_a_failure_loses_nothing_else(tmp_path):
    results = tmp_path / "runs.jsonl"
    plan = _plan(1.2, 0.0, 0.0, 0.0, fail=(2,))
    grid = run_grid(plan, fake_run, results, workers=2)
    assert [r["i"] for r in grid.rows] == [0, 1, 3]  # plan order
    assert [r["value"] for r in grid.rows] == [0, 10, 30]
    assert _written(results)[-1] == 0  # run 0 was slowest, written last: the file is not plan order
    assert len({r["pid"] for r in grid.rows} - {os.getpid()}) == 2  # two worker processes
    assert grid.failed == [
        {"i": 2, "sleep": 0.0, "fail": True, "error": "ValueError: run 2 failed"}
    ]
    assert [p.tags["i"] for p in grid.not_run] == [2]


def test_parallel_resume_runs_only_what_is_missing(tmp_path):
    results = tmp_path / "runs.jsonl"
    first = run_grid(_plan(0, 0, 0, fail=(1,)), fake_run, results, workers=2)
    assert [r["i"] for r in first.rows] == [0, 2]
    again = run_grid(_plan(0, 0, 0), fake_run, results, workers=2, resume=True)
    assert [r["i"] for r in again.rows] == [0, 1, 2] and not again.failed
    assert again.rows[0] == first.rows[0]  # kept, not rerun
    assert _written(results) == [0, 2, 1]  # only run 1 was appended


def test_time_budget_stops_starting_runs_and_keeps_the_started_ones(tmp_path):
    """Two runs start at once; the budget ends during them: both finish and are written,
    none of the other four starts (serial: the same rule before each run)."""
    results = tmp_path / "runs.jsonl"
    plan = _plan(0.6, 0.6, 0, 0, 0, 0)
    deadline = time.monotonic() + 0.3  # spent while runs 0 and 1 sleep (spawn takes longer)
    grid = run_grid(plan, fake_run, results, workers=2, deadline=deadline)
    assert [r["i"] for r in grid.rows] == [0, 1]
    assert [p.tags["i"] for p in grid.not_run] == [2, 3, 4, 5] and not grid.failed
    serial = run_grid(plan, fake_run, tmp_path / "s.jsonl", deadline=time.monotonic() + 0.3)
    assert [r["i"] for r in serial.rows] == [0]  # run 0 started before the budget ran out
    assert run_grid(plan, fake_run, results, deadline=time.monotonic()).rows == []


def test_parallel_limit_and_serial_agree(tmp_path):
    plan = _plan(0, 0, 0, 0)
    parallel = run_grid(plan, fake_run, tmp_path / "p.jsonl", workers=3, limit=2)
    serial = run_grid(plan, fake_run, tmp_path / "s.jsonl", limit=2)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "pid"} for r in rows]  # noqa: E731
    assert strip(parallel.rows) == strip(serial.rows) and len(serial.rows) == 2
    assert {r["pid"] for r in serial.rows} == {os.getpid()}


def test_a_dead_worker_fails_its_runs_and_a_new_pool_runs_the_rest(tmp_path):
    """Run 1 ends its process: the pool fails it and whatever was in flight with it (run 0
    or run 2, by which worker took run 1 when), and run 3 goes to a new pool."""
    plan = _plan(0.5, 0, 0, 0)
    plan[1] = Point({"lr": 1}, tags={"i": 1, "die": True})
    grid = run_grid(plan, fake_run, tmp_path / "runs.jsonl", workers=2)
    done = [r["i"] for r in grid.rows]
    assert done == sorted(done) and done[-1] == 3  # run 3 started after the pool broke
    assert 1 in [f["i"] for f in grid.failed] and "BrokenProcessPool" in grid.failed[-1]["error"]
    assert len(grid.rows) + len(grid.failed) == 4
