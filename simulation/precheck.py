"""The launcher's check of a run before anything starts: one line naming the key, exit 2.

Without it every mistake surfaced only inside the ServerApp, after the SuperLink and Ray
had started (1.5-2.5 min on a loaded 2-core machine) and under a long traceback; Flower
itself refuses an unknown key as "[code: 15] Invalid run configuration" and a repeated
one as "invalid format", naming neither. In order, each failing with `PrecheckError`:

1. `--run-config` strings parse the way `flwr run` parses them (`key=value` pairs with
   TOML values, or one `.toml` file); text that is no pair, a value that is no TOML value
   and a key given twice in one string are named. Across several `--run-config` options
   a later value wins, as in Flower.
2. Every key exists in the app's `[tool.flwr.app.config]` (else: the closest key).
3. For this project's app: every value (`contract.config.RunConfig`), what the values
   point to (model folder, target layers, data columns: `contract.preflight.check_run`),
   the client count against the split's natural ids (`check_nodes`), and the run folder
   (`server.rundir.check`: a fresh run in a folder holding a checkpoint, `resume`
   without one, a folder another ServerApp holds).

The ServerApp repeats 3 (it may be started by `flwr run` without this launcher).

For `flwr run` users, the same checks alone (exit 0 and one line "ok", or the one line
naming the key and exit 2)::

    python -m simulation.precheck [--app-dir .] [--run-config 'k=v ...'] [--num-supernodes N]

Flower's SuperLink refuses an unknown key before any app code runs, with no way for the app
to name it (1.42: `fuse_dicts(..., check_keys=True)` in the Control API's start-run), so
this is the place to learn which key, before `flwr run`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contract.config import unknown_key

# What `flwr run --run-config` accepts (flwr.common.config.parse_config_args).
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
THIS_APP = ("seedlora", "server.app:app")  # publisher, serverapp component


class PrecheckError(ValueError):
    """A run that must not start; the message is one line naming the key or flag."""


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _toml_value(key: str, text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        hint = f" (quote a string: {key}='{text}')" if re.fullmatch(r"[\w./:-]+", text) else ""
        raise PrecheckError(
            f"run-config key '{key}': {text} is not a TOML value (a number, true/false or a "
            f"quoted string){hint}"
        ) from None


def parse_overrides(strings: Sequence[str] | None) -> dict[str, Any]:
    """The `--run-config` overrides as `flwr run` reads them, or PrecheckError."""
    strings = [s for s in strings or [] if s]
    if len(strings) == 1 and strings[0].endswith(".toml"):
        path = Path(strings[0]).expanduser()
        try:
            return _flatten(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise PrecheckError(f"--run-config {path}: {err}") from None
    overrides: dict[str, Any] = {}
    for text in strings:
        if text.endswith(".toml"):
            raise PrecheckError("--run-config: a .toml file cannot be combined with key=value")
        seen: set[str] = set()
        end = 0
        for match in PAIR.finditer(text):
            stray = text[end : match.start()].strip()
            if stray:
                raise PrecheckError(f"--run-config: cannot read {stray!r} (expected key=value)")
            end = match.end()
            key, value = match.group(1), match.group(2)
            if key in seen:
                raise PrecheckError(
                    f"run-config key '{key}' is given twice in one --run-config; give it once"
                )
            seen.add(key)
            overrides[key] = _toml_value(key, value)
        stray = text[end:].strip()
        if stray:
            raise PrecheckError(f"--run-config: cannot read {stray!r} (expected key=value)")
    return overrides


def app_project(app_dir: Path) -> dict[str, Any]:
    """The app's pyproject.toml, parsed."""
    try:
        return tomllib.loads((app_dir / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PrecheckError(f"--app-dir {app_dir}: cannot read pyproject.toml ({err})") from None


def fused_config(project: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The app's defaults with the overrides, each key checked to exist (as Flower does)."""
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    defaults = _flatten(app.get("config", {}))
    unknown = [k for k in overrides if k not in defaults]
    if unknown:
        raise PrecheckError("; ".join(unknown_key(k, defaults) for k in unknown))
    return {**defaults, **overrides}


def is_this_app(project: Mapping[str, Any]) -> bool:
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    return (app.get("publisher"), app.get("components", {}).get("serverapp")) == THIS_APP


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to its processes, without importing torch
    (its device nodes, unless CUDA_VISIBLE_DEVICES hides them all)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def check_local_clients(cfg: Any) -> None:
    """What only a run whose clients start on this machine (the launcher's) can check."""
    t = cfg.train
    for key, value, off, what in (
        ("quantization", t.quantization, "none", "bitsandbytes"),
        ("base-kernels", t.base_kernels, "torch", "liger-kernel's Triton kernels"),
    ):
        if value != off and not gpu_visible():
            raise PrecheckError(
                f"run-config key '{key}': {value!r} needs a CUDA GPU ({what}) and this "
                f'machine shows none; set {key}="{off}"'
            )
    if t.base_kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise PrecheckError(
            "run-config key 'base-kernels': 'liger' needs liger-kernel, which is not "
            "installed: pip install -c constraints.txt -e '.[liger]'"
        )


def check_this_app(
    run_config: Mapping[str, Any], num_supernodes: int | None, local: bool = False
) -> None:
    """Step 3 of the module docstring (`local`: the clients will run on this machine)."""
    from contract.config import RunConfig, RunConfigError
    from contract.preflight import check_nodes, check_run
    from server import rundir

    try:
        cfg = RunConfig.from_flower(run_config)
        check_run(cfg)
        if num_supernodes is not None:
            check_nodes(cfg, num_supernodes, "--num-supernodes")
        rundir.check(cfg)
    except RunConfigError as err:
        raise PrecheckError(str(err)) from None
    if local:
        check_local_clients(cfg)


def check(
    app_dir: Path,
    run_config: Sequence[str] | None,
    num_supernodes: int | None,
    local: bool = False,
) -> None:
    """Everything above, for `app_dir` with these `--run-config` strings."""
    project = app_project(app_dir)
    fused = fused_config(project, parse_overrides(run_config))
    if is_this_app(project):
        check_this_app(fused, num_supernodes, local)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.precheck",
        description="Check a run config the way the launcher does, before `flwr run`.",
    )
    parser.add_argument("--app-dir", default=".", help="Flower App directory (default: .)")
    parser.add_argument("--run-config", action="append", metavar="'k=v ...'")
    parser.add_argument("--num-supernodes", type=int, metavar="N")
    args = parser.parse_args(argv)
    try:
        check(Path(args.app_dir), args.run_config, args.num_supernodes)
    except PrecheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
