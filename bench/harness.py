"""What every benchmark shares: JSON results with the machine beside them, the command line
(subcommands with `--set KEY=VALUE`, `--out`, `--name`, `--tiny`), timing and ratios,
memory samplers, plots, and one run of the app in a child process with a time limit."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
MIB = 2**20
# Model shapes written out (their config.json on the hub), so nothing is downloaded.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SHAPE_KEYS += ("num_key_value_heads",)
QWEN25_05B: dict[str, Any] = dict(zip(SHAPE_KEYS, (896, 4864, 24, 14, 2), strict=True))
QWEN25_05B |= {"vocab_size": 151936, "tie_word_embeddings": True}
LLAMA2_7B: dict[str, Any] = dict(zip(SHAPE_KEYS, (4096, 11008, 32, 32, 32), strict=True))
TINY_SHAPE: dict[str, Any] = dict(zip(SHAPE_KEYS, (64, 128, 2, 4, 2), strict=True))
# A throughput run: one IID link, nothing evaluated or exported: rounds time training only.
THROUGHPUT_RUN: dict[str, Any] = {"partitioner": "iid", "num-links": 1, "max-eval-blocks": 8}
THROUGHPUT_RUN |= {"fraction-evaluate": 0.0, "central-eval": False, "export": False}
# The smallest app run (the `--tiny` mode of the app-running benchmarks): one local step.
TINY_RUN: dict[str, Any] = {"num-links": 1, "rounds-per-link": 2, "local-steps": 1, "rank": 4}
TINY_RUN |= {"alpha": 8.0, "seq-len": 32, "max-train-blocks": 8, "max-eval-blocks": 8}


def git_commit() -> str:
    """HEAD's short hash, "+changes" when tracked files differ (a copied working tree)."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, check=True)  # noqa: E731
        changed = "+changes" if run("status", "-s", "-uno").stdout.strip() else ""
        return run("rev-parse", "--short", "HEAD").stdout.decode().strip() + changed
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SEEDLORA_COMMIT", "unknown")


