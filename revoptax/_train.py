"""``revoptax.train``: a training run whose VJP runs training backwards exactly.

Forward: ``num_steps`` exact steps of a :class:`revoptax.ReversibleRule`,
keeping only the final exact state, the information buffer and three 32-bit
fingerprints per step (of the gradient, of the buffer heads after the step,
and of the hyperparameter values the step used).  Each hyperparameter is
evaluated at step ``t`` inside the loop.  Backward, for ``t = T-1 .. 0``
(Maclaurin et al. 2015, Algorithm 2, for any rule)::

    g_t, hvp  = jax.vjp(grad_w L, w_t, hparams, batch_t)     recomputed gradient
    state_t   = undo_state(state_{t+1} with w_t, g_t, h_t)    exact
    (d_state, d_g, d_h_t) = vjp of the float step at (state_t, g_t, h_t)
    d_hparams += vjp of h_t = schedule(hparams, t), at d_h_t
    (d_w, d_hparams, d_batch_t) += hvp(d_g)
    w_{t-1}   = undo_params(state_t, h_{t-1})                 exact

so nothing of shape ``[T, ...]`` is kept beyond the buffer (``rule``'s bits
per parameter per step) and the fingerprints.  Leaves with the same dtype and
scalar hyperparameters are packed into one exact state (see
:mod:`revoptax._packing`); a sharded leaf keeps its own, sharded like it
(:mod:`revoptax._sharding`).  With ``segment_steps`` both loops run in
segments whose buffers are regenerated or brought back from host memory
before they are reversed (:mod:`revoptax._segments`).  The loop is compiled
once per static configuration (:mod:`revoptax._static`), also when called
outside ``jit``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from revoptax import _buffer as buffer_lib
from revoptax import _errors, _hyper, _reverse, _segments, _sharding
from revoptax._determinism import fingerprint_all, first_drift, isolated
from revoptax._fixed_point import _compute_dtype
from revoptax._fusion import materialize
from revoptax._packing import Group, group_leaves, unpack_groups
from revoptax._rule import ReversibleRule
from revoptax._sgd import MomentumSGDRule
from revoptax._static import FunctionKey

API = "revoptax.train"
_ELEMENT_CHECKS = ("nonfinite", "range", "buffer")


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one training run, hashed by value (one compile per value)."""

  loss_fn: FunctionKey
  rule: Any
  schedules: _hyper.Schedules
  learned: tuple[bool, ...]  # per hyperparameter: traced, so checked against the rule's floor
  hyper_checks: tuple[str, ...]  # the categories of rule.checks
  num_steps: int
  num_batches: int
  groups: tuple[Group, ...]
  params_treedef: Any
  leaf_names: tuple[str, ...]
  hparams_split: Any  # (treedef, is_float) of hparams' leaves
  batches_split: Any
  with_key: bool
  check_drift: bool
  on_drift: str
  unroll: int
  segment_steps: int | None
  offload_buffer: bool

  @property
  def learned_map(self) -> dict[str, bool]:
    return dict(zip(self.schedules.names, self.learned))


