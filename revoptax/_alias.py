"""Optax factories of the reversible rules, with Optax's argument names."""

from __future__ import annotations

from revoptax._optax import ReversibleTransformation, transformation
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
