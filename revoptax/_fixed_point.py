"""Signed 64-bit fixed-point numbers held as two 32-bit words.

A value ``x`` is stored as the integer ``k = round(x * 2**radix_bits)`` in two's
complement, split into a signed high word and an unsigned low word::

    k = hi * 2**32 + lo,   hi: int32,  lo: uint32.

The representable range is ``|x| < 2**int_bits`` with ``int_bits + radix_bits
<= 62``, so the sum or difference of two in-range values never wraps and every
overflow of the range can be detected exactly.  Conversions are exact and
deterministic: a float is turned into fixed point by scaling by a power of two
(exact) and rounding half to even, and fixed point is turned back into a float
by correct rounding (round half to even) done in integer arithmetic, so the
same words always give the same float on every backend and in both 32- and
64-bit JAX modes.

Reference: D. Maclaurin, D. Duvenaud, R. P. Adams, "Gradient-based
Hyperparameter Optimization through Reversible Learning", ICML 2015, §2.1.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from revoptax import _words as words

I32, U32 = jnp.int32, jnp.uint32

_MANTISSA_BITS = {
  np.dtype(jnp.float32): 24,
  np.dtype(jnp.bfloat16): 8,
  np.dtype(jnp.float16): 11,
  np.dtype(jnp.float64): 53,
}


class Fixed(NamedTuple):
  """A fixed-point array: ``value = (hi * 2**32 + lo) * 2**-radix_bits``."""

  hi: jax.Array  # int32
  lo: jax.Array  # uint32


@dataclasses.dataclass(frozen=True)
class FixedPointFormat:
  """Radix and range of revoptax's fixed-point numbers.

  Attributes:
    radix_bits: number of fractional bits R; the resolution is ``2**-R``.
    int_bits: values must satisfy ``|x| < 2**int_bits``.

  The default ``R = 46, int_bits = 16`` resolves ``1.4e-14`` (finer than
  float32 at ``|x| >= 2.4e-7``) and holds ``|x| < 65536``.
  """

  radix_bits: int = 46
  int_bits: int = 16

  def __post_init__(self):
    if not (1 <= self.radix_bits <= 60 and 1 <= self.int_bits <= 60):
      raise ValueError(
        f"FixedPointFormat(radix_bits={self.radix_bits}, int_bits={self.int_bits}):"
        " both must be between 1 and 60."
      )
    if self.radix_bits + self.int_bits > 62:
      raise ValueError(
        f"FixedPointFormat: radix_bits + int_bits = {self.radix_bits + self.int_bits}"
        " exceeds 62, so sums could wrap the 64-bit words. Lower one of them."
      )

  @property
  def resolution(self) -> float:
    return 2.0**-self.radix_bits

  @property
  def max_abs(self) -> float:
    return 2.0**self.int_bits

  @property
  def _hi_limit(self) -> int:
    return 1 << (self.int_bits + self.radix_bits - 32)

  def zeros(self, shape) -> Fixed:
    return Fixed(jnp.zeros(shape, I32), jnp.zeros(shape, U32))

  def in_range(self, x: Fixed) -> jax.Array:
    """Elementwise ``|x| < 2**int_bits`` (exact)."""
    return (x.hi >= -self._hi_limit) & (x.hi < self._hi_limit)

  def from_float(self, x) -> tuple[Fixed, jax.Array]:
    """Round floats to the nearest fixed-point value (ties to even), exactly.

    Returns:
      ``(fixed, ok)`` where ``ok`` is False where ``x`` was not finite or out of
      range (those elements hold an unspecified value).
    """
    x = jnp.asarray(x)
    dtype = _compute_dtype(x.dtype)
    x = x.astype(dtype)
    ok = jnp.isfinite(x) & (jnp.abs(x) < self.max_abs)
    x = jnp.where(ok, x, jnp.zeros_like(x))
    # Multiplying by a power of two is exact, and so is rounding a float to an
    # integer.  Split the magnitude (the pieces are bit fields of it, so each is
    # representable), then negate in two's complement.
    r = jnp.round(x * jnp.asarray(2.0**self.radix_bits, dtype))
    mag = jnp.abs(r)
    hi_f = jnp.floor(mag * jnp.asarray(2.0**-32, dtype))
    lo_f = mag - hi_f * jnp.asarray(2.0**32, dtype)
    lo_top = jnp.floor(lo_f * jnp.asarray(2.0**-16, dtype))
    lo_bot = lo_f - lo_top * jnp.asarray(2.0**16, dtype)
    hi = hi_f.astype(U32)
    lo = (lo_top.astype(U32) << 16) | lo_bot.astype(U32)
    neg_hi, neg_lo = words.add_u64(~hi, ~lo, words.u32(0), words.u32(1))
    neg = r < 0
    hi = lax.bitcast_convert_type(jnp.where(neg, neg_hi, hi), I32)
    lo = jnp.where(neg, neg_lo, lo)
    return Fixed(hi, lo), ok

  def to_float(self, x: Fixed, dtype=jnp.float32) -> jax.Array:
    """Correctly rounded (half to even) float value of fixed-point words."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(jnp.float64):
      return _to_float64(x, self.radix_bits)
    p = _MANTISSA_BITS[dtype]
    neg = x.hi < 0
    # Magnitude as unsigned words: for negative k, |k| = ~k + 1.
    hi_u = lax.bitcast_convert_type(x.hi, U32)
    mh, ml = words.add_u64(~hi_u, ~x.lo, words.u32(0), words.u32(1))
    mh = jnp.where(neg, mh, hi_u)
    ml = jnp.where(neg, ml, x.lo)
    nbits = jnp.where(mh != 0, 64 - lax.clz(mh), 32 - lax.clz(ml)).astype(I32)
    shift = jnp.maximum(nbits - p, 0)
    s = shift.astype(U32)
    # t = mag >> shift (fits in p <= 24 bits); rem = mag mod 2**shift.
    big = shift >= 32
    t = jnp.where(
      big,
      mh >> (s - 32),
      (ml >> s) | jnp.where(s == 0, words.u32(0), mh << (32 - s)),
    )
    rem_lo = jnp.where(big, ml, ml & ((words.u32(1) << s) - 1))
    rem_hi = jnp.where(big, mh & ((words.u32(1) << (s - 32)) - 1), words.u32(0))
    half_lo = jnp.where(shift - 1 < 32, words.u32(1) << (s - 1), words.u32(0))
    half_hi = jnp.where(shift - 1 >= 32, words.u32(1) << (s - 33), words.u32(0))
    above = words.less_u64(half_hi, half_lo, rem_hi, rem_lo)
    tie = (rem_hi == half_hi) & (rem_lo == half_lo) & (shift > 0)
    t = t + (above | (tie & ((t & 1) == 1))).astype(U32)
    # value = t * 2**(shift - R): build the power of two from its bits (exact).
    scale = lax.bitcast_convert_type(
      ((shift - self.radix_bits + 127) << 23).astype(I32), jnp.float32
    )
    mag = t.astype(jnp.float32) * scale
    return jnp.where(neg, -mag, mag).astype(dtype)

  def add(self, a: Fixed, b: Fixed) -> Fixed:
    """Exact ``a + b`` (check the result with :meth:`in_range`)."""
    lo = a.lo + b.lo
    carry = (lo < a.lo).astype(I32)
    return Fixed(a.hi + b.hi + carry, lo)

  def sub(self, a: Fixed, b: Fixed) -> Fixed:
    """Exact ``a - b`` (check the result with :meth:`in_range`)."""
    lo = a.lo - b.lo
    borrow = (a.lo < b.lo).astype(I32)
    return Fixed(a.hi - b.hi - borrow, lo)


def _compute_dtype(dtype) -> np.dtype:
  """float64 stays float64; every narrower float is converted exactly to float32."""
  dtype = np.dtype(dtype)
  if dtype == np.dtype(jnp.float64):
    return dtype
  if dtype not in _MANTISSA_BITS:
    raise TypeError(f"revoptax fixed point supports float16/bfloat16/float32/float64, not {dtype}.")
  return np.dtype(jnp.float32)


def _to_float64(x: Fixed, radix_bits: int) -> jax.Array:
  # Only reachable with jax_enable_x64; int64 -> float64 conversion rounds to
  # nearest even, and scaling by a power of two is exact.
  k = (x.hi.astype(jnp.int64) << 32) | x.lo.astype(jnp.int64)
  return k.astype(jnp.float64) * (2.0**-radix_bits)