def train(
  loss_fn: Callable,
  params,
  hparams,
  batches,
  *,
  num_steps: int,
  rule: ReversibleRule | None = None,
  key=None,
  buffer_rows: int | None = None,
  return_state: bool = False,
  check_drift: bool = True,
  on_drift: str = "raise",
  unroll: int = 1,
  segment_steps: int | None = None,
  offload_buffer: bool = False,
  sharding=None,
  **hyperparameters: Callable,
):
  r"""Train with an exactly reversible rule; differentiable by reversal.

  Runs ``num_steps`` steps of ``rule`` (momentum SGD by default),

  .. math::

    g_t = \nabla_w L(w_t, \theta, b_{t \bmod B}), \quad
    v_{t+1} = \gamma_t v_t - (1 - \gamma_t) g_t, \quad
    w_{t+1} = w_t + \alpha_t v_{t+1}

  exactly (64-bit fixed point, information buffer) and returns the final
  params.  ``jax.grad`` through this function runs training backwards
  (Algorithm 2 of Maclaurin et al. 2015) instead of storing the trajectory.

  Args:
    loss_fn: ``loss_fn(params, hparams, batch) -> scalar`` (with ``key`` given:
      ``loss_fn(params, hparams, batch, key)``).  It must not close over traced
      values: pass them through ``hparams``.
    params: initial params (float leaves); differentiable (init scales).
    hparams: any pytree; differentiable where its leaves are floats.
    batches: pytree whose leaves share a leading axis ``B``; step ``t`` uses
      slice ``t % B``.  Differentiable where float (data distillation);
      integer leaves (labels) get no gradient.
    num_steps: ``T``, a positive int.
    rule: the :class:`revoptax.ReversibleRule` (default
      ``revoptax.MomentumSGDRule()``: hyperparameters ``learning_rate`` and
      ``momentum``), with its fixed-point format and options.
    key: optional PRNG key; step ``t`` passes ``jax.random.fold_in(key, t)`` to
      ``loss_fn`` so dropout and augmentation replay exactly backwards.
    buffer_rows: explicit buffer rows (32 bits per parameter each), overriding
      the capacity rule.
    return_state: also return the final optimizer state in floats, a dict
      ``{name: params-shaped tree}`` over ``rule.state_names`` (differentiable).
    check_drift: compare 32-bit fingerprints of each step's gradient, buffer
      heads and hyperparameter values between the forward and the backward
      pass, and check that the reversal ends at the initial state.
    on_drift: ``"raise"`` (default) or ``"nan"`` (warn and return NaN
      hypergradients).
    unroll: ``lax.scan`` unroll factor.
    segment_steps: ``K``: store the exact state every ``K`` steps and empty
      the buffer there, so the buffer holds ``K`` steps instead of ``T``;
      the backward pass re-runs each segment forward from its checkpoint to
      regenerate its rows, then reverses it (memory ``ceil(T / K)`` exact
      states plus ``K`` steps of buffer; time about one more forward pass;
      the same hypergradient bit for bit).  Default: one segment.
    offload_buffer: with ``segment_steps``, keep every finished segment's
      buffer rows (and its stored state) in host memory (JAX's ``Host``
      memory space) instead of re-running the segment: the backward pass
      streams each segment's rows back to the device before reversing it, so
      device memory holds one segment's buffer whatever ``T``.
    sharding: optional pytree with the structure of ``params`` holding a
      ``jax.sharding.NamedSharding`` (or None) per leaf.  A sharded leaf's
      exact state and buffer are sharded like it.  Needed only for leaves
      traced under ``jit`` with automatic mesh axes: explicit-axis shardings
      (``jax.make_mesh``'s default) and concrete sharded arrays are read
      from the leaves.
    **hyperparameters: one function ``(hparams, t) -> value`` per name in
      ``rule.hyperparameters``, evaluated at each step ``t`` (a traced int32)
      inside the loop.  A value is a scalar, an array broadcastable to every
      leaf, or a pytree that is a prefix of ``params`` (per layer or per
      leaf).  For momentum SGD, ``learning_rate`` (``alpha > 0``) and
      ``momentum`` (``gamma`` in (0, 1), quantized to ``n / 2**momentum_bits``;
      the straight-through gradient is returned).

  Returns:
    The final params (and the final optimizer state if ``return_state``).

  Raises:
    ValueError, TypeError: bad input, before the run.
    revoptax.ReversibilityError: a check failed (outside ``jit``; under
      ``jit``, and in the backward pass, a runtime error with its message).

  Example:
    >>> import jax, jax.numpy as jnp, revoptax
    >>> loss = lambda w, hp, x: jnp.sum((w - x) ** 2) * jnp.exp(hp["log_scale"])
    >>> def val_loss(hp):
    ...   w = revoptax.train(loss, jnp.zeros(2), hp, jnp.ones((1, 2)), num_steps=20,
    ...                      learning_rate=lambda hp, t: jnp.exp(hp["log_lr"]),
    ...                      momentum=lambda hp, t: 0.9)
    ...   return jnp.sum((w - 2.0) ** 2)
    >>> hp = {"log_lr": jnp.log(0.1), "log_scale": jnp.zeros(())}
    >>> grads = jax.grad(val_loss)(hp)
    >>> bool(grads["log_lr"] < 0)
    True

  References:
    Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
    through Reversible Learning", ICML 2015, https://arxiv.org/abs/1502.03492
  """
  rule = MomentumSGDRule() if rule is None else rule
  _check_options(rule, num_steps, on_drift, hyperparameters)
  segment_steps = _segment_option(segment_steps, num_steps)
  if offload_buffer and segment_steps is None and num_steps > 1:
    raise ValueError(
      f"{API}: offload_buffer moves each finished segment's buffer rows to host memory; pass "
      "segment_steps=K too (the rows of K steps stay on the device)."
    )
  hyperparameters = {
    **{n: _constant(v) for n, v in rule.defaults.items() if n not in hyperparameters},
    **hyperparameters,
  }
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError(f"{API}: params has no leaves.")
  names = tuple(_hyper.leaf_names(params))
  for leaf, name in zip(leaves, names):
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise TypeError(
        f"{API}: parameter {name} has dtype {jnp.asarray(leaf).dtype}; params must be "
        "float arrays (integers and other state belong in hparams or batches)."
      )
  shardings = _leaf_shardings(sharding, treedef, leaves, names)
  num_batches = _leading_axis(batches)
  _check_no_closure(loss_fn, params, hparams, batches, key)
  for name, fn in hyperparameters.items():
    _check_schedule_closure(name, fn, hparams)

  schedules = _hyper.train_schedules(hyperparameters, rule.hyperparameters, hparams, params, API)
  hyper_of = [tuple(index[i] for index in schedules.index) for i in range(len(leaves))]
  combos = sorted(set(hyper_of))
  per_steps = {
    name: (lambda ts, name=name: jax.vmap(lambda t: schedules.at_name(name, hparams, t))(ts))
    for name in schedules.names
  }
  combo_rows, learned = _hyper.plan(
    rule,
    per_steps,
    [dict(zip(schedules.names, c)) for c in combos],
    num_steps,
    API,
    segment_steps=segment_steps,
  )
  if buffer_rows is not None:
    rows = [int(buffer_rows)] * len(leaves)
  else:
    rows = [combo_rows[combos.index(h)] for h in hyper_of]

  h_float, h_other, h_split = _split(hparams)
  b_float, b_other, b_split = _split(batches)
  learned = tuple(learned[n] for n in schedules.names)
  probe = {n: jnp.float32(0.5) for n in schedules.names}
  hyper_checks = tuple(
    jax.eval_shape(lambda: rule.checks(probe, dict(zip(schedules.names, learned))))
  )
  config = _Config(
    loss_fn=FunctionKey(loss_fn),
    rule=rule,
    schedules=schedules,
    learned=learned,
    hyper_checks=hyper_checks,
    num_steps=int(num_steps),
    num_batches=num_batches,
    groups=group_leaves(
      leaves, [schedules.is_scalar(i) for i in range(len(leaves))], hyper_of, rows, shardings
    ),
    params_treedef=treedef,
    leaf_names=names,
    hparams_split=h_split,
    batches_split=b_split,
    with_key=key is not None,
    check_drift=check_drift,
    on_drift=on_drift,
    unroll=unroll,
    segment_steps=segment_steps,
    offload_buffer=bool(offload_buffer),
  )
  w_T, state_T, fails = _run_compiled(config, leaves, h_float, b_float, h_other, b_other, key)
  if any(isinstance(x, jax.core.Tracer) for x in fails.values()):
    _check_traced(fails, names)
  else:
    _errors.raise_on_failure(fails, names, API)
  w_T = jax.tree.unflatten(treedef, w_T)
  if return_state:
    return w_T, {n: jax.tree.unflatten(treedef, s) for n, s in zip(rule.state_names, state_T)}
  return w_T


