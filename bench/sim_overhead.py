"""What Ray simulation costs over running the same clients in one process, and how it scales.

`python -m bench.sim_overhead` measures two things with a tiny GPT-2 (tests.conftest) on a
small local text dataset, so the numbers are about the harness and not the model:

(a) overhead: the same clients, rounds and local steps through `simulation.inprocess.simulate`
    (flwr `run_simulation`, Ray backend) and through `tests.local_grid.LocalGrid` (the same
    ServerApp/ClientApp code, clients called in sequence in one process). LocalGrid is the
    plain baseline rather than a bare `client.local.train` loop because it does all the app's
    own per-client work too (link cache, model preparation, replies, checks), so the ratio is
    what the Ray transport adds and nothing else. Round time is the per-round `wall_time` of
    metrics.json for rounds >= 2 (round 1 also tokenizes every client's data and, under Ray,
    starts the actors). Start-up is reported twice: `startup_and_teardown_s`, the run's wall
    time outside its rounds, and `one_time_s`, that plus round 1's excess over a steady round
    (under Ray most of the start-up, the actors' imports, lands inside round 1). Ray starts
    its workers at nice 15 (Ray's `worker_niceness`), so on a shared CPU they yield to every
    other job; Ray runs both as shipped and with RAY_worker_niceness=0 (the plain process's
    priority), and the plain run both with 1 torch thread and torch's default (oversubscribed
    threads are slow on a loaded CPU); ratios are against the faster plain run.
(b) scale: 10, 100, 1000 virtual clients under Ray, at most ~100 training per round, with the
    round time and the peak summed RSS of this process and all its children (Ray workers at
    nice `scale_ray_niceness`, default 0).

Every run is a child process (`--worker`) so that caches start cold for both harnesses, memory
is that run's own, and a run past its time limit is stopped and recorded as not completed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import RESULTS, one_link_overrides, write_result

NAME = "sim_overhead"
REPO = Path(__file__).resolve().parents[1]
# stdlib modules whose source makes the text dataset (as the tiny_text_dir fixture does).
SOURCE_MODULES = (
    "json", "inspect", "os", "argparse", "typing", "collections", "dataclasses", "pathlib",
    "logging", "subprocess", "threading", "tarfile", "zipfile", "difflib", "pydoc", "doctest",
    "ast", "email.message", "http.client", "urllib.request", "unittest.case", "shutil",
    "tempfile", "textwrap", "string", "functools", "enum", "socket", "ssl", "smtplib",
)  # fmt: skip


@dataclass
class Options:
    """Sizes of both parts; the defaults are what the report ran."""

    clients: int = 8
    rounds: int = 3  # rounds 2.. are the steady-state round times
    local_steps: int = 3
    sizes: list[int] = field(default_factory=lambda: [10, 100, 1000])
    max_train_per_round: int = 100  # fraction-train = min(1, this / size)
    scale_rounds: int = 2
    large_rounds: int = 2  # rounds for sizes above max_train_per_round (1 if too slow)
    scale_local_steps: int = 1
    num_cpus: float = 1.0  # Ray resources per virtual client
    seq_len: int = 32
    max_train_blocks: int = 16
    rank: int = 4
    timeout_s: float = 600.0  # per run; a run past it is stopped and recorded as such
    threads: int = 0  # torch threads of the "plain" run (another runs with 1); 0 = default
    scale_ray_niceness: int = 0  # Ray worker nice value in the scale runs; -1 = Ray's (15)
    variants: list[str] = field(
        default_factory=lambda: ["plain-1-thread", "plain", "ray", "ray-nice0"]
    )  # overhead runs to make
    skip_overhead: bool = False
    skip_scale: bool = False


def make_text_dataset(directory: Path, min_rows: int, chunk: int = 500) -> Path:
    """A save_to_disk text dataset of stdlib source chunks (`chunk` characters each)."""
    import importlib

    import datasets

    texts: list[str] = []
    sources = [inspect.getsource(importlib.import_module(m)) for m in SOURCE_MODULES]
    offset = 0
    while len(texts) < min_rows:  # shift the cut points if more rows are needed
        for source in sources:
            texts += [source[i : i + chunk] for i in range(offset, len(source) - chunk, chunk)]
        offset += chunk // 3 + 1
    datasets.Dataset.from_dict({"text": texts[: max(min_rows, 2)]}).save_to_disk(str(directory))
    return directory


def make_assets(directory: Path, min_rows: int) -> tuple[str, str]:
    """(tiny model dir, text dataset dir) under `directory`."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import save_tiny_lm

    model = directory / "tiny-lm"
    if not (model / "config.json").exists():
        save_tiny_lm(model)
    data = make_text_dataset(directory / f"text-{min_rows}", min_rows)
    return str(model), str(data)


