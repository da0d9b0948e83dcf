"""``revoptax.train``: a training run whose VJP runs training backwards exactly.

Forward: ``num_steps`` exact momentum-SGD steps (see :mod:`revoptax._sgd`),
keeping only the final exact state, the information buffer and two 32-bit
fingerprints per step (of the gradient and of the buffer heads, all leaves).
Backward (Maclaurin et al. 2015, Algorithm 2), for ``t = T-1 .. 0``::

    w_t  = w_{t+1} - Q(alpha_t F(v_{t+1}))                 exact
    g_t, hvp = jax.vjp(grad_w L, F(w_t), hparams, batch_t)  recomputed gradient
    v_t  = (v_{t+1} + Q((1 - gamma_t) g_t)) / gamma_t       exact, pops the buffer
    (dw, dv, dg, dalpha_t, dgamma_t) = vjp of the float step at (w_t, v_t, g_t)
    (dw, dhparams, dbatch_t) += hvp(dg)

which is Algorithm 2 written as the vector-Jacobian product of one float step,
so that other reversible optimizers reuse the same loop.  Memory does not grow
with ``T`` apart from the buffer (``log2(1/gamma)`` bits per parameter per
step), the fingerprints and the ``[T]`` schedules.
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
from revoptax import _errors
from revoptax._determinism import fingerprint_all, isolated
from revoptax._fixed_point import FixedPointFormat, _compute_dtype
from revoptax._fusion import materialize
from revoptax._packing import Group, group_leaves, unpack_groups
from revoptax._sgd import (
  MomentumSGDRule,
  leaf_names,
  per_leaf,
  validate_learning_rate,
  validate_momentum,
)
from revoptax._sgd import buffer_rows as _rows_for

API = "revoptax.train"


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) description of one training run."""

  loss_fn: Callable
  rule: MomentumSGDRule
  num_steps: int
  num_batches: int
  groups: tuple[Group, ...]
  params_treedef: Any
  leaf_names: tuple[str, ...]
  hparams_int: Any  # (treedef, mask) split of hparams into float / other leaves
  batches_int: Any
  with_key: bool
  return_velocity: bool
  check_drift: bool
  on_drift: str
  unroll: int

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def _unpack_all(config, xs) -> list:
  """Leaves in params order from one value per group."""
  return unpack_groups(config.groups, xs, len(config.leaf_names))


