"""Child processes with a time limit, stopped by pid together with everything they started.

Used by the launcher (its SuperLink and log stream), the deployment tests (SuperLink,
SuperNodes) and the benchmarks (one run per child process). A child starts in its own
session, so a Ctrl-C reaches only this process, which then stops the children in order.
On Linux a child also gets a parent-death signal (SIGKILL): it dies with this process
even when this process is SIGKILLed and no clean-up runs. That covers the children only;
their own children (Ray under the SuperLink) need a watchdog (runtime/watchdog.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.proctree import alive, descendants  # noqa: F401 - re-exported

STOP_GRACE_S = 10.0


def free_port() -> int:
    """Ask the OS for a free port so we never clash with a managed SuperLink (39091)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def executable(name: str) -> str:
    """A console script (`flwr`, `flower-supernode`): the one next to this interpreter, so
    the CLI matches the imported flwr, else the first on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found; is flwr[simulation] installed?")
    return found


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved before any fork (None off Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive SIGKILL when this process dies (the
    thread that forks it, precisely: call it from the main thread), or None off Linux."""
    if _PRCTL is None:
        return None
    prctl, parent = _PRCTL, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def start(
    cmd: Sequence[str],
    log: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    stdout: int | None = None,
) -> subprocess.Popen[Any]:
    """Start `cmd` in its own session (its pid is its process group) that dies with this
    process, stdout and stderr to `log` (None: to `stdout`, by default this process's)."""
    options: dict[str, Any] = {
        "env": env,
        "cwd": cwd,
        "start_new_session": True,
        "preexec_fn": die_with_parent(),
    }
    if log is None:
        return subprocess.Popen(list(cmd), stdout=stdout, **options)
    with log.open("wb") as handle:
        return subprocess.Popen(list(cmd), stdout=handle, stderr=subprocess.STDOUT, **options)


def run(
    cmd: Sequence[str],
    log: Path,
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> int | None:
    """Run `cmd` (output to `log`) for at most `timeout_s`; its exit code, or None when it
    was stopped at the limit. Whatever it started is stopped either way."""
    proc = start(cmd, log, env=env, cwd=cwd)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    finally:
        stop_process_tree(proc)


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until `pids` exit; return those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_process_tree(proc: subprocess.Popen[Any]) -> None:
    """Stop `proc` and everything below it, by pid.

    SIGTERM lets the SuperLink stop its SuperExec cleanly, but a ServerApp/Ray still running
    is orphaned, and Ray's agents ignore SIGTERM, so survivors get SIGTERM, then SIGKILL.
    """
    if proc.poll() is not None:
        return
    tree = descendants([proc.pid])
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _end_survivors(tree)


def stop_pids(pids: list[int]) -> list[int]:
    """`stop_process_tree` for processes this one did not start (no Popen to wait on):
    SIGTERM each, up to STOP_GRACE_S for them to go, then the same sweep of survivors.
    Returns the pids that are still alive afterwards (none unless SIGKILL was refused)."""
    tree = descendants(pids)
    _signal_all(pids, signal.SIGTERM)
    _end_survivors(wait_gone(pids, STOP_GRACE_S) + tree)
    return [p for p in pids + tree if alive(p)]


def _end_survivors(tree: list[int]) -> None:
    """SIGTERM, then SIGKILL, whatever of `tree` (and below it) is still alive."""
    survivors = [p for p in tree if alive(p)]
    survivors += [p for p in descendants(survivors) if p not in survivors]
    _signal_all(survivors, signal.SIGTERM)
    survivors = wait_gone(survivors, 3.0)
    _signal_all(survivors, signal.SIGKILL)
    wait_gone(survivors, 3.0)
