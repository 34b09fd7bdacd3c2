"""Sweep: strategies x A kinds x seeds through the Ray simulation, one table and plot.

    python -m simulation.sweep --strategies fedavg,fedadam --kinds circulant,gaussian \\
        --seeds 0,1 --set num-links=2 --set rounds-per-link=2 --out outputs/sweep
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from seedlora.serialize import atomic_write_bytes

from .inprocess import simulate


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def final_metric(metrics: dict) -> dict:
    """The last round's central evaluation and the base's, for the table."""
    rounds = [r for r in metrics["rounds"] if r.get("central")]
    return {"base": rounds[0]["central"], "final": rounds[-1]["central"]} if rounds else {}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        rounds = [r for r in row["rounds"] if r.get("central")]
        key = "ppl" if "ppl" in rounds[0]["central"] else "accuracy"
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
    args = parser.parse_args(argv)
    base = dict(kv.split("=", 1) for kv in args.set)
    base = {k: _parse_value(v) for k, v in base.items()}
    out = Path(args.out)
    rows = []
    grid = itertools.product(
        args.strategies.split(","), args.kinds.split(","), args.seeds.split(",")
    )
    for strategy, kind, seed in grid:
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
        metrics = simulate(overrides, args.num_supernodes, args.num_cpus, args.num_gpus)
        rows.append({"name": name, **final_metric(metrics), "rounds": metrics["rounds"]})
        print(f"{name}: {final_metric(metrics)}")
    table = [{k: v for k, v in r.items() if k != "rounds"} for r in rows]
    atomic_write_bytes(out / "sweep.json", json.dumps(table, indent=1).encode())
    plot(rows, out / "sweep.png")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
