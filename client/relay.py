"""The relay: the ClientApp's handler of train and evaluate messages.

In a deployment Flower starts a fresh `flwr-clientapp` process for every message, so a
model built there would be rebuilt, and the data re-tokenized, for every message. The
data owner therefore runs `python -m client.node`, which keeps a node worker
(client/worker.py) beside the SuperNode and tells the SuperNode where it listens (node
config `worker-socket`); the relay hands each train or evaluate message to that worker
over the Unix socket and returns its reply. Its import path is Flower and the standard
library only: no torch, no transformers.

Without `worker-socket` (the simulation, the in-process harness, a plain
`flower-supernode`) the relay's own trainer runs in this process, as it always did. A
deployed node started without the worker says so in one log line per message (each
message is a new process), naming the command. With `worker-socket` set and no worker
answering, the message fails naming the command rather than building the model here
beside a worker that may hold the device (the server logs the error; the node's next
message tries the worker again). A worker that does not answer within the round's
`round-timeout` fails the message the same way.

Who keeps the relay's trainer alive: the relay itself in the in-process harness. In the
simulation Flower's Ray backend pickles the ClientApp with every message, so an actor
gets a new copy each time; a relay unpickled in a process is that process's `KEPT` relay
for the same recipe (one slot: a new recipe replaces it), so the actor's trainer, and
its resident model, live across messages as the node worker's do in a deployment.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.common.logger import log

from contract import worker_wire as wire

if TYPE_CHECKING:
    from .trainer import Trainer

ROUND_TIMEOUT = "round-timeout"  # run config: how long the server waits for a reply
DEFAULT_TIMEOUT_S = 600.0  # contract.config's default round-timeout


def _in_ray_actor() -> bool:
    """True in the simulation's Ray actors, which keep the trainer alive themselves."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@dataclass(frozen=True)
class Recipe:
    """What a relay's trainer is built from: run-config `overrides` (dash keys, winning
    over each message's run config) and the cache folder of nodes that name none."""

    overrides: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str = ""

    def trainer(self) -> Trainer:
        """The trainer this recipe describes (torch and the model: imported only here)."""
        from .trainer import Trainer

        return Trainer(self.overrides, self.cache_dir)


class Relay:
    """Hands train and evaluate messages to the node worker, or to its own trainer (built
    from `recipe` on first use) when the node config names none."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.overrides = dict(recipe.overrides)
        self._trainer: Trainer | None = None
        self._app = None  # the trainer's ClientApp
        self._told = False

    def trainer(self) -> Trainer:
        if self._trainer is None:
            self._trainer = self.recipe.trainer()
            self._app = self._trainer.app()
        return self._trainer

    def __reduce__(self):
        """Pickled as its recipe; unpickled as the process's kept relay (module docstring)."""
        return kept_relay, (self.recipe,)

    def __call__(self, msg: Message, context: Context) -> Message:
        path = context.node_config.get(wire.WORKER_SOCKET)
        if not path:
            if not self._told and not _in_ray_actor():
                log(
                    INFO,
                    "no node worker (node config %r unset): training in this ClientApp "
                    "process, which rebuilds the model every message; start the node with "
                    "`%s` to keep it resident",
                    wire.WORKER_SOCKET,
                    wire.NODE_COMMAND,
                )
                self._told = True
            self.trainer()
            return self._app(msg, context)
        context.run_config = {**context.run_config, **self.overrides}
        timeout = float(context.run_config.get(ROUND_TIMEOUT, DEFAULT_TIMEOUT_S))
        try:
            reply, state = wire.exchange(str(path), msg, context, timeout)
        except wire.WorkerError as err:
            log(WARNING, "%s", err)
            raise
        context.state = state  # SecAgg+ keeps its stage in the node state
        return reply


class Keeper:
    """The relay a process keeps for the ClientApp copies it is handed (module docstring):
    one slot, replaced when a relay of another recipe arrives."""

    def __init__(self) -> None:
        self.relay: Relay | None = None

    def relay_for(self, recipe: Recipe) -> Relay:
        if self.relay is None or self.relay.recipe != recipe:
            self.relay = None  # the old trainer's model goes before the new one is built
            self.relay = Relay(recipe)
        return self.relay


KEPT = Keeper()


def kept_relay(recipe: Recipe) -> Relay:
    """This process's relay for `recipe` (how a pickled relay comes back)."""
    return KEPT.relay_for(recipe)