# ----------------------------------------------------------------------------
# Input handling.


def _check_options(rule, num_steps, on_drift, hyperparameters):
  if not isinstance(rule, ReversibleRule):
    raise TypeError(f"{API}: rule must implement revoptax.ReversibleRule, got {rule!r}.")
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps <= 0:
    raise ValueError(f"{API}: num_steps must be a positive int, got {num_steps!r}.")
  if on_drift not in ("raise", "nan"):
    raise ValueError(f"{API}: on_drift must be 'raise' or 'nan', got {on_drift!r}.")
  expected = tuple(rule.hyperparameters)
  missing = [n for n in expected if n not in hyperparameters and n not in rule.defaults]
  unknown = [n for n in hyperparameters if n not in expected]
  if missing or unknown:
    raise TypeError(
      f"{API}: {type(rule).__name__} takes the hyperparameters {', '.join(expected)}, each a "
      f"function (hparams, t) -> value; missing: {missing or 'none'}, unknown: {unknown or 'none'}."
    )
  for name, fn in hyperparameters.items():
    if not callable(fn):
      raise TypeError(
        f"{API}: {name} must be a callable (hparams, t) -> value, got {fn!r}; "
        f"for a constant write {name}=lambda hp, t: {fn!r}."
      )


def _leaf_shardings(sharding, treedef, leaves, names) -> list:
  """Per leaf, the sharding its exact state follows (None: replicated)."""
  if sharding is None:
    return [_sharding.of_leaf(leaf) for leaf in leaves]
  is_none = lambda x: x is None  # noqa: E731
  given, structure = jax.tree.flatten(sharding, is_leaf=is_none)
  one_per_leaf = jax.tree.unflatten(treedef, [None] * treedef.num_leaves)
  if structure != jax.tree.structure(one_per_leaf, is_leaf=is_none):
    raise ValueError(
      f"{API}: sharding must have the structure of params (one NamedSharding or None per "
      f"leaf), got {structure} for params {treedef}."
    )
  return [_sharding.check(s, leaf, name, API) for s, leaf, name in zip(given, leaves, names)]


def _segment_option(segment_steps, num_steps) -> int | None:
  """``segment_steps`` checked; None for a single segment."""
  if segment_steps is None:
    return None
  if (
    not isinstance(segment_steps, (int, np.integer))
    or isinstance(segment_steps, bool)
    or segment_steps <= 0
  ):
    raise ValueError(
      f"{API}: segment_steps must be a positive int (steps between stored exact states) or "
      f"None, got {segment_steps!r}."
    )
  return None if segment_steps >= num_steps else int(segment_steps)


def _constant(value):
  """The schedule ``(hparams, t) -> value`` of a rule's default."""
  return lambda hparams, t: value


def _leading_axis(batches) -> int:
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError(f"{API}: batches has no leaves; pass at least one array.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes:
    raise ValueError(f"{API}: every batches leaf needs a leading batch-index axis.")
  if len(sizes) != 1:
    paths = [
      f"{jax.tree_util.keystr(p)}: {np.shape(x)[0]}"
      for p, x in jax.tree_util.tree_flatten_with_path(batches)[0]
    ]
    raise ValueError(
      f"{API}: batches leaves must share the leading axis (step t uses slice t % B); "
      f"got {', '.join(paths)}."
    )
  return sizes.pop()


def _split(tree):
  """Split a pytree into float leaves (differentiable) and the others."""
  leaves, treedef = jax.tree.flatten(tree)
  is_float = tuple(bool(jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)) for x in leaves)
  floats = [x for x, f in zip(leaves, is_float) if f]
  others = [x for x, f in zip(leaves, is_float) if not f]
  return floats, others, (treedef, is_float)


