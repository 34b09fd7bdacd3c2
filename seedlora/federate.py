"""One federated round and one link close: the core's federated loop without Flower.

Every party builds the same adapted model (`prepare` or `inject`: same seed, targets,
rank and alpha give the same A). A round is: each client loads the global trainable
state, trains, and returns `trainable_state(model)`; the server averages them with
`round_average` and loads the result. After K rounds, `close_link` folds the averaged
s B A (s = `spec.scaling(alpha)` per layer) into the base, records it as a `Link` and moves
every adapter on to the next A with B = 0:

    links = []
    for _ in range(num_links):
        for _ in range(rounds):
            states = [train(client, global_state) for client in clients]  # your code
            global_state = round_average(states, weights)
            load_trainable_state(model, global_state)
        links.append(close_link(model))
        global_state = trainable_state(model)  # B = 0 at the next A; heads kept

`rebuild(W0, links)` on any other party then gives the server's base bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .aggregate import weighted_mean
from .chain import Link, apply_link, record_link
from .injection import set_chain_index


def round_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The round's global state: the weighted mean of the clients' trainable states.

    Exact in weight space for the trained factor (every client shares the frozen one),
    and FedAvg for the heads.

    Args:
        states: one `trainable_state(model)` per client, all with the same keys.
        weights: one weight per client (e.g. its number of examples), >= 0, positive sum.

    Returns:
        name -> mean tensor (state 0's dtype and device), ready for `load_trainable_state`.
        Raises ValueError on no states or bad weights, KeyError if the keys differ.
    """
    if not states:
        raise ValueError("round_average: no client states")
    return weighted_mean(states, weights)


def close_link(model: nn.Module) -> Link:
    """Merge the model's current link into its base and move on to the next one.

    Records the adapters' trained factors as a `Link` (float32, as they travel), merges
    that link into the base weights exactly as `rebuild` does on another party, then sets
    every adapter to the next chain index (the next A, trained factor back to zero). Heads
    (fully trained modules) are left as they are.

    Args:
        model: a model with adapters (`inject` / `prepare` with a B-only method), holding
            the averaged state (`load_trainable_state(model, round_average(...))`).

    Returns:
        The link; keep the list of them to rebuild, resume or export (`export_peft`).
        Raises ValueError if the model has no adapters.
    """
    link = record_link(model)
    apply_link(model, link)
    set_chain_index(model, link.chain_index + 1)  # the merged factor is in the base: zero it
    return link
