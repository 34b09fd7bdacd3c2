"""The composition root of the client side: the trainer, the relay and the node worker.

Every way of running builds its client pieces here, so the simulation and the deployment
run the same trainer code:

- `build_trainer`: a `Trainer` (client/trainer.py), what trains and evaluates;
- `build_client_app`: the ClientApp, a `Relay` (client/relay.py) to the node's worker, or
  to its own trainer where there is none (the simulation, the in-process harness);
- `worker_app`: what the node worker (client/worker.py) serves relayed messages with:
  the trainer it keeps resident (or a test's app).

What a piece needs is passed in: the run-config overrides and the cache folder (link
cache, master files, upload residuals) of nodes whose node config names no `cache-dir`.
`default_cache_dir` reads `$SEEDLORA_CACHE` here and nowhere else. This module imports
no torch: the relay's path must stay light (the trainer is imported when first built).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from contract import protocol as p

from .relay import Recipe, Relay

if TYPE_CHECKING:
    from .trainer import Trainer

CACHE_ENV = "SEEDLORA_CACHE"  # the user's default cache folder
TRAINER = "trainer"  # build_worker's app: the project's trainer


def default_cache_dir() -> Path:
    """The cache folder of a node given none: $SEEDLORA_CACHE, else ~/.cache/seedlora."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "seedlora"))


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def build_trainer(
    overrides: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> Trainer:
    """A trainer: `overrides` (dash keys) win over each message's run config."""
    return Recipe(dict(overrides or {}), str(_cache(cache_dir))).trainer()


def build_trainer_app(
    overrides: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> ClientApp:
    """A trainer as a ClientApp (train and evaluate, in this process)."""
    return build_trainer(overrides, cache_dir).app()


def build_client_app(
    overrides: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None
) -> ClientApp:
    """The ClientApp: train and evaluate through a `Relay`, and the partition query
    (strategies/sampling.py) answered here, since it needs no model."""
    client_app = ClientApp()
    relay = Relay(Recipe(dict(overrides or {}), str(_cache(cache_dir))))

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


def load_app(ref: str) -> ClientApp:
    """The ClientApp a `module:factory` reference builds (a test's or benchmark's app)."""
    module, _, factory = ref.partition(":")
    return getattr(importlib.import_module(module), factory)()


def worker_app(app: str = TRAINER, cache_dir: str | os.PathLike | None = None):
    """What the node worker serves (client/worker.py): (ClientApp, stats). The project's
    trainer (`app` TRAINER; stats: its builds and tokenizations, logged per message), or
    the ClientApp `app` names (module:factory; no stats)."""
    if app == TRAINER:
        trainer = build_trainer(None, cache_dir)
        return trainer.app(), trainer.stats
    stats: Callable[[], dict] = dict
    return load_app(app), stats