def _merge(floats, others, split):
  treedef, is_float = split
  fi, oi = iter(floats), iter(others)
  return treedef.unflatten([next(fi) if f else next(oi) for f in is_float])


def _closes_over_tracer(fn, *args) -> bool:
  try:
    _, consts = jax.closure_convert(fn, *args)
  except Exception:
    return False  # let the real call report problems with fn itself
  return any(isinstance(c, jax.core.Tracer) for c in consts)


def _check_no_closure(loss_fn, params, hparams, batches, key):
  batch0 = jax.tree.map(lambda x: x[0], batches)
  args = (params, hparams, batch0) + (() if key is None else (key,))
  if _closes_over_tracer(loss_fn, *args):
    raise ValueError(
      f"{API}: loss_fn closes over a traced value (for example a hyperparameter being "
      "differentiated, or an array under jit/vmap). Gradients cannot flow through "
      "closed-over values of a reversed training run: pass such values through the "
      "`hparams` argument instead, e.g. loss_fn(params, hparams, batch) using "
      "hparams['weight_decay']."
    )


def _check_schedule_closure(name, fn, hparams):
  if _closes_over_tracer(fn, hparams, jnp.zeros((), jnp.int32)):
    raise ValueError(
      f"{API}: {name} closes over a traced value; it is evaluated at every step inside the "
      "reversed loop, where gradients reach only what it reads from hparams: pass the value "
      f"through hparams, e.g. {name}=lambda hp, t: jnp.exp(hp['log_{name}'])."
    )


# ----------------------------------------------------------------------------
# The loop pieces shared by both passes.


def _grad_fn(config: _Config, h_other, b_other):
  def grad(params, h_float, batch_float, batch_other, key):
    hparams = _merge(h_float, h_other, config.hparams_split)
    batch = _merge(batch_float, batch_other, config.batches_split)
    p = jax.tree.unflatten(config.params_treedef, params)
    args = (p, hparams, batch) + ((key,) if config.with_key else ())
    return jax.tree.leaves(isolated(jax.grad(config.loss_fn))(*args))

  return grad


def _hyper_fn(config: _Config, h_other):
  """``(h_float, t) -> values``: every hyperparameter's distinct values at step t."""
  return lambda h_float, t: config.schedules.at(_merge(h_float, h_other, config.hparams_split), t)


def _group_hp(config: _Config, values, group: Group) -> dict:
  return config.schedules.group_values(values, group.hyper)


def _values_print(values) -> jax.Array:
  return fingerprint_all(jax.tree.leaves(values))


def _slice(leaves, index):
  return [lax.dynamic_index_in_dim(x, index, 0, keepdims=False) for x in leaves]


def _batch(config: _Config, b_float, b_other, t):
  b_t = t % config.num_batches
  return b_t, _slice(b_float, b_t), _slice(b_other, b_t)


def _step_key(config, key, t):
  return jax.random.fold_in(key, t) if config.with_key else None


def _unpack_all(config, xs) -> list:
  """Leaves in params order from one value per group."""
  return unpack_groups(config.groups, xs, len(config.leaf_names))


def _constrained(config: _Config, states) -> list:
  """The groups' states, each sharded like its leaf where that is sharded."""
  return [_sharding.constrain(s, g.sharding, g.shapes[0]) for s, g in zip(states, config.groups)]


def _params(config: _Config, states) -> list:
  """The float params (leaves, params order) of the groups' exact weights.

  Each group's floats are materialized whole before being sliced into leaves
  (see :mod:`revoptax._fusion`): a slice fused with the conversion is costed
  by XLA:CPU as the whole group's work and split over its thread pool.
  """
  flat = []
  for state, group in zip(states, config.groups):
    x = config.rule.params(state, group.dtype)
    flat.append(materialize(x) if len(group.leaves) > 1 else x)
  return _unpack_all(config, flat)


# ----------------------------------------------------------------------------
# Forward.


def _first(codes, flag, t):
  """``codes`` with step ``t`` recorded where ``flag`` is set for the first time."""
  return jnp.where((codes < 0) & flag, t, codes).astype(jnp.int32)


def _fresh_codes(config: _Config, states):
  """Per group: the first step of each hyperparameter check and of a full buffer; per
  element: ``2 t + 1`` for a non-finite gradient first seen at step t, ``2 t`` for an
  overflow (reduced once after the loop, not every step)."""
  scalar_codes = {c: [jnp.int32(-1)] * len(states) for c in config.hyper_checks + ("buffer",)}
  element_codes = [
    _sharding.constrain(jnp.full(s.buffer.head_lo.shape, -1, jnp.int32), g.sharding, g.shapes[0])
    for s, g in zip(states, config.groups)
  ]
  return scalar_codes, element_codes


