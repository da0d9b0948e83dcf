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
below ``3e-6`` bits of quantization loss).  Heads start at ``2**32`` and are
kept below ``2**56`` between steps, so one step (at most 8 bits of growth)
stays within 64 bits: when any head of a leaf reaches ``2**56``, the low 32
bits of *every* head of that leaf are spilled as one row of a preallocated
stack (the step is recorded with the row), so writes are whole rows
(``dynamic_update_slice``) and never scatters.  Because every step is a
bijection on ``(v, buffer)``, :func:`divide` undoes :func:`multiply` exactly,
leaving the heads, ``size`` and every row in use as they were (rows popped are
left in place as free space, see :func:`clear_free_rows`).

The arithmetic runs on native 64-bit integers inside
:func:`revoptax._fixed_point.exact_scope`; the state is stored as 32-bit words.

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

from revoptax._fixed_point import Fixed, exact_scope, join, split
from revoptax._fusion import materialize

I32, U32, I64, U64 = jnp.int32, jnp.uint32, "int64", "uint64"
HEAD_BITS_INITIAL = 32
# Heads are kept below 2**56 between steps, so a step (at most 8 bits of
# growth) never overflows 64 bits.
_SPILL_AT = 1 << 56
# The capacity rule's margins above sum_t log2(1/gamma_t): the coding loss
# (below 3e-6 bits per step, budgeted at 2**-16), and how far the largest head
# of a leaf may run ahead of the mean (a random walk of at most 0.0028 bits per
# step per element; measured 3.8 standard deviations over 6,310 elements, and
# budgeted at 10 plus 4 bits).
_LOSS_BITS_PER_STEP = 2.0**-16
_SPREAD_BITS_PER_ROOT_STEP = 0.03
_SPREAD_BITS = 4.0
_SPREAD_DEVIATIONS = 6.0


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


def segment_capacity(window_bits: float, num_steps: int, variance: float = 0.0) -> int:
  """Rows of stack needed for one segment of a run, emptied at the segment's start.

  The segment starts with heads anywhere below ``2**56`` (the spill
  threshold), so its first spill may come at once: the rows are those of
  :func:`capacity_for` for a run whose heads start 24 bits higher, with
  ``window_bits`` the segment's total cost (the costliest segment's) and the
  spread and coding-loss margins of the whole run of ``num_steps`` steps.
  """
  return capacity_for(float(window_bits) + 24.0, num_steps, variance)


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


def capacity_for(total_bits: float, num_steps: int, variance: float = 0.0) -> int:
  """Rows of stack needed for ``num_steps`` steps costing ``total_bits`` in all.

  The rule: each element's head starts at 32 bits and gains ``log2(1/gamma_t)``
  bits at step t (plus the coding loss); a leaf spills one 32-bit row whenever
  its largest head reaches 56 bits, so its ``j``-th spill happens when the
  largest head has gained ``24 + 32 (j - 1)`` bits.  With ``B`` a bound on the
  largest gain, ``total_bits + T 2**-16 + 4 + 0.03 sqrt(T)``, the rows needed
  are ``floor((B - 24) / 32) + 1`` (at least one).  Operations whose cost is
  random per element (the rounding bits of :mod:`revoptax._scale`) add six
  standard deviations, ``6 sqrt(variance)``, to ``B``.  Exceeding it is
  detected and reported, never wrapped.
  """
  spread = _SPREAD_BITS + _SPREAD_BITS_PER_ROOT_STEP * math.sqrt(num_steps)
  spread += _SPREAD_DEVIATIONS * math.sqrt(max(float(variance), 0.0))
  largest_gain = float(total_bits) + num_steps * _LOSS_BITS_PER_STEP + spread
  return max(1, math.floor((largest_gain - 24.0) / 32.0) + 1)


def _symbol_table(n, momentum_bits: int):
  """Frequencies of the ``n`` symbols at precision ``M = 2**(k + 8)`` (uint32).

  ``a, rr = divmod(M, n)``: symbols below ``rr`` have frequency ``a + 1``, the
  rest ``a``; ``boundary = rr * (a + 1)`` is where the two ranges meet.
  """
  m_total = jnp.asarray(1 << (momentum_bits + 8), U32)
  a = m_total // n
  rr = m_total - a * n
  return a, rr, rr * (a + 1)


