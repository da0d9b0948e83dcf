"""The information buffer: exact multiplication by a momentum ``gamma = n / 2**k``.

Multiplying the velocity by ``gamma < 1`` destroys information, so to undo it
exactly the lost digits must be kept.  Following Maclaurin et al. (2015, §2.3)
the fixed-point integer ``v`` is split as ``v = q * 2**k + r`` (``r`` the low
``k`` bits), ``r`` is *pushed* onto the buffer, and a digit ``s`` in ``[0, n)``
is *popped* from it, giving::

    v' = q * n + s          (= v * gamma up to n units of the last place)

The buffer is an asymmetric numeral system (rANS) coder run backwards, one per
parameter.  Each parameter has a 64-bit *head* ``x``; a step forms
``X = x * 2**k + r`` (pushing the ``k`` raw bits) and decodes ``s`` from ``X``
with quantized uniform frequencies over ``n`` symbols at precision
``M = 2**(k + 8)``::

    a, rr = divmod(M, n)                     # symbols < rr have f = a + 1, others a
    s, f, cdf = symbol of (X mod M)
    x' = f * (X // M) + (X mod M) - cdf      # the rANS decode step

so ``x`` grows by ``log2(2**k / n) = log2(1 / gamma)`` bits per step (plus
below ``3e-6`` bits of quantization loss).  When any head of a leaf reaches
``2**64``, the low 32 bits of *every* head of that leaf are spilled as one row
of a preallocated stack (the step is recorded with the row), so writes are
whole rows (``dynamic_update_slice``) and never scatters.  Because every step
is a bijection on ``(v, buffer)``, :func:`divide` undoes :func:`multiply`
exactly, leaving the buffer exactly as it was.

``gamma`` may be a traced value that changes every step and per leaf (or even
per element): nothing about the coder depends on ``lcm(n, 2**k)``.  Momentum
is quantized to ``n = round(gamma * 2**k)``, clipped to ``[2**(k-8), 2**k - 1]``.

Reference: Maclaurin, Duvenaud & Adams, ICML 2015, §2.3 and Appendix;
J. Duda, "Asymmetric numeral systems", arXiv:1311.2540 (2013).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from revoptax import _words as words
from revoptax._fixed_point import Fixed

I32, U32 = jnp.int32, jnp.uint32
HEAD_BITS_INITIAL = 32
# Per-step bits above log2(1/gamma) that the capacity rule budgets for
# (quantization loss is below 3e-6 bits/step; the rest is margin).
_CAPACITY_SLACK_BITS_PER_STEP = 2.0**-10
_CAPACITY_SLACK_BITS = 72.0


class BufferState(NamedTuple):
  """Information buffer of one parameter leaf (arrays only).

  Attributes:
    head_hi, head_lo: the 64-bit rANS head of each element, as two words.
    stack: ``uint32[capacity, *shape]`` spilled rows.
    row_step: ``int32[capacity]``, the step that spilled each row (-1 if free).
    size: ``int32[]`` number of rows in use.
  """

  head_hi: jax.Array
  head_lo: jax.Array
  stack: jax.Array
  row_step: jax.Array
  size: jax.Array


def init(shape, capacity: int) -> BufferState:
  """An empty buffer for a leaf of ``shape`` holding ``capacity`` spilled rows."""
  shape = tuple(shape)
  return BufferState(
    head_hi=jnp.ones(shape, U32),  # head = 2**32
    head_lo=jnp.zeros(shape, U32),
    stack=jnp.zeros((capacity, *shape), U32),
    row_step=jnp.full((capacity,), -1, I32),
    size=jnp.zeros((), I32),
  )


def quantize_momentum(gamma, momentum_bits: int) -> jax.Array:
  """``n = round(gamma * 2**k)`` clipped to ``[2**(k-8), 2**k - 1]`` (uint32).

  Non-finite ``gamma`` maps to the smallest ``n``; callers report it.
  """
  k = momentum_bits
  g = jnp.asarray(gamma, jnp.float32)
  g = jnp.where(jnp.isfinite(g), g, 0.0)
  n = jnp.clip(jnp.round(g * 2.0**k), 2.0 ** (k - 8), 2.0**k - 1)
  return n.astype(U32)


def dequantize_momentum(n, momentum_bits: int, dtype=jnp.float32) -> jax.Array:
  """The momentum actually applied, ``n / 2**k`` (exact in float32)."""
  return (n.astype(jnp.float32) * 2.0**-momentum_bits).astype(dtype)


def bits_per_step(n, momentum_bits: int):
  """Information cost ``log2(2**k / n)`` of one multiplication, in bits."""
  return momentum_bits - jnp.log2(jnp.asarray(n, jnp.float32))


def capacity_for(total_bits: float, num_steps: int) -> int:
  """Rows of stack needed for ``num_steps`` steps costing ``total_bits`` in all.

  The rule: each element's head gains ``log2(1/gamma_t)`` bits at step t (plus
  below 3e-6 bits of coding loss, budgeted at 2**-10) and spills 32 bits a row,
  starting from a 32-bit head and holding at most 64 bits, so
  ``ceil((total_bits + T * 2**-10 + 72) / 32)`` rows always suffice.
  """
  slack = num_steps * _CAPACITY_SLACK_BITS_PER_STEP + _CAPACITY_SLACK_BITS
  return max(1, math.ceil((float(total_bits) + slack) / 32.0))


def _symbol_table(n, momentum_bits: int):
  m_total = words.u32(1 << (momentum_bits + 8))
  a = m_total // n
  rr = m_total - a * n
  return a, rr, rr * (a + 1)


def _freq_cdf(s, a, rr, boundary):
  first = s < rr
  f = jnp.where(first, a + 1, a)
  cdf = jnp.where(first, s * (a + 1), boundary + (s - rr) * a)
  return f, cdf


def multiply(v: Fixed, buf: BufferState, n, step, momentum_bits: int):
  """Exactly multiply ``v`` by ``n / 2**k``, moving lost digits into ``buf``.

  Args:
    v: fixed-point velocity of one leaf.
    buf: that leaf's buffer.
    n: ``uint32`` numerator from :func:`quantize_momentum` (broadcastable to v).
    step: ``int32`` step index, recorded with any spilled row.
    momentum_bits: ``k``.

  Returns:
    ``(v', buf', ok)``; ``ok`` is False if the stack was already full.
  """
  k = momentum_bits
  a, rr, boundary = _symbol_table(words.u32(n), k)  # per leaf, before broadcasting
  n = jnp.broadcast_to(words.u32(n), v.lo.shape)
  hi_u = lax.bitcast_convert_type(v.hi, U32)
  r = v.lo & ((1 << k) - 1)
  q_lo = (v.lo >> k) | (hi_u << (32 - k))
  q_hi = v.hi >> k  # arithmetic shift: floor division for negative v

  # X = head * 2**k + r;  c = X mod M;  X // M = head >> 8.
  xh, xl = buf.head_hi, buf.head_lo
  c = ((xl & 0xFF) << k) | r
  first = c < boundary
  q, _ = words.divmod_small(jnp.where(first, c, c - boundary), jnp.where(first, a + 1, a))
  s = jnp.where(first, q, rr + q)
  f, cdf = _freq_cdf(s, a, rr, boundary)
  shifted = words.to_limbs(xh >> 8, (xl >> 8) | (xh << 24))
  x_new = words.mul_limbs_small(shifted, f, c - cdf)  # 5 limbs, < 2**72

  spill = jnp.any(x_new[0] != 0)
  full = buf.size >= buf.stack.shape[0]
  head_spilled = (x_new[0], (x_new[1] << 16) | x_new[2])  # x_new >> 32
  head_kept = words.from_limbs(x_new[1:])
  new_hi = jnp.where(spill, head_spilled[0], head_kept[0])
  new_lo = jnp.where(spill, head_spilled[1], head_kept[1])
  # Low 32 bits of x_new are limbs 3 and 4.
  row = (x_new[3] << 16) | x_new[4]

  # Always write one row in place (selecting the old contents when not
  # spilling): cheaper inside a loop than a conditional on the whole stack.
  idx = jnp.minimum(buf.size, buf.stack.shape[0] - 1)
  old_row = lax.dynamic_index_in_dim(buf.stack, idx, 0, keepdims=False)
  stack = lax.dynamic_update_index_in_dim(buf.stack, jnp.where(spill, row, old_row), idx, 0)
  old_step = lax.dynamic_index_in_dim(buf.row_step, idx, 0, keepdims=False)
  row_step = lax.dynamic_update_index_in_dim(
    buf.row_step, jnp.where(spill, step.astype(I32), old_step), idx, 0
  )
  new_buf = BufferState(new_hi, new_lo, stack, row_step, buf.size + spill.astype(I32))

  # v' = q * n + s (two's complement, modulo 2**64).
  prod = words.mul_limbs_small(words.to_limbs(lax.bitcast_convert_type(q_hi, U32), q_lo), n, s)
  v_hi, v_lo = words.from_limbs(prod)
  new_v = Fixed(lax.bitcast_convert_type(v_hi, I32), v_lo)
  return new_v, new_buf, ~(spill & full)


def divide(v: Fixed, buf: BufferState, n, step, momentum_bits: int):
  """Exact inverse of :func:`multiply` at the same ``n`` and ``step``."""
  k = momentum_bits
  a, rr, boundary = _symbol_table(words.u32(n), k)  # per leaf, before broadcasting
  n = jnp.broadcast_to(words.u32(n), v.lo.shape)

  top = jnp.maximum(buf.size - 1, 0)
  top_step = lax.dynamic_index_in_dim(buf.row_step, top, 0, False)
  spilled = (buf.size > 0) & (top_step == step)
  stored = lax.dynamic_index_in_dim(buf.stack, top, 0, False)
  row = jnp.where(spilled, stored, 0)
  head = words.to_limbs(buf.head_hi, buf.head_lo)
  row_limbs = [row >> 16, row & 0xFFFF]
  zero = jnp.zeros_like(row)
  x_new = [jnp.where(spilled, h, z) for h, z in zip(head[1:] + row_limbs, [zero] + head)]

  # Signed floor divmod of v' by n: for negative v', use ~v' = -v' - 1 >= 0.
  neg = v.hi < 0
  hi_u = lax.bitcast_convert_type(v.hi, U32)
  mag = words.to_limbs(jnp.where(neg, ~hi_u, hi_u), jnp.where(neg, ~v.lo, v.lo))
  q_limbs, rem = words.divmod_limbs_small(mag, n)
  q_hi, q_lo = words.from_limbs(q_limbs)
  q_hi = jnp.where(neg, ~q_hi, q_hi)
  q_lo = jnp.where(neg, ~q_lo, q_lo)
  s = jnp.where(neg, n - 1 - rem, rem)

  f, cdf = _freq_cdf(s, a, rr, boundary)
  shifted, rem2 = words.divmod_limbs_small(x_new, f)
  c = rem2 + cdf
  sh, sl = words.from_limbs(shifted)
  head_hi = (sh << 8) | (sl >> 24)
  head_lo = (sl << 8) | (c >> k)
  r = c & ((1 << k) - 1)

  v_hi = (q_hi << k) | (q_lo >> (32 - k))
  v_lo = (q_lo << k) | r

  stack = lax.dynamic_update_index_in_dim(buf.stack, jnp.where(spilled, 0, stored), top, 0)
  row_step = lax.dynamic_update_index_in_dim(buf.row_step, jnp.where(spilled, -1, top_step), top, 0)
  new_buf = BufferState(head_hi, head_lo, stack, row_step, buf.size - spilled.astype(I32))
  return Fixed(lax.bitcast_convert_type(v_hi, I32), v_lo), new_buf


def used_bits(buf: BufferState) -> jax.Array:
  """Mean bits stored per element beyond the initial head (for measurements)."""
  head = buf.head_hi.astype(jnp.float32) * 2.0**32 + buf.head_lo.astype(jnp.float32)
  return 32.0 * buf.size.astype(jnp.float32) + jnp.mean(jnp.log2(head)) - HEAD_BITS_INITIAL
