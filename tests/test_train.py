"""revoptax.train: hypergradients by exact reversal, checked against a stored-trajectory oracle."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import cross_entropy, digits_data, init_mlp
from flax import nnx

import revoptax


def test_hypergradients_match_scan_oracle_in_float32():
  """Every kind of hyperparameter, in JAX's default 32-bit mode (tolerance 1e-4)."""
  val_loss, hp = oracle.meta_problem(jnp.float32)
  got = jax.jit(jax.grad(lambda h: val_loss(h, oracle.revoptax_train_fn())))(hp)
  want = jax.jit(jax.grad(lambda h: val_loss(h, oracle.scan_train_fn())))(hp)
  errors = oracle.max_relative_errors(got, want)
  assert set(errors) == {
    "['example_logit']",
    "['log_init_scale']",
    "['log_l2']['layer0']",
    "['log_l2']['layer1']",
    "['log_lr']",
    "['logit_mom']",
    "['train_x']",
  }
  assert max(errors.values()) <= 1e-4, errors


def test_data_cotangent_is_skipped_when_data_is_not_differentiated():
  """Only differentiated inputs get cotangents; the others' hypergradients are unchanged."""
  val_loss, hp = oracle.meta_problem(jnp.float32, num_steps=20)
  train_fn = oracle.revoptax_train_fn()
  with_data = jax.jit(jax.grad(lambda h: val_loss(h, train_fn)))(hp)
  data = hp.pop("train_x")
  without = jax.jit(jax.grad(lambda h: val_loss({**h, "train_x": data}, train_fn)))(hp)
  for path, got in jax.tree_util.tree_leaves_with_path(without):
    want = dict(jax.tree_util.tree_leaves_with_path(with_data))[path]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


def digits_meta(num_steps, gamma=0.9):
  """The digits MLP 64-50-50-10 meta-problem of the baselines (shared/reference)."""
  xb, yb, xv, yv = digits_data()

  def loss_fn(params, hp, batch):
    x, y = batch
    l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
    return cross_entropy(params, x, y) + jnp.exp(hp["log_l2"]) * l2

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
      momentum_floor=gamma,
    )
    return cross_entropy(params, xv, yv)

  return val_loss, hp


def test_memory_is_flat_in_the_number_of_steps():
  """XLA temp memory of jit(grad) at T = 1,000 is at most 3x that at T = 100."""

  def temp_bytes(num_steps):
    val_loss, hp = digits_meta(num_steps)
    compiled = jax.jit(jax.grad(val_loss)).lower(hp).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(100), temp_bytes(1000)
  assert large <= 3 * small, (small, large)


def test_vmap_over_a_population_of_hyperparameters():
  val_loss, hp = oracle.meta_problem(jnp.float32, num_steps=20)
  f = lambda h: val_loss(h, oracle.revoptax_train_fn())
  population = jax.tree.map(lambda x: jnp.stack([x, x * 1.01]), hp)
  batched = jax.jit(jax.vmap(jax.grad(f)))(population)
  single = jax.jit(jax.grad(f))(jax.tree.map(lambda x: x[1], population))
  errors = oracle.max_relative_errors(jax.tree.map(lambda x: x[1], batched), single)
  assert max(errors.values()) < 1e-4


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_model_through_split_and_merge():
  xb, yb, xv, yv = digits_data(num_train=200, batch_size=50)
  graphdef, params = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)

  def loss_fn(params, hp, batch):
    logits = nnx.merge(graphdef, params)(batch[0])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.mean(jnp.take_along_axis(logp, batch[1][:, None], axis=1))
    return nll + jnp.exp(hp["log_l2"]) * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))

  def val_loss(hp, params):
    trained = revoptax.train(
      loss_fn,
      params,
      hp,
      (xb, yb),
      num_steps=50,
      learning_rate=lambda hp, t: jnp.exp(hp["log_lr"]),
      momentum=lambda hp, t: 0.9,
    )
    logp = jax.nn.log_softmax(nnx.merge(graphdef, trained)(xv))
    return -jnp.mean(jnp.take_along_axis(logp, yv[:, None], axis=1))

  hp = {"log_lr": jnp.log(0.3), "log_l2": jnp.asarray(-5.0)}
  g_hp, g_params = jax.jit(jax.grad(val_loss, argnums=(0, 1)))(hp, params)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((g_hp, g_params)))
  assert float(g_hp["log_lr"]) != 0.0


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(jnp.tanh(nn.Dense(32)(x)))


