"""Float64 checks, run by test_train_x64.py in a subprocess with JAX_ENABLE_X64=1.

Kept out of the main process so the rest of the suite runs in JAX's default
32-bit mode.  Not collected on its own (the file name does not start with test_).
"""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

from revoptax import Fixed, FixedPointFormat
from revoptax import _buffer as buffer_lib

pytestmark = pytest.mark.skipif(not jax.config.jax_enable_x64, reason="needs JAX_ENABLE_X64=1")

# The float64 configuration: more fractional bits (range |x| < 256), so the
# fixed-point rounding is far below float64 training's own.
X64 = dict(fixed=FixedPointFormat(radix_bits=54, int_bits=8))
# Float64 hypergradients vs the float64 scan oracle, per element relative to
# each leaf's largest entry.
X64_RTOL = 1e-9  # observed at most 1.6e-10


@pytest.fixture(scope="module")
def problem():
  return oracle.meta_problem(jnp.float64)


def test_hypergradients_match_scan_oracle_in_float64(problem):
  val_loss, hp = problem
  got = jax.jit(jax.grad(lambda h: val_loss(h, oracle.revoptax_train_fn(**X64))))(hp)
  want = jax.jit(jax.grad(lambda h: val_loss(h, oracle.scan_train_fn())))(hp)
  oracle.assert_tree_close(got, want, X64_RTOL)


def test_hypergradients_match_central_finite_differences(problem):
  val_loss, hp = problem
  f = jax.jit(lambda h: val_loss(h, oracle.revoptax_train_fn(**X64)))
  grads = jax.jit(jax.grad(lambda h: val_loss(h, oracle.revoptax_train_fn(**X64))))(hp)
  # (name, index, step h, rtol); observed relative errors 1.8e-8, 6.6e-9,
  # 1.7e-6, 1.8e-7 and 2.2e-3.
  probes = [
    ("log_init_scale", (0,), 1e-3, 1e-7),
    ("log_init_scale", (1,), 1e-3, 1e-7),
    ("log_lr", (10, 0), 1e-3, 1e-5),
    # The largest per-example-weight gradient (the small ones are below the
    # fixed-point noise of the loss divided by h).
    (
      "example_logit",
      tuple(np.unravel_index(np.argmax(np.abs(grads["example_logit"])), (120,))),
      1e-3,
      2e-6,
    ),
    # The momentum is quantized in steps of 2**-16 (~1.5e-5 in gamma); with the
    # straight-through gradient, differences agree only to ~1% at a scale
    # well above that step.
    ("logit_mom", (30, 1), 2e-2, 1e-2),
  ]
  for name, index, h, rtol in probes:

    def at(delta, name=name, index=index):
      return f({**hp, name: hp[name].at[index].add(delta)})

    # Five-point stencil: truncation error O(h**4); the fixed-point rounding
    # noise of the loss (~1e-12) contributes ~1e-9.
    fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
    np.testing.assert_allclose(grads[name][index], fd, rtol=rtol, atol=1e-9, err_msg=name)


def test_fixed_point_words_identical_with_x64():
  """The words computed in x64 mode equal those in 32-bit mode (saved by the parent)."""
  import os

  data = np.load(os.environ["REVOPTAX_X32_WORDS"])
  x = jnp.asarray(data["x"], jnp.float32)
  fmt = FixedPointFormat()
  fixed, _ = fmt.from_float(x)
  np.testing.assert_array_equal(np.asarray(fixed.hi), data["hi"])
  np.testing.assert_array_equal(np.asarray(fixed.lo), data["lo"])
  np.testing.assert_array_equal(np.asarray(fmt.to_float(fixed)), data["back"])
  v, buf = fixed, buffer_lib.init(x.shape, 8)
  n = buffer_lib.quantize_momentum(0.9, 16)
  for t in range(100):
    v, buf, _ = buffer_lib.multiply(v, buf, n, jnp.int32(t), 16)
  np.testing.assert_array_equal(np.asarray(v.hi), data["v_hi"])
  np.testing.assert_array_equal(np.asarray(v.lo), data["v_lo"])
  np.testing.assert_array_equal(np.asarray(buf.head_lo), data["head_lo"])
  # float64 conversion: exact for values with <= 53 significant bits.
  f64 = fmt.to_float(Fixed(fixed.hi, fixed.lo), jnp.float64)
  keep = np.abs(data["x"]) >= 2.0**-22  # 24 significant bits fit above 2**-22
  np.testing.assert_array_equal(np.asarray(f64)[keep], data["x"][keep].astype(np.float64))