def train(
  loss_fn: Callable,
  params,
  hparams,
  batches,
  *,
  num_steps: int,
  learning_rate: Callable,
  momentum: Callable,
  key=None,
  radix_bits: int = 46,
  int_bits: int = 16,
  momentum_bits: int = 16,
  momentum_floor: float | None = None,
  buffer_rows: int | None = None,
  return_velocity: bool = False,
  check_drift: bool = True,
  on_drift: str = "raise",
  unroll: int = 1,
):
  r"""Train with exactly reversible momentum SGD; differentiable by reversal.

  Runs, for ``t = 0 .. num_steps - 1``,

  .. math::

    g_t = \nabla_w L(w_t, \theta, b_{t \bmod B}), \quad
    v_{t+1} = \gamma_t v_t - (1 - \gamma_t) g_t, \quad
    w_{t+1} = w_t + \alpha_t v_{t+1}

  exactly (64-bit fixed point, information buffer) and returns the final
  params.  ``jax.grad`` through this function runs training backwards
  (Algorithm 2 of Maclaurin et al. 2015) instead of storing the trajectory.
  Leaves with the same dtype and scalar (per-step) schedules are trained as
  one flat exact state, which changes no value (only how XLA loops over them).

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
    learning_rate: ``(hparams, t) -> alpha_t``: a scalar or a pytree matching
      ``params`` (per-leaf values, each broadcastable to its leaf).
    momentum: ``(hparams, t) -> gamma_t`` in (0, 1), same forms.  Quantized to
      ``n / 2**momentum_bits`` (the straight-through gradient is returned).
    key: optional PRNG key; step ``t`` passes ``jax.random.fold_in(key, t)`` to
      ``loss_fn`` so dropout and augmentation replay exactly backwards.
    radix_bits, int_bits: fixed-point format (resolution ``2**-radix_bits``,
      range ``|w|, |v| < 2**int_bits``).
    momentum_bits: precision of the momentum (8 to 16).
    momentum_floor: smallest momentum the schedule will use; sets the buffer
      capacity when the momenta are traced (default: exact when concrete,
      else 0.5).  Exceeding the capacity raises an error.
    buffer_rows: explicit buffer rows (32 bits per parameter each), overriding
      the capacity rule.
    return_velocity: also return the final velocity ``v_T``.
    check_drift: compare 32-bit fingerprints of each step's gradient and of
      the buffer heads after it between the forward and the backward pass, and
      check that the reversal ends at the initial state.
    on_drift: ``"raise"`` (default) or ``"nan"`` (warn and return NaN
      hypergradients).
    unroll: ``lax.scan`` unroll factor.

  Returns:
    The final params (and final velocity if ``return_velocity``).

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
  if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps <= 0:
    raise ValueError(f"{API}: num_steps must be a positive int, got {num_steps!r}.")
  if on_drift not in ("raise", "nan"):
    raise ValueError(f"{API}: on_drift must be 'raise' or 'nan', got {on_drift!r}.")
  if not callable(learning_rate) or not callable(momentum):
    raise TypeError(
      f"{API}: learning_rate and momentum must be callables (hparams, t) -> value; "
      "for a constant use e.g. learning_rate=lambda hp, t: 0.1."
    )
  rule = MomentumSGDRule(FixedPointFormat(radix_bits, int_bits), momentum_bits)
  leaves, treedef = jax.tree.flatten(params)
  if not leaves:
    raise ValueError(f"{API}: params has no leaves.")
  names = tuple(leaf_names(params))
  for leaf, name in zip(leaves, names):
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise TypeError(
        f"{API}: parameter {name} has dtype {jnp.asarray(leaf).dtype}; params must be "
        "float arrays (integers and other state belong in hparams or batches)."
      )
  num_batches = _leading_axis(batches)

  ts = jnp.arange(num_steps)
  alphas = _schedule(learning_rate, hparams, ts, params, "learning_rate")
  gammas = _schedule(momentum, hparams, ts, params, "momentum")
  if not any(isinstance(a, jax.core.Tracer) for a in alphas):
    for a in alphas:
      validate_learning_rate(np.asarray(a), API)
  concrete_gammas = [None if isinstance(g, jax.core.Tracer) else np.asarray(g) for g in gammas]
  for g in concrete_gammas:
    validate_momentum(g, API)
  if buffer_rows is not None:
    rows = (int(buffer_rows),) * len(leaves)
  else:
    rows = tuple(_rows_for(rule, g, num_steps, momentum_floor) for g in concrete_gammas)

  _check_no_closure(loss_fn, params, hparams, batches, key)
  h_float, h_other, h_split = _split(hparams)
  b_float, b_other, b_split = _split(batches)
  # A schedule shared by several leaves is passed (and its cotangent returned) once.
  alphas, alpha_of = _unique(alphas)
  gammas, gamma_of = _unique(gammas)
  config = _Config(
    loss_fn=loss_fn,
    rule=rule,
    num_steps=num_steps,
    num_batches=num_batches,
    groups=group_leaves(
      leaves,
      [alphas[a].ndim == 1 and gammas[m].ndim == 1 for a, m in zip(alpha_of, gamma_of)],
      alpha_of,
      gamma_of,
      rows,
    ),
    params_treedef=treedef,
    leaf_names=names,
    hparams_int=h_split,
    batches_int=b_split,
    with_key=key is not None,
    return_velocity=return_velocity,
    check_drift=check_drift,
    on_drift=on_drift,
    unroll=unroll,
  )
  w_T, v_T = _run(config, leaves, alphas, gammas, h_float, b_float, h_other, b_other, key)
  w_T = jax.tree.unflatten(treedef, w_T)
  if return_velocity:
    return w_T, jax.tree.unflatten(treedef, v_T)
  return w_T


# ----------------------------------------------------------------------------
# Input handling.


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


def _schedule(fn, hparams, ts, params, what):
  """Per-leaf ``[T, ...]`` schedule arrays from ``fn(hparams, t)``."""
  values = jax.vmap(lambda t: fn(hparams, t))(ts)
  try:
    # A schedule value may be a prefix of params (one value per layer).
    values = per_leaf(values, params)
  except ValueError as e:
    raise ValueError(
      f"{API}: {what}(hparams, t) must return a scalar or a pytree matching params; {e}"
    ) from None
  out, converted = [], {}  # a value shared by several leaves is converted once (kept shared)
  for v, p, name in zip(values, jax.tree.leaves(params), leaf_names(params)):
    if id(v) not in converted:
      x = jnp.asarray(v)
      if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
      converted[id(v)] = (v, x)  # v kept alive so its id is not reused
    v = converted[id(v)][1]
    try:
      np.broadcast_shapes(v.shape[1:], np.shape(p))
    except ValueError:
      raise ValueError(
        f"{API}: {what}(hparams, t) for leaf {name} has shape {v.shape[1:]}, which does not "
        f"broadcast to the leaf's shape {np.shape(p)}."
      ) from None
    if v.ndim - 1 > np.ndim(p):
      raise ValueError(
        f"{API}: {what}(hparams, t) for leaf {name} has shape {v.shape[1:]}, more dims than "
        f"the leaf {np.shape(p)}."
      )
    out.append(v)
  return out


def _unique(values):
  """Distinct arrays of ``values`` (by identity) and each value's index among them."""
  distinct, index = [], []
  for v in values:
    j = next((j for j, d in enumerate(distinct) if d is v), None)
    if j is None:
      j = len(distinct)
      distinct.append(v)
    index.append(j)
  return distinct, tuple(index)


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


