"""The client's side of SecAgg+ (server/secure.py says why it is the legacy API).

`secure_mod` is a train mod: a message that carries SecAgg+ protocol configs goes through
Flower's `secaggplus_mod` around `secure_train`, which reads the legacy FitIns (global B
and heads as a list, link and links in the fit config), trains like `train_b`, and
answers with a legacy FitRes; every other message goes to the normal train handler.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from contract import protocol as p
from contract.config import RunConfig
from runtime.devices import check_device, pick_device
from seedlora import links_digest, load_trainable_state
from seedlora.serialize import links_from_bytes

from .local import cpu_state, release, train_partition
from .model import node_task

# (cfg, task, link config, links, device, context) -> the resident model (Trainer.model)
ModelFor = Callable[..., AbstractContextManager]


def secure_train(model_for: ModelFor, msg: Message, context: Context, cfg: RunConfig) -> Message:
    """Train on the legacy FitIns of a SecAgg+ round, on the resident model `model_for`
    gives (the trainer's); reply with a legacy FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = fitins.config
    task, partition_id = node_task(context, cfg)

    def links() -> list:
        _, sent = links_from_bytes(bytes(config[p.SECURE_LINKS]))
        if links_digest(sent) != config[p.LINKS_DIGEST]:
            raise ValueError("secure round: the sent links do not hash to the links digest")
        return sent

    device = check_device(pick_device(cfg.train.device))
    with model_for(cfg, task, config, links, device, context) as model:
        names = [n for n, q in model.named_parameters() if q.requires_grad]
        arrays = parameters_to_ndarrays(fitins.parameters)
        load_trainable_state(model, dict(zip(names, arrays, strict=True)))
        server_round = int(config[p.SERVER_ROUND])
        lr = float(config.get(p.LR, cfg.train.lr))
        result = train_partition(model, task, partition_id, server_round, cfg, device, lr=lr)
        state = [v.numpy().copy() for v in cpu_state(model).values()]  # owned, not aliased
    release(device)
    fitres = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(state),
        num_examples=result.num_examples,
        metrics={p.TRAIN_LOSS: result.loss},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secure_mod(train: Callable[[Message, Context], Message]):
    """A train mod: SecAgg+ messages through Flower's `secaggplus_mod` to `train` (a
    trainer's `secure_train`), the rest to the normal handler."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        return secaggplus_mod(msg, context, train)

    return mod
