"""Exactly reversible momentum SGD: the exact step, its inverse, and the Optax API.

The update (Maclaurin et al. 2015, Algorithm 1 with the corrected indexing)::

    v_{t+1} = gamma_t * v_t - (1 - gamma_t) * g_t,     g_t = grad L(w_t)
    w_{t+1} = w_t + alpha_t * v_{t+1}

equals ``optax.sgd(learning_rate=alpha * (1 - gamma), momentum=gamma)`` (whose
trace is ``m = g + gamma * m`` and update ``-lr * m``), with ``v = -(1 - gamma) m``.

Exactly: ``w`` and ``v`` are fixed-point integers and each operation of the
step is invertible::

    v <- gamma v                      exact, lost digits to the information buffer
    v <- v - Q((1 - gamma) g_t)       undone by adding the same recomputed integer
    w <- w + Q(alpha F(v))            undone by subtracting the same integer

where ``Q`` rounds a float to fixed point and ``F`` rounds fixed point to a
float.  ``gamma`` is quantized to ``n / 2**momentum_bits``; that quantized value
is the momentum applied and reported.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from revoptax import _buffer as buffer_lib
from revoptax import _errors, _param_log
from revoptax._determinism import fingerprint
from revoptax._fixed_point import Fixed, FixedPointFormat, _compute_dtype, exact_scope, join, split
from revoptax._fusion import materialize
from revoptax._packing import Group, group_leaves, unpack_groups


class ExactLeaf(NamedTuple):
  """Exact state of one parameter leaf: weights, velocity and buffer."""

  w: Fixed
  v: Fixed
  buffer: buffer_lib.BufferState


@dataclasses.dataclass(frozen=True)
class MomentumSGDRule:
  """The exact momentum-SGD step on lists of leaves, shared by all entry points.

  A reversible training loop only needs: :meth:`step` (exact forward),
  :meth:`unstep_position` then :meth:`unstep_velocity` (exact inverse, with the
  gradient recomputed in between), :meth:`params` (the float view of the
  weights) and :meth:`float_step` (the same rule in plain floats, used for the
  vector-Jacobian products of the backward pass and as the test oracle).
  """

  fixed: FixedPointFormat = FixedPointFormat()
  momentum_bits: int = 16

  def __post_init__(self):
    if not 8 <= self.momentum_bits <= 16:
      raise ValueError(f"momentum_bits must be between 8 and 16, got {self.momentum_bits}.")

  def quantize_momentum(self, gamma):
    return buffer_lib.quantize_momentum(gamma, self.momentum_bits)

  def applied_momentum(self, gamma, dtype=jnp.float32):
    """The momentum actually applied for ``gamma`` (``n / 2**momentum_bits``)."""
    return buffer_lib.dequantize_momentum(self.quantize_momentum(gamma), self.momentum_bits, dtype)

  def init_leaf(self, param, rows: int):
    """``(leaf, ok)``: the exact state of ``param``; ``ok`` per element (in range)."""
    w, ok = self.fixed.from_float(param)
    leaf = ExactLeaf(w, self.fixed.zeros(w.lo.shape), buffer_lib.init(w.lo.shape, rows))
    return leaf, ok

  def params(self, leaf: ExactLeaf, dtype):
    return self.fixed.to_float(leaf.w, dtype)

  def step_leaf(self, leaf: ExactLeaf, grad, alpha, gamma, t):
    """One exact forward step of one leaf; returns ``(leaf', flags)``.

    ``flags["nonfinite"]`` and ``flags["range"]`` are per element (reduce them
    as the loop needs: :func:`revoptax.train` keeps the first failing step per
    element, so no reduction runs inside its loop); ``"momentum"`` (outside
    (0, 1) or not finite), ``"learning_rate"`` (not positive or not finite)
    and ``"buffer"`` are scalars.
    """
    cd = _compute_dtype(grad.dtype)
    n = self.quantize_momentum(gamma)
    one_minus = 1 - buffer_lib.dequantize_momentum(n, self.momentum_bits, cd)
    g = grad.astype(cd)
    with exact_scope():
      v, head = buffer_lib.push_pop(
        join(leaf.v), buffer_lib.join_head(leaf.buffer), n, self.momentum_bits
      )
      v, head = materialize((v, head))
      buf, buffer_ok = buffer_lib.spill(leaf.buffer, head, t)
      dv, dv_ok = self.fixed.quantize(one_minus * g)
      v = materialize(v - dv)
      dw, dw_ok = self.fixed.quantize(jnp.asarray(alpha, cd) * self.fixed.dequantize(v, cd))
      w = materialize(join(leaf.w) + dw)
      in_range = dv_ok & dw_ok & self.fixed.in_range_int(v) & self.fixed.in_range_int(w)
      new_leaf = ExactLeaf(split(w), split(v), buf)
    gamma, alpha = jnp.asarray(gamma), jnp.asarray(alpha)
    flags = {
      "momentum": ~jnp.all((gamma > 0) & (gamma < 1)),
      "learning_rate": ~jnp.all(jnp.isfinite(alpha) & (alpha > 0)),
      "nonfinite": ~jnp.isfinite(g),
      "range": ~in_range,
      "buffer": ~buffer_ok,
    }
    return new_leaf, flags

  def unstep_position_leaf(self, leaf: ExactLeaf, alpha, dtype):
    """``w_t = w_{t+1} - Q(alpha F(v_{t+1}))`` (exact)."""
    cd = _compute_dtype(dtype)
    with exact_scope():
      v = join(leaf.v)
      dw, _ = self.fixed.quantize(jnp.asarray(alpha, cd) * self.fixed.dequantize(v, cd))
      return leaf._replace(w=split(materialize(join(leaf.w) - dw)))

  def unstep_velocity_leaf(self, leaf: ExactLeaf, grad, gamma, t, clear_popped=True):
    """``v_t = (v_{t+1} + Q((1 - gamma) g_t)) / gamma`` (exact, pops the buffer).

    ``clear_popped=False`` leaves popped buffer rows in place as free space
    (see :func:`revoptax._buffer.divide`), for loops that only need the rows
    in use.
    """
    cd = _compute_dtype(grad.dtype)
    n = self.quantize_momentum(gamma)
    one_minus = 1 - buffer_lib.dequantize_momentum(n, self.momentum_bits, cd)
    with exact_scope():
      dv, _ = self.fixed.quantize(one_minus * grad.astype(cd))
      v = materialize(join(leaf.v) + dv)
      head, popped = buffer_lib.unspill(leaf.buffer, t)
      v, head = materialize(buffer_lib.pop_push(v, head, n, self.momentum_bits))
      buf = buffer_lib.after_unspill(leaf.buffer, head, popped, clear_popped)
      return ExactLeaf(leaf.w, split(v), buf)

  @staticmethod
  def float_step(w, v, g, alpha, gamma):
    """The same update in plain floats: returns ``(w', v')``."""
    v = gamma * v - (1 - gamma) * g
    return w + alpha * v, v


# ----------------------------------------------------------------------------
# Hyperparameter specs: float, array, schedule (step -> value), or a pytree of
# those that is a prefix of the params.


def per_leaf(spec, params) -> list:
  """One value per params leaf: ``spec`` is one value for all, or a prefix tree of params.

  Callables, scalars and arrays are single values. Raises ``ValueError`` when a
  pytree ``spec`` is not a prefix of ``params``.
  """
  if callable(spec) or _is_scalar_like(spec):
    return [spec] * len(jax.tree.leaves(params))
  boxed = jax.tree.map(lambda s, p: jax.tree.map(lambda _: _Box(s), p), spec, params)
  return [b.value for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]


def _spec_leaves(spec, params):
  """One spec leaf per params leaf (``spec`` may be a prefix of ``params``)."""
  try:
    return per_leaf(spec, params)
  except ValueError as e:
    raise ValueError(
      "reversible_sgd: a pytree learning_rate/momentum must have the structure of the "
      f"params (or a prefix of it): {e}"
    ) from None


class _Box:
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


def _is_scalar_like(x):
  return isinstance(x, (int, float, np.ndarray, jax.Array, np.generic))


def _value_at(spec, step):
  return spec(step) if callable(spec) else spec


def _concrete_values(spec, num_steps):
  """Values of a spec leaf at steps 0..num_steps-1 as numpy, or None if unknown."""
  try:
    if callable(spec):
      return np.asarray(jax.vmap(spec)(jnp.arange(num_steps)))
    return np.asarray(spec)[None]
  except Exception:  # traced, or a schedule that does not vectorize
    return None


def validate_learning_rate(values, api):
  if values is not None and not np.all(np.isfinite(values) & (values > 0)):
    bad = values[~(np.isfinite(values) & (values > 0))].ravel()[0]
    raise ValueError(f"{api}: learning_rate must be positive and finite, got {bad}.")


def validate_momentum(values, api):
  if values is not None and not np.all((values > 0) & (values < 1)):
    bad = values[~((values > 0) & (values < 1))].ravel()[0]
    raise ValueError(f"{api}: momentum must lie strictly between 0 and 1, got {bad}.")


def buffer_rows(rule: MomentumSGDRule, momentum_values, num_steps, momentum_floor):
  """Stack rows for a leaf from concrete momenta, else from the momentum floor.

  Computed in NumPy (never traced), with the same quantization as the step.
  """
  k = rule.momentum_bits

  def bits(gamma):
    g = np.nan_to_num(np.asarray(gamma, np.float32), nan=0.0)
    n = np.clip(np.round(g * np.float32(2.0**k)), 2.0 ** (k - 8), 2.0**k - 1)
    return k - np.log2(n.astype(np.float64))

  if momentum_values is not None and momentum_floor is None:
    b = bits(momentum_values)
    per_step = b.reshape(b.shape[0], -1).max(axis=1)
    total = float(per_step.sum()) * (num_steps / per_step.shape[0])
  else:
    total = num_steps * float(bits(0.5 if momentum_floor is None else momentum_floor))
  return buffer_lib.capacity_for(total, num_steps)


# ----------------------------------------------------------------------------
# The Optax transformation.


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """What a :class:`ReversibleSGDState` holds: the params' structure and its groups.

  Static: a pytree node without leaves (``jax.tree_util.register_static``), so
  it travels inside the state through ``jit``, ``nnx.Optimizer`` and
  ``TrainState`` and is part of ``jit``'s cache key, never an array.

  Attributes:
    treedef: the structure of the params.
    names: the params leaves' paths (``jax.tree_util.keystr``).
    groups: the leaves packed into each exact state (see :mod:`revoptax._packing`).
  """

  treedef: Any
  names: tuple[str, ...]
  groups: tuple[Group, ...]

  def __hash__(self):  # the treedef's node data need not be hashable (nnx variables)
    return hash((self.names, self.groups))

  @property
  def error_names(self) -> tuple[str, ...]:
    """Names for error codes: the leaves, then the groups (checks made per group)."""
    groups = tuple(
      self.names[g.leaves[0]]
      if len(g.leaves) == 1
      else "one of " + ", ".join(self.names[i] for i in g.leaves) + " (packed together)"
      for g in self.groups
    )
    return self.names + groups


jax.tree_util.register_static(StateLayout)


class ReversibleSGDState(NamedTuple):
  """State of :func:`reversible_sgd`: one exact state per group of parameter leaves.

  Leaves with the same dtype and the same scalar learning rate and momentum
  per step share one exact state, laid end to end in one flat vector (a leaf
  with per-element hyperparameters is a group of its own, in its shape).  So
  a model with one dtype and one schedule has five arrays of exact state
  whatever its number of leaves: each array costs per-call overhead in
  ``jit`` and more in ``nnx``.  An update rewrites only what changes: the
  words, one stack row, the counts, one fingerprint, and the log entries it
  appends.

  Attributes:
    step: ``int32[]`` number of updates applied.
    error: ``int32[3]``: ``(category, step, index)`` of the first failed check
      recorded with ``on_error="nan"``, or ``-1`` s (see :func:`check`).
    exact: per group, ``uint32[6, n]`` (``n``: the group's elements; a
      single unflattened leaf keeps its shape): the fixed-point words of the
      weights and the velocity (high word as its bit pattern, then low word)
      and the 64-bit heads of the information buffer (high, low).
    stack: per group, ``uint32[rows, n]``: the buffer's spilled rows.
    meta: per group, ``int32[2 + rows + 2 * max_steps]``: the buffer's row
      count, the param log's entry count, the step that spilled each row (-1
      if free), the bit pattern of each step's gradient fingerprint, and that
      of the buffer heads after each step (both checked by ``inverse``).
    log_entries: per group, ``int32[2, log_capacity]``: flat index (into the
      group) and step of each logged param (:mod:`revoptax._param_log`).
    log_value: per group, ``[log_capacity]``: the logged values.
    layout: the static :class:`StateLayout` (params structure and groups).

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
    >>> state = tx.init({"b": jnp.zeros(3), "w": jnp.ones((2, 3))})
    >>> [group.leaves for group in state.layout.groups], state.exact[0].shape
    ([(0, 1)], (6, 9))
  """

  step: jax.Array
  error: jax.Array
  exact: tuple
  stack: tuple
  meta: tuple
  log_entries: tuple
  log_value: tuple
  layout: StateLayout

  @property
  def buffer_size(self) -> tuple:
    """Rows of spilled buffer in use, per group (``int32[]`` each)."""
    return tuple(m[0] for m in self.meta)

  @property
  def log_size(self) -> tuple:
    """Entries of the param log in use, per group (``int32[]`` each)."""
    return tuple(m[1] for m in self.meta)


def _bits_as(x, dtype):
  return jax.lax.bitcast_convert_type(x, dtype)


def _init_meta(rows: int, max_steps: int):
  return jnp.concatenate(
    [
      jnp.zeros((2,), jnp.int32),
      jnp.full((rows,), -1, jnp.int32),
      jnp.zeros((2 * max_steps,), jnp.int32),
    ]
  )


def _print_index(stack, t):
  """Position of step ``t``'s gradient fingerprint in a group's ``meta``."""
  return 2 + stack.shape[0] + t


def _heads_print_index(meta, stack, t):
  """Position of the fingerprint of the buffer heads after step ``t`` in a group's ``meta``."""
  max_steps = (meta.shape[0] - 2 - stack.shape[0]) // 2
  return 2 + stack.shape[0] + max_steps + t