def _forward_body(config: _Config, h_float, b_float, h_other, b_other, key):
  """``body(carry, t) -> (carry, prints)``: exact step ``t`` of every group, with its checks.

  Carry: ``(states, p_t, scalar_codes, element_codes)``.  The params each
  gradient sees are carried from the previous iteration in both passes: a
  loop-carried buffer, never fused with the step's arithmetic, so XLA compiles
  the gradient the same way forward and backward (measured: fused in, a
  reduction inside the gradient changed its last bit).
  """
  rule = config.rule
  grad = _grad_fn(config, h_other, b_other)
  hyper = _hyper_fn(config, h_other)
  learned = config.learned_map

  def body(carry, t):
    states, p_t, scalar_codes, element_codes = carry
    _, batch_f, batch_o = _batch(config, b_float, b_other, t)
    g = grad(p_t, h_float, batch_f, batch_o, _step_key(config, key, t))
    g = [group.pack(g) for group in config.groups]
    values = hyper(h_float, t)
    new_states, new_scalar, new_element = [], {c: [] for c in scalar_codes}, []
    for i, (group, state, g_i) in enumerate(zip(config.groups, states, g)):
      hp = _group_hp(config, values, group)
      state, flags = rule.step(state, g_i, hp, t)
      checks = {**rule.checks(hp, learned), "buffer": flags.buffer}
      for c in new_scalar:
        new_scalar[c].append(_first(scalar_codes[c][i], checks[c], t))
      code = (2 * t + flags.nonfinite).astype(jnp.int32)
      bad = element_codes[i]
      new_element.append(jnp.where((bad < 0) & (flags.nonfinite | flags.range), code, bad))
      new_states.append(state)
    new_states = _constrained(config, new_states)
    prints = None
    if config.check_drift:
      prints = jnp.stack(
        [fingerprint_all(g), _reverse.heads_print(new_states), _values_print(values)]
      )
    return (new_states, _params(config, new_states), new_scalar, new_element), prints

  return body


def _forward(config: _Config, params, h_float, b_float, h_other, b_other, key):
  rule = config.rule
  states, oks = zip(*(rule.init(g.pack(params), g.rows) for g in config.groups))
  states = _constrained(config, states)
  init_ok = [jnp.all(ok) for ok in _unpack_all(config, oks)]
  body = _forward_body(config, h_float, b_float, h_other, b_other, key)
  init = (list(states), _params(config, states), *_fresh_codes(config, states))
  if config.segment_steps is None:
    carry, prints = lax.scan(body, init, jnp.arange(config.num_steps), unroll=config.unroll)
    checkpoints = None
  else:
    carry, prints, checkpoints = _forward_segments(config, body, init)
  states, _, scalar_codes, element_codes = carry
  return states, prints, checkpoints, _failures(config, init_ok, scalar_codes, element_codes)


# ----------------------------------------------------------------------------
# Segments (the bookkeeping is in revoptax._segments).


def _forward_segments(config: _Config, body, carry):
  """The forward loop in segments: ``(carry, prints, (checkpoints, last_checkpoint))``.

  All segments but the last have ``segment_steps`` steps, run by one outer
  scan whose outputs are their checkpoints (stacked); the last one, of
  ``1 .. segment_steps`` steps, keeps its rows for the backward pass.
  """
  starts, length = _segments.starts(config.num_steps, config.segment_steps), config.segment_steps

  def segment(carry, start):
    states, checkpoint = _segments.begin(carry[0])
    carry, prints = lax.scan(
      body, (states, *carry[1:]), start + jnp.arange(length), unroll=config.unroll
    )
    if not config.offload_buffer:
      return carry, (checkpoint, prints)
    return carry, (
      _segments.to_memory(checkpoint, _segments.HOST),
      prints,
      _segments.to_memory(_segments.rows(carry[0]), _segments.HOST),
    )

  prints, checkpoints = [], None
  if len(starts) > 1:
    carry, (checkpoints, full_prints, *rows) = lax.scan(segment, carry, jnp.asarray(starts[:-1]))
    checkpoints = (checkpoints, *rows)
    prints.append(full_prints)
  states, last_checkpoint = _segments.begin(carry[0])
  carry, last_prints = lax.scan(
    body,
    (states, *carry[1:]),
    jnp.arange(starts[-1], config.num_steps),
    unroll=config.unroll,
  )
  if config.check_drift:
    prints = jnp.concatenate([p.reshape(-1, p.shape[-1]) for p in prints] + [last_prints])
  else:
    prints = None
  return carry, prints, (checkpoints, last_checkpoint)


def _failures(config: _Config, init_ok, scalar_codes, element_codes) -> dict:
  """Per check, ``int32[leaves]``: the first failing step of each leaf, or -1.

  In the order they are reported: the hyperparameter checks (a bad value
  before what it causes), then the gradient, the range and the buffer.
  """
  big = jnp.iinfo(jnp.int32).max

  def first(codes, kind):
    hit = (codes >= 0) & ((codes & 1) == kind)
    step = jnp.min(jnp.where(hit, codes >> 1, big))
    return jnp.where(step == big, -1, step)

  num_leaves = len(config.leaf_names)
  fails = {c: [None] * num_leaves for c in config.hyper_checks + _ELEMENT_CHECKS}
  for g, group in enumerate(config.groups):
    for i, codes in zip(group.leaves, group.unpack(element_codes[g])):
      for c in config.hyper_checks + ("buffer",):
        fails[c][i] = scalar_codes[c][g]
      fails["nonfinite"][i] = first(codes, 1)
      fails["range"][i] = jnp.where(init_ok[i], first(codes, 0), 0)
  return {c: jnp.stack(v).astype(jnp.int32) for c, v in fails.items()}


