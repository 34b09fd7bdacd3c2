"""An exact, order-independent weighted sum of arrays: what streaming aggregation adds up.

The server adds each client's state to the round's sum as its reply arrives, so the
order of the terms is the order of arrival. A float sum depends on that order (each
addition rounds), so `ExactSum` does not round while it adds:

- Each term p = w * x (x float32 or float64, w the reply's weight) is formed in float64.
  That product depends only on the reply, never on the order; it is exact when x is
  float32 and w an integer below 2^29 (24 + 29 <= 53 significant bits), e.g. a
  `num-examples`, and rounded once otherwise (still a function of the reply alone).
- p is cut, element-wise, into pieces on a fixed grid of bins: bin k holds the integer
  q_k = trunc(r / 2^(32k)), |q_k| < 2^32, where r is what is left of p after the bins
  above k took theirs. Scaling by a power of two and truncating are exact in binary
  floating point, and r - q_k 2^(32k) is exact (it drops high bits of r), so
  p = sum_k q_k 2^(32k) exactly.
- Bin k keeps sum_i q_k,i in float64: a sum of n integers below 2^32 in magnitude stays
  below n 2^32 <= 2^53 for n <= 2^21 terms, so every partial sum is an exact integer.
  Integer addition is associative and commutative: each bin, and so the whole state of
  the accumulator, is the same after any order of the same terms, bit for bit.

`total()` then combines the bins in one fixed order (lowest first) in float64: a
function of the bins alone, hence of the set of terms alone. Memory: one float64 array
per bin touched, however many terms are added: float32 data times weights below 2^29
span 306 bits (10 bins at most); the B factors of a round touch 2 to 4.
"""

from __future__ import annotations

import numpy as np

BIN_BITS = 32  # bits per bin: pieces are integers below 2^32
MAX_TERMS = 2**21  # 2^21 * 2^32 = 2^53: bin sums stay exact integers in float64


def _scale(values: np.ndarray, exponent: int, out: np.ndarray) -> np.ndarray:
    """out = values * 2^exponent, exactly (a power of two; np.ldexp past float64's range
    of powers, 3x slower)."""
    if abs(exponent) <= 1000:
        return np.multiply(values, 2.0**exponent, out=out)
    return np.ldexp(values, exponent, out=out)


def _bin_of(magnitude: float) -> int:
    """The bin k with magnitude < 2^(32(k+1)) (magnitude > 0 and finite)."""
    _, exponent = np.frexp(magnitude)  # magnitude < 2^exponent
    return (int(exponent) - 1) // BIN_BITS


class ExactSum:
    """sum_i w_i x_i over arrays of one shape, exact and independent of the order of
    the `add` calls (module docstring)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.bins: dict[int, np.ndarray] = {}  # bin k -> sum of the integers q_k
        self.terms = 0

    def add(self, values: np.ndarray, weight: float) -> None:
        """Add weight * values (finite values; `weight` finite)."""
        if values.shape != self.shape:
            raise ValueError(f"shape {values.shape} differs from the sum's {self.shape}")
        if self.terms >= MAX_TERMS:
            raise OverflowError(f"more than {MAX_TERMS} terms: bin sums would round")
        self.terms += 1
        rest = np.multiply(values, float(weight), dtype=np.float64)
        piece = np.empty_like(rest)
        top = max(float(rest.max(initial=0.0)), -float(rest.min(initial=0.0)))
        while top > 0:
            k = _bin_of(top)
            _scale(rest, -BIN_BITS * k, piece)
            np.trunc(piece, out=piece)
            if k in self.bins:
                self.bins[k] += piece
            else:
                self.bins[k] = piece.copy()
            _scale(piece, BIN_BITS * k, piece)
            rest -= piece  # exact: removes the bits bin k took
            top = max(float(rest.max()), -float(rest.min()))

    def total(self) -> np.ndarray:
        """The sum in float64: the bins combined lowest first (a fixed order)."""
        out = np.zeros(self.shape, np.float64)
        for k in sorted(self.bins):
            out += _scale(self.bins[k], BIN_BITS * k, np.empty_like(out))
        return out
