"""Materialization points: values computed once, not re-computed by each consumer.

XLA fuses cheap elementwise producers into every consumer that reads them, so
on CPU an integer chain with several outputs (the new velocity, the new
buffer heads, range flags, the words of each) is re-computed inside the loop
of every output (several times the unique work of one exact step), and
``optimization_barrier`` does not prevent it (XLA:CPU removes barriers before
fusion).  A reduction is never duplicated into its consumers (XLA counts it
as expensive), so an identity written as a reduction, ``x | x`` over a new
broadcast axis of size two, is computed once into its own buffer, and the
consumers read that.  The values are unchanged bit for bit.

The float params of a packed group are materialized whole before they are
sliced into leaves: fused into each slice, the conversion is costed by
XLA:CPU's parallel task assignment as the whole group's work and every slice
is split over the thread pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_UNSIGNED = {2: jnp.uint16, 4: jnp.uint32, 8: "uint64"}


def materialize(tree):
  """``tree`` (integer, boolean or float arrays), computed once at this point (CPU only).

  Floats go through their bits (a bitcast to the unsigned integer of the same
  width), so NaNs and signed zeros are kept bit for bit.

  Args:
    tree: a pytree of integer, boolean or float arrays.

  Returns:
    ``tree``, bit for bit.  On other backends the identity (their fusion
    passes weigh duplication themselves).

  Example:
    >>> import jax.numpy as jnp
    >>> from revoptax._fusion import materialize
    >>> materialize({"a": jnp.arange(3), "b": jnp.array([True, False])})["a"].tolist()
    [0, 1, 2]
    >>> materialize(jnp.array([-0.0, 2.5, jnp.nan])).tolist()
    [-0.0, 2.5, nan]
  """

  def once(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
      bits = lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
      return lax.bitcast_convert_type(once(bits), x.dtype)
    twice = jnp.broadcast_to(x, (2, *x.shape))
    return lax.reduce(twice, jnp.zeros((), x.dtype), lax.bitwise_or, (0,))

  return lax.platform_dependent(
    tree, cpu=lambda tree: jax.tree.map(once, tree), default=lambda tree: tree
  )
