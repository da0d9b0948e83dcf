"""A sparse log of the parameter values a training loop actually used.

``optax.apply_updates`` computes ``params + updates`` in float arithmetic.  When
a weight shrinks to less than about the size of its update (for instance when
it crosses zero), no float ``updates`` makes ``params + updates`` equal the
exact weight rounded to float: the fine bits of the result are below the
spacing of ``params`` (how often depends on how often weights cross zero; see
``docs/benchmarks.md``).  The gradient of the next step is then taken at a
float that is not a function of the exact state, and reversal must know it.
This log keeps exactly those elements (leaf, flat index, step, bits), so the
inverse step can recompute the gradient at the very params the forward step
saw.  It is a stack shared by all leaves: the inverse step pops the entries of
the step it undoes, leaving the log as it was.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class ParamLog(NamedTuple):
  """Logged elements of all leaves (arrays only).

  Attributes:
    entries: ``int32[3, capacity]``: leaf, flat index into the leaf, step (-1 where free).
    bits: ``uint32[2, capacity]``: the value's bit pattern (high word zero below 64 bits).
    size: ``int32[]`` entries in use.
  """

  entries: jax.Array
  bits: jax.Array
  size: jax.Array


def init(capacity: int) -> ParamLog:
  free = [jnp.zeros((2, capacity), jnp.int32), jnp.full((1, capacity), -1, jnp.int32)]
  return ParamLog(
    entries=jnp.concatenate(free),
    bits=jnp.zeros((2, capacity), jnp.uint32),
    size=jnp.zeros((), jnp.int32),
  )


def _to_words(x):
  """``uint32[2, n]`` bit patterns of a flat float array (no 64-bit bitcast below 64 bits)."""
  width = np.dtype(x.dtype).itemsize * 8
  if width == 64:
    words = lax.bitcast_convert_type(x, jnp.uint32)  # [n, 2], low word first
    return jnp.stack([words[:, 1], words[:, 0]])
  lo = lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
  return jnp.stack([jnp.zeros_like(lo), lo])


def _from_words(words, dtype):
  width = np.dtype(dtype).itemsize * 8
  if width == 64:
    return lax.bitcast_convert_type(jnp.stack([words[1], words[0]], axis=-1), dtype)
  return lax.bitcast_convert_type(words[1].astype(jnp.dtype(f"uint{width}")), dtype)


def record(log: ParamLog, leaf: int, used, exact, step):
  """Append the elements of leaf ``leaf`` where ``used`` differs bitwise from ``exact``.

  Returns:
    ``(log', ok)``; ``ok`` is False if the log ran out of capacity.
  """
  used_words = _to_words(used.ravel())
  differs = jnp.any(used_words != _to_words(exact.ravel()), axis=0)
  capacity = log.bits.shape[1]
  count = jnp.sum(differs, dtype=jnp.int32)

  def append(log):
    pos = log.size + jnp.cumsum(differs, dtype=jnp.int32) - 1
    pos = jnp.where(differs, pos, capacity)  # out of bounds: dropped
    idx = jnp.arange(differs.shape[0], dtype=jnp.int32)
    entries = log.entries.at[0, pos].set(leaf, mode="drop")
    entries = entries.at[1, pos].set(idx, mode="drop")
    return ParamLog(
      entries=entries.at[2, pos].set(step, mode="drop"),
      bits=log.bits.at[:, pos].set(used_words, mode="drop"),
      size=jnp.minimum(log.size + count, capacity),
    )

  new_log = lax.cond(count > 0, append, lambda log: log, log)
  return new_log, log.size + count <= capacity


def restore(log: ParamLog, leaf: int, exact, step):
  """Patch leaf ``leaf``'s ``exact`` with the values logged at ``step`` and pop them.

  Returns:
    ``(params_used_at_step, log')``.
  """
  shape = exact.shape
  flat = exact.ravel()
  hit = (log.entries[0] == leaf) & (log.entries[2] == step)
  n = jnp.sum(hit, dtype=jnp.int32)

  def pop(args):
    flat, log = args
    idx = jnp.where(hit, log.entries[1], flat.shape[0])
    flat = flat.at[idx].set(_from_words(log.bits, flat.dtype), mode="drop")
    free = jnp.asarray([[0], [0], [-1]], jnp.int32)
    log = ParamLog(
      entries=jnp.where(hit[None], free, log.entries),
      bits=jnp.where(hit[None], jnp.zeros_like(log.bits), log.bits),
      size=log.size - n,
    )
    return flat, log

  flat, log = lax.cond(n > 0, pop, lambda a: a, (flat, log))
  return flat.reshape(shape), log
