"""The exact multiplication by ``1 - lam`` (:mod:`revoptax._scale`), against exact integers."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revoptax import _scale
from revoptax._fixed_point import exact_scope

LAMS = [0.0, 1e-9, 1e-7, 1e-3, 2.0**-8, 0.0039, 0.05, 0.1, 0.5, 0.75]


def _values(key, num):
  """int64 values spread over magnitudes up to 2**61, both signs, plus edge cases."""
  with exact_scope():
    k1, k2 = jax.random.split(key)
    mag = jax.random.randint(k1, (num,), 0, 2**31 - 1).astype("int64")
    shift = jax.random.randint(k2, (num,), 0, 31).astype("int64")
    v = (mag << shift) * jnp.where(jnp.arange(num) % 2 == 0, 1, -1).astype("int64")
    edge = jnp.asarray([0, 1, -1, 2, -2, 2**61, -(2**61), 2**32, -(2**32) - 1], "int64")
    return np.asarray(jnp.concatenate([v, edge]))


@pytest.mark.parametrize("lam", LAMS)
def test_multiply_then_divide_is_the_identity_and_within_4096_units(lam):
  values = _values(jax.random.key(int(lam * 1e9) % 1000), 4000)
  with exact_scope():
    scale = _scale.quantize(jnp.full(values.shape, lam, jnp.float32))
    v = jnp.asarray(values)
    head = jnp.asarray(np.random.default_rng(0).integers(2**32, 2**55, values.shape), "uint64")
    v2, h2 = jax.jit(_scale.multiply)(v, head, scale)
    v1, h1 = jax.jit(_scale.divide)(v2, h2, scale)
    np.testing.assert_array_equal(np.asarray(v1), values)
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(head))
    assert int(jnp.max(h2)) < 2**58
    n, m = int(scale.n[0]), int(scale.m[0])
  gamma = Fraction(n, 4096) * (1 - Fraction(m, 2**32))
  worst = max(abs(Fraction(int(b)) - gamma * int(a)) for a, b in zip(values, np.asarray(v2)))
  assert worst <= (Fraction(1, 2) if n == 4096 else Fraction(8193, 2)), float(worst)


@pytest.mark.parametrize("lam", [1e-7, 1e-3, 0.1])
def test_quantization_resolves_small_complements(lam):
  scale = _scale.quantize(jnp.float32(lam))
  applied = float(_scale.complement(scale, jnp.float64 if jax.config.x64_enabled else jnp.float32))
  assert abs(applied - lam) <= 2.0**-33 + 1e-7 * lam


def test_cost_is_log2_inverse_gamma_plus_the_pair_bits():
  for lam in (1e-3, 0.1, 0.5):
    mean, var = _scale.cost(lam)
    ideal = -np.log2(1 - lam)
    assert ideal <= mean <= ideal + 0.57 * min(lam, 2.0**-10), (lam, mean, ideal)
    assert 0 <= var < 0.05


@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_heads_grow_by_the_stated_cost(lam):
  values = _values(jax.random.key(1), 4000)
  steps = 200
  with exact_scope():
    scale = _scale.quantize(jnp.full(values.shape, lam, jnp.float32))
    head0 = jnp.full(values.shape, 2**32, "uint64")

    def body(carry, _):
      v, head = carry
      return _scale.multiply(v, head, scale), None

    (_, head), _ = jax.lax.scan(body, (jnp.asarray(values), head0), None, length=steps)
    grown = float(jnp.mean(jnp.log2(head.astype(jnp.float32)))) - 32
  mean, _ = _scale.cost(lam)
  assert abs(grown / steps - mean) < 0.05 * mean + 2e-4, (grown / steps, mean)


def _wide_values(key, num):
  """Python ints below 2**93 in magnitude, both signs, with edge cases."""
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 1000)))
  mags = [int(rng.integers(0, 2**62)) << int(rng.integers(0, 32)) for _ in range(num)]
  vals = [m if i % 2 else -m for i, m in enumerate(mags)]
  return vals + [0, 1, -1, 2**93 - 1, -(2**93), 2**64, -(2**64), 2**64 - 1, -(2**64) - 1]


def _to_pair(vals):
  h = np.asarray([v >> 64 for v in vals], np.int64)
  low = np.asarray([v & (2**64 - 1) for v in vals], np.uint64)
  return jnp.asarray(h), jnp.asarray(low)


def _from_pair(h, low):
  return [(int(a) << 64) + int(b) for a, b in zip(np.asarray(h), np.asarray(low))]


@pytest.mark.parametrize("lam", LAMS)
def test_wide_multiply_then_divide_is_the_identity_and_within_4096_units(lam):
  vals = _wide_values(jax.random.key(7), 3000)
  with exact_scope():
    scale = _scale.quantize(jnp.full((len(vals),), lam, jnp.float32))
    a = _to_pair(vals)
    head = jnp.asarray(np.random.default_rng(1).integers(2**32, 2**55, len(vals)), "uint64")
    a2, h2 = jax.jit(_scale.multiply_wide)(a, head, scale)
    a1, h1 = jax.jit(_scale.divide_wide)(a2, h2, scale)
    assert _from_pair(*a1) == vals
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(head))
    n, m = int(scale.n[0]), int(scale.m[0])
  gamma = Fraction(n, 4096) * (1 - Fraction(m, 2**32))
  worst = max(abs(Fraction(b) - gamma * v) for v, b in zip(vals, _from_pair(*a2)))
  assert worst <= (Fraction(1, 2) if n == 4096 else Fraction(8193, 2)), float(worst)


def test_wide_quantize_and_dequantize_are_exact_where_representable():
  from revoptax import _wide

  fmt = _wide.WideFormat()
  rng = np.random.default_rng(2)
  x = np.concatenate(
    [rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 2, 2000), [0.0, 1e-45, -3e-26, 255.9]]
  ).astype(np.float32)
  with exact_scope():
    pair, ok = fmt.quantize(jnp.asarray(x))
    assert bool(jnp.all(ok))
    got = _from_pair(*pair)
    back = np.asarray(fmt.dequantize(pair, jnp.float32))
  for xi, gi in zip(x.tolist(), got):
    exact = Fraction(xi) * 2**86
    assert abs(Fraction(gi) - exact) <= Fraction(1, 2), xi
  close = np.abs(x) > 2.0**-62  # at least 2**24 units: the conversion is float32's rounding
  np.testing.assert_allclose(back[close], x[close], rtol=2e-7)
