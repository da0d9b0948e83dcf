"""The Optax face of any :class:`revoptax.ReversibleRule`: update and exact inverse.

The state mirrors the params as Optax states do: each exact quantity of the
rule (the words of the weights and of the optimizer state, the buffer heads)
is a tree with the params' structure and each leaf's shape, and the buffer's
spilled rows are a tree of ``[rows, *leaf.shape]`` arrays, so
``optax.tree_utils.tree_map_params``, sharding specs and checkpointing treat
it like any optimizer state.  What is not per element (the counter, buffer
row counts and the steps that spilled them, per-step fingerprints, the param
log, the recorded error) lives in arrays over all leaves.

``update`` runs the rule's exact step on every leaf and returns
``params(exact') - params_used``; ``inverse`` undoes the last update with the
one reverse step of :mod:`revoptax._reverse`, recomputing the gradient at the
params the update saw (the param log supplies those that differ from the
exact weights, see :mod:`revoptax._param_log`).  Fingerprints of each step's
gradient, buffer heads and hyperparameter values let ``inverse`` say which
of them changed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from revoptax import _buffer as buffer_lib
from revoptax import _errors, _hyper, _param_log, _reverse
from revoptax._determinism import fingerprint_all, fingerprints
from revoptax._rule import ReversibleRule

# Default param log: entries per leaf, plus one per 32 element updates.
_DEFAULT_LOG_ENTRIES = 1024
# Per step and leaf, fingerprints of: the gradient, the buffer heads after the
# step, the hyperparameter values.
_GRAD, _HEADS, _HYPER = 0, 1, 2


class ReversibleState(NamedTuple):
  """State of a reversible Optax transformation (arrays only).

  Attributes:
    count: ``int32[]`` number of updates applied.
    exact: the rule's exact state (e.g. :class:`revoptax.MomentumSGDState`)
      whose every array field is a tree like the params: the fixed-point words
      of the weights and of the optimizer state, and the buffer heads, in each
      leaf's shape; ``buffer.stack`` holds ``uint32[rows, *leaf.shape]``
      spilled rows per leaf (``buffer.row_step`` and ``buffer.size`` are
      ``None``: they are the fields below).
    param_dtype: per leaf, a size-zero ``[0, *leaf.shape[1:]]`` array of the
      params' dtype (the dtype ``inverse`` returns the params in).
    buffer_size: ``int32[leaves]`` rows of spilled buffer in use per leaf.
    row_step: ``int32[leaves, max_rows]`` the step that spilled each row (-1 if free).
    prints: ``uint32[max_steps, leaves, 3]`` per step and leaf, fingerprints
      of the gradient, of the buffer heads after the step and of the
      hyperparameter values (checked by ``inverse``).
    log: the :class:`revoptax._param_log.ParamLog` of params that differed
      from the exact weights.
    error: ``int32[3]``: ``(category, step, leaf)`` of the first failed check
      recorded with ``on_error="nan"``, or ``-1`` s (see :func:`check`).

  Example:
    >>> import jax.numpy as jnp, optax, revoptax
    >>> tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
    >>> state = tx.init({"b": jnp.zeros(3), "w": jnp.ones((2, 3))})
    >>> state.exact.v.hi["w"].shape, int(optax.tree_utils.tree_get(state, "count"))
    ((2, 3), 0)
  """

  count: jax.Array
  exact: Any
  param_dtype: Any
  buffer_size: jax.Array
  row_step: jax.Array
  prints: jax.Array
  log: _param_log.ParamLog
  error: jax.Array


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


def reversible_optimizer(
  rule: ReversibleRule,
  *,
  max_steps: int,
  param_log_capacity: int | None = None,
  on_error: str = "raise",
  **hyperparameters,
) -> ReversibleTransformation:
  """The Optax transformation of any reversible rule, with an exact ``inverse``.

  Args:
    rule: the :class:`revoptax.ReversibleRule`.
    max_steps: updates the buffer and the fingerprints must hold (static).
    param_log_capacity: entries per leaf of the log of params that differed
      from the exact weights (default ``1024 + size * max_steps / 32``).
    on_error: ``"raise"`` or ``"nan"``, see :func:`revoptax.reversible_sgd`.
    **hyperparameters: per name in ``rule.hyperparameters``: a value, an
      array broadcastable to the leaves, an Optax schedule ``step -> value``,
      or a pytree of those that is a prefix of the params.

  Returns:
    A :class:`ReversibleTransformation`.

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> tx = revoptax.reversible_optimizer(
    ...   revoptax.MomentumSGDRule(), learning_rate=0.1, momentum=0.9, max_steps=10)
    >>> updates, state = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}),
    ...                            {"w": jnp.ones(2)})
    >>> int(state.count)
    1
  """
  return transformation(
    rule, hyperparameters, max_steps, param_log_capacity, on_error, "revoptax.reversible_optimizer"
  )


def transformation(
  rule, specs: Mapping, max_steps, param_log_capacity, on_error, api
) -> ReversibleTransformation:
  """:func:`reversible_optimizer` naming ``api`` in its messages (for the factories)."""
  _check_options(rule, specs, max_steps, on_error, api)
  specs = {**{n: v for n, v in rule.defaults.items() if n not in specs}, **specs}
  names = tuple(rule.hyperparameters)
  for name in names:  # concrete values are checked now, before any params
    leaves = jax.tree.leaves(specs[name], is_leaf=callable)
    _hyper.plan(
      rule, {name: _per_step(leaves)}, [{name: j} for j in range(len(leaves))], max_steps, api
    )

  def leaf_specs(template):
    out = {}
    for name in names:
      try:
        out[name] = _hyper.per_leaf(specs[name], template)
      except ValueError as e:
        raise ValueError(
          f"{api}: a pytree {name} must have the structure of the params (or a prefix of it): {e}"
        ) from None
    return out

  def hp_at(per_leaf_specs, i, t):
    return {n: _hyper.as_float(_value_at(per_leaf_specs[n][i], t)) for n in names}

  def init_fn(params):
    leaves, treedef = _plain_flatten(params)
    labels = _hyper.leaf_names(params)
    _check_dtypes(leaves, labels, api)
    per = leaf_specs(treedef.unflatten([0] * len(leaves)))
    states, oks = [], []
    index = {n: _hyper.distinct(per[n])[1] for n in names}
    rows_of = {}  # leaves given the same specs share one capacity computation
    for i, leaf in enumerate(leaves):
      combo = tuple(index[n][i] for n in names)
      if combo not in rows_of:
        per_step = {n: _per_step([per[n][i]]) for n in names}
        rows_of[combo] = _hyper.plan(rule, per_step, [dict.fromkeys(names, 0)], max_steps, api)[0]
      state, ok = rule.init(jnp.asarray(leaf), rows_of[combo][0])
      states.append(state)
      oks.append(jnp.all(ok))
    checked = jnp.zeros((), jnp.int32)
    if leaves:
      checked = _errors.raise_on_failure(
        {"range": ~jnp.stack(oks)}, labels, api, step=0, token=True
      )
    capacity = sum(
      param_log_capacity or _DEFAULT_LOG_ENTRIES + math.ceil(np.size(leaf) * max_steps / 32)
      for leaf in leaves
    )
    dtypes = [jnp.asarray(leaf).dtype for leaf in leaves]
    return _pack(
      rule,
      treedef,
      states,
      dtypes,
      count=jnp.zeros((), jnp.int32),
      prints=jnp.zeros((max_steps, len(leaves), 3), jnp.uint32),
      log=_param_log.init(capacity),
      error=jnp.full((3,), -1, jnp.int32) + checked,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    grads, treedef = _check_structure(updates, state, api)
    if params is None:
      raise ValueError(
        f"{api}: update needs the params (tx.update(grads, state, params)): the inverse must "
        "recompute each gradient at the very params the update saw, which it records."
      )
    used_leaves = jax.tree.leaves(params)
    labels = _labels(state, treedef)
    states = _unpack(state)
    t = state.count
    per = leaf_specs(treedef.unflatten([0] * len(grads)))
    learned = dict.fromkeys(names, False)
    log, new_states, new_updates, prints = state.log, [], [], []
    per_leaf, elementwise, any_bad = {}, [], []
    for i, (s, g) in enumerate(zip(states, grads)):
      dtype = jnp.asarray(g).dtype
      exact_before = rule.params(s, dtype)
      used = jnp.asarray(used_leaves[i]).astype(dtype)
      log, log_ok = _param_log.record(log, i, used, exact_before, t)
      hp = hp_at(per, i, t)
      s, flags = rule.step(s, g, hp, t)
      scalar = {"max_steps": t >= max_steps, **rule.checks(hp, learned)}
      scalar.update(buffer=flags.buffer, param_log=~log_ok)
      for k, v in scalar.items():
        per_leaf.setdefault(k, []).append(v)
      elementwise.append(flags)
      # One reduction for both per-element checks; the category is found only on failure.
      any_bad.append(jnp.any(flags.nonfinite | flags.range))
      new_states.append(s)
      new_updates.append(rule.params(s, dtype) - used)
      words = fingerprints(g, s.buffer.head_lo)  # the gradient's and the new heads' at once
      prints.append(jnp.concatenate([words, fingerprint_all(jax.tree.leaves(hp))[None]]))
    failed = jnp.zeros((), bool)
    for v in list(per_leaf.values()) + ([any_bad] if any_bad else []):
      failed = failed | jnp.any(jnp.stack(v))

    def codes():  # built only when a check failed
      out = {k: jnp.stack(v) for k, v in per_leaf.items() if k not in ("buffer", "param_log")}
      out["nonfinite"] = jnp.stack([jnp.any(f.nonfinite) for f in elementwise])
      out["range"] = jnp.stack([jnp.any(f.range) for f in elementwise])
      out["buffer"] = jnp.stack(per_leaf["buffer"])
      out["param_log"] = jnp.stack(per_leaf["param_log"])
      return out

    error = state.error
    if on_error == "raise":  # effect free, so jit keeps its fast dispatch path
      error = error + _when(
        failed,
        lambda: _errors.raise_on_failure(codes(), labels, api, step=t, token=True),
        lambda: jnp.zeros((), jnp.int32),
      )
    else:  # no host callback: record the failure and poison the updates
      error = _when(
        failed & (error[0] < 0), lambda: _errors.failure_code(codes(), t), lambda: error
      )
      new_updates = [jnp.where(error[0] >= 0, jnp.nan, u).astype(u.dtype) for u in new_updates]
    new_prints = state.prints
    if prints:
      row = jnp.stack(prints)[None]
      new_prints = jax.lax.dynamic_update_index_in_dim(
        state.prints, row[0], jnp.minimum(t, max_steps - 1), 0
      )
    dtypes = [jnp.asarray(g).dtype for g in grads]
    new_state = _pack(rule, treedef, new_states, dtypes, t + 1, new_prints, log, error)
    return treedef.unflatten(new_updates), new_state

  def inverse_fn(state, grad_fn):
    treedef = _params_treedef(state)
    labels = _labels(state, treedef)
    t = state.count - 1
    checked = _errors.raise_recorded(state.error, labels, api + " inverse", token=True)
    states = _unpack(state)
    n = len(states)
    per = leaf_specs(treedef.unflatten([0] * n))
    hps = [hp_at(per, i, t) for i in range(n)]
    dtypes = [m.dtype for m in jax.tree.leaves(state.param_dtype)]
    log = state.log

    def gradient(params):
      nonlocal log
      used = []
      for i, p in enumerate(params):
        p, log = _param_log.restore(log, i, p, t)
        used.append(p)
      grads = jax.tree.leaves(grad_fn(treedef.unflatten(used)))
      return used, grads

    states, params, grads = _reverse.reverse_step(rule, states, hps, t, gradient, dtypes)
    recorded = jax.lax.dynamic_index_in_dim(state.prints, jnp.maximum(t, 0), 0, False)
    fresh = [fingerprints(buffer_lib.init(s.buffer.head_lo.shape, 0).head_lo)[0] for s in states]
    earlier = jax.lax.dynamic_index_in_dim(state.prints, jnp.maximum(t - 1, 0), 0, False)
    codes = {}
    if n:
      codes = {
        "inverse_hyperparameters": jnp.stack([fingerprint_all(jax.tree.leaves(hp)) for hp in hps])
        != recorded[:, _HYPER],
        "drift": jnp.stack([fingerprints(g)[0] for g in grads]) != recorded[:, _GRAD],
        "buffer_corrupt": jnp.stack([fingerprints(s.buffer.head_lo)[0] for s in states])
        != jnp.where(t > 0, earlier[:, _HEADS], jnp.stack(fresh)),
      }
    checked = checked + _errors.raise_on_failure(
      codes, labels, api + " inverse", step=t, token=True
    )
    prints = jax.lax.dynamic_update_index_in_dim(
      state.prints, jnp.zeros(state.prints.shape[1:], jnp.uint32), jnp.maximum(t, 0), 0
    )
    previous = _pack(rule, treedef, states, dtypes, t, prints, log, state.error + checked)
    return previous, treedef.unflatten(params)

  return ReversibleTransformation(init_fn, update_fn, inverse_fn)


# ----------------------------------------------------------------------------
# Specs.


def _check_options(rule, specs, max_steps, on_error, api):
  if not isinstance(rule, ReversibleRule):
    raise TypeError(f"{api}: rule must implement revoptax.ReversibleRule, got {rule!r}.")
  if on_error not in ("raise", "nan"):
    raise ValueError(f"{api}: on_error must be 'raise' or 'nan', got {on_error!r}.")
  if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps <= 0:
    raise ValueError(f"{api}: max_steps must be a positive int, got {max_steps!r}.")
  missing = [n for n in rule.hyperparameters if n not in specs and n not in rule.defaults]
  unknown = [n for n in specs if n not in rule.hyperparameters]
  if missing or unknown:
    raise TypeError(
      f"{api}: {type(rule).__name__} takes the hyperparameters "
      f"{', '.join(rule.hyperparameters)}; missing: {missing or 'none'}, "
      f"unknown: {unknown or 'none'}."
    )


def _value_at(spec, t):
  return spec(t) if callable(spec) else spec


def _per_step(spec_leaves):
  """``ts -> [values of each spec leaf at ts]`` for :func:`revoptax._hyper.plan`."""

  def values(ts):
    out = []
    for spec in spec_leaves:
      if callable(spec):
        out.append(jax.vmap(spec)(jnp.asarray(ts)))
      else:
        x = _hyper.as_float(spec)
        out.append(jnp.broadcast_to(x, (len(ts),) + x.shape))
    return out

  return values


def _when(condition, then, otherwise):
  """``then()`` if ``condition`` else ``otherwise()``: a Python branch when concrete (so
  errors raise directly), ``lax.cond`` when traced (so ``then`` runs only when needed)."""
  if not isinstance(condition, jax.core.Tracer):
    return then() if bool(condition) else otherwise()
  return jax.lax.cond(condition, then, otherwise)


# ----------------------------------------------------------------------------
# State layout.


def _plain_flatten(params):
  """Leaves and structure of ``params`` without flax ``nnx.Variable`` boxes.

  ``nnx.Optimizer`` calls ``init`` with boxed params and ``update`` with plain
  arrays (as ``nnx.as_pure`` would give); the state follows the plain structure.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is not None and hasattr(nnx, "Variable"):
    is_var = lambda x: isinstance(x, nnx.Variable)
    plain = jax.tree.structure(params, is_leaf=is_var)
    boxed = jax.tree.leaves(params, is_leaf=is_var)
    if any(is_var(x) for x in boxed):
      leaves = jax.tree.leaves(params)
      if plain.num_leaves == len(leaves):
        return leaves, plain
  return jax.tree.flatten(params)


