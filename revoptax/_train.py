"""``revoptax.train``: a training run whose VJP runs training backwards exactly.

Forward: ``num_steps`` exact momentum-SGD steps (see :mod:`revoptax._sgd`),
keeping only the final exact state, the information buffer and a 32-bit
fingerprint per step (all leaves).  Backward (Maclaurin et al. 2015, Algorithm 2),
for ``t = T-1 .. 0``::

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
  rows: tuple[int, ...]
  params_treedef: Any
  leaf_names: tuple[str, ...]
  dtypes: tuple[Any, ...]
  hparams_int: Any  # (treedef, mask) split of hparams into float / other leaves
  batches_int: Any
  with_key: bool
  return_velocity: bool
  check_drift: bool
  on_drift: str
  unroll: int
  alpha_of: tuple[int, ...]  # leaf -> index of its learning-rate schedule among the distinct ones
  gamma_of: tuple[int, ...]

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


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
    check_drift: compare a 32-bit fingerprint of each step's gradient between
      the forward and backward pass and check the reversal ends at the initial
      state.
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
    alpha_of=alpha_of,
    gamma_of=gamma_of,
    loss_fn=loss_fn,
    rule=rule,
    num_steps=num_steps,
    num_batches=num_batches,
    rows=rows,
    params_treedef=treedef,
    leaf_names=names,
    dtypes=tuple(jnp.asarray(x).dtype for x in leaves),
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
  out = []
  for v, p, name in zip(values, jax.tree.leaves(params), leaf_names(params)):
    v = jnp.asarray(v)
    if not jnp.issubdtype(v.dtype, jnp.floating):
      v = v.astype(jnp.result_type(float))
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


def _forward(config: _Config, params, alphas, gammas, h_float, b_float, h_other, b_other, key):
  rule = config.rule
  grad = _grad_fn(config, h_other, b_other)
  exact, oks = [], []
  for p, rows in zip(params, config.rows):
    leaf, ok = rule.init_leaf(p, rows)
    exact.append(leaf)
    oks.append(ok)
  num_leaves = len(params)
  first_fail = {
    k: jnp.full((num_leaves,), -1, jnp.int32) for k in ("momentum", "nonfinite", "range", "buffer")
  }
  first_fail["range"] = jnp.where(jnp.stack(oks), -1, 0).astype(jnp.int32)

  # The params each gradient sees are carried from the previous iteration in
  # both passes: a loop-carried buffer, never fused with the step's arithmetic,
  # so XLA compiles the gradient the same way forward and backward (measured:
  # fused in, a reduction inside the gradient changed its last bit).
  def body(carry, t):
    exact, p_t, fails = carry
    b_t = t % config.num_batches
    batch_f = _slice(b_float, b_t)
    batch_o = _slice(b_other, b_t)
    g = grad(p_t, h_float, batch_f, batch_o, _step_key(config, key, t))
    new_exact, flags = [], {}
    for leaf, g_i, i, j in zip(exact, g, config.alpha_of, config.gamma_of):
      new_leaf, f = rule.step_leaf(leaf, g_i, alphas[i][t], gammas[j][t], t)
      new_exact.append(new_leaf)
      for k, v in f.items():
        flags.setdefault(k, []).append(v)
    fails = {
      k: jnp.where((fails[k] < 0) & jnp.stack(flags[k]), t, fails[k]).astype(jnp.int32)
      for k in fails
    }
    prints = fingerprint_all(g) if config.check_drift else None
    p_next = [rule.params(leaf, d) for leaf, d in zip(new_exact, config.dtypes)]
    return (new_exact, p_next, fails), prints

  p_0 = [rule.params(leaf, d) for leaf, d in zip(exact, config.dtypes)]
  (exact, _, fails), prints = lax.scan(
    body, (exact, p_0, first_fail), jnp.arange(config.num_steps), unroll=config.unroll
  )
  _errors.raise_on_failure(fails, config.leaf_names, API)
  return exact, prints


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(config, params, alphas, gammas, h_float, b_float, h_other, b_other, key):
  exact, _ = _forward(config, params, alphas, gammas, h_float, b_float, h_other, b_other, key)
  return _outputs(config, exact)


def _outputs(config, exact):
  rule = config.rule
  w = [rule.params(leaf, d) for leaf, d in zip(exact, config.dtypes)]
  v = [rule.fixed.to_float(leaf.v, d) for leaf, d in zip(exact, config.dtypes)]
  return w, v


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
  grad = _grad_fn(config, h_other, b_other)
  d_w, d_v = cotangents
  cds = [_compute_dtype(d) for d in config.dtypes]
  d_w = [_dense(x, cd) for x, cd in zip(d_w, cds)]
  d_v = [_dense(x, cd) for x, cd in zip(d_v, cds)]
  if not config.return_velocity:
    d_v = [jnp.zeros_like(x) for x in d_w]
  d_h = [jnp.zeros_like(x) for x in h_float] if need_h else []
  d_b = [jnp.zeros_like(x) for x in b_float] if need_b else []
  drift0 = jnp.full((), -1, jnp.int32)  # first step (from the end) whose gradient differs

  def unstep_position(exact, t):
    exact = [
      rule.unstep_position_leaf(leaf, alphas[i][t], d)
      for leaf, i, d in zip(exact, config.alpha_of, config.dtypes)
    ]
    return exact, [rule.params(leaf, d) for leaf, d in zip(exact, config.dtypes)]

  # Carry: the exact state with w already at step t, and the params p_t (see
  # the forward pass on why the gradient's inputs are loop-carried).
  def body(carry, t):
    exact, p_t, d_w, d_v, d_h, d_b, drift = carry
    b_t = t % config.num_batches
    batch_f = _slice(b_float, b_t)
    batch_o = _slice(b_other, b_t)
    alpha_t = [alphas[i][t] for i in config.alpha_of]
    gamma_t = [gammas[j][t] for j in config.gamma_of]
    key_t = _step_key(config, key, t)
    g, hvp = jax.vjp(
      lambda p, h, bf: grad(p, h if need_h else h_float, bf if need_b else batch_f, batch_o, key_t),
      p_t,
      h_float if need_h else [],
      batch_f if need_b else [],
    )
    if config.check_drift:
      drift = jnp.where((drift < 0) & (fingerprint_all(g) != prints[t]), t, drift).astype(jnp.int32)
    exact = [
      rule.unstep_velocity_leaf(leaf, g_i, m, t, clear_popped=False)
      for leaf, g_i, m in zip(exact, g, gamma_t)
    ]
    new_d_w, new_d_v, d_g = [], [], []
    d_alpha = [jnp.zeros_like(a[t]) for a in alphas]
    d_gamma = [jnp.zeros_like(m[t]) for m in gammas]
    leaf_args = zip(
      exact, p_t, g, alpha_t, gamma_t, d_w, d_v, cds, config.alpha_of, config.gamma_of
    )
    for leaf, p, g_i, a, m, dw, dv, cd, i, j in leaf_args:
      w_f = p.astype(cd)
      v_f = rule.fixed.to_float(leaf.v, cd)
      m_q = rule.applied_momentum(m, cd)
      _, step_vjp = jax.vjp(rule.float_step, w_f, v_f, g_i.astype(cd), a.astype(cd), m_q)
      dw_i, dv_i, dg_i, da_i, dm_i = step_vjp((dw, dv))
      new_d_w.append(dw_i)
      new_d_v.append(dv_i)
      d_g.append(dg_i.astype(g_i.dtype))
      d_alpha[i] = d_alpha[i] + da_i.astype(a.dtype)
      d_gamma[j] = d_gamma[j] + dm_i.astype(m.dtype)
    dp_hvp, dh_hvp, db_hvp = hvp(d_g)
    d_w = [x + y.astype(x.dtype) for x, y in zip(new_d_w, dp_hvp)]
    d_h = [x + y for x, y in zip(d_h, dh_hvp)]
    d_b = [
      lax.dynamic_update_index_in_dim(x, lax.dynamic_index_in_dim(x, b_t, 0, False) + y, b_t, 0)
      for x, y in zip(d_b, db_hvp)
    ]
    # Undo the position update of step t - 1 (none after step 0).
    earlier, p_prev = unstep_position(exact, jnp.maximum(t - 1, 0))
    exact = [
      leaf._replace(w=jax.tree.map(lambda new, old: jnp.where(t > 0, new, old), e.w, leaf.w))
      for leaf, e in zip(exact, earlier)
    ]
    return (exact, p_prev, d_w, new_d_v, d_h, d_b, drift), (d_alpha, d_gamma)

  exact, p_last = unstep_position(exact, config.num_steps - 1)
  # reverse=True runs t = T-1, ..., 0 and stacks the per-step cotangents in
  # step order (no reversed copy).
  (exact, _, d_w, d_v, d_h, d_b, drift), (d_alphas, d_gammas) = lax.scan(
    body,
    (exact, p_last, d_w, d_v, d_h, d_b, drift0),
    jnp.arange(config.num_steps),
    reverse=True,
    unroll=config.unroll,
  )

  codes = {}
  if config.check_drift:
    codes["drift_step"] = drift[None]
    initial = []
    for leaf, p in zip(exact, params0):
      w0, _ = rule.fixed.from_float(p)
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
      initial.append(~same)
    codes["initial"] = jnp.stack(initial)
  failed = jnp.zeros((), bool)
  if codes:
    failed = jnp.any(codes["drift_step"] >= 0) | jnp.any(codes["initial"])
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

  d_params = [poison(x.astype(d)) for x, d in zip(d_w, config.dtypes)]
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
