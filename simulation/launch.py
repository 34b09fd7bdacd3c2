"""Run a Flower App once on a private, throw-away simulation SuperLink.

Usage::

    python -m simulation.launch [--app-dir DIR] [--run-config 'k=v ...']
                                [--num-supernodes N] [--num-cpus X] [--num-gpus Y]
                                [--ray-address auto|HOST:PORT]

Why not plain ``flwr run .``: with the default ``local`` connection Flower 1.42 starts a
*managed* SuperLink that outlives the run (``python -m simulation.local_superlink stop``
ends it), lives in ``~/.flwr`` and ``uv sync``s the app's dependencies into a fresh
environment on every run (for this project a no-op: pyproject.toml's ``[tool.uv]``
excludes every requirement; a bare ``torch`` had pulled GBs of CUDA wheels); it checks no
key before the SuperLink refuses it, and exits 0 when the run failed. This module instead
starts its own ``flower-superlink --simulation --disable-runtime-dependency-installation
--insecure`` on a free 127.0.0.1 port, with ``FLWR_HOME`` in a temporary directory, so the
run uses the installed packages and never touches ``~/.flwr`` or a managed SuperLink. It
streams the run's logs (without Flower's "default simulated SuperNodes changed from 10 to
2" warning and resize hint, which --num-supernodes makes moot), exits non-zero when the run
did not complete, and always stops every process it started.

With ``--ray-address`` the simulation joins a running Ray cluster (``ray start --head`` on
one machine, ``ray start --address=HEAD:PORT`` on the others) instead of starting a private
Ray: Flower 1.42's federation config has no Ray address, but its ``ray.init()`` reads
``RAY_ADDRESS``, which this launcher sets for the SuperLink and so for the simulation below it.

Before it starts anything, the launcher checks the run (simulation/precheck.py): the
`--run-config` syntax, unknown and repeated keys, every value, the model folder, target
layers, the rank they allow and data columns, `--num-supernodes` against the split's
natural ids, the devices against the GPUs its ServerApp and clients will see, and the run
folder, which it then holds locked until the run has ended (server/rundir.py `hold`); a
problem is one line naming the key, exit code 2, in under a second.

Its children die with it, also when it is SIGKILLed with no chance to clean up: each gets
a parent-death signal, and the ServerApp (two levels below, with Ray below it) watches
the launcher's pid (`SEEDLORA_WATCH_PID`, runtime/watchdog.py) and ends its process tree
when the launcher is gone.

Exit code: 0 run completed; 1 run failed (its last line says why: `[launch] run failed:
...`) or was stopped, or the launch failed; 2 bad arguments or run config (nothing was
started); 130 interrupted (Ctrl-C or SIGTERM), after the clean-up.

Notes for app authors:
- The ServerApp runs with this launcher's working directory as its cwd, but its
  ``__file__`` lies in a copy of the app under the temporary ``FLWR_HOME``, which is deleted
  at exit: write outputs to an absolute (or cwd-relative) path, never next to ``__file__``.
- ``--run-config`` keys must exist in ``[tool.flwr.app.config]`` of the app's pyproject.
- Only files ``flwr build`` packs (``*.py``, ``*.toml``, ``*.md``, ``*.json``, ``*.yaml``, ...,
  10 MB max, ``.gitignore`` honoured) reach that copy; other assets must be read by absolute path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import IO, Any

from contract.config import RunConfigError
from runtime.processes import (  # noqa: F401 - free_port re-exported
    die_with_parent,
    executable,
    free_port,
    start,
    stop_process_tree,
    tail,
)
from server import rundir
from simulation.precheck import Placement, PrecheckError, check

CONNECTION = "launch"  # name of the SuperLink connection in the private FLWR_HOME
STARTUP_TIMEOUT_S = 60.0
STATUS_POLL_S = 2.0
COMPLETED = "finished:completed"
# This project's default federation: 8 virtual clients, 1 CPU each (k run at once on k cores).
DEFAULT_NUM_SUPERNODES = 8
DEFAULT_NUM_CPUS = 1
DEFAULT_NUM_GPUS = 0.0
RAY_ADDRESS = "RAY_ADDRESS"  # read by ray.init() when Flower gives it no address
WATCH_PID = "SEEDLORA_WATCH_PID"  # the ServerApp ends its process tree when this pid is gone
WATCH_REMOVE = "SEEDLORA_WATCH_REMOVE"  # ... and removes this folder (the private FLWR_HOME)
FAILED_PREFIX = "Simulation failed with exception: "  # Flower's status details of a failed run
NO_DETAILS = "N/A"  # what `flwr ls` reports as status details when the run has none

# Flower's simulation logs these on every run (flwr/simulation/app.py, 1.42), also when the
# launcher sets the size with --num-supernodes: a warning about a default this run does not
# use, and a hint at `flwr federation simulation-config`, which --num-supernodes replaces.
# The launcher drops them from the stream; Flower's next line names the size in use.
FLOWER_NOISE = (
    b"default simulated SuperNodes changed from 10 to 2",
    b"To change federation size, use the following command",
    b"flwr federation simulation-config",
)

# Flower and Ray phone home (telemetry, update check, usage stats) unless told not to.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


# Ray starts its workers at nice 15 so that they yield to the driver; in a simulation the
# workers *are* the clients, and on a small shared machine that made each round 1.59x the
# one-process round instead of 1.13x (docs/results.md, Ray simulation round / one-process round).
SIMULATION_ENV = {"RAY_worker_niceness": "0"}


def launch_env(
    flwr_home: Path, ray_address: str | None, held: Path | None = None
) -> dict[str, str]:
    """The SuperLink's environment: ours, unless the user set the same variable; `held`:
    the run folder this launcher holds locked (its ServerApp then takes no lock)."""
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        WATCH_PID: str(os.getpid()),
        WATCH_REMOVE: str(flwr_home),  # SIGKILLed, the launcher cannot remove it itself
    }
    env.pop(rundir.HELD_ENV, None)  # another launcher's, when started under one
    for key, value in {**OFFLINE_ENV, **SIMULATION_ENV}.items():
        env.setdefault(key, value)
    if ray_address:
        env[RAY_ADDRESS] = ray_address
    if held is not None:
        env[rundir.HELD_ENV] = str(held)
    return env


def gpu_share_problem(num_gpus: float) -> str | None:
    """Why Ray cannot give each client `num_gpus` GPUs, or None: a share is a fraction in
    [0, 1] (1/k packs k clients per GPU) or a whole number of GPUs."""
    if num_gpus < 0 or (num_gpus > 1 and num_gpus != int(num_gpus)):
        return f"num-gpus: a fraction in [0, 1] (1/k packs k) or a whole number, got {num_gpus}"
    return None


class LaunchError(RuntimeError):
    """The SuperLink could not be started or the run could not be submitted."""


def _executable(name: str) -> str:
    try:
        return executable(name)
    except FileNotFoundError as err:
        raise LaunchError(str(err)) from None


def write_flower_config(flwr_home: Path, port: int) -> None:
    """Declare the only connection the CLI may use; also avoids the default `local` one."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n",
        encoding="utf-8",
    )