def _pack(rule, treedef, states, dtypes, count, prints, log, error) -> ReversibleState:
  """The state of per-leaf exact states: array fields as params-shaped trees."""
  rows = [s.buffer.stack.shape[0] for s in states]
  max_rows = max(rows, default=0)
  steps = [
    jnp.pad(s.buffer.row_step, (0, max_rows - r), constant_values=-1) for s, r in zip(states, rows)
  ]
  template = _state_template(rule)
  stripped = [s._replace(buffer=s.buffer._replace(row_step=None, size=None)) for s in states]
  per_leaf = [jax.tree.leaves(s) for s in stripped]
  fields = [treedef.unflatten([leaf[j] for leaf in per_leaf]) for j in range(template.num_leaves)]
  markers = [jnp.zeros((0, *s.w.lo.shape[1:]), d) for s, d in zip(states, dtypes)]
  return ReversibleState(
    count=jnp.asarray(count, jnp.int32),
    exact=template.unflatten(fields),
    param_dtype=treedef.unflatten(markers),
    buffer_size=jnp.stack([s.buffer.size for s in states])
    if states
    else jnp.zeros((0,), jnp.int32),
    row_step=jnp.stack(steps) if steps else jnp.zeros((0, 0), jnp.int32),
    prints=prints,
    log=log,
    error=error,
  )


