"""What every benchmark shares: the record of machine, versions, date and commit beside each
result, its command line (`--set KEY=VALUE` run-config overrides, `--out`, `--name`), plots,
and one run of the app in a child process with a time limit (`run_child`)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
# Qwen2.5-0.5B's shape (its config.json on the hub), written out so nothing is downloaded.
QWEN25_05B: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
# A throughput run: one link on an IID split, nothing evaluated or exported, so the rounds
# time training and aggregation only.
THROUGHPUT_RUN: dict[str, Any] = {
    "partitioner": "iid",
    "num-links": 1,
    "max-eval-blocks": 8,
    "fraction-evaluate": 0.0,
    "central-eval": False,
    "export": False,
}


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def git_commit() -> str:
    """HEAD's short hash, with "+changes" when tracked files differ from it (a copied
    working tree, such as the GPU machine's, can carry an older .git than its files)."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        return commit + ("+changes" if _git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SEEDLORA_COMMIT", "unknown")


def environment() -> dict[str, Any]:
    """Machine and software facts to store beside every measurement."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def write_result(name: str, payload: dict[str, Any], directory: Path = RESULTS) -> Path:
    """Write `payload` plus the environment to `<directory>/<name>.json` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": environment(), **payload}, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """A benchmark's command line: `--set KEY=VALUE` (repeatable) changes the run config of
    every run, `--out DIR` and `--name STEM` place the result."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and PNG")
    ap.add_argument("--name", default=name, help="result file stem")
    return ap


def with_sets(base: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`base` with the command line's `--set` values over it."""
    from simulation.sweep import parse_sets

    return {**base, **parse_sets(args.set)}


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


def run_child(
    spec: dict[str, Any], workdir: Path, timeout_s: float, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One run of the app in a child process (`python -m bench.common SPEC`), stopped with
    all it started after `timeout_s`, so caches start cold, memory is the run's own and a
    run past its limit is recorded as such.

    spec: `mode` ("ray": simulation.inprocess.simulate, else simulation.local.run_local),
    `overrides` (with `run-name`), `nodes`; optional `threads` (torch threads), `num_cpus`,
    `num_gpus`, `init_args` (Ray), `probe` (a testing.probe log of the client calls and
    grid waits), `cache_dir` (the clients' link cache). Returns `completed`,
    `process_wall_s` and the child's result (its wall clock `start`/`end`, `run_wall_s`,
    `torch_threads`, `metrics`) or `why` and `log_tail`."""
    from runtime.processes import run, tail

    tag = spec["overrides"]["run-name"]
    spec_path, result = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    log = workdir / f"{tag}.log"
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    cmd = [sys.executable, "-m", "bench.common", str(spec_path)]
    began = time.perf_counter()
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
    client_app, wrap = build_client_app(ov, spec.get("cache_dir")), None
    if probe:
        client_app = probed_client_app(client_app, probe)
        wrap = lambda grid: TimedGrid(grid, probe)  # noqa: E731
    start, began = time.time(), time.perf_counter()
    if spec["mode"] == "ray":
        cpus, gpus = spec.get("num_cpus", 1.0), spec.get("num_gpus", 0.0)
        init = spec.get("init_args")
        doc = simulate(ov, nodes, cpus, gpus, init_args=init, client_app=client_app, wrap_grid=wrap)
    else:
        doc = run_local(ov, nodes, client_app=client_app, wrap_grid=wrap).metrics
    result = {
        "start": start,
        "end": time.time(),
        "run_wall_s": time.perf_counter() - began,
        "torch_threads": torch.get_num_threads(),
        "metrics": doc,
    }
    Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1])
