"""Send a round's messages and hand back each reply as it arrives.

Flower's `Grid.send_and_receive` returns when every reply is in (or the timeout passed),
and its SuperLink grid (`HttpGrid`, Flower 1.42) sleeps 3 s between pulls: a round
then waits up to 3 s after its last client and holds every reply before anything is done
with them. `replies` pushes the messages, pulls every `POLL_S` while replies are due, and
yields each reply the moment a pull brings it, so the caller can check and add it up
while the other clients still train (server/rounds.py), and drops it before the next.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid

POLL_S = 0.05  # seconds between pulls that brought nothing


def replies(
    grid: Grid, messages: Iterable[Message], timeout: float | None, poll: float = POLL_S
) -> Iterator[Message]:
    """Push `messages`, then yield their replies in order of arrival until every message
    is answered or `timeout` seconds passed (None: no limit). A pull that brought
    replies is followed by another at once; an empty one by a `poll` s wait. A message
    the grid could not push (Flower's HttpGrid gives None for its id) gets no reply."""
    pending = {i for i in grid.push_messages(list(messages)) if i}
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        brought = bool(got)
        got.reverse()
        while got:  # handed out one by one, the list forgetting each
            reply = got.pop()
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        left = None if deadline is None else deadline - time.monotonic()
        if not pending or (left is not None and left <= 0):
            return
        if not brought:
            time.sleep(poll if left is None else min(poll, left))


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float | None):
    """Every reply `replies` yields, as a list: what `Grid.send_and_receive` returns."""
    return list(replies(grid, messages, timeout))