def _check_no_closure(loss_fn, params, hparams, batches, key):
  batch0 = jax.tree.map(lambda x: x[0], batches)
  args = (params, hparams, batch0) + (() if key is None else (key,))
  try:
    _, consts = jax.closure_convert(loss_fn, *args)
  except Exception:
    return  # let the real call report problems with loss_fn itself
  if any(isinstance(c, jax.core.Tracer) for c in consts):
    raise ValueError(
      f"{API}: loss_fn closes over a traced value (for example a hyperparameter being "
      "differentiated, or an array under jit/vmap). Gradients cannot flow through "
      "closed-over values of a reversed training run: pass such values through the "
      "`hparams` argument instead, e.g. loss_fn(params, hparams, batch) using "
      "hparams['weight_decay']."
    )


# ----------------------------------------------------------------------------
# The custom VJP.


def _grad_fn(config: _Config, h_other, b_other):
  def grad(params, h_float, batch_float, batch_other, key):
    hparams = _merge(h_float, h_other, config.hparams_int)
    batch = _merge(batch_float, batch_other, config.batches_int)
    p = jax.tree.unflatten(config.params_treedef, params)
    args = (p, hparams, batch) + ((key,) if config.with_key else ())
    return jax.tree.leaves(isolated(jax.grad(config.loss_fn))(*args))

  return grad


def _slice(leaves, index):
  return [lax.dynamic_index_in_dim(x, index, 0, keepdims=False) for x in leaves]


def _step_key(config, key, t):
  return jax.random.fold_in(key, t) if config.with_key else None


def _first_bad_step(bad):
  """First step (leading axis) where any element of ``bad`` is set, else -1."""
  bad_t = bad.reshape(bad.shape[0], -1).any(axis=1)
  return jnp.where(jnp.any(bad_t), jnp.argmax(bad_t), -1)


def _first_failures(config: _Config, alphas, gammas, init_ok, first_bad, buffer_step):
  """Per-leaf first failing step of each check, from the loop's per-element codes.

  ``first_bad`` (per group, per element) is ``-1`` or ``2 t + 1`` for a
  non-finite gradient first seen at step ``t``, ``2 t`` for a fixed-point
  overflow; reduced once after the loop instead of every step.  Learning
  rates and momenta are checked on device from their ``[T, ...]`` values, so
  traced (learned) ones are checked too; the categories are in the order they
  are reported (a bad momentum before the overflow it causes).
  """
  num_leaves = len(config.leaf_names)
  kinds = ("momentum", "learning_rate", "nonfinite", "range", "buffer")
  fails = {k: [None] * num_leaves for k in kinds}
  bad_momentum = [_first_bad_step(~((m > 0) & (m < 1))) for m in gammas]
  bad_rate = [_first_bad_step(~(jnp.isfinite(a) & (a > 0))) for a in alphas]
  big = jnp.iinfo(jnp.int32).max

  def first(codes, kind):
    hit = (codes >= 0) & ((codes & 1) == kind)
    step = jnp.min(jnp.where(hit, codes >> 1, big))
    return jnp.where(step == big, -1, step)

  for group, codes, buffer_t in zip(config.groups, first_bad, buffer_step):
    for i, leaf_codes in zip(group.leaves, group.unpack(codes)):
      fails["momentum"][i] = bad_momentum[group.gamma]
      fails["learning_rate"][i] = bad_rate[group.alpha]
      fails["nonfinite"][i] = first(leaf_codes, 1)
      fails["range"][i] = jnp.where(init_ok[i], first(leaf_codes, 0), 0)
      fails["buffer"][i] = buffer_t
  return {k: jnp.stack(v).astype(jnp.int32) for k, v in fails.items()}