def environment() -> dict[str, Any]:
    """Machine and software facts stored beside every measurement."""
    import torch

    info = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    info |= {"commit": git_commit(), "python": sys.version.split()[0], "torch": torch.__version__}
    info |= {"platform": platform.platform(), "cpu": platform.processor() or platform.machine()}
    info |= {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for package in ("transformers", "peft", "flwr"):
        with contextlib.suppress(ImportError):
            info[package] = __import__(package).__version__
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return info


def write_result(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """`payload` plus the environment into `<directory>/<name>.json`, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / f"{name}.json", directory / f"{name}.json.tmp"
    tmp.write_text(json.dumps({"environment": environment(), **payload}, indent=1, default=str))
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)
    return path


def cli(doc: str | None) -> tuple[argparse.ArgumentParser, Any]:
    """A script's parser and its subcommand group (`command` adds to it)."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    return ap, ap.add_subparsers(dest="command", required=True)


def command(
    subs: Any, name: str, run: Callable, stem: str, doc: str = ""
) -> argparse.ArgumentParser:
    """A subcommand running `run(args)`, with the shared options: `--set KEY=VALUE` (run
    config), `--out DIR`, `--name STEM` (result file stem, default `stem`), `--tiny`."""
    p = subs.add_parser(name, help=(doc or run.__doc__ or "").strip().splitlines()[0])
    p.set_defaults(run=run)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and PNG")
    p.add_argument("--name", default=stem, help="result file stem")
    p.add_argument("--tiny", action="store_true", help="smallest sizes on the CPU (the tests)")
    return p


def main_of(ap: argparse.ArgumentParser) -> Callable[[Sequence[str] | None], Any]:
    """`main(argv)`: parse and run the chosen subcommand; returns what it returns."""
    return lambda argv=None: (args := ap.parse_args(argv)).run(args)


def with_sets(base: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`base` with the command line's `--set` values over it."""
    from simulation.sweep import parse_sets

    return {**base, **parse_sets(args.set)}


def tiny_assets(directory: Path) -> dict[str, str]:
    """A tiny GPT-2 and a small text dataset saved under `directory`: `model-name`, `dataset`."""
    from testing.tiny import save_text_dataset, save_tiny_lm

    model = directory / "tiny-lm"
    if not (model / "config.json").exists():
        save_tiny_lm(model)
    data = save_text_dataset(directory / "tiny-text", min_rows=80, chunk=1500)
    return {"model-name": str(model), "dataset": str(data)}


def ints(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s]


def seeds(text: str) -> list[int]:
    """`3` -> [0, 1, 2]; `4,7` -> [4, 7]."""
    return ints(text) if "," in text else list(range(int(text)))


def pick(ns: Any, *names: str) -> dict[str, Any]:
    """The named attributes of `ns` (options to store beside a result)."""
    return {n.replace("-", "_"): getattr(ns, n.replace("-", "_")) for n in names}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def steady(rounds: Sequence[dict]) -> list[float]:
    """Wall times of the rounds after each link's first (no build, no tokenizing)."""
    return [r["wall_time"] for r in rounds if r.get("round_in_link", 1) >= 2 and "wall_time" in r]


def read_rounds(run_dir: Path) -> list[dict]:
    """The rounds a run has written so far (rounds.jsonl if present, else metrics.json)."""
    lines = run_dir / "rounds.jsonl"
    if lines.exists():
        return [json.loads(x) for x in lines.read_text().splitlines() if x.strip()]
    try:
        return json.loads((run_dir / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Least wall seconds of `repeats` calls of `fn` (the least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class Sampler(threading.Thread):
    """`sample()` every `period` s in the background until `stop` is set: (time, value)."""

    def __init__(self, sample: Callable[[], Any], period: float = 1.0):
        super().__init__(daemon=True)
        self.sample, self.period, self.samples, self.stop = sample, period, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            if (value := self.sample()) is not None:
                self.samples.append((time.time(), value))


def host_memory(pid: int, role: Callable[[str], str]) -> dict[str, list[int]] | None:
    """PSS of `pid` and its descendants (a page shared by k processes counts 1/k in each, so
    a sum counts it once; /proc, Linux; else RSS) by `role(cmdline)`: {role: [bytes, count]}."""
    import psutil

    out: dict[str, list[int]] = {}
    with contextlib.suppress(psutil.Error):
        top = psutil.Process(pid)
        for proc in [top, *top.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                size = proc.memory_info().rss
                with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/smaps_rollup") as f:
                    size = next((int(x.split()[1]) * 1024 for x in f if x[:4] == "Pss:"), size)
                entry = out.setdefault(role(" ".join(proc.cmdline())), [0, 0])
                entry[0], entry[1] = entry[0] + size, entry[1] + 1
    return out or None


@contextlib.contextmanager
def figure(path: Path, *args: Any, dpi: int = 120, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(*args, **kwargs)` drawn into, then saved to `path` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        print(f"wrote {path}")
    finally:
        plt.close(fig)


def plot(path: Path, title: str, series: Mapping[str, Any], labels: Sequence[str] = (), **kw: Any):
    """Grouped bars (`labels`: one value per label in each series) or, without labels,
    curves (each series (xs, ys)); `line`: a dashed goal; other `kw` to `Axes.set`."""
    line, width = kw.pop("line", None), 0.8 / max(1, len(series))
    with figure(path, figsize=(max(7, 0.9 * len(labels) * len(series)), 4.5)) as (_, ax):
        for j, (name, values) in enumerate(series.items()):
            if labels:
                ax.bar([i + j * width for i in range(len(labels))], values, width, label=name)
            else:
                ax.plot(*values, "o-", ms=3, label=name)
        if labels:
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
        if line is not None:
            ax.axhline(line, color="k", linestyle="--", linewidth=1)
        ax.set(title=title, **kw)
        ax.legend(fontsize=7)


def run_child(
    spec: dict[str, Any], workdir: Path, timeout_s: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One run of the app in a child process, stopped with all it started after `timeout_s`
    (cold caches, its own memory). spec: `mode` ("ray": simulate, else run_local),
    `overrides`, `nodes`; optional `threads`, `num_cpus`, `num_gpus`, `init_args`, `probe`,
    `cache_dir` (the clients' link cache).
    Returns `completed`, `process_wall_s` and the child's `metrics` and times, or `why`."""
    from runtime.processes import run, tail

    tag = spec["overrides"]["run-name"]
    spec_path, result, log = (workdir / f"{tag}.{x}" for x in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    began = time.perf_counter()
    cmd = [sys.executable, "-m", "bench.harness", str(spec_path)]
    code = run(cmd, log, timeout_s=timeout_s, env={**os.environ, **(env or {})}, cwd=REPO)
    row: dict[str, Any] = {"process_wall_s": time.perf_counter() - began}
    if code == 0 and result.exists():
        return {**row, "completed": True, **json.loads(result.read_text())}
    why = f"stopped after the {timeout_s:.0f}s limit" if code is None else f"exit code {code}"
    return {**row, "completed": False, "why": why, "log_tail": tail(log)}


def _child(spec_path: str) -> None:
    """The child side of `run_child`."""
    import torch

    from client.compose import build_client_app
    from simulation.inprocess import simulate
    from simulation.local import run_local
    from testing.probe import TimedGrid, probed_client_app

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    ov, nodes, probe = spec["overrides"], spec["nodes"], spec.get("probe")
    app, wrap = build_client_app(ov, spec.get("cache_dir")), None
    if probe:
        app = probed_client_app(app, probe)
        wrap = lambda grid: TimedGrid(grid, probe)  # noqa: E731
    start, began = time.time(), time.perf_counter()
    if spec["mode"] == "ray":
        cpus, gpus = spec.get("num_cpus", 1.0), spec.get("num_gpus", 0.0)
        init = spec.get("init_args")
        doc = simulate(ov, nodes, cpus, gpus, init_args=init, client_app=app, wrap_grid=wrap)
    else:
        doc = run_local(ov, nodes, client_app=app, wrap_grid=wrap).metrics
    result = dict(start=start, end=time.time(), run_wall_s=time.perf_counter() - began, metrics=doc)
    result["torch_threads"] = torch.get_num_threads()
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1])
