"""Quality per uploaded byte: seed-defined chains against FFA-LoRA, FedIT and a central ceiling.

`python -m bench.quality` trains every method on the same clients, rounds and local steps and
records the final central metric (perplexity for code-lm, accuracy for code-cls) against the
total bytes the clients uploaded. Runs go through `simulation.local.run_local`: the real
ServerApp/ClientApp code with an in-process transport, so a run costs its training and not a
Ray start-up (transport overhead is measured separately by `bench.sim_overhead`). Every run
takes the run config BASE below, `--set KEY=VALUE` over it, then the method's own keys;
finished runs are appended to `<name>.runs.jsonl`, and `--resume` skips them.

Methods (suffixes @r<rank> and @lr<lr> change one variant's rank or lr, e.g. `c3la@r4`):
  c3la      seedlora chains, circulant identity-block A
  r-c3la    seedlora chains, seeded random-block A
  rac-lora  seedlora chains, gaussian A (RAC-LoRA-style chain)
  ffa       FFA-LoRA: B-only on one fixed gaussian A, no chain
  fedit     FedIT: plain LoRA, A and B both trained and averaged
  seedcore  seeded-core chains: W = W0 + s B0 R A0, only the r x r core R trained and sent
  c3la@r4   c3la at half the rank: at equal rank a B-only upload is sum(n_out) r, already
            9/16 of FedIT's sum(n_out + n_in) r on GPT-2, so "half the bytes" needs a lower rank
  central   the ceiling: one client holding the pooled data (clients x max-train-blocks
            examples, IID), c3la adapters, clients x local-steps steps per round, so the total
            optimizer-step budget equals that of the federated runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.common import figure, parser, with_sets, write_result
from simulation.sweep import GridResult, Point, parse_sets, run_grid

NAME = "quality"
CHAINS = ("c3la", "r-c3la", "rac-lora", "seedcore")
VARIANTS: dict[str, dict[str, Any]] = {
    "c3la": {"method": "seedlora", "a-kind": "circulant"},
    "r-c3la": {"method": "seedlora", "a-kind": "random-block"},
    "rac-lora": {"method": "seedlora", "a-kind": "gaussian"},
    "ffa": {"method": "ffa"},
    "fedit": {"method": "fedit"},
    "seedcore": {"method": "seedcore"},
    "central": {"method": "seedlora", "a-kind": "circulant"},
}
METHODS = (*CHAINS, "c3la@r4", "ffa", "fedit", "central")
METRIC = {"code-lm": "ppl", "code-cls": "accuracy"}
HIGHER_IS_BETTER = {"ppl": False, "accuracy": True}
# The run config of every run (the small CPU-sized runs the report uses); `--set` changes it.
BASE: dict[str, Any] = {
    "num-links": 3,
    "rounds-per-link": 2,
    "local-steps": 8,
    "lr": 5e-3,
    "rank": 8,
    "alpha": 16.0,
    "batch-size": 8,
    "seq-len": 128,
    "max-train-blocks": 64,
    "max-eval-blocks": 64,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "central-eval": True,
    "export": False,
    "device": "cpu",
}
# Per task, over BASE; a `--set` of the same key wins. code-cls's held-out set is 2033
# snippets of 8 classes (1254 of one package, 4 of another); at max-eval-blocks 64 the
# central validation and test halves were 34 and 30 snippets, one snippet 3 points of
# accuracy. 1024, capped class-stratified (tasks.partitioning.stratified_cap), gives halves
# of 514 and 510 with every snippet of the six smaller classes and 257-258 of each of the
# two largest (either holds 25% of a half, where the largest is 62% of the uncapped set).
# code-lm at 256 blocks of seq-len tokens: halves of 128 blocks (16k tokens at 128), not 32.
TASK_BASE: dict[str, dict[str, Any]] = {
    "code-cls": {"max-eval-blocks": 1024},
    "code-lm": {"max-eval-blocks": 256},
}


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """`c3la@r4@lr0.001` -> ("c3la", {"rank": 4, "lr": 0.001}); `fedit` -> ("fedit", {}).

    Suffixes: @r<rank>, @lr<lr>, @int8 (int8 uploads), @L<links>x<rounds> (a chain of that
    many links of that many rounds each, e.g. @L6x1), @fB (frozen-factor B: B seeded and
    frozen, A trained and sent, sum(n_in) r numbers a round instead of sum(n_out) r)."""
    base, *suffixes = name.split("@")
    if base not in VARIANTS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(VARIANTS)}")
    changes: dict[str, Any] = {}
    for suffix in suffixes:
        links, _, rounds = suffix[1:].partition("x")
        if suffix.startswith("lr"):
            changes["lr"] = float(suffix[2:])
        elif suffix.startswith("r"):
            changes["rank"] = int(suffix[1:])
        elif suffix == "int8":
            changes["upload-codec"] = "int8"
        elif suffix == "fB":
            changes["frozen-factor"] = "B"
        elif suffix.startswith("L") and links.isdigit() and rounds.isdigit():
            changes |= {"num-links": int(links), "rounds-per-link": int(rounds)}
        else:
            raise ValueError(
                f"method {name!r}: suffix @{suffix} is not @r<rank>, @lr<lr>, @int8, @fB or "
                "@L<links>x<rounds>"
            )
    return base, changes


def task_config(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The run config of `task`'s runs: `args.base` (BASE with `--set` over it), TASK_BASE's
    keys for the task that `--set` does not name, and `server-device` following `device`
    unless set (central evaluation where the clients train: on a GPU machine `auto` would
    put it on the GPU even for CPU runs)."""
    named = set(parse_sets(getattr(args, "set", None) or []))
    extra = {k: v for k, v in TASK_BASE.get(task, {}).items() if k not in named}
    return {"server-device": args.base.get("device", "auto"), **args.base, **extra}