def _forward(config: _Config, params, alphas, gammas, h_float, b_float, h_other, b_other, key):
  rule = config.rule
  grad = _grad_fn(config, h_other, b_other)
  exact, oks = zip(*(rule.init_leaf(group.pack(params), group.rows) for group in config.groups))
  exact = list(exact)
  init_ok = [jnp.all(ok) for ok in _unpack_all(config, oks)]
  first_bad = [jnp.full(leaf.w.lo.shape, -1, jnp.int32) for leaf in exact]
  buffer_step = [jnp.full((), -1, jnp.int32) for _ in exact]

  # The params each gradient sees are carried from the previous iteration in
  # both passes: a loop-carried buffer, never fused with the step's arithmetic,
  # so XLA compiles the gradient the same way forward and backward (measured:
  # fused in, a reduction inside the gradient changed its last bit).
  def body(carry, t):
    exact, p_t, first_bad, buffer_step = carry
    b_t = t % config.num_batches
    batch_f = _slice(b_float, b_t)
    batch_o = _slice(b_other, b_t)
    g = grad(p_t, h_float, batch_f, batch_o, _step_key(config, key, t))
    g = [group.pack(g) for group in config.groups]
    new_exact, new_bad, new_buffer = [], [], []
    for group, leaf, g_i, bad, buf_t in zip(config.groups, exact, g, first_bad, buffer_step):
      leaf, flags = rule.step_leaf(leaf, g_i, alphas[group.alpha][t], gammas[group.gamma][t], t)
      code = (2 * t + flags["nonfinite"]).astype(jnp.int32)
      hit = flags["nonfinite"] | flags["range"]
      new_exact.append(leaf)
      new_bad.append(jnp.where((bad < 0) & hit, code, bad).astype(jnp.int32))
      new_buffer.append(jnp.where((buf_t < 0) & flags["buffer"], t, buf_t).astype(jnp.int32))
    prints = None
    if config.check_drift:
      prints = jnp.stack([fingerprint_all(g), _heads_print(new_exact)])
    return (new_exact, _params(config, new_exact), new_bad, new_buffer), prints

  (exact, _, first_bad, buffer_step), prints = lax.scan(
    body,
    (exact, _params(config, exact), first_bad, buffer_step),
    jnp.arange(config.num_steps),
    unroll=config.unroll,
  )
  fails = _first_failures(config, alphas, gammas, init_ok, first_bad, buffer_step)
  _errors.raise_on_failure(fails, config.leaf_names, API)
  return exact, prints


def _heads_print(exact) -> jax.Array:
  """One 32-bit fingerprint of the low words of every buffer head of the exact state.

  A lost or altered row, or a wrong symbol, changes them (the low word of an
  un-spilled head is the row itself), so the high words need no fingerprint.
  """
  return fingerprint_all([leaf.buffer.head_lo for leaf in exact])


def _params(config: _Config, exact) -> list:
  """The float params (leaves, params order) of the groups' exact weights.

  Each group's floats are materialized whole before being sliced into leaves
  (see :mod:`revoptax._fusion`): a slice fused with the conversion is costed
  by XLA:CPU as the whole group's work and split over its thread pool.
  """
  flat = []
  for leaf, group in zip(exact, config.groups):
    x = config.rule.params(leaf, group.dtype)
    flat.append(materialize(x) if len(group.leaves) > 1 else x)
  return _unpack_all(config, flat)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(config, params, alphas, gammas, h_float, b_float, h_other, b_other, key):
  exact, _ = _forward(config, params, alphas, gammas, h_float, b_float, h_other, b_other, key)
  return _outputs(config, exact)


def _outputs(config, exact):
  rule = config.rule
  v = [rule.fixed.to_float(e.v, g.dtype) for e, g in zip(exact, config.groups)]
  return _params(config, exact), _unpack_all(config, v)


