"""Signed 64-bit fixed-point numbers held as two 32-bit words.

A value ``x`` is stored as the integer ``k = round(x * 2**radix_bits)`` in two's
complement, split into a signed high word and an unsigned low word::

    k = hi * 2**32 + lo,   hi: int32,  lo: uint32.

The representable range is ``|x| < 2**int_bits`` with ``int_bits + radix_bits
<= 62``, so the sum or difference of two in-range values never wraps and every
overflow of the range can be detected exactly.  Conversions are exact and
deterministic: a float is turned into fixed point by scaling by a power of two
(exact) and rounding half to even, and fixed point is turned back into a float
by correct rounding (round half to even, subnormals included): the integer
conversion IEEE 754 defines for float32 and float64, integer arithmetic for
the 16-bit floats.  So the same words always give the same float, on every
backend whose integer-to-float conversion rounds correctly (CPU and GPU) and
in both 32- and 64-bit JAX modes.

The words are what is stored (so states work in JAX's default 32-bit mode);
the arithmetic is done on native 64-bit integers inside :func:`exact_scope`,
which turns on 64-bit types while the computation is traced.

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

I32, U32, I64, U64 = jnp.int32, jnp.uint32, "int64", "uint64"

# Significand bits (with the implicit one) and smallest normal exponent.
_MANTISSA_BITS = {
  np.dtype(jnp.float32): 24,
  np.dtype(jnp.bfloat16): 8,
  np.dtype(jnp.float16): 11,
  np.dtype(jnp.float64): 53,
}
_MIN_EXPONENT = {
  np.dtype(jnp.float32): -126,
  np.dtype(jnp.bfloat16): -126,
  np.dtype(jnp.float16): -14,
  np.dtype(jnp.float64): -1022,
}


def exact_scope():
  """Context for tracing revoptax's exact arithmetic: 64-bit integers enabled.

  Arrays of 64-bit types must not leave the scope: convert them to words with
  :func:`split` (or to 32-bit types) before returning.
  """
  return jax.enable_x64(True)


class Fixed(NamedTuple):
  """A fixed-point array: ``value = (hi * 2**32 + lo) * 2**-radix_bits``."""

  hi: jax.Array  # int32
  lo: jax.Array  # uint32


def join(x: Fixed) -> jax.Array:
  """The ``int64`` integer of fixed-point words (inside :func:`exact_scope`)."""
  return (x.hi.astype(I64) << 32) | x.lo.astype(I64)


def split(k) -> Fixed:
  """Fixed-point words of an ``int64`` integer below ``2**62`` in magnitude."""
  return Fixed((k >> 32).astype(I32), (k & 0xFFFFFFFF).astype(U32))


@dataclasses.dataclass(frozen=True)
class FixedPointFormat:
  """Radix and range of revoptax's fixed-point numbers.

  Attributes:
    radix_bits: number of fractional bits R; the resolution is ``2**-R``.
    int_bits: values must satisfy ``|x| < 2**int_bits``.

  The default ``R = 46, int_bits = 16`` resolves ``1.4e-14`` (finer than
  float32 at ``|x| >= 2.4e-7``) and holds ``|x| < 65536``.

  Example:
    >>> import jax.numpy as jnp
    >>> from revoptax import FixedPointFormat
    >>> fmt = FixedPointFormat()
    >>> x, ok = fmt.from_float(jnp.asarray([0.1, -2.5], jnp.float32))
    >>> fmt.to_float(fmt.add(x, x)).tolist()
    [0.20000000298023224, -5.0]
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

  def zeros(self, shape) -> Fixed:
    return Fixed(jnp.zeros(shape, I32), jnp.zeros(shape, U32))

  def in_range(self, x: Fixed) -> jax.Array:
    """Elementwise ``|x| < 2**int_bits`` (exact)."""
    with exact_scope():
      return self.in_range_int(join(x))

  def in_range_int(self, k) -> jax.Array:
    """:meth:`in_range` of ``int64`` integers; inside :func:`exact_scope`."""
    limit = 1 << (self.int_bits + self.radix_bits)
    return (k > -limit) & (k < limit)

  def from_float(self, x) -> tuple[Fixed, jax.Array]:
    """Round floats to the nearest fixed-point value (ties to even), exactly.

    Returns:
      ``(fixed, ok)`` where ``ok`` is False where ``x`` was not finite or out of
      range (those elements hold an unspecified value).
    """
    with exact_scope():
      k, ok = self.quantize(x)
      return split(k), ok

  def to_float(self, x: Fixed, dtype=jnp.float32) -> jax.Array:
    """Correctly rounded (half to even) float value of fixed-point words."""
    with exact_scope():
      return self.dequantize(join(x), dtype)

  def add(self, a: Fixed, b: Fixed) -> Fixed:
    """Exact ``a + b`` (check the result with :meth:`in_range`)."""
    with exact_scope():
      return split(join(a) + join(b))

  def sub(self, a: Fixed, b: Fixed) -> Fixed:
    """Exact ``a - b`` (check the result with :meth:`in_range`)."""
    with exact_scope():
      return split(join(a) - join(b))

  # The same on int64 integers, for use inside exact_scope().

  def quantize(self, x) -> tuple[jax.Array, jax.Array]:
    """``(round(x * 2**R), ok)`` as ``int64``, ties to even; inside :func:`exact_scope`.

    float32 and narrower (widened to float32 exactly): from the float's bits
    in integers (significand shifted by its exponent plus ``R``, rounded half
    to even), so no float64 is needed.  float64: scaling by a power of two
    and rounding to an integer, both exact.
    """
    x = jnp.asarray(x)
    cd = _compute_dtype(x.dtype)
    x = x.astype(cd)
    ok = jnp.isfinite(x) & (jnp.abs(x) < jnp.asarray(self.max_abs, cd))
    x = jnp.where(ok, x, jnp.zeros_like(x))
    if cd == np.dtype(jnp.float64):
      return jnp.round(x * 2.0**self.radix_bits).astype(I64), ok
    return _round_scaled_f32(x, self.radix_bits), ok

  def dequantize(self, k, dtype=jnp.float32) -> jax.Array:
    """Correctly rounded float of ``k * 2**-R`` for ``int64`` k; inside :func:`exact_scope`.

    float64 and float32: one conversion of ``k`` (``|k| < 2**62``) to the
    dtype, which IEEE 754 and XLA's ``convert`` (LLVM ``sitofp``, one
    ``vcvtqq2ps`` on AVX-512) round correctly, half to even, then an exact
    scaling by ``2**-R`` (the result is at least ``2**-R``, far above the
    subnormals).  ``tests/test_fixed_point.py`` checks the rounding on ties
    and near-ties against exact rational arithmetic.  bfloat16 and float16:
    ``|k|`` is rounded to the dtype's precision at its magnitude (``p``
    significant bits, or the subnormal spacing) half to even in integers, then
    converted exactly (a conversion through float32 would round twice).
    """
    dtype = np.dtype(dtype)
    scale = 2.0**-self.radix_bits
    if dtype in (np.dtype(jnp.float64), np.dtype(jnp.float32)):
      return k.astype(dtype) * np.asarray(scale, dtype)
    p, emin = _MANTISSA_BITS[dtype], _MIN_EXPONENT[dtype]
    mag = jnp.abs(k).astype(U64)  # |k| < 2**62
    nbits = (64 - lax.clz(mag)).astype(I64)
    shift = jnp.maximum(nbits - p, max(emin - p + 1 + self.radix_bits, 0))
    s = shift.astype(U64)
    t = mag >> s
    rem = mag & ((jnp.ones_like(mag) << s) - 1)
    half = (jnp.ones_like(mag) << s) >> 1
    t = t + ((rem > half) | ((rem == half) & (s > 0) & ((t & 1) == 1))).astype(U64)
    # value = t * 2**(shift - R) with t <= 2**p: build the power of two from bits.
    exponent = (shift - self.radix_bits + 127).astype(I32) << 23
    mag_f = t.astype(jnp.float32) * lax.bitcast_convert_type(exponent, jnp.float32)
    return jnp.where(k < 0, -mag_f, mag_f).astype(dtype)


