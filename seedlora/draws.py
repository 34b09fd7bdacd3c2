"""Seeded draws that give the same bits on every CPU: the integer stream and the normals.

A must be bit-identical on every party (DESIGN.md section 1), and a library's normal
sampler is not: torch's `randn` goes through float32 log/cos whose last bit follows the
CPU's SIMD path (104 of 256 entries differed under `ATEN_CPU_CAPABILITY=default`). So the
draws here use only integer arithmetic, exact conversions and IEEE 754 float64 +, -, x, /
and sqrt, each rounded once, in a fixed order; no libm call, no fused op:

- The stream: word i (i = 0, 1, ...) of key k is splitmix64's i-th output, in uint64
  (mod 2^64): s = k + (i + 1) G, z = s ^ (s >> 30); z *= M1; z ^= z >> 27; z *= M2;
  w_i = z ^ (z >> 31), with G = 0x9E3779B97F4A7C15, M1 = 0xBF58476D1CE4E5B9,
  M2 = 0x94D049BB133111EB (Steele, Lea and Flood 2014). Counter-based, so any range of
  the stream is computed without the words before it.
- Normals, by Box-Muller on pairs: entries 2p and 2p+1 (row-major) take
  u = (2 (w_2p >> 12) + 1) 2^-53 in (0, 1) (exact: 53 bits), the 52-bit angle
  t = w_(2p+1) >> 12 (theta = 2 pi t 2^-52), radius R = sqrt(-2 ln u), and
  z_2p = R cos(theta), z_(2p+1) = R sin(theta).
- ln u: u = m 2^e read from its bits (exact), m moved into [sqrt(1/2), sqrt(2)) by a
  halving; ln u = e ln2 + 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.172, and atanh by
  its odd series through s^23 (error below 1e-18 relative).
- cos and sin of theta: the quadrant and octant come from t's integer bits (exact), leaving
  phi = 2 pi f in [0, pi/4] (f = the folded remainder 2^-52, exact; one rounding for
  2 pi f); sin phi through phi^17 and cos phi through phi^18 by Taylor in Horner form
  (error below 1e-19).

So each normal is within about 1e-15 of the exact Box-Muller value of its bits, and, what
matters, every party rounds the same operations the same way. The vectorised numpy path
(`normals`) and the pure-Python reference (`reference_normals`, Python floats are IEEE
doubles) share the constants and polynomials but not the bit handling or the branches, and
tests check they agree bit for bit. float64 results are cast to float32 by the caller.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
BITS = 52  # bits of a word a uniform or an angle keeps (the top ones)
CHUNK = 1 << 16  # pairs per vectorised step (and per thread): temporaries of 0.5 MB
MAX_WORKERS = 16

LN2 = 0.6931471805599453  # ln 2, the nearest double
SQRT2 = 1.4142135623730951  # sqrt(2), the nearest double
TWO_PI = 6.283185307179586  # 2 pi, the nearest double
ATANH = tuple(1.0 / (2 * n + 1) for n in range(12))  # atanh s = s sum_n s^2n / (2n + 1)
SIN = tuple((-1.0) ** n / math.factorial(2 * n + 1) for n in range(9))  # through phi^17
COS = tuple((-1.0) ** n / math.factorial(2 * n) for n in range(10))  # through phi^18


def _horner(x, coeffs: Sequence[float]):
    """sum_n coeffs[n] x^n, as ((c_N x + c_(N-1)) x + ...) + c_0: one rounding per op.

    Works on a Python float and on a float64 array alike (in place on the array's own
    accumulator), with the same roundings."""
    acc = coeffs[-1] * x + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        acc *= x
        acc += c
    return acc


def _log_reduced(m, e):
    """ln(m 2^e) for m in [sqrt(1/2), sqrt(2)): e ln2 + 2 atanh((m - 1) / (m + 1))."""
    s = (m - 1.0) / (m + 1.0)
    return e * LN2 + 2.0 * (s * _horner(s * s, ATANH))


def _sin_cos(f):
    """(sin, cos) of phi = 2 pi f for f in [0, 1/8]."""
    phi = TWO_PI * f
    phi2 = phi * phi
    return phi * _horner(phi2, SIN), _horner(phi2, COS)


# --- the stream -------------------------------------------------------------------------


def word(key: int, i: int) -> int:
    """Word i of the stream of `key` (splitmix64), as a Python int in [0, 2^64)."""
    z = (key + (i + 1) * GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def below(key: int, n: int) -> int:
    """An integer in [0, n) from word 0 of `key`: floor(w_0 n / 2^64) (exact integers)."""
    return (word(key, 0) * n) >> 64


def _words(key: int, start: int, count: int, step: int = 1) -> np.ndarray:
    """Words start, start + step, ... (`count` of them) of `key`'s stream: uint64 (count,)."""
    z = np.arange(start + 1, start + 1 + count * step, step, dtype=np.uint64)
    z *= np.uint64(GAMMA)
    z += np.uint64(key & MASK64)
    z ^= z >> np.uint64(30)
    z *= np.uint64(MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return z


# --- normals, vectorised ----------------------------------------------------------------


def _radii(words: np.ndarray) -> np.ndarray:
    """sqrt(-2 ln u), u = (2k + 1) 2^-53 for k the top 52 bits of each word: float64."""
    k = words >> np.uint64(64 - BITS)
    k <<= np.uint64(1)
    k += np.uint64(1)
    u = k.astype(np.float64)
    u *= 2.0**-53  # exact
    bits = u.view(np.uint64)  # u = m 2^e: e and m from the bits, exactly
    e = (bits >> np.uint64(52)).astype(np.int64)
    bits &= np.uint64((1 << 52) - 1)
    bits |= np.uint64(1023 << 52)
    m = bits.view(np.float64)  # in [1, 2)
    high = m >= SQRT2
    np.multiply(m, 0.5, out=m, where=high)
    e += high
    e -= 1023
    return np.sqrt(-2.0 * _log_reduced(m, e.astype(np.float64)))


def _turns(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of 2 pi t 2^-52 for t the top 52 bits of each word: float64 each.

    The quadrant q (t's top 2 bits) and the fold of the rest into the first octant are
    integer operations; what is left is one angle phi in [0, pi/4] (`_sin_cos`)."""
    t = words >> np.uint64(64 - BITS)
    q = (t >> np.uint64(BITS - 2)).astype(np.uint8)
    t &= np.uint64((1 << (BITS - 2)) - 1)
    swap = t > np.uint64(1 << (BITS - 3))  # past the octant: use pi/2 - phi, swap sin, cos
    np.subtract(np.uint64(1 << (BITS - 2)), t, out=t, where=swap)
    s, c = _sin_cos(t.astype(np.float64) * 2.0**-BITS)
    swap ^= (q & 1).astype(bool)  # an odd quadrant swaps them (back)
    cos, sin = np.where(swap, s, c), np.where(swap, c, s)
    np.negative(cos, out=cos, where=(q == 1) | (q == 2))
    np.negative(sin, out=sin, where=q >= 2)
    return cos, sin


def default_workers() -> int:
    """Threads `normals` uses by default: the CPUs this process may run on, at most
    `MAX_WORKERS`."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(len(usable) if usable else os.cpu_count() or 1, MAX_WORKERS))


def _fill(out: np.ndarray, key: int, first: int, pairs: int) -> None:
    """Write the normals of pairs first .. first + pairs - 1 into `out` (all of them)."""
    radius = _radii(_words(key, 2 * first, pairs, step=2))
    cos, sin = _turns(_words(key, 2 * first + 1, pairs, step=2))
    np.multiply(radius, cos, out=out[2 * first : 2 * (first + pairs) : 2])
    np.multiply(radius, sin, out=out[2 * first + 1 : 2 * (first + pairs) : 2])


def normals(key: int, count: int, workers: int | None = None) -> np.ndarray:
    """`count` standard normals from `key`'s stream: float64 (count,), the same bits on
    every machine (module docstring); entry j is `reference_normals(key, count)[j]`.

    Chunks of `CHUNK` pairs are independent (the stream is counter-based), so they run on
    up to `workers` threads (default `default_workers()`; numpy releases the GIL); the bits
    do not depend on it."""
    pairs = (count + 1) // 2
    out = np.empty(2 * pairs, dtype=np.float64)
    starts = range(0, pairs, CHUNK)
    workers = min(len(starts), workers or default_workers())
    if workers <= 1:
        for first in starts:
            _fill(out, key, first, min(CHUNK, pairs - first))
    else:
        with ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(_fill, out, key, f, min(CHUNK, pairs - f)) for f in starts]
            for job in jobs:
                job.result()
    return out[:count]


# --- normals, pure Python (the reference) -------------------------------------------------


def reference_normals(key: int, count: int) -> list[float]:
    """`normals` in pure Python (ints and IEEE-double floats, `math.frexp` only to read an
    exponent, which is exact): slow, for tests and for checking another implementation."""
    out: list[float] = []
    quarter, eighth = 1 << (BITS - 2), 1 << (BITS - 3)
    for p in range((count + 1) // 2):
        k = word(key, 2 * p) >> (64 - BITS)
        t = word(key, 2 * p + 1) >> (64 - BITS)
        frac, exp = math.frexp((2 * k + 1) * 2.0**-53)  # u = frac 2^exp, frac in [1/2, 1)
        m, e = 2.0 * frac, exp - 1
        if m >= SQRT2:
            m, e = frac, exp
        radius = math.sqrt(-2.0 * _log_reduced(m, float(e)))
        q, rest = t >> (BITS - 2), t & (quarter - 1)
        swap = rest > eighth
        s, c = _sin_cos((quarter - rest if swap else rest) * 2.0**-BITS)
        if swap:
            s, c = c, s
        cos, sin = [(c, s), (-s, c), (-c, -s), (s, -c)][q]
        out += [radius * cos, radius * sin]
    return out[:count]
