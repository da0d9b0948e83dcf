"""Packing parameter leaves into groups that are updated as one exact state.

Leaves with the same dtype and the same scalar hyperparameters (per step)
can share one exact state: their values are laid end to end in one
flat vector, so each exact operation is one loop over all of them instead of
one per leaf.  A leaf with per-element hyperparameters, and a sharded leaf,
is a group of its own and keeps its shape.

Used by :func:`revoptax.train` for its loop state (the Optax state keeps one
array per leaf and quantity, see :mod:`revoptax._optax`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Group:
  """Leaves trained as one exact state: one flat vector, or one leaf as it is."""

  leaves: tuple[int, ...]  # indices into the params leaves, in order
  shapes: tuple[tuple[int, ...], ...]
  flat: bool  # laid end to end and flattened; False: a single leaf in its shape
  hyper: tuple[int, ...]  # per hyperparameter, the index of the group's value
  dtype: Any
  rows: int  # buffer rows
  sharding: Any = None  # the leaf's NamedSharding (sharded leaves are never packed)

  @property
  def size(self) -> int:
    return sum(math.prod(shape) for shape in self.shapes)

  def pack(self, leaves: Sequence[Any]):
    """This group's leaves of a full list of leaves, in the group's layout."""
    mine = [leaves[i] for i in self.leaves]
    if not self.flat:
      return mine[0]
    if len(mine) == 1:
      return jnp.ravel(mine[0])
    # Written piece by piece into one buffer: a concatenate would be fused into
    # its consumers, where XLA:CPU evaluates it element by element in scalar
    # code.
    dtype = jnp.asarray(mine[0]).dtype
    out = jnp.zeros((self.size,), dtype)
    offset = 0
    for x in mine:
      x = jnp.ravel(jnp.asarray(x)).astype(dtype)
      out = lax.dynamic_update_slice_in_dim(out, x, offset, 0)
      offset += x.size
    return out

  def unpack(self, x) -> list:
    """The group's leaves (in :attr:`leaves` order) from its layout."""
    if not self.flat:
      return [x]
    out, offset = [], 0
    for shape in self.shapes:
      size = math.prod(shape)
      out.append(x[offset : offset + size].reshape(shape))
      offset += size
    return out


def group_leaves(
  leaves: Sequence[Any],
  packable: Sequence[bool],
  hyper_of: Sequence[tuple[int, ...]],
  rows: Sequence[int],
  shardings: Sequence[Any] | None = None,
) -> tuple[Group, ...]:
  """Groups of ``leaves``: packable leaves with equal dtype, specs and rows share one.

  A sharded leaf is a group of its own in its shape, so its exact state can be
  sharded like it (:mod:`revoptax._sharding`).

  Args:
    leaves: the params leaves (arrays or shape/dtype structs).
    packable: per leaf, whether its hyperparameters are scalars per step (so
      it can be flattened together with others).
    hyper_of: per leaf, per hyperparameter, the index of the leaf's value
      among the distinct ones.
    rows: per leaf, its buffer rows.
    shardings: per leaf, its sharding or None (replicated).

  Returns:
    The groups, in order of their first leaf.
  """
  shardings = [None] * len(leaves) if shardings is None else list(shardings)
  members: dict[Hashable, list[int]] = {}
  for i, leaf in enumerate(leaves):
    if packable[i] and shardings[i] is None:
      key = (_dtype(leaf).name, hyper_of[i], rows[i])
    else:
      key = ("alone", i)
    members.setdefault(key, []).append(i)
  return tuple(
    Group(
      leaves=tuple(group),
      shapes=tuple(tuple(np.shape(leaves[i])) for i in group),
      flat=key[0] != "alone",
      hyper=tuple(hyper_of[group[0]]),
      dtype=_dtype(leaves[group[0]]),
      rows=rows[group[0]],
      sharding=shardings[group[0]],
    )
    for key, group in members.items()
  )


def _dtype(x):
  return np.dtype(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)


def unpack_groups(groups: Sequence[Group], values: Sequence[Any], num_leaves: int) -> list:
  """Leaves in params order from one value per group."""
  out = [None] * num_leaves
  for group, x in zip(groups, values):
    for i, leaf in zip(group.leaves, group.unpack(x)):
      out[i] = leaf
  return out
