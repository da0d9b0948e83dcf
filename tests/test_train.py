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

# Hypergradients of float32 training against the float32 scan oracle, per
# element relative to each leaf's largest entry: observed at most 7.2e-7.
RTOL_F32 = 5e-6


@pytest.fixture(scope="module")
def meta_f32():
  val_loss, hp = oracle.meta_problem(jnp.float32)
  f = jax.jit(lambda h: val_loss(h, oracle.revoptax_train_fn()))
  grads = jax.jit(jax.grad(lambda h: val_loss(h, oracle.revoptax_train_fn())))(hp)
  return val_loss, hp, f, grads


def test_hypergradients_match_scan_oracle_in_float32(meta_f32):
  """Every kind of hyperparameter, in JAX's default 32-bit mode."""
  val_loss, hp, _, got = meta_f32
  want = jax.jit(jax.grad(lambda h: val_loss(h, oracle.scan_train_fn())))(hp)
  assert set(oracle.relative_errors(got, want)) == {
    "['example_logit']",
    "['log_init_scale']",
    "['log_l2']['layer0']",
    "['log_l2']['layer1']",
    "['log_lr']",
    "['logit_mom']",
    "['train_x']",
  }
  oracle.assert_tree_close(got, want, RTOL_F32)


def _largest(grads, name, count, distinct_axis0=True):
  """Indices of the ``count`` largest |entries| of ``grads[name]`` (distinct steps)."""
  g = np.abs(np.asarray(grads[name]))
  chosen, steps = [], set()
  for flat in np.argsort(g, axis=None)[::-1]:
    index = tuple(int(i) for i in np.unravel_index(flat, g.shape))
    if distinct_axis0 and index[0] in steps:
      continue
    chosen.append(index)
    steps.add(index[0])
    if len(chosen) == count:
      return chosen
  return chosen


def test_hypergradients_match_finite_differences_in_process(meta_f32):
  """Per-step learning rates and momenta of single steps, and training pixels.

  Five-point central differences of the float32 function with h = 0.1: the
  loss's float32 rounding (~1e-7) gives up to 15 times that in the difference,
  hence atol 3e-6; observed relative errors on the largest entries (at
  different steps) are at most 1e-3.
  """
  _, hp, f, grads = meta_f32
  probes = (
    [("log_lr", i) for i in _largest(grads, "log_lr", 3)]
    + [("log_lr", (0, 1)), ("log_lr", (59, 0))]
    + [("logit_mom", i) for i in _largest(grads, "logit_mom", 2)]
    + [("train_x", i) for i in _largest(grads, "train_x", 2)]
  )
  h = 0.1
  for name, index in probes:
    at = lambda d, name=name, index=index: f({**hp, name: hp[name].at[index].add(d)})
    fd = float((-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h))
    ad = float(grads[name][index])
    assert np.isfinite(ad) and abs(ad) > 1e-4, (name, index, ad)
    np.testing.assert_allclose(ad, fd, rtol=3e-3, atol=3e-6, err_msg=f"{name}{index}")


def test_hypergradients_without_the_data_among_the_inputs_match_the_oracle():
  """Without the data among the differentiated inputs the others still match the oracle."""
  val_loss, hp = oracle.meta_problem(jnp.float32, num_steps=20)
  data = hp.pop("train_x")
  grad_of = lambda train_fn: jax.jit(
    jax.grad(lambda h: val_loss({**h, "train_x": data}, train_fn))
  )(hp)
  got = grad_of(oracle.revoptax_train_fn())
  oracle.assert_tree_close(got, grad_of(oracle.scan_train_fn()), RTOL_F32)


