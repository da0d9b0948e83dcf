"""reversible_adam and reversible_adamw: exact inverse, Optax agreement, buffer cost, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cross_entropy, default_and_slow, digits_data, init_mlp, words_equal
from oracle import assert_tree_close
from test_sgd import train_then_reverse

import revoptax
from revoptax import _buffer as buffer_lib
from revoptax._optax import _unpack

NUM_STEPS = 1000


def digits_grad_at():
  """The gradient of the digits MLP at step t, on minibatch t mod 10."""
  xb, yb, _, _ = digits_data()
  return lambda p, t: jax.grad(cross_entropy)(p, xb[t % 10], yb[t % 10])


ROUND_TRIPS = {
  # Per-leaf learning rates and moments (layer 0 slower), one b2 per step.
  "adam_per_leaf": lambda: revoptax.reversible_adam(
    {"layer0": 3e-3, "layer1": 1e-3, "layer2": {"w": 1e-3, "b": 3e-4}},
    b1={"layer0": 0.8, "layer1": 0.9, "layer2": 0.95},
    b2=lambda t: 0.99 + 0.009 * jnp.cos(t.astype(jnp.float32) * 0.01),
    max_steps=NUM_STEPS,
  ),
  # AdamW with a warmup-cosine learning rate, a per-step b1 and per-leaf decay.
  "adamw_per_step": lambda: revoptax.reversible_adamw(
    optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, NUM_STEPS),
    b1=lambda t: 0.85 + 0.1 * jnp.sin(t.astype(jnp.float32) * 0.003) ** 2,
    weight_decay={"layer0": 0.1, "layer1": 0.01, "layer2": 0.0},
    max_steps=NUM_STEPS,
  ),
}


@pytest.mark.parametrize(
  "name, num_steps",
  [
    ("adam_per_leaf", 200),
    *(pytest.param(n, NUM_STEPS, marks=pytest.mark.slow) for n in ROUND_TRIPS),
  ],
)
def test_round_trip_on_digits_is_bit_exact(name, num_steps):
  tx = ROUND_TRIPS[name]()
  params = init_mlp(jax.random.key(0))
  state0, (p_end, s_end), (p_back, s_back) = train_then_reverse(
    tx, params, digits_grad_at(), num_steps
  )
  assert not words_equal(p_end, params)
  assert int(jnp.max(s_end.buffer_size)) > 0  # rows were spilled and popped back
  assert words_equal(p_back, params)
  assert words_equal(s_back, state0)  # w, mu, nu, buffer and log all back to the start


def _trajectories(tx, reference, num_steps=100):
  """Params after ``num_steps`` digits minibatch steps of ``tx`` and of ``reference``."""
  grad_at = digits_grad_at()
  params = init_mlp(jax.random.key(1))

  @jax.jit
  def run(params):
    def step(carry, t):
      p, s, q, r = carry
      u, s = tx.update(grad_at(p, t), s, p)
      v, r = reference.update(grad_at(q, t), r, q)
      return (optax.apply_updates(p, u), s, optax.apply_updates(q, v), r), None

    init = (params, tx.init(params), params, reference.init(params))
    return jax.lax.scan(step, init, jnp.arange(num_steps))[0]

  return run(params)


TRAJECTORIES = {
  "adam": (lambda: revoptax.reversible_adam(1e-3, max_steps=100), lambda: optax.adam(1e-3)),
  "adam_b2_0.99": (
    lambda: revoptax.reversible_adam(3e-3, b1=0.8, b2=0.99, eps=1e-7, max_steps=100),
    lambda: optax.adam(3e-3, b1=0.8, b2=0.99, eps=1e-7),
  ),
  "adamw": (
    lambda: revoptax.reversible_adamw(1e-3, max_steps=100),
    lambda: optax.adamw(1e-3),
  ),
  "adamw_strong_decay": (
    lambda: revoptax.reversible_adamw(3e-3, weight_decay=0.3, max_steps=100),
    lambda: optax.adamw(3e-3, weight_decay=0.3),
  ),
}


@pytest.mark.parametrize("name", default_and_slow(TRAJECTORIES, default=("adamw",)))
def test_trajectory_matches_optax_with_the_same_unquantized_arguments(name):
  ours, theirs = TRAJECTORIES[name]
  p, s, q, r = _trajectories(ours(), theirs())
  # Per element, relative to each leaf's largest weight: observed at most 8.5e-6 (the
  # float32 rounding of optax's own steps: optax against itself with b1, b2 moved by
  # 2**-24 differs as much).
  assert_tree_close(p, q, 1e-4)
  # The moments mirror optax's mu and nu.
  inner = r[0]
  for exact, m, v in zip(_unpack(s), jax.tree.leaves(inner.mu), jax.tree.leaves(inner.nu)):
    got_mu, got_nu = revoptax.AdamRule().float_state(exact, jnp.float32)
    np.testing.assert_allclose(got_mu, m, rtol=0, atol=1e-3 * float(jnp.max(jnp.abs(m))))
    np.testing.assert_allclose(got_nu, v, rtol=0, atol=1e-3 * float(jnp.max(jnp.abs(v))))


def _used_bits_per_step(tx, num_steps):
  """Buffer bits per parameter per step after ``num_steps`` digits steps of ``tx``:
  ``(mean, largest, allocated)``, the mean over all elements, the largest head of each
  leaf (which sets the rows spilled: rows are spilled for all elements at once) and the
  rows allocated, each averaged over the leaves weighted by size."""
  grad_at = digits_grad_at()
  params = init_mlp(jax.random.key(2))

  @jax.jit
  def run(params):
    def step(carry, t):
      p, s = carry
      u, s = tx.update(grad_at(p, t), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(num_steps))[0][1]

  state = run(params)
  sizes = np.asarray([x.size for x in jax.tree.leaves(params)], np.float64)
  leaves = _unpack(state)
  mean = [float(buffer_lib.used_bits(e.buffer)) for e in leaves]
  largest = [float(buffer_lib.used_bits(e.buffer, largest=True)) for e in leaves]
  allocated = [32.0 * e.buffer.stack.shape[0] + 24.0 for e in leaves]  # + the head's room
  return tuple(
    float(np.dot(b, sizes) / sizes.sum()) / num_steps for b in (mean, largest, allocated)
  )


@pytest.mark.parametrize(
  "name, tx, ideal",
  [
    ("adam", lambda: revoptax.reversible_adam(1e-3, max_steps=NUM_STEPS), [0.9, 0.999]),
    pytest.param(
      "adamw",
      lambda: revoptax.reversible_adamw(1e-3, weight_decay=0.1, max_steps=NUM_STEPS),
      [0.9, 0.999, 1 - 1e-4],
      marks=pytest.mark.slow,
    ),
    pytest.param(
      "adam_low_b1",
      lambda: revoptax.reversible_adam(1e-3, b1=0.5, max_steps=NUM_STEPS),
      [0.5, 0.999],
      marks=pytest.mark.slow,
    ),
  ],
)
def test_buffer_costs_log2_inverse_of_each_decay_within_2_percent(name, tx, ideal):
  mean, largest, allocated = _used_bits_per_step(tx(), NUM_STEPS)
  target = sum(-np.log2(g) for g in ideal)
  # The information stored per parameter: observed 0.998x to 1.000x the ideal.
  assert 0.99 * target <= mean <= 1.02 * target, (mean, target)
  # The rows hold every element's worst case (about twice the ideal at b1 = 0.9, see
  # revoptax._scale.cost), so the largest head never runs out.
  assert largest <= allocated


def test_nesterov_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="nesterov=True is not exactly reversible"):
    revoptax.reversible_adam(1e-3, nesterov=True, max_steps=10)


@pytest.mark.parametrize(
  "factory, kwargs, match",
  [
    (revoptax.reversible_adam, dict(b1=0.0), r"b1 must lie in \[0.5, 1\)"),
    (revoptax.reversible_adam, dict(b2=1.0), r"b2 must lie in \[0.5, 1\)"),
    (revoptax.reversible_adam, dict(b1=float("nan")), "b1 must lie in"),
    (revoptax.reversible_adam, dict(eps=-1e-8), "eps must be non-negative"),
    (revoptax.reversible_adamw, dict(weight_decay=-0.1), "weight_decay must be non-negative"),
    (revoptax.reversible_adamw, dict(weight_decay=1e3), r"learning_rate \* weight_decay <= 0.5"),
    (revoptax.reversible_adam, dict(learning_rate=-1.0), "learning_rate must be"),
  ],
)
def test_bad_values_raise_before_any_params(factory, kwargs, match):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  with pytest.raises(ValueError, match=match):
    factory(max_steps=10, **kwargs).init({"w": jnp.ones(3)})


def test_wrong_rule_for_the_factory_raises():
  with pytest.raises(TypeError, match="decoupled_weight_decay=True"):
    revoptax.reversible_adamw(1e-3, rule=revoptax.AdamRule(), max_steps=10)


def test_b1_below_its_floor_is_reported_in_train_given_or_learned():
  def run(hp):
    w = revoptax.train(
      lambda w, hp, x: jnp.sum((w - x) ** 2),
      jnp.zeros(3),
      hp,
      jnp.ones((2, 3)),
      num_steps=5,
      rule=revoptax.AdamRule(b1_floor=0.8),
      learning_rate=lambda hp, t: 0.1,
      b1=lambda hp, t: hp["b1"],
    )
    return jnp.sum(w)

  with pytest.raises(ValueError, match="b1 is below b1_floor, got 0.69999.* at step 0"):
    run({"b1": 0.7})
  with pytest.raises(Exception, match=r"b1 of leaf .* at step 0 is below the b1_floor"):
    jax.grad(run)({"b1": jnp.float32(0.7)})


def test_train_hypergradients_match_the_float32_oracle():
  from oracle import adam_meta_problem, adam_revoptax_train_fn, adam_scan_train_fn

  val_loss, hp = adam_meta_problem()
  got = jax.jit(jax.grad(lambda h: val_loss(h, adam_revoptax_train_fn())))(hp)
  want = jax.jit(jax.grad(lambda h: val_loss(h, adam_scan_train_fn())))(hp)
  # float32 training on both sides: observed at most 4e-5 (b2, whose gradient is small).
  assert_tree_close(got, want, 3e-4)


def test_train_reverses_adamw_bitwise_with_per_step_learning_rates():
  """A regression: a bias correction computed with transcendental functions compiled to
  other bits in the backward pass (reported as buffer corruption or drift)."""

  def val_loss(hp):
    w = revoptax.train(
      lambda w, hp, x: jnp.sum((w - x) ** 2),
      jnp.full(3, 0.3),
      hp,
      jnp.ones((4, 3)),
      num_steps=30,
      rule=revoptax.AdamRule(decoupled_weight_decay=True, decay_ceiling=0.01),
      learning_rate=lambda hp, t: jnp.exp(hp["log_lr"][t]),
      b1=lambda hp, t: revoptax.momentum_above(0.5, hp["b1_logit"]),
      weight_decay=lambda hp, t: jnp.exp(hp["log_wd"]),
    )
    return jnp.sum((w - 0.5) ** 2)

  hp = {
    "log_lr": jnp.full(30, jnp.log(0.05)),
    "b1_logit": jnp.float32(1.4),
    "log_wd": jnp.log(jnp.float32(0.1)),
  }
  grads = jax.grad(val_loss)(hp)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("lam", [0.5, 0.1, 1e-3, 1e-4])
def test_bias_correction_is_exact_to_62_bits(lam):
  from fractions import Fraction

  from revoptax import _moments, _scale
  from revoptax._fixed_point import exact_scope

  with exact_scope():
    scale = _scale.quantize(jnp.float32(lam))
    counts = [1, 2, 3, 7, 100, 999]
    got = [float(_moments.bias_correction(scale, n, jnp.float32)) for n in counts]
  gamma = 1 - Fraction(int(scale.m), 2**32)
  for n, value in zip(counts, got):
    want = 1 - gamma**n
    assert abs(Fraction(value) - want) <= want * Fraction(1, 2**23), (n, value, float(want))