def overrides_for(
    model: str, data: str, out: Path, name: str, *, rounds: int, local_steps: int, **extra: Any
) -> dict[str, Any]:
    """The run config of one benchmark run: tiny model, IID split, no evaluation, no export."""
    keys = {
        "seq-len": extra.pop("seq_len", 32),
        "max-train-blocks": extra.pop("max_train_blocks", 16),
        "rank": extra.pop("rank", 4),
        "alpha": 8.0,
        "device": "cpu",
        **extra,
    }
    return one_link_overrides(model, data, out, name, rounds, local_steps, **keys)


class PeakRSS:
    """Samples the summed RSS of this process and its descendants in a background thread.

    RSS counts pages shared between processes (libraries, Ray's object store) once per
    process, so the sum is an upper bound of the memory actually in use."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.samples = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak, self.samples = max(self.peak, total), self.samples + 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop a worker this benchmark started and every process it started (Ray included)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [psutil.Process(proc.pid), *family]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    proc.wait()


def launch(spec: dict, workdir: Path, timeout_s: float) -> dict:
    """Run one `--worker` child; returns its result plus peak RSS, or why it did not finish."""
    tag = spec["overrides"]["run-name"]
    spec_path, result_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    log_path = workdir / f"{tag}.log"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    cmd = [sys.executable, "-m", "bench.sim_overhead", "--worker", str(spec_path)]
    start = time.perf_counter()
    with PeakRSS() as mem, log_path.open("w") as log:
        env = {**os.environ, **spec.get("env", {})}
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            code = None
    out: dict[str, Any] = {
        "harness": spec["mode"],
        "env": spec.get("env", {}),
        "nodes": spec["nodes"],
        "process_wall_s": time.perf_counter() - start,
        "peak_rss_mb": mem.peak / 2**20,
        "rss_samples": mem.samples,
    }
    if code == 0 and result_path.exists():
        result = json.loads(result_path.read_text())
        steady, first = result["steady_round_s"], result["first_round_s"]
        # One-time cost: what is not a steady round (Ray start, actor imports, first data).
        result["one_time_s"] = result["startup_and_teardown_s"] + (
            first - steady if steady is not None else 0.0
        )
        return {**out, "completed": True, **result}
    tail = log_path.read_text(errors="replace")[-1500:]
    why = f"stopped after the {timeout_s:.0f}s limit" if code is None else f"exit code {code}"
    return {**out, "completed": False, "why": why, "log_tail": tail}


def worker(spec_path: str) -> None:
    """The child side: one run through Ray (`simulate`) or LocalGrid; writes a result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from client.app import build_client_app
    from contract.config import RunConfig
    from server.chain_server import ChainServer
    from simulation.inprocess import simulate
    from tests.local_grid import RUN_ID, LocalGrid

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    overrides, nodes = spec["overrides"], spec["nodes"]
    start = time.perf_counter()
    if spec["mode"] == "ray":
        doc = simulate(overrides, num_supernodes=nodes, num_cpus=spec["num_cpus"])
    else:
        out = Path(overrides["output-dir"]) / overrides["run-name"]
        grid = LocalGrid(build_client_app(overrides), nodes)
        ChainServer(RunConfig.from_flower(overrides), RUN_ID, out).run(grid)
        doc = json.loads((out / "metrics.json").read_text())
    total = time.perf_counter() - start
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    times = [r["wall_time"] for r in rounds]
    steady = times[1:]
    result = {
        "run_wall_s": total,
        "round_times_s": times,
        "first_round_s": times[0] if times else None,
        "steady_round_s": statistics.fmean(steady) if steady else None,
        "startup_and_teardown_s": total - sum(times),
        # Ray actors get OMP_NUM_THREADS from num_cpus; this process does not train there.
        "torch_threads": torch.get_num_threads() if spec["mode"] == "local" else None,
        "accepted_per_round": [r["accepted"] for r in rounds],
        "sent_per_round": [r["sent"] for r in rounds],
        "skipped_rounds": sum(bool(r["skipped"]) for r in rounds),
        "train_loss": [r["train_loss"] for r in rounds],
        "bytes_up_per_round": [r["bytes_up"] for r in rounds],
    }
    Path(spec["result"]).write_text(json.dumps(result))


