"""Byzantine clients: final perplexity under each aggregation rule, clean and attacked.

`python -m bench.byzantine` trains the embedded code-lm task in one process
(`simulation.local.run_local`: the real ServerApp and ClientApp, as bench.quality does). In
the attacked runs 20% of the clients (the last partitions) train honestly and then send a
poisoned B: their update scaled x10 (`scale10`) or sign-flipped (`signflip`, factor -1).
The attacker is `testing.attackers.scaled_update`, a wrapper placed on a node by this
script: no run-config key can turn it on. Each rule is compared with the clean fedavg run;
the goal is that the robust rules stay within 5% of clean perplexity. The robust rules act
in B-space (see strategies/registry.py); krum/multikrum are told the true number of
attackers. `--set KEY=VALUE` changes every run's run config (BASE below); `--resume` skips
the runs already in `<name>.runs.jsonl`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import figure, parser, with_sets, write_result
from simulation.sweep import Point, run_grid

NAME = "byzantine"
RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
ATTACKS = {"clean": None, "scale10": 10.0, "signflip": -1.0}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")
TOLERANCE = 0.05  # robust rules: final ppl at most 5% above clean fedavg
# The run config of every run; sized for ~15 minutes on a shared 2-core CPU.
BASE: dict[str, Any] = {
    "partitioner": "iid",
    "num-links": 2,
    "rounds-per-link": 2,
    "local-steps": 6,
    "lr": 5e-3,
    "max-train-blocks": 48,
    "max-eval-blocks": 48,
    "fraction-evaluate": 0.0,
    "trim-beta": 0.2,
    "krum-select": 3,
    "export": False,
    "device": "cpu",
}


def run_point(point: Point) -> dict:
    """One run; the last `num-malicious` nodes are Byzantine unless clean."""
    from simulation.local import make_grid, run_local
    from testing.attackers import scaled_update

    grid = make_grid(point.overrides, point.nodes)
    factor = ATTACKS[point.tags["attack"]]
    byzantine = sorted(grid.apps)[-point.overrides["num-malicious"] :] if factor else []
    for node in byzantine:
        grid.apps[node] = scaled_update(grid.apps[node], factor)
    start = time.perf_counter()
    doc = run_local(point.overrides, grid=grid).metrics
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    row = {
        "byzantine_nodes": byzantine,
        "base_ppl": doc["rounds"][0]["central"]["ppl"],
        "final_ppl": rounds[-1]["central"]["ppl"],
        "series": [r["central"]["ppl"] for r in rounds],
        "rejected": sum(len(r["rejected"]) for r in rounds),
        "wall_time_s": time.perf_counter() - start,
    }
    print(f"    ppl {row['base_ppl']:.4g} -> {row['final_ppl']:.4g} ({row['wall_time_s']:.0f}s)")
    return row


def table(runs: Sequence[dict]) -> list[dict]:
    """Per (rule, attack): final ppl, its ratio to clean fedavg (the goal check) and to the
    same rule's clean run (what the attack itself costs that rule)."""
    clean = {r["rule"]: r["final_ppl"] for r in runs if r["attack"] == "clean"}
    rows = []
    for r in runs:
        ratio = r["final_ppl"] / clean["fedavg"]
        own = clean.get(r["rule"])
        rows.append(
            {
                "rule": r["rule"],
                "attack": r["attack"],
                "final_ppl": r["final_ppl"],
                "ratio_to_clean_fedavg": ratio,
                "ratio_to_clean_same_rule": r["final_ppl"] / own if own else None,
                "within_5pct": ratio <= 1 + TOLERANCE,
            }
        )
    return rows


def summary(rows: Sequence[dict], base: float) -> dict:
    attacked = [r for r in rows if r["attack"] != "clean"]
    robust = [r for r in attacked if r["rule"] in ROBUST]
    fedavg = {r["attack"]: r["final_ppl"] for r in attacked if r["rule"] == "fedavg"}
    return {
        "robust_within_5pct": all(r["within_5pct"] for r in robust),
        "robust_failures": [f"{r['rule']}/{r['attack']}" for r in robust if not r["within_5pct"]],
        "fedavg_under_attack": {
            a: {"final_ppl": v, "vs_base_ppl": v / base} for a, v in fedavg.items()
        },
    }


def plot(runs: Sequence[dict], path: Path) -> Path:
    rules = list(dict.fromkeys(r["rule"] for r in runs))
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    by = {(r["rule"], r["attack"]): r["final_ppl"] for r in runs}
    with figure(path, figsize=(8, 4.5)) as (_, ax):
        width = 0.8 / len(attacks)
        for j, attack in enumerate(attacks):
            xs = [i + j * width for i, rule in enumerate(rules) if (rule, attack) in by]
            ys = [by[rule, attack] for rule in rules if (rule, attack) in by]
            ax.bar(xs, ys, width, label=attack)
        clean = by.get(("fedavg", "clean"))
        if clean:
            ax.axhline(clean * (1 + TOLERANCE), color="k", linestyle="--", label="clean fedavg +5%")
        ax.axhline(runs[0]["base_ppl"], color="grey", linestyle=":", label="base model")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rules))], rules)
        ax.set_yscale("log")
        ax.set_ylabel("final central perplexity (log)")
        ax.set_title("code-lm, 1 of 5 clients Byzantine")
        ax.legend(fontsize=8)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__, NAME)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--attackers", type=int, default=1, help="krum/multikrum are told it")
    ap.add_argument("--resume", action="store_true", help="skip runs in <name>.runs.jsonl")
    ap.add_argument("--retable", action="store_true", help="table and plot from <name>.json")
    a = ap.parse_args(argv)
    if a.retable:
        payload = json.loads((a.out / f"{a.name}.json").read_text())
        payload.pop("environment", None)
        return report(payload, payload["runs"], a.out, a.name)
    base = with_sets(BASE, a) | {"min-available-nodes": a.clients, "num-malicious": a.attackers}
    pairs = [("fedavg", "clean")]
    pairs += [(rule, attack) for attack in a.attacks.split(",") for rule in a.rules.split(",")]
    plan = [Point({**base, "strategy": r}, a.clients, {"rule": r, "attack": x}) for r, x in pairs]
    started = time.perf_counter()
    runs = run_grid(plan, run_point, a.out / f"{a.name}.runs.jsonl", resume=a.resume).rows
    payload = {
        "benchmark": NAME,
        "harness": "simulation.local.run_local (real ServerApp/ClientApp, in-process transport)",
        "attack": (
            f"{a.attackers} of {a.clients} clients train honestly, then send "
            "sent + factor * (trained - sent): scale10 factor 10, signflip factor -1"
        ),
        "options": {"rules": a.rules, "attacks": a.attacks, "clients": a.clients},
        "run_config": base,
        "reference": "clean fedavg final perplexity",
        "tolerance": TOLERANCE,
        "grid_seconds": time.perf_counter() - started,
        "runs": runs,
    }
    return report(payload, runs, a.out, a.name)


def report(payload: dict, runs: list[dict], out: Path, name: str = NAME) -> int:
    """Table, summary, JSON, plot and a printout from the runs."""
    rows = table(runs)
    payload.update(table=rows, summary=summary(rows, runs[0]["base_ppl"]))
    write_result(name, payload, out)
    plot(runs, out / f"{name}.png")
    for row in rows:
        print(
            f"{row['rule']:14s} {row['attack']:9s} {row['final_ppl']:.4g} "
            f"x{row['ratio_to_clean_fedavg']:.3f} {'ok' if row['within_5pct'] else '-'}"
        )
    print(json.dumps(payload["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