# ----------------------------------------------------------------------------
# The custom VJP.


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(config, params, h_float, b_float, h_other, b_other, key):
  states, _, _, fails = _forward(config, params, h_float, b_float, h_other, b_other, key)
  return _outputs(config, states) + (fails,)


_run_compiled = jax.jit(_run, static_argnums=(0,))


@partial(jax.jit, static_argnums=(1,))
def _check_traced(fails, names):
  """The forward checks on traced codes (under ``jit``, ``grad`` or ``vmap``), compiled once
  per set of leaf names and shapes."""
  _errors.raise_on_failure(fails, names, API)


def _outputs(config: _Config, states):
  floats = [config.rule.float_state(s, g.dtype) for s, g in zip(states, config.groups)]
  per_name = [
    _unpack_all(config, [f[k] for f in floats]) for k in range(len(config.rule.state_names))
  ]
  return _params(config, states), per_name


def _is_primal(x):
  return isinstance(x, CustomVJPPrimal)


def _run_fwd(config, *args):
  # symbolic_zeros=True: every argument leaf arrives as CustomVJPPrimal(value,
  # perturbed). Cotangents are only computed for hparams and batches that are
  # being differentiated (usually not the training data, whose cotangent costs
  # a matmul and a read-modify-write of the data array per step).
  values = jax.tree.map(lambda x: x.value, args, is_leaf=_is_primal)
  perturbed = jax.tree.map(lambda x: x.perturbed, args, is_leaf=_is_primal)
  params, h_float, b_float, h_other, b_other, key = values
  states, prints, checkpoints, fails = _forward(
    config, params, h_float, b_float, h_other, b_other, key
  )
  # Which cotangents are needed is static: encode it in the residuals' structure.
  needs = tuple((None,) if any(jax.tree.leaves(perturbed[i])) else () for i in (1, 2))
  residuals = (states, prints, checkpoints, params, h_float, b_float, h_other, b_other, key)
  return _outputs(config, states) + (fails,), (residuals, needs)


def _dense(cotangent, dtype):
  if isinstance(cotangent, SymbolicZero):
    return jnp.zeros(cotangent.shape, dtype)
  return jnp.asarray(cotangent, dtype)


def _run_bwd(config: _Config, saved, cotangents):
  residuals, (need_h, need_b) = saved
  states, prints, checkpoints, params0, h_float, b_float, h_other, b_other, key = residuals
  need_h, need_b = bool(need_h), bool(need_b)
  groups = config.groups
  d_w, d_opt, _ = cotangents
  d_w = [g.pack([_dense(x, _compute_dtype(p.dtype)) for x, p in zip(d_w, params0)]) for g in groups]
  d_opt = tuple(
    tuple(g.pack([_dense(x, _compute_dtype(p.dtype)) for x, p in zip(d, params0)]) for d in d_opt)
    for g in groups
  )
  d_w = _constrained(config, d_w)
  d_opt = tuple(_constrained(config, d_opt))
  d_h = [jnp.zeros_like(x) for x in h_float] if need_h else []
  d_b = [jnp.zeros_like(x) for x in b_float] if need_b else []
  # Per check, the first step (from the end) that failed: the hyperparameter
  # values, the recomputed gradient, the undone buffer heads.
  drift0 = jnp.full((3,), -1, jnp.int32)
  body = _reverse_body(config, prints, need_h, need_b, h_float, b_float, h_other, b_other, key)
  hyper = _hyper_fn(config, h_other)

  def begin(states, last):
    """The loop carry's exact part for a segment whose last step is ``last``."""
    values = hyper(h_float, last)
    states = _constrained(config, _undo_params(config, states, values, last))
    return states, _params(config, states), values

  grads = (d_w, d_opt, d_h, d_b, drift0)
  if config.segment_steps is None:
    carry = (*begin(states, config.num_steps - 1), *grads)
    ts = jnp.arange(config.num_steps)
    carry, _ = lax.scan(body, carry, (ts, jnp.zeros_like(ts)), reverse=True, unroll=config.unroll)
    segment_codes = None
  else:
    carry, segment_codes = _reverse_segments(
      config,
      body,
      begin,
      states,
      checkpoints,
      prints,
      grads,
      (h_float, b_float, h_other, b_other, key),
    )
  states, _, _, d_w, _, d_h, d_b, drift = carry
  failed = _check_reversal(config, states, params0, drift, segment_codes)

  def poison(x):
    return jnp.where(failed, jnp.full_like(x, jnp.nan), x)

  d_params = [poison(x.astype(p.dtype)) for x, p in zip(_unpack_all(config, d_w), params0)]
  return (
    d_params,
    [poison(x) for x in d_h] if need_h else [None for _ in h_float],
    [poison(x) for x in d_b] if need_b else [None for _ in b_float],
    [None for _ in h_other],
    [None for _ in b_other],
    None,
  )


