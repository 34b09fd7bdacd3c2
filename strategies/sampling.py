"""Seeded node sampling: which nodes train (and evaluate) in a round follows `seed`.

Flower's message-API strategies sample in `configure_train` / `configure_evaluate` with
`random.sample(grid.get_node_ids(), k)` (`sample_nodes` in
flwr/serverapp/strategy/strategy_utils.py): Python's global RNG, over the nodes in
whatever order the SuperLink lists them, so two runs with one `seed` sample differently.
`LinkStrategy` keeps Flower's code and fixes its two inputs:

- the RNG: `seeded_sampling(seed, phase, global_round)` seeds Python's global `random`
  from sha256(seed, phase, global round) for the duration of the inner strategy's
  configure call, then restores the state it had (nothing else in the process sees a
  changed stream);
- the order: `NodeOrder.view(grid)` lists the nodes by their partition id (then node id).
  Node ids are drawn at random by the SuperLink (Flower's simulation too, every run),
  partition ids are what a node is: the first time a node is seen it is asked once
  (a `query.partition` message; the ClientApp answers with its node config's
  `partition-id`). A node that does not answer sorts after the others, by node id.

So round g samples the same partitions whenever the seed and the set of connected
nodes' partitions are the same: a rerun, a resumed run, the in-process harness or the
Ray simulation, on any machine. The SecAgg+ path samples through Flower's legacy
workflow, not here.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import INFO
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from contract import protocol as p
from seedlora.spec import derive_seed

from .exchange import send_and_receive


@contextmanager
def seeded_sampling(seed: int, phase: str, global_round: int) -> Iterator[None]:
    """Python's global RNG seeded from (seed, phase, global round), restored on exit."""
    state = random.getstate()
    random.seed(derive_seed("node-sampling", seed, phase, global_round))
    try:
        yield
    finally:
        random.setstate(state)


class _OrderedGrid:
    """The grid with its node ids in `NodeOrder`'s order; everything else is the grid's."""

    def __init__(self, grid: Grid, order: NodeOrder):
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        return self._order.sorted(self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class NodeOrder:
    """Run-wide: node id -> partition id, from asking each new node once."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self.partitions: dict[int, int] = {}
        self.asked: set[int] = set()

    def sorted(self, nodes: Iterable[int]) -> list[int]:
        """`nodes` by partition id, unknown ones last, ties by node id."""
        unknown = float("inf")
        return sorted(nodes, key=lambda n: (self.partitions.get(n, unknown), n))

    def learn(self, replies: Iterable[Message]) -> None:
        """Note the partition id each reply states (a partition query's or an echo's)."""
        for msg in replies:
            if msg.has_error() or p.ECHO not in msg.content.config_records:
                continue
            partition = msg.content[p.ECHO].get(p.PARTITION_ID)
            if isinstance(partition, int) and not isinstance(partition, bool):
                self.partitions[msg.metadata.src_node_id] = partition

    def ask(self, grid: Grid) -> None:
        """Ask every connected node not asked before for its partition id."""
        new = sorted(set(grid.get_node_ids()) - self.asked)
        if not new:
            return
        self.asked.update(new)
        queries = [
            Message(RecordDict(), dst_node_id=n, message_type=p.PARTITION_QUERY) for n in new
        ]
        self.learn(send_and_receive(grid, queries, self.timeout))
        named = sum(n in self.partitions for n in new)
        log(INFO, "node sampling: %d of %d new nodes named their partition", named, len(new))

    def view(self, grid: Grid) -> Grid:
        """`grid` listing its nodes in this order (after asking the new ones)."""
        self.ask(grid)
        return _OrderedGrid(grid, self)  # type: ignore[return-value]