def point(args: argparse.Namespace, task: str, part: str, method: str, seed: int) -> Point:
    """One run: `central` is one node holding all clients' training blocks (IID) and taking
    all their local steps, so its optimizer-step budget equals a federated run's."""
    base, changes = split_variant(method)
    central, clients = base == "central", args.clients
    ov = task_config(args, task) | {"task": task, "seed": seed}
    ov["partitioner"] = "iid" if central else part
    ov |= {"min-available-nodes": 1 if central else min(2, clients), **VARIANTS[base], **changes}
    if central:
        ov["local-steps"] *= clients
        ov["max-train-blocks"] *= clients
    tags = {"task": task, "partitioning": "pooled" if central else part, "panel": part}
    return Point(ov, 1 if central else clients, {**tags, "method": method, "seed": seed})


def plan(args: argparse.Namespace, full: bool = False) -> list[Point]:
    """Every run, seed by seed (so a cut-short grid still has whole seeds); central is run
    once per task and seed (its data is pooled, so the partitioning does not apply) and shown
    in every panel. `full` ignores `--task-seeds`."""
    points = []
    for seed in args.seeds:
        for task in args.tasks:
            if not full and seed not in args.seeds[: args.task_seeds.get(task, len(args.seeds))]:
                continue
            for method in args.methods:
                central = split_variant(method)[0] == "central"
                for part in args.partitionings[:1] if central else args.partitionings:
                    points.append(point(args, task, part, method, seed))
    return points


