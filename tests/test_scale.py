"""The exact multiplication by ``1 - lam`` (:mod:`revoptax._scale`), against exact integers."""

import random
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revoptax import _scale, _wide
from revoptax._fixed_point import exact_scope

LAMS = [0.0, 1e-9, 1e-7, 1e-3, 2.0**-12, 0.05, 0.1, 0.3, 0.5]


def _values(seed, num, bits):
  """Python ints below ``2**bits`` in magnitude, of every bit length, both signs, and edges."""
  rng = random.Random(seed)
  vals = [rng.getrandbits(rng.randint(0, bits)) * rng.choice((1, -1)) for _ in range(num)]
  edge = [0, 1, -1, 2, -2, 255, -256, 2 ** (bits - 1), -(2 ** (bits - 1)), 2**32, -(2**32) - 1]
  return vals + edge


def _to_pair(vals):
  h = np.asarray([v >> 64 for v in vals], np.int64)
  low = np.asarray([v & (2**64 - 1) for v in vals], np.uint64)
  return jnp.asarray(h), jnp.asarray(low)


def _from_pair(h, low):
  return [(int(a) << 64) + int(b) for a, b in zip(np.asarray(h), np.asarray(low))]


def _round_trip(vals, lam, wide):
  with exact_scope():
    scale = _scale.quantize(jnp.full((len(vals),), lam, jnp.float32))
    heads = np.random.default_rng(1).integers(2**24, 2**56, len(vals), dtype=np.uint64)
    head = jnp.asarray(heads, "uint64")
    value = _to_pair(vals) if wide else jnp.asarray(np.asarray(vals, np.int64))
    new, new_head = jax.jit(_scale.multiply)(value, head, scale)
    old, old_head = jax.jit(_scale.divide)(new, new_head, scale)
    as_ints = (lambda v: _from_pair(*v)) if wide else (lambda v: [int(x) for x in np.asarray(v)])
    assert as_ints(old) == vals
    np.testing.assert_array_equal(np.asarray(old_head), heads)
    grown = np.log2(np.asarray(new_head, np.float64)) - np.log2(heads.astype(np.float64))
    return as_ints(new), grown, int(scale.m[0])


@pytest.mark.parametrize("wide", [False, True], ids=["64bit", "96bit"])
@pytest.mark.parametrize("lam", LAMS)
def test_multiply_then_divide_is_the_identity_and_within_one_unit(lam, wide):
  vals = _values(int(lam * 1e9) % 1000, 3000, 93 if wide else 61)
  new, grown, m = _round_trip(vals, lam, wide)
  gamma = 1 - Fraction(m, 2**32)
  assert max(abs(Fraction(b) - gamma * a) for a, b in zip(vals, new)) < 1
  assert new[vals.index(0)] == 0  # a zero stays zero
  assert grown.max() <= 2.0 and grown.min() >= -1e-9


@pytest.mark.parametrize("lam", [0.5, 0.1, 0.01, 1e-3, 1e-4])
def test_heads_grow_by_log2_inverse_gamma_within_the_stated_cost(lam):
  """Values far above one unit (as fixed-point moments are), many steps: the mean growth
  is within 1% of log2(1 / gamma) and its spread within the variance bound."""
  steps = 10 if lam == 0.5 else 200
  with exact_scope():
    values = jnp.asarray(np.random.default_rng(0).integers(2**50, 2**51, 20000), "int64")
    scale = _scale.quantize(jnp.full(values.shape, lam, jnp.float32))

    def body(carry, _):
      return _scale.multiply(*carry, scale), None

    head0 = jnp.full(values.shape, 2**32, "uint64")
    (_, head), _ = jax.lax.scan(body, (values, head0), None, length=steps)
  grown = np.log2(np.asarray(head, np.float64)) - 32
  bound, _ = _scale.cost(lam)
  ideal = -np.log2(1 - lam)
  assert ideal * 0.999 <= grown.mean() / steps <= ideal * 1.01, (grown.mean() / steps, ideal)
  assert grown.max() / steps <= bound, (grown.max() / steps, bound)


@pytest.mark.parametrize("lam", [1e-7, 1e-3, 0.1])
def test_quantization_resolves_small_complements(lam):
  scale = _scale.quantize(jnp.float32(lam))
  assert abs(float(_scale.complement(scale, jnp.float32)) - lam) <= 2.0**-33 + 1e-7 * lam


def test_wide_quantize_and_dequantize_are_exact_where_representable():
  fmt = _wide.WideFormat()
  rng = np.random.default_rng(2)
  x = np.concatenate(
    [
      rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 2, 2000),
      [0.0, 1e-45, -3e-26, 255.9, 65535.0],
    ]
  ).astype(np.float32)
  with exact_scope():
    pair, ok = fmt.quantize(jnp.asarray(x))
    assert bool(jnp.all(ok))
    got = _from_pair(*pair)
    back = np.asarray(fmt.dequantize(pair, jnp.float32))
  for xi, gi in zip(x.tolist(), got):
    assert abs(Fraction(gi) - Fraction(xi) * 2**78) <= Fraction(1, 2), xi
  close = np.abs(x) > 2.0**-54  # at least 2**24 units: the conversion is float32's rounding
  np.testing.assert_allclose(back[close], x[close], rtol=2e-7)


def test_a_value_stuck_at_one_costs_at_most_the_bound():
  with exact_scope():
    values = jnp.asarray([1, -1, 2, -2], "int64")
    scale = _scale.quantize(jnp.full(values.shape, 0.1, jnp.float32))
    head = jnp.full(values.shape, 2**32, "uint64")
    for _ in range(50):
      values, head = _scale.multiply(values, head, scale)
  grown = (np.log2(np.asarray(head, np.float64)) - 32) / 50
  assert np.asarray(values).tolist() == [1, -1, 1, -1]
  assert np.all(grown <= _scale.cost(0.1)[0]) and np.all(grown > 0.2)


def test_zero_and_unit_values_are_kept_and_zero_costs_nothing():
  with exact_scope():
    values = jnp.asarray([0, 1, -1, 2, -2, 0], "int64")
    scale = _scale.quantize(jnp.full(values.shape, 0.1, jnp.float32))
    head = jnp.full(values.shape, 2**40 + 12345, "uint64")
    new, new_head = _scale.multiply(values, head, scale)
    assert np.asarray(new)[:3].tolist() == [0, 1, -1]
    assert np.asarray(new)[3:5].tolist() in ([1, -1], [1, -2], [2, -1], [2, -2])
    assert int(new_head[0]) == int(head[0]) and int(new_head[5]) == int(head[5])
