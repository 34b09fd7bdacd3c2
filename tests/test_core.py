"""seedcore: seeded A0 and B0, trained r x r core R; exact averaging, merges, chains, export,
upload size and an in-process federated run."""

import copy

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

from contract import protocol as p
from contract.config import RunConfig, RunConfigError, UploadConfig
from seedlora import (
    KINDS,
    CoreLoRALayer,
    Link,
    a_digest,
    adapter_layers,
    export_peft,
    links_digest,
    load_trainable_state,
    merge_adapters,
    prepare,
    rebuild,
    record_link,
    relative_error,
    round_average,
    set_chain_index,
    trainable_state,
)
from seedlora.core import b_spec, lift
from seedlora.spec import ASpec
from server.report import adapter_summary
from testing.tiny import GPT2_TARGETS, tiny_gpt2
from tests import test_app_local as app_tests
from tests.test_app_local import run, weighted_replies

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)
IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def core_model(factory, targets, kind, **kw):
    return prepare(factory(), "seedcore", targets, kind=kind, seed=1, rank=4, alpha=8.0, **kw)


def randomize_r(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=gen) * 0.3)


def dense_update(spec: ASpec, core: torch.Tensor, scaling: float) -> torch.Tensor:
    """s B0 R A0 in float64, from dense factors (the definition, not the code's path)."""
    b0 = b_spec(spec).dense().t().double()  # (n_out, r)
    return scaling * b0 @ core.double() @ spec.dense().double()


@pytest.mark.parametrize("kind", KINDS)
def test_mean_of_r_is_the_mean_update(kind):
    """Averaging R is averaging the weight updates: s B0 mean(R_i) A0 = mean(s B0 R_i A0)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64))
    prepare(model, "seedcore", ["0"], kind=kind, seed=2, rank=8, alpha=16.0)
    layer = model.get_submodule("0")
    w0 = layer.base.weight.detach().double().clone()
    states = [{"0.lora_R": torch.randn(8, 8, generator=gen)} for _ in range(6)]
    weights = [float(w) for w in torch.randint(1, 50, (6,), generator=gen)]
    total = sum(weights)
    exact = sum(
        w / total * dense_update(layer.spec, s["0.lora_R"], layer.scaling)
        for w, s in zip(weights, states, strict=True)
    )
    load_trainable_state(model, round_average(states, weights))
    merge_adapters(model)
    err = relative_error(layer.base.weight.double() - w0, exact)
    print(f"{kind}: seedcore relative error {err:.2e}")
    assert err <= 1e-6 and exact.abs().max() > 0.01


@pytest.mark.parametrize("kind", KINDS)
def test_forward_merge_rebuild_and_next_link_agree(arch, kind):
    factory, targets, _ = arch
    model = core_model(lambda: factory().double(), targets, kind)
    layers = dict(adapter_layers(model))
    assert all(isinstance(m, CoreLoRALayer) for m in layers.values())
    trained = [(n, q.shape) for n, q in model.named_parameters() if q.requires_grad]
    assert all(n.endswith("lora_R") and s == (4, 4) for n, s in trained)
    randomize_r(model)
    out = model(IDS).logits
    assert relative_error(out, factory().double()(IDS).logits) > 1e-3  # R moved the output
    link = record_link(model)
    assert link.frozen == "AB" and link.header()["frozen"] == "AB"
    merged = copy.deepcopy(model)
    merge_adapters(merged)
    assert relative_error(merged(IDS).logits, out) <= 1e-6  # merge == forward
    pristine = factory().double()
    for name, layer in adapter_layers(merged):
        w = layer.base.weight - pristine.get_submodule(name).weight
        w = w.T if isinstance(layer.base, Conv1D) else w  # Conv1D stores W transposed
        expected = dense_update(layers[name].spec, link.factors[name], layers[name].scaling)
        assert relative_error(w, expected) <= 1e-6
        assert relative_error(layers[name].delta_weight().double(), expected) <= 1e-6
    rebuilt = rebuild(factory().double(), [link])  # another party, from the link alone
    for name, layer in adapter_layers(merged):
        assert torch.equal(rebuilt.get_submodule(name).weight, layer.base.weight)
    before = a_digest(merged)
    set_chain_index(merged, 1)  # the next link: new A0 and B0, R back to zero
    assert all(m.spec.chain_index == 1 and not m.lora_R.any() for _, m in adapter_layers(merged))
    assert a_digest(merged) != before
    plain = Link(link.alpha, link.specs, link.factors)  # same numbers, another role
    assert links_digest([plain]) != links_digest([link])
    assert Link.from_header(link.header(), link.factors).frozen == "AB"


@pytest.mark.parametrize("kind", KINDS)
def test_r_starts_at_zero_with_a_nonzero_gradient(kind):
    model = core_model(tiny_gpt2, GPT2_TARGETS, kind)
    assert all(not m.lora_R.any() for _, m in adapter_layers(model))
    model(IDS, labels=IDS).loss.backward()
    grads = [float(m.lora_R.grad.abs().sum()) for _, m in adapter_layers(model)]
    assert len(grads) == 8 and min(grads) > 0


def test_a0_and_b0_are_independent_draws():
    spec = ASpec("gaussian", 0, 0, 4, "l", 24, 24)
    a0, b0t = spec.dense(), b_spec(spec).dense()
    assert a0.shape == b0t.shape == (4, 24) and not torch.equal(a0, b0t)
    assert torch.equal(lift(spec, torch.eye(4)), b0t.t().double())


@pytest.mark.parametrize("kind", ["gaussian", "random-block"])
def test_export_peft_folds_r_into_b(kind, tmp_path):
    model = core_model(tiny_gpt2, GPT2_TARGETS, kind)
    links = []
    for c in range(2):
        randomize_r(model, seed=c)
        links.append(record_link(model))
        merge_adapters(model)
        set_chain_index(model, c + 1)
    randomize_r(model, seed=7)  # the current, unmerged link
    export_peft(tiny_gpt2(), [*links, record_link(model)], tmp_path / "adapter")
    peft = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    assert peft.peft_config["default"].r == 12
    err = relative_error(peft(IDS).logits, model(IDS).logits)
    print(f"{kind}: seedcore PEFT export, logits relative error {err:.2e}")
    assert err <= 1e-5


def test_upload_is_r_squared_per_layer():
    """The start line's upload: 4 r^2 bytes per layer (float32), against 4 n_out r for B."""
    state = {}
    lines = {}
    for method in ("seedlora", "seedcore"):
        model = prepare(tiny_gpt2(), method, GPT2_TARGETS, seed=0, rank=4, alpha=8.0)
        state[method] = trainable_state(model)
        lines[method] = adapter_summary(model, method, state[method], UploadConfig())
    core_bytes = 4 * 4 * 4 * 8  # float32, r^2, 8 layers
    assert sum(v.numel() * 4 for v in state["seedcore"].values()) == core_bytes
    b_bytes = sum(v.numel() * 4 for v in state["seedlora"].values())
    assert b_bytes == 4 * 4 * (72 + 24 + 96 + 24) * 2  # n_out of c_attn, c_proj, c_fc, c_proj
    assert f"upload {core_bytes / 1e3:.1f} kB per client-round" in lines["seedcore"]
    assert f"upload {b_bytes / 1e3:.1f} kB per client-round" in lines["seedlora"]
    assert lines["seedcore"].startswith("seedcore: adapted 8 layers")


