"""Exactly reversible Adam and AdamW as a :class:`revoptax.ReversibleRule`.

The update (Kingma & Ba 2015; decoupled weight decay, Loshchilov & Hutter
2019), step ``t = 0, 1, ...`` with ``g_t = grad L(w_t)``::

    m_{t+1}  = b1 m_t + (1 - b1) g_t
    nu_{t+1} = b2 nu_t + (1 - b2) g_t**2
    w_{t+1}  = (1 - lr wd) w_t - lr mhat / (sqrt(nuhat + eps_root) + eps)
    mhat = m_{t+1} / (1 - b1**(t+1)),   nuhat = nu_{t+1} / (1 - b2**(t+1))

which is ``optax.adamw`` (``optax.adam`` without the ``wd`` term), with the
bias corrections of ``optax.inject_hyperparams`` when a value changes with
``t``: the current ``b1`` and ``b2`` to the power ``t + 1``.

Exactly, with ``w``, ``m`` and ``nu`` fixed-point integers, each operation is
invertible::

    m  <- b1 m                         exact (revoptax._scale), lost bits to the buffer
    m  <- m + Q((1 - b1) g_t)          undone by subtracting the same integer
    nu <- b2 nu                        the same
    nu <- nu + Q((1 - b2) g_t**2)
    w  <- (1 - lr wd) w                AdamW only, exact through the buffer
    w  <- w - Q(lr mhat / (...))       from m, nu after the step: recomputed bitwise

and undone in the reverse order: the weight update from the state after the
step, the decay, then (given the gradient recomputed at ``w_t``) ``nu`` and
``m``.  The buffer stores ``log2(1 / b1) + log2(1 / b2)`` (``+ log2(1 / (1 -
lr wd))``) bits per element per step on average; its capacity is sized for
each element's worst case (:func:`revoptax._scale.cost`).
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
from revoptax import _moments, _scale, _wide
from revoptax._fixed_point import Fixed, FixedPointFormat, _compute_dtype, exact_scope, join, split
from revoptax._fusion import materialize
from revoptax._rule import StepFlags
from revoptax._sgd import _straight_through

# Values assumed for the buffer capacity when a value is learned and no bound is given.
DEFAULT_B1_FLOOR = 0.5
DEFAULT_B2_FLOOR = 0.9
DEFAULT_DECAY_CEILING = 2.0**-8
# The first moment's format: |m| < 256 at a resolution of 2**-54 (5.6e-17).
MOMENT_FORMAT = FixedPointFormat(radix_bits=54, int_bits=8)


class AdamState(NamedTuple):
  """Exact state of Adam for one array: weights, first and second moments, buffer."""

  w: Fixed
  mu: Fixed
  nu: _wide.Wide
  buffer: buffer_lib.BufferState


@dataclasses.dataclass(frozen=True)
class AdamRule:
  """Exactly reversible Adam, and AdamW with ``decoupled_weight_decay=True``.

  Hyperparameters per step: ``learning_rate`` (``>= 0``), ``b1`` and ``b2`` (in
  ``[1/2, 1)``), ``eps`` and ``eps_root`` (``>= 0``), and for AdamW
  ``weight_decay`` (``>= 0``, with ``learning_rate * weight_decay <= 1/2``).
  ``b1``, ``b2`` and ``1 - lr wd`` are applied as the quantized
  ``1 - k / 2**32`` of :mod:`revoptax._scale` (within ``2**-33`` of the value;
  that value is the one applied and reported).

  Attributes:
    fixed: fixed-point format of the weights (64-bit).
    moment_format: 64-bit format of ``mu`` (default ``|m| < 256`` at
      ``2**-54``: a gradient of ``1e-8`` is held to ``6e-9`` relative).
    second_moment_format: 96-bit format of ``nu`` (default ``nu < 65536`` at
      ``2**-78 = 3.3e-24``).  ``nu`` needs the width: one step adds
      ``(1 - b2) g**2``, ``1e-19`` for ``g = 1e-8``, and a 64-bit format
      resolving ``2**-54`` would drop it and random-walk in its last units.
    decoupled_weight_decay: AdamW (hyperparameter ``weight_decay``).
    b1_floor, b2_floor: the smallest ``b1``, ``b2`` a learned schedule may
      use: the buffer is sized for them (defaults 0.5 and 0.9 when traced;
      exact from the values when they are concrete and no floor is given).
      A step below a floor is reported.
    decay_ceiling: the largest ``learning_rate * weight_decay`` a learned
      schedule may use (default ``2**-8``), likewise.
    capacity: ``"guaranteed"`` (default): the buffer holds every element's worst
      case, about twice ``log2(1 / b)`` per multiplication, so it cannot run out;
      ``"expected"``: about the average ``log2(1 / b)`` plus a margin, half the
      memory, reported if it runs out (see :func:`revoptax._scale.cost`).

  Example:
    >>> import jax.numpy as jnp, revoptax
    >>> rule = revoptax.AdamRule()
    >>> state, ok = rule.init(jnp.ones(2), rows=1)
    >>> hp = {"learning_rate": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0}
    >>> state, flags = rule.step(state, jnp.asarray([1.0, -2.0]), hp, 0)
    >>> [round(x, 6) for x in rule.params(state, jnp.float32).tolist()]  # 1 -/+ 0.1
    [0.9, 1.1]
  """

  fixed: FixedPointFormat = FixedPointFormat()
  moment_format: FixedPointFormat = MOMENT_FORMAT
  second_moment_format: _wide.WideFormat = _wide.WideFormat()
  decoupled_weight_decay: bool = False
  b1_floor: float | None = None
  b2_floor: float | None = None
  decay_ceiling: float | None = None
  capacity: str = "guaranteed"

  state_names = ("mu", "nu")

  def __post_init__(self):
    for name in ("b1_floor", "b2_floor"):
      value = getattr(self, name)
      if value is not None and not _scale.SMALLEST <= value < 1:
        raise ValueError(f"AdamRule: {name} must lie in [0.5, 1), got {value}.")
    if self.capacity not in ("guaranteed", "expected"):
      raise ValueError(
        f"AdamRule: capacity must be 'guaranteed' or 'expected', got {self.capacity!r}."
      )
    if self.decay_ceiling is not None and not 0 < self.decay_ceiling <= 1 - _scale.SMALLEST:
      raise ValueError(f"AdamRule: decay_ceiling must lie in (0, 0.5], got {self.decay_ceiling}.")

  @property
  def hyperparameters(self) -> tuple[str, ...]:
    names = ("learning_rate", "b1", "b2", "eps", "eps_root")
    return names + (("weight_decay",) if self.decoupled_weight_decay else ())

  @property
  def defaults(self) -> Mapping[str, float]:
    values = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "weight_decay": 1e-4}
    return types.MappingProxyType({k: values[k] for k in self.hyperparameters[1:]})

  @property
  def _ops(self) -> int:
    """Buffer operations (and spill tags) per step: ``mu``, ``nu`` and the decay."""
    return 3 if self.decoupled_weight_decay else 2

  # -- quantization ----------------------------------------------------------

  def _scales(self, hp: Mapping):
    """The :class:`revoptax._scale.Scale` of ``b1``, ``b2`` and (AdamW) the decay
    ``learning_rate * weight_decay``, each complement computed in the values' own
    precision before it is rounded to float32."""
    scales = [_moments.rate_scale(hp[name]) for name in ("b1", "b2")]
    if self.decoupled_weight_decay:
      lam = jnp.asarray(hp["learning_rate"]) * jnp.asarray(hp["weight_decay"])
      scales.append(_scale.quantize(lam))
    return scales

  def applied(self, hp: Mapping, dtype):
    scales = self._scales(hp)
    out = {k: jnp.asarray(hp[k], dtype) for k in self.hyperparameters}
    for name in ("b1", "b2"):
      out[name] = _moments.applied_rate(hp[name], dtype)
    if self.decoupled_weight_decay:
      lr = out["learning_rate"]
      value = jnp.where(lr > 0, _scale.complement(scales[2], dtype) / lr, out["weight_decay"])
      out["weight_decay"] = _straight_through(out["weight_decay"], jax.lax.stop_gradient(value))
    return out

  # -- the interface ---------------------------------------------------------

  def init(self, param, rows: int):
    w, ok = self.fixed.from_float(param)
    shape = w.lo.shape
    mu, nu = self.moment_format.zeros(shape), self.second_moment_format.zeros(shape)
    return AdamState(w, mu, nu, buffer_lib.init(shape, rows)), ok

  def params(self, state: AdamState, dtype):
    return self.fixed.to_float(state.w, dtype)

  def float_state(self, state: AdamState, dtype):
    mu = self.moment_format.to_float(state.mu, dtype)
    with exact_scope():
      nu = self.second_moment_format.dequantize(_wide.join(state.nu), dtype)
    return (mu, nu.astype(dtype))

  def _moment_terms(self, grad, scales, cd):
    """``(Q((1 - b1) g), Q((1 - b2) g**2))`` with their range flags (inside ``exact_scope``)."""
    g = grad.astype(cd)
    d_mu, mu_ok = self.moment_format.quantize(_scale.complement(scales[0], cd) * g)
    d_nu, nu_ok = self.second_moment_format.quantize(_scale.complement(scales[1], cd) * (g * g))
    return d_mu, d_nu, mu_ok & nu_ok

  def _update(self, mu, nu, hp, scales, t, cd):
    """``(Q(lr mhat / (sqrt(nuhat + eps_root) + eps)), ok)`` from the integer moments, each
    float operation rounded on its own (:func:`revoptax._moments.rounded`)."""
    r = _moments.rounded
    inv_c1 = r(1 / _moments.bias_correction(scales[0], t + 1, cd))
    inv_c2 = r(1 / _moments.bias_correction(scales[1], t + 1, cd))
    m_hat = r(self.moment_format.dequantize(mu, cd) * inv_c1)
    nu_hat = r(self.second_moment_format.dequantize(nu, cd) * inv_c2)
    eps, eps_root = jnp.asarray(hp["eps"], cd), jnp.asarray(hp["eps_root"], cd)
    denominator = r(r(jnp.sqrt(r(nu_hat + eps_root))) + eps)
    step = r(jnp.asarray(hp["learning_rate"], cd) * m_hat)
    return self.fixed.quantize(r(step / denominator))

  def step(self, state: AdamState, grad, hp: Mapping, t):
    cd = _compute_dtype(grad.dtype)
    scales = self._scales(hp)
    k = self._ops
    wide = self.second_moment_format
    with exact_scope():
      d_mu, d_nu, terms_ok = self._moment_terms(grad, scales, cd)
      mu, buf, ok_mu = _moments.decay(join(state.mu), state.buffer, scales[0], k * t)
      nu, buf, ok_nu = _moments.decay(_wide.join(state.nu), buf, scales[1], k * t + 1)
      mu, nu = materialize((mu + d_mu, _wide.add(nu, d_nu)))
      w, buffer_ok = join(state.w), ok_mu & ok_nu
      if self.decoupled_weight_decay:
        w, buf, ok_w = _moments.decay(w, buf, scales[2], k * t + 2)
        buffer_ok = buffer_ok & ok_w
      du, du_ok = self._update(mu, nu, hp, scales, t, cd)
      w = materialize(w - du)
      in_range = terms_ok & du_ok & self.moment_format.in_range_int(mu) & wide.in_range(nu)
      in_range = in_range & self.fixed.in_range_int(w)
      new_state = AdamState(split(w), split(mu), _wide.split(*nu), buf)
    return new_state, StepFlags(
      nonfinite=~jnp.isfinite(grad.astype(cd)), range=~in_range, buffer=~buffer_ok
    )

  def unstep_params(self, state: AdamState, hp: Mapping, t, dtype, clear_popped=False):
    cd = _compute_dtype(dtype)
    scales = self._scales(hp)
    with exact_scope():
      du, _ = self._update(join(state.mu), _wide.join(state.nu), hp, scales, t, cd)
      w = materialize(join(state.w) + du)
      buf = state.buffer
      if self.decoupled_weight_decay:
        w, buf = _moments.undecay(w, buf, scales[2], self._ops * t + 2, clear_popped)
      return state._replace(w=split(w), buffer=buf)

  def unstep_state(self, state: AdamState, grad, hp: Mapping, t, clear_popped=False):
    cd = _compute_dtype(grad.dtype)
    scales = self._scales(hp)
    k = self._ops
    with exact_scope():
      d_mu, d_nu, _ = self._moment_terms(grad, scales, cd)
      mu, nu = materialize((join(state.mu) - d_mu, _wide.sub(_wide.join(state.nu), d_nu)))
      nu, buf = _moments.undecay(nu, state.buffer, scales[1], k * t + 1, clear_popped)
      mu, buf = _moments.undecay(mu, buf, scales[0], k * t, clear_popped)
      return AdamState(state.w, split(mu), _wide.split(*nu), buf)

  def float_step(self, w, opt_state, grad, hp: Mapping, t):
    mu, nu = opt_state
    b1, b2, lr = hp["b1"], hp["b2"], hp["learning_rate"]
    mu = b1 * mu + (1 - b1) * grad
    nu = b2 * nu + (1 - b2) * grad * grad
    count = jnp.asarray(t, jnp.int32) + 1
    m_hat = mu / (1 - b1**count)
    nu_hat = nu / (1 - b2**count)
    if self.decoupled_weight_decay:
      w = (1 - lr * hp["weight_decay"]) * w
    return w - lr * m_hat / (_moments.safe_sqrt(nu_hat + hp["eps_root"]) + hp["eps"]), (mu, nu)

  def checks(self, hp: Mapping, learned: Mapping):
    lr = jnp.asarray(hp["learning_rate"])
    out = {"learning_rate": ~jnp.all(jnp.isfinite(lr) & (lr >= 0))}
    for name, floor in (("b1", self.b1_floor), ("b2", self.b2_floor)):
      b = jnp.asarray(hp[name])
      out[name] = ~jnp.all(jnp.isfinite(b) & (b >= _scale.SMALLEST) & (b < 1))
      if learned[name] or floor is not None:
        out[f"{name}_floor"] = jnp.any(b < self._floor(name))
    for name in ("eps", "eps_root"):
      e = jnp.asarray(hp[name])
      out[name] = ~jnp.all(jnp.isfinite(e) & (e >= 0))
    if self.decoupled_weight_decay:
      wd = jnp.asarray(hp["weight_decay"])
      lam = lr * wd
      out["weight_decay"] = ~jnp.all(jnp.isfinite(wd) & (wd >= 0) & (lam <= 1 - _scale.SMALLEST))
      if learned["learning_rate"] or learned["weight_decay"] or self.decay_ceiling is not None:
        out["decay_ceiling"] = jnp.any(lam > self._decay_ceiling())
    return out

  def _floor(self, name) -> float:
    given = self.b1_floor if name == "b1" else self.b2_floor
    if given is not None:
      return given
    return DEFAULT_B1_FLOOR if name == "b1" else DEFAULT_B2_FLOOR

  def _decay_ceiling(self) -> float:
    return DEFAULT_DECAY_CEILING if self.decay_ceiling is None else self.decay_ceiling

  def bits_per_step(self, values: Mapping):
    lams = []
    for name, floor in (("b1", self.b1_floor), ("b2", self.b2_floor)):
      given = values[name]
      if given is None or floor is not None:
        lams.append(1 - self._floor(name))
      else:
        lams.append(1 - np.asarray(given, np.float64))
    if self.decoupled_weight_decay:
      lr, wd = values["learning_rate"], values["weight_decay"]
      if lr is None or wd is None or self.decay_ceiling is not None:
        lams.append(self._decay_ceiling())
      else:
        lams.append(np.asarray(lr, np.float64) * np.asarray(wd, np.float64))
    return _total_cost(lams, self.capacity == "guaranteed")


def _total_cost(lams, guaranteed: bool):
  """``(mean, variance)`` per step: the worst element of each step, summed over quantities."""
  means, variances = [], []
  for lam in lams:
    mean, var = _scale.cost(lam, guaranteed)
    if mean.ndim:
      mean, var = mean.reshape(mean.shape[0], -1).max(1), var.reshape(var.shape[0], -1).max(1)
    means.append(mean)
    variances.append(var)
  return sum(means), sum(variances)