def run_point(point: Point, fresh_cache: bool = False, threads: int | None = None) -> dict:
    """Train one configuration in this process; its row of the JSON. `threads` sets torch's
    threads first (a worker process of `run_grid(..., workers=N)` starts with torch's
    default); `fresh_cache` gives the run a link cache of its own (concurrent runs must not
    share one: client/uploads.py keys error-feedback residuals by run id and node id, and
    every in-process run has the same run id)."""
    from simulation.local import run_local

    if threads:
        import torch

        torch.set_num_threads(threads)

    ov, metric = point.overrides, METRIC[point.overrides["task"]]
    start = time.perf_counter()
    doc = run_local(ov, point.nodes, fresh_cache=fresh_cache).metrics
    wall = time.perf_counter() - start
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    series = [
        {"round": r["round"], metric: r["central"].get(metric)}
        | {"bytes_up": r["bytes_up"], "accepted": r["accepted"]}
        for r in rounds
    ]
    row = {
        "nodes": point.nodes,
        "rank": ov["rank"],
        "lr": ov["lr"],
        "metric": metric,
        "base": doc["rounds"][0]["central"].get(metric),
        "final": rounds[-1]["central"].get(metric) if rounds else None,
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_up_per_client_round": rounds[0]["bytes_up_per_client"] if rounds else 0,
        "total_optimizer_steps": ov["local-steps"] * point.nodes * len(rounds),
        "rounds": len(rounds),
        "skipped_rounds": sum(bool(r["skipped"]) for r in rounds),
        "rejected": [x["reason"] for r in rounds for x in r.get("rejected", [])][:5],
        "wall_time_s": wall,
        "series": series,
    }
    print(
        f"    {metric} {row['base']:.4g} -> {row['final']:.4g} | "
        f"{row['total_bytes_up'] / 1e6:.3f} MB up | {wall:.1f}s",
        flush=True,
    )
    return row


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: Iterable[dict]) -> list[dict]:
    """Mean and spread over seeds of every (task, partitioning, method)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        if r.get("final") is not None:
            groups.setdefault((r["task"], r["partitioning"], r["method"]), []).append(r)
    rows = []
    for (task, part, method), rs in sorted(groups.items()):
        final_mean, final_std = _mean_std([r["final"] for r in rs])
        mb_mean, mb_std = _mean_std([r["total_bytes_up"] / 1e6 for r in rs])
        rows.append(
            {
                "task": task,
                "partitioning": part,
                "method": method,
                "metric": rs[0]["metric"],
                "seeds": sorted(r["seed"] for r in rs),
                "final_mean": final_mean,
                "final_std": final_std,
                "final_min": min(r["final"] for r in rs),
                "final_max": max(r["final"] for r in rs),
                "base": rs[0]["base"],
                "total_mb_up_mean": mb_mean,
                "total_mb_up_std": mb_std,
                "wall_time_s_mean": statistics.fmean(r["wall_time_s"] for r in rs),
            }
        )
    return rows


def _better_or_equal(metric: str, a: float, b: float) -> bool:
    return a >= b if HIGHER_IS_BETTER[metric] else a <= b


def goal(records: Sequence[dict], rows: Sequence[dict]) -> dict:
    """Do chains reach at least FedIT's quality with at most half its upload bytes?

    Judged per task and partitioning on the mean over seeds, with the paired per-seed count
    (same seed = same partition and data order) beside it so a win inside the noise shows."""
    by = {(r["task"], r["partitioning"], r["method"]): r for r in rows}
    checks = []
    for (task, part, method), row in sorted(by.items()):
        if split_variant(method)[0] not in CHAINS or (task, part, "fedit") not in by:
            continue
        fedit = by[task, part, "fedit"]
        metric = row["metric"]
        ratio = row["total_mb_up_mean"] / fedit["total_mb_up_mean"]
        quality = _better_or_equal(metric, row["final_mean"], fedit["final_mean"])
        mine = {r["seed"]: r["final"] for r in records if _matches(r, task, part, method)}
        theirs = {r["seed"]: r["final"] for r in records if _matches(r, task, part, "fedit")}
        paired = sorted(set(mine) & set(theirs))
        wins = sum(_better_or_equal(metric, mine[s], theirs[s]) for s in paired)
        checks.append(
            {
                "task": task,
                "partitioning": part,
                "method": method,
                "metric": metric,
                "final_mean": row["final_mean"],
                "fedit_final_mean": fedit["final_mean"],
                "bytes_ratio_vs_fedit": ratio,
                "quality_at_least_fedit": quality,
                "paired_seeds_at_least_fedit": f"{wins}/{len(paired)}",
                "improves_over_base": not _better_or_equal(metric, row["base"], row["final_mean"]),
                "fedit_improves_over_base": not _better_or_equal(
                    metric, fedit["base"], fedit["final_mean"]
                ),
                "half_bytes_or_less": ratio <= 0.5,
                "goal_met": quality and ratio <= 0.5,
            }
        )
    met = [c for c in checks if c["goal_met"]]
    quality_only = [c for c in checks if c["quality_at_least_fedit"] and not c["goal_met"]]
    lines = [f"{len(met)}/{len(checks)} (task, partitioning, chain variant) meet the goal."]
    if quality_only:
        lines.append(
            f"{len(quality_only)} more reach FedIT's quality but upload more than half its bytes "
            f"(ratios {sorted({round(c['bytes_ratio_vs_fedit'], 3) for c in quality_only})})."
        )
    return {"checks": checks, "goal_met_by": met, "summary": " ".join(lines)}


def _matches(r: dict, task: str, part: str, method: str) -> bool:
    return r["task"] == task and r["partitioning"] == part and r["method"] == method


def plot(records: Sequence[dict], task: str, path: Path) -> Path | None:
    """Final metric vs total uploaded MB (log x): one panel per partitioning, mean and
    min-max over seeds per method; the pooled (central) ceiling and the base as lines.
    Methods with equal bytes are spread by a few percent in x so none hides another."""
    rows = [r for r in aggregate(records) if r["task"] == task]
    panels = sorted({r["partitioning"] for r in rows} - {"pooled"})
    if not panels:
        return None
    methods = sorted({r["method"] for r in rows if r["partitioning"] != "pooled"})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    size = (6 * len(panels), 4.5)
    with figure(path, 1, len(panels), figsize=size, squeeze=False) as (_, axes):
        for ax, part in zip(axes[0], panels, strict=True):
            _panel(ax, rows, part, methods, colors)
            ax.set_title(f"{task}, {part}")
    return path


def _panel(ax, rows: list[dict], part: str, methods: list[str], colors: dict) -> None:
    for r in rows:
        if r["partitioning"] == part:
            yerr = [[r["final_mean"] - r["final_min"]], [r["final_max"] - r["final_mean"]]]
            jitter = 1 + 0.025 * (methods.index(r["method"]) - len(methods) / 2)
            ax.errorbar(
                r["total_mb_up_mean"] * jitter,
                r["final_mean"],
                yerr=yerr,
                fmt="o",
                capsize=4,
                color=colors[r["method"]],
                label=f"{r['method']} (n={len(r['seeds'])})",
            )
        elif r["partitioning"] == "pooled":
            ax.axhline(r["final_mean"], color="k", linestyle="--", linewidth=1)
            ax.axhspan(r["final_min"], r["final_max"], color="k", alpha=0.08)
            ax.plot([], [], "k--", label=f"{r['method']}: pooled data (ceiling)")
    base = next((r["base"] for r in rows if r["base"] is not None), None)
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":", linewidth=1, label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("total uploaded MB, all clients and rounds (equal bytes: offset a little)")
    ax.set_ylabel(f"final central {rows[0]['metric']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def run(args: argparse.Namespace) -> dict:
    """Run the plan (appending each run to `<name>.runs.jsonl`), then write `<name>.json`
    and a plot per task. `--resume` keeps the runs of an earlier call with the same
    options; `--limit` stops after that many new runs (the timing probe)."""
    import torch

    torch.set_num_threads(args.threads)
    points, started = plan(args), time.perf_counter()
    results = args.out / f"{args.name}.runs.jsonl"
    grid = run_grid(points, run_point, results, resume=args.resume, limit=args.limit)
    payload = _payload(args, points, grid, time.perf_counter() - started)
    write_result(args.name, payload, args.out)
    for task in args.tasks:
        plot(grid.rows, task, args.out / f"{args.name}-{task}.png")
    return payload


def _payload(args: argparse.Namespace, points: list[Point], grid: GridResult, seconds: float):
    rows = aggregate(grid.rows)
    labels = ("task", "partitioning", "method", "seed")
    done = {tuple(r[k] for k in labels) for r in grid.rows}

    def missing(runs: list[Point]) -> list[dict]:
        return [
            {k: p.tags[k] for k in labels}
            for p in runs
            if tuple(p.tags[k] for k in labels) not in done
        ]

    full = plan(args, full=True)
    options = ("tasks", "partitionings", "seeds", "methods", "clients", "task_seeds", "threads")
    return {
        "benchmark": NAME,
        "harness": (
            "simulation.local.run_local (LocalGrid): the real ServerApp and ClientApp in one "
            "process, clients trained in sequence; no Ray (see bench.sim_overhead for the "
            "transport's cost)"
        ),
        "options": {k: getattr(args, k) for k in options},
        "run_config": args.base,
        "note": args.note,
        "central_ceiling": (
            "method 'central': 1 node holding clients x max-train-blocks IID examples of the "
            "pooled training data, c3la adapters (seedlora, circulant), clients x local-steps "
            "steps per round over the same links x rounds: the same total optimizer steps "
            "(and batch size) as one federated run"
        ),
        "quality_metric": {t: METRIC[t] for t in args.tasks},
        "bytes": "sum over rounds of bytes_up (all accepted client replies) from metrics.json",
        "full_grid_runs": len(full),
        "planned_runs": len(points),
        "completed_runs": len(grid.rows),
        "not_run_of_plan": missing(points),
        "not_run_of_full_grid": missing(full),
        "failed_runs": grid.failed,
        "grid_seconds_this_call": seconds,
        "summary": rows,
        "goal": goal(grid.rows, rows),
        "runs": grid.rows,
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The grid from the command line (comma lists; `--seeds 3` means seeds 0, 1, 2) and the
    run config of every run (`base`: BASE with `--set` over it)."""
    ap = parser(__doc__, NAME)
    ap.add_argument("--tasks", default="code-lm,code-cls")
    ap.add_argument("--partitionings", default="iid,dirichlet")
    ap.add_argument("--seeds", default="3", help="N (0..N-1) or a list a,b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--task-seeds", default="", help="fewer seeds for some tasks, e.g. code-cls=1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest when shared)")
    ap.add_argument("--note", default="", help="stored in the JSON (e.g. why a reduced grid)")
    ap.add_argument("--resume", action="store_true", help="skip runs in <name>.runs.jsonl")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new runs")
    a = ap.parse_args(argv)
    a.tasks, a.partitionings = a.tasks.split(","), a.partitionings.split(",")
    a.methods = a.methods.split(",")
    a.seeds = [int(s) for s in a.seeds.split(",")] if "," in a.seeds else list(range(int(a.seeds)))
    pairs = (x.partition("=") for x in a.task_seeds.split(",") if x)
    a.task_seeds = {t: int(n) for t, _, n in pairs}
    a.base = with_sets(BASE, a)
    for m in a.methods:
        split_variant(m)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    payload = run(parse(argv))
    print(json.dumps(payload["goal"]["summary"]))
    for row in payload["summary"]:
        print(
            f"{row['task']:9s} {row['partitioning']:10s} {row['method']:10s} "
            f"{row['metric']} {row['final_mean']:.4g} +- {row['final_std']:.2g} "
            f"(base {row['base']:.4g}) | {row['total_mb_up_mean']:.3f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
