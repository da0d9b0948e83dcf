"""revoptax.train_module: NNX modules in the reversible loop, against the float oracle."""

import jax
import jax.numpy as jnp
import oracle
import pytest
from conftest import digits_data
from flax import nnx

import revoptax

RTOL_F32 = 5e-6  # as tests/test_train.py: observed at most 7.2e-7 relative to each leaf's max


class MLP(nnx.Module):
  def __init__(self, rngs, dropout=0.0, batch_norm=False, scale=1.0):
    self.l1 = nnx.Linear(64, 24, rngs=rngs)
    self.l2 = nnx.Linear(24, 10, rngs=rngs)
    self.l1.kernel.set_value(scale * self.l1.kernel.get_value())
    self.norm = nnx.BatchNorm(24, rngs=rngs) if batch_norm else None
    self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  def __call__(self, x):
    h = self.l1(x)
    if self.norm is not None:
      h = self.norm(h)
    h = jnp.tanh(h)
    if self.drop is not None:
      h = self.drop(h)
    return self.l2(h)


def nll(model, x, y):
  logp = jax.nn.log_softmax(model(x))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def module_loss(model, hp, batch):
  l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return nll(model, *batch) + jnp.exp(hp["log_l2"]) * l2


def schedules(num_steps):
  hp = {
    "log_lr": jnp.full((num_steps,), jnp.log(0.3)),
    "logit_mom": jnp.full((num_steps,), 2.0),
    "log_l2": jnp.asarray(-5.0),
    "log_scale": jnp.zeros(()),
  }
  lr = lambda hp, t: jnp.exp(hp["log_lr"][t])
  mom = lambda hp, t: jax.nn.sigmoid(hp["logit_mom"][t])
  return hp, lr, mom


def oracle_hypergradient(make_model, hp, batches, val, num_steps, lr, mom, key=None):
  """The same training written with nnx.split/merge around the float oracle.

  With ``key``: at step t every stream restarts from fold_in(fold_in(key, t), i),
  count 0 (the documented replay rule).
  """

  def f(hp):
    graphdef, params, streams, rest = nnx.split(make_model(hp), nnx.Param, nnx.RngState, ...)

    def loss(params, hp, batch, *key_t):
      s = streams
      if key_t:
        leaves, treedef = jax.tree.flatten(streams)
        fresh, i = [], 0
        for x in leaves:
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            fresh.append(jax.random.fold_in(key_t[0], i))
            i += 1
          else:
            fresh.append(jnp.zeros_like(x))
        s = treedef.unflatten(fresh)
      return module_loss(nnx.merge(graphdef, params, s, rest), hp, batch)

    trained = oracle.scan_train(loss, params, hp, batches, num_steps, lr, mom, key=key)
    return val(nnx.merge(graphdef, trained, streams, rest))

  return jax.jit(jax.grad(f))(hp)


def revoptax_hypergradient(make_model, hp, batches, val, num_steps, lr, mom, **options):
  def f(hp):
    trained = revoptax.train_module(
      module_loss,
      make_model(hp),
      hp,
      batches,
      num_steps=num_steps,
      learning_rate=lr,
      momentum=mom,
      **options,
    )
    return val(trained)

  return jax.jit(jax.grad(f))(hp)


@pytest.fixture(scope="module")
def data():
  xb, yb, xv, yv = digits_data(num_train=200, batch_size=50)
  return (xb, yb), (xv, yv)


def test_hypergradients_match_the_oracle_including_what_the_module_was_built_from(data):
  """Schedules, L2 and an init scale the module is built from; internal checks pass."""
  batches, (xv, yv) = data
  num_steps = 40
  hp, lr, mom = schedules(num_steps)
  make = lambda hp: MLP(nnx.Rngs(0), scale=jnp.exp(hp["log_scale"]))
  val = lambda model: nll(model, xv, yv)
  got = revoptax_hypergradient(make, hp, batches, val, num_steps, lr, mom)
  want = oracle_hypergradient(make, hp, batches, val, num_steps, lr, mom)
  oracle.assert_tree_close(got, want, RTOL_F32)


