"""One exact reverse step of any :class:`revoptax.ReversibleRule`, in two halves.

Undoing step ``t`` (Maclaurin et al. 2015, Algorithm 2, for any rule)::

    state = undo_params(rule, state_{t+1}, h_t, t)       w_t, exact
    g_t   = gradient(params(state))                      recomputed
    state = undo_state(rule, state, g_t, h_t, t)         the rest of state_t, exact

:func:`reverse_step` is the composition (the Optax ``inverse``);
:func:`revoptax.train`'s backward pass calls the two halves itself so that
the params each gradient sees are loop-carried (see :mod:`revoptax._train`),
and adds the vector-Jacobian product of the same step in floats
(:func:`step_vjp`).  :func:`heads_print` is the fingerprint both entry points
keep of the buffer heads after each step, to tell a corrupted buffer from a
changed gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax

from revoptax._determinism import fingerprint_all
from revoptax._fixed_point import _compute_dtype


def undo_params(rule, state, hp: Mapping, t, dtype, clear_popped: bool = False):
  """The state with the weights of before step ``t`` (``rule.unstep_params``)."""
  return rule.unstep_params(state, hp, t, dtype, clear_popped=clear_popped)


def undo_state(rule, state, grad, hp: Mapping, t, clear_popped: bool = False):
  """The state before the step from :func:`undo_params`'s result and the recomputed gradient."""
  return rule.unstep_state(state, grad, hp, t, clear_popped=clear_popped)


def reverse_step(
  rule, states: Sequence, hps: Sequence[Mapping], t, gradient: Callable, dtypes: Sequence
):
  """Undo step ``t`` of several leaves: returns ``(states_t, params_t, grads_t)``.

  Args:
    rule: the rule.
    states: per leaf, the exact state after step ``t``.
    hps: per leaf, the hyperparameter values of step ``t``.
    t: the step.
    gradient: ``params -> (params_used, grads)`` from the leaves' float weights
      of before the step: the params the forward step saw (where they differ
      from the weights) and the gradient it used, per leaf.
    dtypes: per leaf, the params' dtype.

  Popped buffer rows are cleared, so the states equal the ones before the step.
  """
  states = [undo_params(rule, s, hp, t, d, True) for s, hp, d in zip(states, hps, dtypes)]
  params, grads = gradient([rule.params(s, d) for s, d in zip(states, dtypes)])
  states = [
    undo_state(rule, s, g, hp, t, clear_popped=True) for s, g, hp in zip(states, grads, hps)
  ]
  return states, params, grads


def step_vjp(rule, state, grad, hp: Mapping, t, cotangents, dtype):
  """VJP of the float step ``t`` at ``state`` (before the step) and ``grad``.

  Args:
    rule: the rule.
    state: the exact state before the step.
    grad: the gradient the step used.
    hp: the hyperparameter values of the step (before :meth:`applied`).
    t: the step.
    cotangents: ``(d_w, d_opt_state)`` of the step's output.
    dtype: the params' dtype.

  Returns:
    ``(d_w, d_opt_state, d_grad, d_hp)`` with respect to the step's inputs.
  """
  cd = _compute_dtype(dtype)
  w = rule.params(state, cd)  # unused by rules whose update does not read w (removed by XLA)
  opt = rule.float_state(state, cd)

  def step(w, opt, g, hp):
    return rule.float_step(w, opt, g, rule.applied(hp, cd), t)

  _, vjp = jax.vjp(step, w, opt, grad.astype(cd), dict(hp))
  return vjp(cotangents)


def heads_print(states: Sequence) -> jax.Array:
  """One 32-bit fingerprint of the low words of the buffer heads of ``states``.

  A lost or altered row, or a wrong symbol, changes them (the low word of an
  un-spilled head is the row itself), so the high words need no fingerprint.
  """
  return buffers_print([s.buffer for s in states])


def buffers_print(buffers: Sequence) -> jax.Array:
  """:func:`heads_print` of the states holding ``buffers``."""
  return fingerprint_all([b.head_lo for b in buffers])
