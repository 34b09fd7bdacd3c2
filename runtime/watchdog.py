"""Die with the launcher: a thread that ends this process tree when a watched pid is gone.

`python -m simulation.launch` starts the SuperLink with a parent-death signal, but the
ServerApp's process (flwr-simulation, two levels below the SuperLink) and the Ray it
starts (gcs_server, raylet, the ClientApp actors) are grandchildren in their own
sessions, which no signal to the launcher's process group reaches. The launcher puts its
pid in `SEEDLORA_WATCH_PID`; the ServerApp calls `start_from_env()`, and when that pid
is gone (the launcher was SIGKILLed: an OOM kill, a closed terminal, a scheduler) this
thread SIGKILLs every descendant of this process, removes the launcher's temporary
folder (`SEEDLORA_WATCH_REMOVE`, its private FLWR_HOME, which the killed launcher could
not), then SIGKILLs this process. The run folder's lock dies with it, and the last
checkpoint stays for `resume`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time

from runtime.proctree import alive, descendants

ENV = "SEEDLORA_WATCH_PID"
REMOVE_ENV = "SEEDLORA_WATCH_REMOVE"  # a folder to delete once the watched pid is gone
POLL_S = 0.5
_started: set[int] = set()


def kill_tree(remove: str = "") -> None:
    """SIGKILL every descendant of this process, delete `remove` (a folder), then SIGKILL
    this process."""
    for _ in range(3):  # Ray may fork while we kill: sweep again
        for pid in descendants([os.getpid()]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)


def watch(pid: int, poll_s: float = POLL_S, remove: str = "") -> threading.Thread:
    """A daemon thread that calls `kill_tree(remove)` once `pid` has gone."""

    def run() -> None:
        while alive(pid):
            time.sleep(poll_s)
        kill_tree(remove)

    thread = threading.Thread(target=run, name=f"seedlora-watch-{pid}", daemon=True)
    thread.start()
    return thread


def start_from_env() -> bool:
    """Watch `$SEEDLORA_WATCH_PID` (once per process); False when it is not set."""
    value = os.environ.get(ENV, "")
    if not value.isdigit():
        return False
    pid = int(value)
    if pid not in _started:
        _started.add(pid)
        watch(pid, remove=os.environ.get(REMOVE_ENV, ""))
    return True
