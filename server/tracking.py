"""Experiment tracking: every round's scalars as TensorBoard event files in `<run>/tb/`.

`tensorboard --logdir outputs` then shows every run under `outputs/` side by side (each
run folder is one run in TensorBoard's list). The step is the global round; round 0 is
the base model's central evaluation. Tags:

    train/loss                      mean client training loss of the round
    client_eval/<metric>            clients' evaluation (weighted by Flower's strategy)
    central/<metric>                the server's evaluation of the global model
    lr                              the clients' learning rate (server/schedule.py)
    comm/mb_up, comm/mb_down        this round's MB (1e6 bytes) up and down
    comm/mb_up_total, ..._down_total  the run's cumulative MB (what comm-budget-mb caps)
    clients/accepted                replies averaged
    time/round_s                    the round's wall time
    phases/<phase>                  seconds per part of the round (configure, exchange, ...)

TensorBoard is optional (the `tensorboard` extra): without it the run logs one info line
and writes no events. The writer flushes after every round, so a live TensorBoard sees
each round as it ends and a killed run loses nothing it had committed. On resume the
writer purges the events of rounds after the checkpoint (SummaryWriter's `purge_step`),
since those rounds run again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from contract.round_record import MB, RoundRecord

TB_DIR = "tb"
SKIPPED_METRICS = frozenset({"num-examples"})


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metrics(prefix: str, metrics: Mapping[str, Any] | None) -> Iterator[tuple[str, float]]:
    for key, value in (metrics or {}).items():
        if key not in SKIPPED_METRICS and _numeric(value):
            yield f"{prefix}/{key}", float(value)


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The tag -> value pairs of one round's record (the module docstring's tags; what the
    record lacks, e.g. the train loss of round 0, is left out)."""
    out: dict[str, float] = {}
    r = record.replies
    if r is not None and _numeric(r.train_loss):
        out["train/loss"] = float(r.train_loss)  # type: ignore[arg-type]
    out.update(_metrics("client_eval", r.client_eval if r is not None else None))
    out.update(_metrics("central", record.central))
    if _numeric(record.lr):
        out["lr"] = float(record.lr)  # type: ignore[arg-type]
    if r is not None:
        out["comm/mb_up_total"] = r.bytes_up_total / MB
        out["comm/mb_down_total"] = r.bytes_down_total / MB
        out["clients/accepted"] = float(r.accepted)
    if _numeric(record.wall_time):
        out["time/round_s"] = float(record.wall_time)  # type: ignore[arg-type]
    if r is not None:
        out["comm/mb_up"] = r.bytes_up / MB
        out["comm/mb_down"] = r.bytes_down / MB
    out.update(_metrics("phases", record.phases))
    return out


class RoundScalars:
    """Writes round entries to `<run>/tb/`; a no-op when off or TensorBoard is missing."""

    def __init__(self, run_dir: Path, enabled: bool, resumed_at: int | None):
        """`resumed_at`: the checkpoint's global round on resume (later rounds' events are
        purged), None for a fresh run (an earlier run's events in the folder are removed)."""
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log(INFO, "tensorboard not installed: no event files ('pip install .[tensorboard]')")
            return
        path = run_dir / TB_DIR
        if resumed_at is None:
            shutil.rmtree(path, ignore_errors=True)
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(str(path), purge_step=purge)
        log(INFO, "TensorBoard events in %s ('tensorboard --logdir %s')", path, run_dir.parent)

    def write(self, record: RoundRecord) -> None:
        if self.writer is None:
            return
        step = record.global_round
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
