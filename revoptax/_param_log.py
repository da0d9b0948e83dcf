"""A sparse log of the parameter values a training loop actually used.

``optax.apply_updates`` computes ``params + updates`` in float arithmetic.  When
a weight shrinks to less than about the size of its update (for instance when
it crosses zero), no float ``updates`` makes ``params + updates`` equal the
exact weight rounded to float: the fine bits of the result are below the
spacing of ``params`` (how often depends on how often weights cross zero; see
``docs/benchmarks.md``).  The gradient of the next step
is then taken at a float that is not a function of the exact state, and
reversal must know it.  This log keeps exactly those elements (flat index,
value, step), so the inverse step can recompute the gradient at the very
params the forward step saw.  It is a stack: the inverse step pops the entries
of the step it undoes, leaving the log as it was.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class ParamLog(NamedTuple):
  """Logged elements of one leaf (arrays only)."""

  entries: jax.Array  # int32[2, capacity]: flat index into the leaf, step (-1 where free)
  value: jax.Array  # leaf dtype [capacity]
  size: jax.Array  # int32[]


def init(dtype, capacity: int) -> ParamLog:
  return ParamLog(
    entries=jnp.stack([jnp.zeros((capacity,), jnp.int32), jnp.full((capacity,), -1, jnp.int32)]),
    value=jnp.zeros((capacity,), dtype),
    size=jnp.zeros((), jnp.int32),
  )


def _bits(x):
  width = np.dtype(x.dtype).itemsize * 8
  return lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}"))


def record(log: ParamLog, used, exact, step):
  """Append the elements where ``used`` differs bitwise from ``exact``.

  Returns:
    ``(log', ok)``; ``ok`` is False if the log ran out of capacity.
  """
  used, exact = used.ravel(), exact.ravel()
  differs = _bits(used) != _bits(exact)
  capacity = log.value.shape[0]
  count = jnp.sum(differs, dtype=jnp.int32)

  def append(log):
    pos = log.size + jnp.cumsum(differs, dtype=jnp.int32) - 1
    pos = jnp.where(differs, pos, capacity)  # out of bounds: dropped
    idx = jnp.arange(used.shape[0], dtype=jnp.int32)
    entries = log.entries.at[0, pos].set(idx, mode="drop")
    return ParamLog(
      entries=entries.at[1, pos].set(step, mode="drop"),
      value=log.value.at[pos].set(used, mode="drop"),
      size=jnp.minimum(log.size + count, capacity),
    )

  new_log = lax.cond(count > 0, append, lambda log: log, log)
  return new_log, log.size + count <= capacity


def restore(log: ParamLog, exact, step):
  """Patch ``exact`` with the values logged at ``step`` and pop them.

  Returns:
    ``(params_used_at_step, log')``.
  """
  shape = exact.shape
  flat = exact.ravel()
  index, steps = log.entries[0], log.entries[1]
  hit = steps == step
  n = jnp.sum(hit, dtype=jnp.int32)

  def pop(args):
    flat, log = args
    idx = jnp.where(hit, index, flat.shape[0])
    flat = flat.at[idx].set(log.value, mode="drop")
    log = ParamLog(
      entries=jnp.where(hit[None], jnp.asarray([[0], [-1]], jnp.int32), log.entries),
      value=jnp.where(hit, jnp.zeros_like(log.value), log.value),
      size=log.size - n,
    )
    return flat, log

  flat, log = lax.cond(n > 0, pop, lambda a: a, (flat, log))
  return flat.reshape(shape), log