def _freq_cdf(s, a, rr, boundary):
  first = s < rr
  f = jnp.where(first, a + 1, a)
  cdf = jnp.where(first, s * (a + 1), boundary + (s - rr) * a)
  return f, cdf


def _reciprocal(den):
  """``float32`` ``fl(1 / den)``, computed once per leaf for the divisions below."""
  return 1.0 / jnp.asarray(den).astype(jnp.float32)


def _correct(num, den, q):
  """``(q', num - q' den)`` for ``num // den`` given an estimate ``q`` within one of it."""
  rem = num - q * den
  low, high = rem < 0, rem >= den
  q = q - low.astype(q.dtype) + high.astype(q.dtype)
  rem = rem + jnp.where(low, den, 0) - jnp.where(high, den, 0)
  return q, rem


def _floor_div_small(num, den, inv=None):
  """``num // den`` (uint32) for ``num < 2**24`` and ``2**8 <= den < 2**17``; ``inv = fl(1/den)``
  (computed when not given).

  Vector units have no integer division, so the quotient is estimated in
  float32 and corrected in integers.  ``num`` converts exactly, so the estimate
  ``fl(num * inv)`` is within ``2**-22`` relative of ``num / den < 2**16``,
  i.e. within ``2**-6``: its floor is the quotient or one off, which
  :func:`_correct` fixes from the exact remainder.
  """
  inv = _reciprocal(den) if inv is None else inv
  num, den = num.astype(I32), jnp.asarray(den).astype(I32)
  q = jnp.floor(num.astype(jnp.float32) * inv).astype(I32)
  return _correct(num, den, q)[0].astype(U32)


# Digits of the long division below: each partial quotient is below 2**21.
_DIGIT_BITS = 21


def _quotient_long(num, den, inv):
  """``num // den`` (``int64``) for ``uint64`` num and ``2**8 <= den < 2**17``.

  Inside :func:`exact_scope`; ``inv = fl(1/den)`` in float32.  Long division in
  three digits (bits 42-63, then 21 bits twice): with ``r < den`` the
  remainder so far, each partial ``p = r * 2**21 + digit < 2**38`` has
  ``p / den < 2**21`` (the first, ``p < 2**22``, less), which the float32
  estimate ``fl(fl(p) * inv)`` (three roundings, each below ``2**-24``
  relative) gets within ``0.375``: its floor is the digit of the quotient or
  one off, corrected from the exact remainder (:func:`_correct`).  Integer
  multiplies, adds and shifts only: no division, no float64.  Callers
  materialize the quotient alone and re-derive the remainder from it (a
  fusion with both outputs would compute the chain twice on CPU).
  """
  num = num.astype(U64)
  den = den.astype(I64)
  mask = (1 << _DIGIT_BITS) - 1
  q = jnp.zeros(num.shape, I64)
  rem = jnp.zeros(num.shape, I64)
  for shift in (2 * _DIGIT_BITS, _DIGIT_BITS, 0):
    digit = (num >> shift).astype(I64) & (mask if shift < 2 * _DIGIT_BITS else -1)
    partial = (rem << _DIGIT_BITS) | digit if shift < 2 * _DIGIT_BITS else digit
    estimate = jnp.floor(partial.astype(jnp.float32) * inv).astype(I64)
    digit_q, rem = _correct(partial, den, estimate)
    q = (q << _DIGIT_BITS) | digit_q
  return q


def _divmod_u64(num, den):
  """``(num // den, num % den)`` as ``(uint64, uint32)``, from :func:`_quotient_long`."""
  den = jnp.broadcast_to(jnp.asarray(den, U32), num.shape)
  q = _quotient_long(num, den, _reciprocal(den)).astype(U64)
  return q, (num - q * den.astype(U64)).astype(U32)


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
  with exact_scope():
    value, head = push_pop(join(v), join_head(buf), n, momentum_bits)
    buf, ok = spill(buf, head, step)
    return split(value), buf, ok


