"""How far the aggregated update is from the exact weighted mean of the clients' updates.

Why: the project's claim is that averaging B alone is exact, because every client shares
A, so mean_i(B_i) A == mean_i(B_i A) up to floating-point rounding; FedIT (LoRA with A
and B averaged separately) is not, since mean(B_i) mean(A_i) != mean(B_i A_i). This
measures the relative Frobenius error against a float64 reference built from the very
same client values, with the aggregation done in the clients' dtype (float32, bfloat16),
and once more through Flower's own `aggregate_arrayrecords` plus the project's merge,
which is what the server really runs.

    python -m bench.exactness [--clients 2 8 32] [--seeds 3] [--shapes 896x896] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import RESULTS, figure, write_result
from seedlora import KINDS, ASpec, merge_delta
from seedlora.aggregate import mean_update, normalized, relative_error

GOAL = 1e-6  # float32 target for this project
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
B_STD = 0.02  # size of a trained B entry; relative errors do not depend on it
Layer = tuple[str, int, int]  # (name, n_in, n_out)
Result = tuple[str, str, float]  # (method, dtype, relative error)


def synthetic_layers(shapes: Sequence[str]) -> list[Layer]:
    """'n_out x n_in' strings (e.g. '896x896', '128x896' for a GQA k_proj) as layers."""
    layers = []
    for s in shapes:
        n_out, n_in = (int(v) for v in s.lower().split("x"))
        layers.append((f"synthetic.{n_out}x{n_in}", n_in, n_out))
    return layers


def shipped_layers(rank: int) -> list[Layer]:
    """The adapted layers of the shipped base model, from its structure on the meta device."""
    from bench.bytes import SHIPPED, adapted_layers, load_config

    return [(x.name, x.n_in, x.n_out) for x in adapted_layers(load_config(SHIPPED), rank)]


def client_bs(layers: Sequence[Layer], rank: int, n: int, gen: torch.Generator) -> list[dict]:
    """Per client and layer a float32 B: a shared direction plus as large a client part.

    Independent zero-mean B_i would mostly cancel and make the mean artificially small;
    clients fine-tuning on one task agree in part, which is what the shared part models.
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, _, n_out in layers:
        shared = torch.randn(n_out, rank, generator=gen) * B_STD
        for state in out:
            state[name] = shared + torch.randn(n_out, rank, generator=gen) * B_STD
    return out


def mean_in_dtype(tensors: Sequence[torch.Tensor], factors: Sequence[float]) -> torch.Tensor:
    """sum_i f_i x_i accumulated in the tensors' own dtype, as a plain client/server would."""
    acc = tensors[0] * factors[0]
    for f, x in zip(factors[1:], tensors[1:], strict=True):
        acc = acc + x * f
    return acc


def flower_mean(states: Sequence[dict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The server's FedAvg: Flower's `aggregate_arrayrecords` over float32 ArrayRecords."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    records = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": w})})
        for s, w in zip(states, weights, strict=True)
    ]
    return {
        k: torch.from_numpy(a.numpy())
        for k, a in aggregate_arrayrecords(records, "num-examples").items()
    }