def _state_template(rule):
  """The structure of one leaf's exact state without ``row_step`` and ``size``."""
  shape = jax.eval_shape(lambda: rule.init(jnp.zeros((), jnp.float32), 1)[0])
  return jax.tree.structure(shape._replace(buffer=shape.buffer._replace(row_step=None, size=None)))


def _params_treedef(state: ReversibleState):
  return jax.tree.structure(state.exact.w.hi)


def _unpack(state: ReversibleState) -> list:
  """The per-leaf exact states of ``state``."""
  treedef = _params_treedef(state)
  n = treedef.num_leaves
  fields = [jax.tree.leaves(tree) for tree in _field_trees(state.exact, treedef)]
  template = jax.tree.structure(state.exact, is_leaf=lambda x: jax.tree.structure(x) == treedef)
  out = []
  for i in range(n):
    s = template.unflatten([f[i] for f in fields])
    rows = s.buffer.stack.shape[0]
    buffer = s.buffer._replace(row_step=state.row_step[i, :rows], size=state.buffer_size[i])
    out.append(s._replace(buffer=buffer))
  return out


def _field_trees(exact, treedef):
  return jax.tree.leaves(exact, is_leaf=lambda x: jax.tree.structure(x) == treedef)


def _labels(state, treedef) -> tuple[str, ...]:
  return tuple(_hyper.leaf_names(treedef.unflatten([0] * treedef.num_leaves)))


