"""Many clients on one GPU: the Ray simulation against the same clients in one process.

    PYTHONPATH=/tmp/site:$PWD python -m bench.gpu_clients --out bench/results
    python -m bench.gpu_clients --tiny --out /tmp/x      # CPU check of the whole pipeline

For N = 1, 2, 4, 8 clients it runs the real app twice, each in its own child process:
  ray:   flwr `run_simulation` (simulation.inprocess.simulate) with client resources
         num_gpus = G/N, so the N clients share G GPUs and train at the same time;
  floor: tests.local_grid.LocalGrid, the same ServerApp/ClientApp code with the N clients
         trained one after another in one process on one GPU.
Model: a Qwen2.5-0.5B-shaped config (hidden 896, intermediate 4864, 24 layers, 14 heads,
2 KV heads; vocabulary of the embedded model's 4096-token tokenizer, so 0.36B parameters,
all of Qwen2.5-0.5B's non-embedding ones), random init, saved in bf16 as a local HF
directory and loaded through the project's own path (`model-name` = that directory);
`precision = bf16`; text: the running interpreter's stdlib sources, saved with
`save_to_disk` and split IID. Every client trains `local-steps` x `batch-size` blocks of
`seq-len` tokens per round.

What is recorded, per run and round (simulation.probe: a ClientApp wrapper and a timed grid):
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

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, environment, one_link_overrides, write_result

NAME = "gpu_clients"
DIGEST_REFERENCE = RESULTS / "a_digests_cpu.json"
REPO = Path(__file__).resolve().parents[1]
TRAIN = "train"
MIB = 2**20
MIN_TEXT_CHARS = 400_000  # ~200 rows: every client of the IID split gets text
GROWTH_TOLERANCE = 16 * MIB  # allocator rounding; a kept model would be hundreds of MiB
OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",  # Ray's default 15 would let any other job slow the clients
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}

# Qwen2.5-0.5B's shape (its config.json), and a toy one for the CPU check.
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b-shape": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
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


@dataclass
class Options:
    """Sizes of the runs; the defaults are the H100 run (aimed at under 8 minutes in all)."""

    clients: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    gpus: list[int] = field(default_factory=lambda: [1])  # GPU counts of the Ray series
    model: str = "qwen2.5-0.5b-shape"
    rounds: int = 3  # round 1 is the warm-up (actor start, model load, tokenizing)
    local_steps: int = 10
    batch_size: int = 4
    seq_len: int = 512
    rank: int = 16
    precision: str = "bf16"
    skip_floor: bool = False
    timeout_s: float = 420.0  # per run; a run past it is stopped and recorded as such
    workdir: str = ""  # keep the model and data here (default: a temporary directory)


TINY = {
    "clients": [1, 2],
    "model": "tiny",
    "rounds": 2,
    "local_steps": 2,
    "batch_size": 2,
    "seq_len": 64,
    "rank": 4,
    "timeout_s": 240.0,
}


# --- inputs ---------------------------------------------------------------------------
def make_model(directory: Path, model: str, seq_len: int) -> dict[str, Any]:
    """A randomly initialised Qwen2 of the given shape, in bf16, with the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tasks.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    cfg = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=max(seq_len, 512),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        **MODELS[model],
    )
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        net = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        net.save_pretrained(directory)
        tok.save_pretrained(directory)
        del net
    params = _count_params(cfg)
    return {"shape": model, "config": MODELS[model], "vocab_size": len(tok), "params": params}


def _count_params(cfg) -> int:
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())


def make_text(directory: Path, chars: int, row_chars: int = 2000) -> Path:
    """A save_to_disk text dataset of at least `chars` characters of stdlib source."""
    import datasets

    if (directory / "dataset_info.json").exists():
        return directory
    rows: list[str] = []
    total = 0
    for path in sorted(Path(os.__file__).parent.glob("*.py")):
        text = path.read_text(errors="replace")
        rows += [text[i : i + row_chars] for i in range(0, len(text), row_chars)]
        total += len(text)
        if total >= chars:
            break
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(directory))
    return directory


