"""simulation.sweep.run_grid in worker processes: rows in plan order whatever order the
runs finish in, a failure reported without losing the others, resume, the time budget, a
worker that dies.

The runs are `fake_run` (module level, so a spawned worker can unpickle it). Where the
order of events matters a run waits for the state it needs (rows written to the results
file, a file that never comes) instead of sleeping, so no outcome depends on which worker
starts first or how busy the machine is."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from simulation import sweep
from simulation.sweep import Point, run_grid

WAIT_S = 60.0  # a run that waits longer than this fails the test instead of hanging it


def _wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT_S:.0f}s for {what}")
        time.sleep(0.01)


def _lines(path: str) -> int:
    return len(Path(path).read_text().splitlines()) if Path(path).exists() else 0


def fake_run(point: Point) -> dict:
    """Waits for `rows` = (file, n) to hold n rows or for the file `never` to appear, exits
    its process when tagged `die`, raises when tagged `fail`, and returns its worker's pid."""
    if "rows" in point.tags:
        results, n = point.tags["rows"]
        _wait_until(lambda: _lines(results) >= n, f"{n} rows in {results}")
    if "never" in point.tags:  # in flight until the pool ends this worker
        _wait_until(lambda: Path(point.tags["never"]).exists(), "the pool to end this run")
    if point.tags.get("die"):
        os._exit(3)  # the worker process dies (as when the OOM killer ends it)
    if point.tags.get("fail"):
        raise ValueError(f"run {point.tags['i']} failed")
    return {"value": 10 * point.tags["i"], "pid": os.getpid()}


def _plan(n: int, fail: tuple[int, ...] = (), **tags: dict) -> list[Point]:
    """`n` points; `tags` maps a tag to {run index: value}."""
    return [
        Point(
            {"lr": i},
            tags={"i": i, "fail": i in fail, **{k: v[i] for k, v in tags.items() if i in v}},
        )
        for i in range(n)
    ]


def _written(results: Path) -> list[int]:
    """The runs in the order the file got them (completion order)."""
    return [json.loads(line)["row"]["i"] for line in results.read_text().splitlines()]


@pytest.mark.integration  # spawns worker processes
def test_parallel_rows_in_plan_order_and_a_failure_loses_nothing_else(tmp_path):
    """Run 0 finishes only once runs 1 and 3 are written (run 2 fails): one worker holds
    it while the other runs the rest, and the file is in completion order, not plan order."""
    results = tmp_path / "runs.jsonl"
    plan = _plan(4, fail=(2,), rows={0: (str(results), 2)})
    grid = run_grid(plan, fake_run, results, workers=2)
    assert [r["i"] for r in grid.rows] == [0, 1, 3]  # plan order
    assert [r["value"] for r in grid.rows] == [0, 10, 30]
    assert _written(results) == [1, 3, 0]
    assert len({r["pid"] for r in grid.rows} - {os.getpid()}) == 2  # two worker processes
    assert grid.rows[1]["pid"] == grid.rows[2]["pid"] != grid.rows[0]["pid"]
    assert [{k: f[k] for k in ("i", "error")} for f in grid.failed] == [
        {"i": 2, "error": "ValueError: run 2 failed"}
    ]
    assert [p.tags["i"] for p in grid.not_run] == [2]


@pytest.mark.integration  # spawns worker processes
def test_parallel_resume_runs_only_what_is_missing(tmp_path):
    results = tmp_path / "runs.jsonl"
    first = run_grid(_plan(3, fail=(1,)), fake_run, results, workers=2)
    assert [r["i"] for r in first.rows] == [0, 2]
    again = run_grid(_plan(3), fake_run, results, workers=2, resume=True)
    assert [r["i"] for r in again.rows] == [0, 1, 2] and not again.failed
    assert again.rows[0] == first.rows[0]  # kept, not rerun
    written = _written(results)
    assert sorted(written[:2]) == [0, 2] and written[2:] == [1]  # only run 1 was appended


def _budget_spent_after(monkeypatch: pytest.MonkeyPatch, starts: int) -> list[int]:
    """The time budget runs out once `starts` runs have started (the clock, made a state):
    returns the list of started run numbers."""
    started: list[int] = []
    announce = sweep._started

    def counted(i: int, total: int, point: Point) -> None:
        started.append(point.tags["i"])
        announce(i, total, point)

    monkeypatch.setattr(sweep, "_started", counted)
    monkeypatch.setattr(sweep, "_past", lambda deadline: len(started) >= starts)
    return started


@pytest.mark.integration  # spawns worker processes
def test_time_budget_stops_starting_runs_and_keeps_the_started_ones(tmp_path, monkeypatch):
    """Two runs start at once; the budget ends during them: both finish and are written,
    none of the other four starts (serial: the same rule before each run)."""
    results = tmp_path / "runs.jsonl"
    plan = _plan(6)
    assert run_grid(plan, fake_run, results, deadline=time.monotonic()).rows == []  # real clock
    started = _budget_spent_after(monkeypatch, 2)
    grid = run_grid(plan, fake_run, results, workers=2, deadline=0.0)
    assert started == [0, 1] and [r["i"] for r in grid.rows] == [0, 1] == _written(results)
    assert [p.tags["i"] for p in grid.not_run] == [2, 3, 4, 5] and not grid.failed
    started = _budget_spent_after(monkeypatch, 1)
    serial = run_grid(plan, fake_run, tmp_path / "s.jsonl", deadline=0.0)
    assert started == [0] and [r["i"] for r in serial.rows] == [0]  # started before the end


