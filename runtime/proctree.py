"""The process tree below a pid, from /proc: what the process runner (runtime/processes.py)
and the ServerApp's launcher watchdog (runtime/watchdog.py) both need to stop a run.

It lives here, below both, because server/ and simulation/ must not share code any other
way (tests/test_import_graph.py); the watchdog's env keys are the other half of that
contract between the launcher and the ServerApp.
"""

from __future__ import annotations

import os
from pathlib import Path


def _child_pids() -> dict[int, list[int]]:
    """Map parent pid -> child pids from /proc (empty where /proc is absent)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the ppid; the command name (field 2) may contain spaces, so split after ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pids: list[int]) -> list[int]:
    """All live descendants of `pids` (Ray and the ServerApp run below the SuperLink)."""
    tree = _child_pids()
    found: list[int] = []
    todo = list(pids)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs; zombies count as gone since they only await reaping."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # A zombie still answers signal 0 but is already dead.
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return True