def divide(v: Fixed, buf: BufferState, n, step, momentum_bits: int, clear_popped: bool = True):
  """Exact inverse of :func:`multiply` at the same ``n`` and ``step``.

  With ``clear_popped=False`` a popped row is left in place: rows at and above
  ``size`` are then free space with unspecified contents, which saves a copy
  of the whole stack per step inside a loop (:func:`clear_free_rows` gives the
  canonical buffer).
  """
  with exact_scope():
    head, popped = unspill(buf, step)
    value, head = pop_push(join(v), head, n, momentum_bits)
    return split(value), after_unspill(buf, head, popped, clear_popped)


# The same on native 64-bit integers, for use inside exact_scope(): multiply is
# push_pop then spill, divide is unspill then pop_push.


def push_pop(value, head, n, momentum_bits: int):
  """``(v', head')`` of one multiplication: ``int64`` v, ``uint64`` head (not yet spilled)."""
  k = momentum_bits
  n = jnp.asarray(n, U32)
  s, head = pop_symbol(head, (value & ((1 << k) - 1)).astype(U32), n, k)
  return (value >> k) * n.astype(I64) + s.astype(I64), head  # floor(v / 2**k) * n + s


def pop_symbol(head, r, n, momentum_bits: int):
  """``(s, head')``: push the ``k`` low bits ``r`` (uint32) onto ``head`` and pop a digit
  ``s`` in ``[0, n)`` (uint32), the buffer half of :func:`push_pop`."""
  k = momentum_bits
  a, rr, boundary = _symbol_table(n, k)  # per leaf, before broadcasting
  inv_a, inv_a1 = _reciprocal(a), _reciprocal(a + 1)
  # X = head * 2**k + r;  c = X mod M (24 bits);  X // M = head >> 8.
  c = ((head & 0xFF).astype(U32) << k) | r
  first = c < boundary
  s = _floor_div_small(
    jnp.where(first, c, c - boundary), jnp.where(first, a + 1, a), jnp.where(first, inv_a1, inv_a)
  )
  s = materialize(jnp.where(first, s, rr + s))  # one symbol for both outputs
  f, cdf = _freq_cdf(s, a, rr, boundary)
  # rANS decode: head' = f * (X // M) + c - cdf < f * 2**48 <= 2**64 for head < 2**56.
  return s, f.astype(U64) * (head >> 8) + (c - cdf).astype(U64)


def pop_push(value, head, n, momentum_bits: int):
  """Inverse of :func:`push_pop`: ``(v, head)`` from ``(v', head')``."""
  k = momentum_bits
  n = jnp.asarray(n, U32)
  # Signed floor divmod of v' by n: for negative v', use ~v' = -v' - 1 >= 0.
  # Only the quotients are materialized; remainders are re-derived from them.
  neg = value < 0
  mag = jnp.where(neg, ~value, value)
  q = materialize(_quotient_long(mag, n, _reciprocal(n)))
  rem = (mag - q * n.astype(I64)).astype(U32)
  s = jnp.where(neg, n - 1 - rem, rem)
  q = jnp.where(neg, ~q, q)
  r, head = push_symbol(head, s, n, k)
  return (q << k) | r.astype(I64), head


def push_symbol(head, s, n, momentum_bits: int):
  """Inverse of :func:`pop_symbol`: ``(r, head)`` from ``(s, head')``."""
  k = momentum_bits
  a, rr, boundary = _symbol_table(n, k)
  inv_a, inv_a1 = _reciprocal(a), _reciprocal(a + 1)
  # rANS encode of s: X // M = head // f, X mod M = head mod f + cdf.
  f, cdf = _freq_cdf(s, a, rr, boundary)
  shifted = materialize(_quotient_long(head, f, jnp.where(s < rr, inv_a1, inv_a)).astype(U64))
  c = materialize((head - shifted * f.astype(U64)).astype(U32) + cdf)
  return c & ((1 << k) - 1), (shifted << 8) | (c >> k).astype(U64)


