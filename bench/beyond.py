"""Beyond exact averaging: quality and upload bytes of each extension on the embedded task.

`python -m bench.beyond --items ranks,compress,swapped,dp` runs, per item, a few variants
of the same small federated job (4 clients, 2 links x 2 rounds, code-lm on the embedded
model, through `simulation.local.run_local` like `bench.quality`) and writes
`bench/results/beyond-<item>.json` (`--set KEY=VALUE` changes every run's run config):

  ranks     all clients at r_max, all at r_min, and a mix (exact heterogeneous ranks)
  compress  float32 uploads against float16, bfloat16, int8 and int8 with error feedback
  swapped   B trained on a seeded A (default) against A trained on a seeded B
  dp        client-level DP: quality against epsilon (one run per noise multiplier)
  secagg    SecAgg+ against plain FedAvg
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import quality
from bench.common import figure, parser, with_sets, write_result
from simulation.sweep import Point, run_grid

TASK, PARTITIONING, METHOD, CLIENTS = "code-lm", "iid", "c3la", 4
# The small CPU-sized job every variant runs (a few tens of seconds each).
BASE: dict[str, Any] = {
    **quality.BASE,
    **quality.VARIANTS[METHOD],
    "task": TASK,
    "partitioner": PARTITIONING,
    "min-available-nodes": 2,
    "num-links": 2,
    "rounds-per-link": 2,
    "local-steps": 5,
    "max-train-blocks": 32,
    "max-eval-blocks": 32,
}


def _reply_bytes(message) -> int:
    """Payload of a reply: arrays, plus config values (bytes as is, 8 per number)."""
    total = sum(r.count_bytes() for r in message.content.array_records.values())
    for record in message.content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in values)
    return total


def run_point(point: Point) -> dict:
    """One variant and seed, with a fresh link cache (and upload residuals). A SecAgg+ run's
    bytes are every reply of its 4 stages; a plain run's the metrics' bytes_up."""
    from simulation.local import run_local

    if not point.overrides.get("secure-aggregation"):
        row = quality.run_point(point, fresh_cache=True)
        row.pop("series")
        return row
    start = time.perf_counter()
    result = run_local(point.overrides, point.nodes, fresh_cache=True)
    rounds = result.metrics["rounds"]
    return {
        "nodes": point.nodes,
        "base": rounds[0]["central"]["ppl"],
        "final": rounds[-1]["central"]["ppl"],
        "total_bytes_up": sum(_reply_bytes(m) for m in result.grid.replies),
        "wall_time_s": time.perf_counter() - start,
    }


def run_variants(args, item: str, variants: Sequence[tuple[str, dict]]) -> list[dict]:
    """One row per (variant, seed), with the variant's label and overrides."""
    tags = {"task": TASK, "partitioning": PARTITIONING, "panel": PARTITIONING, "method": METHOD}
    plan = [
        Point(
            {**args.base, **extra, "seed": seed},
            CLIENTS,
            {"variant": label, "overrides": extra, **tags, "seed": seed},
        )
        for seed in args.seeds
        for label, extra in variants
    ]
    results = args.out / f"beyond-{item}.runs.jsonl"
    rows = run_grid(plan, run_point, results, resume=args.resume).rows
    for r in rows:
        print(
            f"{r['variant']:>24} seed {r['seed']}: ppl {r['final']:.2f}, "
            f"{r['total_bytes_up'] / 1e6:.3f} MB up, {r['wall_time_s']:.0f} s"
        )
    return rows


def by_variant(records: Sequence[dict]) -> dict[str, dict]:
    """Mean final perplexity and bytes per variant (over seeds)."""
    out: dict[str, dict] = {}
    for r in records:
        row = out.setdefault(r["variant"], {"finals": [], "bytes": []})
        row["finals"].append(r["final"])
        row["bytes"].append(r["total_bytes_up"])
    for row in out.values():
        row["final_mean"] = sum(row["finals"]) / len(row["finals"])
        row["total_bytes_up_mean"] = sum(row["bytes"]) / len(row["bytes"])
    return out


# --- items ----------------------------------------------------------------------------
RANKS = [
    ("all r_max=8", {}),
    ("all r_min=2", {"client-ranks": "2"}),
    ("mixed 8,4,2,2", {"client-ranks": "8,4,2,2"}),
]


def summarize_ranks(rows: dict[str, dict]) -> dict:
    full, low, mixed = (rows[label]["final_mean"] for label, _ in RANKS)
    return {
        "ppl_all_r_max": full,
        "ppl_all_r_min": low,
        "ppl_mixed": mixed,
        "mixed_between_r_min_and_r_max": min(full, low) <= mixed <= max(full, low),
        "bytes_ratio_mixed_vs_r_max": rows[RANKS[2][0]]["total_bytes_up_mean"]
        / rows[RANKS[0][0]]["total_bytes_up_mean"],
    }


COMPRESS = [
    ("float32", {}),
    ("float16", {"upload-codec": "float16"}),
    ("bfloat16", {"upload-codec": "bfloat16"}),
    ("int8 (no feedback)", {"upload-codec": "int8", "error-feedback": False}),
    ("int8 + error feedback", {"upload-codec": "int8"}),
]


def summarize_compress(rows: dict[str, dict]) -> dict:
    base = rows["float32"]
    per = {
        label: {
            "bytes_ratio_vs_float32": row["total_bytes_up_mean"] / base["total_bytes_up_mean"],
            "ppl_change_vs_float32": row["final_mean"] / base["final_mean"] - 1,
        }
        for label, row in rows.items()
    }
    ef = per["int8 + error feedback"]
    return {
        "per_codec": per,
        "goal": "int8 + error feedback within 1% of float32 perplexity at about 1/4 of its bytes",
        "goal_met": abs(ef["ppl_change_vs_float32"]) <= 0.01
        and ef["bytes_ratio_vs_float32"] <= 0.3,
    }