def merged_update(spec: ASpec, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update the server folds into W (via the project's `merge_delta` on W0 = 0)."""
    base = nn.Linear(spec.n_in, spec.n_out, bias=False)
    nn.init.zeros_(base.weight)
    merge_delta(base, spec, b, scaling)
    return base.weight.detach()


def fedit_a(n: int, rank: int, n_in: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Independent A_i ~ U(-1/sqrt(n_in), 1/sqrt(n_in)): PEFT's kaiming_uniform(a=sqrt 5)."""
    bound = 1.0 / math.sqrt(n_in)
    return [(torch.rand(rank, n_in, generator=gen) * 2 - 1) * bound for _ in range(n)]


def ours_errors(
    spec: ASpec,
    bs32: Sequence[torch.Tensor],
    flower_b: torch.Tensor,
    weights: Sequence[float],
    scaling: float,
) -> list[Result]:
    """(method, dtype, error) of B-only averaging for one layer, per dtype and via Flower."""
    n, a = len(bs32), spec.dense()
    exact32 = mean_update([a] * n, bs32, weights, scaling)
    flower = relative_error(merged_update(spec, flower_b, scaling), exact32)
    out = [(f"seedlora-{spec.kind}+flower", "float32", flower)]
    for dname, dtype in DTYPES.items():
        bs, a_d = [b.to(dtype) for b in bs32], a.to(dtype)  # the values clients hold
        exact = exact32 if dtype == torch.float32 else mean_update([a_d] * n, bs, weights, scaling)
        ours = scaling * mean_in_dtype(bs, normalized(weights)) @ a_d
        out.append((f"seedlora-{spec.kind}", dname, relative_error(ours, exact)))
    return out


def fedit_errors(
    a_list: Sequence[torch.Tensor],
    bs32: Sequence[torch.Tensor],
    weights: Sequence[float],
    scaling: float,
) -> list[Result]:
    """(method, dtype, error) of FedIT: mean(B_i) mean(A_i) vs mean(B_i A_i), per dtype."""
    out: list[Result] = []
    for dname, dtype in DTYPES.items():
        a_d, b_d = [x.to(dtype) for x in a_list], [b.to(dtype) for b in bs32]
        factors = normalized(weights)
        approx = scaling * mean_in_dtype(b_d, factors) @ mean_in_dtype(a_d, factors)
        out.append(
            ("fedit", dname, relative_error(approx, mean_update(a_d, b_d, weights, scaling)))
        )
    return out


def trial(layers: Sequence[Layer], n: int, seed: int, args: argparse.Namespace) -> list[dict]:
    """Every method's error on every layer for one draw of n clients; one row per result."""
    gen = torch.Generator().manual_seed(seed * 1000 + n)
    rank, scaling = args.rank, args.alpha / args.rank
    states = client_bs(layers, rank, n, gen)
    weights = [float(w) for w in torch.randint(1, 1001, (n,), generator=gen)]
    flower = flower_mean(states, weights)  # one reply per client holds every layer
    rows = []
    for name, n_in, n_out in layers:
        bs32 = [s[name] for s in states]
        results = fedit_errors(fedit_a(n, rank, n_in, gen), bs32, weights, scaling)
        for kind in KINDS:
            spec = ASpec(kind, seed, 0, rank, name, n_in, n_out)
            results += ours_errors(spec, bs32, flower[name], weights, scaling)
        keys = ("method", "dtype", "error")
        rows += [dict(zip(keys, r, strict=True), clients=n, seed=seed, layer=name) for r in results]
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Max (and the layer/seed where it occurs) over layers and seeds per method/dtype/n."""
    best: dict[tuple[str, str, int], dict] = {}
    for r in rows:
        key = (r["method"], r["dtype"], r["clients"])
        if key not in best or r["error"] > best[key]["max_error"]:
            best[key] = {
                "method": key[0],
                "dtype": key[1],
                "clients": key[2],
                "max_error": r["error"],
                "at_layer": r["layer"],
                "at_seed": r["seed"],
            }
    return list(best.values())


def print_table(summary: Sequence[dict], clients: Sequence[int]) -> dict[str, Any]:
    """Max relative error per method/dtype (rows) and number of clients (columns)."""
    lines = sorted({(s["method"], s["dtype"]) for s in summary}, key=lambda t: (t[1], t[0]))
    table = {(s["method"], s["dtype"], s["clients"]): s["max_error"] for s in summary}
    print(f"{'method':30} {'dtype':9} " + " ".join(f"{f'n={n}':>9}" for n in clients))
    for method, dtype in lines:
        cells = " ".join(f"{table[(method, dtype, n)]:>9.2e}" for n in clients)
        print(f"{method:30} {dtype:9} {cells}")
    ours32 = max(
        s["max_error"]
        for s in summary
        if s["method"].startswith("seedlora") and s["dtype"] == "float32"
    )
    fedit32 = min(
        s["max_error"] for s in summary if s["method"] == "fedit" and s["dtype"] == "float32"
    )
    verdict = "PASS" if ours32 <= GOAL else "FAIL"
    print(
        f"goal: seedlora float32 relative error <= {GOAL:.0e}: {verdict} (max {ours32:.2e}); "
        f"fedit float32 smallest max error {fedit32:.2e}"
    )
    return {
        "threshold": GOAL,
        "max_seedlora_float32": ours32,
        "pass": ours32 <= GOAL,
        "min_fedit_float32": fedit32,
    }


def plot(summary: Sequence[dict], path: Path) -> None:
    """Error vs number of clients, log y, one line per method/dtype, the goal dashed."""
    with figure(path, figsize=(9, 5)) as (_, ax):
        lines = sorted({(s["method"], s["dtype"]) for s in summary})
        families = sorted({m.removesuffix("+flower") for m, _ in lines})
        for i, (method, dtype) in enumerate(lines):
            pts = sorted(
                (s["clients"], s["max_error"])
                for s in summary
                if (s["method"], s["dtype"]) == (method, dtype)
            )
            # Many lines coincide (same numbers); a small x shift per line keeps each visible.
            shift = 2 ** (0.03 * (i - (len(lines) - 1) / 2))
            flower = method.endswith("+flower")
            ax.plot(
                [p[0] * shift for p in pts],
                [max(p[1], 1e-18) for p in pts],
                "-" if dtype == "float32" else "--",
                marker="x" if flower else "o",
                markersize=8 if flower else 5,
                color=f"C{families.index(method.removesuffix('+flower'))}",  # tab10
                label=f"{method} ({dtype})",
            )
        ax.axhline(GOAL, color="k", linestyle=":", label=f"goal {GOAL:.0e} (float32)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of clients")
        ax.set_ylabel("relative Frobenius error (max over layers, seeds)")
        ax.set_title(
            "aggregated update vs exact weighted mean of client updates\n"
            "(color: method, solid: float32, dashed: bfloat16, x: through Flower)",
            fontsize=10,
        )
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[2, 8, 32])
    parser.add_argument("--seeds", type=int, default=3, help="independent draws per setting")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument(
        "--shapes", nargs="*", default=["896x896", "128x896"], help="extra layers as n_out x n_in"
    )
    parser.add_argument(
        "--shipped",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include every adapted layer of the shipped model",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    layers = synthetic_layers(args.shapes) + (shipped_layers(args.rank) if args.shipped else [])
    rows = [r for n in args.clients for s in range(args.seeds) for r in trial(layers, n, s, args)]
    summary = summarize(rows)
    goal = print_table(summary, args.clients)
    payload = {
        "config": {
            "clients": args.clients,
            "seeds": args.seeds,
            "rank": args.rank,
            "alpha": args.alpha,
            "b_std": B_STD,
            "weights": "num-examples ~ U{1..1000}",
            "fedit_a": "independent per client, U(-1/sqrt(n_in), 1/sqrt(n_in))",
            "layers": [{"name": n, "n_in": i, "n_out": o} for n, i, o in layers],
        },
        "goal": goal,
        "summary": summary,
        "per_layer": summarize_per_layer(rows),
    }
    write_result("exactness", payload, args.out_dir)
    plot(summary, args.out_dir / "exactness.png")
    return payload


def summarize_per_layer(rows: Sequence[dict]) -> list[dict]:
    """Max over seeds per method/dtype/n/layer, to see which shapes drive the maximum."""
    best: dict[tuple, float] = {}
    for r in rows:
        key = (r["method"], r["dtype"], r["clients"], r["layer"])
        best[key] = max(best.get(key, 0.0), r["error"])
    names = ("method", "dtype", "clients", "layer")
    return [dict(zip(names, k, strict=True), max_error=v) for k, v in best.items()]


if __name__ == "__main__":
    main()
