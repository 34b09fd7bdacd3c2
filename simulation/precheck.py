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
   point to (model folder, target layers, the rank they allow, data columns:
   `contract.preflight.check_run`), the client count against the split's natural ids
   (`check_nodes`), and the run folder (`server.rundir.check`: a fresh run in a folder
   holding a checkpoint, `resume` without one, a folder another run holds).
4. For the launcher, which knows where its processes run (`Placement`): `server-device`
   against the GPUs this machine shows, and `device`, `step-mode = "graphed"`,
   `quantization` and `base-kernels = "liger"` against the GPUs each ClientApp will see.
   `graphed` without a GPU is refused rather than run as `grouped` in silence. Being
   cheap, these come right after the values are read.

The ServerApp repeats 3 (it may be started by `flwr run` without this launcher).

GPUs are counted without importing torch (1.8 s on a 2-core machine, more than the whole
check), by the rule of `visible_gpus` and `Placement.of_launcher`.

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
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.config import unknown_key

if TYPE_CHECKING:
    from contract.config import RunConfig

# What `flwr run --run-config` accepts (flwr.common.config.parse_config_args).
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
THIS_APP = ("seedlora", "server.app:app")  # publisher, serverapp component
DEV = Path("/dev")  # where the NVIDIA driver's device nodes are: nvidia0, nvidia1, ...


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


def _env_true(name: str) -> bool:
    """Ray's reading of a boolean variable (ray_constants.env_bool)."""
    return os.environ.get(name, "").lower() in ("1", "true")


def visible_gpus() -> int:
    """How many CUDA devices a process started from here sees, without importing torch.

    The rule: the device nodes `/dev/nvidia0`, `/dev/nvidia1`, ... (a container shows only
    the GPUs it was given); when CUDA_VISIBLE_DEVICES is set, its entries in order up to
    the first that names no device, as CUDA reads it: an index below the node count, or a
    `GPU-`/`MIG-` UUID (taken as valid). So "" and "-1" hide every GPU."""
    nodes = sum(1 for p in DEV.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None or nodes == 0:
        return nodes
    seen = 0
    for entry in (e.strip() for e in listed.split(",")):
        if not ((entry.isdigit() and int(entry) < nodes) or entry.startswith(("GPU-", "MIG-"))):
            break
        seen += 1
    return seen


# Ray leaves an actor's CUDA_VISIBLE_DEVICES alone under the first; under the second only
# for actors that ask for no GPU (its default overrides that variable to "" for them).
RAY_NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
RAY_OVERRIDE_ON_ZERO = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


@dataclass(frozen=True)
class Placement:
    """The GPUs the launcher's ServerApp (`server`) and each of its ClientApps (`client`,
    None when unknown) see; `why` says how the client count came about."""

    server: int
    client: int | None
    why: str

    @classmethod
    def of_launcher(cls, num_gpus: float, ray_address: str | None = None) -> Placement:
        """The ServerApp runs on this machine (`visible_gpus`). Ray 2.55 sets each client
        actor's CUDA_VISIBLE_DEVICES to the ceil(num-gpus) GPUs it assigned (cuda:0 first),
        to "" for `--num-gpus 0`; RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (any
        num-gpus) or RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 (num-gpus 0) keep the launcher's.
        A private Ray places clients on this machine only, so more GPUs per client than it
        shows is refused here (Ray would fail with "ActorPool is empty"); a cluster
        (`ray_address`) places them on its own machines."""
        here, share = visible_gpus(), math.ceil(num_gpus)
        if not ray_address and share > here:
            raise PrecheckError(
                f"--num-gpus: {num_gpus:g} GPU(s) per client, but this machine shows {here} "
                "(/dev/nvidia*, CUDA_VISIBLE_DEVICES) and the launcher's Ray places clients "
                "here; pass --num-gpus 0"
            )
        zero_kept = os.environ.get(RAY_OVERRIDE_ON_ZERO, "").lower() in ("0", "false")
        if _env_true(RAY_NOSET) or (share == 0 and zero_kept):
            kept = "Ray keeps the launcher's CUDA_VISIBLE_DEVICES"
            return cls(here, None if ray_address else here, kept)
        if share == 0:
            why = "Ray hides the GPUs from a client that asks for none: pass --num-gpus 1 or 1/k"
            return cls(here, 0, "this machine shows none" if here == 0 else why)
        return cls(here, share, f"--num-gpus {num_gpus:g}: Ray assigns each client {share}")


def check_placement(cfg: RunConfig, where: Placement) -> None:
    """Step 4 of the module docstring: what only the launcher, which starts the ServerApp
    and the clients, can check."""
    server = cfg.output.server_device
    if _wanted(server) > where.server:
        raise PrecheckError(
            f"run-config key 'server-device': {server!r} needs {_wanted(server)} visible CUDA "
            f"device(s), but this machine shows {where.server} GPU(s) (/dev/nvidia*, "
            'CUDA_VISIBLE_DEVICES); set server-device="auto" or "cpu"'
        )
    t = cfg.train
    client_needs = (  # key, value, GPUs it needs in each client, what for, the fix
        ("device", t.device, _wanted(t.device), "", 'device="auto" or "cpu"'),
        ("step-mode", t.step_mode, t.step_mode == "graphed", " to capture CUDA graphs",
         'step-mode="grouped" (what runs without a GPU)'),
        ("quantization", t.quantization, t.quantization != "none", " for bitsandbytes",
         'quantization="none"'),
        ("base-kernels", t.base_kernels, t.base_kernels == "liger", " for Triton kernels",
         'base-kernels="torch"'),
    )  # fmt: skip
    for key, value, count, what, fix in client_needs:
        if where.client is not None and int(count) > where.client:
            raise PrecheckError(
                f"run-config key '{key}': {value!r} needs {int(count)} CUDA device(s){what}, "
                f"but each of the launcher's clients sees {where.client} GPU(s) ({where.why}); "
                f"set {fix}"
            )
    if t.base_kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise PrecheckError(
            "run-config key 'base-kernels': 'liger' needs liger-kernel, which is not "
            "installed: pip install -c constraints.txt -e '.[liger]'"
        )


def _wanted(device: str) -> int:
    """How many visible CUDA devices `device` needs: cuda:N needs N + 1, cuda 1, else 0."""
    if device.startswith("cuda:"):
        return int(device[5:]) + 1
    return int(device == "cuda")


def check_this_app(
    run_config: Mapping[str, Any], num_supernodes: int | None, where: Placement | None = None
) -> RunConfig:
    """Steps 3 and 4 of the module docstring (4 when `where` is known); the checked config."""
    from contract.config import RunConfig, RunConfigError
    from contract.preflight import check_nodes, check_run
    from server import rundir

    try:
        cfg = RunConfig.from_flower(run_config)
        if where is not None:  # cheap, so first
            check_placement(cfg, where)
        check_run(cfg)
        if num_supernodes is not None:
            check_nodes(cfg, num_supernodes, "--num-supernodes")
        rundir.check(cfg)
    except RunConfigError as err:
        raise PrecheckError(str(err)) from None
    return cfg


def check(
    app_dir: Path,
    run_config: Sequence[str] | None,
    num_supernodes: int | None,
    where: Placement | None = None,
) -> RunConfig | None:
    """Everything above, for `app_dir` with these `--run-config` strings; this project's
    checked config, None for another app."""
    project = app_project(app_dir)
    fused = fused_config(project, parse_overrides(run_config))
    if is_this_app(project):
        return check_this_app(fused, num_supernodes, where)
    return None


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
