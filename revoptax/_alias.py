"""Optax factories of the reversible rules, with Optax's argument names."""

from __future__ import annotations

import dataclasses

from revoptax._adam import AdamRule
from revoptax._optax import ReversibleTransformation, transformation
from revoptax._rmsprop import RMSPropRule
from revoptax._sgd import MomentumSGDRule


def reversible_sgd(
  learning_rate,
  momentum,
  *,
  max_steps: int,
  rule: MomentumSGDRule | None = None,
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
  ``update`` needs the params (``tx.update(grads, state, params)``).

  Args:
    learning_rate: ``alpha``: a positive float, an array, an Optax schedule
      ``step -> value``, or a pytree of those (a prefix of the params) for
      per-layer rates.
    momentum: ``gamma`` in (0, 1), in any of the same forms.  It is quantized
      to ``n / 2**momentum_bits``; the buffer costs ``log2(1 / gamma)`` bits per
      parameter per step.
    max_steps: steps the buffer must hold (its capacity is static).
    rule: the :class:`revoptax.MomentumSGDRule` with the fixed-point format,
      the momentum precision and ``momentum_floor``, the smallest momentum the
      schedules will use, which sizes the buffer (default: exact from the
      values given, or 0.5 for schedules that cannot be evaluated ahead).
      Being one object, it stays static under ``optax.inject_hyperparams``,
      where only ``max_steps`` needs ``static_args``.
    param_log_capacity: entries per leaf of the log of params that differed
      from the exact weights (default ``1024 + size * max_steps / 32``, one in
      32 element updates).  An entry costs 20 bytes.
    on_error: what a failed check in ``update`` does (learning rate or
      momentum out of range, non-finite gradient, fixed-point overflow,
      buffer or log capacity, more than ``max_steps`` updates).  ``"raise"``
      (default): raise :class:`revoptax.ReversibilityError` naming the step and
      leaf (a runtime error with that message under ``jit``, from a host
      callback that runs only when a check fails).  ``"nan"``: no callback; the
      first failure is recorded in ``state.error``, every later update is NaN
      (so the params become NaN), and :func:`revoptax.check` or ``inverse``
      raises the message.

  Returns:
    A :class:`ReversibleTransformation` (an ``optax.GradientTransformationExtraArgs``)
    whose state is a :class:`revoptax.ReversibleState`.

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
  rule = MomentumSGDRule() if rule is None else rule
  specs = {"learning_rate": learning_rate, "momentum": momentum}
  return transformation(rule, specs, max_steps, param_log_capacity, on_error, api)


_COMMON_ARGS = """
    max_steps: updates the buffer and the fingerprints must hold (static).
    nesterov: must be False: Nesterov's update reads the gradient itself, so
      the weights could not be undone before the gradient at them is known.
    rule: the :class:`revoptax.AdamRule` with the fixed-point formats and the
      floors that size the buffer for schedules that cannot be evaluated ahead.
    param_log_capacity, on_error: as for :func:`revoptax.reversible_sgd`.
"""


def _adam_rule(rule, decoupled: bool, nesterov: bool, api: str) -> AdamRule:
  if nesterov:
    raise ValueError(
      f"{api}: nesterov=True is not exactly reversible: its update reads the gradient at the "
      "weights it changes, so the weights cannot be undone first. Use nesterov=False."
    )
  rule = AdamRule(decoupled_weight_decay=decoupled) if rule is None else rule
  if not isinstance(rule, AdamRule) or rule.decoupled_weight_decay != decoupled:
    want = "AdamRule(decoupled_weight_decay=True)" if decoupled else "AdamRule()"
    raise TypeError(f"{api}: rule must be a revoptax.{want}, got {rule!r}.")
  return rule


def reversible_adam(
  learning_rate,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  eps_root=0.0,
  *,
  max_steps: int,
  nesterov: bool = False,
  rule: AdamRule | None = None,
  param_log_capacity: int | None = None,
  on_error: str = "raise",
) -> ReversibleTransformation:
  (
    r"""Exactly reversible Adam (Kingma & Ba, 2015): ``optax.adam`` with an exact inverse.

  .. math::

    m_{t+1} = b_1 m_t + (1 - b_1) g_t, \quad
    \nu_{t+1} = b_2 \nu_t + (1 - b_2) g_t^2, \quad
    w_{t+1} = w_t - \alpha \frac{m_{t+1} / (1 - b_1^{t+1})}
      {\sqrt{\nu_{t+1} / (1 - b_2^{t+1}) + \epsilon_{root}} + \epsilon}

  computed exactly (:class:`revoptax.AdamRule`): the bits that multiplying
  the moments by ``b1`` and ``b2`` destroys go to an information buffer,
  ``log2(1 / b1) + log2(1 / b2)`` bits per parameter per step.  ``b1`` and
  ``b2`` are applied within ``2**-33`` of the values given.  The state's
  ``exact.mu`` and ``exact.nu`` mirror ``optax.adam``'s ``mu`` and ``nu``.

  Args:
    learning_rate: a positive float, an array, an Optax schedule, or a pytree
      of those (a prefix of the params) for per-layer rates.
    b1, b2: decay rates of the moments, in ``[1/2, 1)``, in the same forms.
    eps, eps_root: non-negative, in the same forms.
  """
    + _COMMON_ARGS
    + r"""
  Returns:
    A :class:`ReversibleTransformation` whose state is a :class:`revoptax.ReversibleState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, revoptax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = revoptax.reversible_adam(0.1, max_steps=10)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    >>> updates, state = tx.update(grad_fn(params), state, params)
    >>> [round(x, 6) for x in optax.apply_updates(params, updates)["w"].tolist()]
    [0.9, 0.9, 0.9]
    >>> previous_state, previous_params = tx.inverse(state, grad_fn)
    >>> previous_params["w"].tolist()
    [1.0, 1.0, 1.0]

  References:
    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015,
    https://arxiv.org/abs/1412.6980
  """
  )
  api = "revoptax.reversible_adam"
  rule = _adam_rule(rule, False, nesterov, api)
  specs = {"learning_rate": learning_rate, "b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root}
  return transformation(rule, specs, max_steps, param_log_capacity, on_error, api)


def reversible_adamw(
  learning_rate,
  b1=0.9,
  b2=0.999,
  eps=1e-8,
  eps_root=0.0,
  weight_decay=1e-4,
  *,
  max_steps: int,
  nesterov: bool = False,
  rule: AdamRule | None = None,
  param_log_capacity: int | None = None,
  on_error: str = "raise",
) -> ReversibleTransformation:
  (
    r"""Exactly reversible AdamW (Loshchilov & Hutter, 2019): ``optax.adamw`` with an exact
  inverse.

  :func:`reversible_adam` with decoupled weight decay: each step first
  multiplies the weights by ``1 - learning_rate * weight_decay`` exactly
  (through the buffer, within ``2**-33`` of the value), then applies Adam's
  update.  A per-leaf ``weight_decay`` pytree with ``0.0`` where decay is off
  does what ``optax.adamw``'s ``mask`` does.

  Args:
    learning_rate: a positive float, an array, an Optax schedule, or a pytree
      of those (a prefix of the params) for per-layer rates.
    b1, b2: decay rates of the moments, in ``[1/2, 1)``, in the same forms.
    eps, eps_root: non-negative, in the same forms.
    weight_decay: non-negative, with ``learning_rate * weight_decay <= 1/2``.
  """
    + _COMMON_ARGS.replace("revoptax.AdamRule`", "revoptax.AdamRule` (decoupled)")
    + r"""
  Returns:
    A :class:`ReversibleTransformation` whose state is a :class:`revoptax.ReversibleState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, revoptax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = revoptax.reversible_adamw(0.1, weight_decay=0.5, max_steps=10)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    >>> updates, state = tx.update(grad_fn(params), state, params)
    >>> [round(x, 6) for x in optax.apply_updates(params, updates)["w"].tolist()]  # 0.95 - 0.1
    [0.85, 0.85, 0.85]
    >>> tx.inverse(state, grad_fn)[1]["w"].tolist()
    [1.0, 1.0, 1.0]

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
    https://arxiv.org/abs/1711.05101
  """
  )
  api = "revoptax.reversible_adamw"
  rule = _adam_rule(rule, True, nesterov, api)
  specs = {
    "learning_rate": learning_rate,
    "b1": b1,
    "b2": b2,
    "eps": eps,
    "eps_root": eps_root,
    "weight_decay": weight_decay,
  }
  return transformation(rule, specs, max_steps, param_log_capacity, on_error, api)


def reversible_rmsprop(
  learning_rate,
  decay=0.9,
  eps=1e-8,
  initial_scale=0.0,
  eps_in_sqrt=True,
  centered=False,
  momentum=None,
  nesterov=False,
  bias_correction=False,
  *,
  max_steps: int,
  rule: RMSPropRule | None = None,
  param_log_capacity: int | None = None,
  on_error: str = "raise",
) -> ReversibleTransformation:
  r"""Exactly reversible RMSProp with momentum: ``optax.rmsprop(..., momentum=...)`` with an
  exact inverse.

  .. math::

    \nu_{t+1} = d \nu_t + (1 - d) g_t^2, \quad
    m_{t+1} = \mu m_t - \alpha \frac{g_t}{\sqrt{\hat\nu_{t+1} + \epsilon}}, \quad
    w_{t+1} = w_t + m_{t+1}

  (centered: ``nu - mu**2`` under the root with ``mu`` the average of ``g``),
  computed exactly (:class:`revoptax.RMSPropRule`); the buffer costs
  ``log2(1 / decay)`` (twice when centered) plus ``log2(1 / momentum)`` bits
  per parameter per step.

  Args:
    learning_rate: a non-negative float, an array, an Optax schedule, or a
      pytree of those (a prefix of the params).
    decay: the second moment's decay rate, in ``[1/2, 1)``, in the same forms.
    eps: non-negative, in the same forms.
    initial_scale, eps_in_sqrt, centered, bias_correction: as in ``optax.rmsprop``.
    momentum: required, in ``[1/2, 1)``: without momentum the weight update
      reads the gradient at the weights it changes, which is not exactly
      reversible (``None`` raises).
    nesterov: must be False, for the same reason.
    max_steps: updates the buffer and the fingerprints must hold (static).
    rule: a :class:`revoptax.RMSPropRule` with the formats and floors; its
      ``centered``, ``eps_in_sqrt``, ``bias_correction`` and ``initial_scale``
      are replaced by the arguments above.
    param_log_capacity, on_error: as for :func:`revoptax.reversible_sgd`.

  Returns:
    A :class:`ReversibleTransformation` whose state is a :class:`revoptax.ReversibleState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, revoptax
    >>> params = {"w": jnp.ones(3)}
    >>> tx = revoptax.reversible_rmsprop(0.01, momentum=0.9, max_steps=10)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    >>> updates, state = tx.update(grad_fn(params), state, params)
    >>> tx.inverse(state, grad_fn)[1]["w"].tolist()
    [1.0, 1.0, 1.0]

  References:
    Tieleman & Hinton, "Lecture 6.5 - RMSProp", COURSERA: Neural Networks for
    Machine Learning (2012); Graves, "Generating Sequences With Recurrent
    Neural Networks" (2013, the centered form), https://arxiv.org/abs/1308.0850
  """
  api = "revoptax.reversible_rmsprop"
  if momentum is None or nesterov:
    raise ValueError(
      f"{api}: RMSProp is exactly reversible only with (non-Nesterov) momentum: without it "
      "the weight update reads the gradient at the weights it changes, so the weights cannot "
      "be undone first. Pass momentum= (e.g. 0.9) and nesterov=False."
    )
  base = RMSPropRule() if rule is None else rule
  if not isinstance(base, RMSPropRule):
    raise TypeError(f"{api}: rule must be a revoptax.RMSPropRule, got {rule!r}.")
  rule = dataclasses.replace(
    base,
    centered=bool(centered),
    eps_in_sqrt=bool(eps_in_sqrt),
    bias_correction=bool(bias_correction),
    initial_scale=float(initial_scale),
  )
  specs = {"learning_rate": learning_rate, "decay": decay, "eps": eps, "momentum": momentum}
  return transformation(rule, specs, max_steps, param_log_capacity, on_error, api)