def _undo_params(config: _Config, states, values, t):
  return [
    _reverse.undo_params(config.rule, s, _group_hp(config, values, g), t, g.dtype)
    for s, g in zip(states, config.groups)
  ]


def _reverse_body(config: _Config, prints, need_h, need_b, h_float, b_float, h_other, b_other, key):
  """``body(carry, (t, first)) -> (carry, None)``: undo step ``t`` and add its VJP.

  Carry: ``(states, p_t, h_t, d_w, d_opt, d_h, d_b, drift)``, the exact state
  with ``w`` already at step ``t``, the params ``p_t`` (see
  :func:`_forward_body` on why they are loop-carried) and the values ``h_t``
  used to undo ``w_{t+1}`` (each exact quantity is computed once per pass).
  The weights of step ``t - 1`` are undone unless ``t`` is ``first``, the
  first step of its segment.
  """
  rule, groups = config.rule, config.groups
  grad = _grad_fn(config, h_other, b_other)
  hyper = _hyper_fn(config, h_other)
  if config.check_drift:
    fresh_heads = _reverse.buffers_print(
      [buffer_lib.init((g.size,) if g.flat else g.shapes[0], 0) for g in groups]
    )

  def body(carry, xs):
    t, first = xs
    states, p_t, values, d_w, d_opt, d_h, d_b, drift = carry
    b_t, batch_f, batch_o = _batch(config, b_float, b_other, t)
    key_t = _step_key(config, key, t)
    g, hvp = jax.vjp(
      lambda p, h, bf: grad(p, h if need_h else h_float, bf if need_b else batch_f, batch_o, key_t),
      p_t,
      h_float if need_h else [],
      batch_f if need_b else [],
    )
    g = [group.pack(g) for group in groups]
    states = _constrained(
      config,
      [
        _reverse.undo_state(rule, s, g_i, _group_hp(config, values, group), t)
        for s, g_i, group in zip(states, g, groups)
      ],
    )
    if config.check_drift:
      heads_before = jnp.where(t > 0, prints[jnp.maximum(t - 1, 0), 1], fresh_heads)
      differs = jnp.stack(
        [
          _values_print(values) != prints[t, 2],
          fingerprint_all(g) != prints[t, 0],
          _reverse.heads_print(states) != heads_before,
        ]
      )
      drift = first_drift(drift, differs, t)
    d_values = jax.tree.map(jnp.zeros_like, values)
    new_d_w, new_d_opt, d_g = [], [], []
    for s, g_i, group, dw, dopt in zip(states, g, groups, d_w, d_opt):
      hp = _group_hp(config, values, group)
      dw, dopt, dg, dhp = _reverse.step_vjp(rule, s, g_i, hp, t, (dw, dopt), group.dtype)
      new_d_w.append(dw)
      new_d_opt.append(tuple(dopt))
      d_g.append(dg.astype(g_i.dtype))
      for k, name in enumerate(config.schedules.names):
        j = group.hyper[k]
        d_values[k][j] = d_values[k][j] + jnp.reshape(dhp[name], d_values[k][j].shape)
    if need_h:
      _, hyper_vjp = jax.vjp(lambda h: hyper(h, t), h_float)
      (dh_schedule,) = hyper_vjp(d_values)
      d_h = [x + y for x, y in zip(d_h, dh_schedule)]
    dp_hvp, dh_hvp, db_hvp = hvp(_unpack_all(config, d_g))
    d_w = [x + group.pack(dp_hvp).astype(x.dtype) for x, group in zip(new_d_w, groups)]
    d_h = [x + y for x, y in zip(d_h, dh_hvp)]
    d_b = [
      lax.dynamic_update_index_in_dim(x, lax.dynamic_index_in_dim(x, b_t, 0, False) + y, b_t, 0)
      for x, y in zip(d_b, db_hvp)
    ]
    # Undo the weight update of step t - 1 (none before the segment's first step).
    earlier_values = hyper(h_float, jnp.maximum(t - 1, 0))
    earlier = _undo_params(config, states, earlier_values, jnp.maximum(t - 1, 0))
    states = _constrained(config, [_select(t > first, e, s) for s, e in zip(states, earlier)])
    carry = (
      states,
      _params(config, states),
      earlier_values,
      d_w,
      tuple(new_d_opt),
      d_h,
      d_b,
      drift,
    )
    return carry, None

  return body


