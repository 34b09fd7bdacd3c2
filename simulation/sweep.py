"""Grids of runs: points (run-config overrides) run one after another, or in worker
processes (`run_grid(..., workers=N)`), each row appended to a results file as it
finishes, so that a grid cut short resumes where it stopped.

`python -m simulation.sweep` is one such grid: strategies x A kinds x seeds through the Ray
simulation, one table and plot (`--resume` skips the runs already in `sweep.jsonl`):

    python -m simulation.sweep --strategies fedavg,fedadam --kinds circulant,gaussian \\
        --seeds 0,1 --set num-links=2 --set rounds-per-link=2 --out outputs/sweep

A run that fails (Ray did not start, no update accepted: server/outcome.py) fails fast and
is reported; the others go on. At the end the sweep writes `sweep.json` (the rows that
finished, and the failures), plots them, and prints a table: per strategy and A kind, the
final central metric as mean and spread over seeds, wall time and bytes. It exits 1 when
a run failed (`--resume` re-runs only those, continuing a run from its checkpoint when it
has one), 2 when `--out` already holds runs and `--resume` is not given (runs never share
a folder: server/rundir.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (`--set`) as run-config overrides: TOML values, a bare word is a
    string (`strategy=fedavg`, `lr=1e-3`, `export=false`, `dataset=/data/x`)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = text
    return overrides


@dataclass(frozen=True)
class Point:
    """One run of a grid: its run-config overrides (dash keys), its number of nodes, and the
    labels (`tags`) that name it in its row."""

    overrides: Mapping[str, Any]
    nodes: int = 2
    tags: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """What identifies the run in a results file: a changed override is a new run."""
        doc = {"tags": self.tags, "nodes": self.nodes, "overrides": self.overrides}
        return json.dumps(doc, sort_keys=True, default=str)


@dataclass
class GridResult:
    rows: list[dict]  # every point of the plan with a row (earlier calls' too), plan order
    failed: list[dict]  # {**tags, "error"} of the points that raised in this call
    not_run: list[Point]  # points of the plan without a row (failed, or past `limit`)


def run_grid(
    plan: Sequence[Point],
    run: Callable[[Point], dict],
    results: Path,
    *,
    resume: bool = False,
    limit: int | None = None,
    workers: int = 1,
    deadline: float | None = None,
) -> GridResult:
    """Run `run(point)` for each point of `plan`, appending `{"key", "row"}` (the row being
    the point's tags plus what `run` returned) to the JSON-lines file `results` after each.

    `resume` keeps the rows already in `results` and skips their points (otherwise the file
    starts empty); `limit` stops after that many new runs. A point that raises is reported
    and the grid goes on.

    `workers` > 1 runs the points in that many spawned processes, started in plan order, at
    most `workers` at a time; this process appends each row as its run finishes (so a kill
    loses only the runs in flight) and `rows` stay in plan order. `run` and the points must
    pickle (a module-level function, or a functools.partial of one), and concurrent runs
    must not share a directory: give each its own run dir and caches. A worker that dies
    (out of memory, a crash) fails the runs then in flight, whether the pool says so in
    their futures or at the next submit; the grid goes on in a new pool.

    `deadline` (a `time.monotonic()` value): no run starts after it; runs already started
    finish and are written, the rest are in `not_run`."""
    plan = list({point.key: point for point in plan}.values())
    done: dict[str, dict] = {}
    if resume and results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                done[entry["key"]] = entry["row"]
    else:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text("")
    todo = [point for point in plan if point.key not in done]
    todo = todo[:limit] if limit is not None else todo
    runs = _serial(todo, run, deadline) if workers <= 1 else _parallel(todo, run, workers, deadline)
    failed = []
    for point, outcome in runs:
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            row = json.loads(json.dumps({**point.tags, **outcome}))
        except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
            failed.append({**point.tags, "error": f"{type(err).__name__}: {err}"})
            print(f"    FAILED {dict(point.tags)}: {type(err).__name__}: {err}", flush=True)
            continue
        done[point.key] = row
        with results.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": point.key, "row": row}) + "\n")
        if workers > 1:  # runs finish out of order: say which one this was
            print(f"    done {dict(point.tags) or point.key}", flush=True)
    rows = [done[point.key] for point in plan if point.key in done]
    return GridResult(rows, failed, [point for point in plan if point.key not in done])


# A finished run: its point and what `run` returned, or the exception it raised.
Outcome = tuple[Point, dict | BaseException]


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _started(i: int, total: int, point: Point) -> None:
    print(f"[{i + 1}/{total}] {dict(point.tags) or point.key}", flush=True)


def _out_of_time(left: int) -> None:
    print(f"time budget spent: {left} run(s) not started", flush=True)


def _serial(
    todo: list[Point], run: Callable[[Point], dict], deadline: float | None
) -> Iterator[Outcome]:
    """The runs one after another in this process, each outcome (its dict or the exception
    it raised) as it finishes."""
    for i, point in enumerate(todo):
        if _past(deadline):
            _out_of_time(len(todo) - i)
            return
        _started(i, len(todo), point)
        try:
            outcome: dict | BaseException = run(point)
        except Exception as err:  # noqa: BLE001 - reported by run_grid
            outcome = err
        yield point, outcome


def _parallel(
    todo: list[Point], run: Callable[[Point], dict], workers: int, deadline: float | None
) -> Iterator[Outcome]:
    """The runs in `workers` spawned processes (spawn: nothing of this process's state, a
    CUDA context included, is inherited), each outcome as it finishes."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    def new_pool() -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        # CPython starts a spawn pool's workers one per submit, *after* waking its manager
        # thread, which may then wait without the new worker's sentinel: that worker's
        # death goes unseen until another run ends (CI: a dead run 1 noticed only when run
        # 0 timed out 60 s later). All workers started with the thread are all watched.
        pool._safe_to_dynamically_spawn_children = False
        return pool

    queue = list(enumerate(todo))[::-1]  # popped from the end: plan order
    pool, running = new_pool(), {}
    try:
        while queue or running:
            broken = False
            while queue and len(running) < workers and not _past(deadline):
                i, point = queue.pop()
                try:
                    future = pool.submit(run, point)
                except BrokenProcessPool:  # a worker died since the last wait: not started
                    queue.append((i, point))
                    broken = True
                    break
                _started(i, len(todo), point)
                running[future] = (i, point)
            if not running and not broken:
                _out_of_time(len(queue))
                return
            finished: set = set()
            if running and not broken:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = any(isinstance(f.exception(), BrokenProcessPool) for f in finished)
            if broken:  # the pool fails every run in flight: collect them all, start anew
                finished, _ = wait(running)
            for future in sorted(finished, key=lambda f: running[f][0]):  # plan order
                _, point = running.pop(future)
                yield point, future.exception() or future.result()
            if broken:
                pool.shutdown(wait=False)
                pool = new_pool()
    finally:
        if running:  # stopped early (an interrupt): end the runs in flight, not wait for them
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=not running, cancel_futures=True)