def _round_scaled_f32(x, radix_bits: int):
  """``round(x * 2**radix_bits)`` (``int64``, half to even) of finite float32 ``x`` in range."""
  bits = lax.bitcast_convert_type(x, U32)
  biased = ((bits >> 23) & 0xFF).astype(I32)
  fraction = bits & 0x7FFFFF
  significand = jnp.where(biased > 0, fraction | 0x800000, fraction)  # < 2**24
  shift = jnp.maximum(biased, 1) - 150 + radix_bits  # x * 2**R = significand * 2**shift
  # Left shifts: in range, significand * 2**shift < 2**62; the clamp keeps others defined.
  left = significand.astype(I64) << jnp.clip(shift, 0, 39).astype(I64)
  right_by = jnp.clip(-shift, 1, 31).astype(U32)  # beyond 31 bits everything rounds to 0
  kept = significand >> right_by
  dropped = significand & ((jnp.ones_like(significand) << right_by) - 1)
  half = jnp.ones_like(significand) << (right_by - 1)
  up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
  right = (kept + up.astype(U32)).astype(I64)
  magnitude = jnp.where(shift >= 0, left, right)
  return jnp.where((bits >> 31) == 1, -magnitude, magnitude)


def _compute_dtype(dtype) -> np.dtype:
  """float64 stays float64; every narrower float is converted exactly to float32."""
  dtype = np.dtype(dtype)
  if dtype == np.dtype(jnp.float64):
    return dtype
  if dtype not in _MANTISSA_BITS:
    raise TypeError(f"revoptax fixed point supports float16/bfloat16/float32/float64, not {dtype}.")
  return np.dtype(jnp.float32)
