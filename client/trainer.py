"""The trainer: rebuild the global base from the links, train or evaluate B, reply.

One trainer code for every way of running; only who keeps a `Trainer` alive differs. In a
deployment it is the node worker (client/worker.py), which outlives Flower's per-message
ClientApp processes; in the simulation the Ray actor's process (client/compose.py keeps
it across the ClientApps Ray unpickles per message); in the in-process harness the
ClientApp itself. A `Trainer` holds what lives across messages: the resident model
(client/resident.py), the chains its link caches last resolved, and the cache folder a
node without a `cache-dir` of its own uses. The data partition comes from the node config
(`partition-id`, `num-partitions`), the device from the run config (`device`, default
auto: the GPU Ray assigned, else the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from contract import protocol as p
from contract.config import RunConfig
from contract.link_spec import LinkSpec
from contract.worker_wire import CACHE_DIR
from runtime.devices import autocast, check_device, pick_device
from seedlora import a_digest, load_trainable_state
from seedlora.chain import Chain
from tasks.base import TOKENIZED

from . import secure
from .links import LinkCache
from .local import as_floats, cpu_state, release, train_partition
from .model import link_model, link_spec, node_task
from .resident import ResidentModel
from .uploads import fit_rank, pack, residuals


class Trainer:
    """Trains and evaluates for the nodes it is handed messages of (module docstring).

    `overrides` (dash keys) win over each message's run config (see server.app);
    `cache_dir` is the cache folder of nodes whose node config names none."""

    def __init__(self, overrides: Mapping[str, Any] | None, cache_dir: str | os.PathLike):
        self.overrides = dict(overrides or {})
        self.cache_dir = Path(cache_dir)
        self.resident = ResidentModel()
        self.chains: dict[Path, Chain] = {}  # cache folder -> the chain it last resolved

    def config(self, context: Context) -> RunConfig:
        return RunConfig.from_flower({**context.run_config, **self.overrides})

    def cache_for(self, context: Context) -> Path:
        """The node's cache folder: its node config's `cache-dir`, else the trainer's."""
        return Path(context.node_config.get(CACHE_DIR, self.cache_dir))

    def stats(self) -> dict:
        """What this process built so far: device models and tokenized datasets by split."""
        return {"builds": self.resident.builds, "tokenized": dict(TOKENIZED)}

    @contextlib.contextmanager
    def model(
        self, cfg: RunConfig, task, spec: LinkSpec, digest: str, links, device, context: Context
    ) -> Iterator:
        """The resident model of link `spec` on the base `digest` (client.model.link_model)."""
        root = self.cache_for(context)
        with link_model(self.resident, cfg, task, spec, digest, links, device, root) as model:
            yield model

    def train(self, msg: Message, context: Context) -> Message:
        return train_b(self, msg, context, self.config(context))

    def evaluate(self, msg: Message, context: Context) -> Message:
        return evaluate(self, msg, context, self.config(context))

    def secure_train(self, msg: Message, context: Context) -> Message:
        return secure.secure_train(self.model, msg, context, self.config(context))

    def app(self) -> ClientApp:
        """This trainer as a ClientApp: train (SecAgg+ messages through `secure_mod`) and
        evaluate."""
        client_app = ClientApp()

        @client_app.train(mods=[secure.secure_mod(self.secure_train)])
        def _train(msg: Message, context: Context) -> Message:
            return self.train(msg, context)

        @client_app.evaluate()
        def _evaluate(msg: Message, context: Context) -> Message:
            return self.evaluate(msg, context)

        return client_app


@contextlib.contextmanager
def _prepare(trainer: Trainer, msg: Message, context: Context, cfg: RunConfig) -> Iterator[tuple]:
    """(task, model on device with the global state loaded, link spec, partition id,
    device), for the length of this message's work; the model is the trainer's resident
    one, built from the message's link spec."""
    task, partition_id = node_task(context, cfg)
    config = msg.content[p.CONFIG]
    spec = link_spec(config)
    digest = str(config[p.LINKS_DIGEST])
    cache = LinkCache(trainer.cache_for(context), cfg.task.model_name, trainer.chains)
    record = msg.content.config_records.get(p.LINKS)
    links = functools.partial(cache.resolve, record, digest)
    device = check_device(pick_device(cfg.train.device))
    try:
        with trainer.model(cfg, task, spec, digest, links, device, context) as model:
            load_trainable_state(model, msg.content[p.ARRAYS].to_torch_state_dict())
            yield task, model, spec, partition_id, device
    finally:
        release(device)


