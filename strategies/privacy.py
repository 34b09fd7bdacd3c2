"""Client-level differential privacy with Flower's own message-API wrapper and accountant.

Each link's inner strategy (FedAvg or FedProx) is wrapped in Flower's
`DifferentialPrivacyServerSideFixedClipping`: every client's update (its trained state
minus the global state, B and heads together) is clipped to L2 norm `dp-clip`, the
updates are averaged with equal weights, and Gaussian noise of std
`dp-noise-multiplier * dp-clip / n` (n = clients sampled per round) is added to each
coordinate of the average. Because the rule is linear in B (s = `spec.scaling(alpha)`, the
layer's scale),

    s (mean_i B_i + N) A = mean_i s B_i A + s N A,

the noised B aggregate is exactly the noised weight-space aggregate: the noise lives in
the r-dimensional B coordinates, and A maps it to weights like any update.

Accounting is Flower's RDP accountant (`flwr.supercore.privacy_accounting`, backed by
Google's dp-accounting, the `flwr[dp]` extra): one Gaussian release per aggregated round,
no sampling amplification claimed, add-or-remove-one client neighbours. Flower's wrapper
can account itself, but it keys its pending events by round number, and the chain
wrapper numbers rounds per link; so the run-wide count of releases is kept here and
epsilon is recomputed from it (all releases are identical).

Noise. Flower draws it from numpy's global RNG and takes no generator. By default it
stays that way (fresh entropy: reruns differ). With `SEEDLORA_DP_NOISE_SEED` set in the
ServerApp's environment, each release's noise comes from numpy's RNG seeded from that
secret and the release number (`seeded_numpy`), so a run can be reproduced bit for bit.
It is deliberately not the run's public `seed`: noise anyone can recompute can be
subtracted from the released model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from contract.config import RunConfig, RunConfigError
from contract.protocol import DP_WEIGHT
from seedlora.spec import derive_seed

NOISE_SEED_ENV = "SEEDLORA_DP_NOISE_SEED"  # server-only secret: reproducible DP noise
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


def noise_seed() -> int | None:
    """The server's secret DP noise seed (`SEEDLORA_DP_NOISE_SEED`), None when unset.

    Never the run's `seed`: that one is public (every client gets the run config and
    derives A from it), and noise anyone can recompute is noise anyone can subtract, which
    would void the guarantee. Set it only in the ServerApp's environment.
    """
    raw = os.environ.get(NOISE_SEED_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise RunConfigError(f"{NOISE_SEED_ENV}: expected an integer, got {raw!r}") from None


@contextmanager
def seeded_numpy(secret: int, release: int) -> Iterator[None]:
    """numpy's global RNG seeded from (secret, release number), restored on exit.

    Flower 1.42 draws the noise with `np.random.normal` (numpy's global RNG, in
    `flwr.supercore.differential_privacy.add_gaussian_noise_inplace`) and takes no
    generator, so the wrapper's aggregation runs inside this: the noise of release t is a
    function of the secret and t (the same after a resume, which restores the count),
    and nothing else in the process sees a changed stream.
    """
    state = np.random.get_state()
    np.random.seed(derive_seed("dp-noise", secret, release) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


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
        self.noise_seed = noise_seed()

    def aggregate_train(
        self, server_round: int, replies
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies: list[Message] = list(replies)
        seeded = self.noise_seed is not None
        release = self.ledger.releases + 1
        with seeded_numpy(self.noise_seed, release) if seeded else contextlib.nullcontext():
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
