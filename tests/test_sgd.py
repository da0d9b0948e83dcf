"""reversible_sgd as an Optax transformation: exact inverse, Optax semantics, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cross_entropy, init_mlp, words_equal
from oracle import assert_tree_close, quantized_momentum

import revoptax
from revoptax._optax import _unpack


def mixed_params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {
    "dense": {"w": jax.random.normal(k1, (7, 5)), "b": jnp.zeros((5,))},
    "emb": jax.random.normal(k2, (11, 3)).astype(jnp.bfloat16),
    "scalar": jnp.asarray(0.3, jnp.float32),
    "vec16": jax.random.normal(k3, (4,)).astype(jnp.bfloat16),
  }


def mixed_loss(p, t):
  x = jnp.sin(jnp.arange(7.0) + t)
  h = jnp.tanh(x @ p["dense"]["w"] + p["dense"]["b"])
  e = p["emb"].astype(jnp.float32)
  return (
    jnp.sum(h**2)
    + jnp.sum(jnp.cos(e) * (t % 3))
    + p["scalar"] ** 4
    + jnp.sum(p["vec16"].astype(jnp.float32) ** 2) * 0.1
  )


def train_then_reverse(tx, params, grad_at, num_steps):
  """num_steps of an optax loop, then num_steps of tx.inverse, each one lax.scan."""
  state0 = tx.init(params)

  @jax.jit
  def forward(params, state):
    def step(carry, t):
      params, state = carry
      updates, state = tx.update(grad_at(params, t), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, state), jnp.arange(num_steps))[0]

  @jax.jit
  def backward(state):
    def unstep(state, t):
      state, params = tx.inverse(state, lambda p: grad_at(p, t))
      return state, params

    state, params = jax.lax.scan(unstep, state, jnp.arange(num_steps)[::-1])
    return jax.tree.map(lambda x: x[-1], params), state

  final = forward(params, state0)
  return state0, final, backward(final[1])


SCHEDULES = {
  "constant": (0.05, 0.9),
  "per_leaf": (
    {"dense": 0.05, "emb": 0.2, "scalar": 0.01, "vec16": 0.1},
    {"dense": 0.5, "emb": 0.9, "scalar": 0.99, "vec16": 0.7},
  ),
  "per_step": (
    optax.cosine_decay_schedule(0.1, 1000),
    lambda t: 0.5 + 0.49 * jnp.sin(t.astype(jnp.float32) * 0.01) ** 2,
  ),
  "random_per_step": (
    0.05,
    lambda t: jax.random.uniform(
      jax.random.fold_in(jax.random.key(3), t), (), minval=0.05, maxval=0.999
    ),
  ),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_round_trip_mixed_pytree_is_bit_exact(schedule):
  lr, mom = SCHEDULES[schedule]
  tx = revoptax.reversible_sgd(
    lr, mom, max_steps=1000, rule=revoptax.MomentumSGDRule(momentum_floor=0.05)
  )
  params = mixed_params()
  grad_at = jax.grad(mixed_loss)
  state0, (p_end, s_end), (p_back, s_back) = train_then_reverse(tx, params, grad_at, 1000)
  assert not words_equal(p_end, params)
  assert words_equal(p_back, params)
  assert words_equal(s_back, state0)  # exact w, v, buffer and log all back to the start


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_round_trip_for_each_momentum(gamma):
  tx = revoptax.reversible_sgd(0.1, gamma, max_steps=1000)
  params = mixed_params()
  state0, _, (p_back, s_back) = train_then_reverse(tx, params, jax.grad(mixed_loss), 1000)
  assert words_equal(p_back, params) and words_equal(s_back, state0)


def test_trajectory_matches_optax_sgd():
  alpha, gamma = 0.5, 0.9
  tx = revoptax.reversible_sgd(alpha, gamma, max_steps=100)
  gamma_q = float(quantized_momentum(jnp.float32(gamma)))
  reference = optax.sgd(alpha * (1 - gamma_q), momentum=gamma_q)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(100, 64)), jnp.float32)
  y = jnp.asarray(np.arange(100) % 10, jnp.int32)
  params = init_mlp(jax.random.key(1))
  grad = jax.grad(cross_entropy)

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s, q, r = carry
      u, s = tx.update(grad(p, x, y), s, p)
      v, r = reference.update(grad(q, x, y), r, q)
      return (optax.apply_updates(p, u), s, optax.apply_updates(q, v), r), None

    init = (params, tx.init(params), params, reference.init(params))
    return jax.lax.scan(step, init, None, length=100)[0]

  p, _, q, _ = run(params)
  # Per element, relative to each leaf's largest weight: observed at most 6e-7.
  assert_tree_close(p, q, 5e-6)


def test_params_equal_exact_weights_rounded_or_are_logged():
  """apply_updates lands on F(w) except where float addition cannot; those are logged."""
  params = init_mlp(jax.random.key(2))
  # Learning rate 1: large early updates make many weights unreachable by float
  # addition (this overflowed an earlier, smaller default log capacity).
  num_steps = 100
  tx = revoptax.reversible_sgd(1.0, 0.9, max_steps=num_steps)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(100, 64)), jnp.float32)
  y = jnp.asarray(np.arange(100) % 10, jnp.int32)
  rule = revoptax.MomentumSGDRule()

  def mismatches(state, params):
    weights = [rule.params(leaf, jnp.float32) for leaf in _unpack(state)]
    return sum(jnp.sum(w != value) for w, value in zip(weights, jax.tree.leaves(params)))

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(cross_entropy)(p, x, y), s, p)
      p = optax.apply_updates(p, u)
      return (p, s), mismatches(s, p)

    return jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)

  (_, state), counts = run(params)
  logged = int(state.log.size)
  # The mismatches after step t are logged by update t + 1 (the last not yet).
  assert logged == int(jnp.sum(counts[:-1]))
  assert 0 < logged < 0.004 * num_steps * 6310


def test_state_mirrors_the_params():
  """One array per leaf and exact quantity, in the leaf's shape (stack: rows first)."""
  params = mixed_params()
  tx = revoptax.reversible_sgd(0.05, 0.9, max_steps=100)
  state = tx.init(params)
  shapes = jax.tree.map(jnp.shape, params)
  exact = state.exact
  for tree in (exact.w.hi, exact.w.lo, exact.v.hi, exact.v.lo):
    assert jax.tree.map(jnp.shape, tree) == shapes
  for tree in (exact.buffer.head_hi, exact.buffer.head_lo):
    assert jax.tree.map(jnp.shape, tree) == shapes
  stacks = jax.tree.map(lambda s: s.shape[1:], exact.buffer.stack)
  assert stacks == shapes
  assert jax.tree.map(lambda m: m.dtype, state.param_dtype) == jax.tree.map(
    lambda p: p.dtype, params
  )
  assert int(optax.tree_utils.tree_get(state, "count")) == 0


