"""The exact state of a sharded leaf, sharded like the leaf.

A leaf's exact state is a NamedTuple of arrays of three kinds: arrays of the
leaf's shape (the fixed-point words of the weights and optimizer state, the
buffer heads), the stack of spilled rows ``[rows, *shape]``, and per-row or
scalar bookkeeping (``row_step``, ``size``).  :func:`constrain` gives the first
kind the leaf's sharding, the stack the same sharding behind an unsharded row
axis, and leaves the rest replicated, so the state and the buffer of a leaf
sharded over ``N`` devices take ``1/N`` of their memory on each.

Every exact operation is elementwise over the leaf except two reductions
that are exact in any order: the spill decision (a boolean OR over the
leaf's heads) and the fingerprints (sums of integers modulo ``2**32``).  So
the sharded state is bit for bit the unsharded one given the same gradients;
only the gradient, which the loss computes, may communicate in float (see
``docs/scale.md``).

Works with both of JAX's sharding modes: explicit axes (``jax.make_mesh``'s
default; the sharding is part of the type, also under ``jit``) through
:func:`jax.sharding.reshard`, and automatic axes through
:func:`jax.lax.with_sharding_constraint`.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def of_leaf(leaf) -> NamedSharding | None:
  """The leaf's sharding if it is sharded (not replicated), else None.

  Explicit sharding is read from the leaf's type (tracers included); otherwise
  a concrete ``jax.Array`` gives its own ``NamedSharding``.
  """
  typed = getattr(jax.typeof(leaf), "sharding", None)
  if _is_explicit(typed) and _splits(typed.spec):
    return typed
  sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
  if isinstance(sharding, NamedSharding) and not isinstance(leaf, jax.core.Tracer):
    if _splits(sharding.spec):
      return sharding
  return None


def check(sharding, leaf, name: str, api: str) -> NamedSharding | None:
  """A user-given sharding for ``leaf``: a ``NamedSharding`` of its rank, or None."""
  if sharding is None:
    return None
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
      f"{api}: the sharding of parameter {name} must be a jax.sharding.NamedSharding or None, "
      f"got {sharding!r}."
    )
  if len(sharding.spec) > jax.numpy.ndim(leaf):
    raise ValueError(
      f"{api}: the sharding of parameter {name} has spec {sharding.spec} for an array of shape "
      f"{jax.numpy.shape(leaf)}: the spec must not be longer than the array's rank."
    )
  return sharding if _splits(sharding.spec) else None


def constrain(state, sharding: NamedSharding | None, shape: tuple[int, ...]) -> Any:
  """``state`` (a pytree of arrays) with its arrays sharded like a leaf of ``shape``."""
  if sharding is None:
    return state
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))

  def one(x):
    if x.shape == shape:
      return _put(x, sharding, spec)
    if x.ndim == len(shape) + 1 and x.shape[1:] == shape:
      return _put(x, sharding, (None, *spec))
    return x

  return jax.tree.map(one, state)


def _put(x, sharding: NamedSharding, spec: tuple):
  target = NamedSharding(sharding.mesh, PartitionSpec(*spec))
  if _is_explicit(sharding):
    return jax.sharding.reshard(x, target)
  return jax.lax.with_sharding_constraint(x, target)


def _is_explicit(sharding) -> bool:
  if not isinstance(sharding, NamedSharding) or not sharding.mesh.axis_names:
    return False
  return any(t == AxisType.Explicit for t in sharding.mesh.axis_types)


def _splits(spec) -> bool:
  return any(axis is not None for axis in spec)