def test_vmap_over_a_population_of_hyperparameters():
  """Each member of a vmapped population gets its own hypergradient (vs the oracle)."""
  val_loss, hp = oracle.meta_problem(jnp.float32, num_steps=20)
  f = lambda h: val_loss(h, oracle.revoptax_train_fn())
  population = jax.tree.map(lambda x: jnp.stack([x, x * 1.01]), hp)
  batched = jax.jit(jax.vmap(jax.grad(f)))(population)
  want = jax.jit(jax.vmap(jax.grad(lambda h: val_loss(h, oracle.scan_train_fn()))))(population)
  for i in range(2):
    member = lambda tree, i=i: jax.tree.map(lambda x: x[i], tree)
    oracle.assert_tree_close(member(batched), member(want), RTOL_F32, err_msg=f"member {i}")


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_model_through_split_and_merge():
  """An nnx.State of params: hypergradients and init gradients equal the oracle's."""
  xb, yb, xv, yv = digits_data(num_train=200, batch_size=50)
  graphdef, params = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)

  def loss_fn(params, hp, batch):
    logits = nnx.merge(graphdef, params)(batch[0])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.mean(jnp.take_along_axis(logp, batch[1][:, None], axis=1))
    return nll + jnp.exp(hp["log_l2"]) * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))

  def val_loss(train_fn):
    def f(hp, params):
      trained = train_fn(
        loss_fn,
        params,
        hp,
        (xb, yb),
        50,
        lambda hp, t: jnp.exp(hp["log_lr"]),
        lambda hp, t: 0.9,
      )
      logp = jax.nn.log_softmax(nnx.merge(graphdef, trained)(xv))
      return -jnp.mean(jnp.take_along_axis(logp, yv[:, None], axis=1))

    return jax.jit(jax.grad(f, argnums=(0, 1)))

  hp = {"log_lr": jnp.log(0.3), "log_l2": jnp.asarray(-5.0)}
  got = val_loss(oracle.revoptax_train_fn())(hp, params)
  want = val_loss(oracle.scan_train_fn())(hp, params)
  oracle.assert_tree_close(got, want, RTOL_F32)


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
  oracle.assert_tree_close(got, want, RTOL_F32)


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


def test_return_state_and_its_gradient():
  loss_fn, params, hp, batches, kw = simple_problem(return_state=True)
  f = jax.jit(
    lambda h: sum(
      jnp.sum(v)
      for v in jax.tree.leaves(revoptax.train(loss_fn, params, h, batches, **kw)[1]["velocity"])
    )
  )
  got = jax.jit(jax.grad(f))(hp)
  eps = 1e-2
  fd = (f({"log_lr": hp["log_lr"] + eps}) - f({"log_lr": hp["log_lr"] - eps})) / (2 * eps)
  # Central difference of the float32 function: observed relative error 6e-6.
  np.testing.assert_allclose(got["log_lr"], fd, rtol=5e-5)


def test_dropout_with_key_replays_exactly():
  """Dropout from per-step keys: the oracle replays fold_in(key, t) and agrees."""
  xb, yb, xv, yv = digits_data(num_train=100, batch_size=50)
  params = init_mlp(jax.random.key(0), sizes=(64, 8, 10))
  key = jax.random.key(1)

  def dropout_loss(p, hp, batch, key):
    keep = jax.random.bernoulli(key, 0.8, batch[0].shape)
    l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    return cross_entropy(p, batch[0] * keep / 0.8, batch[1]) + jnp.exp(hp["log_l2"]) * l2

  lr = lambda hp, t: jnp.exp(hp["log_lr"][t])
  mom = lambda hp, t: jax.nn.sigmoid(hp["logit_mom"][t])

  def reversed_train(loss_fn, params, hp, batches, num_steps, lr, mom):
    return revoptax.train(
      loss_fn, params, hp, batches, num_steps=num_steps, learning_rate=lr, momentum=mom, key=key
    )

  def val(train_fn):
    f = lambda hp: cross_entropy(train_fn(dropout_loss, params, hp, (xb, yb), 30, lr, mom), xv, yv)
    return jax.jit(jax.grad(f))

  hp = {
    "log_lr": jnp.full((30,), jnp.log(0.3)),
    "logit_mom": jnp.full((30,), 2.0),
    "log_l2": jnp.asarray(-4.0),
  }
  got = val(reversed_train)(hp)  # raises if the backward pass drifted
  oracle.assert_tree_close(got, val(oracle.scan_train_fn(key=key))(hp), RTOL_F32)
  # Without replaying the keys the oracle is a different function.
  other = val(oracle.scan_train_fn(key=jax.random.key(2)))(hp)
  assert np.max(np.abs(np.asarray(got["log_lr"] - other["log_lr"]))) > 1e-3 * np.max(
    np.abs(np.asarray(other["log_lr"]))
  )


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
    ({"learning_rate": 0.1}, TypeError, "must be a callable"),
    (
      {"lr": lambda hp, t: 0.1},
      TypeError,
      r"takes the hyperparameters learning_rate, momentum.*unknown: \[.lr.\]",
    ),
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
    momentum=lambda hp, t: jax.nn.sigmoid(hp["logit"]),
    num_steps=200,
    rule=revoptax.MomentumSGDRule(momentum_floor=0.99),
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