def final_metric(metrics: dict) -> dict:
    """The last round's central evaluation and the base's, for the table."""
    rounds = [r for r in metrics["rounds"] if r.get("central")]
    return {"base": rounds[0]["central"], "final": rounds[-1]["central"]} if rounds else {}


def traffic(metrics: dict) -> dict:
    """Bytes up and down over the run's rounds."""
    rounds = metrics["rounds"]
    return {
        "bytes_up": sum(r.get("bytes_up", 0) for r in rounds),
        "bytes_down": sum(r.get("bytes_down", 0) for r in rounds),
    }


def _metric(central: Mapping[str, float]) -> str | None:
    return next((k for k in ("ppl", "accuracy", "loss") if k in central), None)


def _spread(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summary(rows: Sequence[Mapping[str, Any]], group: Sequence[str] = ("strategy", "kind")) -> str:
    """A text table of `rows`, one line per `group` value over seeds: the base and final
    central metric (mean +- sample standard deviation over seeds), wall time, MB sent."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("final"):
            groups.setdefault(tuple(row.get(k, "?") for k in group), []).append(row)
    if not groups:
        return "(no finished runs)"
    header = [*group, "seeds", "metric", "base", "final (mean +- sd)", "wall s", "up MB", "down MB"]
    lines = [header]
    for key, members in groups.items():
        metric = _metric(members[0]["final"])
        if metric is None:  # a task whose evaluation reports none of the known metrics
            base_s = final_s = "-"
        else:
            mean, sd = _spread([m["final"][metric] for m in members])
            base_s = f"{_spread([m['base'][metric] for m in members])[0]:.4g}"
            final_s = f"{mean:.4g} +- {sd:.2g}"
        wall = _spread([m.get("wall_s", 0.0) for m in members])[0]
        up = _spread([m.get("bytes_up", 0) / 1e6 for m in members])[0]
        down = _spread([m.get("bytes_down", 0) / 1e6 for m in members])[0]
        lines.append(
            [
                *map(str, key),
                str(len(members)),
                metric or "-",
                base_s,
                final_s,
                f"{wall:.1f}",
                f"{up:.3f}",
                f"{down:.3f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        rounds = [r for r in row.get("rounds", []) if r.get("central")]
        if not rounds:
            continue
        key = _metric(rounds[0]["central"])
        if key is None:
            continue
        ax.plot(
            [r["round"] for r in rounds], [r["central"][key] for r in rounds], label=row["name"]
        )
        ax.set_ylabel(f"central {key}")
    ax.set_xlabel("round")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="fedavg")
    parser.add_argument("--kinds", default="circulant")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-supernodes", type=int, default=8)
    parser.add_argument("--num-cpus", type=float, default=1.0)
    parser.add_argument("--num-gpus", type=float, default=0.0)
    parser.add_argument("--out", default="outputs/sweep")
    parser.add_argument("--resume", action="store_true", help="skip runs already in sweep.jsonl")
    args = parser.parse_args(argv)
    # here, not at the top: run_grid's worker processes import this module and need
    # neither torch nor Flower for it
    from seedlora.serialize import atomic_write_bytes

    from . import inprocess

    base, out = parse_sets(args.set), Path(args.out)
    plan = []
    axes = (args.strategies.split(","), args.kinds.split(","), args.seeds.split(","))
    for strategy, kind, seed in itertools.product(*axes):
        name = f"{strategy}-{kind}-s{seed}"
        overrides = {
            **base,
            "strategy": strategy,
            "a-kind": kind,
            "seed": int(seed),
            "output-dir": str(out),
            "run-name": name,
            "export": False,
        }
        plan.append(Point(overrides, args.num_supernodes, {"name": name}))
    taken = [p.tags["name"] for p in plan if (out / p.tags["name"]).is_dir()]
    if taken and not args.resume:
        print(
            f"error: --out {out} already holds runs of a sweep ({', '.join(taken[:3])}); pass "
            "--resume to continue that sweep, or choose another --out",
            file=sys.stderr,
        )
        return 2

    def run(point: Point) -> dict:
        from server.rundir import holds_run

        overrides = dict(point.overrides)
        if holds_run(out / point.tags["name"]):  # a failed or cut run: continue it
            overrides["resume"] = True
        started = time.perf_counter()
        metrics = inprocess.simulate(overrides, point.nodes, args.num_cpus, args.num_gpus)
        row = {
            "strategy": overrides["strategy"],
            "kind": overrides["a-kind"],
            "seed": overrides["seed"],
            **final_metric(metrics),
            **traffic(metrics),
            "wall_s": time.perf_counter() - started,
        }
        print(f"    {json.dumps({k: row[k] for k in row if k in ('base', 'final')})}", flush=True)
        return {**row, "rounds": metrics["rounds"]}

    try:
        result = run_grid(plan, run, out / "sweep.jsonl", resume=args.resume)
    finally:  # also on Ctrl-C: the rows that finished are in sweep.jsonl
        done = _rows(out / "sweep.jsonl")
        table = [{k: v for k, v in r.items() if k != "rounds"} for r in done]
        atomic_write_bytes(out / "sweep.json", json.dumps(table, indent=1).encode())
    plot(result.rows, out / "sweep.png")
    print(summary(result.rows))
    for failure in result.failed:
        print(f"FAILED {failure['name']}: {failure['error']}")
    print(f"wrote {out / 'sweep.json'} ({len(result.rows)} runs) and {out / 'sweep.png'}")
    return 1 if result.failed else 0


def _rows(results: Path) -> list[dict]:
    if not results.exists():
        return []
    return [json.loads(line)["row"] for line in results.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