def test_linen_params_pytree_against_oracle():
  xb, yb, xv, yv = digits_data(num_train=200, batch_size=50)
  model = LinenMLP()
  params = model.init(jax.random.key(0), xb[0])["params"]

  def loss_fn(params, hp, batch):
    logp = jax.nn.log_softmax(model.apply({"params": params}, batch[0]))
    return -jnp.mean(jnp.take_along_axis(logp, batch[1][:, None], axis=1))

  lr = lambda hp, t: jnp.exp(hp["log_lr"][t])
  mom = lambda hp, t: jax.nn.sigmoid(hp["logit_mom"][t])

  def val(train):
    def f(hp):
      trained = train(loss_fn, params, hp, (xb, yb), 40, lr, mom)
      logp = jax.nn.log_softmax(model.apply({"params": trained}, xv))
      return -jnp.mean(jnp.take_along_axis(logp, yv[:, None], axis=1))

    return f

  hp = {"log_lr": jnp.full((40,), jnp.log(0.2)), "logit_mom": jnp.full((40,), 1.5)}
  got = jax.jit(jax.grad(val(oracle.revoptax_train_fn())))(hp)
  want = jax.jit(jax.grad(val(oracle.scan_train_fn())))(hp)
  assert max(oracle.max_relative_errors(got, want).values()) < 1e-4


def simple_problem(**overrides):
  xb, yb, _, _ = digits_data(num_train=100, batch_size=50)
  params = init_mlp(jax.random.key(0), sizes=(64, 8, 10))
  kwargs = dict(
    num_steps=10,
    learning_rate=lambda hp, t: jnp.exp(hp["log_lr"]),
    momentum=lambda hp, t: 0.9,
  )
  kwargs.update(overrides)
  loss_fn = lambda p, hp, b: cross_entropy(p, *b)
  return loss_fn, params, {"log_lr": jnp.log(0.1)}, (xb, yb), kwargs


def test_return_velocity_and_its_gradient():
  loss_fn, params, hp, batches, kw = simple_problem(return_velocity=True)
  f = jax.jit(
    lambda h: sum(
      jnp.sum(v) for v in jax.tree.leaves(revoptax.train(loss_fn, params, h, batches, **kw)[1])
    )
  )
  got = jax.jit(jax.grad(f))(hp)
  eps = 1e-2
  fd = (f({"log_lr": hp["log_lr"] + eps}) - f({"log_lr": hp["log_lr"] - eps})) / (2 * eps)
  np.testing.assert_allclose(got["log_lr"], fd, rtol=2e-2)


def test_dropout_with_key_replays_exactly():
  loss_fn, params, hp, batches, kw = simple_problem(num_steps=30)

  def dropout_loss(p, hp, batch, key):
    keep = jax.random.bernoulli(key, 0.8, batch[0].shape)
    return cross_entropy(p, batch[0] * keep / 0.8, batch[1])

  f = lambda h: jnp.sum(
    jax.tree.leaves(revoptax.train(dropout_loss, params, h, batches, key=jax.random.key(1), **kw))[
      0
    ]
  )
  g = jax.jit(jax.grad(f))(hp)  # raises if the backward pass drifted
  assert bool(jnp.isfinite(g["log_lr"]))


def test_closure_over_traced_value_gives_clear_error():
  loss_fn, params, hp, batches, kw = simple_problem()

  def f(scale):
    closed = lambda p, h, b: scale * loss_fn(p, h, b)
    return jnp.sum(jax.tree.leaves(revoptax.train(closed, params, hp, batches, **kw))[0])

  with pytest.raises(ValueError, match="closes over a traced value.*hparams"):
    jax.grad(f)(1.0)


@pytest.mark.parametrize(
  "overrides,error,match",
  [
    ({"num_steps": 0}, ValueError, "num_steps must be a positive int"),
    ({"num_steps": 2.5}, ValueError, "num_steps must be a positive int"),
    ({"momentum": lambda hp, t: 1.0}, ValueError, "momentum must lie strictly between 0 and 1"),
    ({"momentum": lambda hp, t: 0.0}, ValueError, "momentum must lie strictly between 0 and 1"),
    ({"momentum": lambda hp, t: jnp.nan}, ValueError, "momentum must lie strictly"),
    ({"learning_rate": lambda hp, t: -0.1}, ValueError, "learning_rate must be positive"),
    ({"learning_rate": lambda hp, t: jnp.inf}, ValueError, "learning_rate must be positive"),
    ({"learning_rate": 0.1}, TypeError, "must be callables"),
    ({"learning_rate": lambda hp, t: jnp.ones(3)}, ValueError, "does not broadcast"),
    ({"on_drift": "ignore"}, ValueError, "on_drift"),
  ],
)
def test_bad_input_raises(overrides, error, match):
  loss_fn, params, hp, batches, kw = simple_problem(**overrides)
  with pytest.raises(error, match=match):
    revoptax.train(loss_fn, params, hp, batches, **kw)