def spill(buf: BufferState, head, step):
  """``buf`` with the ``uint64`` heads after :func:`push_pop`, spilling a row if needed.

  Returns ``(buf', ok)``; ``ok`` is False if the stack was already full.
  """
  spilled = jnp.any(head >= _SPILL_AT)
  row = (head & 0xFFFFFFFF).astype(U32)
  head = jnp.where(spilled, head >> 32, head)
  full = buf.size >= buf.stack.shape[0]
  # Always write one row in place (the old contents when not spilling): cheaper
  # inside a loop than a conditional on the whole stack.
  idx = jnp.minimum(buf.size, buf.stack.shape[0] - 1)
  old_row = lax.dynamic_index_in_dim(buf.stack, idx, 0, keepdims=False)
  stack = lax.dynamic_update_index_in_dim(buf.stack, jnp.where(spilled, row, old_row), idx, 0)
  old_step = lax.dynamic_index_in_dim(buf.row_step, idx, 0, keepdims=False)
  row_step = lax.dynamic_update_index_in_dim(
    buf.row_step, jnp.where(spilled, jnp.asarray(step, I32), old_step), idx, 0
  )
  head_hi, head_lo = _head_words(head)
  new_buf = BufferState(head_hi, head_lo, stack, row_step, buf.size + spilled.astype(I32))
  return new_buf, ~(spilled & full)


def unspill(buf: BufferState, step):
  """``(head, popped)``: the ``uint64`` heads with the row spilled at ``step`` (if any) put back."""
  top = jnp.maximum(buf.size - 1, 0)
  popped = (buf.size > 0) & (lax.dynamic_index_in_dim(buf.row_step, top, 0, False) == step)
  row = lax.dynamic_index_in_dim(buf.stack, top, 0, False)
  head = join_head(buf)
  return jnp.where(popped, (head << 32) | row.astype(U64), head), popped


def after_unspill(buf: BufferState, head, popped, clear_popped: bool = True) -> BufferState:
  """``buf`` holding the ``uint64`` heads after :func:`pop_push` and one row fewer if popped."""
  head_hi, head_lo = _head_words(head)
  new_buf = buf._replace(head_hi=head_hi, head_lo=head_lo, size=buf.size - popped.astype(I32))
  if clear_popped:
    top = jnp.maximum(buf.size - 1, 0)
    row = lax.dynamic_index_in_dim(buf.stack, top, 0, False)
    top_step = lax.dynamic_index_in_dim(buf.row_step, top, 0, False)
    new_buf = new_buf._replace(
      stack=lax.dynamic_update_index_in_dim(buf.stack, jnp.where(popped, 0, row), top, 0),
      row_step=lax.dynamic_update_index_in_dim(
        buf.row_step, jnp.where(popped, -1, top_step), top, 0
      ),
    )
  return new_buf


def join_head(buf: BufferState):
  """The ``uint64`` heads of a buffer (inside :func:`exact_scope`)."""
  return (buf.head_hi.astype(U64) << 32) | buf.head_lo.astype(U64)


def _head_words(head):
  return (head >> 32).astype(U32), (head & 0xFFFFFFFF).astype(U32)


def clear_free_rows(buf: BufferState) -> BufferState:
  """``buf`` with the free rows (at and above ``size``) zeroed, for comparisons."""
  in_use = jnp.arange(buf.stack.shape[0]) < buf.size
  mask = in_use.reshape((-1,) + (1,) * (buf.stack.ndim - 1))
  return buf._replace(
    stack=jnp.where(mask, buf.stack, 0), row_step=jnp.where(in_use, buf.row_step, -1)
  )


def used_bits(buf: BufferState, largest: bool = False) -> jax.Array:
  """Bits stored per element beyond the initial head, on average over the elements or
  (``largest``) of the largest head, which sets the rows spilled (for measurements)."""
  head = buf.head_hi.astype(jnp.float32) * 2.0**32 + buf.head_lo.astype(jnp.float32)
  bits = jnp.log2(jnp.maximum(head, 1.0))
  bits = jnp.max(bits) if largest else jnp.mean(bits)
  return 32.0 * buf.size.astype(jnp.float32) + bits - HEAD_BITS_INITIAL
