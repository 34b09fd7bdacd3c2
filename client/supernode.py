"""`flower-supernode` with a shorter idle poll, as the data owner's command starts it.

Flower 1.42's SuperNode loop (`flwr/supernode/start_client_internal.py`) asks the
SuperLink for a message, and when there is none sleeps 3 s before asking again; after it
hands a message on, it checks for the ClientApp's reply every 0.5 s. With a resident
trainer a round's work takes well under a second, so these waits are most of a deployed
round: a message that arrives just after a poll waits up to 3 s. This entry point runs
Flower's own SuperNode unchanged except for that module's `time.sleep`, capped at
`--idle-poll` seconds (each SuperNode then asks the SuperLink about 1/idle-poll times a
second while idle). It patches only the Flower release it was written against; with any
other it runs Flower as is and says so. The SuperExec's own poll (1 s by default) has a
Flower setting, FLWR_SUPEREXEC_TASK_POLL_INTERVAL, which `client.node` sets.

    python -m client.supernode --idle-poll 0.25 -- <flower-supernode arguments>
"""

from __future__ import annotations

import logging
import sys
import time
from types import SimpleNamespace

PATCHED_RELEASE = "1.42.0"  # the SuperNode loop this was read from


def capped_time(cap: float) -> SimpleNamespace:
    """The `time` module as the SuperNode loop sees it: every sleep at most `cap` s."""
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    return SimpleNamespace(**{**names, "sleep": lambda seconds: time.sleep(min(seconds, cap))})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cap = 3.0
    if argv[:1] == ["--idle-poll"]:
        cap, argv = float(argv[1]), argv[2:]
    argv = argv[1:] if argv[:1] == ["--"] else argv
    import flwr
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    if cap < 3.0:
        if flwr.__version__ == PATCHED_RELEASE:
            start_client_internal.time = capped_time(cap)
        else:
            logging.warning(
                "flwr %s is not %s: the SuperNode keeps its own 3 s idle poll",
                flwr.__version__,
                PATCHED_RELEASE,
            )
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
