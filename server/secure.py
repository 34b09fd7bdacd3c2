"""Secure aggregation (SecAgg+) of the B-only updates: the server sees only their sum.

In Flower 1.41 SecAgg+ exists only for the legacy API: the server side is
`flwr.server.workflow.SecAggPlusWorkflow` inside a `DefaultWorkflow` driven by a
`LegacyContext` and a legacy `flwr.server.strategy.FedAvg`; the client side is the
`flwr.client.mod.secaggplus_mod` mod around a train handler that speaks the legacy
FitIns/FitRes records. No message-API strategy (`flwr.serverapp.strategy`) can run it.
So with `secure-aggregation = true` each chain link runs as one such workflow: the
initial parameters are the zero B's (and current heads), the link's A-spec, links digest
and merged links travel in the fit config, and after `rounds-per-link` rounds the
securely averaged B is merged exactly as in the plain path (`ChainServer.close_link`).

What is lost: the per-reply checks (shapes, NaN, stale link, outliers) cannot look at an
individual update, which is the point of SecAgg+; the workflow only drops clients that
fail its protocol. Each client multiplies its values by num-examples / `secagg-max-weight`,
clips them to +-`secagg-clipping-range` and quantizes them to 22 bits (stochastic
rounding), so the average is exact up to that quantization: B values are small, so the
range defaults to 1.0 (Flower's 8.0 would waste 3 bits), and the max weight should be
near the real largest num-examples.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from contract import protocol as p
from seedlora import links_digest
from seedlora.serialize import links_to_bytes

from .chain_server import ChainServer

PARAMETERS = "parameters"  # where the legacy workflow keeps the global parameters


def _fit_config(server: ChainServer, server_round: int) -> dict:
    s = server.state
    return {
        **server.link_config(),
        p.SERVER_ROUND: s.global_round + server_round,
        p.CHAIN_INDEX: s.chain_index,
        p.LINKS_DIGEST: links_digest(s.links),
        p.SECURE_LINKS: links_to_bytes(s.links),  # the legacy config is flat: all links
    }


def run_link(server: ChainServer, grid: Grid, context: Context) -> None:
    """One chain link of `rounds-per-link` SecAgg+ rounds; leaves the average in state."""
    cfg, s = server.cfg, server.state
    _, rounds = cfg.schedule  # ffa runs all rounds as one link
    names = list(s.arrays)
    initial = [s.arrays[k].numpy() for k in names]
    strategy = FedAvg(
        fraction_fit=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=cfg.min_replies,
        min_available_clients=cfg.min_available_nodes,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=lambda rnd: _fit_config(server, rnd),
    )
    legacy = LegacyContext(context, ServerConfig(num_rounds=rounds), strategy)
    workflow = SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares,
        reconstruction_threshold=cfg.secagg_threshold,
        max_weight=cfg.secagg_max_weight,
        clipping_range=cfg.secagg_clipping_range,
    )
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    record = legacy.state.array_records[PARAMETERS]
    final = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
    s.arrays = {
        k: server.state.arrays[k].new_tensor(np.asarray(v, dtype=np.float32))
        for k, v in zip(names, final, strict=True)
    }
    s.global_round += rounds
    s.round_in_link = rounds


def run_secure(server: ChainServer, grid: Grid, context: Context) -> None:
    """The whole chain with SecAgg+ rounds; central evaluation after every link."""
    num_links, _ = server.cfg.schedule
    if not server.history:
        server.history.append({"round": 0, "link": 0, "central": server.central_eval()})
    while server.state.chain_index < num_links:
        link = server.state.chain_index
        run_link(server, grid, context)
        entry = {"round": server.state.global_round, "link": link, "secure": True}
        server.history.append({**entry, "central": server.central_eval()})
        log(INFO, "secure link %d | central %s", link, server.history[-1]["central"])
        server.close_link()
    server.finish()