def test_tree_map_params_and_empty_pytrees_work_as_for_optax_optimizers():
  params = mixed_params()
  tx = revoptax.reversible_sgd(0.05, 0.9, max_steps=10)
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(tx, lambda v: v, state)
  assert words_equal(mapped, state)
  marked = optax.tree_utils.tree_map_params(
    tx, lambda v: "param", state, transform_non_params=lambda _: "other"
  )
  assert jax.tree.leaves(marked.exact.v.hi) == ["param"] * 5 and marked.count == "other"
  empty = tx.init({})
  updates, empty = tx.update({}, empty, {})
  assert updates == {} and int(empty.count) == 1
  # All-False masks and empty multi_transform labels give empty inner params.
  masked = optax.masked(tx, jax.tree.map(lambda _: False, params))
  masked_state = masked.init(params)
  updates, _ = masked.update(jax.grad(mixed_loss)(params, 0), masked_state, params)
  assert words_equal(updates, jax.grad(mixed_loss)(params, 0))


def test_count_and_inject_hyperparams_under_jit():
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  grads = {"w": jnp.ones(3), "b": jnp.ones(2)}
  plain = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  injected = optax.inject_hyperparams(revoptax.reversible_sgd, static_args=("max_steps",))(
    learning_rate=0.1, momentum=0.9, max_steps=10
  )
  u_plain, s_plain = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)
  u_inj, s_inj = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
  assert words_equal(u_plain, u_inj) and words_equal(s_plain, s_inj.inner_state)
  assert int(optax.tree_utils.tree_get(s_plain, "count")) == 1
  # A learning rate changed through the injected state is the one applied.
  s_inj.hyperparams["learning_rate"] = jnp.asarray(0.2)
  u_half, _ = jax.jit(injected.update)(grads, s_inj, params)
  assert not words_equal(u_half, u_plain)


