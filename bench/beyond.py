"""Beyond exact averaging: quality and upload bytes of each extension on the embedded task.

    python -m bench.beyond --items ranks,compress,swapped,dp,secagg   # beyond-<item>.json

Per item a few variants of one small job (4 clients, 2 links x 2 rounds, c3la, code-lm):
heterogeneous ranks, upload codecs, the swapped factor, client-level DP (perplexity
against epsilon), SecAgg+ (its bytes: every reply of its 4 stages).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import harness as h
from bench import quality
from simulation.sweep import Point, run_grid

TAGS = {"task": "code-lm", "partitioning": "iid", "panel": "iid", "method": "c3la"}
CLIENTS = 4
BASE = {**quality.BASE, **quality.VARIANTS["c3la"], "task": "code-lm", "partitioner": "iid"}
BASE |= {"min-available-nodes": 2, "num-links": 2, "rounds-per-link": 2, "local-steps": 5}
BASE |= {"max-train-blocks": 32, "max-eval-blocks": 32}
DP_CLIP, DP_DELTA, DP_NOISE = 1.0, 1e-5, (0.0, 0.01, 0.03, 0.1, 0.3)
# Adam moves every entry of a trained A by about lr, and A x sums n_in of them: a smaller step.
RANKS = {"all r_max=8": {}, "all r_min=2": {"client-ranks": "2"}}
RANKS["mixed 8,4,2,2"] = {"client-ranks": "8,4,2,2"}
CODECS = {"float32": {}, **{c: {"upload-codec": c} for c in ("float16", "bfloat16")}}
CODECS["int8 (no feedback)"] = {"upload-codec": "int8", "error-feedback": False}
CODECS["int8 + error feedback"] = {"upload-codec": "int8"}
FROZEN_B, GAUSSIAN = {"frozen-factor": "B"}, {"a-kind": "gaussian"}
SWAPPED = {"train B, circulant A": {}, "train A, circulant B": FROZEN_B}
SWAPPED |= {"train B, gaussian A": GAUSSIAN, "train A, gaussian B": GAUSSIAN | FROZEN_B}
SWAPPED["train A, circulant B, lr 1e-3"] = FROZEN_B | {"lr": 1e-3}
SWAPPED["train A, gaussian B, lr 1e-3"] = GAUSSIAN | FROZEN_B | {"lr": 1e-3}
DP = {"no DP": {}}
DP |= {f"clip {DP_CLIP}, z={z}": {"dp-clip": DP_CLIP, "dp-noise-multiplier": z} for z in DP_NOISE}
SECAGG = {"plain FedAvg": {}, "SecAgg+": {"secure-aggregation": True, "secagg-max-weight": 32.0}}
ITEMS = {"ranks": RANKS, "compress": CODECS, "swapped": SWAPPED, "dp": DP, "secagg": SECAGG}


def reply_bytes(message: Any) -> int:
    """Payload of a reply: arrays, plus config values (bytes as is, 8 per number)."""
    total = sum(r.count_bytes() for r in message.content.array_records.values())
    for record in message.content.config_records.values():
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in values)
    return total


def run_point(point: Point) -> dict:
    """One variant and seed with a fresh link cache; SecAgg+ counts every stage's reply."""
    from simulation.local import run_local

    if not point.overrides.get("secure-aggregation"):
        row = quality.run_point(point, fresh_cache=True)
        row.pop("series")
        return row
    start = time.perf_counter()
    result = run_local(point.overrides, point.nodes, fresh_cache=True)
    rounds = result.metrics["rounds"]
    ppl = [r["central"]["ppl"] for r in rounds]
    row = dict(nodes=point.nodes, base=ppl[0], final=ppl[-1])
    row["total_bytes_up"] = sum(reply_bytes(m) for m in result.grid.replies)
    return row | {"wall_time_s": time.perf_counter() - start}