def overrides(opts: Options, model: str, data: str, out: Path, name: str) -> dict[str, Any]:
    """The run config of one run: one link of `rounds` rounds, no evaluation or export."""
    keys = {
        "batch-size": opts.batch_size,
        "seq-len": opts.seq_len,
        "max-train-blocks": opts.local_steps * opts.batch_size,
        "rank": opts.rank,
        "precision": opts.precision,
        "min-available-nodes": 1,  # with N = 1 the default 2 would wait for ever
        "device": "auto",
        "round-timeout": opts.timeout_s,
    }
    return one_link_overrides(model, data, out, name, opts.rounds, opts.local_steps, **keys)


# --- one run, in a child process ------------------------------------------------------
def worker(spec_path: str) -> None:
    """The child side: one run through Ray or the in-process floor, probed."""
    spec = json.loads(Path(spec_path).read_text())
    from client.app import build_client_app
    from contract.config import RunConfig
    from server.app import build_server_app
    from server.chain_server import ChainServer
    from simulation.inprocess import simulate
    from simulation.probe import TimedGrid, probed_client_app
    from tests.local_grid import RUN_ID, LocalGrid

    ov, log, nodes = spec["overrides"], spec["log"], spec["nodes"]
    client_app = probed_client_app(build_client_app(ov), log)
    start = time.time()
    if spec["mode"] == "ray":
        simulate(
            ov,
            num_supernodes=nodes,
            num_cpus=spec["num_cpus"],
            num_gpus=spec["num_gpus"],
            init_args=spec.get("init_args"),
            server_app=build_server_app(ov, wrap_grid=lambda grid: TimedGrid(grid, log)),
            client_app=client_app,
        )
    else:
        out = Path(ov["output-dir"]) / ov["run-name"]
        grid = TimedGrid(LocalGrid(client_app, nodes), log)
        ChainServer(RunConfig.from_flower(ov), RUN_ID, out).run(grid)
    Path(spec["result"]).write_text(json.dumps({"start": start, "end": time.time()}))


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s for s in listed.split(",") if s] if listed else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def launch(spec: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    """Run one `--worker` child; return its probe analysis, or why it did not finish."""
    tag = spec["overrides"]["run-name"]
    paths = {k: workdir / f"{tag}.{k}" for k in ("spec.json", "result.json", "log", "probe")}
    spec = {**spec, "result": str(paths["result.json"]), "log": str(paths["probe"])}
    paths["spec.json"].write_text(json.dumps(spec))
    env = {**os.environ, **OFFLINE, "SEEDLORA_CACHE": str(workdir / "link-cache")}
    if spec.get("cuda_visible_devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
    cmd = [sys.executable, "-m", "bench.gpu_clients", "--worker", str(paths["spec.json"])]
    began = time.perf_counter()
    with paths["log"].open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop(proc)
    row: dict[str, Any] = {
        "mode": spec["mode"],
        "clients": spec["nodes"],
        "gpus": spec.get("gpus"),
        "client_resources": {"num_cpus": spec.get("num_cpus"), "num_gpus": spec.get("num_gpus")},
        "logical_gpus": bool(spec.get("init_args", {}).get("num_gpus")),
        "process_wall_s": time.perf_counter() - began,
    }
    if code != 0 or not paths["result.json"].exists():
        why = f"stopped after the {timeout_s:.0f}s limit" if code is None else f"exit code {code}"
        tail = paths["log"].read_text(errors="replace")[-3000:]
        return {**row, "completed": False, "why": why, "log_tail": tail}
    from simulation.probe import read

    doc = json.loads((Path(spec["overrides"]["output-dir"]) / tag / "metrics.json").read_text())
    return {**row, "completed": True, **analyse(read(paths["probe"]), doc, spec)}


def _stop(proc: subprocess.Popen) -> None:
    """Stop a worker and everything it started (its session: Ray's local processes too)."""
    from simulation.launch import stop_process_tree

    stop_process_tree(proc)


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
def _ray_spec(opts: Options, n: int, g: int, gpu_ids: list[str], cpus: int) -> dict[str, Any]:
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


def run_benchmark(opts: Options, directory: Path = RESULTS, name: str = NAME) -> dict:
    """Every run, written to `<directory>/<name>.json` after each one."""
    gpu_ids = _visible_gpus()
    if gpu_ids and max(opts.gpus) > len(gpu_ids):
        raise SystemExit(f"--gpus {max(opts.gpus)}: only {len(gpu_ids)} GPU(s) visible")
    cpus = os.cpu_count() or 1
    payload: dict[str, Any] = {"benchmark": NAME, "options": asdict(opts), "gpu_ids": gpu_ids}
    own = not opts.workdir
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-") if own else opts.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        model_dir = workdir / f"model-{opts.model}"
        payload["model"] = make_model(model_dir, opts.model, opts.seq_len)
        blocks = max(opts.clients) * opts.local_steps * opts.batch_size
        chars = max(blocks * opts.seq_len * 8, MIN_TEXT_CHARS)
        data = make_text(workdir / f"text-{chars}", chars)
        payload["floor"], payload["ray"] = {}, {str(g): {} for g in opts.gpus}
        for n in opts.clients:
            tag = f"n{n}"
            if not opts.skip_floor:
                spec = {"mode": "floor", "nodes": n, "gpus": 1}
                if gpu_ids:
                    spec["cuda_visible_devices"] = gpu_ids[0]
                spec["overrides"] = overrides(
                    opts, str(model_dir), str(data), workdir, f"floor-{tag}"
                )
                payload["floor"][str(n)] = launch(spec, workdir, opts.timeout_s)
                _say(payload["floor"][str(n)])
                write_result(name, payload, directory)
            for g in opts.gpus:
                spec = _ray_spec(opts, n, g, gpu_ids, cpus)
                spec["overrides"] = overrides(
                    opts, str(model_dir), str(data), workdir, f"ray-g{g}-{tag}"
                )
                payload["ray"][str(g)][str(n)] = launch(spec, workdir, opts.timeout_s)
                _say(payload["ray"][str(g)][str(n)])
                write_result(name, payload, directory)
        payload["a_digests"] = digest_section("cuda:0" if gpu_ids else "cpu")
        payload["comparison"] = compare(payload, opts)
        payload["total_wall_s"] = time.perf_counter() - began
        write_result(name, payload, directory)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return payload


def compare(payload: dict, opts: Options) -> list[dict[str, Any]]:
    """Per N: Ray throughput per GPU over the floor's, and G GPUs over one."""
    rows = []
    for n in opts.clients:
        floor = payload["floor"].get(str(n), {})
        row: dict[str, Any] = {"clients": n, "floor_tokens_per_s": floor.get("tokens_per_s")}
        for g in opts.gpus:
            ray = payload["ray"][str(g)].get(str(n), {})
            tps = ray.get("tokens_per_s")
            row[f"ray_{g}gpu_tokens_per_s"] = tps
            if tps and row["floor_tokens_per_s"]:
                row[f"ray_{g}gpu_per_gpu_over_floor"] = tps / g / row["floor_tokens_per_s"]
        one = row.get("ray_1gpu_tokens_per_s")
        for g in opts.gpus:
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


def parse(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    d = Options()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy model and sizes (CPU check)")
    ap.add_argument("--clients", help="client counts, e.g. 1,2,4,8")
    ap.add_argument("--gpus", help="GPU counts of the Ray series, e.g. 1,2")
    for key in ("rounds", "local_steps", "batch_size", "seq_len", "rank"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int)
    ap.add_argument("--model", choices=sorted(MODELS))
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--timeout-s", type=float)
    ap.add_argument("--workdir")
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--write-digest-reference", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    values = asdict(d) | (TINY if a.tiny else {})
    for key in ("rounds", "local_steps", "batch_size", "seq_len", "rank", "model", "precision"):
        if getattr(a, key) is not None:
            values[key] = getattr(a, key)
    for key in ("timeout_s", "workdir"):
        if getattr(a, key) is not None:
            values[key] = getattr(a, key)
    if a.clients:
        values["clients"] = _ints(a.clients)
    if a.gpus:
        values["gpus"] = _ints(a.gpus)
    values["skip_floor"] = a.skip_floor
    return Options(**values), a


def main(argv: Sequence[str] | None = None) -> int:
    opts, a = parse(argv)
    if a.worker:
        worker(a.worker)
        return 0
    if a.write_digest_reference:
        print(f"wrote {write_digest_reference()}")
        return 0
    payload = run_benchmark(opts, a.out, a.name)
    for row in payload["comparison"]:
        print(row)
    done = all(r.get("completed") for r in [*payload["floor"].values()])
    done = done and all(r.get("completed") for g in payload["ray"].values() for r in g.values())
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
