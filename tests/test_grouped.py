"""Sibling groups (q/k/v, gate/up) as one node: the same loss and gradients as one node
per layer, fewer autograd nodes, and exact outputs however the siblings are called."""

import copy

import pytest
import torch

from seedlora import KINDS, inject
from seedlora.grouped import group_siblings, ungroup
from seedlora.injection import adapter_layers
from testing.tiny import LLAMA_TARGETS, tiny_llama


def adapted(kind: str, chain_index: int, rank: int = 4):
    """A tiny Llama with every projection adapted and every B non-zero."""
    model = tiny_llama()
    inject(model, list(LLAMA_TARGETS), kind=kind, seed=5, rank=rank, alpha=8.0)
    torch.manual_seed(3)
    for _, layer in adapter_layers(model):
        layer.set_spec(layer.spec.__class__(**{**vars(layer.spec), "chain_index": chain_index}))
        with torch.no_grad():
            layer.lora_B.normal_(std=0.5)
    return model.train()


def step(model, ids):
    """(loss, every B's gradient) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), [layer.lora_B.grad.clone() for _, layer in adapter_layers(model)]


def count_nodes(loss: torch.Tensor, name: str) -> int:
    """Autograd nodes whose class name contains `name`, reachable from `loss`."""
    seen, stack, hits = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        hits += name in type(node).__name__
        stack.extend(nxt for nxt, _ in node.next_functions)
    return hits


# circulant at link 0: one shared contiguous block; link 5 (rank 4, n_in 24): offset 20,
# wraps; random-block: a block per layer, concatenated and gathered.
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chain_index", [0, 5])
def test_grouped_matches_ungrouped(kind, chain_index):
    ids = torch.randint(97, (2, 9), generator=torch.Generator().manual_seed(0))
    single = adapted(kind, chain_index)
    grouped = copy.deepcopy(single)
    groups = group_siblings(grouped)
    assert groups == [
        [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        if j == 0
        else [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj")]
        for i in range(2)
        for j in range(2)
    ]
    want_loss, want = step(single, ids)
    got_loss, got = step(grouped, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want, strict=True):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)  # summation order


def test_grouping_cuts_autograd_nodes():
    ids = torch.randint(97, (2, 9), generator=torch.Generator().manual_seed(0))
    model = adapted("gaussian", 0)
    loss = model(input_ids=ids, labels=ids).loss
    assert count_nodes(loss, "BOnlyLinear") == 14  # 7 layers x 2 blocks
    group_siblings(model)
    loss = model(input_ids=ids, labels=ids).loss
    assert count_nodes(loss, "GroupedBOnlyLinear") == 4  # qkv and gate/up, 2 blocks
    assert count_nodes(loss, "BOnlyLinear") == 4 + 4  # the grouped ones + o and down
    ungroup(model)
    loss = model(input_ids=ids, labels=ids).loss
    assert count_nodes(loss, "GroupedBOnlyLinear") == 0


@pytest.mark.parametrize("kind", ["gaussian", "random-block"])
def test_a_member_called_alone_or_on_other_tensors_is_exact(kind):
    model = adapted(kind, 1)
    group_siblings(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 24)
    q = attn.q_proj(x)
    with torch.no_grad():  # B changes after the group computed k and v for this x
        attn.k_proj.lora_B.add_(1.0)
    k = attn.k_proj(x)  # must not return the stale pending output
    for layer, got in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, attn.v_proj(x.clone()))):
        layer.fused = False  # the reference path, outside the group
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-6)
        layer.fused = True


def test_grouped_under_autocast_matches_ungrouped():
    ids = torch.randint(97, (2, 9), generator=torch.Generator().manual_seed(0))
    single = adapted("gaussian", 0)
    grouped = copy.deepcopy(single)
    group_siblings(grouped)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = step(single, ids)
        got_loss, got = step(grouped, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2)


def test_a_deep_copy_of_a_grouped_model_runs_its_own_groups():
    """Clients copy resident models: the copy's groups must hold the copy's layers."""
    ids = torch.randint(97, (2, 9), generator=torch.Generator().manual_seed(0))
    model = adapted("circulant", 0)
    group_siblings(model)
    clone = copy.deepcopy(model)
    attn = clone.model.layers[0].self_attn
    assert (
        attn.q_proj.group is attn.k_proj.group is not model.model.layers[0].self_attn.q_proj.group
    )
    assert all(
        m is getattr(attn, n)
        for m, n in zip(attn.q_proj.group.members, ("q_proj", "k_proj", "v_proj"), strict=True)
    )
    torch.testing.assert_close(step(clone, ids)[0], step(model, ids)[0], rtol=0, atol=0)


def test_grouping_again_keeps_the_groups_and_their_plans():
    """client.local groups the model every round: a second call must keep each group and
    its plans (a kept CUDA graph reads their tensors); after `ungroup` new groups come."""
    ids = torch.randint(97, (2, 9), generator=torch.Generator().manual_seed(0))
    model = adapted("gaussian", 0)
    first = group_siblings(model)
    want = step(model, ids)[0]  # builds each group's plan
    groups = {n: layer.group for n, layer in adapter_layers(model) if layer.group is not None}
    plans = {id(g): g.plan(torch.empty(0, 24)) for g in groups.values()}
    assert len(groups) == 10 and all(g._plans for g in groups.values())
    assert group_siblings(model) == first  # the same groups are reported
    for name, layer in adapter_layers(model):
        if name in groups:
            assert layer.group is groups[name]
            assert layer.group.plan(torch.empty(0, 24)) is plans[id(layer.group)]
    torch.testing.assert_close(step(model, ids)[0], want, rtol=0, atol=0)
    ungroup(model)
    group_siblings(model)
    assert all(layer.group is not groups[n] for n, layer in adapter_layers(model) if n in groups)
