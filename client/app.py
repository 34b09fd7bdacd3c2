"""The ClientApp: a thin relay to the node's resident trainer (client/trainer.py).

In a deployment Flower starts a fresh `flwr-clientapp` process for every message, so a
model built there would be rebuilt, and the data re-tokenized, for every message. The
data owner therefore runs `python -m client.node`, which keeps a node worker
(client/worker.py) beside the SuperNode and tells the SuperNode where it listens (node
config `worker-socket`); this app hands each train or evaluate message to that worker
over the Unix socket and returns its reply. Its import path is Flower and the standard
library only: no torch, no transformers.

Without `worker-socket` (the simulation, the in-process harness, a plain
`flower-supernode`) the trainer runs in this process, as it always did: in the simulation
the Ray actor lives across messages, so its resident model does too. A deployed node
started without the worker says so in one log line per message (each message is a new
process), naming the command. With
`worker-socket` set and no worker answering, the message fails naming the command rather
than building the model here beside a worker that may hold the device (the server logs
the error; the node's next message tries the worker again). A worker that does not answer
within the round's `round-timeout` fails the message the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from contract import protocol as p
from contract import worker_wire as wire

ROUND_TIMEOUT = "round-timeout"  # run config: how long the server waits for a reply
DEFAULT_TIMEOUT_S = 600.0  # contract.config's default round-timeout


def _in_ray_actor() -> bool:
    """True in the simulation's Ray actors, which keep the trainer alive themselves."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class Relay:
    """Hands train and evaluate messages to the node worker, or to a trainer in this
    process when the node config names none. `overrides` (dash keys) win over the run
    config (see server.app)."""

    def __init__(self, overrides: Mapping[str, Any] | None = None):
        self.overrides = dict(overrides or {})
        self._trainer: ClientApp | None = None
        self._told = False

    def trainer(self) -> ClientApp:
        if self._trainer is None:
            from .trainer import build_trainer_app  # torch and the model: only here

            self._trainer = build_trainer_app(self.overrides)
        return self._trainer

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
            return self.trainer()(msg, context)
        context.run_config = {**context.run_config, **self.overrides}
        timeout = float(context.run_config.get(ROUND_TIMEOUT, DEFAULT_TIMEOUT_S))
        try:
            reply, state = wire.exchange(str(path), msg, context, timeout)
        except wire.WorkerError as err:
            log(WARNING, "%s", err)
            raise
        context.state = state  # SecAgg+ keeps its stage in the node state
        return reply


def build_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp: train and evaluate through the `Relay`, and the partition query
    (strategies/sampling.py) answered here, since it needs no model."""
    client_app = ClientApp()
    relay = Relay(overrides)

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return relay(msg, context)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return relay(msg, context)

    @client_app.query(p.PARTITION_ACTION)
    def _partition(msg: Message, context: Context) -> Message:
        """The server's seeded sampling orders nodes by partition (strategies/sampling.py)."""
        partition = int(context.node_config.get("partition-id", 0))
        echo = ConfigRecord({p.PARTITION_ID: partition})
        return Message(RecordDict({p.ECHO: echo}), reply_to=msg)

    return client_app


app = build_client_app()
