"""Never a silent wrong hypergradient: injected nondeterminism is detected."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cross_entropy, digits_data, init_mlp, nondeterministic_loss

import revoptax

NUM_STEPS = 12


def problem():
  xb, yb, _, _ = digits_data(num_train=100, batch_size=50)
  params = init_mlp(jax.random.key(0), sizes=(64, 8, 10))
  return params, {"log_lr": jnp.log(0.1)}, (xb, yb)


def perturbed_loss(perturb_call):
  """A loss whose gradient gets a 1-ulp change on call number ``perturb_call``.

  The host callback returns a scale factor; every call returns 1.0 except one,
  which returns the next float above 1.0, changing the gradient of the
  ``layer0.b`` leaf by one unit in the last place at a single step.
  """
  calls = {"n": 0}

  def scale(_):
    calls["n"] += 1
    one = np.float32(1.0)
    return np.nextafter(one, np.float32(2.0)) if calls["n"] == perturb_call else one

  def loss(p, hp, batch):
    # The callback takes the params so it runs at every step (not hoisted).
    s = jax.pure_callback(
      scale, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.stop_gradient(p["layer0"]["b"])
    )
    return cross_entropy(p, *batch) + s * jnp.sum(p["layer0"]["b"]) * 1e-3

  return loss, calls


def hypergrad(loss, **options):
  params, hp, batches = problem()

  def f(h):
    out = revoptax.train(
      loss,
      params,
      h,
      batches,
      num_steps=NUM_STEPS,
      learning_rate=lambda h, t: jnp.exp(h["log_lr"]),
      momentum=lambda h, t: 0.9,
      **options,
    )
    return cross_entropy(out, batches[0][0], batches[1][0])

  return jax.jit(jax.grad(f))(hp)


def test_deterministic_loss_passes_the_checks():
  loss, _ = perturbed_loss(perturb_call=-1)
  g = hypergrad(loss)
  assert bool(jnp.isfinite(g["log_lr"]))


def test_one_ulp_change_in_the_backward_pass_is_detected():
  # Forward calls are 1..NUM_STEPS; the backward pass calls for steps T-1..0.
  # Call NUM_STEPS + 4 is the backward recomputation of step NUM_STEPS - 4.
  loss, _ = perturbed_loss(perturb_call=NUM_STEPS + 4)
  # Under jit the ReversibilityError arrives inside a JaxRuntimeError.
  with pytest.raises(Exception, match=f"at step {NUM_STEPS - 4} the gradient"):
    hypergrad(loss)


def test_callback_that_changes_every_call_is_detected_under_jit():
  with pytest.raises(Exception, match="nondeterministic gradient detected"):
    jax.block_until_ready(hypergrad(nondeterministic_loss()))


def test_on_drift_nan_warns_and_returns_nan():
  loss, _ = perturbed_loss(perturb_call=NUM_STEPS + 1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    g = hypergrad(loss, on_drift="nan")
  assert bool(jnp.isnan(g["log_lr"]))
  assert any("nondeterministic gradient detected" in str(w.message) for w in caught)


def test_fingerprint_changes_with_any_single_element():
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(37, 5)), jnp.float32)
  base = int(revoptax.fingerprint(g))
  for i in rng.choice(g.size, size=50, replace=False):
    flat = np.asarray(g).ravel().copy()
    flat[i] = np.nextafter(flat[i], np.float32(np.inf))
    assert int(revoptax.fingerprint(jnp.asarray(flat).reshape(g.shape))) != base


def test_optax_inverse_detects_a_recomputed_gradient_that_differs():
  import optax

  tx = revoptax.reversible_sgd(0.1, 0.9, max_steps=5)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  grad = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"])))
  for _ in range(5):
    updates, state = tx.update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  state, params = tx.inverse(state, grad)  # the same gradient: fine
  one_ulp = lambda p: jax.tree.map(lambda g: jnp.nextafter(g, jnp.inf), grad(p))
  with pytest.raises(revoptax.ReversibilityError, match="at step 3 the gradient of leaf"):
    tx.inverse(state, one_ulp)
