"""Buffer bits and memory measured through what users run: train and reversible_sgd.

The information-theoretic cost of multiplying by gamma is log2(1/gamma) bits
per parameter per step.  Bits *used* are read from the buffers themselves
(32 per spilled row plus the heads' growth past their initial 32 bits);
bits *allocated* are the rows the capacity rule reserved plus the two head
words.  The limits: 1.02 x the ideal, plus 2 bits (used) or four 32-bit words
per parameter (allocated); measured used bits are within 1.0005x + 0.01 bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cross_entropy, digits_data, init_mlp
from oracle import quantized_momentum

import revoptax

USED_SLACK_BITS = 2.0
ALLOCATED_SLACK_BITS = 4 * 32.0


def ideal_bits(gamma, num_steps):
  return num_steps * -np.log2(float(quantized_momentum(jnp.float32(gamma))))


def used_bits(head_hi, head_lo, size):
  """Mean bits per element held by a buffer beyond its initial 32-bit heads."""
  heads = np.asarray(head_hi, np.float64) * 2.0**32 + np.asarray(head_lo, np.float64)
  return 32.0 * int(size) + float(np.mean(np.log2(heads))) - 32.0


def train_buffers(vjp_fn):
  """``(head_hi, head_lo, stack, size)`` of each buffer in the residuals of ``train``.

  The residuals hold the exact state per group as the leaves of
  ``(w.hi, w.lo, v.hi, v.lo, head_hi, head_lo, stack, row_step, size)``.
  """
  leaves = jax.tree.leaves(vjp_fn)
  found = []
  for i in range(4, len(leaves) - 2):
    hi, lo, stack, row_step, size = leaves[i - 2 : i + 3]
    if (
      stack.dtype == jnp.uint32
      and stack.ndim >= 2
      and hi.dtype == lo.dtype == jnp.uint32
      and hi.shape == lo.shape == stack.shape[1:]
      and row_step.dtype == jnp.int32
      and row_step.shape == stack.shape[:1]
      and size.shape == ()
    ):
      found.append((hi, lo, stack, size))
  assert found, "no buffer found in train's residuals"
  return found


def sin_loss(p, hp, x):
  return sum(jnp.sum(jnp.sin(w * x[0] + x[1])) for w in jax.tree.leaves(p))


def train_vjp(gamma, num_steps, traced_momentum=False, momentum_floor=None):
  params = {"a": jnp.linspace(-1.0, 1.0, 300), "b": jnp.ones((20, 5))}
  data = jnp.asarray(np.random.default_rng(0).normal(size=(7, 2)), jnp.float32)

  def f(hp):
    momentum = (lambda hp, t: hp["momentum"]) if traced_momentum else (lambda hp, t: gamma)
    return revoptax.train(
      sin_loss,
      params,
      hp,
      data,
      num_steps=num_steps,
      learning_rate=lambda hp, t: hp["lr"],
      momentum=momentum,
      rule=revoptax.MomentumSGDRule(momentum_floor=momentum_floor),
    )

  hp = {"lr": jnp.asarray(0.05), "momentum": jnp.asarray(gamma)}
  return jax.vjp(f, hp)[1]


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_train_uses_and_allocates_log2_inverse_gamma(gamma):
  num_steps = 1000
  ideal = ideal_bits(gamma, num_steps)
  for hi, lo, stack, size in train_buffers(train_vjp(gamma, num_steps)):
    used = used_bits(hi, lo, size)
    assert ideal - 0.5 <= used <= 1.02 * ideal + USED_SLACK_BITS, (used, ideal)
    allocated = 32.0 * stack.shape[0] + 64.0
    assert allocated <= 1.02 * ideal + ALLOCATED_SLACK_BITS, (allocated, ideal)


def test_train_allocates_for_momentum_floor_when_momenta_are_traced():
  num_steps, floor = 2000, 0.9
  buffers = train_buffers(train_vjp(0.95, num_steps, traced_momentum=True, momentum_floor=floor))
  for hi, lo, stack, size in buffers:
    allocated = 32.0 * stack.shape[0] + 64.0
    assert allocated <= 1.02 * ideal_bits(floor, num_steps) + ALLOCATED_SLACK_BITS
    assert used_bits(hi, lo, size) <= 1.02 * ideal_bits(0.95, num_steps) + USED_SLACK_BITS


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_reversible_sgd_uses_and_allocates_log2_inverse_gamma(gamma):
  num_steps = 1000
  params = {"a": jnp.linspace(-1.0, 1.0, 300), "b": jnp.ones((20, 5))}
  tx = revoptax.reversible_sgd(0.05, gamma, max_steps=num_steps)
  grad = jax.grad(lambda p, t: sin_loss(p, None, (jnp.cos(t), jnp.sin(t))))

  @jax.jit
  def run(params):
    def step(carry, t):
      p, s = carry
      u, s = tx.update(grad(p, t.astype(jnp.float32)), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(num_steps))[0][1]

  state = run(params)
  ideal = ideal_bits(gamma, num_steps)
  buffer = state.exact.buffer
  for hi, lo, stack, size in zip(
    jax.tree.leaves(buffer.head_hi),
    jax.tree.leaves(buffer.head_lo),
    jax.tree.leaves(buffer.stack),
    state.buffer_size,
  ):
    used = used_bits(hi, lo, size)
    assert ideal - 0.5 <= used <= 1.02 * ideal + USED_SLACK_BITS, (used, ideal)
    allocated = 32.0 * stack.shape[0] + 64.0
    assert allocated <= 1.02 * ideal + ALLOCATED_SLACK_BITS, (allocated, ideal)


def test_capacity_holds_a_long_run_at_high_momentum():
  """T = 20,000 at gamma = 0.99: the rule's margin for the largest head is enough."""
  num_steps = 20000
  hi, lo, stack, size = train_buffers(train_vjp(0.99, num_steps))[0]
  assert int(size) <= stack.shape[0]
  assert used_bits(hi, lo, size) <= 1.02 * ideal_bits(0.99, num_steps) + USED_SLACK_BITS


def digits_val_loss(num_steps, gamma=0.9):
  """The digits MLP 64-50-50-10 meta-problem of the benchmarks, learned momenta."""
  xb, yb, xv, yv = digits_data()

  def loss_fn(params, hp, batch):
    l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
    return cross_entropy(params, *batch) + jnp.exp(hp["log_l2"]) * l2

  hp = {
    "log_lr": jnp.full((num_steps,), jnp.log(0.3)),
    "logit_mom": jnp.full((num_steps,), jnp.log(gamma / (1 - gamma))),
    "log_l2": jnp.asarray(-6.0),
  }

  def val_loss(hp):
    params = revoptax.train(
      loss_fn,
      init_mlp(jax.random.key(0)),
      hp,
      (xb, yb),
      num_steps=num_steps,
      learning_rate=lambda hp, t: jnp.exp(hp["log_lr"][t]),
      momentum=lambda hp, t: jax.nn.sigmoid(hp["logit_mom"][t]),
      rule=revoptax.MomentumSGDRule(momentum_floor=gamma),
    )
    return cross_entropy(params, xv, yv)

  return val_loss, hp


def test_temp_memory_at_10000_steps_is_within_the_documented_bound():
  """docs/guarantees.md: XLA temp memory of jit(grad) at T = 10,000 is at most 3x T = 100
  (digits MLP, gamma = 0.9; compiled only, not run)."""

  def temp_bytes(num_steps):
    val_loss, hp = digits_val_loss(num_steps)
    compiled = jax.jit(jax.grad(val_loss)).lower(hp).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(100), temp_bytes(10_000)
  assert large <= 3 * small, (small, large)
