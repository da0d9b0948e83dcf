"""What the moment-based rules (Adam, RMSProp) share: exact decay through the buffer,
bias correction and a square root whose derivative at 0 is 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from revoptax import _buffer as buffer_lib
from revoptax import _scale
from revoptax._fusion import materialize
from revoptax._sgd import _straight_through


def decay(value, buf: buffer_lib.BufferState, scale: _scale.Scale, tag):
  """``(gamma value, buf', ok)``: :func:`revoptax._scale.multiply` with the head of ``buf``,
  spilling a row recorded with ``tag`` if needed (inside ``exact_scope``)."""
  head = buffer_lib.join_head(buf)
  value, head = materialize(_scale.multiply(value, head, scale))
  buf, ok = buffer_lib.spill(buf, head, tag)
  return value, buf, ok


def undecay(value, buf: buffer_lib.BufferState, scale: _scale.Scale, tag, clear_popped: bool):
  """Inverse of :func:`decay` at the same ``scale`` and ``tag``: ``(value, buf)``."""
  head, popped = buffer_lib.unspill(buf, tag)
  value, head = materialize(_scale.divide(value, head, scale))
  return value, buffer_lib.after_unspill(buf, head, popped, clear_popped)


def rate_scale(rate) -> _scale.Scale:
  """The :class:`revoptax._scale.Scale` of a decay rate ``b`` (``1 - b`` computed in the
  value's own precision, then rounded to float32)."""
  return _scale.quantize(1 - jnp.asarray(rate))


def applied_rate(rate, dtype):
  """The rate actually applied for ``rate``, with the identity as its derivative."""
  value = 1 - _scale.complement(rate_scale(rate), dtype)
  return _straight_through(jnp.asarray(rate, dtype), jax.lax.stop_gradient(value))


_ONE = 1 << 62  # fixed point of the bias correction: 62 fractional bits
_LOW32 = 0xFFFFFFFF


def _times(a, b):
  """``floor(a b / 2**62)`` of ``int64`` values in ``[0, 2**62]``, from 32-bit limbs."""
  a0, a1 = (a & _LOW32).astype("uint64"), (a >> 32).astype("uint64")
  b0, b1 = (b & _LOW32).astype("uint64"), (b >> 32).astype("uint64")
  mid = a0 * b1 + a1 * b0  # < 2**63
  shifted = (mid & ((1 << 30) - 1)) << 32
  low = shifted + a0 * b0
  carry = (low < shifted).astype("uint64")
  return (4 * (a1 * b1 + carry) + (mid >> 30) + (low >> 62)).astype("int64")


def bias_correction(scale: _scale.Scale, count, dtype):
  """``1 - gamma**count`` for the quantized ``gamma`` of ``scale`` (inside ``exact_scope``).

  Computed in 62-bit fixed point by binary exponentiation, carrying ``1 - gamma**k``
  itself (``S_{a+b} = S_a + gamma**a S_b``, ``S_2k = S_k + gamma**k S_k``) so that a small
  correction keeps its relative precision, then converted to ``dtype`` once: integer
  arithmetic, so both passes get the same bits whatever XLA fuses (a transcendental
  ``expm1(count log1p(-lam))`` did not).  ``count < 2**31``.
  """
  m = scale.m.astype("int64")
  base_s = m << 30  # (1 - gamma) 2**62
  base_p = _ONE - base_s  # gamma 2**62
  n = jnp.asarray(count, jnp.int32).astype("int64")
  res_s, res_p = jnp.zeros_like(base_s), jnp.full_like(base_s, _ONE)
  for bit in range(31):
    take = ((n >> bit) & 1) == 1
    res_s = jnp.where(take, res_s + _times(res_p, base_s), res_s)
    res_p = jnp.where(take, _times(res_p, base_p), res_p)
    base_s = base_s + _times(base_p, base_s)
    base_p = _times(base_p, base_p)
  return res_s.astype(dtype) * np.asarray(2.0**-62, dtype)


def safe_sqrt(x):
  """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 (an element whose gradient
  was always 0 has zero moments and takes no step, whatever their tangents)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def rounded(x):
  """``x``, rounded on its own: an optimization barrier, so that XLA neither fuses the
  operation producing ``x`` with the next (a multiply-add contracted into one rounding)
  nor rewrites it (a division by a compile-time constant into a multiplication by its
  reciprocal).  Every float operation of a weight update that is recomputed in the
  backward pass goes through it: the update must have the same bits in both passes,
  whichever of its inputs are constants in one of them."""
  return jax.lax.optimization_barrier(x)
