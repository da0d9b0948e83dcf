"""Exact multiplication by a constant ``gamma = 1 - lam`` in ``[1/4, 1]``, to a few units.

The decay rates of Adam and RMSProp (``b1``, ``b2``, ``decay``, ``momentum``)
and decoupled weight decay (``1 - lr * wd``) need a multiplication that is
exactly invertible, accurate to far below the resolution of the float it
stands for, and resolved finely enough that ``b2 = 0.999`` or ``lam = 1e-7`` is
applied as given.  :func:`revoptax._buffer.push_pop` alone (``gamma = n / 2**k``)
replaces the low ``k`` bits of the value with a digit from the buffer: an
error of up to ``2**k`` units, and a resolution of ``2**-k`` in ``gamma``.  So
``gamma`` is split in two factors::

    gamma = (n / 4096) * (1 - m / 2**32),   n = 4096 - floor(4096 lam),  m <= 2**22

- the coarse factor ``n / 4096`` is :func:`revoptax._buffer.push_pop` with
  ``k = 12`` (an error below 4096 units; skipped when ``n = 4096``, i.e.
  ``lam < 2**-12``, as for ``b2 = 0.9999`` or any weight decay step below that);
- the fine factor ``1 - m / 2**32`` (at most ``2**-10`` below one) is rounding
  to the nearest unit, ``f(W) = W - D(W)`` with ``D(W) = round(m W / 2**32)``.
  ``f`` is non-decreasing in steps of 0 or 1, so each value has one or two
  preimages; when two, which one it was is pushed as one raw bit onto the
  buffer head.  Undoing finds the preimages by the contraction
  ``X <- W' + D(X)`` from ``X = W'`` (each round divides the distance by
  ``2**10``) and a window of five candidates.

Both factors are bijections on ``(value, head)``.  The buffer grows by
``log2(4096 / n)`` bits for the coarse factor and by one bit with probability
about ``2 m / 2**32`` for the fine one, i.e. ``log2(1 / gamma)`` plus at most
``0.56 m / 2**32 <= 1.4e-4`` bits per element per step (:func:`cost`); one
multiplication grows a head by at most 3 bits, so heads below ``2**56`` stay
within 64 bits.  The error against ``gamma W`` is below ``4096.5`` units, and
half a unit when the coarse factor is skipped.

Everything is integer arithmetic on ``int64``/``uint64`` inside
:func:`revoptax._fixed_point.exact_scope`, on 64-bit values (:func:`multiply`)
and on the 96-bit values of :mod:`revoptax._wide` (:func:`multiply_wide`).
``lam`` is given (not ``gamma``) so that ``lam = 1e-7`` is not rounded away in
float32.
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
COARSE_BITS = 12
COARSE = 1 << COARSE_BITS
FINE_BITS = 32
# After the coarse factor m / 2**32 < 2**-10 (lam - floor(4096 lam) / 4096 < 2**-12, divided
# by n / 4096 >= 1/4); m <= 2**22 keeps m * hi < 2**52 and m * lo < 2**54 in D.
_FINE_MAX = 1 << 22
# |D| <= 2**-10 * 2**62 = 2**52; six rounds bring the estimate within one unit.
_ROUNDS = 6
SMALLEST = 0.25  # gamma >= 1/4: n >= 1024, so the coarse step grows a head by at most 2 bits


class Scale(NamedTuple):
  """A quantized ``gamma = (n / 4096) (1 - m / 2**32)`` (``uint32`` each, per element)."""

  n: jax.Array
  m: jax.Array


def quantize(lam) -> Scale:
  """The :class:`Scale` of ``gamma = 1 - lam`` for float ``lam`` in ``[0, 3/4]`` (clipped).

  ``n = 4096 - floor(4096 lam)`` and ``m = round(2**32 (lam - j / 4096) / (n / 4096))``
  with ``j = 4096 - n`` (float32 arithmetic, every step exact but the division);
  non-finite ``lam`` maps to ``gamma = 1`` (callers report it).
  """
  lam = jnp.asarray(lam, jnp.float32)
  lam = jnp.clip(jnp.where(jnp.isfinite(lam), lam, 0.0), 0.0, 1.0 - SMALLEST)
  j = jnp.floor(lam * COARSE)
  n = COARSE - j
  fine = (lam - j / COARSE) / (n / COARSE)  # lam - j / 4096 is exact (Sterbenz)
  m = jnp.clip(jnp.round(fine * 2.0**FINE_BITS), 0, _FINE_MAX)
  return Scale(n.astype(U32), m.astype(U32))


def complement(scale: Scale, dtype=jnp.float32):
  """``1 - gamma`` of a :class:`Scale` in ``dtype``: ``j / 4096 + (n / 4096)(m / 2**32)``."""
  n = scale.n.astype(dtype)
  return (COARSE - n) / COARSE + (n / COARSE) * (scale.m.astype(dtype) * 2.0**-FINE_BITS)


def _rounded_product(w, m):
  """``D(W) = round(m W / 2**32)`` (ties up), exact for ``|W| < 2**62``, ``m <= 2**22``."""
  hi = w >> 32
  lo = w & 0xFFFFFFFF
  return m * hi + ((m * lo + (1 << 31)) >> 32)


def multiply(value, head, scale: Scale):
  """``(gamma value, head')`` exactly, for ``int64`` values and ``uint64`` heads below 2**56."""
  n = scale.n.astype(U32)
  coarse, coarse_head = buffer_lib.push_pop(value, head, jnp.minimum(n, COARSE - 1), COARSE_BITS)
  skip = n == COARSE
  value = jnp.where(skip, value, coarse)
  head = jnp.where(skip, head, coarse_head)
  value, head = materialize((value, head))
  m = scale.m.astype(I64)
  d = _rounded_product(value, m)
  upper = (d - _rounded_product(value - 1, m)) == 1  # f(value - 1) == f(value)
  lower = (_rounded_product(value + 1, m) - d) == 1  # f(value + 1) == f(value)
  head = jnp.where(upper | lower, (head << 1) | upper.astype(U64), head)
  return value - d, head


def divide(value, head, scale: Scale):
  """Inverse of :func:`multiply`: ``(value, head)`` from ``(gamma value, head')``."""
  m = scale.m.astype(I64)
  x = value
  for _ in range(_ROUNDS):
    x = value + _rounded_product(x, m)
  lowest = x + 2
  for offset in (1, 0, -1, -2):  # the smallest preimage in [x - 1, x + 1]
    c = x + offset
    lowest = jnp.where(c - _rounded_product(c, m) == value, c, lowest)
  upper = lowest + 1
  paired = upper - _rounded_product(upper, m) == value
  bit = (head & 1).astype(I64)
  value = jnp.where(paired, lowest + bit, lowest)
  head = jnp.where(paired, head >> 1, head)
  value, head = materialize((value, head))
  n = scale.n.astype(U32)
  coarse, coarse_head = buffer_lib.pop_push(value, head, jnp.minimum(n, COARSE - 1), COARSE_BITS)
  skip = n == COARSE
  return jnp.where(skip, value, coarse), jnp.where(skip, head, coarse_head)


def cost(lam) -> tuple[np.ndarray, np.ndarray]:
  """``(mean, variance)`` of the buffer bits per element of multiplying by ``1 - lam``
  (NumPy, with the quantization of :func:`quantize`)."""
  lam = np.clip(np.nan_to_num(np.asarray(lam, np.float64), nan=0.0), 0.0, 1.0 - SMALLEST)
  j = np.floor(lam * COARSE)
  n = COARSE - j
  fine = np.clip((lam - j / COARSE) / (n / COARSE), 0.0, _FINE_MAX * 2.0**-FINE_BITS)
  pair = 2.0 * fine  # probability of pushing a bit
  return np.log2(COARSE / n) + pair, pair * (1.0 - pair)


# The same on 96-bit values (revoptax._wide), for the second moments.
_WIDE_ROUNDS = 9  # |D| <= 2**84 for |V| < 2**94: 2**84 * 2**(-10 * 9) < 1, then within one


def _rounded_product_wide(a, m):
  """``D(V) = round(m V / 2**32)`` of an ``(h, low)`` pair with ``|V| < 2**94``, ``m <= 2**22``."""
  h, low = a
  carry_in = (m.astype(U64) * (low & 0xFFFFFFFF) + (1 << 31)) >> 32
  low_part = m.astype(U64) * (low >> 32) + carry_in  # < 2**59
  high_part = m * h  # |m h| < 2**56: contributes high_part * 2**32
  shifted_low = (high_part & 0xFFFFFFFF).astype(U64) << 32
  low = shifted_low + low_part
  return (high_part >> 32) + (low < shifted_low).astype(I64), low


def _coarse_multiply_wide(a, head, n):
  s, head = buffer_lib.pop_symbol(head, (a[1] & (COARSE - 1)).astype(U32), n, COARSE_BITS)
  h, low = _wide.shift_right(a, COARSE_BITS)
  n64 = n.astype(U64)
  part0, part1 = (low & 0xFFFFFFFF) * n64, (low >> 32) * n64  # each < 2**44
  low = part0 + ((part1 & 0xFFFFFFFF) << 32)
  high = h * n.astype(I64) + (part1 >> 32).astype(I64) + (low < part0).astype(I64)
  return _wide.add((high, low), (jnp.zeros_like(high), s.astype(U64))), head


def _coarse_divide_wide(a, head, n):
  neg = a[0] < 0
  h, low = _wide.where(neg, (~a[0], ~a[1]), a)  # ~V = -V - 1 >= 0
  n64, inv = n.astype(I64), buffer_lib._reciprocal(n)
  q_high = buffer_lib._quotient_long(h.astype(U64), n, inv)
  rem = h - q_high * n64
  q_mid = buffer_lib._quotient_long(((rem << 32) | (low >> 32).astype(I64)).astype(U64), n, inv)
  rem = ((rem << 32) | (low >> 32).astype(I64)) - q_mid * n64
  num = (rem << 32) | (low & 0xFFFFFFFF).astype(I64)
  q_low = buffer_lib._quotient_long(num.astype(U64), n, inv)
  rem = (num - q_low * n64).astype(U32)
  q = (q_high, (q_mid.astype(U64) << 32) | q_low.astype(U64))
  q = _wide.where(neg, (~q[0], ~q[1]), q)
  s = jnp.where(neg, n - 1 - rem, rem)
  r, head = buffer_lib.push_symbol(head, s, n, COARSE_BITS)
  h, low = _wide.shift_left(q, COARSE_BITS)
  return (h, low | r.astype(U64)), head


def multiply_wide(a, head, scale: Scale):
  """:func:`multiply` of a 96-bit ``(h, low)`` pair."""
  n = scale.n.astype(U32)
  coarse, coarse_head = _coarse_multiply_wide(a, head, jnp.minimum(n, COARSE - 1))
  skip = n == COARSE
  a = _wide.where(skip, a, coarse)
  head = jnp.where(skip, head, coarse_head)
  a, head = materialize((a, head))
  m = scale.m.astype(I64)
  d = _rounded_product_wide(a, m)
  one = _wide.small(1)
  upper = ~_wide.equal(d, _rounded_product_wide(_wide.sub(a, one), m))
  lower = ~_wide.equal(_rounded_product_wide(_wide.add(a, one), m), d)
  head = jnp.where(upper | lower, (head << 1) | upper.astype(U64), head)
  return _wide.sub(a, d), head


def divide_wide(a, head, scale: Scale):
  """Inverse of :func:`multiply_wide`."""
  m = scale.m.astype(I64)
  x = a
  for _ in range(_WIDE_ROUNDS):
    x = _wide.add(a, _rounded_product_wide(x, m))
  lowest = _wide.add(x, _wide.small(2))
  for offset in (1, 0, -1, -2):
    c = _wide.add(x, _wide.small(offset))
    maps = _wide.equal(_wide.sub(c, _rounded_product_wide(c, m)), a)
    lowest = _wide.where(maps, c, lowest)
  upper = _wide.add(lowest, _wide.small(1))
  paired = _wide.equal(_wide.sub(upper, _rounded_product_wide(upper, m)), a)
  bit = (head & 1).astype(I64)
  a = _wide.where(paired, _wide.add(lowest, _wide.small(bit)), lowest)
  head = jnp.where(paired, head >> 1, head)
  a, head = materialize((a, head))
  n = scale.n.astype(U32)
  coarse, coarse_head = _coarse_divide_wide(a, head, jnp.minimum(n, COARSE - 1))
  skip = n == COARSE
  return _wide.where(skip, a, coarse), jnp.where(skip, head, coarse_head)
