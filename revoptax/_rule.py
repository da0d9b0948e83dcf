"""The interface every exactly reversible optimizer implements.

A reversible rule is an optimizer step written with the two exact operations
of :mod:`revoptax._fixed_point` and :mod:`revoptax._buffer`: adding a
deterministic function of other state (undone by subtracting the same
recomputed integer) and multiplying by a constant below one (undone through
the information buffer).  Its step is undone in two parts, because the weight
update is a function of the state *after* the step while the gradient is a
function of the weights *before* it::

    state_{t+1} = step(state_t, g(w_t), h_t, t)
    w_t         = params(unstep_params(state_{t+1}, h_t, t))
    state_t     = unstep_state(unstep_params(state_{t+1}, h_t, t), g(w_t), h_t, t)

``h_t`` maps each name in :attr:`ReversibleRule.hyperparameters` to its value
at step ``t`` (broadcastable to the leaf).  :func:`revoptax.train` and the
Optax transformations (:func:`revoptax.reversible_optimizer`) drive every rule
through this interface only, in one reverse step (:mod:`revoptax._reverse`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from revoptax._buffer import BufferState
from revoptax._fixed_point import FixedPointFormat


class StepFlags(NamedTuple):
  """What one exact step found wrong.

  Attributes:
    nonfinite: per element, the gradient was not finite.
    range: per element, a fixed-point value or update left ``|x| < 2**int_bits``.
    buffer: scalar, the information buffer was full and a row could not be spilled.
  """

  nonfinite: jax.Array
  range: jax.Array
  buffer: jax.Array


class ExactState(Protocol):
  """The exact state of one leaf: a NamedTuple of arrays with at least these fields."""

  buffer: BufferState


@runtime_checkable
class ReversibleRule(Protocol):
  """An exactly reversible optimizer step on one array of parameters.

  Implementations are frozen dataclasses (hashable by value, so ``jit``
  reuses compiled loops) holding their static options.

  Attributes:
    hyperparameters: names of the per-step hyperparameters ``h_t``, e.g.
      ``("learning_rate", "momentum")``; the keyword arguments of
      :func:`revoptax.train` and of the Optax factory.
    defaults: values of the hyperparameters that may be left out (e.g.
      ``{"b1": 0.9}``), as constants.
    state_names: names of the optimizer-state quantities besides the weights
      (e.g. ``("velocity",)``), in the order :meth:`float_state` returns them.
    fixed: the fixed-point format of the weights and the state.
  """

  hyperparameters: tuple[str, ...]
  defaults: Mapping[str, float]
  state_names: tuple[str, ...]
  fixed: FixedPointFormat

  def init(self, param: jax.Array, rows: int) -> tuple[Any, jax.Array]:
    """``(state, ok)``: the exact state of ``param`` with a buffer of ``rows`` rows;
    ``ok`` per element (finite and in range)."""

  def params(self, state, dtype) -> jax.Array:
    """The weights of ``state`` as floats of ``dtype`` (correctly rounded)."""

  def float_state(self, state, dtype) -> tuple[jax.Array, ...]:
    """The optimizer-state quantities of ``state`` as floats (see :attr:`state_names`)."""

  def step(self, state, grad, hp: Mapping[str, jax.Array], t) -> tuple[Any, StepFlags]:
    """One exact forward step at hyperparameters ``hp`` (values at step ``t``)."""

  def unstep_params(
    self, state, hp: Mapping[str, jax.Array], t, dtype, clear_popped: bool = False
  ) -> Any:
    """``state`` with the weights of before step ``t`` (exact), the optimizer state unchanged.

    A rule whose weights are also multiplied (decoupled weight decay) pops
    their buffer bits here; popped rows are cleared only with ``clear_popped``.
    """

  def unstep_state(self, state, grad, hp: Mapping[str, jax.Array], t) -> Any:
    """The state before the step, from :meth:`unstep_params`'s result and ``g(w_t)``.

    Rows popped from the buffer are left in place as free space (see
    :func:`revoptax._buffer.divide`).
    """

  def applied(self, hp: Mapping[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """The hyperparameter values the exact step applies (e.g. a quantized momentum),
    as floats of ``dtype``, differentiable with respect to ``hp`` (straight-through)."""

  def float_step(self, w, opt_state: tuple, grad, hp: Mapping[str, jax.Array], t) -> tuple:
    """Step ``t`` in plain floats at the :meth:`applied` values: ``(w', opt_state')``.

    Used for the vector-Jacobian products of the backward pass.
    """

  def checks(self, hp: Mapping[str, jax.Array], learned: Mapping[str, bool]) -> dict:
    """``{category: bool}``: hyperparameter values the step cannot use, per category of
    :data:`revoptax._errors.MESSAGES` (``learned``: which values are traced, so sized
    for a floor)."""

  def bits_per_step(self, values: Mapping[str, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, variance)`` of the buffer bits per element of each step, for the worst
    element: ``float64[T]`` (or scalars) from concrete values ``[T, ...]`` of each
    hyperparameter (``None``: learned, so the rule's floor).  The variance is that of
    costs that are random per element (0 for momentum SGD)."""
