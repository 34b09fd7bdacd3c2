"""Exact aggregation (vs FedIT) and chains: merge, rebuild, digest, reach, rank growth."""

import math

import pytest
import torch

from seedlora import (
    KINDS,
    ASpec,
    Link,
    adapter_layers,
    fedit_update,
    inject,
    links_digest,
    mean_update,
    merge_adapters,
    rebuild,
    record_link,
    relative_error,
    set_chain_index,
    weighted_mean,
)

N_CLIENTS = 8
N_IN, N_OUT, RANK, ALPHA = 96, 64, 8, 16.0


@pytest.mark.parametrize("kind", KINDS)
def test_b_only_average_is_exact_and_fedit_is_not(kind):
    gen = torch.Generator().manual_seed(1)
    spec = ASpec(kind, 0, 0, RANK, "l", N_IN, N_OUT)
    a = spec.dense()
    bs = [torch.randn(N_OUT, RANK, generator=gen) for _ in range(N_CLIENTS)]
    weights = [float(w) for w in torch.randint(1, 100, (N_CLIENTS,), generator=gen)]
    scaling = ALPHA / RANK
    exact = mean_update([a] * N_CLIENTS, bs, weights, scaling)
    b_bar = weighted_mean([{"b": b} for b in bs], weights)["b"]
    ours = scaling * b_bar @ a  # float32, as a client or the server computes it
    err = relative_error(ours, exact)
    print(f"{kind}: B-only relative error {err:.2e}")
    assert err <= 1e-6

    a_list = [torch.randn(RANK, N_IN, generator=gen) / math.sqrt(N_IN) for _ in bs]
    fedit_err = relative_error(
        fedit_update(a_list, bs, weights, scaling), mean_update(a_list, bs, weights, scaling)
    )
    print(f"FedIT relative error {fedit_err:.2e}")
    assert fedit_err >= 1e-2


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([{"b": torch.ones(1)}], [0.0])
    with pytest.raises(ValueError):
        weighted_mean([{"b": torch.ones(1)}, {"b": torch.ones(1)}], [1.0, -1.0])
    with pytest.raises(KeyError):
        weighted_mean([{"b": torch.ones(1)}, {"c": torch.ones(1)}], [1.0, 1.0])


def run_chain(factory, targets, kind: str, links: int, seed: int = 0):
    """Server-side chain: random B per link, record, merge, advance. Returns model, links."""
    model = factory()
    inject(model, targets, kind=kind, seed=seed, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    recorded = []
    for c in range(links):
        for _, layer in adapter_layers(model):
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
        recorded.append(record_link(model))
        merge_adapters(model)
        set_chain_index(model, c + 1)
    return model, recorded


@pytest.mark.parametrize("kind", KINDS)
def test_rebuild_is_bitwise_equal(arch, kind):
    factory, targets, _ = arch
    server, links = run_chain(factory, targets, kind, links=3)
    client = rebuild(factory(), links)
    server_w = {n: layer.base.weight for n, layer in adapter_layers(server)}
    client_w = {n: client.get_submodule(n).weight for n in server_w}
    assert all(torch.equal(server_w[n], client_w[n]) for n in server_w)
    assert not torch.equal(
        server_w[next(iter(server_w))], factory().get_submodule(next(iter(server_w))).weight
    )


def test_digest_is_stable_and_sensitive(arch):
    factory, targets, _ = arch
    _, links = run_chain(factory, targets, "gaussian", links=2)
    _, again = run_chain(factory, targets, "gaussian", links=2)
    assert links_digest(links) == links_digest(again)
    assert links_digest(links) != links_digest(links[:1]) != links_digest([])
    assert links_digest(links) != links_digest(links[::-1])
    tampered = dict(links[1].factors)
    first = next(iter(tampered))
    tampered[first] = tampered[first].clone()
    tampered[first][0, 0] += 1e-6
    assert links_digest([links[0], Link(links[1].alpha, links[1].specs, tampered)]) != (
        links_digest(links)
    )


def test_link_header_roundtrip(arch):
    factory, targets, _ = arch
    _, links = run_chain(factory, targets, "random-block", links=1)
    back = Link.from_header(links[0].header(), links[0].factors)
    assert links_digest([back]) == links_digest(links)
    with pytest.raises(KeyError):
        Link.from_header(links[0].header(), {})


def test_circulant_reach_and_rank_growth(arch):
    factory, targets, _ = arch
    n_in = next(iter(adapter_layers(inject_only(factory, targets))))[1].spec.n_in
    num_links = math.ceil(n_in / 4)
    _, links = run_chain(factory, targets, "circulant", links=num_links)
    layer = links[0].specs[0].layer
    covered = set()
    total = torch.zeros(links[0].specs[0].n_out, n_in, dtype=torch.float64)
    for link in links:
        spec = next(s for s in link.specs if s.layer == layer)
        covered |= set(spec.columns().tolist())
        total += 2.0 * link.factors[layer].double() @ spec.dense().double()
    assert covered == set(range(n_in))
    assert int(torch.linalg.matrix_rank(total)) > 4
    assert int(torch.linalg.matrix_rank(total)) == min(total.shape)


def inject_only(factory, targets):
    model = factory()
    inject(model, targets, kind="circulant", seed=0, rank=4, alpha=8)
    return model