def _run_fwd(config, *args):
  # symbolic_zeros=True: every argument leaf arrives as CustomVJPPrimal(value,
  # perturbed). Cotangents are only computed for hparams and batches that are
  # being differentiated (usually not the training data, whose cotangent costs
  # a matmul and a read-modify-write of the data array per step).
  values = jax.tree.map(lambda x: x.value, args, is_leaf=_is_primal)
  perturbed = jax.tree.map(lambda x: x.perturbed, args, is_leaf=_is_primal)
  params, alphas, gammas, h_float, b_float, h_other, b_other, key = values
  exact, prints = _forward(config, params, alphas, gammas, h_float, b_float, h_other, b_other, key)
  # Which cotangents are needed is static: encode it in the residuals' structure.
  needs = tuple((None,) if any(jax.tree.leaves(perturbed[i])) else () for i in (3, 4))
  residuals = (exact, prints, params, alphas, gammas, h_float, b_float, h_other, b_other, key)
  return _outputs(config, exact), (residuals, needs)


def _is_primal(x):
  return isinstance(x, CustomVJPPrimal)


def _dense(cotangent, dtype):
  if isinstance(cotangent, SymbolicZero):
    return jnp.zeros(cotangent.shape, dtype)
  return jnp.asarray(cotangent, dtype)


