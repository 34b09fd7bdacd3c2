"""Where and how each client call ran, and when the server waited: for benchmarks and tests.

`probed_client_app` wraps a ClientApp and appends one JSON line per call (wall-clock start
and end, process, the GPU Ray assigned, the Ray cluster it ran in, device memory after the
call and its peak, the reply's own train time). `TimedGrid` wraps the ServerApp's grid and
records each exchange (a push and the pulls that answer it). Both write to one JSON-lines
file (each record is one `write` in append mode, so concurrent Ray actors on one machine
do not interleave), and `read` loads it back. Wall-clock times are comparable across
processes of one machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from contract import protocol as p
from simulation.grid_wrapper import GridWrapper

CLIENT = "client"
GRID = "grid"


def _append(log: Path, record: dict[str, Any]) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read(log: Path) -> list[dict[str, Any]]:
    """Every record of a probe log, in file order."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _round(msg: Message) -> int | None:
    config = msg.content.config_records.get(p.CONFIG)
    return None if config is None else int(config.get(p.GLOBAL_ROUND, 0))


def ray_facts() -> dict[str, Any] | None:
    """The Ray cluster, node and GPUs of this process; None outside a Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    return {
        "gcs_address": ctx.gcs_address,
        "node_id": ctx.get_node_id(),
        "job_id": ctx.get_job_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


def gpu_facts() -> dict[str, Any] | None:
    """Memory of this process on its current GPU (bytes), and the whole device's use."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {
        "name": torch.cuda.get_device_name(),
        "allocated_after": torch.cuda.memory_allocated(),
        "reserved_after": torch.cuda.memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "device_used_after": total - free,
        "device_total": total,
    }


def _probed(inner: ClientApp, log: Path, msg: Message, context: Context) -> Message:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    reply = inner(msg, context)
    end = time.time()
    record: dict[str, Any] = {
        "kind": CLIENT,
        "message_type": msg.metadata.message_type,
        "round": _round(msg),
        "partition": context.node_config.get("partition-id"),
        "pid": os.getpid(),
        "start": start,
        "end": end,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ray": ray_facts(),
        "gpu": gpu_facts(),
        "error": reply.error.reason if reply.has_error() else None,
    }
    if not reply.has_error() and p.METRICS in reply.content.metric_records:
        metrics = reply.content[p.METRICS]
        record["train_time"] = metrics.get(p.TRAIN_TIME)
        record["num_examples"] = metrics.get(p.NUM_EXAMPLES)
    _append(log, record)
    return reply


def probed_client_app(inner: ClientApp, log: str | os.PathLike) -> ClientApp:
    """`inner` with a probe record appended to `log` after every train/evaluate call."""
    log, app = Path(log), ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return _probed(inner, log, msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return _probed(inner, log, msg, context)

    return app


class TimedGrid(GridWrapper):
    """A grid that records each exchange (the server waiting): from a push to the reply
    to its last message, with the number sent and answered. An exchange left with
    messages unanswered (past round-timeout) is recorded at the next push."""

    def __init__(self, inner: Grid, log: str | os.PathLike):
        super().__init__(inner)
        self.log = Path(log)
        self.open: list[dict[str, Any]] = []  # exchanges with replies still due

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        start = time.time()
        ids = list(self.inner.push_messages(messages))
        for batch in self.open:
            self._record(batch)
        self.open = [
            {
                "kind": GRID,
                "message_type": messages[0].metadata.message_type if messages else None,
                "round": _round(messages[0]) if messages else None,
                "sent": len(messages),
                "replies": 0,
                "start": start,
                "end": time.time(),
                "due": {i for i in ids if i},
            }
        ]
        if not self.open[0]["due"]:
            self._record(self.open.pop())
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(self.inner.pull_messages(message_ids))
        for batch in self.open:
            answered = {m.metadata.reply_to_message_id for m in got} & batch["due"]
            batch["due"] -= answered
            batch["replies"] += len(answered)
            batch["end"] = time.time() if answered else batch["end"]
        for batch in [b for b in self.open if not b["due"]]:
            self.open.remove(batch)
            self._record(batch)
        return got

    def _record(self, batch: dict[str, Any]) -> None:
        _append(self.log, {k: v for k, v in batch.items() if k != "due"})
