"""A-spec: seeded, bit-identical everywhere, never from the global RNG."""

import json
import subprocess
import sys

import pytest
import torch

from seedlora import ASpec

LAYER = "transformer.h.0.attn.c_attn"
GOLDEN = {
    "gaussian": "a915fd10d2fa51ce49e74084859bb97dd408ed98ce8924a72676858c5b3265ea",
    "circulant": "c5e63aeb3d2a8f3f3f74c0431fcf4254c2471572f94f0c1cf0716f02702b48c5",
    "random-block": "31ca2452b7a4d5177765250bbbb814f5e3abd39416ab6986e1a230a8f8aa2fb1",
}
GOLDEN_GAUSSIAN_HEAD = [0.1884065866470337, 0.273952841758728, -0.13437971472740173]


def spec(kind: str) -> ASpec:
    return ASpec(kind, 1234, 2, 4, LAYER, 64, 192)


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_digest(kind):
    assert spec(kind).digest() == GOLDEN[kind]


def test_golden_values():
    head = spec("gaussian").dense().flatten()[:3].tolist()
    assert head == GOLDEN_GAUSSIAN_HEAD
    assert spec("circulant").offset() == 8  # (2 * 4) mod 64
    assert spec("random-block").offset() % 4 == 0


@pytest.mark.integration  # a fresh interpreter; the golden digests check the same in process
def test_identical_in_subprocess_with_other_seed_and_threads():
    code = (
        "import json, torch; torch.manual_seed(999); torch.set_num_threads(1);"
        "torch.randn(10);"
        "from seedlora import ASpec;"
        f"print(json.dumps({{k: ASpec(k, 1234, 2, 4, {LAYER!r}, 64, 192).digest()"
        f" for k in {sorted(GOLDEN)!r}}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == GOLDEN


def test_global_rng_untouched_and_unused():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a1 = spec("gaussian").dense()
    after = torch.rand(3)
    torch.manual_seed(77)
    a2 = spec("gaussian").dense()
    assert torch.equal(after, expected)
    assert torch.equal(a1, a2)


def test_links_and_layers_differ():
    a = spec("gaussian")
    assert not torch.equal(a.dense(), a.next().dense())
    other = ASpec("gaussian", 1234, 2, 4, "other", 64, 192)
    assert not torch.equal(a.dense(), other.dense())


def test_block_dense_is_identity_block():
    s = ASpec("circulant", 0, 3, 4, "l", 14, 8)  # offset 12, wraps to columns 12,13,0,1
    assert s.columns().tolist() == [12, 13, 0, 1]
    assert not s.contiguous()
    d = s.dense()
    assert d.sum() == 4 and torch.equal(d[torch.arange(4), s.columns()], torch.ones(4))


def test_random_block_offsets_vary_and_are_multiples_of_rank():
    offsets = {ASpec("random-block", 7, c, 8, "l", 64, 64).offset() for c in range(20)}
    assert len(offsets) > 2 and all(o % 8 == 0 and 0 <= o < 64 for o in offsets)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "dense"}, "a-kind"),
        ({"rank": 0}, "rank"),
        ({"rank": 100}, "rank"),
        ({"chain_index": -1}, "chain_index"),
    ],
)
def test_bad_spec_names_the_key(kwargs, key):
    base = {"kind": "gaussian", "seed": 0, "chain_index": 0, "rank": 4, "layer": "l"}
    base.update(n_in=16, n_out=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=key):
        ASpec(**base)


def test_a_digest_names_the_frozen_factors_of_a_model(monkeypatch):
    """seedlora.a_digest: equal for the same specs, different for another link or seed, and
    different when the same spec draws another A (what another torch version could do)."""
    from torch import nn

    from seedlora import a_digest, inject, set_chain_index
    from seedlora.chain import _frozen_digest

    def model(seed=0, frozen="A"):
        m = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 16))
        inject(m, ["0", "1"], kind="gaussian", seed=seed, rank=4, alpha=8.0, frozen=frozen)
        return m

    first = a_digest(model())
    assert len(first) == 64 and first == a_digest(model())
    assert first != a_digest(model(seed=1)) and first != a_digest(model(frozen="B"))
    moved = model()
    set_chain_index(moved, 1)
    assert a_digest(moved) not in (first, "")
    assert a_digest(nn.Sequential(nn.Linear(4, 4))) == ""

    drawn = ASpec.dense
    monkeypatch.setattr(ASpec, "dense", lambda self: drawn(self) + 1e-7)
    _frozen_digest.cache_clear()
    assert a_digest(model()) != first
    monkeypatch.undo()
    _frozen_digest.cache_clear()