def overhead(opts: Options, model: str, data: str, workdir: Path) -> dict:
    """Part (a): the same run through LocalGrid (1 and default torch threads) and through Ray
    (workers at Ray's default nice 15, and at nice 0 like the plain process)."""
    variants = {
        "plain-1-thread": {"mode": "local", "threads": 1},
        "plain": {"mode": "local", "threads": opts.threads},
        "ray": {"mode": "ray"},
        "ray-nice0": {"mode": "ray", "env": {"RAY_worker_niceness": "0"}},
    }
    runs = {}
    for name, variant in variants.items():
        if name not in opts.variants:
            continue
        ov = overrides_for(
            model,
            data,
            workdir / "runs",
            f"overhead-{name}",
            rounds=opts.rounds,
            local_steps=opts.local_steps,
            seq_len=opts.seq_len,
            max_train_blocks=opts.max_train_blocks,
            rank=opts.rank,
        )
        spec = {"overrides": ov, "nodes": opts.clients, "num_cpus": opts.num_cpus, **variant}
        print(f"overhead: {name}, {opts.clients} clients, {opts.rounds} rounds", flush=True)
        runs[name] = launch(spec, workdir, opts.timeout_s)
        print(f"    {_short(runs[name])}", flush=True)
    plain = [runs[k]["steady_round_s"] for k in runs if k.startswith("plain")]
    best_plain = min((t for t in plain if t), default=None)
    ratios = {
        k: runs[k]["steady_round_s"] / best_plain
        for k in ("ray", "ray-nice0")
        if best_plain and k in runs and runs[k].get("steady_round_s")
    }
    return {
        "plain_harness": "tests.local_grid.LocalGrid (same app code, clients in sequence)",
        "ray_harness": "simulation.inprocess.simulate (flwr run_simulation, Ray backend)",
        "clients": opts.clients,
        "rounds": opts.rounds,
        "local_steps": opts.local_steps,
        "ray_client_resources": {"num_cpus": opts.num_cpus, "num_gpus": 0},
        "runs": runs,
        "best_plain_steady_round_s": best_plain,
        "steady_round_ratio_over_best_plain": ratios,
        "goal_ratio_max": 1.3,
        "goal_met": {k: v <= 1.3 for k, v in ratios.items()},
    }


def scale(opts: Options, model: str, workdir: Path) -> list[dict]:
    """Part (b): round time and peak memory for each number of virtual clients."""
    rows = []
    data = make_text_dataset(workdir / "scale-text", min_rows=max(200, 4 * max(opts.sizes)))
    for size in opts.sizes:
        fraction = min(1.0, opts.max_train_per_round / size)
        rounds = opts.scale_rounds if size <= opts.max_train_per_round else opts.large_rounds
        ov = overrides_for(
            model,
            str(data),
            workdir / "runs",
            f"scale-{size}",
            rounds=rounds,
            local_steps=opts.scale_local_steps,
            seq_len=opts.seq_len,
            max_train_blocks=opts.max_train_blocks,
            rank=opts.rank,
            **{"fraction-train": fraction, "round-timeout": opts.timeout_s},
        )
        spec = {"mode": "ray", "overrides": ov, "nodes": size, "num_cpus": opts.num_cpus}
        if opts.scale_ray_niceness >= 0:
            spec["env"] = {"RAY_worker_niceness": str(opts.scale_ray_niceness)}
        print(f"scale: {size} clients, fraction-train {fraction:g}, {rounds} round(s)", flush=True)
        row = {"size": size, "fraction_train": fraction, "rounds": rounds}
        row |= launch(spec, workdir, opts.timeout_s)
        times = row.get("round_times_s") or []
        trained = (row.get("accepted_per_round") or [0])[-1]
        row["round_s_reported"] = row.get("steady_round_s") or (times[0] if times else None)
        row["round_s_kind"] = "mean of rounds >= 2" if row.get("steady_round_s") else "round 1"
        row["clients_trained_per_round"] = trained
        row["goal_100_per_round_under_60s"] = (
            bool(row["round_s_reported"] < 60.0) if trained >= 100 and times else None
        )
        print(f"    {_short(row)}", flush=True)
        rows.append(row)
    return rows


def _short(r: dict) -> str:
    if not r.get("completed"):
        return f"NOT COMPLETED: {r.get('why')}"
    return (
        f"rounds {[round(t, 2) for t in r['round_times_s']]} s | start-up+teardown "
        f"{r['startup_and_teardown_s']:.1f} s | one-time {r['one_time_s']:.1f} s | "
        f"peak RSS {r['peak_rss_mb']:.0f} MB"
    )


