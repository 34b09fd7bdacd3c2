"""Find and stop the SuperLink that a plain `flwr run .` starts and leaves running.

Usage::

    python -m simulation.local_superlink          # status: is one running, which pids
    python -m simulation.local_superlink stop     # stop it and every process below it

With the default `local` connection (address `:local:`), Flower 1.42's `flwr` starts a
*managed* `flower-superlink --simulation` detached from the shell (on 127.0.0.1:39091,
state and log in `$FLWR_HOME/local-superlink/`) and keeps it for later runs: after a run
the SuperLink and its SuperExec stay, and Flower has no command to stop them. This module
finds that process by the one thing only it carries, its `--log-file` under this
`FLWR_HOME` (`~/.flwr` unless `FLWR_HOME` is set), so it never touches the launcher's
private SuperLinks, another user's, or another `FLWR_HOME`'s. Stopping it ends the runs it
still executes; the next `flwr run .` starts a fresh one from the same state.db.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.processes import alive, descendants, stop_pids

SCRIPT = "flower-superlink"


def flwr_home() -> Path:
    """`FLWR_HOME`, else ~/.flwr, as Flower resolves it (imported here: the CLI alone)."""
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home()


def log_file(flwr_home: Path) -> Path:
    """Where `flwr` tells its managed SuperLink to log (flwr/cli/local_superlink.py)."""
    return flwr_home / "local-superlink" / "superlink.log"


def _cmdline(entry: Path) -> list[str]:
    try:
        return (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def managed_pids(flwr_home: Path) -> list[int]:
    """Pids of the SuperLinks `flwr` started for `flwr_home` (normally none or one)."""
    wanted = {str(log_file(flwr_home)), str(log_file(flwr_home.expanduser().resolve()))}
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        argv = _cmdline(entry)
        is_superlink = any(Path(arg).name == SCRIPT for arg in argv[:2])
        logs = {argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--log-file"}
        if is_superlink and logs & wanted:
            found.append(int(entry.name))
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulation.local_superlink",
        description="Status of, or stop, the SuperLink that `flwr run .` started and left.",
    )
    parser.add_argument("action", nargs="?", choices=["status", "stop"], default="status")
    args = parser.parse_args(argv)
    home = flwr_home()
    pids = managed_pids(home)
    if not pids:
        print(f"no managed local SuperLink running for FLWR_HOME={home}")
        return 0
    below = [p for p in descendants(pids) if alive(p)]  # not the zombies awaiting reaping
    what = f"pid {', '.join(map(str, pids))} and {len(below)} process(es) below it"
    if args.action == "status":
        print(f"managed local SuperLink running for FLWR_HOME={home}: {what}")
        return 0
    left = stop_pids(pids)
    if left:
        print(f"could not stop pid(s) {', '.join(map(str, left))}", file=sys.stderr)
        return 1
    print(f"stopped the managed local SuperLink ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