SWAPPED = [
    ("train B, circulant A", {}),
    ("train A, circulant B", {"frozen-factor": "B"}),
    ("train B, gaussian A", {"a-kind": "gaussian"}),
    ("train A, gaussian B", {"a-kind": "gaussian", "frozen-factor": "B"}),
    # Adam moves every entry of A by about lr, and A x sums n_in of them coherently (B A x
    # only r): the trained-A variant needs a smaller step.
    ("train A, circulant B, lr 1e-3", {"frozen-factor": "B", "lr": 1e-3}),
    ("train A, gaussian B, lr 1e-3", {"a-kind": "gaussian", "frozen-factor": "B", "lr": 1e-3}),
]


def summarize_swapped(rows: dict[str, dict]) -> dict:
    return {
        label: {"ppl": row["final_mean"], "total_bytes_up": row["total_bytes_up_mean"]}
        for label, row in rows.items()
    }


DP_CLIP = 1.0
DP_NOISE = (0.0, 0.01, 0.03, 0.1, 0.3)
DP = [("no DP", {})] + [
    (f"clip {DP_CLIP}, z={z}", {"dp-clip": DP_CLIP, "dp-noise-multiplier": z}) for z in DP_NOISE
]


def summarize_dp(rows: dict[str, dict]) -> dict:
    """Perplexity against epsilon (delta 1e-5, 4 releases of 4 clients out of 4)."""
    from strategies.privacy import epsilon

    rounds, clients, delta = 4, 4, 1e-5
    points = []
    for (label, extra), row in zip(DP, rows.values(), strict=True):
        z = extra.get("dp-noise-multiplier")
        eps = None if z is None else epsilon(z, rounds, clients, clients, delta)
        points.append(
            {
                "variant": label,
                "noise_multiplier": z,
                "epsilon": None if eps is None or math.isinf(eps) else eps,
                "ppl": row["final_mean"],
            }
        )
    return {"delta": delta, "releases": rounds, "clip": DP_CLIP, "points": points}


def _plot_dp(points: list[dict], path) -> None:
    with figure(path, figsize=(5.5, 3.6)) as (_, ax):
        noised = [q for q in points if q["epsilon"] is not None]
        ax.plot(
            [q["epsilon"] for q in noised], [q["ppl"] for q in noised], "o-", label="clip + noise"
        )
        for q in noised:
            ax.annotate(f"z={q['noise_multiplier']}", (q["epsilon"], q["ppl"]), fontsize=7)
        for q in points:
            if q["epsilon"] is None:
                ax.axhline(q["ppl"], ls="--", lw=0.8, color="gray")
                left = min(r["epsilon"] for r in noised)
                ax.annotate(q["variant"], (left, q["ppl"]), fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("epsilon (delta 1e-5, 4 rounds, 4 clients, no amplification)")
        ax.set_ylabel("central held-out perplexity")
        ax.set_title("Client-level DP on the embedded task")


SECAGG = [
    ("plain FedAvg", {}),
    ("SecAgg+", {"secure-aggregation": True, "secagg-max-weight": 32.0}),
]


def summarize_secagg(rows: dict[str, dict]) -> dict:
    plain, secure = rows["plain FedAvg"], rows["SecAgg+"]
    return {
        "ppl_plain": plain["final_mean"],
        "ppl_secagg": secure["final_mean"],
        "ppl_change": secure["final_mean"] / plain["final_mean"] - 1,
        "bytes_ratio_secagg_vs_plain": secure["total_bytes_up_mean"] / plain["total_bytes_up_mean"],
        "bytes_note": "SecAgg+ bytes: every reply of its 4 stages (keys, shares, masked "
        "vectors, unmask shares), arrays plus config values (8 bytes per number)",
    }


ITEMS: dict[str, tuple[list[tuple[str, dict]], Callable[[dict], dict]]] = {
    "ranks": (RANKS, summarize_ranks),
    "compress": (COMPRESS, summarize_compress),
    "swapped": (SWAPPED, summarize_swapped),
    "dp": (DP, summarize_dp),
    "secagg": (SECAGG, summarize_secagg),
}


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser(__doc__, "beyond")
    ap.add_argument("--items", default=",".join(ITEMS), help="comma list of items")
    ap.add_argument("--seeds", default="0", help="comma list of seeds")
    ap.add_argument("--resume", action="store_true", help="skip runs in beyond-<item>.runs.jsonl")
    args = ap.parse_args(argv)
    args.seeds, args.base = [int(s) for s in args.seeds.split(",")], with_sets(BASE, args)
    for item in args.items.split(","):
        variants, summarize = ITEMS[item]
        records = run_variants(args, item, variants)
        rows = by_variant(records)
        payload = {
            "benchmark": f"beyond-{item}",
            "harness": "simulation.local.run_local (real ServerApp/ClientApp, in-process)",
            "run_config": args.base,
            "clients": CLIENTS,
            "task": TASK,
            "partitioning": PARTITIONING,
            "method": METHOD,
            "metric": "central held-out perplexity after 4 rounds (lower is better)",
            "summary": summarize(rows),
            "by_variant": rows,
            "runs": records,
        }
        write_result(f"beyond-{item}", payload, args.out)
        if item == "dp":
            _plot_dp(payload["summary"]["points"], args.out / "beyond-dp.png")


if __name__ == "__main__":
    main()
