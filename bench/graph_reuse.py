"""Capture cost per round of step-mode graphed: one CUDA graph kept for a link's rounds
against a graph captured every round.

    python -m bench.graph_reuse --preset qwen2.5-0.5b          # on a CUDA GPU
    python -m bench.graph_reuse --preset llama2-7b --rounds 3

Why: a client of step-mode graphed (client/local.py) used to capture a new graph every round
(warm-up steps and capture: 0.6-0.9 s on a 7B model, about half of a 10-step round). Now the
graph and its AdamW stay with the model (seedlora.capture.KeptStep): each round loads the
received B in place, zeroes the moments and step counts in place and writes the round's lr
into the tensor the graph reads. This script runs R rounds of S steps of one link twice on
one model of a `bench.step_time` preset shape (random init, the seedlora circulant adapters
grouped, gradient clipping at 1.0, as a client has them):

  fresh   every round a new fused capturable AdamW (float lr) and a new `CapturedStep`, the
          graph dropped after the round: the old path;
  kept    `kept_step(...)`, `begin(lr)`, `ready(...)`: one capture, in the first round.

Every round first loads that round's B (random, the same in both modes) in place and uses
its own lr (a decaying schedule); after a round the gradients are dropped and the cache
emptied, as the client's resident model and `release` do. Recorded per round: `setup_s`
(optimizer, reset, capture or not; synchronized: the capture cost per round), `steps_s`
(the S replays), the GPU memory still allocated after the round, and for `kept` the
differences from `fresh` of the round's mean loss and trained B (max abs; `bitwise` when
equal). The goal: `kept` `setup_s` after the first round at most 0.05 s.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, write_result
from bench.step_time import PRESETS, build_model, prepare

VARIANT = "seedlora-circulant-graphed"  # circulant adapters, q/k/v and gate/up grouped
GOAL_S = 0.05  # kept setup per round after the first
MODES = ("fresh", "kept")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    p.add_argument("--rounds", type=int, default=4, help="rounds of one link, per mode")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    p.add_argument("--lr", type=float, default=1e-3, help="round 1's lr (x0.7 per round)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON")
    p.add_argument("--name", help="result file stem (default graph_reuse-<preset>)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from seedlora.capture import CapturedStep, kept_step

    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.graph_reuse captures CUDA graphs: no CUDA device is visible")
    device = torch.device("cuda")
    shape = PRESETS[args.preset]
    model = prepare(VARIANT, build_model(shape, device, args.seed), shape, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    on = {"device": device, "generator": torch.Generator(device).manual_seed(args.seed)}
    batches = [
        {"input_ids": torch.randint(shape.vocab, (shape.batch, shape.seq), **on)}
        for _ in range(args.steps)
    ]
    received = [[0.01 * torch.randn(p.shape, **on) for p in params] for _ in range(args.rounds)]
    lrs = [args.lr * 0.7**r for r in range(args.rounds)]

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["input_ids"]
        return model(input_ids=x, labels=x, use_cache=False).loss

    def clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)

    def adamw(lr: float | torch.Tensor) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, fused=True, capturable=True)

    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    trained: dict[str, list[list[torch.Tensor]]] = {m: [] for m in MODES}
    for mode in MODES:
        for r in range(args.rounds):
            with torch.no_grad():
                for p, b in zip(params, received[r], strict=True):
                    p.copy_(b)
            torch.cuda.synchronize()
            start = time.perf_counter()
            if mode == "kept":
                kept = kept_step(
                    model, "bench", params, lambda: adamw(torch.ones((), device=device))
                )
                kept.begin(lrs[r])
                step = kept.ready(loss_of, batches[0], clip)
                captures = kept.captures
            else:
                step = CapturedStep(loss_of, params, adamw(lrs[r]), batches[0], before_step=clip)
                captures = r + 1
            torch.cuda.synchronize()
            setup = time.perf_counter() - start
            total = torch.zeros((), dtype=torch.float64, device=device)
            for batch in batches:
                total += step(batch)
            torch.cuda.synchronize()
            steps = time.perf_counter() - start - setup
            trained[mode].append([p.detach().clone() for p in params])
            del step  # fresh: the graph goes with the round; kept: the registry holds it
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows[mode].append(
                {
                    "round": r,
                    "lr": lrs[r],
                    "setup_s": setup,
                    "steps_s": steps,
                    "round_s": setup + steps,
                    "loss": float(total) / args.steps,
                    "captures": captures,
                    "allocated_after_bytes": torch.cuda.memory_allocated(),
                }
            )
            print(f"{mode} round {r}: {rows[mode][-1]}", flush=True)
    for r, row in enumerate(rows["kept"]):
        pairs = list(zip(trained["kept"][r], trained["fresh"][r], strict=True))
        row["max_abs_b_diff"] = max(float((a - b).abs().max()) for a, b in pairs)
        row["bitwise"] = all(torch.equal(a, b) for a, b in pairs)
        row["loss_diff"] = row["loss"] - rows["fresh"][r]["loss"]
    later = {m: [row["setup_s"] for row in rows[m][1:]] for m in MODES}
    summary = {
        "kept_setup_after_first_round_max_s": max(later["kept"], default=math.nan),
        "fresh_setup_after_first_round_median_s": statistics.median(later["fresh"] or [math.nan]),
        "kept_captures": rows["kept"][-1]["captures"],
        "goal_s": GOAL_S,
        "goal_met": max(later["kept"], default=math.inf) <= GOAL_S,
    }
    print(summary, flush=True)
    payload = {
        "benchmark": "graph_reuse",
        "command": " ".join(["python -m bench.graph_reuse", *(argv or sys.argv[1:])]),
        "config": {
            "preset": args.preset,
            **asdict(shape),
            "variant": VARIANT,
            "rounds": args.rounds,
            "steps": args.steps,
            "lrs": lrs,
            "seed": args.seed,
            "max_grad_norm": 1.0,
        },
        "rounds": rows,
        "summary": summary,
    }
    write_result(args.name or f"graph_reuse-{args.preset}", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
