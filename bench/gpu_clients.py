"""Many clients on one GPU: the Ray simulation against the same clients in one process.

    PYTHONPATH=/tmp/site:$PWD python -m bench.gpu_clients --out bench/results
    python -m bench.gpu_clients --tiny --out /tmp/x      # CPU check of the whole pipeline

For N = 1, 2, 4, 8 clients it runs the real app twice, each in its own child process
(bench.common.run_child):
  ray:   flwr `run_simulation` (simulation.inprocess.simulate) with client resources
         num_gpus = G/N, so the N clients share G GPUs and train at the same time;
  floor: simulation.local.run_local, the same ServerApp/ClientApp code with the N clients
         trained one after another in one process on one GPU.
Model: a Qwen2.5-0.5B-shaped config (hidden 896, intermediate 4864, 24 layers, 14 heads,
2 KV heads; vocabulary of the embedded model's 4096-token tokenizer, so 0.36B parameters,
all of Qwen2.5-0.5B's non-embedding ones), random init, saved in bf16 as a local HF
directory and loaded through the project's own path (`model-name` = that directory);
`precision = bf16`; text: the running interpreter's stdlib sources, saved with
`save_to_disk` and split IID (testing.tiny). Every client trains `local-steps` x
`batch-size` blocks of `seq-len` tokens per round; the run config is RUN below, and
`--set KEY=VALUE` changes it (`--set rounds-per-link=4`, `--set seq-len=256`).

What is recorded, per run and round (testing.probe: a ClientApp wrapper and a timed grid):
throughput = trained tokens of all clients / round wall time; each client's peak GPU memory
(torch max_memory_allocated of its process during its call) and the memory it still holds
after the call (memory_allocated: must not grow across rounds); and the round split into
client compute (the union of the clients' call intervals), Flower/Ray overhead (time the
server waited on the grid while no client was computing) and server time (the rest of the
round: configure, reply checks, aggregation, checkpoint). Round 1 is a warm-up (actor
start, model load, tokenizing) and is excluded. Also the sha256 digests of A for a fixed
list of specs on this machine, A moved to the device and back, against the CPU reference
committed in bench/results/a_digests_cpu.json.

Without a GPU (the --tiny check) Ray is given logical GPUs, so the packing is the same and
the clients train on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    QWEN25_05B,
    REPO,
    RESULTS,
    THROUGHPUT_RUN,
    environment,
    parser,
    run_child,
    with_sets,
    write_result,
)

NAME = "gpu_clients"
DIGEST_REFERENCE = RESULTS / "a_digests_cpu.json"
TRAIN = "train"
MIB = 2**20
MIN_TEXT_CHARS = 400_000  # ~200 rows: every client of the IID split gets text
GROWTH_TOLERANCE = 16 * MIB  # allocator rounding; a kept model would be hundreds of MiB

# Qwen2.5-0.5B's shape with the embedded tokenizer's vocabulary, and a toy one for the CPU.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b-shape": {
        **{k: v for k, v in QWEN25_05B.items() if k != "vocab_size"},
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}
# The run config of every run (the H100 run, aimed at under 8 minutes in all): one link of
# 3 rounds, round 1 being the warm-up (actor start, model load, tokenizing).
RUN: dict[str, Any] = {
    **THROUGHPUT_RUN,
    "rounds-per-link": 3,
    "local-steps": 10,
    "batch-size": 4,
    "seq-len": 512,
    "rank": 16,
    "precision": "bf16",
    "min-available-nodes": 1,  # with N = 1 the default 2 would wait for ever
    "device": "auto",
}
TINY_RUN = {"rounds-per-link": 2, "local-steps": 2, "batch-size": 2, "seq-len": 64, "rank": 4}

# A for these specs is derived on every machine; equal digests mean bit-identical A.
DIGEST_SPECS: tuple[tuple[str, int, int, int, str, int, int], ...] = tuple(
    (kind, seed, link, rank, layer, n_in, n_out)
    for kind in ("gaussian", "circulant", "random-block")
    for seed, link in ((0, 0), (1, 3))
    for rank, layer, n_in, n_out in (
        (16, "model.layers.0.self_attn.q_proj", 896, 896),
        (16, "model.layers.0.self_attn.k_proj", 896, 128),
        (8, "model.layers.23.mlp.down_proj", 4864, 896),
        (8, "transformer.h.0.attn.c_attn", 192, 576),
    )
)


# --- one run, in a child process ------------------------------------------------------
def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s for s in listed.split(",") if s] if listed else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def launch(args, spec: dict[str, Any], workdir: Path, tag: str) -> dict[str, Any]:
    """One probed run in a child process; its analysis, or why it did not finish."""
    from simulation.launch import OFFLINE_ENV, SIMULATION_ENV
    from testing.probe import read

    ov = {**args.base, "model-name": str(args.model_dir), "dataset": str(args.data)}
    ov["max-train-blocks"] = ov["local-steps"] * ov["batch-size"]
    ov |= {"round-timeout": args.timeout_s, "output-dir": str(workdir), "run-name": tag}
    spec = {**spec, "overrides": ov, "probe": str(workdir / f"{tag}.probe")}
    spec["cache_dir"] = str(workdir / "link-cache")
    env = {**OFFLINE_ENV, **SIMULATION_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if spec.get("cuda_visible_devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
    run = run_child(spec, workdir, args.timeout_s, env)
    row: dict[str, Any] = {
        "mode": spec["mode"],
        "clients": spec["nodes"],
        "gpus": spec.get("gpus"),
        "client_resources": {"num_cpus": spec.get("num_cpus"), "num_gpus": spec.get("num_gpus")},
        "logical_gpus": bool(spec.get("init_args", {}).get("num_gpus")),
        "process_wall_s": run["process_wall_s"],
        "completed": run["completed"],
    }
    if not run["completed"]:
        return {**row, "why": run["why"], "log_tail": run["log_tail"]}
    return {**row, **analyse(read(Path(spec["probe"])), run["metrics"], spec)}


# --- analysis -------------------------------------------------------------------------
def trained_tokens(examples: int, batch: int, steps: int, seq_len: int) -> int:
    """Tokens of `steps` batches cycling over `examples` blocks (the last batch may be short)."""
    sizes = [min(batch, examples - i) for i in range(0, examples, batch)]
    return seq_len * sum(sizes[k % len(sizes)] for k in range(steps)) if sizes else 0


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time some client was computing."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _round_row(entry: dict, records: list[dict], ov: dict) -> dict[str, Any]:
    r = entry["round"]
    calls = [c for c in records if c["kind"] == "client" and c["round"] == r]
    calls = [c for c in calls if c["message_type"] == TRAIN]
    waits = [g for g in records if g["kind"] == "grid" and g["round"] == r]
    grid_s = sum(g["end"] - g["start"] for g in waits)
    busy = union_length([(c["start"], c["end"]) for c in calls])
    steps, batch, seq = ov["local-steps"], ov["batch-size"], ov["seq-len"]
    tokens = sum(trained_tokens(int(c.get("num_examples") or 0), batch, steps, seq) for c in calls)
    gpu = [c["gpu"] for c in calls if c.get("gpu")]
    train = [c["train_time"] for c in calls if c.get("train_time") is not None]
    return {
        "round": r,
        "round_s": entry["wall_time"],
        "clients": len(calls),
        "accepted": entry["accepted"],
        "errors": [c["error"] for c in calls if c["error"]],
        "tokens": tokens,
        "tokens_per_s": tokens / entry["wall_time"],
        "split_s": {
            "client_compute": busy,
            "flower_ray_overhead": grid_s - busy,
            "server_and_aggregation": entry["wall_time"] - grid_s,
        },
        "client_train_time_s": {
            "mean": sum(train) / len(train) if train else None,
            "max": max(train, default=None),
            "sum": sum(train),
        },
        "peak_gpu_mb_per_client": [g["peak_allocated"] / MIB for g in gpu],
        "gpu_mb_after_call": {
            str(c["pid"]): c["gpu"]["allocated_after"] / MIB for c in calls if c.get("gpu")
        },
        "device_used_mb_after_call_max": max(
            (g["device_used_after"] / MIB for g in gpu), default=None
        ),
        "gpu_names": sorted({g["name"] for g in gpu}),
        "ray_gpu_ids": sorted({",".join((c.get("ray") or {}).get("gpu_ids", [])) for c in calls}),
        "pids": sorted({c["pid"] for c in calls}),
    }


def analyse(records: list[dict], doc: dict, spec: dict) -> dict[str, Any]:
    """Per round figures, and their means over the steady rounds (round >= 2)."""
    ov = spec["overrides"]
    rounds = [_round_row(e, records, ov) for e in doc["rounds"] if e["round"] > 0]
    steady = rounds[1:] or rounds
    seconds = sum(r["round_s"] for r in steady)
    after_by_round = {r["round"]: max(r["gpu_mb_after_call"].values(), default=0.0) for r in rounds}
    peaks = [m for r in steady for m in r["peak_gpu_mb_per_client"]]
    growth = (after_by_round[rounds[-1]["round"]] - after_by_round[rounds[0]["round"]]) * MIB
    return {
        "rounds": rounds,
        "steady_rounds": [r["round"] for r in steady],
        "tokens_per_s": sum(r["tokens"] for r in steady) / seconds,
        "round_s": seconds / len(steady),
        "split_s": {
            k: sum(r["split_s"][k] for r in steady) / len(steady) for k in steady[0]["split_s"]
        },
        "client_train_time_s_mean": _mean([r["client_train_time_s"]["mean"] for r in steady]),
        "peak_gpu_mb_per_client_max": max(peaks, default=None),
        "peak_gpu_mb_per_client_mean": _mean(peaks),
        "gpu_mb_after_call_by_round": after_by_round,
        "gpu_memory_grows": growth > GROWTH_TOLERANCE,
        "all_accepted": all(r["accepted"] == spec["nodes"] and not r["errors"] for r in rounds),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# --- A digests ------------------------------------------------------------------------
def a_digests(device: str) -> dict[str, dict[str, str]]:
    """Per spec: sha256 of A drawn here (ASpec.digest) and of A moved to `device` and back."""
    import torch

    from seedlora.spec import ASpec

    found = {}
    for fields in DIGEST_SPECS:
        spec = ASpec(*fields)
        moved = hashlib.sha256(repr(spec).encode())
        moved.update(spec.dense().to(device).cpu().numpy().tobytes())
        found["/".join(map(str, fields))] = {"digest": spec.digest(), "moved": moved.hexdigest()}
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return found


def digest_section(device: str) -> dict[str, Any]:
    """This machine's digests against the committed CPU reference."""
    here = a_digests(device)
    section: dict[str, Any] = {"device": device, "specs": len(here), "digests": here}
    section["moved_equal"] = all(d["digest"] == d["moved"] for d in here.values())
    if DIGEST_REFERENCE.exists():
        ref = json.loads(DIGEST_REFERENCE.read_text())["digests"]
        section["reference"] = str(DIGEST_REFERENCE.relative_to(REPO))
        section["reference_environment"] = json.loads(DIGEST_REFERENCE.read_text())["environment"]
        section["equal_to_reference"] = ref.keys() == here.keys() and all(
            ref[k]["digest"] == here[k]["digest"] for k in ref
        )
    return section


