"""Quality per uploaded byte: seed-defined chains against FFA-LoRA, FedIT and a central ceiling.

`python -m bench.quality` trains every method on the same clients, rounds and local steps and
records the final central metric (perplexity for code-lm, accuracy for code-cls) against the
total bytes the clients uploaded. Runs go through `tests.local_grid.LocalGrid`: the real
ServerApp/ClientApp code with an in-process transport, so a run costs its training and not a
Ray start-up (transport overhead is measured separately by `bench.sim_overhead`).

Methods (suffixes @r<rank> and @lr<lr> change one variant's rank or lr, e.g. `c3la@r4`):
  c3la      seedlora chains, circulant identity-block A
  r-c3la    seedlora chains, seeded random-block A
  rac-lora  seedlora chains, gaussian A (RAC-LoRA-style chain)
  ffa       FFA-LoRA: B-only on one fixed gaussian A, no chain
  fedit     FedIT: plain LoRA, A and B both trained and averaged
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
import tempfile
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, write_result

NAME = "quality"
CHAINS = ("c3la", "r-c3la", "rac-lora")
VARIANTS: dict[str, dict[str, Any]] = {
    "c3la": {"method": "seedlora", "a-kind": "circulant"},
    "r-c3la": {"method": "seedlora", "a-kind": "random-block"},
    "rac-lora": {"method": "seedlora", "a-kind": "gaussian"},
    "ffa": {"method": "ffa"},
    "fedit": {"method": "fedit"},
    "central": {"method": "seedlora", "a-kind": "circulant"},
}
METRIC = {"code-lm": "ppl", "code-cls": "accuracy"}
HIGHER_IS_BETTER = {"ppl": False, "accuracy": True}


@dataclass
class Options:
    """Every knob of the grid; the defaults are the small CPU-sized runs the report uses."""

    tasks: list[str] = field(default_factory=lambda: ["code-lm", "code-cls"])
    partitionings: list[str] = field(default_factory=lambda: ["iid", "dirichlet"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(
        default_factory=lambda: [*CHAINS, "c3la@r4", "ffa", "fedit", "central"]
    )
    clients: int = 4
    links: int = 3
    rounds_per_link: int = 2
    local_steps: int = 8
    lr: float = 5e-3
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 8
    seq_len: int = 128
    max_train_blocks: int = 64
    max_eval_blocks: int = 64
    dirichlet_alpha: float = 0.5
    model_name: str = "embedded"
    dataset: str = ""
    threads: int = 1  # torch threads; 1 is several times faster on a loaded shared CPU
    task_seeds: dict[str, int] = field(default_factory=dict)  # fewer seeds for a task
    extra: dict[str, Any] = field(default_factory=dict)  # more run-config overrides
    note: str = ""  # why this grid was run (stored in the JSON)


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """`c3la@r4@lr0.001` -> ("c3la", {"rank": 4, "lr": 0.001}); `fedit` -> ("fedit", {})."""
    base, *suffixes = name.split("@")
    if base not in VARIANTS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(VARIANTS)}")
    changes: dict[str, Any] = {}
    for suffix in suffixes:
        if suffix.startswith("lr"):
            changes["lr"] = float(suffix[2:])
        elif suffix.startswith("r"):
            changes["rank"] = int(suffix[1:])
        else:
            raise ValueError(f"method {name!r}: suffix @{suffix} is not @r<rank> or @lr<lr>")
    return base, changes


def run_overrides(
    opts: Options, task: str, partitioning: str, method: str, seed: int
) -> tuple[dict[str, Any], int]:
    """(dash-case run config, number of nodes) of one run."""
    base, changes = split_variant(method)
    central = base == "central"
    overrides: dict[str, Any] = {
        "task": task,
        "model-name": opts.model_name,
        "dataset": opts.dataset,
        "partitioner": "iid" if central else partitioning,
        "dirichlet-alpha": opts.dirichlet_alpha,
        "seed": seed,
        "num-links": opts.links,
        "rounds-per-link": opts.rounds_per_link,
        "local-steps": opts.local_steps * (opts.clients if central else 1),
        "lr": changes.get("lr", opts.lr),
        "rank": changes.get("rank", opts.rank),
        "alpha": opts.alpha,
        "batch-size": opts.batch_size,
        "seq-len": opts.seq_len,
        "max-train-blocks": opts.max_train_blocks * (opts.clients if central else 1),
        "max-eval-blocks": opts.max_eval_blocks,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "min-available-nodes": 1 if central else min(2, opts.clients),
        "central-eval": True,
        "export": False,
        "device": "cpu",
        **VARIANTS[base],
        **opts.extra,
    }
    return overrides, 1 if central else opts.clients


def run_one(opts: Options, task: str, partitioning: str, method: str, seed: int) -> dict:
    """Train one configuration over LocalGrid; the record that goes into the JSON."""
    import torch

    from client.app import build_client_app
    from contract.config import RunConfig
    from server.chain_server import ChainServer
    from tests.local_grid import RUN_ID, LocalGrid

    torch.set_num_threads(opts.threads)
    overrides, nodes = run_overrides(opts, task, partitioning, method, seed)
    metric = METRIC[task]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        grid = LocalGrid(build_client_app(overrides), nodes)
        ChainServer(RunConfig.from_flower(overrides), RUN_ID, Path(tmp)).run(grid)
        doc = json.loads((Path(tmp) / "metrics.json").read_text())
    wall = time.perf_counter() - start
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    series = [
        {
            "round": r["round"],
            metric: r["central"].get(metric),
            "bytes_up": r["bytes_up"],
            "accepted": r["accepted"],
        }
        for r in rounds
    ]
    errors = [x["reason"] for r in rounds for x in r.get("rejected", [])]
    return {
        "task": task,
        "partitioning": "pooled" if method.startswith("central") else partitioning,
        "panel": partitioning,
        "method": method,
        "seed": seed,
        "nodes": nodes,
        "rank": overrides["rank"],
        "lr": overrides["lr"],
        "metric": metric,
        "base": doc["rounds"][0]["central"].get(metric),
        "final": rounds[-1]["central"].get(metric) if rounds else None,
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_up_per_client_round": rounds[0]["bytes_up_per_client"] if rounds else 0,
        "total_optimizer_steps": overrides["local-steps"] * nodes * len(rounds),
        "rounds": len(rounds),
        "skipped_rounds": sum(bool(r["skipped"]) for r in rounds),
        "rejected": errors[:5],
        "wall_time_s": wall,
        "series": series,
    }


def planned_runs(opts: Options, full: bool = False) -> list[tuple[str, str, str, int]]:
    """(task, partitioning, method, seed) of every run, seed by seed (so a cut-short grid
    still has whole seeds); central is run once per task and seed (its data is pooled, so
    the partitioning does not apply) and shown in every panel. `full` ignores task_seeds."""
    plan = []
    for seed in opts.seeds:
        for task in opts.tasks:
            if not full and seed not in opts.seeds[: opts.task_seeds.get(task, len(opts.seeds))]:
                continue
            for method in opts.methods:
                base, _ = split_variant(method)
                if base == "central":
                    plan.append((task, opts.partitionings[0], method, seed))
                    continue
                plan.extend((task, part, method, seed) for part in opts.partitionings)
    return plan


def _key(task: str, part: str, method: str, seed: int) -> str:
    return f"{task}|{'pooled' if method.startswith('central') else part}|{method}|{seed}"


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in aggregate(records) if r["task"] == task]
    panels = sorted({r["partitioning"] for r in rows} - {"pooled"})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    methods = sorted({r["method"] for r in rows if r["partitioning"] != "pooled"})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, part in zip(axes[0], panels, strict=True):
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
        ax.set_title(f"{task}, {part}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_grid(
    opts: Options,
    directory: Path = RESULTS,
    name: str = NAME,
    resume: bool = False,
    limit: int | None = None,
) -> dict:
    """Run the plan, rewriting `<name>.json` after every run so partial results survive.

    `resume` keeps the records of an earlier JSON of the same name and skips those runs;
    `limit` stops after that many new runs (the timing probe)."""
    path = directory / f"{name}.json"
    records: list[dict] = []
    if resume and path.exists():
        records = json.loads(path.read_text()).get("runs", [])
    done = {_key(r["task"], r["partitioning"], r["method"], r["seed"]) for r in records}
    plan = planned_runs(opts)
    todo = [p for p in plan if _key(*p) not in done]
    if limit is not None:
        todo = todo[:limit]
    started = time.perf_counter()
    payload: dict = {}
    failures: list[dict] = []
    for i, (task, part, method, seed) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] {task} {part} {method} seed {seed}", flush=True)
        try:
            records.append(run_one(opts, task, part, method, seed))
        except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
            run = {"task": task, "partitioning": part, "method": method, "seed": seed}
            failures.append({**run, "error": repr(err)})
            print(f"    FAILED: {err!r}", flush=True)
            continue
        r = records[-1]
        print(
            f"    {r['metric']} {r['base']:.4g} -> {r['final']:.4g} | "
            f"{r['total_bytes_up'] / 1e6:.3f} MB up | {r['wall_time_s']:.1f}s",
            flush=True,
        )
        payload = _payload(opts, plan, records, failures, time.perf_counter() - started)
        write_result(name, payload, directory)
    if not todo:
        payload = _payload(opts, plan, records, failures, time.perf_counter() - started)
        write_result(name, payload, directory)
    for task in opts.tasks:
        plot(records, task, directory / f"{name}-{task}.png")
    return payload


def _payload(
    opts: Options, plan: list, records: list[dict], failures: list[dict], seconds: float
) -> dict:
    rows = aggregate(records)
    done = {_key(r["task"], r["partitioning"], r["method"], r["seed"]) for r in records}

    def missing(runs: list) -> list[dict]:
        return [
            {"task": t, "partitioning": p, "method": m, "seed": s}
            for t, p, m, s in runs
            if _key(t, p, m, s) not in done
        ]

    full = planned_runs(opts, full=True)
    return {
        "benchmark": NAME,
        "harness": (
            "tests.local_grid.LocalGrid: the real ServerApp (server.chain_server.ChainServer) "
            "and ClientApp (client.app.build_client_app) in one process, clients trained "
            "in sequence; no Ray (see bench.sim_overhead for the transport's cost)"
        ),
        "options": asdict(opts),
        "central_ceiling": (
            "method 'central': 1 node holding clients x max-train-blocks IID examples of the "
            "pooled training data, c3la adapters (seedlora, circulant), clients x local-steps "
            "steps per round over the same links x rounds: the same total optimizer steps "
            "(and batch size) as one federated run"
        ),
        "quality_metric": {t: METRIC[t] for t in opts.tasks},
        "bytes": "sum over rounds of bytes_up (all accepted client replies) from metrics.json",
        "full_grid_runs": len(full),
        "planned_runs": len(plan),
        "completed_runs": len(records),
        "not_run_of_plan": missing(plan),
        "not_run_of_full_grid": missing(full),
        "failed_runs": failures,
        "grid_seconds_this_call": seconds,
        "summary": rows,
        "goal": goal(records, rows),
        "runs": records,
    }


def parse(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    """Options from the command line (comma lists; `--seeds 3` means seeds 0, 1, 2)."""
    d = Options()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(d.tasks))
    ap.add_argument("--partitionings", default=",".join(d.partitionings))
    ap.add_argument("--seeds", default=str(len(d.seeds)), help="N (0..N-1) or a list a,b")
    ap.add_argument("--methods", default=",".join(d.methods))
    for name in (
        "clients", "links", "rounds_per_link", "local_steps", "rank", "batch_size",
        "seq_len", "max_train_blocks", "max_eval_blocks",
    ):  # fmt: skip
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr", "alpha", "dirichlet_alpha"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--task-seeds", default="", help="fewer seeds for some tasks, e.g. code-cls=1")
    ap.add_argument("--model-name", default=d.model_name)
    ap.add_argument("--dataset", default=d.dataset)
    ap.add_argument("--set", action="append", default=[], help="run-config key=TOML value")
    ap.add_argument("--note", default="", help="stored in the JSON (e.g. why a reduced grid)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--resume", action="store_true", help="keep finished runs of <name>.json")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many new runs")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")] if "," in a.seeds else list(range(int(a.seeds)))
    extra = {}
    for item in a.set:
        key, _, value = item.partition("=")
        extra[key] = tomllib.loads(f"v = {value}")["v"]
    opts = Options(
        tasks=a.tasks.split(","),
        partitionings=a.partitionings.split(","),
        seeds=seeds,
        methods=a.methods.split(","),
        clients=a.clients,
        links=a.links,
        rounds_per_link=a.rounds_per_link,
        local_steps=a.local_steps,
        lr=a.lr,
        rank=a.rank,
        alpha=a.alpha,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        max_train_blocks=a.max_train_blocks,
        max_eval_blocks=a.max_eval_blocks,
        dirichlet_alpha=a.dirichlet_alpha,
        model_name=a.model_name,
        dataset=a.dataset,
        threads=a.threads,
        task_seeds={
            t: int(n) for t, _, n in (x.partition("=") for x in a.task_seeds.split(",") if x)
        },
        extra=extra,
        note=a.note,
    )
    for m in opts.methods:
        split_variant(m)
    return opts, a


def main(argv: Sequence[str] | None = None) -> int:
    opts, a = parse(argv)
    payload = run_grid(opts, a.out, a.name, resume=a.resume, limit=a.limit)
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