@pytest.mark.integration  # spawns worker processes
def test_parallel_limit_and_serial_agree(tmp_path):
    plan = _plan(4)
    parallel = run_grid(plan, fake_run, tmp_path / "p.jsonl", workers=3, limit=2)
    serial = run_grid(plan, fake_run, tmp_path / "s.jsonl", limit=2)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "pid"} for r in rows]  # noqa: E731
    assert strip(parallel.rows) == strip(serial.rows) and len(serial.rows) == 2
    assert {r["pid"] for r in serial.rows} == {os.getpid()}


@pytest.mark.integration  # spawns worker processes
def test_a_dead_worker_fails_its_runs_and_a_new_pool_runs_the_rest(tmp_path, monkeypatch):
    """Run 1 ends its process while run 0 is in flight on the other worker: the pool fails
    both, and runs 2 and 3 go to a new pool. Each worker starts late (as on a busy
    machine), so a worker the pool's manager thread does not watch would let run 0 wait
    its full WAIT_S and fail with TimeoutError instead."""
    spawn = concurrent.futures.ProcessPoolExecutor._spawn_process

    def late_spawn(self):
        time.sleep(0.5)  # the manager thread, woken by submit, goes back to waiting first
        spawn(self)

    monkeypatch.setattr(concurrent.futures.ProcessPoolExecutor, "_spawn_process", late_spawn)
    plan = _plan(4, never={0: str(tmp_path / "never")}, die={1: True})
    grid = run_grid(plan, fake_run, tmp_path / "runs.jsonl", workers=2)
    assert [r["i"] for r in grid.rows] == [2, 3]
    assert [f["i"] for f in grid.failed] == [0, 1]  # plan order
    assert all("BrokenProcessPool" in f["error"] for f in grid.failed)


@pytest.mark.integration  # spawns worker processes
def test_a_pool_broken_at_submit_starts_anew_and_loses_no_run(tmp_path, monkeypatch):
    """A worker that dies between one run's end and the next submit breaks the pool in
    `submit` itself: that run never started, so it goes to the new pool, not to `failed`."""
    pools: list[concurrent.futures.ProcessPoolExecutor] = []

    class BreaksAtSecondSubmit(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)
            self.submits = 0

        def submit(self, fn, /, *args, **kwargs):
            self.submits += 1
            if self is pools[0] and self.submits == 2:
                raise BrokenProcessPool("A child process terminated abruptly")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", BreaksAtSecondSubmit)
    grid = run_grid(_plan(3), fake_run, tmp_path / "runs.jsonl", workers=2)
    assert [r["i"] for r in grid.rows] == [0, 1, 2] and not grid.failed
    assert len(pools) == 2 and pools[1].submits == 2


def test_serial_grid_reports_a_failure_resumes_and_stops_at_the_limit_and_the_budget(tmp_path):
    """The same rules in this process (`workers=1`), without spawning anything."""
    results = tmp_path / "runs.jsonl"
    first = run_grid(_plan(4, fail=(1,)), fake_run, results, limit=3)
    assert [r["i"] for r in first.rows] == [0, 2] and [f["i"] for f in first.failed] == [1]
    assert [p.tags["i"] for p in first.not_run] == [1, 3]
    assert {r["pid"] for r in first.rows} == {os.getpid()}
    again = run_grid(_plan(4), fake_run, results, resume=True)
    assert [r["i"] for r in again.rows] == [0, 1, 2, 3] and again.rows[0] == first.rows[0]
    assert _written(results) == [0, 2, 1, 3]  # only the missing runs were appended
    assert run_grid(_plan(2), fake_run, results, deadline=time.monotonic()).rows == []


def test_summary_and_plot_take_rows_of_any_metric(tmp_path):
    """A loss-only run and a run whose evaluation names no known metric sit in the same
    table and plot as a perplexity run, instead of failing on a missing key."""
    rounds = lambda central: [{"round": 0, "central": central}, {"round": 1, "central": central}]  # noqa: E731
    rows = [
        {"strategy": "fedavg", "kind": "gaussian", "name": "a", "base": {"ppl": 9.0}},
        {"strategy": "fedavg", "kind": "circulant", "name": "b", "base": {"loss": 2.0}},
        {"strategy": "fedadam", "kind": "gaussian", "name": "c", "base": {"f1": 0.5}},
    ]
    for row in rows:
        row |= {"final": {k: v / 2 for k, v in row["base"].items()}, "rounds": rounds(row["base"])}
    lines = sweep.summary(rows).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[3:6] == ["ppl", "9", "4.5"]
    assert lines[2].split()[3:6] == ["loss", "2", "1"]
    assert lines[3].split()[3:6] == ["-", "-", "-"]
    sweep.plot(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
