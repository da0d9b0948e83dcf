"""Determinism: make the recomputed gradient bit-identical, and check that it is.

Exact reversal recomputes every step's gradient in the backward pass and needs
it bit for bit equal to the forward pass's.  XLA compiles the same gradient
differently depending on the surrounding program (fusion decisions, operation
order), which can change the last bit (seen on a smooth loss of a bfloat16
and a float32 leaf, between a forward and a backward ``lax.scan``).
:func:`isolated` puts optimization barriers around the computation so that it
is compiled on its own in both passes, and :func:`fingerprint` gives the
32-bit checksum that the checks compare.

Reference: D. Maclaurin et al. 2015, §2.3 ("the gradient must be recomputed
exactly"); XLA's ``optimization_barrier`` semantics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def isolated(fn):
  """``fn`` with optimization barriers on its inputs and outputs.

  Compiling ``fn`` apart from its neighbours makes its floating-point results
  the same wherever it is called.  Use it for the gradient in both the forward
  and the inverse pass of a loop around :func:`revoptax.reversible_sgd`;
  :func:`revoptax.train` applies it itself.

  Example:
    >>> import jax, jax.numpy as jnp, revoptax
    >>> grad = revoptax.isolated(jax.grad(lambda w: jnp.sum(jnp.sin(w))))
    >>> grad(jnp.zeros(2)).tolist()
    [1.0, 1.0]
  """

  @functools.wraps(fn)
  def wrapped(*args):
    return lax.optimization_barrier(fn(*lax.optimization_barrier(args)))

  return wrapped


def fingerprint(grad) -> jax.Array:
  """A 32-bit checksum of a gradient's bits; any single changed element changes it.

  ``sum_i bits_i * m_i mod 2**32`` with odd multipliers ``m_i``: a change of
  one element by ``d != 0 (mod 2**32)`` changes the sum by ``d * m_i != 0``.
  """
  return fingerprints(grad)[0]


def _bits32(x) -> jax.Array:
  width = np.dtype(x.dtype).itemsize * 8
  bits = lax.bitcast_convert_type(x, jnp.dtype(f"uint{min(width, 32)}"))
  return bits.astype(jnp.uint32).ravel()


def fingerprints(*arrays) -> jax.Array:
  """``uint32[len(arrays)]``: :func:`fingerprint` of each (one reduction when they have the
  same number of 32-bit words, as a float32 gradient and its buffer heads do)."""
  words = [_bits32(x) for x in arrays]
  if len({w.shape for w in words}) > 1:
    return jnp.concatenate([fingerprints(x) for x in arrays])
  bits = jnp.stack(words)
  idx = jnp.arange(bits.shape[1], dtype=jnp.uint32)
  mult = (idx * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
  return jnp.sum(bits * mult, axis=1, dtype=jnp.uint32)


def fingerprint_all(grads) -> jax.Array:
  """One 32-bit checksum of a list of gradient leaves: ``sum_i fingerprint_i * (2i + 1)``.

  A change confined to one leaf changes it (the leaf's fingerprint changes by
  ``d != 0`` and ``(2i + 1)`` is odd); changes to several leaves can cancel
  only with probability about 2**-32.  Four bytes per step whatever the number
  of leaves, at the price of not naming the leaf that changed.
  """
  total = jnp.zeros((), jnp.uint32)
  for i, g in enumerate(grads):
    total = total + fingerprint(g) * jnp.uint32(2 * i + 1)
  return total


def first_drift(drift, differs, t):
  """``drift`` (``int32[checks]``) with step ``t`` recorded for each check in ``differs``,
  unless one was recorded already: the first detection, going backwards, names the cause."""
  return jnp.where(jnp.any(drift >= 0), drift, jnp.where(differs, t, -1)).astype(jnp.int32)
