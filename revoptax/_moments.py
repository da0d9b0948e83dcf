"""What the moment-based rules (Adam, RMSProp) share: exact decay through the buffer,
bias correction and a square root whose derivative at 0 is 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def bias_correction(one_minus_beta, count, dtype):
  """``1 - beta**count`` from ``1 - beta``, as ``-expm1(count log1p(-(1 - beta)))``."""
  count = jnp.asarray(count, jnp.int32).astype(dtype)
  return -jnp.expm1(count * jnp.log1p(-jnp.asarray(one_minus_beta, dtype)))


def safe_sqrt(x):
  """``sqrt(x)`` for ``x >= 0`` whose derivative at 0 is 0 (an element whose gradient
  was always 0 has zero moments and takes no step, whatever their tangents)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)