def _reply(
    msg: Message,
    context: Context,
    spec: LinkSpec,
    partition_id: int,
    records: dict,
    digest: str,
) -> Message:
    links_digest = str(msg.content[p.CONFIG][p.LINKS_DIGEST])
    echo = p.echo_record(spec.chain_index, links_digest, context.run_id, partition_id, digest)
    return Message(RecordDict({**records, p.ECHO: echo}), reply_to=msg)


def train_b(trainer: Trainer, msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train this link's B (and heads) on the local partition; reply with them."""
    t0, started = time.perf_counter(), time.time()
    config = msg.content[p.CONFIG]
    with _prepare(trainer, msg, context, cfg) as (task, resident, spec, partition_id, device):
        digest = a_digest(resident)  # of the link's full-rank A's, once per link (cached)
        received_eval = None  # the model as received, before this client trains it
        if context.node_id in config.get(p.EVALUATE_RECEIVED, []):
            received_eval = _evaluate(task, resident, partition_id, device, cfg)
        model = fit_rank(resident, spec.rank, cfg, context.node_config, partition_id)
        received = {}  # compressed uploads send trained - received; float32 sends the state
        if cfg.upload.upload_codec != "float32":
            received = {k: v.clone() for k, v in cpu_state(model).items()}  # may alias
        global_round = int(config[p.GLOBAL_ROUND])
        mu = float(config.get(p.PROXIMAL_MU, 0.0))
        lr = float(config.get(p.LR, cfg.train.lr))  # the server's schedule sets it per round
        result = train_partition(model, task, partition_id, global_round, cfg, device, mu, lr)
        link = (spec.chain_index, str(config[p.LINKS_DIGEST]), global_round)
        # ArrayRecord serialises, so the reply owns its bytes before the model is released
        # (cpu_state of a float32 CPU model aliases the resident parameters).
        store = residuals(trainer.cache_for(context), context)
        arrays = ArrayRecord(pack(cpu_state(model), received, cfg, store, link))
        del model
    bytes_down = sum(r.count_bytes() for r in msg.content.array_records.values())
    metrics = MetricRecord(
        {
            p.NUM_EXAMPLES: result.num_examples,
            p.TRAIN_LOSS: result.loss,
            p.TRAIN_TIME: time.perf_counter() - t0,
            p.TRAIN_START: started,
            p.BYTES_UP: arrays.count_bytes(),
            p.BYTES_DOWN: bytes_down,
            **({p.DP_WEIGHT: 1.0} if cfg.privacy.dp_clip > 0 else {}),
        }
    )
    records = {p.ARRAYS: arrays, p.METRICS: metrics}
    if received_eval is not None:
        records[p.RECEIVED_EVAL] = received_eval
    return _reply(msg, context, spec, partition_id, records, digest)


def evaluate(trainer: Trainer, msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the global model (base + links + global B) on the local held-out files."""
    with _prepare(trainer, msg, context, cfg) as (task, model, spec, partition_id, device):
        digest = a_digest(model)
        records = {p.METRICS: _evaluate(task, model, partition_id, device, cfg)}
    return _reply(msg, context, spec, partition_id, records, digest)


def _evaluate(task, model, partition_id: int, device, cfg: RunConfig) -> MetricRecord:
    """The metrics of `model` on this partition's held-out data."""
    with autocast(device, cfg.train.precision):
        dataset = task.eval_dataset(partition_id)
        metrics = task.evaluate(model, dataset, cfg.train.eval_batch_size, device)
    return MetricRecord(as_floats(metrics))
