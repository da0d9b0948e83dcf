"""96-bit fixed-point numbers for second moments, held as three 32-bit words.

A second moment ``nu`` (an average of squared gradients) spans far more than
64 bits of range: ``g = 1e-8`` gives ``g**2 = 1e-16`` and one step of Adam adds
``(1 - b2) g**2 = 1e-19``, while ``nu`` must also hold values near 1.  A
64-bit format resolving ``2**-54`` loses such terms entirely, and the rounding
of every step random-walks across the last few units.  So ``nu`` is the integer
``V = round(nu * 2**radix_bits)`` with ``|V| < 2**94``, stored as a signed high
word and two unsigned words::

    V = hi * 2**64 + mid * 2**32 + lo

and computed on as ``(h, l)`` = ``(int64, uint64)`` pairs, ``V = h * 2**64 + l``,
inside :func:`revoptax._fixed_point.exact_scope`.  The default
``radix_bits = 78, int_bits = 16`` resolves ``3.3e-24`` (one Adam step at
``g = 1e-8`` adds 30,000 units) and holds ``nu < 65536`` (a sustained gradient
of 256, or one of 8,000 in a single step at ``b2 = 0.999``).

Conversions are deterministic: a float is rounded to the nearest unit (ties
to even) from its bits; a ``V`` converts to a float as the sum of the rounded
floats of ``V >> 32`` and of its low 32 bits.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from revoptax._fixed_point import _compute_dtype, _round_scaled_f32

I32, U32, I64, U64 = jnp.int32, jnp.uint32, "int64", "uint64"
_LOW = 0xFFFFFFFF


class Wide(NamedTuple):
  """A 96-bit fixed-point array: ``value = (hi * 2**64 + mid * 2**32 + lo) * 2**-radix_bits``."""

  hi: jax.Array  # int32
  mid: jax.Array  # uint32
  lo: jax.Array  # uint32


def join(x: Wide):
  """``(h, low)``: the ``int64`` high and ``uint64`` low parts of ``x`` (inside ``exact_scope``)."""
  return x.hi.astype(I64), (x.mid.astype(U64) << 32) | x.lo.astype(U64)


def split(h, low) -> Wide:
  """The words of ``V = h * 2**64 + low`` for ``|V| < 2**95``."""
  return Wide(h.astype(I32), (low >> 32).astype(U32), (low & _LOW).astype(U32))


def add(a, b):
  """``a + b`` of ``(h, low)`` pairs."""
  low = a[1] + b[1]
  return a[0] + b[0] + (low < a[1]).astype(I64), low


def negate(a):
  """``-a`` of an ``(h, low)`` pair."""
  low = ~a[1] + 1
  return ~a[0] + (low == 0).astype(I64), low


def sub(a, b):
  return add(a, negate(b))


def equal(a, b):
  return (a[0] == b[0]) & (a[1] == b[1])


def small(k):
  """The ``(h, low)`` pair of an ``int64`` k."""
  k = jnp.asarray(k, I64)
  return k >> 63, k.astype(U64)


def shift_right(a, bits: int):
  """``floor(a / 2**bits)`` for ``0 < bits < 64``."""
  h, low = a
  return h >> bits, (low >> bits) | ((h & ((1 << bits) - 1)).astype(U64) << (64 - bits))


def shift_left(a, bits: int):
  """``a * 2**bits`` for ``0 < bits < 64`` (no overflow check)."""
  h, low = a
  return (h << bits) | (low >> (64 - bits)).astype(I64), low << bits


@dataclasses.dataclass(frozen=True)
class WideFormat:
  """Radix and range of the 96-bit fixed-point second moments.

  Attributes:
    radix_bits: fractional bits R; the resolution is ``2**-R``.
    int_bits: values must satisfy ``|x| < 2**int_bits``; ``R + int_bits <= 94``.
  """

  radix_bits: int = 78
  int_bits: int = 16

  def __post_init__(self):
    if not (1 <= self.int_bits <= 30 and 1 <= self.radix_bits <= 93):
      raise ValueError(
        f"WideFormat(radix_bits={self.radix_bits}, int_bits={self.int_bits}): need "
        "1 <= int_bits <= 30 and 1 <= radix_bits <= 93."
      )
    if not 65 <= self.radix_bits + self.int_bits <= 94:
      raise ValueError("WideFormat: radix_bits + int_bits must lie in [65, 94].")

  @property
  def max_abs(self) -> float:
    return 2.0**self.int_bits

  def zeros(self, shape) -> Wide:
    return Wide(jnp.zeros(shape, I32), jnp.zeros(shape, U32), jnp.zeros(shape, U32))

  def in_range(self, a) -> jax.Array:
    """``|V| < 2**(R + int_bits)`` of an ``(h, low)`` pair."""
    limit = 1 << (self.radix_bits + self.int_bits - 64)  # 2**(R + int) = limit * 2**64
    h, low = a
    return (h < limit) & ((h > -limit) | ((h == -limit) & (low > 0)))

  def quantize(self, x):
    """``((h, low), ok)``: ``round(x * 2**R)`` (ties to even); inside ``exact_scope``."""
    x = jnp.asarray(x)
    cd = _compute_dtype(x.dtype)
    x = x.astype(cd)
    ok = jnp.isfinite(x) & (jnp.abs(x) < jnp.asarray(self.max_abs, cd))
    x = jnp.where(ok, x, jnp.zeros_like(x))
    if cd == np.dtype(jnp.float64):
      return self._quantize_f64(x), ok
    return self._quantize_f32(x), ok

  def _quantize_f32(self, x):
    bits = lax.bitcast_convert_type(x, U32)
    biased = ((bits >> 23) & 0xFF).astype(I32)
    fraction = bits & 0x7FFFFF
    significand = jnp.where(biased > 0, fraction | 0x800000, fraction).astype(U64)
    shift = jnp.maximum(biased, 1) - 150 + self.radix_bits  # |x| 2**R = significand 2**shift
    narrow = small(_round_scaled_f32(x, self.radix_bits))  # exact while shift <= 39
    s = shift.astype(U64)
    low = jnp.where(shift < 64, significand << jnp.minimum(s, 63), 0)
    high = jnp.where(
      shift < 64,
      significand >> jnp.clip(64 - shift, 1, 63).astype(U64),
      significand << jnp.clip(shift - 64, 0, 63).astype(U64),
    )
    wide = (high.astype(I64), low.astype(U64))
    wide = where(bits >> 31 == 1, negate(wide), wide)
    return where(shift <= 39, narrow, wide)

  def _quantize_f64(self, x):
    y = jnp.round(x * 2.0**self.radix_bits)  # exact: |y| < 2**94 is a float64 integer
    h = jnp.floor(y * 2.0**-64)
    rest = y - h * 2.0**64  # in [0, 2**64), exact
    rest_hi = jnp.floor(rest * 2.0**-32)
    rest_lo = rest - rest_hi * 2.0**32
    return h.astype(I64), (rest_hi.astype(U64) << 32) | rest_lo.astype(U64)

  def dequantize(self, a, dtype=jnp.float32):
    """A float of ``V * 2**-R``: with ``|V| = top * 2**32 + bottom``, the sign times
    ``fl(top) 2**(32 - R) + fl(bottom) 2**-R``."""
    dtype = np.dtype(_compute_dtype(dtype))
    negative = a[0] < 0
    h, low = where(negative, negate(a), a)
    top = (h << 32) | (low >> 32).astype(I64)  # < 2**62
    bottom = (low & _LOW).astype(I64)
    scale_top = np.asarray(2.0 ** (32 - self.radix_bits), dtype)
    mag = top.astype(dtype) * scale_top + bottom.astype(dtype) * np.asarray(
      2.0**-self.radix_bits, dtype
    )
    return jnp.where(negative, -mag, mag)


def where(condition, a, b):
  """Elementwise select of ``(h, low)`` pairs."""
  return jnp.where(condition, a[0], b[0]), jnp.where(condition, a[1], b[1])