# --- the benchmark --------------------------------------------------------------------
def _ray_spec(n: int, g: int, gpu_ids: list[str], cpus: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": "ray",
        "nodes": n,
        "gpus": g,
        "num_cpus": max(1, cpus // n),
        "num_gpus": g / n if n >= g else 1.0,
    }
    if gpu_ids:
        spec["cuda_visible_devices"] = ",".join(gpu_ids[:g])
    else:  # no GPU here: Ray gets logical ones, the clients train on the CPU
        spec["init_args"] = {"num_gpus": g, "num_cpus": max(cpus, n)}
    return spec


def run_benchmark(args) -> dict:
    """Every run, written to `<out>/<name>.json` after each one."""
    from testing.tiny import save_random_lm, save_text_dataset

    gpu_ids = _visible_gpus()
    if gpu_ids and max(args.gpus) > len(gpu_ids):
        raise SystemExit(f"--gpus {max(args.gpus)}: only {len(gpu_ids)} GPU(s) visible")
    cpus = os.cpu_count() or 1
    options = ("clients", "gpus", "model", "skip_floor", "timeout_s", "workdir")
    payload: dict[str, Any] = {"benchmark": NAME, "options": {k: vars(args)[k] for k in options}}
    payload |= {"run_config": args.base, "gpu_ids": gpu_ids}
    own = not args.workdir
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-") if own else args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    ov = args.base
    try:
        args.model_dir = workdir / f"model-{args.model}"
        positions = max(ov["seq-len"], 512)
        info = save_random_lm(args.model_dir, MODELS[args.model], positions)
        payload["model"] = {"shape": args.model, "config": MODELS[args.model], **info}
        blocks = max(args.clients) * ov["local-steps"] * ov["batch-size"]
        chars = max(blocks * ov["seq-len"] * 8, MIN_TEXT_CHARS)
        args.data = save_text_dataset(workdir / f"text-{chars}", min_chars=chars, chunk=2000)
        payload["floor"], payload["ray"] = {}, {str(g): {} for g in args.gpus}
        for n in args.clients:
            runs = [] if args.skip_floor else [(payload["floor"], "floor", 1)]
            runs += [(payload["ray"][str(g)], "ray", g) for g in args.gpus]
            for into, mode, g in runs:
                if mode == "floor":
                    spec = {"mode": "floor", "nodes": n, "gpus": 1}
                    if gpu_ids:
                        spec["cuda_visible_devices"] = gpu_ids[0]
                else:
                    spec = _ray_spec(n, g, gpu_ids, cpus)
                tag = f"floor-n{n}" if mode == "floor" else f"ray-g{g}-n{n}"
                into[str(n)] = launch(args, spec, workdir, tag)
                _say(into[str(n)])
                write_result(args.name, payload, args.out)
        payload["a_digests"] = digest_section("cuda:0" if gpu_ids else "cpu")
        payload["comparison"] = compare(payload, args)
        payload["total_wall_s"] = time.perf_counter() - began
        write_result(args.name, payload, args.out)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return payload


def compare(payload: dict, args) -> list[dict[str, Any]]:
    """Per N: Ray throughput per GPU over the floor's, and G GPUs over one."""
    rows = []
    for n in args.clients:
        floor = payload["floor"].get(str(n), {})
        row: dict[str, Any] = {"clients": n, "floor_tokens_per_s": floor.get("tokens_per_s")}
        for g in args.gpus:
            ray = payload["ray"][str(g)].get(str(n), {})
            tps = ray.get("tokens_per_s")
            row[f"ray_{g}gpu_tokens_per_s"] = tps
            if tps and row["floor_tokens_per_s"]:
                row[f"ray_{g}gpu_per_gpu_over_floor"] = tps / g / row["floor_tokens_per_s"]
        one = row.get("ray_1gpu_tokens_per_s")
        for g in args.gpus:
            if g > 1 and one and row.get(f"ray_{g}gpu_tokens_per_s"):
                row[f"ray_{g}gpu_over_1gpu"] = row[f"ray_{g}gpu_tokens_per_s"] / one
        rows.append(row)
    return rows


def _say(run: dict) -> None:
    if not run.get("completed"):
        print(f"{run['mode']} N={run['clients']}: NOT COMPLETED ({run['why']})", flush=True)
        return
    print(
        f"{run['mode']} N={run['clients']} G={run['gpus']}: {run['tokens_per_s']:.0f} tok/s, "
        f"round {run['round_s']:.2f}s { ({k: round(v, 2) for k, v in run['split_s'].items()}) }, "
        f"peak/client {run['peak_gpu_mb_per_client_max']} MB",
        flush=True,
    )


def write_digest_reference(path: Path = DIGEST_REFERENCE) -> Path:
    """The CPU reference of the A digests (committed; the GPU run is compared with it)."""
    payload = {"environment": environment(), "device": "cpu", "digests": a_digests("cpu")}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def parse(argv: Sequence[str] | None = None):
    ap = parser(__doc__, NAME)
    ap.add_argument("--tiny", action="store_true", help="toy model and sizes (CPU check)")
    ap.add_argument("--clients", help="client counts (default 1,2,4,8; --tiny 1,2)")
    ap.add_argument("--gpus", default="1", help="GPU counts of the Ray series, e.g. 1,2")
    ap.add_argument("--model", choices=sorted(MODELS))
    ap.add_argument("--timeout-s", type=float, help="per run (default 420; --tiny 240)")
    ap.add_argument("--workdir", default="", help="keep the model and data here")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--write-digest-reference", action="store_true")
    a = ap.parse_args(argv)
    a.clients = _ints(a.clients or ("1,2" if a.tiny else "1,2,4,8"))
    a.gpus = _ints(a.gpus)
    a.model = a.model or ("tiny" if a.tiny else "qwen2.5-0.5b-shape")
    a.timeout_s = a.timeout_s or (240.0 if a.tiny else 420.0)
    a.base = with_sets({**RUN, **(TINY_RUN if a.tiny else {})}, a)
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.write_digest_reference:
        print(f"wrote {write_digest_reference()}")
        return 0
    payload = run_benchmark(args)
    for row in payload["comparison"]:
        print(row)
    done = all(r.get("completed") for r in [*payload["floor"].values()])
    done = done and all(r.get("completed") for g in payload["ray"].values() for r in g.values())
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