# AdamW (per-step x per-layer learning rates, learned b1, b2, eps and per-layer
# weight decay) and RMSProp (learned decay, eps and per-layer momentum, plain and
# centered) against float64 oracles written from their maths.
ADAM_X64 = dict(fixed=FixedPointFormat(radix_bits=54, int_bits=8), decoupled_weight_decay=True)
ADAM_X64_RTOL = 1e-8  # observed at most 1.1e-13 (AdamW), 6.0e-15 (RMSProp)


@pytest.fixture(scope="module")
def adam_problem():
  import revoptax

  val_loss, hp = oracle.adam_meta_problem(jnp.float64)
  rule = revoptax.AdamRule(**ADAM_X64)
  return val_loss, hp, lambda h: val_loss(h, oracle.adam_revoptax_train_fn(rule))


def test_adam_hypergradients_match_scan_oracle_in_float64(adam_problem):
  val_loss, hp, f = adam_problem
  got = jax.jit(jax.grad(f))(hp)
  want = jax.jit(jax.grad(lambda h: val_loss(h, oracle.adam_scan_train_fn())))(hp)
  oracle.assert_tree_close(got, want, ADAM_X64_RTOL)


def test_adam_hypergradients_match_central_finite_differences(adam_problem):
  _, hp, f = adam_problem
  f = jax.jit(f)
  grads = jax.jit(jax.grad(f))(hp)
  pixel = tuple(np.unravel_index(np.argmax(np.abs(grads["train_x"])), hp["train_x"].shape))
  # (name, index, step h, rtol).  b1, b2 and the decay are applied in steps of
  # 2**-32, so their differences need a wider h; observed relative errors
  # 1.6e-5, 6.4e-5, 1.1e-7, 6.7e-6, 5.6e-7, 1.0e-7 and below 7e-4.
  probes = [
    ("b1_logit", (), 1e-3, 1e-4),
    ("b2_logit", (), 1e-3, 5e-4),
    ("log_eps", (), 1e-4, 1e-5),
    ("log_wd", (1,), 1e-3, 1e-4),
    ("log_lr", (5, 0), 1e-4, 1e-5),
    ("log_init_scale", (0,), 1e-5, 1e-5),
    ("train_x", pixel, 1e-6, 1e-3),
  ]
  for name, index, h, rtol in probes:

    def at(delta, name=name, index=index):
      return f({**hp, name: hp[name].at[index].add(delta)})

    fd = (at(h) - at(-h)) / (2 * h)
    np.testing.assert_allclose(grads[name][index], fd, rtol=rtol, err_msg=name)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_hypergradients_match_scan_oracle_and_finite_differences(centered):
  import revoptax

  val_loss, hp = oracle.adam_meta_problem(jnp.float64, optimizer="rmsprop")
  rule = revoptax.RMSPropRule(fixed=ADAM_X64["fixed"], centered=centered)
  f = jax.jit(lambda h: val_loss(h, oracle.adam_revoptax_train_fn(rule)))
  got = jax.jit(jax.grad(lambda h: val_loss(h, oracle.adam_revoptax_train_fn(rule))))(hp)
  want = jax.jit(jax.grad(lambda h: val_loss(h, oracle.adam_scan_train_fn("rmsprop", centered))))(
    hp
  )
  oracle.assert_tree_close(got, want, ADAM_X64_RTOL)
  for name, index, h, rtol in [
    ("decay_logit", (), 1e-3, 1e-4),
    ("momentum_logit", (1,), 1e-3, 1e-4),
    ("log_lr", (5, 0), 1e-4, 1e-5),
  ]:
    fd = f({**hp, name: hp[name].at[index].add(h)}) - f({**hp, name: hp[name].at[index].add(-h)})
    np.testing.assert_allclose(got[name][index], fd / (2 * h), rtol=rtol, err_msg=name)
