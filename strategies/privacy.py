"""Client-level differential privacy with Flower's own message-API wrapper and accountant.

Each link's inner strategy (FedAvg or FedProx) is wrapped in Flower's
`DifferentialPrivacyServerSideFixedClipping`: every client's update (its trained state
minus the global state, B and heads together) is clipped to L2 norm `dp-clip`, the
updates are averaged with equal weights, and Gaussian noise of std
`dp-noise-multiplier * dp-clip / n` (n = clients sampled per round) is added to each
coordinate of the average. Because the rule is linear in B,

    (alpha/r) (mean_i B_i + N) A = mean_i (alpha/r) B_i A + (alpha/r) N A,

the noised B aggregate is exactly the noised weight-space aggregate: the noise lives in
the r-dimensional B coordinates, and A maps it to weights like any update.

Accounting is Flower's RDP accountant (`flwr.supercore.privacy_accounting`, backed by
Google's dp-accounting, the `flwr[dp]` extra): one Gaussian release per aggregated round,
no sampling amplification claimed, add-or-remove-one client neighbours. Flower's wrapper
can account itself, but it keys its pending events by round number, and the chain
wrapper numbers rounds per link; so the run-wide count of releases is kept here and
epsilon is recomputed from it (all releases are identical).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from contract.config import RunConfig
from contract.protocol import DP_WEIGHT

EPSILON = "dp-epsilon"  # train metric: cumulative epsilon at dp-delta after this round
DP_STRATEGIES = ("fedavg", "fedprox")


def epsilon(noise_multiplier: float, releases: int, sample: int, population: int, delta: float):
    """Cumulative epsilon at `delta` after `releases` identical Gaussian releases."""
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    config = PrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    accountant = RdpAccountant(config)
    event = GaussianPrivacyEvent(noise_multiplier, sample, population)
    accountant.compose(event, count=releases)
    return accountant.get_epsilon(delta)


@dataclass
class PrivacyLedger:
    """Releases so far in this run (all links): what epsilon is computed from."""

    releases: int = 0


class PrivateLink(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper, charging the run's ledger per release."""

    def __init__(self, inner: Strategy, cfg: RunConfig, sample: int, population: int, ledger):
        super().__init__(inner, cfg.privacy.dp_noise_multiplier, cfg.privacy.dp_clip, sample)
        self.population = population
        self.delta = cfg.privacy.dp_delta
        self.ledger = ledger

    def aggregate_train(
        self, server_round: int, replies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies: list[Message] = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.ledger.releases += 1
            metrics = MetricRecord(dict(metrics or {}))
            metrics[EPSILON] = epsilon(
                self.noise_multiplier,
                self.ledger.releases,
                self.num_sampled_clients,
                self.population,
                self.delta,
            )
        return arrays, metrics


def sample_size(cfg: RunConfig, num_nodes: int) -> int:
    """Clients FedAvg samples per round from `num_nodes` (its own rule)."""
    return max(int(num_nodes * cfg.strategy.fraction_train), cfg.strategy.min_replies)


def wrap(inner: Strategy, cfg: RunConfig, num_nodes: int, ledger: PrivacyLedger) -> Strategy:
    """`inner` with client-level DP when `dp-clip` > 0; else `inner` unchanged."""
    if cfg.privacy.dp_clip <= 0:
        return inner
    if not isinstance(inner, FedAvg):
        raise TypeError(f"strategy: DP needs one of {DP_STRATEGIES}")
    inner.weighted_by_key = DP_WEIGHT  # every client reports 1: equal weights
    population = max(num_nodes, cfg.strategy.min_available_nodes)
    return PrivateLink(inner, cfg, sample_size(cfg, population), population, ledger)
