"""The app in this process without Ray: a Grid that hands messages to ClientApps directly.

It runs the real ServerApp and ClientApp code; only the transport is replaced, so a run costs
its training and not a Ray start-up (fast app tests; benchmarks that compare methods).
`run_local(overrides, num_nodes)` is one whole run, built and run by the same composition
roots as the deployed apps (server.compose.run_server: its checks and its run folder;
client.compose.build_client_app); a caller may swap a node's app first
(`grid.apps[node] = ...`: a faulty client, or the Byzantine
`testing.attackers.scaled_update`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from contract import worker_wire as wire
from strategies import exchange

RUN_ID = 4242


class LocalGrid(Grid):
    """Node ids 101, 102, ...; node i holds partition i of n.

    `push_messages` queues messages; each `pull_messages` runs the ClientApp of the next
    queued message among the asked ids and returns its reply, one per pull, as a
    transport delivers replies while other clients still train. `arrival` (a test's
    hook) picks the order: it gets the queued ids of a pull and returns them reordered,
    the first answered now; an empty list answers none (a client that stays silent)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 0
        self.apps = {101 + i: client_app for i in range(num_nodes)}
        self.contexts = {
            101 + i: Context(
                run_id=RUN_ID,
                node_id=101 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.replies: list[Message] = []  # every train reply, for exactness checks
        self.keep_replies = True  # off for long runs: 4 clients x 512 rounds held 460 MB
        self.rounds_sent = 0
        self.fail_after: int | None = None  # raise after this many train rounds (crash test)
        self.queued: dict[str, Message] = {}  # pushed, not yet answered: id -> message
        self.arrival: Callable[[list[str]], list[str]] | None = None

    def set_run(self, run: Run) -> None:  # pragma: no cover - not used by ServerApps here
        raise NotImplementedError

    @property
    def run(self) -> Run:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            if self.fail_after is not None and self.rounds_sent >= self.fail_after:
                raise KeyboardInterrupt("simulated server crash")
            self.rounds_sent += 1
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as InMemoryGrid does
            self.queued[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        asked = set(message_ids)
        due = [i for i in self.queued if i in asked]  # in the order they were pushed
        due = self.arrival(due) if self.arrival else due
        if not due:
            return []
        msg = self.queued.pop(due[0])
        node = msg.metadata.dst_node_id
        try:
            reply = self.apps[node](msg, self.contexts[node])
        except Exception as err:  # noqa: BLE001 - a client error becomes an error reply
            reply = Message(Error(code=0, reason=repr(err)), reply_to=msg)
        if reply is None:
            return []
        if self.keep_replies and msg.metadata.message_type.startswith("train"):
            self.replies.append(reply)
        return [reply]

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        return exchange.send_and_receive(self, messages, timeout)

    def use_cache(self, cache_dir: str | os.PathLike) -> None:
        """Give every node the link cache (and master files, upload residuals) in
        `cache_dir`: node config `cache-dir`, as a deployed node is given it."""
        for context in self.contexts.values():
            context.node_config[wire.CACHE_DIR] = str(cache_dir)


class CopyingGrid(LocalGrid):
    """LocalGrid for the legacy SecAgg+ workflow: it delivers copies, as a real transport
    does (the workflow sends one record object to every node, and secaggplus_mod edits it in
    place), and names its run (the legacy client manager asks the grid for it)."""

    @property
    def run(self) -> Run:
        return Run.create_empty(RUN_ID)

    def push_messages(self, messages):
        return super().push_messages([copy.deepcopy(m) for m in messages])


def _secure(overrides: Mapping[str, Any]) -> bool:
    return str(overrides.get("secure-aggregation", False)).lower() == "true"


def make_grid(
    overrides: Mapping[str, Any],
    num_nodes: int,
    client_app: ClientApp | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LocalGrid:
    """The grid `run_local` would use: this project's ClientApp (built with `overrides`
    and `cache_dir`, client.compose) or `client_app` on every node; a CopyingGrid when
    `secure-aggregation` is on."""
    from client.compose import build_client_app

    grid_class = CopyingGrid if _secure(overrides) else LocalGrid
    return grid_class(client_app or build_client_app(overrides, cache_dir), num_nodes)


@dataclass
class RunResult:
    """What one in-process run left: its metrics.json, where it wrote (None: a temporary
    directory, already removed) and the grid (its `replies`, its apps)."""

    metrics: dict[str, Any]
    run_dir: Path | None
    grid: LocalGrid


def run_local(
    overrides: Mapping[str, Any],
    num_nodes: int = 2,
    *,
    grid: LocalGrid | None = None,
    client_app: ClientApp | None = None,
    wrap_grid: Callable[[Grid], Grid] | None = None,
    out_dir: Path | None = None,
    fresh_cache: bool = False,
) -> RunResult:
    """One run of the app in this process: `overrides` (dash keys) over the run config.

    `grid` defaults to `make_grid(overrides, num_nodes, client_app)`; `wrap_grid` wraps it
    for the server (testing.probe.TimedGrid). The run writes to `out_dir`, else to
    `output-dir/run-name` when `run-name` is set, else to a temporary directory.
    `fresh_cache` gives the nodes a link cache of their own for this run (node config
    `cache-dir`, a temporary folder)."""
    from contract.config import RunConfig
    from server.compose import run_server

    cfg = RunConfig.from_flower(overrides)  # fails before any work on a bad key
    grid = grid if grid is not None else make_grid(overrides, num_nodes, client_app)
    if out_dir is None and overrides.get("run-name"):
        out_dir = Path(str(overrides.get("output-dir", "outputs"))) / str(overrides["run-name"])
    with contextlib.ExitStack() as stack:
        if fresh_cache:
            grid.use_cache(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="seedlora-cache-"))
            )
        if out_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seedlora-")))
        else:
            run_dir = Path(out_dir)
        context = Context(RUN_ID, 0, {}, RecordDict(), {})
        run_server(cfg, grid, context, folder=run_dir, wrap_grid=wrap_grid)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return RunResult(metrics, None if out_dir is None else run_dir, grid)


def resolved_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The whole run config (dash keys, defaults filled in) that `overrides` give: what a
    benchmark records beside its results."""
    from contract.config import RunConfig

    return RunConfig.from_flower(overrides).to_flower()