def summarize(item: str, rows: dict[str, dict], releases: int) -> dict:
    """What each item reports, from the mean final perplexity and bytes per variant."""
    ppl = {k: v["final_mean"] for k, v in rows.items()}
    up = {k: v["total_bytes_up_mean"] for k, v in rows.items()}
    first = next(iter(rows))
    if item == "ranks":
        full, low, mixed = ppl.values()
        out = dict(ppl_all_r_max=full, ppl_all_r_min=low, ppl_mixed=mixed)
        out["mixed_between_r_min_and_r_max"] = min(full, low) <= mixed <= max(full, low)
        return out | {"bytes_ratio_mixed_vs_r_max": list(up.values())[2] / up[first]}
    if item == "compress":
        per = {k: {"bytes_ratio_vs_float32": up[k] / up[first]} for k in rows}
        for k, v in per.items():
            v["ppl_change_vs_float32"] = ppl[k] / ppl[first] - 1
        ef = per["int8 + error feedback"]
        met = abs(ef["ppl_change_vs_float32"]) <= 0.01 and ef["bytes_ratio_vs_float32"] <= 0.3
        goal = "int8 + error feedback within 1% of float32 at ~1/4 of its bytes"
        return {"per_codec": per, "goal": goal, "goal_met": met}
    if item == "dp":
        from strategies.privacy import epsilon

        points = []
        for label, extra in DP.items():
            z = extra.get("dp-noise-multiplier")
            eps = None if z is None else epsilon(z, releases, CLIENTS, CLIENTS, DP_DELTA)
            eps = None if eps is None or math.isinf(eps) else eps
            points.append(dict(variant=label, noise_multiplier=z, ppl=ppl[label], epsilon=eps))
        return {"delta": DP_DELTA, "releases": releases, "clip": DP_CLIP, "points": points}
    if item == "secagg":
        plain, secure = "plain FedAvg", "SecAgg+"
        out = dict(ppl_plain=ppl[plain], ppl_secagg=ppl[secure])
        out["ppl_change"] = ppl[secure] / ppl[plain] - 1
        return out | {"bytes_ratio_secagg_vs_plain": up[secure] / up[plain]}
    return {k: {"ppl": ppl[k], "total_bytes_up": up[k]} for k in rows}


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--items", default=",".join(ITEMS), help="comma list of items")
    ap.add_argument("--seeds", default="0", help="comma list of seeds")
    ap.add_argument("--resume", action="store_true", help="skip runs in beyond-<item>.runs.jsonl")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config")
    ap.add_argument("--out", type=Path, default=h.RESULTS, help="directory for JSON and PNG")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, one-step runs (the tests)")
    args = ap.parse_args(argv)
    payloads = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = {**h.tiny_assets(Path(tmp)), **h.TINY_RUN, "num-links": 2, "rounds-per-link": 1}
        tiny = tiny | {"rank": 8, "alpha": 16.0} if args.tiny else {}
        base = h.with_sets(BASE | tiny, args)
        for item in args.items.split(","):
            plan = []
            for s, (label, extra) in (
                (s, v) for s in h.ints(args.seeds) for v in ITEMS[item].items()
            ):
                tags = {"variant": label, "overrides": extra, **TAGS, "seed": s}
                plan.append(Point({**base, **extra, "seed": s}, CLIENTS, tags))
            results = args.out / f"beyond-{item}.runs.jsonl"
            runs = run_grid(plan, run_point, results, resume=args.resume).rows
            rows: dict[str, dict] = {}
            for r in runs:
                row = rows.setdefault(r["variant"], {"finals": [], "bytes": []})
                row["finals"].append(r["final"])
                row["bytes"].append(r["total_bytes_up"])
            for row in rows.values():
                row["final_mean"] = h.mean(row["finals"])
                row["total_bytes_up_mean"] = h.mean(row["bytes"])
            releases = base["num-links"] * base["rounds-per-link"]
            payload = dict(benchmark=f"beyond-{item}", harness="simulation.local.run_local")
            payload |= dict(run_config=base, clients=CLIENTS, task="code-lm", partitioning="iid")
            payload |= dict(method="c3la", metric="central held-out perplexity (lower is better)")
            payload |= dict(summary=summarize(item, rows, releases), by_variant=rows, runs=runs)
            h.write_result(f"beyond-{item}", payload, args.out)
            payloads[item] = payload
            if item == "dp":
                pts = [q for q in payload["summary"]["points"] if q["epsilon"] is not None]
                xy = {"clip + noise": ([q["epsilon"] for q in pts], [q["ppl"] for q in pts])}
                kw = {"xscale": "log", "xlabel": f"epsilon (delta {DP_DELTA})", "ylabel": "ppl"}
                h.plot(args.out / "beyond-dp.png", "DP", xy, line=rows["no DP"]["final_mean"], **kw)
    return payloads


if __name__ == "__main__":
    main()