def test_wrong_gradient_structure_and_missing_params_raise_clear_errors():
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  state = tx.init(params)
  with pytest.raises(ValueError, match="gradients have the structure"):
    tx.update({"w": jnp.ones(3)}, state, params)
  with pytest.raises(ValueError, match=r"gradient of leaf \['w'\] has shape \(4,\)"):
    tx.update({"w": jnp.ones(4), "b": jnp.ones(2)}, state, params)
  with pytest.raises(ValueError, match="update needs the params"):
    tx.update({"w": jnp.ones(3), "b": jnp.ones(2)}, state)


def test_params_changed_after_the_update_are_logged_and_reversed_exactly():
  """A post-scaling after the reversible step (chain(..., scale(0.5))) changes the params
  the next gradient sees: update logs them and the inverse uses them."""
  params = {"w": jnp.linspace(-1.0, 1.0, 7)}
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=20, param_log_capacity=1000)
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(3.0 * p["w"])))
  state0 = tx.init(params)
  p, s = params, state0
  for _ in range(20):
    u, s = tx.update(grad(p), s, p)
    p = optax.apply_updates(p, jax.tree.map(lambda x: 0.5 * x, u))
  assert int(s.log.size) > 0
  for _ in range(20):
    s, p = tx.inverse(s, grad)
  assert words_equal(p, params) and words_equal(s, state0)


def test_an_inverse_with_other_hyperparameters_says_so():
  params = {"w": jnp.ones(3)}
  grad = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=5)
  _, state = tx.update(grad(params), tx.init(params), params)
  other = revoptax.reversible_sgd(0.2, 0.9, max_steps=5)
  with pytest.raises(revoptax.ReversibilityError, match="hyperparameters of leaf .* differ"):
    other.inverse(state, grad)


def test_more_updates_than_max_steps_raise():
  params = {"w": jnp.ones(3)}
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=2)
  state = tx.init(params)
  with pytest.raises(revoptax.ReversibilityError, match="past max_steps"):
    for _ in range(3):
      _, state = tx.update({"w": jnp.ones(3)}, state, params)


def test_state_has_fixed_shapes_under_jit_and_cond():
  params = mixed_params()
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  state = tx.init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  grads = jax.grad(mixed_loss)(params, 0)

  @jax.jit
  def maybe_step(flag, state):
    return jax.lax.cond(flag, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

  stepped = maybe_step(True, state)
  same = maybe_step(False, state)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), stepped) == jax.tree.map(
    lambda a: (a.shape, a.dtype), state
  )
  assert words_equal(same, state) and int(stepped.count) == 1


@pytest.mark.parametrize("momentum", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_bad_momentum_raises(momentum):
  with pytest.raises(ValueError, match="momentum must lie strictly between 0 and 1"):
    revoptax.reversible_sgd(0.1, momentum, max_steps=10)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_learning_rate_raises(lr):
  with pytest.raises(ValueError, match="learning_rate must be positive and finite"):
    revoptax.reversible_sgd(lr, 0.9, max_steps=10)


def test_bad_schedule_values_raise():
  with pytest.raises(ValueError, match="momentum must lie"):
    revoptax.reversible_sgd(0.1, optax.linear_schedule(0.5, 1.2, 10), max_steps=10)
  with pytest.raises(ValueError, match="learning_rate must be positive"):
    revoptax.reversible_sgd({"a": 0.1, "b": -0.1}, 0.9, max_steps=10)


def test_bad_max_steps_and_integer_params_raise():
  with pytest.raises(ValueError, match="max_steps"):
    revoptax.reversible_sgd(0.1, 0.9, max_steps=0)
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  with pytest.raises(TypeError, match="float parameters"):
    tx.init({"count": jnp.arange(3)})


def test_out_of_range_params_raise():
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  with pytest.raises(revoptax.ReversibilityError, match="fixed-point overflow"):
    tx.init({"w": jnp.asarray([1.0, 1e6])})
  wide = revoptax.reversible_sgd(
    0.1, 0.9, max_steps=10, rule=revoptax.MomentumSGDRule(revoptax.FixedPointFormat(30, 30))
  )
  wide.init({"w": jnp.asarray([1.0, 1e6])})


def test_diverging_training_raises_under_jit():
  tx = revoptax.reversible_sgd(1e4, 0.5, max_steps=100)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(lambda q: jnp.sum(q["w"] ** 4))(p), s, p))
  with pytest.raises(Exception, match="fixed-point overflow in leaf \\['w'\\]"):
    for _ in range(100):
      u, state = step(params, state)
      params = optax.apply_updates(params, u)
      jax.block_until_ready(params)


