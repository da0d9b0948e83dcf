"""Exactly reversible momentum SGD as a :class:`revoptax.ReversibleRule`.

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
is the momentum applied and reported.  The buffer costs ``log2(1/gamma)`` bits
per element per step.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from revoptax import _buffer as buffer_lib
from revoptax._fixed_point import Fixed, FixedPointFormat, _compute_dtype, exact_scope, join, split
from revoptax._fusion import materialize
from revoptax._rule import StepFlags

# Momentum assumed for the capacity when the momenta are learned and no floor is given.
DEFAULT_MOMENTUM_FLOOR = 0.5


class MomentumSGDState(NamedTuple):
  """Exact state of momentum SGD for one array: weights, velocity and buffer."""

  w: Fixed
  v: Fixed
  buffer: buffer_lib.BufferState


@jax.custom_jvp
def _straight_through(x, quantized):
  """``quantized`` in value, the identity in derivative with respect to ``x``."""
  del x
  return quantized


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  return _straight_through(*primals), tangents[0]


@dataclasses.dataclass(frozen=True)
class MomentumSGDRule:
  """Exactly reversible momentum SGD (Maclaurin et al. 2015).

  Hyperparameters per step: ``learning_rate`` (``alpha > 0``) and ``momentum``
  (``0 < gamma < 1``, quantized to ``n / 2**momentum_bits`` with ``n`` in
  ``[2**(momentum_bits - 8), 2**momentum_bits - 1]``).

  Attributes:
    fixed: fixed-point format of ``w`` and ``v``.
    momentum_bits: precision of the momentum, 8 to 16.
    momentum_floor: the smallest momentum a learned schedule may use: the
      buffer is sized for it (default 0.5 when the momenta are traced; exact
      from the values when they are concrete and no floor is given).  A step
      below the floor is reported; :func:`revoptax.momentum_above` keeps a
      learned momentum above it by construction.

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> rule = revoptax.MomentumSGDRule()
    >>> state, ok = rule.init(jnp.ones(3), rows=1)
    >>> hp = {"learning_rate": 0.1, "momentum": 0.9}
    >>> state, flags = rule.step(state, jnp.ones(3), hp, 0)
    >>> rule.params(state, jnp.float32).tolist()  # 1 + 0.1 * (-(1 - 0.9) * 1)
    [0.9899994134902954, 0.9899994134902954, 0.9899994134902954]
  """

  fixed: FixedPointFormat = FixedPointFormat()
  momentum_bits: int = 16
  momentum_floor: float | None = None

  hyperparameters = ("learning_rate", "momentum")
  defaults = types.MappingProxyType({})
  state_names = ("velocity",)

  def __post_init__(self):
    if not 8 <= self.momentum_bits <= 16:
      raise ValueError(
        f"MomentumSGDRule: momentum_bits must be between 8 and 16, got {self.momentum_bits}."
      )
    if self.momentum_floor is not None and not 0 < self.momentum_floor < 1:
      raise ValueError(
        f"MomentumSGDRule: momentum_floor must lie in (0, 1), got {self.momentum_floor}."
      )

  # -- quantization ----------------------------------------------------------

  def quantize_momentum(self, gamma):
    """``n``: the numerator of the applied momentum ``n / 2**momentum_bits``."""
    return buffer_lib.quantize_momentum(gamma, self.momentum_bits)

  def applied_momentum(self, gamma, dtype=jnp.float32):
    """The momentum actually applied for ``gamma``, with the identity as its derivative."""
    n = self.quantize_momentum(gamma)
    quantized = buffer_lib.dequantize_momentum(n, self.momentum_bits, dtype)
    return _straight_through(jnp.asarray(gamma, dtype), jax.lax.stop_gradient(quantized))

  # -- the interface ---------------------------------------------------------

  def init(self, param, rows: int):
    w, ok = self.fixed.from_float(param)
    state = MomentumSGDState(w, self.fixed.zeros(w.lo.shape), buffer_lib.init(w.lo.shape, rows))
    return state, ok

  def params(self, state: MomentumSGDState, dtype):
    return self.fixed.to_float(state.w, dtype)

  def float_state(self, state: MomentumSGDState, dtype):
    return (self.fixed.to_float(state.v, dtype),)

  def step(self, state: MomentumSGDState, grad, hp: Mapping, t):
    cd = _compute_dtype(grad.dtype)
    n = self.quantize_momentum(hp["momentum"])
    one_minus = 1 - buffer_lib.dequantize_momentum(n, self.momentum_bits, cd)
    g = grad.astype(cd)
    with exact_scope():
      v, head = buffer_lib.push_pop(
        join(state.v), buffer_lib.join_head(state.buffer), n, self.momentum_bits
      )
      v, head = materialize((v, head))
      buf, buffer_ok = buffer_lib.spill(state.buffer, head, t)
      dv, dv_ok = self.fixed.quantize(one_minus * g)
      v = materialize(v - dv)
      dw, dw_ok = self._weight_update(v, hp["learning_rate"], cd)
      w = materialize(join(state.w) + dw)
      in_range = dv_ok & dw_ok & self.fixed.in_range_int(v) & self.fixed.in_range_int(w)
      new_state = MomentumSGDState(split(w), split(v), buf)
    return new_state, StepFlags(nonfinite=~jnp.isfinite(g), range=~in_range, buffer=~buffer_ok)

  def _weight_update(self, v, alpha, cd):
    """``(Q(alpha F(v)), ok)`` for the ``int64`` velocity ``v`` (inside ``exact_scope``)."""
    return self.fixed.quantize(jnp.asarray(alpha, cd) * self.fixed.dequantize(v, cd))

  def unstep_params(self, state: MomentumSGDState, hp: Mapping, t, dtype, clear_popped=False):
    del t, clear_popped  # the weight update reads only v, and no buffer is involved
    cd = _compute_dtype(dtype)
    with exact_scope():
      dw, _ = self._weight_update(join(state.v), hp["learning_rate"], cd)
      return state._replace(w=split(materialize(join(state.w) - dw)))

  def unstep_state(self, state: MomentumSGDState, grad, hp: Mapping, t, clear_popped=False):
    cd = _compute_dtype(grad.dtype)
    n = self.quantize_momentum(hp["momentum"])
    one_minus = 1 - buffer_lib.dequantize_momentum(n, self.momentum_bits, cd)
    with exact_scope():
      dv, _ = self.fixed.quantize(one_minus * grad.astype(cd))
      v = materialize(join(state.v) + dv)
      head, popped = buffer_lib.unspill(state.buffer, t)
      v, head = materialize(buffer_lib.pop_push(v, head, n, self.momentum_bits))
      buf = buffer_lib.after_unspill(state.buffer, head, popped, clear_popped)
      return MomentumSGDState(state.w, split(v), buf)

  def applied(self, hp: Mapping, dtype):
    return {
      "learning_rate": jnp.asarray(hp["learning_rate"], dtype),
      "momentum": self.applied_momentum(hp["momentum"], dtype),
    }

  @staticmethod
  def float_step(w, opt_state, grad, hp: Mapping, t=None):
    del t
    (v,) = opt_state
    gamma = hp["momentum"]
    v = gamma * v - (1 - gamma) * grad
    return w + hp["learning_rate"] * v, (v,)

  def checks(self, hp: Mapping, learned: Mapping):
    alpha, gamma = jnp.asarray(hp["learning_rate"]), jnp.asarray(hp["momentum"])
    out = {
      "momentum": ~jnp.all(jnp.isfinite(gamma) & (gamma > 0) & (gamma < 1)),
      "learning_rate": ~jnp.all(jnp.isfinite(alpha) & (alpha > 0)),
    }
    if learned["momentum"] or self.momentum_floor is not None:
      floor = self.quantize_momentum(self._floor())
      out["momentum_floor"] = jnp.any(self.quantize_momentum(gamma) < floor)
    return out

  def _floor(self) -> float:
    return DEFAULT_MOMENTUM_FLOOR if self.momentum_floor is None else self.momentum_floor

  def bits_per_step(self, values: Mapping):
    gammas = values["momentum"]
    if gammas is None or self.momentum_floor is not None:
      return np.asarray(self._bits(self._floor())), np.zeros(())
    bits = self._bits(gammas)
    return bits.reshape(bits.shape[0], -1).max(axis=1), np.zeros(())

  def _bits(self, gamma):
    """``log2(2**k / n)`` in NumPy, with the quantization of :meth:`quantize_momentum`."""
    k = self.momentum_bits
    g = np.nan_to_num(np.asarray(gamma, np.float32), nan=0.0)
    n = np.clip(np.round(g * np.float32(2.0**k)), 2.0 ** (k - 8), 2.0**k - 1)
    return k - np.log2(n.astype(np.float64))


def momentum_above(floor: float, x, *, ceiling: float = 1.0):
  r"""A momentum that stays in ``[floor, ceiling)`` whatever the real ``x``.

  .. math:: \gamma = \mathrm{floor} + (\mathrm{ceiling} - \mathrm{floor})\,\sigma(x)

  Use it for a learned momentum with ``MomentumSGDRule(momentum_floor=floor)``,
  so the buffer sized for the floor cannot run out however the meta-optimizer
  moves ``x``.

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> float(revoptax.momentum_above(0.8, jnp.float32(-50.0)))
    0.800000011920929
  """
  if not 0 < floor < ceiling <= 1:
    raise ValueError(f"momentum_above: need 0 < floor < ceiling <= 1, got {floor}, {ceiling}.")
  return floor + (ceiling - floor) * jax.nn.sigmoid(x)
