"""Each check of docs/guarantees.md fires, on device for traced values, naming its own cause."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import cross_entropy, digits_data, init_mlp, nondeterministic_loss

import revoptax
from revoptax import _buffer as buffer_lib
from revoptax._sgd import MomentumSGDRule

NUM_STEPS = 12
BAD_STEP = 3


def problem():
  xb, yb, xv, yv = digits_data(num_train=100, batch_size=50)
  params = init_mlp(jax.random.key(0), sizes=(64, 8, 10))
  return params, (xb, yb), (xv, yv)


def hypergradient(hp, loss=None, momentum_floor=0.5, **options):
  """``jit(grad)`` of a validation loss through ``train`` with per-step schedules in ``hp``."""
  params, batches, (xv, yv) = problem()
  loss = loss or (lambda p, h, b: cross_entropy(p, *b))
  options = {
    "rule": revoptax.MomentumSGDRule(momentum_floor=momentum_floor),
    "learning_rate": lambda h, t: h["lr"][t],
    "momentum": lambda h, t: h["momentum"][t],
    **options,
  }

  def f(h):
    trained = revoptax.train(loss, params, h, batches, num_steps=NUM_STEPS, **options)
    return cross_entropy(trained, xv, yv)

  return jax.block_until_ready(jax.jit(jax.grad(f))(hp))


def schedules(name=None, value=None):
  hp = {"lr": jnp.full((NUM_STEPS,), 0.1), "momentum": jnp.full((NUM_STEPS,), 0.9)}
  if name is not None:
    hp[name] = hp[name].at[BAD_STEP].set(value)
  return hp


@pytest.mark.parametrize(
  "name,value,match",
  [
    ("lr", -0.1, "learning_rate of leaf .* at step 3 is not positive"),
    ("lr", 0.0, "learning_rate of leaf .* at step 3 is not positive"),
    ("lr", np.nan, "learning_rate of leaf .* at step 3 is not positive or not finite"),
    ("lr", np.inf, "learning_rate of leaf .* at step 3 is not positive or not finite"),
    ("momentum", 1.5, "momentum of leaf .* at step 3 is outside \\(0, 1\\)"),
    ("momentum", 1.0, "momentum of leaf .* at step 3 is outside \\(0, 1\\)"),
    ("momentum", 0.0, "momentum of leaf .* at step 3 is outside \\(0, 1\\)"),
    ("momentum", -0.3, "momentum of leaf .* at step 3 is outside \\(0, 1\\)"),
    ("momentum", np.nan, "momentum of leaf .* at step 3 is outside \\(0, 1\\) or not finite"),
  ],
)
def test_train_checks_traced_learning_rate_and_momentum(name, value, match):
  """Learned (traced) values out of range raise on device, never clipped or misattributed."""
  with pytest.raises(Exception, match=match) as caught:
    hypergradient(schedules(name, value))
  assert "parametrize it" in str(caught.value)  # the fix for a learned value


def test_train_good_schedules_pass():
  grads = hypergradient(schedules())
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))


def test_reversible_sgd_checks_traced_learning_rate_and_momentum():
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.ones(3)}

  def step(lr, momentum, on_error):
    tx = revoptax.reversible_sgd(
      lr,
      momentum,
      max_steps=10,
      rule=revoptax.MomentumSGDRule(momentum_floor=0.5),
      on_error=on_error,
    )
    return tx.update(grads, tx.init(params), params)

  run = jax.jit(step, static_argnums=2)
  jax.block_until_ready(run(0.1, 0.9, "raise"))
  for lr, momentum, match in [
    (-0.1, 0.9, "learning_rate of leaf \\['w'\\] at step 0 is not positive"),
    (np.nan, 0.9, "learning_rate of leaf \\['w'\\] at step 0"),
    (0.1, 1.5, "momentum of leaf \\['w'\\] at step 0 is outside \\(0, 1\\)"),
    (0.1, -0.3, "momentum of leaf \\['w'\\] at step 0 is outside"),
    (0.1, np.nan, "momentum of leaf \\['w'\\] at step 0 is outside"),
  ]:
    with pytest.raises(Exception, match=match):
      jax.block_until_ready(run(lr, momentum, "raise"))
    updates, state = run(lr, momentum, "nan")
    assert bool(jnp.isnan(updates["w"]).all())
    with pytest.raises(revoptax.ReversibilityError, match=match):
      revoptax.check(state)


def test_a_bare_array_param_is_named_in_messages():
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=10)
  state = tx.init(jnp.ones(3))
  with pytest.raises(revoptax.ReversibilityError, match="leaf <params> is not finite at step 0"):
    tx.update(jnp.asarray([0.0, jnp.nan, 1.0]), state, jnp.ones(3))


def test_learned_momentum_below_the_floor_names_the_step_and_the_fix():
  """A learned momentum that drifts below the rule's floor is reported at that step, with
  the parametrization that keeps it above the floor, before the buffer runs out."""
  hp = schedules()
  hp["momentum"] = hp["momentum"].at[7].set(0.3)
  with pytest.raises(Exception, match="at step 7 is below the momentum floor") as caught:
    hypergradient(hp, momentum_floor=0.5)
  message = str(caught.value)
  assert "revoptax.momentum_above" in message and "MomentumSGDRule(momentum_floor" in message
  assert "max_steps" not in message


def test_momentum_above_keeps_a_learned_momentum_above_the_floor():
  hp = schedules()
  hp["momentum"] = jnp.full((NUM_STEPS,), -30.0)  # logits: sigmoid would give ~1e-13
  above = lambda h, t: revoptax.momentum_above(0.5, h["momentum"][t])
  grads = hypergradient(hp, momentum_floor=0.5, momentum=above)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_buffer_capacity_message_names_train_options():
  """A buffer too small for the momenta runs out; the fix names train's options."""
  hp = schedules()
  hp["momentum"] = jnp.full((NUM_STEPS,), 0.02)  # 5.6 bits a step: a second row at step 10
  with pytest.raises(Exception, match="capacity exceeded") as caught:
    hypergradient(hp, momentum_floor=0.01, buffer_rows=1)
  message = str(caught.value)
  assert "momentum_floor" in message and "buffer_rows" in message
  assert "max_steps" not in message


