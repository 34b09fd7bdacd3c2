"""The trainer: rebuild the global base from the links, train or evaluate B, reply.

One trainer code for every way of running: the ClientApp (client/app.py) runs it in its
own process in the simulation (a Ray actor lives across messages, so its resident model
does), and hands each message to a node worker (client/worker.py) in a deployment, where
Flower's ClientApp process lives for one message only. The data partition comes from the
node config (`partition-id`, `num-partitions`), the device from the run config (`device`,
default auto: the GPU Ray assigned, else the CPU).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from contract import protocol as p
from contract.config import RunConfig
from contract.link_spec import LinkSpec
from runtime.devices import autocast, check_device, pick_device
from seedlora import a_digest, load_trainable_state

from .links import LinkCache, default_cache_dir
from .local import as_floats, cpu_state, release, train_partition
from .model import link_model, link_spec, node_task
from .secure import secure_mod
from .uploads import fit_rank, pack, residuals


@contextlib.contextmanager
def _prepare(msg: Message, context: Context, cfg: RunConfig) -> Iterator[tuple]:
    """(task, model on device with the global state loaded, link spec, partition id,
    device), for the length of this message's work; the model is this process's resident
    one, built from the message's link spec."""
    task, partition_id = node_task(context, cfg)
    config = msg.content[p.CONFIG]
    spec = link_spec(config)
    digest = str(config[p.LINKS_DIGEST])
    root = context.node_config.get("cache-dir", default_cache_dir())
    cache = LinkCache(root, cfg.task.model_name)
    record = msg.content.config_records.get(p.LINKS)
    links = functools.partial(cache.resolve, record, digest)
    device = check_device(pick_device(cfg.train.device))
    try:
        with link_model(cfg, task, spec, digest, links, device, root) as model:
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


def train_b(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train this link's B (and heads) on the local partition; reply with them."""
    t0, started = time.perf_counter(), time.time()
    config = msg.content[p.CONFIG]
    with _prepare(msg, context, cfg) as (task, resident, spec, partition_id, device):
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
        arrays = ArrayRecord(pack(cpu_state(model), received, cfg, residuals(context), link))
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


def evaluate(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Evaluate the global model (base + links + global B) on the local held-out files."""
    with _prepare(msg, context, cfg) as (task, model, spec, partition_id, device):
        digest = a_digest(model)
        records = {p.METRICS: _evaluate(task, model, partition_id, device, cfg)}
    return _reply(msg, context, spec, partition_id, records, digest)


def _evaluate(task, model, partition_id: int, device, cfg: RunConfig) -> MetricRecord:
    """The metrics of `model` on this partition's held-out data."""
    with autocast(device, cfg.train.precision):
        dataset = task.eval_dataset(partition_id)
        metrics = task.evaluate(model, dataset, cfg.train.eval_batch_size, device)
    return MetricRecord(as_floats(metrics))


def build_trainer_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """The trainer as a ClientApp (train and evaluate); `overrides` (dash keys) win over
    the run config (see server.app)."""
    client_app = ClientApp()

    def config(context: Context) -> RunConfig:
        return RunConfig.from_flower({**context.run_config, **(overrides or {})})

    @client_app.train(mods=[secure_mod(config)])
    def _train(msg: Message, context: Context) -> Message:
        return train_b(msg, context, config(context))

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, config(context))

    return client_app
