"""Compressed uploads: codecs, error feedback, the residual store, and exactness end to end."""

import pytest
import torch
from flwr.app import ArrayRecord

from client.uploads import ResidualStore
from seedlora import ASpec, adapter_layers, mean_update, relative_error
from seedlora.compress import CODECS, SCALE, compress, decode, encode
from seedlora.nested import nested
from tests import test_app_local as app_tests
from tests.test_app_local import metrics, run
from tests.test_hetero_ranks import record_uploads

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)
TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 1e-2}


def update(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "l.lora_B": torch.randn(96, 8, generator=gen) * 1e-2,  # n_out x r
        "m.lora_A": torch.randn(4, 40, generator=gen) * 1e-2,  # r x n_in (swapped roles)
        "head.bias": torch.randn(7, generator=gen),
    }


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_and_size(codec):
    u = update()
    wire = encode(u, codec)
    back = decode(wire, codec)
    for k, v in u.items():
        err = float((back[k] - v).norm() / v.norm())
        assert err <= TOLERANCE[codec], (k, err)
    size = ArrayRecord(wire).count_bytes()
    full = ArrayRecord(u).count_bytes()
    if codec == "int8":  # one float32 scale per rank component: r of them for a B
        assert wire["l.lora_B" + SCALE].shape == (8,) and wire["m.lora_A" + SCALE].shape == (4,)
        assert size < 0.45 * full  # npy headers dominate these tiny arrays
    elif codec != "float32":
        assert size < 0.7 * full


def test_decode_names_what_does_not_fit():
    wire = encode(update(), "int8")
    with pytest.raises(ValueError, match="expected torch.int8"):
        decode({**wire, "l.lora_B": wire["l.lora_B"].float()}, "int8")
    with pytest.raises(ValueError, match=SCALE):
        decode({**wire, "l.lora_B" + SCALE: torch.ones(3)}, "int8")
    with pytest.raises(ValueError, match="unexpected"):
        decode({**wire, "x" + SCALE: torch.ones(1)}, "int8")


def test_the_unpack_step_restores_the_state_or_rejects_with_the_reason():
    """Server side: reply arrays = sent + decoded update, or a typed rejection."""
    import numpy as np
    from flwr.app import Array, ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from contract import protocol as p
    from strategies.rejections import BadArrays, BadUpload
    from strategies.uploads import Unpack

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 0
    sent = {k: np.full(tuple(v.shape), 0.5, np.float32) for k, v in update().items()}
    unpack = Unpack(sent, "int8", ranks=False)
    assert unpack.needed and not Unpack(sent, "float32", ranks=False).needed

    def reply(arrays: dict) -> Message:
        record = ArrayRecord(
            {k: v if isinstance(v, Array) else Array(v.numpy()) for k, v in arrays.items()}
        )
        question = Message(RecordDict({p.CONFIG: ConfigRecord()}), 3, "train")
        return Message(RecordDict({p.ARRAYS: record}), reply_to=question)

    good = reply(encode(update(), "int8"))
    assert unpack(good) is good  # rewritten in place
    got = good.content[p.ARRAYS].to_torch_state_dict()
    for k, v in update().items():
        assert torch.allclose(got[k], 0.5 + v, atol=1e-2 * float(v.abs().max())), k
    with pytest.raises(BadUpload, match="upload-codec int8: .*expected torch.int8"):
        unpack(reply(update()))  # float32 where int8 was due
    junk = Array(dtype="int8", shape=(96, 8), stype="numpy.ndarray", data=b"not an npy file")
    with pytest.raises(BadArrays, match="undecodable arrays"):
        unpack(reply({**encode(update(), "int8"), "l.lora_B": junk}))