def _heads_print(leaf: ExactLeaf):
  """Fingerprint of the buffer heads' low words: a lost or altered row, or a wrong symbol,
  changes them (the low word of an un-spilled head is the row itself)."""
  return _bits_as(fingerprint(leaf.buffer.head_lo), jnp.int32)


def _pack(step, error, layout, exact, logs, metas) -> ReversibleSGDState:
  """The state of per-group exact states and logs; ``metas`` supplies the fingerprints."""
  words = tuple(
    jnp.stack(
      [
        _bits_as(e.w.hi, jnp.uint32),
        e.w.lo,
        _bits_as(e.v.hi, jnp.uint32),
        e.v.lo,
        e.buffer.head_hi,
        e.buffer.head_lo,
      ]
    )
    for e in exact
  )
  # Only the counts and row steps are written back (in place under donation).
  metas = tuple(
    jax.lax.dynamic_update_slice(
      m, jnp.concatenate([e.buffer.size[None], g.size[None], e.buffer.row_step]), (0,)
    )
    for m, e, g in zip(metas, exact, logs)
  )
  return ReversibleSGDState(
    step=step,
    error=error,
    exact=words,
    stack=tuple(e.buffer.stack for e in exact),
    meta=metas,
    log_entries=tuple(g.entries for g in logs),
    log_value=tuple(g.value for g in logs),
    layout=layout,
  )