def test_mismatched_batches_and_integer_params_raise():
  loss_fn, params, hp, (xb, yb), kw = simple_problem()
  with pytest.raises(ValueError, match="share the leading axis"):
    revoptax.train(loss_fn, params, hp, (xb, yb[:1]), **kw)
  with pytest.raises(TypeError, match="must be float arrays"):
    revoptax.train(loss_fn, {**params, "n": jnp.arange(3)}, hp, (xb, yb), **kw)


def test_non_finite_gradient_names_the_step():
  loss_fn, params, hp, batches, kw = simple_problem()
  bad = lambda p, h, b: loss_fn(p, h, b) * jnp.where(b[1][0] >= 0, jnp.inf, 1.0)
  with pytest.raises(revoptax.ReversibilityError, match="not finite at step 0"):
    revoptax.train(bad, params, hp, batches, **kw)


def test_failures_are_attributed_to_the_leaf_and_step_inside_a_packed_group():
  # Both leaves share dtype and schedules, so train packs them into one exact
  # state; the checks still name the leaf and the first step that failed.
  params = {"a": jnp.ones(3), "b": jnp.full((2, 2), 0.5)}
  batches = jnp.arange(6.0)  # step t sees batch t
  kw = dict(num_steps=6, learning_rate=lambda hp, t: 0.1, momentum=lambda hp, t: 0.9)

  def blows_up_at_3(p, hp, x):
    scale = jnp.where(x == 3.0, jnp.inf, 1.0)
    return jnp.sum(p["a"] ** 2) + scale * jnp.sum(p["b"] ** 2)

  with pytest.raises(revoptax.ReversibilityError, match=r"leaf \['b'\] is not finite at step 3"):
    revoptax.train(blows_up_at_3, params, {}, batches, **kw)

  def steep_at_4(p, hp, x):
    return jnp.sum(p["a"] ** 2) + jnp.where(x == 4.0, 1e9, 0.0) * jnp.sum(p["b"])

  with pytest.raises(revoptax.ReversibilityError, match=r"overflow in leaf \['b'\] at step 4"):
    revoptax.train(steep_at_4, params, {}, batches, **kw)

  too_large = {"a": params["a"], "b": params["b"].at[1, 0].set(1e6)}  # |x| >= 2**16 at init
  with pytest.raises(revoptax.ReversibilityError, match=r"overflow in leaf \['b'\] at step 0"):
    revoptax.train(steep_at_4, too_large, {}, batches, **kw)


def test_diverging_training_reports_fixed_point_overflow_under_jit():
  loss_fn, params, hp, batches, kw = simple_problem(
    learning_rate=lambda hp, t: 1e4 * jnp.exp(hp["log_lr"]), num_steps=50
  )
  quartic = lambda p, h, b: sum(jnp.sum(x**4) for x in jax.tree.leaves(p))
  f = jax.jit(lambda h: revoptax.train(quartic, params, h, batches, **kw))
  with pytest.raises(Exception, match="fixed-point overflow in leaf"):
    jax.block_until_ready(f(hp))


def test_buffer_capacity_exceeded_is_reported():
  loss_fn, params, hp, batches, kw = simple_problem(
    momentum=lambda hp, t: jax.nn.sigmoid(hp["logit"]), num_steps=200, momentum_floor=0.99
  )
  hp = {**hp, "logit": jnp.asarray(-3.0)}
  f = jax.jit(lambda h: revoptax.train(loss_fn, params, h, batches, **kw))
  with pytest.raises(Exception, match="information buffer capacity exceeded"):
    jax.block_until_ready(f(hp))


def test_errors_are_raised_under_vmap():
  loss_fn, params, hp, batches, kw = simple_problem()
  bad = lambda p, h, b: loss_fn(p, h, b) * jnp.where(h["log_lr"] > -2.0, jnp.inf, 1.0)
  f = jax.jit(jax.vmap(lambda lr: revoptax.train(bad, params, {"log_lr": lr}, batches, **kw)))
  with pytest.raises(Exception, match="not finite at step 0"):
    jax.block_until_ready(f(jnp.asarray([jnp.log(0.1), jnp.log(0.5)])))
