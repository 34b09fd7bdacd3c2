"""Secure aggregation (SecAgg+) of the B-only updates: the server sees only their sum.

In Flower 1.42 SecAgg+ exists only for the legacy API: the server side is
`flwr.server.workflow.SecAggPlusWorkflow` inside a `DefaultWorkflow` driven by a
`LegacyContext` and a legacy `flwr.server.strategy.FedAvg`; the client side is the
`flwr.client.mod.secaggplus_mod` mod around a train handler that speaks the legacy
FitIns/FitRes records. No message-API strategy (`flwr.serverapp.strategy`) can run it.
So with `secure-aggregation = true` each chain link runs as one such workflow: the
initial parameters are the zero B's (and current heads), the link's A-spec, links digest
and merged links travel in the fit config, and after `rounds-per-link` rounds the
securely averaged B is merged exactly as in the plain path: `SecureRounds` is the second
`LinkRunner` of `server.chain_server.run_chain`, whose one step is a whole link.

What is lost: the per-reply checks (shapes, NaN, stale link, outliers) cannot look at an
individual update, which is the point of SecAgg+; the workflow only drops clients that
fail its protocol. Each client multiplies its values by num-examples / `secagg-max-weight`,
clips them to +-`secagg-clipping-range` and quantizes them to 22 bits (stochastic
rounding), so the average is exact up to that quantization: B values are small, so the
range defaults to 1.0 (Flower's 8.0 would waste 3 bits), and the max weight should be
near the real largest num-examples.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from contract import protocol as p
from seedlora.serialize import links_to_bytes

from .chain_server import ChainServer
from .state import RoundResult

PARAMETERS = "parameters"  # where the legacy workflow keeps the global parameters


class SecureRounds:
    """The SecAgg+ `LinkRunner`: a link's rounds run inside one legacy workflow."""

    def __init__(self, grid: Grid, context: Context):
        self.grid, self.context = grid, context

    def open_link(self, server: ChainServer) -> SecureLink:
        return SecureLink(server, self.grid, self.context)


class SecureLink:
    def __init__(self, server: ChainServer, grid: Grid, context: Context):
        self.server, self.grid, self.context = server, grid, context
        self.links_blob = links_to_bytes(server.state.links)  # serialized once per link

    def _fit_config(self, server_round: int) -> dict:
        s = self.server.state
        return {
            **self.server.link_config(),
            p.SERVER_ROUND: s.global_round + server_round,
            p.LR: self.server.round_lr(s.global_round + server_round),
            p.CHAIN_INDEX: s.chain_index,
            p.LINKS_DIGEST: s.links.digest,
            p.SECURE_LINKS: self.links_blob,  # the legacy config is flat: all links
        }

    def run_round(self, link_round: int, arrays: dict[str, torch.Tensor]) -> RoundResult:
        """All rounds of the link from `link_round` on: one step of the chain loop."""
        cfg = self.server.cfg
        rounds = cfg.schedule[1] - link_round + 1  # ffa runs all rounds as one link
        names = list(arrays)
        strategy = FedAvg(
            fraction_fit=cfg.strategy.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=cfg.strategy.min_replies,
            min_available_clients=cfg.strategy.min_available_nodes,
            initial_parameters=ndarrays_to_parameters([arrays[k].numpy() for k in names]),
            on_fit_config_fn=self._fit_config,
        )
        legacy = LegacyContext(self.context, ServerConfig(num_rounds=rounds), strategy)
        sec = cfg.secagg
        workflow = SecAggPlusWorkflow(
            num_shares=sec.secagg_num_shares,
            reconstruction_threshold=sec.secagg_threshold,
            max_weight=sec.secagg_max_weight,
            clipping_range=sec.secagg_clipping_range,
        )
        DefaultWorkflow(fit_workflow=workflow)(self.grid, legacy)
        record = legacy.state.array_records[PARAMETERS]
        final = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        averaged = {
            k: torch.from_numpy(np.asarray(v, dtype=np.float32))
            for k, v in zip(names, final, strict=True)
        }
        return RoundResult(arrays=averaged, rounds=rounds)