def test_dropout_replays_the_streams_exactly(data):
  batches, (xv, yv) = data
  num_steps = 30
  hp, lr, mom = schedules(num_steps)
  del hp["log_scale"]
  make = lambda hp: MLP(nnx.Rngs(0, dropout=7), dropout=0.3)

  def val(model):
    model.eval()  # no dropout when validating
    return nll(model, xv, yv)

  got = revoptax_hypergradient(make, hp, batches, val, num_steps, lr, mom)  # drift-checked
  default_key = make(hp).drop.rngs.key.get_value()  # the module's own stream key
  want = oracle_hypergradient(make, hp, batches, val, num_steps, lr, mom, key=default_key)
  oracle.assert_tree_close(got, want, RTOL_F32)
  explicit = revoptax_hypergradient(
    make, hp, batches, val, num_steps, lr, mom, key=jax.random.key(3)
  )
  other = oracle_hypergradient(make, hp, batches, val, num_steps, lr, mom, key=jax.random.key(3))
  oracle.assert_tree_close(explicit, other, RTOL_F32)
  assert abs(float(explicit["log_l2"] - got["log_l2"])) > 1e-4 * abs(float(got["log_l2"]))


def test_batch_norm_in_training_mode_is_refused(data):
  batches, _ = data
  hp, lr, mom = schedules(5)
  model = MLP(nnx.Rngs(0), batch_norm=True)
  with pytest.raises(ValueError, match="not trained .* inference mode"):
    revoptax.train_module(
      module_loss, model, hp, batches, num_steps=5, learning_rate=lr, momentum=mom
    )


class Counter(nnx.Variable):
  pass


class CountingLinear(nnx.Module):
  """Replaces (rather than mutates) a non-trained variable on every call: flax allows that."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(64, 10, rngs=rngs)
    self.calls = Counter(jnp.zeros(()))

  def __call__(self, x):
    self.calls = Counter(self.calls.get_value() + 1)
    return self.linear(x)


def test_a_replaced_untrained_variable_is_refused(data):
  """revoptax's own check, for the changes flax itself lets through."""
  batches, _ = data
  hp, lr, mom = schedules(3)
  with pytest.raises(ValueError, match=r"changes the module variable \['calls'\]"):
    revoptax.train_module(
      module_loss,
      CountingLinear(nnx.Rngs(0)),
      hp,
      batches,
      num_steps=3,
      learning_rate=lr,
      momentum=mom,
    )


def test_batch_norm_in_inference_mode_trains_and_returns_a_new_module(data):
  batches, (xv, yv) = data
  num_steps = 20
  hp, lr, mom = schedules(num_steps)
  del hp["log_scale"]

  def make(hp):
    model = MLP(nnx.Rngs(0), batch_norm=True)
    model.eval()
    return model

  val = lambda model: nll(model, xv, yv)
  got = revoptax_hypergradient(make, hp, batches, val, num_steps, lr, mom)
  want = oracle_hypergradient(make, hp, batches, val, num_steps, lr, mom)
  oracle.assert_tree_close(got, want, RTOL_F32)
  model = make(hp)
  before = nnx.state(model, nnx.Param)
  trained = revoptax.train_module(
    module_loss, model, hp, batches, num_steps=num_steps, learning_rate=lr, momentum=mom
  )
  assert trained is not model
  unchanged = jax.tree.map(lambda a, b: bool((a == b).all()), nnx.state(model, nnx.Param), before)
  assert jax.tree.all(unchanged)
  assert float(nll(trained, xv, yv)) < float(nll(model, xv, yv))


def test_bad_inputs_raise():
  hp, lr, mom = schedules(3)
  with pytest.raises(TypeError, match="must be an nnx.Module"):
    revoptax.train_module(
      module_loss,
      {"w": jnp.ones(2)},
      hp,
      jnp.ones((1, 2)),
      num_steps=3,
      learning_rate=lr,
      momentum=mom,
    )
  with pytest.raises(ValueError, match="selects no variables"):
    revoptax.train_module(
      module_loss,
      MLP(nnx.Rngs(0)),
      hp,
      jnp.ones((1, 2)),
      num_steps=3,
      learning_rate=lr,
      momentum=mom,
      wrt=nnx.BatchStat,
    )
