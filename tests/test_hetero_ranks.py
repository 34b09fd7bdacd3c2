"""Exact heterogeneous ranks: nested slices of one A, padded B's, and the client's shrink."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from contract import protocol as p
from seedlora import KINDS, ASpec, adapter_layers, inject, mean_update, relative_error
from seedlora.aggregate import weighted_mean
from seedlora.nested import nested, pad_rank, shrink
from strategies.rejections import BadUpload
from strategies.uploads import unpack_content
from tests import test_app_local as app_tests
from tests.test_app_local import metrics, run

N_IN, N_OUT, R_MAX, ALPHA = 96, 64, 8, 16.0
overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_a_is_a_slice_of_the_r_max_a(kind):
    full = ASpec(kind, 3, 2, R_MAX, "l", N_IN, N_OUT)
    for r in (1, 3, R_MAX):
        assert torch.equal(nested(full, r).dense(), full.dense()[:r])
    assert torch.equal(nested(full, 3, first=5).dense(), full.dense()[5:])
    if full.is_block:
        assert torch.equal(nested(full, 3).columns(), full.columns()[:3])
    with pytest.raises(ValueError, match="rank"):
        nested(full, 4, first=5)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_of_padded_b_is_the_mean_weight_update(kind):
    gen = torch.Generator().manual_seed(0)
    spec = ASpec(kind, 0, 1, R_MAX, "l", N_IN, N_OUT)
    ranks = [8, 4, 2, 1, 8, 3]
    bs = [torch.randn(N_OUT, r, generator=gen) for r in ranks]
    weights = [float(w) for w in torch.randint(1, 50, (len(ranks),), generator=gen)]
    scaling = ALPHA / R_MAX  # the same scale for every client
    exact = mean_update([nested(spec, r).dense() for r in ranks], bs, weights, scaling)
    zero = torch.zeros(N_OUT, R_MAX)
    b_bar = weighted_mean([{"b": pad_rank(b, zero, 1)} for b in bs], weights)["b"]
    err = relative_error(scaling * b_bar @ spec.dense(), exact)
    print(f"{kind}: heterogeneous-rank relative error {err:.2e}")
    assert err <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_shrunk_client_computes_the_padded_full_model(arch, kind):
    factory, targets, _ = arch
    full = factory()
    inject(full, targets, kind=kind, seed=1, rank=4, alpha=8.0, chain_index=1)
    gen = torch.Generator().manual_seed(1)
    for _, layer in adapter_layers(full):  # a nonzero global B from earlier rounds
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3, generator=gen)
    small = copy.deepcopy(full)
    shrink(small, 2)
    x = torch.randint(0, 97, (2, 9))
    assert torch.allclose(small(x).logits, full(x).logits, atol=1e-5)  # tail folded in
    for (_, s), (_, f) in zip(adapter_layers(small), adapter_layers(full), strict=True):
        assert s.lora_B.shape[1] == 2 and s.scaling == f.scaling == f.spec.scaling(8.0)
        with torch.no_grad():  # the client's training moves only its 2 columns
            s.lora_B.normal_(0, 0.3, generator=gen)
            f.lora_B.copy_(pad_rank(s.lora_B, f.lora_B, 1))
    assert torch.allclose(small(x).logits, full(x).logits, atol=1e-5)
    assert [n for n, p in small.named_parameters() if p.requires_grad] == [
        n for n, p in full.named_parameters() if p.requires_grad
    ]


def pad_reply(content, sent):
    """The server's unpacking of a float32 reply of reduced rank."""
    unpack_content(content, sent, "float32", ranks=True)