def _unpack(state: ReversibleSGDState):
  """``(layout, exact states, param logs, metas)`` of a state, one of each per group."""
  exact, logs = [], []
  for words, stack, meta, entries, values in zip(
    state.exact, state.stack, state.meta, state.log_entries, state.log_value
  ):
    rows = stack.shape[0]
    buffer = buffer_lib.BufferState(words[4], words[5], stack, meta[2 : 2 + rows], meta[0])
    exact.append(
      ExactLeaf(
        Fixed(_bits_as(words[0], jnp.int32), words[1]),
        Fixed(_bits_as(words[2], jnp.int32), words[3]),
        buffer,
      )
    )
    logs.append(_param_log.ParamLog(entries, values, meta[1]))
  return state.layout, exact, logs, list(state.meta)


def _plain_structure(params, treedef):
  """``treedef`` without flax ``nnx.Variable`` boxes (as ``nnx.as_pure`` would give).

  ``nnx.Optimizer`` calls ``init`` with boxed params and ``update`` with plain
  arrays; ``inverse`` rebuilds plain params, like the updates.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None or not hasattr(nnx, "Variable"):
    return treedef
  plain = jax.tree.structure(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return plain if plain.num_leaves == treedef.num_leaves else treedef


def _is_scalar_spec(spec) -> bool:
  """Whether a learning-rate/momentum spec gives one value per step (not per element)."""
  if callable(spec):
    try:
      return jax.eval_shape(spec, jax.ShapeDtypeStruct((), jnp.int32)).shape == ()
    except Exception:  # a schedule that cannot be traced alone: keep its leaf apart
      return False
  return np.ndim(spec) == 0


def _distinct(specs) -> list[int]:
  """Per spec, the index of its distinct value (Python numbers by value, others by identity)."""
  index: dict = {}
  keys = [("value", s) if isinstance(s, (int, float)) else ("id", id(s)) for s in specs]
  return [index.setdefault(key, len(index)) for key in keys]


def _per_leaf_any(groups, flags, num_leaves):
  """``bool[num_leaves]``: whether any element of each leaf is set, from per-group flags."""
  return jnp.stack([jnp.any(x) for x in unpack_groups(groups, flags, num_leaves)])


# Default param log: entries per leaf, plus one per 32 element updates.
_DEFAULT_LOG_ENTRIES = 1024

_ORDER = ("momentum", "learning_rate", "nonfinite", "range", "buffer", "param_log")


def _when(condition, then, otherwise):
  """``then()`` if ``condition`` else ``otherwise()``: a Python branch when concrete (so
  errors raise directly), ``lax.cond`` when traced (so ``then`` runs only when needed)."""
  if not isinstance(condition, jax.core.Tracer):
    return then() if bool(condition) else otherwise()
  return jax.lax.cond(condition, then, otherwise)


def _codes(layout: StateLayout, per_leaf=None, per_group=None) -> dict:
  """Error codes over ``layout.error_names`` (leaves, then groups) from per-leaf/group flags."""
  n, g = len(layout.names), len(layout.groups)
  codes = {}
  for key, value in (per_leaf or {}).items():
    codes[key] = jnp.concatenate([value, jnp.zeros((g,), bool)])
  for key, value in (per_group or {}).items():
    codes[key] = jnp.concatenate([jnp.zeros((n,), bool), jnp.stack(value)])
  return codes


class ReversibleTransformation(optax.GradientTransformationExtraArgs):
  """An Optax ``GradientTransformationExtraArgs`` with an exact ``inverse``.

  ``inverse(state, grad_fn) -> (previous_state, previous_params)`` undoes the
  last ``update``: ``grad_fn(params)`` must return the gradient the loop used
  for that step (same batch, same key).
  """

  inverse: Callable[..., Any]

  def __new__(cls, init, update, inverse):
    obj = super().__new__(cls, init, update)
    object.__setattr__(obj, "inverse", inverse)
    return obj


def leaf_names(params) -> list[str]:
  """The leaves' paths (``jax.tree_util.keystr``); a bare array is named ``<params>``."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [jax.tree_util.keystr(path) or "<params>" for path in paths]