def _run_bwd(config, saved, cotangents):
  residuals, (need_h, need_b) = saved
  exact, prints, params0, alphas, gammas, h_float, b_float, h_other, b_other, key = residuals
  need_h, need_b = bool(need_h), bool(need_b)
  rule = config.rule
  groups = config.groups
  grad = _grad_fn(config, h_other, b_other)
  d_w, d_v = cotangents
  cds = [_compute_dtype(group.dtype) for group in groups]
  d_w = [_dense(x, _compute_dtype(p.dtype)) for x, p in zip(d_w, params0)]
  d_v = [_dense(x, _compute_dtype(p.dtype)) for x, p in zip(d_v, params0)]
  if not config.return_velocity:
    d_v = [jnp.zeros_like(x) for x in d_w]
  d_w = [group.pack(d_w) for group in groups]
  d_v = [group.pack(d_v) for group in groups]
  d_h = [jnp.zeros_like(x) for x in h_float] if need_h else []
  d_b = [jnp.zeros_like(x) for x in b_float] if need_b else []
  # First step (from the end) whose recomputed gradient differs, and whose
  # undone buffer heads differ from the forward pass's before that step.
  drift0 = jnp.full((2,), -1, jnp.int32)
  fresh_heads = _heads_print(
    [leaf._replace(buffer=buffer_lib.init(leaf.w.lo.shape, 0)) for leaf in exact]
  )

  def unstep_position(exact, t):
    return [
      rule.unstep_position_leaf(leaf, alphas[group.alpha][t], group.dtype)
      for leaf, group in zip(exact, groups)
    ]

  # Carry: the exact state with w already at step t, and the params p_t (see
  # the forward pass on why the gradient's inputs are loop-carried).
  def body(carry, t):
    exact, p_t, d_w, d_v, d_h, d_b, drift = carry
    b_t = t % config.num_batches
    batch_f = _slice(b_float, b_t)
    batch_o = _slice(b_other, b_t)
    key_t = _step_key(config, key, t)
    g, hvp = jax.vjp(
      lambda p, h, bf: grad(p, h if need_h else h_float, bf if need_b else batch_f, batch_o, key_t),
      p_t,
      h_float if need_h else [],
      batch_f if need_b else [],
    )
    g = [group.pack(g) for group in groups]
    exact = [
      rule.unstep_velocity_leaf(leaf, g_i, gammas[group.gamma][t], t, clear_popped=False)
      for leaf, g_i, group in zip(exact, g, groups)
    ]
    if config.check_drift:
      heads_before = jnp.where(t > 0, prints[jnp.maximum(t - 1, 0), 1], fresh_heads)
      differs = jnp.stack([fingerprint_all(g) != prints[t, 0], _heads_print(exact) != heads_before])
      drift = jnp.where((drift < 0) & differs, t, drift).astype(jnp.int32)
    new_d_w, new_d_v, d_g = [], [], []
    d_alpha = [jnp.zeros_like(a[t]) for a in alphas]
    d_gamma = [jnp.zeros_like(m[t]) for m in gammas]
    for leaf, g_i, group, dw, dv, cd in zip(exact, g, groups, d_w, d_v, cds):
      a, m = alphas[group.alpha][t], gammas[group.gamma][t]
      w_f = rule.params(leaf, cd)  # unused by this rule's step VJP (removed by XLA)
      v_f = rule.fixed.to_float(leaf.v, cd)
      m_q = rule.applied_momentum(m, cd)
      _, step_vjp = jax.vjp(rule.float_step, w_f, v_f, g_i.astype(cd), a.astype(cd), m_q)
      dw_i, dv_i, dg_i, da_i, dm_i = step_vjp((dw, dv))
      new_d_w.append(dw_i)
      new_d_v.append(dv_i)
      d_g.append(dg_i.astype(g_i.dtype))
      d_alpha[group.alpha] = d_alpha[group.alpha] + da_i.astype(a.dtype)
      d_gamma[group.gamma] = d_gamma[group.gamma] + dm_i.astype(m.dtype)
    dp_hvp, dh_hvp, db_hvp = hvp(_unpack_all(config, d_g))
    d_w = [x + group.pack(dp_hvp).astype(x.dtype) for x, group in zip(new_d_w, groups)]
    d_h = [x + y for x, y in zip(d_h, dh_hvp)]
    d_b = [
      lax.dynamic_update_index_in_dim(x, lax.dynamic_index_in_dim(x, b_t, 0, False) + y, b_t, 0)
      for x, y in zip(d_b, db_hvp)
    ]
    # Undo the position update of step t - 1 (none after step 0).
    earlier = unstep_position(exact, jnp.maximum(t - 1, 0))
    exact = [
      leaf._replace(w=jax.tree.map(lambda new, old: jnp.where(t > 0, new, old), e.w, leaf.w))
      for leaf, e in zip(exact, earlier)
    ]
    return (exact, _params(config, exact), d_w, new_d_v, d_h, d_b, drift), (d_alpha, d_gamma)

  exact = unstep_position(exact, config.num_steps - 1)
  # reverse=True runs t = T-1, ..., 0 and stacks the per-step cotangents in
  # step order (no reversed copy).
  (exact, _, d_w, d_v, d_h, d_b, drift), (d_alphas, d_gammas) = lax.scan(
    body,
    (exact, _params(config, exact), d_w, d_v, d_h, d_b, drift0),
    jnp.arange(config.num_steps),
    reverse=True,
    unroll=config.unroll,
  )

  codes = {}
  if config.check_drift:
    # The latest step (the first one undone) that failed names the cause; a
    # changed gradient also changes the heads it is undone into, so at the
    # same step the gradient is reported.
    gradient_first = drift[0] >= drift[1]
    codes["drift_step"] = jnp.where(gradient_first, drift[0], -1)[None]
    codes["buffer_corrupt"] = jnp.where(gradient_first, -1, drift[1])[None]
    initial = [None] * len(params0)
    for leaf, group in zip(exact, groups):
      w0, _ = rule.fixed.from_float(group.pack(params0))
      fresh = buffer_lib.init(leaf.w.lo.shape, leaf.buffer.stack.shape[0])
      same = (
        jnp.all(leaf.w.hi == w0.hi)
        & jnp.all(leaf.w.lo == w0.lo)
        & jnp.all(leaf.v.hi == 0)
        & jnp.all(leaf.v.lo == 0)
        & jnp.all(leaf.buffer.head_hi == fresh.head_hi)
        & jnp.all(leaf.buffer.head_lo == fresh.head_lo)
        & (leaf.buffer.size == 0)
      )
      for i in group.leaves:
        initial[i] = ~same
    codes["initial"] = jnp.stack(initial)
  failed = jnp.zeros((), bool)
  if codes:
    failed = jnp.any(drift >= 0) | jnp.any(codes["initial"])
    if config.on_drift == "raise":
      _errors.raise_on_failure(codes, config.leaf_names, API)
    else:
      _errors.raise_on_failure(
        codes,
        config.leaf_names,
        API,
        on_failure=lambda msg: warnings.warn(msg + " Returning NaN hypergradients.", stacklevel=2),
      )

  def poison(x):
    if x is None:
      return None
    return jnp.where(failed, jnp.full_like(x, jnp.nan), x)

  d_params = [poison(x.astype(p.dtype)) for x, p in zip(_unpack_all(config, d_w), params0)]
  out = (
    d_params,
    [poison(x) for x in d_alphas],
    [poison(x) for x in d_gammas],
    [poison(x) for x in d_h] if need_h else [None for _ in h_float],
    [poison(x) for x in d_b] if need_b else [None for _ in b_float],
    [None for _ in h_other],
    [None for _ in b_other],
    None,
  )
  return out


_run.defvjp(_run_fwd, _run_bwd, symbolic_zeros=True)