def test_error_feedback_telescopes_and_beats_plain_rounding():
    true_sum, ef_sum, plain_sum, residual = 0, 0, 0, None
    for t in range(30):
        u = {"b": torch.randn(64, 8, generator=torch.Generator().manual_seed(t)) * 1e-3}
        wire, residual = compress(u, residual, "int8")
        ef_sum = ef_sum + decode(wire, "int8")["b"]
        plain_sum = plain_sum + decode(encode(u, "int8"), "int8")["b"]
        true_sum = true_sum + u["b"]
    # what was sent plus what is still owed is exactly what was trained
    assert torch.allclose(ef_sum + residual["b"], true_sum, atol=1e-6)
    ef_err = float((ef_sum - true_sum).norm())
    plain_err = float((plain_sum - true_sum).norm())
    print(f"int8 after 30 rounds: error feedback {ef_err:.2e}, plain {plain_err:.2e}")
    assert ef_err < 0.5 * plain_err


def test_residual_is_kept_per_link_and_reset_at_a_new_one(tmp_path):
    store = ResidualStore(tmp_path, run_id=7, node_id=3)
    res = {"b": torch.ones(2, 2)}
    store.save(res, 0, "d0", 1)
    assert torch.equal(store.load(0, "d0", 2)["b"], res["b"])  # next round, same link
    assert store.load(0, "d0", 1) is None  # the same round again (a rerun): not carried
    assert store.load(1, "d1", 3) is None  # a new link: new coordinates, reset
    assert ResidualStore(tmp_path, 7, 4).load(0, "d0", 2) is None  # another node


@pytest.mark.integration
@pytest.mark.parametrize(("codec", "ranks"), [("int8", ""), ("bfloat16", "4,2,1")])
def test_compressed_uploads_average_exactly_what_was_received(overrides, tmp_path, codec, ranks):
    uploads = []
    extra = {"upload-codec": codec, "client-ranks": ranks, "a-kind": "gaussian"}
    server, _ = run(overrides, tmp_path, prepare=lambda g: record_uploads(g, uploads), **extra)
    pristine = server.task.load_model()
    weights = [n for _, n, _, _ in uploads]
    decoded = [decode(arrays, codec) for _, _, _, arrays in uploads]  # B started at 0
    errors = []
    for name, layer in adapter_layers(server.model):
        spec = ASpec("gaussian", 0, 0, 4, name, layer.spec.n_in, layer.spec.n_out)
        bs = [d[f"{name}.lora_B"] for d in decoded]
        a_list = [nested(spec, b.shape[1]).dense() for b in bs]
        expected = mean_update(a_list, bs, weights, spec.scaling(8.0))
        got = layer.base.weight.double() - pristine.get_submodule(name).weight.double()
        errors.append(relative_error(got.T, expected))
    print(f"{codec} {ranks or 'full rank'}: end-to-end max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-6
    assert metrics(tmp_path)["rounds"][1]["accepted"] == 3


@pytest.mark.integration
def test_int8_with_feedback_runs_a_chain_at_a_fraction_of_the_bytes(overrides, tmp_path):
    extra = {"num-links": 2, "rounds-per-link": 2}
    run(overrides, tmp_path / "f32", **extra)
    run(overrides, tmp_path / "int8", **extra, **{"upload-codec": "int8"})
    f32, int8 = metrics(tmp_path / "f32")["rounds"][1:], metrics(tmp_path / "int8")["rounds"][1:]
    assert all(r["accepted"] == 3 for r in int8)
    ratio = sum(r["bytes_up"] for r in int8) / sum(r["bytes_up"] for r in f32)
    print(f"int8 / float32 upload bytes: {ratio:.3f}")
    assert ratio < 0.55  # tiny layers: npy headers weigh; bench.beyond measures the real model
    assert all(
        r["central"]["loss"] < metrics(tmp_path / "int8")["rounds"][0]["central"]["loss"]
        for r in int8[-1:]
    )


def test_bad_codec_names_the_key():
    from contract.config import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match="'upload-codec'"):
        RunConfig.from_flower({"upload-codec": "int4"})