def reversible_sgd(
  learning_rate,
  momentum,
  *,
  max_steps: int,
  radix_bits: int = 46,
  int_bits: int = 16,
  momentum_bits: int = 16,
  momentum_floor: float | None = None,
  param_log_capacity: int | None = None,
  on_error: str = "raise",
) -> ReversibleTransformation:
  r"""Exactly reversible momentum SGD (Maclaurin et al., 2015).

  .. math::

    v_{t+1} = \gamma_t v_t - (1 - \gamma_t) g_t, \qquad
    w_{t+1} = w_t + \alpha_t v_{t+1}

  This is ``optax.sgd(learning_rate=alpha * (1 - gamma), momentum=gamma)``,
  computed exactly: the weights and velocity live in 64-bit fixed point and
  the bits that multiplication by ``gamma`` destroys go to an information
  buffer, so :attr:`ReversibleTransformation.inverse` rebuilds the previous
  state bit for bit.  After ``optax.apply_updates`` the params equal the exact
  weights rounded to the params' dtype, except where float addition cannot
  produce that value (a weight shrinking below the size of its update); such
  elements are logged in the state, and the inverse uses the logged values.

  Args:
    learning_rate: ``alpha``: a positive float, an array, an Optax schedule
      ``step -> value``, or a pytree of those (a prefix of the params) for
      per-layer rates.
    momentum: ``gamma`` in (0, 1), in any of the same forms.  It is quantized
      to ``n / 2**momentum_bits``; the buffer costs ``log2(1 / gamma)`` bits per
      parameter per step.
    max_steps: steps the buffer must hold (its capacity is static).
    radix_bits: fractional bits of the fixed point (resolution ``2**-radix_bits``).
    int_bits: range ``|w|, |v| < 2**int_bits``; ``radix_bits + int_bits <= 62``.
    momentum_bits: precision ``k`` of the momentum, 8 to 16.
    momentum_floor: smallest momentum the schedules will use, for the capacity
      when the momentum is not known concretely (default: exact from concrete
      values, else 0.5).
    param_log_capacity: entries per leaf of the log of params that differed
      from the exact weights (default ``1024 + size * max_steps / 32``, one in
      32 element updates: the cumulative rates measured on ordinary loops are
      0.02-0.8%, peaking at 2.2% over 100 steps); leaves packed into one exact
      state share one log of the summed capacity.  An entry costs 8 bytes
      plus one param.
    on_error: what a failed check in ``update`` does (learning rate or
      momentum out of range, non-finite gradient, fixed-point overflow,
      buffer or log capacity).  ``"raise"`` (default):
      raise :class:`revoptax.ReversibilityError` naming the step and leaf (a
      runtime error with that message under ``jit``, from a host callback
      that runs only when a check fails).  ``"nan"``: no callback; the first
      failure is recorded in ``state.error``, every later
      update is NaN (so the params become NaN), and :func:`revoptax.check` or
      ``inverse`` raises the message.

  Returns:
    A :class:`ReversibleTransformation` (an ``optax.GradientTransformationExtraArgs``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, revoptax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    >>> updates, state = tx.update(grad_fn(params), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> previous_state, previous_params = tx.inverse(state, grad_fn)
    >>> previous_params["w"].tolist()
    [1.0, 1.0, 1.0]

  References:
    Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
    through Reversible Learning", ICML 2015, https://arxiv.org/abs/1502.03492
  """
  api = "revoptax.reversible_sgd"
  if on_error not in ("raise", "nan"):
    raise ValueError(f"{api}: on_error must be 'raise' or 'nan', got {on_error!r}.")
  if not isinstance(max_steps, (int, np.integer)) or max_steps <= 0:
    raise ValueError(f"{api}: max_steps must be a positive int, got {max_steps!r}.")
  if momentum_floor is not None and not 0 < momentum_floor < 1:
    raise ValueError(f"{api}: momentum_floor must lie in (0, 1), got {momentum_floor}.")
  rule = MomentumSGDRule(FixedPointFormat(radix_bits, int_bits), momentum_bits)
  for spec in jax.tree.leaves(learning_rate):
    validate_learning_rate(_concrete_values(spec, max_steps), api)
  for spec in jax.tree.leaves(momentum):
    validate_momentum(_concrete_values(spec, max_steps), api)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    names = leaf_names(params)
    _check_dtypes(leaves, names, api)
    alphas, gammas = _spec_leaves(learning_rate, params), _spec_leaves(momentum, params)
    rows = [
      buffer_rows(rule, _concrete_values(g, max_steps), max_steps, momentum_floor) for g in gammas
    ]
    packable = [_is_scalar_spec(a) and _is_scalar_spec(g) for a, g in zip(alphas, gammas)]
    groups = group_leaves(leaves, packable, _distinct(alphas), _distinct(gammas), rows)
    layout = StateLayout(_plain_structure(params, treedef), tuple(names), groups)
    exact, oks = zip(*(rule.init_leaf(group.pack(leaves), group.rows) for group in groups))
    exact = list(exact)
    in_range = jnp.stack([jnp.all(ok) for ok in unpack_groups(groups, oks, len(leaves))])
    checked = _errors.raise_on_failure({"range": ~in_range}, names, api, step=0, token=True)
    logs = [
      _param_log.init(
        group.dtype,
        sum(
          param_log_capacity or _DEFAULT_LOG_ENTRIES + math.ceil(math.prod(shape) * max_steps / 32)
          for shape in group.shapes
        ),
      )
      for group in groups
    ]
    metas = [_init_meta(group.rows, max_steps) for group in groups]
    no_error = jnp.full((3,), -1, jnp.int32) + checked
    return _pack(jnp.zeros((), jnp.int32), no_error, layout, exact, logs, metas)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    grads, treedef = jax.tree.flatten(updates)
    layout, exact, logs, metas = _unpack(state)
    groups, n = layout.groups, len(layout.names)
    t = state.step
    alphas = _spec_leaves(learning_rate, updates)
    gammas = _spec_leaves(momentum, updates)
    grads = [group.pack(grads) for group in groups]
    metas = [
      jax.lax.dynamic_update_index_in_dim(
        m, _bits_as(fingerprint(g), jnp.int32), _print_index(e.buffer.stack, t), 0
      )
      for m, e, g in zip(metas, exact, grads)
    ]
    before = [rule.params(leaf, group.dtype) for leaf, group in zip(exact, groups)]
    per_group = {"momentum": [], "learning_rate": [], "buffer": []}
    if params is not None:
      used_leaves = jax.tree.leaves(params)
      used = [group.pack(used_leaves).astype(b.dtype) for group, b in zip(groups, before)]
      per_group["param_log"] = []
      for i, (u, b) in enumerate(zip(used, before)):
        logs[i], ok = _param_log.record(logs[i], u, b, t)
        per_group["param_log"].append(~ok)
    else:
      used = before
    new_exact, elementwise, failed = [], [], jnp.zeros((), bool)
    for leaf, g, group in zip(exact, grads, groups):
      a, m = alphas[group.leaves[0]], gammas[group.leaves[0]]
      new_leaf, flags = rule.step_leaf(leaf, g, _value_at(a, t), _value_at(m, t), t)
      new_exact.append(new_leaf)
      per_group["momentum"].append(flags["momentum"])
      per_group["learning_rate"].append(flags["learning_rate"])
      per_group["buffer"].append(flags["buffer"])
      elementwise.append((flags["nonfinite"], flags["range"]))
      # One reduction per group for both per-element checks (each reduction
      # costs two thunks on CPU); the leaf is found only when one fails.
      failed = failed | jnp.any(flags["nonfinite"] | flags["range"])

    for flag in (f for flags in per_group.values() for f in flags):
      failed = failed | flag

    def codes():  # built only when a check failed
      per_leaf = {
        "nonfinite": _per_leaf_any(groups, [f[0] for f in elementwise], n),
        "range": _per_leaf_any(groups, [f[1] for f in elementwise], n),
      }
      found = _codes(layout, per_leaf=per_leaf, per_group=per_group)
      # The first category that fails is reported: a bad momentum before what it causes.
      return {k: found[k] for k in _ORDER if k in found}

    new_updates = [
      rule.params(leaf, group.dtype) - u for leaf, group, u in zip(new_exact, groups, used)
    ]
    error = state.error
    if on_error == "raise":  # effect free, so jit keeps its fast dispatch path
      checked = _when(
        failed,
        lambda: _errors.raise_on_failure(codes(), layout.error_names, api, step=t, token=True),
        lambda: jnp.zeros((), jnp.int32),
      )
      error = error + checked
    else:  # no host callback: record the failure and poison the updates
      error = _when(
        failed & (error[0] < 0), lambda: _errors.failure_code(codes(), t), lambda: error
      )
      new_updates = [jnp.where(error[0] >= 0, jnp.nan, u) for u in new_updates]
    metas = [
      jax.lax.dynamic_update_index_in_dim(
        m, _heads_print(e), _heads_print_index(m, e.buffer.stack, t), 0
      )
      for m, e in zip(metas, new_exact)
    ]
    new_state = _pack(t + 1, error, layout, new_exact, logs, metas)
    return treedef.unflatten(unpack_groups(groups, new_updates, n)), new_state

  def inverse_fn(state, grad_fn):
    t = state.step - 1
    layout, exact, logs, metas = _unpack(state)
    groups, n = layout.groups, len(layout.names)
    stacks = [leaf.buffer.stack for leaf in exact]
    checked = _errors.raise_recorded(state.error, layout.error_names, api + " inverse", token=True)
    template = layout.treedef.unflatten([0] * n)
    alphas = _spec_leaves(learning_rate, template)
    gammas = _spec_leaves(momentum, template)
    exact = [
      rule.unstep_position_leaf(leaf, _value_at(alphas[group.leaves[0]], t), group.dtype)
      for leaf, group in zip(exact, groups)
    ]
    params = []
    for i, (leaf, group) in enumerate(zip(exact, groups)):
      p, logs[i] = _param_log.restore(logs[i], rule.params(leaf, group.dtype), t)
      params.append(p)
    params = layout.treedef.unflatten(unpack_groups(groups, params, n))
    grads = [group.pack(jax.tree.leaves(grad_fn(params))) for group in groups]
    drift = [
      _bits_as(fingerprint(g), jnp.int32)
      != jax.lax.dynamic_index_in_dim(m, _print_index(s, t), 0, False)
      for g, m, s in zip(grads, metas, stacks)
    ]
    exact = [
      rule.unstep_velocity_leaf(leaf, g, _value_at(gammas[group.leaves[0]], t), t)
      for leaf, g, group in zip(exact, grads, groups)
    ]
    # The undone heads must be those the update of step t started from.
    fresh = [_heads_print(e._replace(buffer=buffer_lib.init(e.w.lo.shape, 0))) for e in exact]
    corrupt = [
      _heads_print(e)
      != jnp.where(
        t > 0, jax.lax.dynamic_index_in_dim(m, _heads_print_index(m, s, t - 1), 0, False), f
      )
      for e, m, s, f in zip(exact, metas, stacks, fresh)
    ]
    checked = checked + _errors.raise_on_failure(
      _codes(layout, per_group={"drift": drift, "buffer_corrupt": corrupt}),
      layout.error_names,
      api + " inverse",
      step=t,
      token=True,
    )
    metas = [
      jax.lax.dynamic_update_slice(
        jax.lax.dynamic_update_index_in_dim(m, jnp.int32(0), _print_index(s, t), 0),
        jnp.zeros((1,), jnp.int32),
        (_heads_print_index(m, s, t),),
      )
      for m, s in zip(metas, stacks)
    ]
    previous = _pack(t, state.error + checked, layout, exact, logs, metas)
    return previous, params

  return ReversibleTransformation(init_fn, update_fn, inverse_fn)


def _check_dtypes(leaves, names, api):
  for leaf, name in zip(leaves, names):
    dtype = np.dtype(jnp.asarray(leaf).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"{api}: parameter {name} has dtype {dtype}; reversible training needs float "
        "parameters (float16, bfloat16, float32 or float64). Keep integer state out of "
        "the params passed to the optimizer (e.g. nnx.Optimizer(..., wrt=nnx.Param))."
      )


def check(state: ReversibleSGDState) -> None:
  """Raise if ``state`` recorded a failed update (``reversible_sgd(..., on_error="nan")``).

  Call it outside ``jit`` (for example every few hundred steps, or before
  reversing): it reads ``state.error`` on the host.

  Raises:
    revoptax.ReversibilityError: naming the check, step and leaf that failed.

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10, on_error="nan")
    >>> state = tx.init({"w": jnp.ones(2)})
    >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state)
    >>> bool(jnp.isnan(updates["w"]).all())
    True
    >>> revoptax.check(state)
    Traceback (most recent call last):
    ...
    revoptax._errors.ReversibilityError: revoptax.reversible_sgd: the training gradient ...
  """
  _errors.raise_recorded(
    np.asarray(state.error), state.layout.error_names, "revoptax.reversible_sgd"
  )