def test_config_resolves_the_kind_and_refuses_what_seedcore_cannot_do():
    assert RunConfig.from_flower({"method": "seedcore"}).adapter.kind == "gaussian"
    assert RunConfig.from_flower({}).adapter.kind == "circulant"
    explicit = RunConfig.from_flower({"method": "seedcore", "a-kind": "random-block"})
    assert explicit.adapter.kind == "random-block"
    assert RunConfig.from_flower({"method": "seedcore"}).schedule == (3, 3)  # chained
    for extra, key in (
        ({"frozen-factor": "B"}, "frozen-factor"),
        ({"client-ranks": "2"}, "client-ranks"),
        ({"secure-aggregation": True}, "secure-aggregation"),
    ):
        with pytest.raises(RunConfigError, match=key):
            RunConfig.from_flower({"method": "seedcore", **extra})
    with pytest.raises(ValueError, match="frozen-factor"):
        core_model(tiny_gpt2, GPT2_TARGETS, None, frozen="B")


@pytest.mark.parametrize(
    "kind", ["gaussian", pytest.param("circulant", marks=pytest.mark.integration)]
)
def test_seedcore_end_to_end_is_exact(overrides, tmp_path, kind):
    """The real ServerApp and ClientApp in process: the merged link is the weighted mean of
    the clients' s B0 R_i A0, and the replies carried r x r numbers per layer."""
    server, grid = run(overrides, tmp_path, method="seedcore", **{"a-kind": kind})
    pristine = server.task.load_model()
    replies, weights, total = weighted_replies(grid)
    errors = []
    for name, layer in adapter_layers(server.model):
        assert isinstance(layer, CoreLoRALayer)
        spec = ASpec(kind, 0, 0, 4, name, layer.spec.n_in, layer.spec.n_out)
        cores = [torch.from_numpy(r[p.ARRAYS][f"{name}.lora_R"].numpy()) for r in replies]
        assert all(c.shape == (4, 4) for c in cores)
        expected = sum(
            w / total * dense_update(spec, c, layer.scaling)
            for w, c in zip(weights, cores, strict=True)
        )
        got = layer.base.weight.double() - pristine.get_submodule(name).weight.double()
        errors.append(relative_error(got.T, expected))  # GPT-2 Conv1D stores W transposed
    print(f"seedcore {kind}: end-to-end max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-6 and len(errors) == 8
    link = server.state.links[0]
    assert link.frozen == "AB" and all(f.shape == (4, 4) for f in link.factors.values())
    assert server.state.chain_index == 1 and all(
        m.spec.chain_index == 1 and not m.lora_R.any() for _, m in adapter_layers(server.model)
    )
