"""The information buffer: exact multiplication by gamma, at log2(1/gamma) bits per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import words_equal

from revoptax import FixedPointFormat
from revoptax import _buffer as buffer_lib

FMT = FixedPointFormat()
K = 16  # momentum bits


def run(v, buf, n_of_t, num_steps):
  """T multiplications then T divisions, jitted; returns (forward end, backward end)."""

  @jax.jit
  def forward(v, buf):
    def body(carry, t):
      v, buf = carry
      v, buf, ok = buffer_lib.multiply(v, buf, n_of_t(t), t, K)
      return (v, buf), ok

    return jax.lax.scan(body, (v, buf), jnp.arange(num_steps))

  @jax.jit
  def backward(v, buf):
    def body(carry, t):
      v, buf = carry
      return buffer_lib.divide(v, buf, n_of_t(t), t, K), None

    return jax.lax.scan(body, (v, buf), jnp.arange(num_steps)[::-1])[0]

  (v_end, buf_end), ok = forward(v, buf)
  return (v_end, buf_end), backward(v_end, buf_end), bool(ok.all())


def velocity(seed, shape=(700,)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape) * 10.0 ** rng.uniform(-6, 1, size=shape)
  v, ok = FMT.from_float(jnp.asarray(x, jnp.float32))
  assert bool(ok.all())
  return v


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_round_trip_is_bit_exact_and_cost_is_log2_inverse_gamma(gamma):
  num_steps = 1000
  v0 = velocity(0)
  n = buffer_lib.quantize_momentum(gamma, K)
  ideal = float(buffer_lib.bits_per_step(n, K))
  rows = buffer_lib.capacity_for(num_steps * ideal, num_steps)
  buf0 = buffer_lib.init(v0.lo.shape, rows)
  (v_end, buf_end), (v_back, buf_back), ok = run(v0, buf0, lambda t, n=n: n, num_steps)
  assert ok
  assert words_equal(v_back, v0)
  assert words_equal(buf_back, buf0)  # stack, heads, row steps and size all as at the start
  measured = float(buffer_lib.used_bits(buf_end)) / num_steps
  assert measured <= 1.02 * ideal + 64 / num_steps
  # And the cost is not below the information-theoretic minimum either.
  assert measured >= ideal - 2 / num_steps
  # v_T is v_0 * gamma_q**T up to n units of the last place per step.
  applied = float(buffer_lib.dequantize_momentum(n, K))
  expected = np.asarray(FMT.to_float(v0), np.float64) * applied**num_steps
  bound = float(n) * FMT.resolution / (1 - applied) + 1e-12
  assert np.max(np.abs(np.asarray(FMT.to_float(v_end)) - expected)) < bound


def test_random_per_step_and_per_element_momentum_round_trips():
  num_steps = 300
  v0 = velocity(1, shape=(40, 9))
  rng = np.random.default_rng(7)
  gammas = jnp.asarray(rng.uniform(0.01, 0.999, size=(num_steps, 40, 9)), jnp.float32)
  n_all = buffer_lib.quantize_momentum(gammas, K)
  total = float(jnp.sum(jnp.max(buffer_lib.bits_per_step(n_all, K), axis=(1, 2))))
  buf0 = buffer_lib.init(v0.lo.shape, buffer_lib.capacity_for(total, num_steps))
  (_, buf_end), (v_back, buf_back), ok = run(v0, buf0, lambda t: n_all[t], num_steps)
  assert ok
  assert int(buf_end.size) > 0
  assert words_equal(v_back, v0)
  assert words_equal(buf_back, buf0)


def test_momentum_quantization():
  n = buffer_lib.quantize_momentum(jnp.asarray([0.9, 0.5, 1e-9, 0.9999999, jnp.nan]), K)
  assert np.asarray(n).tolist() == [58982, 32768, 256, 65535, 256]
  applied = buffer_lib.dequantize_momentum(n, K)
  assert float(applied[0]) == 58982 / 65536


def test_full_buffer_is_reported_not_wrapped():
  v0 = velocity(2)
  n = buffer_lib.quantize_momentum(0.5, K)
  buf0 = buffer_lib.init(v0.lo.shape, 2)
  _, _, ok = run(v0, buf0, lambda t: n, 200)
  assert not ok


def test_capacity_rule_covers_measured_use():
  for gamma in (0.3, 0.6, 0.95):
    num_steps = 500
    n = buffer_lib.quantize_momentum(gamma, K)
    rows = buffer_lib.capacity_for(num_steps * float(buffer_lib.bits_per_step(n, K)), num_steps)
    v0 = velocity(3)
    (_, buf_end), _, ok = run(v0, buffer_lib.init(v0.lo.shape, rows), lambda t, n=n: n, num_steps)
    assert ok and int(buf_end.size) <= rows
