"""Segments of a training run: the exact state stored every ``K`` steps, the buffer emptied there.

The contract :func:`revoptax.train` builds on (``segment_steps=K``): the
forward pass only ever *writes* buffer rows (a spill; pops come from the
heads), so rows spilled before a segment are never read by it.  At a
segment's start the rows can therefore be dropped (:func:`begin` empties the
buffer, keeping the heads) and the exact state without them kept as the
segment's checkpoint; the segment's rows are regenerated bit for bit by
re-running it from the checkpoint (:func:`restore`), or are moved to host
memory and back (:func:`rows`, :func:`with_rows`, :func:`to_memory`).  A
reversed segment must end at its checkpoint (:func:`same_state`), and a
re-run must reproduce the forward pass's fingerprints (:func:`rerun_drift`).

States are any rule's exact states: NamedTuples with a
:class:`revoptax._buffer.BufferState` field ``buffer``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from revoptax import _determinism

HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device


def starts(num_steps: int, segment_steps: int) -> np.ndarray:
  """The first step of each segment: ``0, K, 2K, ...`` below ``num_steps``."""
  return np.arange(0, num_steps, segment_steps, dtype=np.int32)


def begin(states):
  """``(states, checkpoint)``: the buffers emptied (rows become free space) and the
  exact state without the rows, to restore the segment from."""
  states = [s._replace(buffer=s.buffer._replace(size=jnp.zeros((), jnp.int32))) for s in states]
  return states, [without_rows(s) for s in states]


def without_rows(state):
  """``state`` without its stack and row tags (``None`` there)."""
  return state._replace(buffer=state.buffer._replace(stack=None, row_step=None))


def restore(states, checkpoint):
  """The checkpointed states, holding the stacks of ``states`` as free space."""
  return [
    c._replace(buffer=c.buffer._replace(stack=s.buffer.stack, row_step=s.buffer.row_step))
    for s, c in zip(states, checkpoint)
  ]


def rows(states):
  """Per state, its buffer's rows: ``(stack, row_step, size)``."""
  return [(s.buffer.stack, s.buffer.row_step, s.buffer.size) for s in states]


def with_rows(states, saved):
  """``states`` holding the rows ``saved`` by :func:`rows`."""
  return [
    s._replace(buffer=s.buffer._replace(stack=stack, row_step=row_step, size=size))
    for s, (stack, row_step, size) in zip(states, saved)
  ]


def to_memory(tree, space):
  """Every array of ``tree`` placed in memory ``space`` (:data:`HOST` or :data:`DEVICE`)."""
  return jax.tree.map(lambda x: jax.device_put(x, space), tree)


def same_state(state, checkpoint) -> jax.Array:
  """Whether a reversed segment's state is its checkpoint (size 0; rows are free space)."""
  same = state.buffer.size == 0
  for a, b in zip(jax.tree.leaves(without_rows(state)), jax.tree.leaves(checkpoint)):
    same = same & jnp.all(a == b)
  return same


def rerun_drift(drift, rerun_prints, prints, start):
  """``drift`` with the earliest step at which a segment's re-run differs from the forward
  pass (its fingerprints ``[K, 3]`` against the forward pass's ``[T, 3]`` from ``start``),
  per check, unless one was recorded already."""
  saved = lax.dynamic_slice_in_dim(prints, start, rerun_prints.shape[0], 0)
  # Columns (gradient, heads after the step, values) to the checks' order (values, gradient, heads).
  differs = (rerun_prints != saved)[:, jnp.array([2, 0, 1])]
  earliest = jnp.argmax(jnp.any(differs, axis=1))
  found = _determinism.first_drift(drift, differs[earliest], start + earliest)
  return jnp.where(jnp.any(differs), found, drift)