def _reverse_segments(config: _Config, body, begin, states, checkpoints, prints, grads, inputs):
  """The backward loop in segments: ``(carry, segment_codes)``.

  The last segment is reversed from the forward pass's final state (its rows
  are still there); every earlier one is first re-run forward from its
  checkpoint, regenerating its rows, then reversed.  Each reversal must end
  at the segment's checkpoint: ``segment_codes`` holds, per group, the start
  of the latest segment where it did not (or -1).
  """
  full_checkpoints, last_checkpoint = checkpoints
  full_checkpoints, *full_rows = (None,) if full_checkpoints is None else full_checkpoints
  starts, length = _segments.starts(config.num_steps, config.segment_steps), config.segment_steps
  forward = _forward_body(config, *inputs)

  def reverse(carry, start, steps):
    ts = start + jnp.arange(steps)
    return lax.scan(
      body, carry, (ts, jnp.full_like(ts, start)), reverse=True, unroll=config.unroll
    )[0]

  def check(codes, states, checkpoint, start):
    same = [_segments.same_state(s, c) for s, c in zip(states, checkpoint)]
    return [jnp.where((code < 0) & ~ok, start, code) for code, ok in zip(codes, same)]

  carry = (*begin(states, config.num_steps - 1), *grads)
  carry = reverse(carry, int(starts[-1]), config.num_steps - int(starts[-1]))
  codes = check([jnp.int32(-1)] * len(states), carry[0], last_checkpoint, int(starts[-1]))
  if len(starts) == 1:
    return carry, codes

  def segment(scan_carry, xs):
    carry, codes = scan_carry
    start, checkpoint, *rows = xs
    if config.offload_buffer:
      # The segment's rows back from host memory; the rest of the state is where the
      # reversal of the next segment left it.
      checkpoint = _segments.to_memory(checkpoint, _segments.DEVICE)
      ending = _constrained(
        config, _segments.with_rows(carry[0], _segments.to_memory(rows[0], _segments.DEVICE))
      )
    else:
      rerun = _constrained(config, _segments.restore(carry[0], checkpoint))
      rerun = (rerun, _params(config, rerun), *_fresh_codes(config, rerun))
      rerun, rerun_prints = lax.scan(
        forward, rerun, start + jnp.arange(length), unroll=config.unroll
      )
      ending = rerun[0]
    carry = (*begin(ending, start + length - 1), *carry[3:])
    if config.check_drift and not config.offload_buffer:
      carry = (*carry[:7], _segments.rerun_drift(carry[7], rerun_prints, prints, start))
    carry = reverse(carry, start, length)
    return (carry, check(codes, carry[0], checkpoint, start)), None

  (carry, codes), _ = lax.scan(
    segment,
    (carry, codes),
    (jnp.asarray(starts[:-1]), full_checkpoints, *full_rows),
    reverse=True,
  )
  return carry, codes


def _select(pred, new, old):
  """``new`` where ``pred`` else ``old``, field by field; the stack is ``new``'s (undoing
  the weights leaves popped rows in place, so it is the same array)."""

  def no_stack(s):
    return s._replace(buffer=s.buffer._replace(stack=None))

  chosen = jax.tree.map(lambda a, b: jnp.where(pred, a, b), no_stack(new), no_stack(old))
  return chosen._replace(buffer=chosen.buffer._replace(stack=new.buffer.stack))


def _check_reversal(config: _Config, states, params0, drift, segment_codes) -> jax.Array:
  """Report drift and a reversal that did not end at the initial state; whether either."""
  if not config.check_drift:
    return jnp.zeros((), bool)
  # The latest step (the first one undone) that failed names the cause; at the
  # same step, the hyperparameter values, then the gradient (a changed value
  # also changes the gradient and the heads undone after it).
  latest = jnp.max(drift)
  first_kind = jnp.argmax(drift == latest)
  codes = {
    kind: jnp.where((first_kind == k) & (latest >= 0), latest, -1)[None]
    for k, kind in enumerate(("hyper_drift", "drift_step", "buffer_corrupt"))
  }
  if segment_codes is not None:
    per_leaf = [None] * len(params0)
    for code, group in zip(segment_codes, config.groups):
      for i in group.leaves:
        per_leaf[i] = code
    codes["segment_start"] = jnp.stack(per_leaf)
  initial = [None] * len(params0)
  for state, group in zip(states, config.groups):
    fresh, _ = config.rule.init(group.pack(params0), state.buffer.stack.shape[0])
    fresh = _sharding.constrain(fresh, group.sharding, group.shapes[0])
    same = _same_start(state, fresh)
    for i in group.leaves:
      initial[i] = ~same
  codes["initial"] = jnp.stack(initial)
  failed = jnp.any(drift >= 0) | jnp.any(codes["initial"])
  if segment_codes is not None:
    failed = failed | jnp.any(codes["segment_start"] >= 0)
  on_failure = None
  if config.on_drift == "nan":
    on_failure = lambda msg: warnings.warn(msg + " Returning NaN hypergradients.", stacklevel=2)
  _errors.raise_on_failure(codes, config.leaf_names, API, on_failure=on_failure)
  return failed


def _same_start(state, fresh) -> jax.Array:
  """Whether a reversed state equals the initial one (popped rows are free space)."""
  same = jnp.asarray(state.buffer.size == 0)
  for a, b in zip(
    jax.tree.leaves(state._replace(buffer=None)), jax.tree.leaves(fresh._replace(buffer=None))
  ):
    same = same & jnp.all(a == b)
  same = same & jnp.all(state.buffer.head_hi == fresh.buffer.head_hi)
  return same & jnp.all(state.buffer.head_lo == fresh.buffer.head_lo)


_run.defvjp(_run_fwd, _run_bwd, symbolic_zeros=True)
