"""Byzantine clients: final perplexity under each aggregation rule, clean and attacked.

`python -m bench.byzantine` trains the embedded code-lm task over `tests.local_grid.LocalGrid`
(the real ServerApp and ClientApp in one process, as bench.quality does). In the attacked
runs 20% of the clients (the last partitions) train honestly and then send a poisoned B:
their update scaled x10 (`scale10`) or sign-flipped (`signflip`, factor -1). The attacker
is `tests.local_grid.scaled_update`, a wrapper placed on a node by this script: no
run-config key can turn it on. Each rule is compared with the clean fedavg run; the goal is
that the robust rules stay within 5% of clean perplexity. The robust rules act in B-space
(see strategies/registry.py); krum/multikrum are told the true number of attackers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, write_result

NAME = "byzantine"
RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
ATTACKS = {"clean": None, "scale10": 10.0, "signflip": -1.0}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")
TOLERANCE = 0.05  # robust rules: final ppl at most 5% above clean fedavg


@dataclass
class Options:
    """The grid; defaults sized for ~15 minutes on a shared 2-core CPU."""

    rules: list[str] = field(default_factory=lambda: list(RULES))
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    clients: int = 5
    attackers: int = 1
    links: int = 2
    rounds_per_link: int = 2
    local_steps: int = 6
    lr: float = 5e-3
    rank: int = 8
    batch_size: int = 8
    seq_len: int = 128
    max_train_blocks: int = 48
    max_eval_blocks: int = 48
    trim_beta: float = 0.2
    krum_select: int = 3
    seed: int = 0
    threads: int = 1


def overrides(opts: Options, rule: str) -> dict[str, Any]:
    return {
        "task": "code-lm",
        "model-name": "embedded",
        "partitioner": "iid",
        "seed": opts.seed,
        "strategy": rule,
        "num-links": opts.links,
        "rounds-per-link": opts.rounds_per_link,
        "local-steps": opts.local_steps,
        "lr": opts.lr,
        "rank": opts.rank,
        "alpha": 2.0 * opts.rank,
        "batch-size": opts.batch_size,
        "seq-len": opts.seq_len,
        "max-train-blocks": opts.max_train_blocks,
        "max-eval-blocks": opts.max_eval_blocks,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "min-available-nodes": opts.clients,
        "trim-beta": opts.trim_beta,
        "num-malicious": opts.attackers,
        "krum-select": opts.krum_select,
        "export": False,
        "device": "cpu",
    }


def run_one(opts: Options, rule: str, attack: str) -> dict:
    """One run over LocalGrid; the last `attackers` nodes are Byzantine unless clean."""
    import torch

    from client.app import build_client_app
    from contract.config import RunConfig
    from server.chain_server import ChainServer
    from tests.local_grid import RUN_ID, LocalGrid, scaled_update

    torch.set_num_threads(opts.threads)
    ov = overrides(opts, rule)
    honest = build_client_app(ov)
    grid = LocalGrid(honest, opts.clients)
    factor = ATTACKS[attack]
    byzantine = sorted(grid.apps)[-opts.attackers :] if factor is not None else []
    for node in byzantine:
        grid.apps[node] = scaled_update(honest, factor)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-byzantine-") as tmp:
        ChainServer(RunConfig.from_flower(ov), RUN_ID, Path(tmp)).run(grid)
        doc = json.loads((Path(tmp) / "metrics.json").read_text())
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    return {
        "rule": rule,
        "attack": attack,
        "byzantine_nodes": byzantine,
        "base_ppl": doc["rounds"][0]["central"]["ppl"],
        "final_ppl": rounds[-1]["central"]["ppl"],
        "series": [r["central"]["ppl"] for r in rounds],
        "rejected": sum(len(r["rejected"]) for r in rounds),
        "wall_time_s": time.perf_counter() - start,
    }


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = list(dict.fromkeys(r["rule"] for r in runs))
    attacks = list(dict.fromkeys(r["attack"] for r in runs))
    by = {(r["rule"], r["attack"]): r["final_ppl"] for r in runs}
    fig, ax = plt.subplots(figsize=(8, 4.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    d = Options()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default=",".join(d.rules))
    ap.add_argument("--attacks", default=",".join(d.attacks))
    for name in ("clients", "attackers", "links", "rounds_per_link", "local_steps"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    ap.add_argument("--max-train-blocks", type=int, default=d.max_train_blocks)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--retable", action="store_true", help="recompute table/plot from the JSON's runs"
    )
    a = ap.parse_args(argv)
    if a.retable:
        payload = json.loads((a.out / f"{NAME}.json").read_text())
        payload.pop("environment", None)
        return report(payload, payload["runs"], a.out)
    opts = Options(
        rules=a.rules.split(","),
        attacks=a.attacks.split(","),
        clients=a.clients,
        attackers=a.attackers,
        links=a.links,
        rounds_per_link=a.rounds_per_link,
        local_steps=a.local_steps,
        max_train_blocks=a.max_train_blocks,
    )
    plan = [("fedavg", "clean")] + [
        (rule, attack) for attack in opts.attacks for rule in opts.rules
    ]
    plan = list(dict.fromkeys(plan))
    runs = []
    started = time.perf_counter()
    for i, (rule, attack) in enumerate(plan):
        runs.append(run_one(opts, rule, attack))
        r = runs[-1]
        print(
            f"[{i + 1}/{len(plan)}] {rule:14s} {attack:9s} ppl {r['base_ppl']:.4g} -> "
            f"{r['final_ppl']:.4g} ({r['wall_time_s']:.0f}s)",
            flush=True,
        )
    payload = {
        "benchmark": NAME,
        "harness": "tests.local_grid.LocalGrid (real ServerApp/ClientApp, in-process transport)",
        "attack": (
            f"{opts.attackers} of {opts.clients} clients train honestly, then send "
            "sent + factor * (trained - sent): scale10 factor 10, signflip factor -1"
        ),
        "options": asdict(opts),
        "reference": "clean fedavg final perplexity",
        "tolerance": TOLERANCE,
        "grid_seconds": time.perf_counter() - started,
        "runs": runs,
    }
    return report(payload, runs, a.out)


def report(payload: dict, runs: list[dict], out: Path) -> int:
    """Table, summary, JSON, plot and a printout from the runs."""
    rows = table(runs)
    payload.update(table=rows, summary=summary(rows, runs[0]["base_ppl"]))
    write_result(NAME, payload, out)
    plot(runs, out / f"{NAME}.png")
    for row in rows:
        print(
            f"{row['rule']:14s} {row['attack']:9s} {row['final_ppl']:.4g} "
            f"x{row['ratio_to_clean_fedavg']:.3f} {'ok' if row['within_5pct'] else '-'}"
        )
    print(json.dumps(payload["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