def plot(payload: dict, path: Path) -> Path:
    """Left: round time and start-up, Ray vs plain. Right: round time and memory vs size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ov = payload.get("overhead")
    if ov:
        labels = ["round 1", "rounds >= 2 (mean)", "one-time (start-up)"]
        keys = ["first_round_s", "steady_round_s", "one_time_s"]
        width = 0.8 / len(ov["runs"])
        for i, (name, run) in enumerate(ov["runs"].items()):
            values = [run.get(k) or 0.0 for k in keys]
            left.bar([j + width * i for j in range(len(keys))], values, width=width, label=name)
        left.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], labels)
        left.set_yscale("log")
        ratios = ", ".join(
            f"{k} {v:.2f}x" for k, v in ov["steady_round_ratio_over_best_plain"].items()
        )
        left.set_title(f"{ov['clients']} clients; round vs best plain: {ratios}", fontsize=9)
        left.set_ylabel("seconds (log)")
        left.legend(fontsize=8)
    rows = [r for r in payload.get("scale", []) if r.get("completed")]
    if rows:
        sizes = [r["size"] for r in rows]
        right.plot(sizes, [r["round_s_reported"] for r in rows], "o-", color="C0")
        right.set_xscale("log")
        right.set_xlabel("virtual clients (at most ~100 train per round)")
        right.set_ylabel("round time, s", color="C0")
        twin = right.twinx()
        twin.plot(sizes, [r["peak_rss_mb"] for r in rows], "s--", color="C3")
        twin.set_ylabel("peak summed RSS, MB", color="C3")
        twin.set_ylim(0, 1.15 * max(r["peak_rss_mb"] for r in rows))
        right.set_ylim(0, 1.15 * max(60.0, *(r["round_s_reported"] for r in rows)))
        for r in rows:
            right.annotate(
                f"{r['clients_trained_per_round']} train",
                (r["size"], r["round_s_reported"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
            )
        right.axhline(60, color="grey", linestyle=":", linewidth=1)
        right.set_title("Ray simulation scale (dotted: 60 s)")
    missed = [str(r["size"]) for r in payload.get("scale", []) if not r.get("completed")]
    if missed:
        right.text(0.02, 0.95, "not completed: " + ", ".join(missed), transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_benchmark(opts: Options, directory: Path = RESULTS, name: str = NAME) -> dict:
    """Both parts; writes `<name>.json` (after each part) and `<name>.png`."""
    payload: dict[str, Any] = {"benchmark": NAME, "options": asdict(opts)}
    payload["load_average_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        workdir = Path(tmp)
        model, data = make_assets(workdir, min_rows=80)
        if not opts.skip_overhead:
            payload["overhead"] = overhead(opts, model, data, workdir)
            write_result(name, payload, directory)
        if not opts.skip_scale:
            payload["scale"] = scale(opts, model, workdir)
    payload["load_average_at_end"] = os.getloadavg()
    write_result(name, payload, directory)
    plot(payload, directory / f"{name}.png")
    return payload


def parse(argv: Sequence[str] | None = None) -> tuple[Options, argparse.Namespace]:
    """Options from the command line; `--sizes 10,100` picks the scale sizes."""
    d = Options()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key in (
        "clients", "rounds", "local_steps", "max_train_per_round", "scale_rounds",
        "large_rounds", "scale_local_steps", "seq_len", "max_train_blocks", "rank", "threads",
        "scale_ray_niceness",
    ):  # fmt: skip
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(d, key))
    ap.add_argument("--sizes", default=",".join(map(str, d.sizes)))
    ap.add_argument("--variants", default=",".join(d.variants))
    ap.add_argument("--num-cpus", type=float, default=d.num_cpus)
    ap.add_argument("--timeout-s", type=float, default=d.timeout_s)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    values = {k: getattr(a, k) for k in asdict(d) if k not in ("sizes", "variants")}
    sizes = [int(s) for s in a.sizes.split(",") if s]
    return Options(**values, sizes=sizes, variants=a.variants.split(",")), a


def main(argv: Sequence[str] | None = None) -> int:
    opts, a = parse(argv)
    if a.worker:
        worker(a.worker)
        return 0
    payload = run_benchmark(opts, a.out, a.name)
    if "overhead" in payload:
        print(
            "steady round, Ray / best plain:",
            payload["overhead"]["steady_round_ratio_over_best_plain"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