def test_check_drift_false_turns_the_checks_off():
  """No fingerprints are kept and nothing is compared: the nondeterminism goes unreported."""
  params, batches, _ = problem()

  def run(check_drift):
    def f(h):
      trained = revoptax.train(
        nondeterministic_loss(),
        params,
        h,
        batches,
        num_steps=NUM_STEPS,
        learning_rate=lambda h, t: h["lr"][t],
        momentum=lambda h, t: h["momentum"][t],
        check_drift=check_drift,
      )
      return cross_entropy(trained, *problem()[2])

    _, vjp = jax.vjp(f, schedules())
    fingerprints = [x for x in jax.tree.leaves(vjp) if x.shape == (NUM_STEPS, 3)]
    return fingerprints, vjp

  fingerprints, _ = run(True)
  assert len(fingerprints) == 1 and fingerprints[0].dtype == jnp.uint32
  fingerprints, vjp = run(False)
  assert fingerprints == []
  (grads,) = vjp(jnp.ones(()))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))


def corrupt_velocity_at_step_0(monkeypatch):
  """A fault the per-step checks cannot see: one unit added to v_0 after it is undone."""
  original = MomentumSGDRule.unstep_state

  def faulty(self, state, grad, hp, t, clear_popped=False):
    out = original(self, state, grad, hp, t, clear_popped)
    bumped = jnp.where(t == 0, out.v.lo + 1, out.v.lo).astype(out.v.lo.dtype)
    return out._replace(v=out.v._replace(lo=bumped))

  monkeypatch.setattr(MomentumSGDRule, "unstep_state", faulty)


def test_reversal_not_ending_at_the_initial_state_is_reported(monkeypatch):
  corrupt_velocity_at_step_0(monkeypatch)
  with pytest.raises(Exception, match="did not end at the initial exact state") as caught:
    hypergradient(schedules())
  assert "nondeterministic" not in str(caught.value)
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    grads = hypergradient(schedules(), on_drift="nan")
  assert all(bool(jnp.isnan(x).all()) for x in jax.tree.leaves(grads))
  assert any("did not end at the initial exact state" in str(w.message) for w in seen)


def drop_rows_spilled_after(monkeypatch, first_step):
  """A fault in the buffer: rows spilled from ``first_step`` on are lost (size not raised)."""
  original = buffer_lib.spill

  def faulty(buf, head, step):
    new_buf, ok = original(buf, head, step)
    lost = step >= first_step
    return new_buf._replace(size=jnp.where(lost, buf.size, new_buf.size)), ok

  monkeypatch.setattr(buffer_lib, "spill", faulty)


def test_a_lost_buffer_row_is_reported_as_buffer_corruption_not_nondeterminism(monkeypatch):
  drop_rows_spilled_after(monkeypatch, first_step=4)
  hp = schedules()
  hp["momentum"] = jnp.full((NUM_STEPS,), 0.05)  # 4.3 bits a step: a row spills at step 5
  with pytest.raises(Exception, match="information buffer after undoing step") as caught:
    hypergradient(hp, momentum_floor=0.05)
  assert "nondeterministic" not in str(caught.value)


def test_a_lost_buffer_row_in_the_optax_inverse_is_reported_as_buffer_corruption(monkeypatch):
  drop_rows_spilled_after(monkeypatch, first_step=4)
  tx = revoptax.reversible_sgd(0.1, 0.05, max_steps=NUM_STEPS)
  params = {"w": jnp.linspace(-1.0, 1.0, 5)}
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(3.0 * p["w"])))
  state = tx.init(params)
  for _ in range(NUM_STEPS):
    updates, state = tx.update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  with pytest.raises(revoptax.ReversibilityError, match="information buffer after undoing step"):
    for _ in range(NUM_STEPS):
      state, params = tx.inverse(state, grad)


def test_param_log_capacity_is_reported_with_what_to_set():
  """Params changed outside the optimizer fill the log; the message says what to raise."""
  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=100, param_log_capacity=8)
  params = {"w": jnp.ones(5)}
  state = tx.init(params)
  grads = {"w": jnp.ones(5)}
  step = jax.jit(lambda p, s: tx.update(grads, s, p))
  with pytest.raises(Exception, match="param log of leaf \\['w'\\] is full at step 2") as caught:
    for _ in range(5):
      updates, state = step(params, state)
      params = jax.tree.map(lambda p, u: p + u + 1e-3, params, updates)  # changed outside
      jax.block_until_ready(params)
  assert "param_log_capacity" in str(caught.value)


def test_default_param_log_holds_an_ordinary_optax_loop():
  """A plain Optax loop whose weights keep crossing zero (sum(sin)^2, 700 params,
  learning rate 0.1, momentum 0.5) logs 0.8% of its element updates: within the default."""
  num_steps = 1000
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=700), jnp.float32)}
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"])) ** 2)
  tx = revoptax.reversible_sgd(0.1, 0.5, max_steps=num_steps)

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s = carry
      u, s = tx.update(grad(p), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)[0]

  _, state = run(params)
  logged = int(state.log.size)
  assert 0.002 * 700 * num_steps < logged < state.log.bits.shape[1] / 2