def test_non_finite_gradient_raises():
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  with pytest.raises(revoptax.ReversibilityError, match="not finite at step 0"):
    tx.update({"w": jnp.asarray([0.0, jnp.nan, 1.0])}, state, params)


def test_update_and_inverse_checks_have_no_side_effects_under_jit():
  # A side effect in a jit function costs JAX's fast dispatch path on every call.
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  assert not jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(grads, state).effects
  _, later = tx.update(grads, state, params)
  assert not jax.make_jaxpr(lambda s: tx.inverse(s, lambda p: grads))(later).effects
  step = jax.jit(lambda g, s: tx.update(g, s, params))
  jax.block_until_ready(step(grads, state))  # the check does not fire on good input
  with pytest.raises(Exception, match=r"leaf \['w'\] is not finite at step 0"):
    jax.block_until_ready(step({"w": jnp.asarray([0.0, jnp.inf, 1.0])}, state))


def test_update_raises_under_vmap_for_the_failing_member():
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  params = {"w": jnp.ones((4, 3))}
  state = jax.vmap(tx.init)(params)
  step = jax.jit(jax.vmap(tx.update))
  grads = {"w": jnp.ones((4, 3))}
  updates, _ = step(grads, state, params)
  assert updates["w"].shape == (4, 3)
  with pytest.raises(Exception, match=r"leaf \['w'\] is not finite at step 0"):
    jax.block_until_ready(step({"w": grads["w"].at[2, 1].set(jnp.nan)}, state, params))


def test_buffer_capacity_exceeded_raises():
  """The buffer is sized at init for the momentum given then; a lower momentum injected
  later runs it out, which is reported (never wrapped)."""
  factory = optax.inject_hyperparams(revoptax.reversible_sgd, static_args=("max_steps",))
  tx = factory(learning_rate=0.01, momentum=0.99, max_steps=300)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  state.hyperparams["momentum"] = jnp.asarray(0.5)
  step = jax.jit(lambda p, s: tx.update({"w": jnp.ones(3)}, s, p))
  with pytest.raises(Exception, match="information buffer capacity exceeded"):
    for _ in range(300):
      u, state = step(params, state)
      params = optax.apply_updates(params, u)
      jax.block_until_ready(params)


def test_on_error_nan_records_the_failure_without_a_host_callback():
  tx = revoptax.reversible_sgd(1e4, 0.5, max_steps=100, on_error="nan")
  params = {"a": jnp.ones(2), "w": jnp.ones(3)}
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(lambda q: jnp.sum(q["w"] ** 4))(p), s, p))
  assert "callback" not in step.lower(params, state).as_text()  # the point of "nan"
  for _ in range(30):  # diverges: the fixed-point range is exceeded in leaf w
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  category, failed_at, leaf = (int(x) for x in state.error)
  assert failed_at < 29 and leaf == 1
  assert all(bool(jnp.isnan(x).all()) for x in jax.tree.leaves(params))  # loud, never silent
  with pytest.raises(
    revoptax.ReversibilityError, match=f"overflow in leaf \\['w'\\] at step {failed_at}"
  ):
    revoptax.check(state)
  with pytest.raises(Exception, match="overflow in leaf"):
    jax.block_until_ready(jax.jit(tx.inverse, static_argnums=1)(state, lambda p: p))


def test_on_error_nan_is_silent_while_training_is_fine():
  params = mixed_params()
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=5, on_error="nan")
  state = tx.init(params)
  for t in range(5):
    u, state = tx.update(jax.grad(mixed_loss)(params, t), state, params)
    params = optax.apply_updates(params, u)
  revoptax.check(state)  # nothing recorded
  assert [int(x) for x in state.error] == [-1, -1, -1]
  with pytest.raises(ValueError, match="on_error must be 'raise' or 'nan'"):
    revoptax.reversible_sgd(0.1, 0.9, max_steps=5, on_error="warn")
