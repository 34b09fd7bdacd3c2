"""A GPU federation as users run it: the real launcher, per-phase round times, GPU use.

    source .gpubundle/setup.sh && python -m bench.gpu_sim --configs 16x4,64x8
    python -m bench.gpu_sim --tiny --configs 4x2 --out /tmp/x     # CPU check of the pipeline

Each configuration `NxK` runs `python -m simulation.launch --num-supernodes N --num-gpus 1/K`
(K clients share each GPU) on a local random-init model (`--shape`: the 0.36B Qwen2 shape of
bench.gpu_clients, or a Llama-2-7B config), bf16, seq-len 512, batch 4, 10 local steps,
central and federated evaluation on, 2 links x 2 rounds. While it runs, NVML is sampled
every 0.25 s and the run folder is polled, so each round's end is time-stamped whatever
the code version (`--app-dir` runs another checkout's launcher: the "before" rows).

Per configuration the JSON records, over steady rounds (round 1 is the warm-up: actors
start, models load, data is tokenized):
- `round_over_critical_path`: mean steady round time / the clients' critical path
  (sum of the clients' train-time / concurrent clients, concurrent = min(N, K x GPUs));
- `gpu_util_mean` (0-1): NVML utilisation averaged over the GPUs and the steady window;
- tokens/s per GPU (trained tokens of all clients / round time / GPUs) against the
  one-process loop of the same client at the same batch (`floor_tokens_per_s`);
- peak GPU memory, and the per-phase split the run wrote to metrics.json (if any);
- host memory as PSS (proportional set size: a page shared by k processes counts 1/k in
  each, so the sum over processes counts a shared page once; read from
  /proc/<pid>/smaps_rollup, Linux only: elsewhere no samples), every second, summed over
  the client processes (Ray's `ClientAppActor` workers), the server process
  (`flwr-simulation`: the ServerApp) and the rest (SuperLink, Ray daemons), peak and
  steady mean, each also over one float32 master of the base (`master_gb`: parameters x
  4 bytes). The clients of a host map one master file (client/masters.py), so the goal
  is clients <= 1.3 and server <= 1.3 masters.

`--cpu` runs the CPU settings of `--tiny` (fp32, short sequences, 2 local steps) on the
model of `--shape`; `cpu-0.18b` is a shape whose master (0.7 GB) outweighs the ~0.5 GB
each Python process needs, so the CPU check of the host-memory rows means something:

    python -m bench.gpu_sim --cpu --shape cpu-0.18b --configs 4x2 --out /tmp/x
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import QWEN25_05B, REPO, environment, figure, parser, with_sets, write_result
from testing.tiny import save_random_lm, save_text_dataset

LLAMA2_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CPU_018B = {  # 0.18B parameters: a 0.73 GB float32 master, CPU-trainable at seq-len 32
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
}
SHAPES = {
    "qwen-0.36b": {**QWEN25_05B, "vocab_size": 0},
    "llama2-7b": LLAMA2_7B,
    "cpu-0.18b": CPU_018B,
    "tiny": TINY_SHAPE,
}
# Process roles for host memory, by command line (Ray retitles its actor workers).
CLIENT_MARK, SERVER_MARK = "ClientAppActor", "flwr-simulation"
RUN: dict[str, Any] = {
    "partitioner": "iid",
    "precision": "bf16",
    "seq-len": 512,
    "batch-size": 4,
    "local-steps": 10,
    "num-links": 2,
    "rounds-per-link": 2,
    "max-eval-blocks": 16,
    "export": False,
}
TINY_RUN = {"precision": "fp32", "seq-len": 32, "local-steps": 2, "max-eval-blocks": 4}


class GpuSampler(threading.Thread):
    """NVML utilisation and memory of every GPU, sampled every `period` seconds."""

    def __init__(self, gpus: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.gpus, self.period, self.samples, self.stop = gpus, period, [], threading.Event()

    def run(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no NVML (CPU check): no samples
            return
        count = min(self.gpus, pynvml.nvmlDeviceGetCount())  # the GPUs the run may use
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        while not self.stop.is_set():
            util = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100 for h in handles]
            mem = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles]
            self.samples.append((time.time(), util, mem))
            time.sleep(self.period)


def pss_bytes(pid: int) -> int | None:
    """PSS of process `pid` in bytes (/proc/<pid>/smaps_rollup; None if unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def role(cmdline: str) -> str:
    """ "clients", "server" or "other" for a process of the run, by its command line."""
    if CLIENT_MARK in cmdline:
        return "clients"
    return "server" if SERVER_MARK in cmdline else "other"


class HostMemory(threading.Thread):
    """PSS of every process below `pid`, summed by `role`, every `period` seconds: samples
    of (time, {role: bytes}, {role: processes})."""

    def __init__(self, pid: int, period: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples, self.stop = pid, period, [], threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return
            total, count = dict.fromkeys(("clients", "server", "other"), 0), {}
            for proc in procs:
                try:
                    name = role(" ".join(proc.cmdline()))
                except psutil.Error:
                    continue
                pss = pss_bytes(proc.pid)
                if pss is not None:
                    total[name] += pss
                    count[name] = count.get(name, 0) + 1
            if count:
                self.samples.append((time.time(), total, count))
            self.stop.wait(self.period)


def host_memory(samples: list, window: tuple[float, float], master: float) -> dict:
    """Peak and steady-window mean PSS per role (GB), and each over `master` bytes."""
    out: dict[str, Any] = {"master_gb": master / 1e9}
    for name in ("clients", "server", "other"):
        values = [t[name] for _, t, _ in samples]
        steady = [t[name] for at, t, _ in samples if window[0] <= at <= window[1]]
        peak, mean = max(values, default=0), (sum(steady) / len(steady) if steady else None)
        out[name] = {
            "peak_gb": peak / 1e9,
            "steady_gb": mean / 1e9 if mean is not None else None,
            "peak_over_master": peak / master if master else None,
            "steady_over_master": mean / master if mean is not None and master else None,
            "processes": max((c.get(name, 0) for _, _, c in samples), default=0),
        }
    return out


def _rounds(run_dir: Path) -> list[dict]:
    """The rounds a run has written so far (rounds.jsonl if present, else metrics.json)."""
    lines = run_dir / "rounds.jsonl"
    if lines.exists():
        return [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
    try:
        return json.loads((run_dir / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def launch(app_dir: Path, overrides: dict, nodes: int, per_gpu: int, gpus: int) -> dict:
    """Run the launcher once; returns the rounds with their end times and the GPU samples."""
    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    cpus = max(1, (os.cpu_count() or 2) // max(1, min(nodes, per_gpu * max(gpus, 1))))
    cmd = [
        sys.executable,
        "-m",
        "simulation.launch",
        "--num-supernodes",
        str(nodes),
        "--num-cpus",
        str(cpus),
        "--num-gpus",
        str(1 / per_gpu if gpus else 0),
        "--run-config",
        text,
    ]
    env = {**os.environ, "PYTHONPATH": f"{app_dir}:{os.environ.get('PYTHONPATH', '')}"}
    if gpus:  # the first `gpus` GPUs only, so one machine measures 1 GPU against 2
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    sampler, ended, start = GpuSampler(gpus), {}, time.time()
    sampler.start()
    log = open(run_dir.parent / f"{overrides['run-name']}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    memory = HostMemory(proc.pid)
    memory.start()
    while proc.poll() is None:
        for entry in _rounds(run_dir):
            ended.setdefault(entry["round"], time.time())
        time.sleep(0.25)
    sampler.stop.set()
    memory.stop.set()
    log.close()
    rounds = [r for r in _rounds(run_dir) if r.get("round", 0) > 0]
    for entry in rounds:
        entry["ended_at"] = ended.get(entry["round"], time.time())
    return {
        "rc": proc.returncode,
        "start": start,
        "rounds": rounds,
        "samples": sampler.samples,
        "host": memory.samples,
    }


def floor_tokens_per_s(overrides: dict, passes: int = 3) -> list[float]:
    """Tokens/s of one client's round (local-steps x batch) trained in this process, once
    per pass after a warm-up (one pass varied by 35% between two calls on one H200)."""
    import torch

    from client.local import train
    from contract.config import RunConfig
    from runtime.devices import pick_device, place
    from seedlora import prepare
    from tasks import build_task

    cfg = RunConfig.from_flower(overrides)
    task = build_task(cfg.task_config(1))
    a, device = cfg.adapter, pick_device(cfg.train.device)
    model = prepare(
        task.load_model(),
        a.method,
        a.targets(task.target_modules),
        kind=a.kind,
        seed=a.seed,
        rank=a.rank,
        alpha=a.alpha,
    )
    model = place(model, device, cfg.train.precision)
    data = task.train_dataset(0)
    train(model, task, data, cfg, device, data_seed=0)  # warm-up: kernels, allocator
    rates = []
    for seed in range(1, passes + 1):
        start = time.perf_counter()
        result = train(model, task, data, cfg, device, data_seed=seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        tokens = result.steps * cfg.train.batch_size * cfg.task.seq_len
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def summarize(
    run: dict, nodes: int, per_gpu: int, gpus: int, overrides: dict, master: float = 0.0
) -> dict:
    rounds = sorted(run["rounds"], key=lambda r: r["round"])
    steady = rounds[1:] or rounds
    concurrent = min(nodes, per_gpu * max(gpus, 1))
    tokens = overrides["local-steps"] * overrides["batch-size"] * overrides["seq-len"]
    times, critical, per_round = [], [], []
    for prev, cur in zip(rounds, rounds[1:], strict=False):
        wall = cur["ended_at"] - prev["ended_at"]
        phases = cur.get("phases") or {}  # this project's metrics.json; else the mean x count
        mean_train = cur.get("train_metrics", {}).get("train-time", 0.0)
        train = phases.get("client_train_sum", mean_train * cur.get("accepted", 0))
        times.append(wall)
        critical.append(train / concurrent)
        per_round.append(
            {
                "round": cur["round"],
                "wall": wall,
                "critical_path": train / concurrent,
                "accepted": cur.get("accepted"),
                "phases": cur.get("phases"),
            }
        )
    window = (rounds[0]["ended_at"], rounds[-1]["ended_at"]) if rounds else (0, 0)
    util = [sum(u) / len(u) for t, u, _ in run["samples"] if window[0] <= t <= window[1] and u]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    round_time = mean(times)
    return {
        "nodes": nodes,
        "clients_per_gpu": per_gpu,
        "gpus": gpus,
        "rc": run["rc"],
        "steady_rounds": [r["round"] for r in steady],
        "round_time_mean": round_time,
        "critical_path_mean": mean(critical),
        "round_over_critical_path": round_time / mean(critical)
        if critical and mean(critical)
        else None,
        "gpu_util_mean": mean(util),
        "tokens_per_s_per_gpu": nodes * tokens / round_time / max(gpus, 1) if round_time else None,
        "peak_gpu_memory_gb": max((max(m) for _, _, m in run["samples"]), default=0) / 1e9,
        "host_pss": host_memory(run.get("host", []), window, master),
        "rounds": per_round,
    }


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "")
    ap.add_argument("--configs", default="16x4,16x8,64x4,64x8", help="NxK,... (K per GPU)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen-0.36b")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    ap.add_argument("--app-dir", default=str(REPO), help="checkout whose launcher runs")
    ap.add_argument("--label", default="after", help="row label (before/after)")
    ap.add_argument("--tiny", action="store_true", help="--cpu --shape tiny (pipeline check)")
    ap.add_argument("--cpu", action="store_true", help="CPU run settings (fp32, short steps)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.cpu, args.shape = True, "tiny"
    import torch

    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, data = out / f"model-{args.shape}", out / "text"
    shape = SHAPES[args.shape]
    facts = save_random_lm(model, {k: v for k, v in shape.items() if k != "vocab_size"})
    master = facts["params"] * 4  # bytes of the float32 master
    save_text_dataset(data, min_chars=2_000_000 if not args.cpu else 50_000)
    base = with_sets(
        {
            **RUN,
            **(TINY_RUN if args.cpu else {}),
            "model-name": str(model),
            "dataset": str(data),
            "output-dir": str(out),
        },
        args,
    )
    rows = []
    for spec in args.configs.split(","):
        nodes, per_gpu = (int(x) for x in spec.split("x"))
        ov = {**base, "run-name": f"{args.label}-{args.shape}-{spec}-{int(time.time())}"}
        run = launch(Path(args.app_dir), ov, nodes, per_gpu, gpus)
        row = summarize(run, nodes, per_gpu, gpus, ov, master)
        rows.append({"label": args.label, "config": spec, **row})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
    passes = floor_tokens_per_s({**base, "device": "auto"})
    floor = sum(passes) / len(passes)
    for row in rows:
        row["floor_tokens_per_s"], row["floor_passes"] = floor, passes
        tps = row["tokens_per_s_per_gpu"]
        row["tokens_per_s_over_floor"] = tps / floor if tps else None
    payload = {
        "shape": args.shape,
        "model": facts,
        "run_config": base,
        "rows": rows,
        "gpu": environment().get("gpu"),
    }
    write_result(args.name or f"gpu_sim-{args.label}-{args.shape}", payload, out)
    with figure(out / f"gpu_sim-{args.label}-{args.shape}.png", 1, 3, figsize=(15, 4)) as (_, ax):
        labels = [r["config"] for r in rows]
        ax[0].bar(labels, [r["round_over_critical_path"] or 0 for r in rows])
        ax[0].axhline(1.25, color="red", linestyle="--", label="goal 1.25")
        ax[0].set_title("steady round / clients' critical path")
        ax[1].bar(labels, [r["gpu_util_mean"] or 0 for r in rows])
        ax[1].axhline(0.7, color="red", linestyle="--", label="goal 0.7")
        ax[1].set_title("mean GPU utilisation")
        width = 0.4
        spots = range(len(rows))
        for shift, name in ((-width / 2, "clients"), (width / 2, "server")):
            peaks = [r["host_pss"][name]["peak_over_master"] or 0 for r in rows]
            ax[2].bar([i + shift for i in spots], peaks, width, label=f"{name} (peak)")
        ax[2].set_xticks(list(spots), labels)
        ax[2].axhline(1.3, color="red", linestyle="--", label="goal 1.3")
        ax[2].set_title("host PSS / one float32 master")
        for a in ax:
            a.legend()


if __name__ == "__main__":
    main()