def _federation_config(args: argparse.Namespace) -> list[str]:
    """Per-run simulation settings, sent with `flwr run --federation-config`."""
    pairs = []
    if args.num_supernodes is not None:
        pairs.append(f"num-supernodes={args.num_supernodes}")
    if args.num_cpus is not None:
        pairs.append(f"client-resources-num-cpus={args.num_cpus}")
    if args.num_gpus is not None:
        pairs.append(f"client-resources-num-gpus={float(args.num_gpus)}")
    return ["--federation-config", " ".join(pairs)] if pairs else []


def wait_until_ready(proc: subprocess.Popen[Any], port: int, log_file: Path) -> None:
    """Poll the SuperLink's /health endpoint; fail fast if the process dies."""
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LaunchError(
                f"flower-superlink exited with code {proc.returncode}:\n" + tail(log_file)
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise LaunchError(
        f"flower-superlink not ready after {STARTUP_TIMEOUT_S:.0f}s:\n" + tail(log_file)
    )


def flwr_json(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a `flwr ... --format json` command and parse its JSON answer."""
    result = subprocess.run(
        cmd, env=env, capture_output=True, text=True, check=False, preexec_fn=die_with_parent()
    )
    try:
        payload: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        payload = {}
    if result.returncode != 0 or not payload.get("success"):
        raise LaunchError(
            f"`{' '.join(cmd[1:3])}` failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return payload


def run_status(flwr: str, run_id: str, env: dict[str, str]) -> tuple[str, str]:
    """Return (status, status-details) of a run, e.g. ('finished:failed', '...')."""
    payload = flwr_json([flwr, "ls", CONNECTION, "--run-id", run_id, "--format", "json"], env)
    run = payload["runs"][0]
    return str(run["status"]), str(run.get("status-details", ""))


def failure_reason(details: str) -> str:
    """The one-line reason of a failed run, from Flower's status details."""
    reason = details.removeprefix(FAILED_PREFIX).strip()
    if reason == NO_DETAILS:
        reason = ""
    lines = [line for line in reason.splitlines() if line.strip()]
    return lines[0] if lines else "(Flower gave no reason; see the log above)"


def relay_log(stream: IO[bytes], out: IO[bytes]) -> None:
    """Copy the run's log stream to `out` line by line, without Flower's FLOWER_NOISE."""
    for line in stream:
        if not any(noise in line for noise in FLOWER_NOISE):
            out.write(line)
            out.flush()


def launch(args: argparse.Namespace) -> int:
    """Check the run and hold its folder, then `run_app`; return the process exit code."""
    app_dir = Path(args.app_dir).expanduser().resolve()
    if not (app_dir / "pyproject.toml").is_file():
        print(f"[launch] error: --app-dir: no pyproject.toml in {app_dir}", file=sys.stderr)
        return 2
    checked = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            where = Placement.of_launcher(args.num_gpus or 0.0, args.ray_address)
            cfg = check(app_dir, args.run_config, args.num_supernodes, where)
            held = stack.enter_context(rundir.hold(cfg)) if cfg else None
        except (PrecheckError, RunConfigError) as err:
            print(f"[launch] error: {err}", file=sys.stderr)
            return 2
        print(f"[launch] run config checked in {time.monotonic() - checked:.1f}s", flush=True)
        return run_app(app_dir, args, held)


def run_app(app_dir: Path, args: argparse.Namespace, held: Path | None) -> int:
    """Start a private SuperLink, run the app, stream logs, stop every process started;
    `held`: the run folder this launcher holds (`launch_env`)."""
    flwr = _executable("flwr")
    superlink_cmd = [
        _executable("flower-superlink"),
        "--simulation",
        "--disable-runtime-dependency-installation",
        "--insecure",
        "--host",
        "127.0.0.1",
    ]

    started = time.monotonic()
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-launch-"))
    env = launch_env(flwr_home, args.ray_address, held)
    log_file = flwr_home / "superlink.log"
    superlink: subprocess.Popen[bytes] | None = None
    streamer: subprocess.Popen[bytes] | None = None
    try:
        port = free_port()
        write_flower_config(flwr_home, port)
        superlink = start(superlink_cmd + ["--port", str(port)], log_file, env=env)
        wait_until_ready(superlink, port, log_file)
        print(
            f"[launch] SuperLink pid {superlink.pid} on 127.0.0.1:{port} ready after "
            f"{time.monotonic() - started:.1f}s (FLWR_HOME={flwr_home})",
            flush=True,
        )

        # `flwr run --stream` exits 0 even when the run fails and `--format json` swallows
        # the stream, so: submit with JSON (to learn the run id), stream with `flwr log`,
        # then read the final status with `flwr ls`.
        submit = [flwr, "run", str(app_dir), CONNECTION, "--format", "json"]
        for overrides in args.run_config or []:
            submit += ["--run-config", overrides]
        submit += _federation_config(args)
        run_id = str(flwr_json(submit, env)["run-id"])
        print(f"[launch] started run {run_id}", flush=True)

        streamer = start(
            [flwr, "log", run_id, CONNECTION, "--stream"], env=env, stdout=subprocess.PIPE
        )
        relay_log(streamer.stdout, sys.stdout.buffer)
        streamer.wait()
        status, details = run_status(flwr, run_id, env)
        while not status.startswith("finished"):  # the log stream ended early
            time.sleep(STATUS_POLL_S)
            status, details = run_status(flwr, run_id, env)
        elapsed = time.monotonic() - started
        if status == COMPLETED:
            print(f"[launch] run {run_id}: completed after {elapsed:.1f}s", flush=True)
            return 0
        print(f"[launch] run {run_id}: {status} after {elapsed:.1f}s", flush=True)
        print(f"[launch] run failed: {failure_reason(details)}", flush=True)
        return 1
    except LaunchError as err:
        print(f"[launch] error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[launch] interrupted; stopping", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in (streamer, superlink):
            if proc is not None:
                stop_process_tree(proc)
        shutil.rmtree(flwr_home, ignore_errors=True)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """Treat SIGTERM like Ctrl-C so the `finally` clean-up runs."""
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.launch",
        description="Run a Flower App on a private local simulation SuperLink.",
    )
    parser.add_argument(
        "--app-dir", default=".", help="Flower App directory holding pyproject.toml (default: .)"
    )
    parser.add_argument(
        "--run-config",
        action="append",
        metavar="'k=v ...'",
        help="run config overrides (TOML values), may repeat",
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        metavar="N",
        default=DEFAULT_NUM_SUPERNODES,
        help=f"number of simulated SuperNodes (default: {DEFAULT_NUM_SUPERNODES})",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        metavar="X",
        default=DEFAULT_NUM_CPUS,
        help=f"CPUs per ClientApp, an integer >= 1 (default: {DEFAULT_NUM_CPUS})",
    )
    parser.add_argument(
        "--num-gpus",
        type=float,
        metavar="Y",
        default=DEFAULT_NUM_GPUS,
        help=f"GPU fraction per ClientApp, 1/k packs k per GPU (default: {DEFAULT_NUM_GPUS})",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this running Ray cluster (auto or HOST:PORT) instead of starting one",
    )
    args = parser.parse_args(argv)
    if args.num_supernodes is not None and args.num_supernodes < 1:
        parser.error("--num-supernodes must be >= 1")
    if args.num_cpus is not None and args.num_cpus < 1:
        parser.error("--num-cpus must be >= 1 (Flower stores it as an integer)")
    gpu_problem = None if args.num_gpus is None else gpu_share_problem(args.num_gpus)
    if gpu_problem:
        parser.error(f"--{gpu_problem}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
