"""A-spec: seeded, bit-identical everywhere (also without SIMD), never from the global RNG."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from seedlora import ASpec, derive_seed
from seedlora.draws import normals, reference_normals, word

LAYER = "transformer.h.0.attn.c_attn"
# A rule "exact-v2" (seedlora/draws.py); circulant draws nothing, so its digest predates it.
GOLDEN = {
    "gaussian": "9573cde1e9648a010d586daa346e65ad996e3bd0915a447bc54bc50c8a3fb61e",
    "circulant": "c5e63aeb3d2a8f3f3f74c0431fcf4254c2471572f94f0c1cf0716f02702b48c5",
    "random-block": "85e5a8664ebaf69898a5496668eebe8418a38548b7a65a6c521fa990a966f0e5",
}
GOLDEN_GAUSSIAN_HEAD = [-0.12588471174240112, 0.21757805347442627, 0.15844355523586273]
# (kind, seed, chain index, rank, layer, n_in, n_out): small shapes, odd sizes included
SHAPES = [
    ("gaussian", 1234, 2, 4, LAYER, 64, 192),
    ("gaussian", 0, 0, 1, "l", 1, 3),
    ("gaussian", 7, 5, 3, "model.layers.3.mlp.down_proj", 37, 11),
    ("gaussian", 2**40 + 3, 1, 8, "model.layers.0.self_attn.q_proj/B0", 96, 96),
]


def spec(kind: str) -> ASpec:
    return ASpec(kind, 1234, 2, 4, LAYER, 64, 192)


def reference_dense(s: ASpec) -> np.ndarray:
    """A by the pure-Python generator: float32(z * std), z from `reference_normals`."""
    key = derive_seed("gaussian", s.seed, s.chain_index, s.layer)
    z = np.array(reference_normals(key, s.rank * s.n_in)).reshape(s.rank, s.n_in)
    return (z * s.std).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_digest(kind):
    assert spec(kind).digest() == GOLDEN[kind]


def test_golden_values():
    head = spec("gaussian").dense().flatten()[:3].tolist()
    assert head == GOLDEN_GAUSSIAN_HEAD
    assert spec("circulant").offset() == 8  # (2 * 4) mod 64
    assert spec("random-block").offset() == 28  # block floor(w0 * 16 / 2^64) = 7


def test_the_stream_is_splitmix64():
    """Word i of key 0 is splitmix64's i-th output from state 0 (its published vectors)."""
    assert [word(0, i) for i in range(3)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


@pytest.mark.parametrize("key", [0, 1, 123456789, 2**63 - 25])
@pytest.mark.parametrize("count", [1, 2, 7, 256, 1001])
def test_normals_match_the_pure_python_reference(key, count):
    assert normals(key, count).tobytes() == np.array(reference_normals(key, count)).tobytes()


def test_threads_and_chunks_do_not_change_the_bits(monkeypatch):
    from seedlora import draws

    one = normals(99, 5001, workers=1)
    monkeypatch.setattr(draws, "CHUNK", 64)  # 40 chunks, on 3 threads
    assert normals(99, 5001, workers=3).tobytes() == one.tobytes()
    assert normals(99, 5000).tobytes() == one[:5000].tobytes()  # a prefix of the stream


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[3]}x{s[5]}")
def test_gaussian_a_matches_the_pure_python_reference(shape):
    assert np.array_equal(ASpec(*shape).dense().numpy(), reference_dense(ASpec(*shape)))


def test_normals_are_standard_normal_and_accurate():
    """Box-Muller with our own log, sin and cos: within 1e-14 of libm's values for the same
    bits (their last bit is what varies), and the moments of N(0, 1)."""
    import math

    key, n = 5, 2000
    exact = []
    for p in range(n // 2):
        u = ((word(key, 2 * p) >> 12) * 2 + 1) * 2.0**-53
        theta = 2 * math.pi * (word(key, 2 * p + 1) >> 12) * 2.0**-52
        radius = math.sqrt(-2 * math.log(u))
        exact += [radius * math.cos(theta), radius * math.sin(theta)]
    assert np.abs(normals(key, n) - np.array(exact)).max() < 1e-14
    z = normals(11, 400_000)
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01 and abs((z**4).mean() - 3) < 0.05


@pytest.mark.integration  # a fresh interpreter
def test_identical_without_simd_in_a_fresh_interpreter():
    """ATEN_CPU_CAPABILITY=default (torch without AVX2, where torch.randn's A differed in 104
    of 256 entries) and numpy's SIMD dispatch off, another global seed and one thread: the
    golden digests, and A equal to the pure-Python reference."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__ as dispatched
    except ImportError:  # another numpy layout: torch's path is still the baseline one
        dispatched = []
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    env["NPY_DISABLE_CPU_FEATURES"] = " ".join(dispatched)
    code = (
        "import json, torch; torch.manual_seed(999); torch.set_num_threads(1);"
        "torch.randn(10);"
        "from seedlora import ASpec;"
        f"d = {{k: ASpec(k, 1234, 2, 4, {LAYER!r}, 64, 192).digest() for k in {sorted(GOLDEN)!r}}};"
        f"a = [ASpec(*s).dense().tolist() for s in {SHAPES!r}];"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), d, a]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    capability, digests, dense = json.loads(out.stdout)
    assert capability == "DEFAULT" and digests == GOLDEN
    for shape, a in zip(SHAPES, dense, strict=True):
        assert np.array_equal(np.array(a, dtype=np.float32), reference_dense(ASpec(*shape)))


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
    different when the same spec draws another A (what another A rule does); it names the
    A rule in clear when a kind draws by it, and only then."""
    from torch import nn

    from seedlora import a_digest, inject, set_chain_index
    from seedlora.chain import _frozen_digest, a_digest_rule
    from seedlora.spec import A_RULE, LEGACY_A_RULE

    def model(seed=0, frozen="A", kind="gaussian"):
        m = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 16))
        inject(m, ["0", "1"], kind=kind, seed=seed, rank=4, alpha=8.0, frozen=frozen)
        return m

    first = a_digest(model())
    assert first.startswith(f"{A_RULE}:") and len(first) == len(A_RULE) + 65
    assert first == a_digest(model()) and a_digest_rule(first) == A_RULE
    assert a_digest_rule(a_digest(model(kind="random-block"))) == A_RULE
    circulant = a_digest(model(kind="circulant"))  # draws nothing: the same under any rule
    assert len(circulant) == 64 and a_digest_rule(circulant) == LEGACY_A_RULE
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
