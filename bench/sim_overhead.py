"""What Ray simulation costs over running the same clients in one process, and how it scales.

`python -m bench.sim_overhead` measures two things with a tiny GPT-2 (testing.tiny) on a
small local text dataset, so the numbers are about the harness and not the model:

(a) overhead: the same clients, rounds and local steps through `simulation.inprocess.simulate`
    (flwr `run_simulation`, Ray backend) and through `simulation.local.run_local` (the same
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

Every run is a child process (bench.common.run_child) so that caches start cold for both
harnesses, memory is that run's own, and a run past its time limit is stopped and recorded as
not completed. `--set KEY=VALUE` changes the run config of every run (RUN below), `--scale-set`
that of the scale runs only.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.common import THROUGHPUT_RUN, figure, parser, run_child, with_sets, write_result
from simulation.sweep import parse_sets

NAME = "sim_overhead"
# The run config of every run; the rounds >= 2 are the steady-state round times.
RUN: dict[str, Any] = {
    **THROUGHPUT_RUN,
    "rounds-per-link": 3,
    "local-steps": 3,
    "seq-len": 32,
    "max-train-blocks": 16,
    "rank": 4,
    "alpha": 8.0,
    "device": "cpu",
}
SCALE_RUN: dict[str, Any] = {"rounds-per-link": 2, "local-steps": 1}  # over RUN, for (b)
VARIANTS = ("plain-1-thread", "plain", "ray", "ray-nice0")


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


def launch(spec: dict, workdir: Path, timeout_s: float) -> dict:
    """One run in a child process; its round times and peak RSS, or why it did not finish."""
    began = time.perf_counter()
    with PeakRSS() as mem:
        row = run_child(spec, workdir, timeout_s, spec.get("env"))
    out: dict[str, Any] = {
        "harness": spec["mode"],
        "env": spec.get("env", {}),
        "nodes": spec["nodes"],
        "process_wall_s": time.perf_counter() - began,
        "peak_rss_mb": mem.peak / 2**20,
        "rss_samples": mem.samples,
    }
    if not row["completed"]:
        return {**out, "completed": False, "why": row["why"], "log_tail": row["log_tail"]}
    doc, total = row["metrics"], row["run_wall_s"]
    rounds = [r for r in doc["rounds"] if r["round"] > 0]
    times = [r["wall_time"] for r in rounds]
    steady = statistics.fmean(times[1:]) if times[1:] else None
    return {
        **out,
        "completed": True,
        "run_wall_s": total,
        "round_times_s": times,
        "first_round_s": times[0] if times else None,
        "steady_round_s": steady,
        "startup_and_teardown_s": total - sum(times),
        # One-time cost: what is not a steady round (Ray start, actor imports, first data).
        "one_time_s": total - sum(times) + (times[0] - steady if steady is not None else 0.0),
        # Ray actors get OMP_NUM_THREADS from num_cpus; that process does not train there.
        "torch_threads": row["torch_threads"] if spec["mode"] == "local" else None,
        "accepted_per_round": [r["accepted"] for r in rounds],
        "sent_per_round": [r["sent"] for r in rounds],
        "skipped_rounds": sum(bool(r["skipped"]) for r in rounds),
        "train_loss": [r["train_loss"] for r in rounds],
        "bytes_up_per_round": [r["bytes_up"] for r in rounds],
    }


def _spec(args, workdir: Path, name: str, mode: str, nodes: int, run: dict) -> dict:
    ov = {**run, "model-name": args.model, "dataset": args.data}
    ov |= {"output-dir": str(workdir / "runs"), "run-name": name}
    return {"mode": mode, "overrides": ov, "nodes": nodes, "num_cpus": args.num_cpus}


def overhead(args, workdir: Path) -> dict:
    """Part (a): the same run in one process (1 and default torch threads) and through Ray
    (workers at Ray's default nice 15, and at nice 0 like the plain process)."""
    variants = {
        "plain-1-thread": {"mode": "local", "threads": 1},
        "plain": {"mode": "local", "threads": args.threads},
        "ray": {"mode": "ray"},
        "ray-nice0": {"mode": "ray", "env": {"RAY_worker_niceness": "0"}},
    }
    runs = {}
    for name in (v for v in variants if v in args.variants):
        spec = _spec(args, workdir, f"overhead-{name}", "local", args.clients, args.base)
        print(f"overhead: {name}, {args.clients} clients", flush=True)
        runs[name] = launch({**spec, **variants[name]}, workdir, args.timeout_s)
        print(f"    {_short(runs[name])}", flush=True)
    plain = [runs[k]["steady_round_s"] for k in runs if k.startswith("plain")]
    best_plain = min((t for t in plain if t), default=None)
    ratios = {
        k: runs[k]["steady_round_s"] / best_plain
        for k in ("ray", "ray-nice0")
        if best_plain and k in runs and runs[k].get("steady_round_s")
    }
    return {
        "plain_harness": "simulation.local.run_local (same app code, clients in sequence)",
        "ray_harness": "simulation.inprocess.simulate (flwr run_simulation, Ray backend)",
        "clients": args.clients,
        "rounds": args.base["rounds-per-link"],
        "local_steps": args.base["local-steps"],
        "ray_client_resources": {"num_cpus": args.num_cpus, "num_gpus": 0},
        "runs": runs,
        "best_plain_steady_round_s": best_plain,
        "steady_round_ratio_over_best_plain": ratios,
        "goal_ratio_max": 1.3,
        "goal_met": {k: v <= 1.3 for k, v in ratios.items()},
    }


def scale(args, workdir: Path) -> list[dict]:
    """Part (b): round time and peak memory for each number of virtual clients."""
    from testing.tiny import save_text_dataset

    rows = []
    data = save_text_dataset(workdir / "scale-text", min_rows=max(200, 4 * max(args.sizes)))
    for size in args.sizes:
        fraction = min(1.0, args.max_train_per_round / size)
        run = {**args.base, **args.scale_base, "fraction-train": fraction}
        if size > args.max_train_per_round:
            run["rounds-per-link"] = args.large_rounds
        run["round-timeout"] = args.timeout_s
        spec = _spec(args, workdir, f"scale-{size}", "ray", size, run)
        spec["overrides"]["dataset"] = str(data)
        if args.scale_ray_niceness >= 0:
            spec["env"] = {"RAY_worker_niceness": str(args.scale_ray_niceness)}
        rounds = run["rounds-per-link"]
        print(f"scale: {size} clients, fraction-train {fraction:g}, {rounds} round(s)", flush=True)
        row = {"size": size, "fraction_train": fraction, "rounds": rounds}
        row |= launch(spec, workdir, args.timeout_s)
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
    with figure(path, 1, 2, figsize=(11, 4.2)) as (_, (left, right)):
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
    return path


def run_benchmark(args) -> dict:
    """Both parts; writes `<name>.json` (after each part) and `<name>.png`."""
    import tempfile

    from testing.tiny import save_text_dataset, save_tiny_lm

    options = ("clients", "sizes", "max_train_per_round", "large_rounds", "num_cpus")
    options += ("timeout_s", "threads", "scale_ray_niceness", "variants")
    payload: dict[str, Any] = {"benchmark": NAME, "options": {k: vars(args)[k] for k in options}}
    payload |= {"run_config": args.base, "scale_run_config": args.scale_base}
    payload["load_average_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        workdir = Path(tmp)
        args.model = str(save_tiny_lm(workdir / "tiny-lm"))
        args.data = str(save_text_dataset(workdir / "text-80", min_rows=80))
        if not args.skip_overhead:
            payload["overhead"] = overhead(args, workdir)
            write_result(args.name, payload, args.out)
        if not args.skip_scale:
            payload["scale"] = scale(args, workdir)
    payload["load_average_at_end"] = os.getloadavg()
    write_result(args.name, payload, args.out)
    plot(payload, args.out / f"{args.name}.png")
    return payload


def parse(argv: Sequence[str] | None = None):
    """The command line; `--sizes 10,100` picks the scale sizes."""
    ap = parser(__doc__, NAME)
    ap.add_argument("--scale-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--max-train-per-round", type=int, default=100, help="sets fraction-train")
    ap.add_argument("--large-rounds", type=int, default=2, help="rounds above that size")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="Ray resources per client")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of 'plain' (0: torch's)")
    ap.add_argument("--scale-ray-niceness", type=int, default=0, help="-1: Ray's (15)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="overhead runs to make")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    a = ap.parse_args(argv)
    a.sizes, a.variants = [int(s) for s in a.sizes.split(",") if s], a.variants.split(",")
    a.base, a.scale_base = with_sets(RUN, a), {**SCALE_RUN, **parse_sets(a.scale_set)}
    return a


def main(argv: Sequence[str] | None = None) -> int:
    payload = run_benchmark(parse(argv))
    if "overhead" in payload:
        ratios = payload["overhead"]["steady_round_ratio_over_best_plain"]
        print("steady round, Ray / best plain:", ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
