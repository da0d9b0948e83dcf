"""Exact multiplication by ``gamma = 1 - lam`` in ``[1/2, 1]``, to within one unit.

The decay rates of Adam and RMSProp (``b1``, ``b2``, ``decay``, ``momentum``)
and decoupled weight decay (``1 - lr * wd``) need a multiplication that is
exactly invertible, within a unit of the exact product (so a zero stays zero
and a small value is not swamped), and resolved finely enough that ``b2 =
0.999`` or ``lam = 1e-7`` is applied as given.  :func:`revoptax._buffer.push_pop`
(``gamma = n / 2**k``) replaces the low ``k`` bits of the value with a digit
from the buffer, an error of up to ``2**k`` units; here instead ``gamma =
G / 2**32`` (``G = 2**32 - round(lam 2**32)``) and the product is rounded with
a dither popped from the buffer (bits-back rounding)::

    s  = head mod 2**16,  head <- head // 2**16      16 raw bits, the dither
    W' = floor((G W + s 2**16) / 2**32)             = floor(gamma W + s / 2**16)
    head <- head * N(W') + index of (W, s) among the N(W') pairs that give W'

``N(W')``, the number of pairs ``(W, s)`` with ``s < 2**16`` mapping to ``W'``, is
about ``2**16 / gamma``: the pairs lie in at most five consecutive
``W`` (``gamma >= 1/2``), each with a range of ``s``, and are numbered in order.
Undoing computes ``X = floor(W' 2**32 / G)`` by long division, lists the same
pairs around it, reads the index back from ``head mod N(W')`` and restores
``(W, s)`` and the head.  Every quantity is exact integer arithmetic on
128-bit ``(h, l)`` pairs (:mod:`revoptax._wide`), so the same code serves 64-bit
and 96-bit values, inside :func:`revoptax._fixed_point.exact_scope`.

Small values are sticky (0 and +-1 are kept), so a moment whose gradient is
always zero costs no buffer (plain dithered rounding would charge it
``log2(1 + 2 lam)`` bits per step, the most of any value).

Properties: ``|W' - gamma W| < 1``; ``W = 0`` gives ``W' = 0``; the head grows
by ``log2(N / 2**16)`` bits, on average ``log2(1 / gamma)`` to within 1%, at most
about ``log2(1 + 2 lam)`` (:func:`cost`) and never more than 2 bits, so heads
below ``2**56`` stay below ``2**58``.  ``gamma = 1`` is the identity.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revoptax import _buffer as buffer_lib
from revoptax import _wide
from revoptax._fusion import materialize

I64, U64 = "int64", "uint64"
U32 = jnp.uint32
FINE_BITS = 32
DITHER_BITS = 16
DITHERS = 1 << DITHER_BITS
_UNIT = 32 - DITHER_BITS  # a dither step is 2**_UNIT in units of 2**-32
SMALLEST = 0.5  # gamma >= 1/2: the pairs of one W' lie in at most five consecutive W
_WINDOW = 4  # candidates W - 4 .. W + 4 (forward) and X - 4 .. X + 4 (reverse)
_DIGIT_BITS = 21


class Scale(NamedTuple):
  """A quantized ``gamma = 1 - m / 2**32`` (``m``: ``uint32``, per element)."""

  m: jax.Array


def quantize(lam) -> Scale:
  """The :class:`Scale` of ``gamma = 1 - lam``: ``m = round(float32(lam) 2**32)``,
  ``lam`` clipped to ``[0, 1/2]``; non-finite ``lam`` maps to ``gamma = 1`` (callers
  report it)."""
  lam = jnp.asarray(lam).astype(jnp.float32)
  lam = jnp.clip(jnp.where(jnp.isfinite(lam), lam, 0.0), 0.0, 1.0 - SMALLEST)
  return Scale(jnp.round(lam * 2.0**FINE_BITS).astype(U32))


def complement(scale: Scale, dtype=jnp.float32):
  """``1 - gamma = m / 2**32`` of a :class:`Scale`, in ``dtype``."""
  return scale.m.astype(dtype) * np.asarray(2.0**-FINE_BITS, dtype)


def _multiple(a, g):
  """``g * a`` for an ``(h, l)`` pair ``a`` with ``|a| < 2**95`` and ``g <= 2**32`` (int64)."""
  h, low = a
  g_u = g.astype(U64)
  p0 = (low & 0xFFFFFFFF) * g_u  # < 2**64
  p1 = (low >> 32) * g_u
  mid = (p0 >> 32) + (p1 & 0xFFFFFFFF)  # < 2**33
  new_low = (p0 & 0xFFFFFFFF) | (mid << 32)
  return h * g + (p1 >> 32).astype(I64) + (mid >> 32).astype(I64), new_low


def _dither_bound(e):
  """``clip(ceil(E / 2**16), 0, 2**16)`` of an ``(h, l)`` pair ``E`` (uint32)."""
  h, low = e
  inside = (low + (1 << _UNIT) - 1) >> _UNIT
  full = (h > 0) | (low >= (1 << 32))
  return jnp.where(h < 0, 0, jnp.where(full, DITHERS, inside)).astype(U32)


def _counts(center, new, e_center, g):
  """Per candidate ``w = center + j``, ``j = -4 .. 4``: ``(s_lo, count)``, the dithers ``s``
  of ``w`` that give ``new`` (``s_lo <= s < s_lo + count``), from ``E = new 2**32 - G center``.

  Small values are sticky: 0 gives 0 and +-1 give +-1 whatever the dither (the plain
  rounding would take +-1 to 0 for some dithers), so a moment that stays zero costs
  no buffer.  No other value can give 0 or keep +-1 (``gamma >= 1/2``).
  """
  span = _wide.small(jnp.full(jnp.shape(g), 1 << 32, I64))  # E + 2**32 bounds s from above
  out = []
  for j in range(-_WINDOW, _WINDOW + 1):
    e = _wide.sub(e_center, _wide.small(j * g))
    lo = _dither_bound(e)
    count = _dither_bound(_wide.add(e, span)) - lo
    w = _wide.add(center, _wide.small(j))
    sticky = _small_value(w)
    lo = jnp.where(sticky, 0, lo)
    count = jnp.where(sticky, jnp.where(_wide.equal(w, new), DITHERS, 0), count).astype(U32)
    out.append((lo, count))
  return out


def _small_value(a):
  """``a`` in ``{-1, 0, 1}`` for an ``(h, l)`` pair."""
  h, low = a
  return ((h == 0) & (low <= 1)) | ((h == -1) & (~low == 0))


def _pair(value):
  return value if isinstance(value, tuple) else _wide.small(value)


def multiply(value, head, scale: Scale):
  """``(gamma value, head')`` exactly; ``value`` an ``int64`` array or an ``(h, l)`` pair
  (returned in the same form), ``head`` ``uint64`` below ``2**56``."""
  pair = _pair(value)
  g = (1 << 32) - scale.m.astype(I64)
  s = (head & (DITHERS - 1)).astype(U32)
  rest = head >> DITHER_BITS
  product = _multiple(pair, g)
  shifted = _wide.add(product, _wide.small(s.astype(I64) << _UNIT))
  new = (shifted[0] >> 32, (shifted[1] >> 32) | (shifted[0] << 32).astype(U64))
  new = materialize(_wide.where(_small_value(pair), pair, new))
  e_center = _wide.sub(_wide.shift_left(new, 32), product)
  counts = _counts(pair, new, e_center, g)
  index = s - counts[_WINDOW][0]
  total = jnp.zeros_like(s)
  for j, (_, count) in enumerate(counts):
    total = total + count
    if j < _WINDOW:
      index = index + count
  head = rest * total.astype(U64) + index.astype(U64)
  return (new if isinstance(value, tuple) else new[1].astype(I64)), head


def divide(value, head, scale: Scale):
  """Inverse of :func:`multiply`."""
  new = _pair(value)
  g = (1 << 32) - scale.m.astype(I64)
  numerator = _wide.shift_left(new, 32)
  center = _floor_divide(numerator, g)
  e_center = _wide.sub(numerator, _multiple(center, g))
  counts = _counts(center, new, e_center, g)
  total = sum((count for _, count in counts), jnp.zeros(jnp.shape(g), U32))
  inv = buffer_lib._reciprocal(total)
  rest = buffer_lib._quotient_long(head, total, inv).astype(U64)
  index = (head - rest * total.astype(U64)).astype(U32)
  offset = jnp.zeros_like(index).astype(I64)
  s = jnp.zeros_like(index)
  before = jnp.zeros_like(index)
  for j, (lo, count) in enumerate(counts):
    here = (index >= before) & (index < before + count)
    offset = jnp.where(here, j - _WINDOW, offset)
    s = jnp.where(here, lo + index - before, s)
    before = before + count
  old = _wide.add(center, _wide.small(offset))
  head = (rest << DITHER_BITS) | s.astype(U64)
  return (old if isinstance(value, tuple) else old[1].astype(I64)), head


def _floor_divide(a, g):
  """``floor(a / g)`` of an ``(h, l)`` pair by ``g`` in ``[2**31, 2**32]``: long division in
  21-bit digits, each estimated in float32 and corrected (as ``_buffer._quotient_long``)."""
  negative = a[0] < 0
  h, low = _wide.where(negative, (~a[0], ~a[1]), a)  # ~a = -a - 1 >= 0
  inv = buffer_lib._reciprocal(g)
  # 128 bits = 2 + 6 * 21: the top two bits first, then six digits.
  digits = [(h >> 62) & 3]
  for k in range(5, -1, -1):
    shift = k * _DIGIT_BITS
    if shift >= 64:
      part = h >> (shift - 64)
    elif shift + _DIGIT_BITS > 64:
      part = (h << (64 - shift)) | (low >> shift).astype(I64)
    else:
      part = (low >> shift).astype(I64)
    digits.append(part & ((1 << _DIGIT_BITS) - 1))
  q_h, q_l = jnp.zeros_like(h), jnp.zeros_like(low)
  rem = jnp.zeros_like(h)
  for i, digit in enumerate(digits):
    bits = 2 if i == 0 else _DIGIT_BITS
    partial = (rem << bits) | digit
    estimate = jnp.floor(partial.astype(jnp.float32) * inv).astype(I64)
    q_digit, rem = buffer_lib._correct(partial, g, estimate)
    q_h, q_l = _wide.shift_left((q_h, q_l), bits)
    q_l = q_l | q_digit.astype(U64)
  q = (q_h, q_l)
  return _wide.where(negative, (~q[0], ~q[1]), q)


def cost(lam, guaranteed: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, variance)`` of the buffer bits per element and step of multiplying by
  ``1 - lam`` (NumPy), to size the buffer: with ``guaranteed``, ``(bound, 0)``, the
  most one element can gain, so that the buffer can never run out; else the expected
  ``1.01 log2(1 / gamma)`` with the variance ``(bound / 2)**2``, which holds typical
  training at about half the memory but runs out (reported) where many steps keep
  moments at +-1.

  A step grows a head by ``log2(N / 2**16)`` with ``N <= 2**16 + ceil(2**17 lam / gamma)``.
  On average over values far above one unit that is ``log2(1 / gamma)`` to within 1%
  (measured); an element that stays at +-1 (a moment whose gradient has been zero for
  long) pays the most, about ``log2(1 + 2 lam)``: it could have come from +-2, and the
  buffer keeps which.  (No exact multiplication within a unit avoids that: a value that
  others decay into must record which one it was.)
  """
  lam = np.clip(np.nan_to_num(np.asarray(lam, np.float64), nan=0.0), 0.0, 1.0 - SMALLEST)
  gamma = 1.0 - np.round(lam * 2.0**FINE_BITS) * 2.0**-FINE_BITS
  widest = np.log2((DITHERS + np.ceil(2.0 * DITHERS * lam / gamma)) / DITHERS)
  if guaranteed:
    return widest, np.zeros_like(widest)
  return -1.01 * np.log2(gamma), (widest / 2) ** 2
