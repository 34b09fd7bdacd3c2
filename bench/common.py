"""What every benchmark result records: machine, versions, date, commit; and writing it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
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


def one_link_overrides(
    model: str, data: str, out: Path, name: str, rounds: int, local_steps: int, **keys: Any
) -> dict[str, Any]:
    """Run config of a throughput run: one link of `rounds` rounds on an IID split, nothing
    evaluated or exported (so the rounds time training and aggregation only); `keys`
    (run-config names) add to or override it."""
    return {
        "model-name": model,
        "dataset": data,
        "partitioner": "iid",
        "output-dir": str(out),
        "run-name": name,
        "num-links": 1,
        "rounds-per-link": rounds,
        "local-steps": local_steps,
        "max-eval-blocks": 8,
        "fraction-evaluate": 0.0,
        "central-eval": False,
        "export": False,
        **keys,
    }
