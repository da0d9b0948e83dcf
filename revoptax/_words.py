"""Multi-word integer arithmetic on ``uint32`` arrays.

JAX's default mode has no 64-bit integers, so revoptax keeps every exact
quantity as 32-bit words and does the carries itself.  Numbers wider than one
word are written either as ``(hi, lo)`` pairs of 32-bit words or as lists of
16-bit *limbs* (each limb held in a ``uint32``), most significant first.  With
16-bit limbs every partial product of a limb and a divisor or multiplier below
2**16 fits in one 32-bit word, so multiplication and long division need no
wider type.

Everything here is elementwise, branch-free and exact; nothing depends on
``jax_enable_x64``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

U32 = jnp.uint32
LIMB_BITS = 16
LIMB_MASK = 0xFFFF


def u32(x):
  """``x`` as ``uint32`` (Python ints are wrapped to a ``uint32`` constant)."""
  return jnp.asarray(x, dtype=U32)


def to_limbs(hi, lo):
  """Split a 64-bit ``(hi, lo)`` word pair into four 16-bit limbs, MS first."""
  hi, lo = u32(hi), u32(lo)
  return [hi >> 16, hi & LIMB_MASK, lo >> 16, lo & LIMB_MASK]


def from_limbs(limbs):
  """Join the four least significant 16-bit limbs into a ``(hi, lo)`` pair."""
  l3, l2, l1, l0 = limbs[-4:]
  return (l3 << 16) | l2, (l1 << 16) | l0


def add_u64(ah, al, bh, bl):
  """``a + b`` modulo 2**64 on ``uint32`` word pairs."""
  lo = al + bl
  carry = (lo < al).astype(U32)
  return ah + bh + carry, lo


def sub_u64(ah, al, bh, bl):
  """``a - b`` modulo 2**64 on ``uint32`` word pairs."""
  lo = al - bl
  borrow = (al < bl).astype(U32)
  return ah - bh - borrow, lo


def less_u64(ah, al, bh, bl):
  """``a < b`` for unsigned 64-bit word pairs."""
  return (ah < bh) | ((ah == bh) & (al < bl))


def mul_limbs_small(limbs, m, add=0):
  """``limbs * m + add`` for a multiplier and addend below 2**16 (+1 for m).

  Args:
    limbs: 16-bit limbs, most significant first.
    m: ``uint32`` multiplier, at most 2**16.
    add: ``uint32`` addend, below 2**16.

  Returns:
    The product as limbs, one limb longer than the input (no overflow).
  """
  m = u32(m)
  carry = u32(add)
  out = []
  for limb in reversed(limbs):
    t = limb * m + carry  # < 2**16 * 2**16 + 2**17 would overflow only if m > 2**16
    out.append(t & LIMB_MASK)
    carry = t >> LIMB_BITS
  out.append(carry)
  return out[::-1]


def divmod_small(num, den):
  """Exact ``divmod`` of ``num < 2**32`` by ``1 <= den <= 2**16`` when ``num // den < 2**16``.

  Integer division has no vector instruction on most CPUs, so the quotient is
  estimated with one float32 division (relative error below 2**-22, so the
  estimate is off by at most one) and then corrected exactly in integers.  The
  result is exact whatever the float unit does in its last bits.
  """
  num, den = u32(num), u32(den)
  q = jnp.floor(num.astype(jnp.float32) / den.astype(jnp.float32))
  q = jnp.clip(q, 0.0, 65535.0).astype(U32)
  # The remainder is small, so int32 wrap-around arithmetic gives it exactly.
  rem = lax.bitcast_convert_type(num - q * den, jnp.int32)
  den_i = lax.bitcast_convert_type(den, jnp.int32)
  low = rem < 0
  q = jnp.where(low, q - 1, q)
  rem = jnp.where(low, rem + den_i, rem)
  high = rem >= den_i
  q = jnp.where(high, q + 1, q)
  rem = jnp.where(high, rem - den_i, rem)
  return q, lax.bitcast_convert_type(rem, U32)


def divmod_limbs_small(limbs, den):
  """Long division of 16-bit limbs by ``1 <= den <= 2**16``.

  Returns:
    ``(quotient_limbs, remainder)`` with as many quotient limbs as input limbs.
  """
  rem = jnp.zeros_like(u32(limbs[0]))
  out = []
  for limb in limbs:
    q, rem = divmod_small((rem << LIMB_BITS) | limb, den)
    out.append(q)
  return out, rem
