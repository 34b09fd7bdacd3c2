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
from pathlib import Path

ENV = "SEEDLORA_WATCH_PID"
REMOVE_ENV = "SEEDLORA_WATCH_REMOVE"  # a folder to delete once the watched pid is gone
POLL_S = 0.5
_started: set[int] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie awaits only its reaping
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def kill_tree(remove: str = "") -> None:
    """SIGKILL every descendant of this process, delete `remove` (a folder), then SIGKILL
    this process."""
    for _ in range(3):  # Ray may fork while we kill: sweep again
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if remove:
        shutil.rmtree(remove, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGKILL)


def watch(pid: int, poll_s: float = POLL_S, remove: str = "") -> threading.Thread:
    """A daemon thread that calls `kill_tree(remove)` once `pid` has gone."""

    def run() -> None:
        while _alive(pid):
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