def test_pad_reply_pads_and_rejects():
    sent = {"l.lora_B": np.full((6, 4), 7.0, np.float32), "head.weight": np.ones(3, np.float32)}
    small = np.arange(12, dtype=np.float32).reshape(6, 2)
    content = RecordDict(
        {
            p.ARRAYS: ArrayRecord(
                {"l.lora_B": Array(small), "head.weight": Array(sent["head.weight"])}
            )
        }
    )
    pad_reply(content, sent)
    got = content[p.ARRAYS]["l.lora_B"].numpy()
    assert got.shape == (6, 4) and (got[:, :2] == small).all() and (got[:, 2:] == 7).all()
    sent2 = {**sent, "m.lora_B": np.zeros((5, 4), np.float32)}
    bad = {  # the reason each rejection gives -> the upload
        "factors of different ranks [2, 3] in one reply": {
            "l.lora_B": small,
            "m.lora_B": np.zeros((5, 3), np.float32),
        },
        "l.lora_B: rank 5 outside 1..4": {"l.lora_B": np.zeros((6, 5), np.float32)},
        "l.lora_B: shape [7, 2] does not fit [6, 4]": {"l.lora_B": np.zeros((7, 2), np.float32)},
    }
    for reason, arrays in bad.items():
        content = RecordDict({p.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()})})
        with pytest.raises(BadUpload) as caught:
            pad_reply(content, sent2)
        assert caught.value.reason == reason


def record_uploads(grid, uploads: list) -> None:
    """Keep (partition, num-examples, bytes-up, arrays) of every train reply as sent."""

    def spy(app):
        def wrapped(msg, context):
            reply = app(msg, context)
            if msg.metadata.message_type.startswith("train"):
                c = reply.content
                arrays = {k: torch.from_numpy(a.numpy().copy()) for k, a in c[p.ARRAYS].items()}
                m = c[p.METRICS]
                uploads.append(
                    (int(c[p.ECHO][p.PARTITION_ID]), m[p.NUM_EXAMPLES], m[p.BYTES_UP], arrays)
                )
            return reply

        return wrapped

    grid.apps = {node: spy(app) for node, app in grid.apps.items()}


@pytest.mark.integration
def test_mixed_ranks_end_to_end_is_exact(overrides, tmp_path):
    ranks, uploads = [4, 2, 1], []
    extra = {"a-kind": "gaussian", "client-ranks": "4,2,1"}
    server, _ = run(overrides, tmp_path, prepare=lambda g: record_uploads(g, uploads), **extra)
    pristine = server.task.load_model()
    weights = [n for _, n, _, _ in uploads]
    parts = [ranks[part] for part, _, _, _ in uploads]
    errors = []
    for name, layer in adapter_layers(server.model):
        spec = ASpec("gaussian", 0, 0, 4, name, layer.spec.n_in, layer.spec.n_out)
        bs = [arrays[f"{name}.lora_B"] for _, _, _, arrays in uploads]
        assert [b.shape[1] for b in bs] == parts  # each client uploaded n_out * r_i
        a_list = [nested(spec, r).dense() for r in parts]
        expected = mean_update(a_list, bs, weights, spec.scaling(8.0))  # r_max for everyone
        got = layer.base.weight.double() - pristine.get_submodule(name).weight.double()
        errors.append(relative_error(got.T, expected))
    print(f"mixed ranks: end-to-end max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-6 and len(errors) == 8
    up = [b for _, _, b, _ in uploads]
    assert up[parts.index(1)] < up[parts.index(2)] < up[parts.index(4)]
    assert metrics(tmp_path)["rounds"][1]["bytes_up"] == sum(up)


@pytest.mark.integration
def test_mixed_ranks_chain_runs_on_every_kind(overrides, tmp_path):
    extra = {"client-ranks": "node", "num-links": 2, "rounds-per-link": 2}

    def caps(grid):  # nodes declare their own budget in the node config
        for i, ctx in enumerate(grid.contexts.values()):
            ctx.node_config["max-rank"] = [4, 3, 1][i]

    server, _ = run(overrides, tmp_path, prepare=caps, **extra)
    doc = metrics(tmp_path)
    assert all(r["accepted"] == 3 for r in doc["rounds"][1:])
    assert len(server.state.links) == 2


@pytest.mark.parametrize("value", ["9", "0", "4,x", "node,2"])
def test_bad_client_ranks_name_the_key(value):
    from contract.config import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match="client-ranks"):
        RunConfig.from_flower({"client-ranks": value})
    with pytest.raises(RunConfigError, match="client-ranks"):
        RunConfig.from_flower({"client-ranks": "2", "method": "fedit"})
