"""The app in this process without Ray: a Grid that hands messages to ClientApps directly.

It runs the real ServerApp and ClientApp code; only the transport is replaced, so a run costs
its training and not a Ray start-up (fast app tests; benchmarks that compare methods).
`run_local(overrides, num_nodes)` is one whole run; a caller may swap a node's app first
(`grid.apps[node] = ...`: a faulty client, or the Byzantine
`testing.attackers.scaled_update`). `_serve` is the one place outside server/ (and tests)
that drives the server's run loop.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

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
    overrides: Mapping[str, Any], num_nodes: int, client_app: ClientApp | None = None
) -> LocalGrid:
    """The grid `run_local` would use: this project's ClientApp (built with `overrides`) or
    `client_app` on every node; a CopyingGrid when `secure-aggregation` is on."""
    from client.app import build_client_app

    grid_class = CopyingGrid if _secure(overrides) else LocalGrid
    return grid_class(client_app or build_client_app(overrides), num_nodes)


@dataclass
class RunResult:
    """What one in-process run left: its metrics.json, where it wrote (None: a temporary
    directory, already removed) and the grid (its `replies`, its apps)."""

    metrics: dict[str, Any]
    run_dir: Path | None
    grid: LocalGrid


@contextlib.contextmanager
def _private_cache(fresh: bool) -> Iterator[None]:
    """With `fresh`, the clients' link cache (and upload residuals) in a new directory."""
    if not fresh:
        yield
        return
    old = os.environ.get("SEEDLORA_CACHE")
    with tempfile.TemporaryDirectory(prefix="seedlora-cache-") as cache:
        os.environ["SEEDLORA_CACHE"] = cache
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("SEEDLORA_CACHE", None)
            else:
                os.environ["SEEDLORA_CACHE"] = old


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
    `fresh_cache` gives the clients a link cache of their own for this run."""
    from contract.config import RunConfig
    from server.chain_server import ChainServer

    cfg = RunConfig.from_flower(overrides)  # fails before any work on a bad key
    grid = grid if grid is not None else make_grid(overrides, num_nodes, client_app)
    served = wrap_grid(grid) if wrap_grid else grid
    if out_dir is None and overrides.get("run-name"):
        out_dir = Path(str(overrides.get("output-dir", "outputs"))) / str(overrides["run-name"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(_private_cache(fresh_cache))
        if out_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="seedlora-")))
        else:
            run_dir = Path(out_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        _serve(ChainServer(cfg, RUN_ID, run_dir), served, _secure(overrides))
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return RunResult(metrics, None if out_dir is None else run_dir, grid)


def _serve(server: Any, grid: Grid, secure: bool) -> None:
    """The one call into the server's run loop: the chain over SecAgg+ rounds or over
    Flower's message rounds, as the ServerApp runs it."""
    from server.chain_server import run_chain
    from server.rounds import FlowerRounds
    from server.secure import SecureRounds

    context = Context(RUN_ID, 0, {}, RecordDict(), {})
    run_chain(server, SecureRounds(grid, context) if secure else FlowerRounds(grid))


def resolved_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The whole run config (dash keys, defaults filled in) that `overrides` give: what a
    benchmark records beside its results."""
    from contract.config import RunConfig

    return RunConfig.from_flower(overrides).to_flower()