def _check_structure(updates, state, api):
  leaves, treedef = jax.tree.flatten(updates)
  expected = _params_treedef(state)
  if treedef != expected:
    raise ValueError(
      f"{api}: the gradients have the structure {treedef}, but the state was initialized for "
      f"params with the structure {expected}; pass gradients shaped like the params given to "
      "init."
    )
  shapes = [tuple(s.shape) for s in jax.tree.leaves(state.exact.w.hi)]
  for label, g, shape in zip(_labels(state, treedef), leaves, shapes):
    if tuple(np.shape(g)) != shape:
      raise ValueError(
        f"{api}: the gradient of leaf {label} has shape {tuple(np.shape(g))}, but the state was "
        f"initialized for shape {shape}."
      )
  return leaves, treedef


def _check_dtypes(leaves, names, api):
  for leaf, name in zip(leaves, names):
    dtype = np.dtype(jnp.asarray(leaf).dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"{api}: parameter {name} has dtype {dtype}; reversible training needs float "
        "parameters (float16, bfloat16, float32 or float64). Keep integer state out of "
        "the params passed to the optimizer (e.g. nnx.Optimizer(..., wrt=nnx.Param))."
      )


def check(state: ReversibleState) -> None:
  """Raise if ``state`` recorded a failed update (``on_error="nan"``).

  Call it outside ``jit`` (for example every few hundred steps, or before
  reversing): it reads ``state.error`` on the host.

  Raises:
    revoptax.ReversibilityError: naming the check, step and leaf that failed.

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10, on_error="nan")
    >>> params = {"w": jnp.ones(2)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, tx.init(params), params)
    >>> bool(jnp.isnan(updates["w"]).all())
    True
    >>> revoptax.check(state)
    Traceback (most recent call last):
    ...
    revoptax._errors.ReversibilityError: revoptax.check: the training gradient ...
  """
  treedef = _params_treedef(state)
  _errors.raise_recorded(np.asarray(state.error), _labels(state, treedef), "revoptax.check")
