"""Time to derive the gaussian A's of a model, and whether they are the golden bits here.

Why: A rule "exact-v2" (seedlora/draws.py) derives A with integer and exactly rounded
float64 operations, so that every CPU gets the same bits; the legacy rule was
torch.Generator's `randn` (float32, SIMD-dependent). This times both for one 4096-wide
rank-16 A and for a Llama-7B layer set (32 blocks of q, k, v, o, gate, up, down; A is
r x n_in), best of `--repeats`, and checks the golden digests of tests/test_spec.py and a
stream digest on this machine (run it with ATEN_CPU_CAPABILITY=default and
NPY_DISABLE_CPU_FEATURES to check the baseline SIMD paths too).

    python -m bench.a_draw [--repeats 3] [--rank 16] [--workers N] [--out DIR] [--name STEM]
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench.common import parser, write_result
from seedlora import ASpec, derive_seed, draws

NAME = "a_draw"
# Llama-2-7B: hidden 4096, intermediate 11008, 32 blocks; (module, n_in, n_out)
LLAMA_7B = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 11008),
    ("mlp.up_proj", 4096, 11008),
    ("mlp.down_proj", 11008, 4096),
]
# tests/test_spec.py's golden digests (ASpec(kind, 1234, 2, 4, LAYER, 64, 192).digest())
GOLDEN_LAYER = "transformer.h.0.attn.c_attn"
GOLDEN = {
    "gaussian": "9573cde1e9648a010d586daa346e65ad996e3bd0915a447bc54bc50c8a3fb61e",
    "random-block": "85e5a8664ebaf69898a5496668eebe8418a38548b7a65a6c521fa990a966f0e5",
}


def legacy_dense(spec: ASpec) -> torch.Tensor:
    """A by the legacy rule: float32 `randn` of a seeded torch.Generator, times the std."""
    gen = torch.Generator().manual_seed(derive_seed("gaussian", spec.seed, 0, spec.layer))
    return torch.randn((spec.rank, spec.n_in), generator=gen) * spec.std


def layer_sets(rank: int) -> dict[str, list[ASpec]]:
    one = [ASpec("gaussian", 0, 0, rank, "layer", 4096, 4096)]
    llama = [
        ASpec("gaussian", 0, 0, rank, f"model.layers.{i}.{name}", n_in, n_out)
        for i in range(32)
        for name, n_in, n_out in LLAMA_7B
    ]
    return {f"4096x{rank}": one, "llama-7b": llama}


def best_time(draw: Callable[[ASpec], Any], specs: Sequence[ASpec], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for spec in specs:
            draw(spec)
        times.append(time.perf_counter() - start)
    return min(times)


def checks() -> dict[str, Any]:
    """The golden digests and a stream digest, computed here."""
    found = {k: ASpec(k, 1234, 2, 4, GOLDEN_LAYER, 64, 192).digest() for k in GOLDEN}
    stream = hashlib.sha256(draws.normals(99, 1_000_001).tobytes()).hexdigest()
    return {
        "golden_equal": found == GOLDEN,
        "normals_99_1000001_sha256": stream,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "npy_disable_cpu_features": os.environ.get("NPY_DISABLE_CPU_FEATURES", ""),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__, NAME)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workers", type=int, help="threads of draws.normals (default: CPUs)")
    args = ap.parse_args(argv)
    if args.workers:
        draws.MAX_WORKERS = args.workers
    rows = []
    for label, specs in layer_sets(args.rank).items():
        row = {"set": label, "layers": len(specs), "entries": sum(s.rank * s.n_in for s in specs)}
        row["legacy_s"] = best_time(legacy_dense, specs, args.repeats)
        row["exact_s"] = best_time(ASpec.dense, specs, args.repeats)
        row["ratio"] = row["exact_s"] / row["legacy_s"]
        print(row, flush=True)
        rows.append(row)
    payload = {"rank": args.rank, "workers": draws.default_workers(), "rows": rows, **checks()}
    print({k: v for k, v in payload.items() if k != "rows"})
    write_result(args.name, payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
