"""Exactly reversible RMSProp with momentum as a :class:`revoptax.ReversibleRule`.

The update (Tieleman & Hinton 2012; ``optax.rmsprop`` with ``momentum``), step
``t = 0, 1, ...`` with ``g_t = grad L(w_t)``::

    nu_{t+1}  = d nu_t + (1 - d) g_t**2
    mu_{t+1}  = d mu_t + (1 - d) g_t                       (centered only)
    s_t       = nuhat - muhat**2   (centered)   or   nuhat
    u_t       = g_t / sqrt(s_t + eps)   (eps_in_sqrt)   or   g_t / (sqrt(s_t) + eps)
    mom_{t+1} = momentum mom_t - lr u_t
    w_{t+1}   = w_t + mom_{t+1}

with ``nuhat = nu / (1 - d**(t+1))`` (and ``muhat``) under ``bias_correction``,
else ``nu`` itself.  Without momentum RMSProp is not exactly reversible: its
weight update is a function of the gradient at the very weights it changes,
so they cannot be undone before the gradient at them is known.

Exactly, with every quantity a fixed-point integer (``nu`` and ``mu`` in 96
bits, ``mom`` in the weights' format so that ``w += mom`` is an integer add)::

    nu  <- d nu,  nu <- nu + Q((1 - d) g**2)      exact (revoptax._scale), lost bits to the buffer
    mu  <- d mu,  mu <- mu + Q((1 - d) g)
    mom <- momentum mom,  mom <- mom - Q(lr u)    u from g and the moments after the step
    w   <- w + mom

undone in the reverse order; the buffer costs ``log2(1 / d)`` (twice when
centered) plus ``log2(1 / momentum)`` bits per element per step.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from revoptax import _buffer as buffer_lib
from revoptax import _moments, _scale, _wide
from revoptax._fixed_point import Fixed, FixedPointFormat, _compute_dtype, exact_scope, join, split
from revoptax._fusion import materialize
from revoptax._rule import StepFlags

# Rate assumed for the buffer capacity when a rate is learned and no floor is given.
DEFAULT_FLOOR = 0.5


class RMSPropState(NamedTuple):
  """Exact state of RMSProp for one array: weights, second moment, first moment
  (``None`` unless centered), momentum trace and buffer."""

  w: Fixed
  nu: _wide.Wide
  mu: _wide.Wide | None
  momentum: Fixed
  buffer: buffer_lib.BufferState


@dataclasses.dataclass(frozen=True)
class RMSPropRule:
  """Exactly reversible RMSProp with momentum (optionally centered).

  Hyperparameters per step: ``learning_rate`` (``>= 0``), ``decay`` and
  ``momentum`` (in ``[1/2, 1)``, applied within ``2**-33``, see
  :mod:`revoptax._scale`) and ``eps`` (``>= 0``).

  Attributes:
    fixed: 64-bit format of the weights and of the momentum trace.
    moment_format: 96-bit format of ``nu`` (and ``mu``).
    centered: divide by the centered second moment (``optax.rmsprop(centered=True)``).
    eps_in_sqrt: ``eps`` inside the square root (Optax's default) or outside.
    bias_correction: divide the moments by ``1 - decay**(t+1)``.
    initial_scale: initial value of ``nu``.
    decay_floor, momentum_floor: the smallest values a learned schedule may use
      (the buffer is sized for them; 0.5 when traced and not given).
    capacity: ``"guaranteed"`` or ``"expected"``, as for :class:`revoptax.AdamRule`.

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> rule = revoptax.RMSPropRule()
    >>> state, ok = rule.init(jnp.ones(2), rows=1)
    >>> hp = {"learning_rate": 0.1, "decay": 0.9, "eps": 1e-8, "momentum": 0.9}
    >>> state, flags = rule.step(state, jnp.asarray([1.0, -2.0]), hp, 0)
    >>> [round(x, 4) for x in rule.params(state, jnp.float32).tolist()]  # 1 -/+ 0.1 / sqrt(0.1)
    [0.6838, 1.3162]
  """

  fixed: FixedPointFormat = FixedPointFormat()
  moment_format: _wide.WideFormat = _wide.WideFormat()
  centered: bool = False
  eps_in_sqrt: bool = True
  bias_correction: bool = False
  initial_scale: float = 0.0
  decay_floor: float | None = None
  momentum_floor: float | None = None
  capacity: str = "guaranteed"

  hyperparameters = ("learning_rate", "decay", "eps", "momentum")
  defaults = types.MappingProxyType({"decay": 0.9, "eps": 1e-8})

  def __post_init__(self):
    for name in ("decay_floor", "momentum_floor"):
      value = getattr(self, name)
      if value is not None and not _scale.SMALLEST <= value < 1:
        raise ValueError(f"RMSPropRule: {name} must lie in [0.5, 1), got {value}.")
    if self.capacity not in ("guaranteed", "expected"):
      raise ValueError(
        f"RMSPropRule: capacity must be 'guaranteed' or 'expected', got {self.capacity!r}."
      )
    if not 0 <= self.initial_scale < self.moment_format.max_abs:
      raise ValueError(f"RMSPropRule: initial_scale must be >= 0, got {self.initial_scale}.")

  @property
  def state_names(self) -> tuple[str, ...]:
    return ("nu", "mu", "momentum") if self.centered else ("nu", "momentum")

  @property
  def _ops(self) -> int:
    """Buffer operations (and spill tags) per step: ``nu``, ``mu`` and the trace."""
    return 3 if self.centered else 2

  def init(self, param, rows: int):
    w, ok = self.fixed.from_float(param)
    shape = w.lo.shape
    with exact_scope():
      nu, _ = self.moment_format.quantize(jnp.full(shape, self.initial_scale, jnp.float32))
      nu = _wide.split(*nu)
    mu = self.moment_format.zeros(shape) if self.centered else None
    state = RMSPropState(w, nu, mu, self.fixed.zeros(shape), buffer_lib.init(shape, rows))
    return state, ok

  def params(self, state: RMSPropState, dtype):
    return self.fixed.to_float(state.w, dtype)

  def float_state(self, state: RMSPropState, dtype):
    with exact_scope():
      moments = [self.moment_format.dequantize(_wide.join(state.nu), dtype).astype(dtype)]
      if self.centered:
        moments.append(self.moment_format.dequantize(_wide.join(state.mu), dtype).astype(dtype))
    return (*moments, self.fixed.to_float(state.momentum, dtype))

  def applied(self, hp: Mapping, dtype):
    out = {k: jnp.asarray(hp[k], dtype) for k in self.hyperparameters}
    for name in ("decay", "momentum"):
      out[name] = _moments.applied_rate(hp[name], dtype)
    return out

  # -- the exact step --------------------------------------------------------

  def _terms(self, grad, decay_scale, cd):
    """``Q((1 - d) g**2)`` (and ``Q((1 - d) g)``) with their range flags."""
    g = grad.astype(cd)
    one_minus = _scale.complement(decay_scale, cd)
    d_nu, ok = self.moment_format.quantize(one_minus * (g * g))
    d_mu = None
    if self.centered:
      d_mu, mu_ok = self.moment_format.quantize(one_minus * g)
      ok = ok & mu_ok
    return d_nu, d_mu, ok

  def _trace_term(self, grad, nu, mu, hp, decay_scale, t, cd):
    """``(Q(lr u), ok)`` from the gradient and the integer moments after the step, each
    float operation rounded on its own (:func:`revoptax._moments.rounded`)."""
    r = _moments.rounded
    fmt = self.moment_format
    second = fmt.dequantize(nu, cd)
    if self.bias_correction:
      scale = r(1 / _moments.bias_correction(decay_scale, t + 1, cd))
      second = r(second * scale)
    if self.centered:
      mean = fmt.dequantize(mu, cd)
      if self.bias_correction:
        mean = r(mean * scale)
      second = r(second - r(mean * mean))
    eps = jnp.asarray(hp["eps"], cd)
    if self.eps_in_sqrt:
      denominator = r(jnp.sqrt(r(second + eps)))
    else:
      denominator = r(r(jnp.sqrt(second)) + eps)
    u = r(grad.astype(cd) / denominator)
    return self.fixed.quantize(r(jnp.asarray(hp["learning_rate"], cd) * u))

  def step(self, state: RMSPropState, grad, hp: Mapping, t):
    cd = _compute_dtype(grad.dtype)
    decay_scale = _moments.rate_scale(hp["decay"])
    k = self._ops
    fmt = self.moment_format
    with exact_scope():
      d_nu, d_mu, ok = self._terms(grad, decay_scale, cd)
      nu, buf, buffer_ok = _moments.decay(_wide.join(state.nu), state.buffer, decay_scale, k * t)
      nu = _wide.add(nu, d_nu)
      in_range = ok & fmt.in_range(nu)
      mu = None
      if self.centered:
        mu, buf, mu_ok = _moments.decay(_wide.join(state.mu), buf, decay_scale, k * t + 1)
        mu = _wide.add(mu, d_mu)
        buffer_ok, in_range = buffer_ok & mu_ok, in_range & fmt.in_range(mu)
      nu, mu = materialize((nu, mu))
      momentum_scale = _moments.rate_scale(hp["momentum"])
      mom, buf, mom_ok = _moments.decay(join(state.momentum), buf, momentum_scale, k * t + k - 1)
      du, du_ok = self._trace_term(grad, nu, mu, hp, decay_scale, t, cd)
      mom = materialize(mom - du)
      w = materialize(join(state.w) + mom)
      in_range = in_range & du_ok & self.fixed.in_range_int(mom) & self.fixed.in_range_int(w)
      new_state = RMSPropState(
        split(w), _wide.split(*nu), None if mu is None else _wide.split(*mu), split(mom), buf
      )
    flags = StepFlags(
      nonfinite=~jnp.isfinite(grad.astype(cd)), range=~in_range, buffer=~(buffer_ok & mom_ok)
    )
    return new_state, flags

  def unstep_params(self, state: RMSPropState, hp: Mapping, t, dtype, clear_popped=False):
    del hp, t, dtype, clear_popped  # w_{t+1} = w_t + mom_{t+1}: nothing else is involved
    with exact_scope():
      return state._replace(w=split(join(state.w) - join(state.momentum)))

  def unstep_state(self, state: RMSPropState, grad, hp: Mapping, t, clear_popped=False):
    cd = _compute_dtype(grad.dtype)
    decay_scale = _moments.rate_scale(hp["decay"])
    k = self._ops
    with exact_scope():
      nu = _wide.join(state.nu)
      mu = None if state.mu is None else _wide.join(state.mu)
      du, _ = self._trace_term(grad, nu, mu, hp, decay_scale, t, cd)
      mom, buf = _moments.undecay(
        materialize(join(state.momentum) + du),
        state.buffer,
        _moments.rate_scale(hp["momentum"]),
        k * t + k - 1,
        clear_popped,
      )
      d_nu, d_mu, _ = self._terms(grad, decay_scale, cd)
      if self.centered:
        mu, buf = _moments.undecay(_wide.sub(mu, d_mu), buf, decay_scale, k * t + 1, clear_popped)
        mu = _wide.split(*mu)
      nu, buf = _moments.undecay(_wide.sub(nu, d_nu), buf, decay_scale, k * t, clear_popped)
      return RMSPropState(state.w, _wide.split(*nu), mu, split(mom), buf)

  # -- floats, checks and capacity -------------------------------------------

  def float_step(self, w, opt_state, grad, hp: Mapping, t):
    nu, *rest = opt_state
    mu, mom = rest if self.centered else (None, rest[0])
    d = hp["decay"]
    nu = d * nu + (1 - d) * grad * grad
    second = nu
    if self.centered:
      mu = d * mu + (1 - d) * grad
    scale = 1.0
    if self.bias_correction:
      scale = 1 / (1 - d ** (jnp.asarray(t, jnp.int32) + 1))
    second = nu * scale - ((mu * scale) ** 2 if self.centered else 0.0)
    if self.eps_in_sqrt:
      u = grad / jnp.sqrt(second + hp["eps"])
    else:
      u = grad / (_moments.safe_sqrt(second) + hp["eps"])
    mom = hp["momentum"] * mom - hp["learning_rate"] * u
    moments = (nu, mu) if self.centered else (nu,)
    return w + mom, (*moments, mom)

  def checks(self, hp: Mapping, learned: Mapping):
    lr, eps = jnp.asarray(hp["learning_rate"]), jnp.asarray(hp["eps"])
    out = {
      "learning_rate": ~jnp.all(jnp.isfinite(lr) & (lr >= 0)),
      "eps": ~jnp.all(jnp.isfinite(eps) & (eps >= 0)),
    }
    for name, floor in (("decay", self.decay_floor), ("momentum", self.momentum_floor)):
      rate = jnp.asarray(hp[name])
      category = "decay" if name == "decay" else "momentum_rate"
      out[category] = ~jnp.all(jnp.isfinite(rate) & (rate >= _scale.SMALLEST) & (rate < 1))
      if learned[name] or floor is not None:
        out[f"{name}_floor"] = jnp.any(rate < (DEFAULT_FLOOR if floor is None else floor))
    return out

  def bits_per_step(self, values: Mapping):
    means, variances = [], []
    for name, floor, times in (
      ("decay", self.decay_floor, 2 if self.centered else 1),
      ("momentum", self.momentum_floor, 1),
    ):
      given = values[name]
      if given is None or floor is not None:
        lam = 1 - (DEFAULT_FLOOR if floor is None else floor)
      else:
        lam = 1 - np.asarray(given, np.float64)
      mean, var = _scale.cost(lam, self.capacity == "guaranteed")
      if mean.ndim:
        mean, var = mean.reshape(mean.shape[0], -1).max(1), var.reshape(var.shape[0], -1).max(1)
      means.append(times * mean)
      variances.append(times * var)
    return sum(means), sum(variances)
