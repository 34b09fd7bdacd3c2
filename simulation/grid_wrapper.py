"""A Flower Grid that hands every call to another one: the base of the grids that add to it
(simulation.inprocess.StoppableGrid, testing.probe.TimedGrid). Its `send_and_receive`
is a push and pulls through this grid's own `push_messages` / `pull_messages`
(strategies/exchange.py), so what a subclass adds to those two sees every message."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from strategies import exchange


class GridWrapper(Grid):
    """Every Grid call goes to `inner`; a subclass overrides only what it adds."""

    def __init__(self, inner: Grid):
        self.inner = inner

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        return exchange.send_and_receive(self, messages, timeout)
