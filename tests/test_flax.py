"""The reversible optimizers work unchanged in flax.nnx.Optimizer and a Linen TrainState."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import default_and_slow, words_equal
from flax import nnx
from flax.training import train_state

import revoptax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(64, 50, rngs=rngs)
    self.l2 = nnx.Linear(50, 50, rngs=rngs)
    self.l3 = nnx.Linear(50, 10, rngs=rngs)

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


# (factory, steps): each optimizer with settings that train the digits MLP.
OPTIMIZERS = {
  "sgd": (lambda n: revoptax.reversible_sgd(0.3, 0.9, max_steps=n), 1000),
  "adam": (lambda n: revoptax.reversible_adam(3e-3, max_steps=n), 300),
  "adamw": (lambda n: revoptax.reversible_adamw(3e-3, weight_decay=0.05, max_steps=n), 300),
  "rmsprop": (lambda n: revoptax.reversible_rmsprop(1e-3, momentum=0.9, max_steps=n), 300),
}


@pytest.mark.parametrize("name", default_and_slow(OPTIMIZERS, default=("sgd",)))
def test_nnx_optimizer_digits_round_trip(digits, name):
  """Minibatch steps forward in nnx.Optimizer, as many back: initial words exactly."""
  xb, yb, _, _ = digits
  make, num_steps = OPTIMIZERS[name]
  num_batches = xb.shape[0]
  model = MLP(nnx.Rngs(0))
  tx = make(num_steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  initial_state = nnx.as_pure(optimizer.opt_state)
  initial_params = nnx.as_pure(nnx.state(model, nnx.Param))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  losses = [
    float(train_step(model, optimizer, xb[t % num_batches], yb[t % num_batches]))
    for t in range(num_steps)
  ]
  assert losses[-1] < 0.5 * losses[0]  # it really trained

  graphdef, _ = nnx.split(model, nnx.Param)

  @jax.jit
  def reverse(state):
    def unstep(state, t):
      def grad_fn(params):
        m = nnx.merge(graphdef, params)
        return nnx.as_pure(nnx.grad(nnx_loss)(m, xb[t % num_batches], yb[t % num_batches]))

      return tx.inverse(state, grad_fn)

    state, params = jax.lax.scan(unstep, state, jnp.arange(num_steps)[::-1])
    return state, jax.tree.map(lambda p: p[-1], params)

  state, params = reverse(nnx.as_pure(optimizer.opt_state))
  assert words_equal(state, initial_state)
  assert words_equal(params, initial_params)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(50)(x))
    return nn.Dense(10)(x)


LINEN_OPTIMIZERS = {
  "sgd": lambda n: revoptax.reversible_sgd(0.3, optax.linear_schedule(0.5, 0.95, n), max_steps=n),
  "adam": lambda n: revoptax.reversible_adam(optax.cosine_decay_schedule(3e-3, n), max_steps=n),
  "adamw": lambda n: revoptax.reversible_adamw(1e-3, b1=0.8, weight_decay=0.1, max_steps=n),
  "rmsprop": lambda n: revoptax.reversible_rmsprop(
    1e-3, centered=True, momentum=optax.linear_schedule(0.6, 0.9, n), max_steps=n
  ),
}


@pytest.mark.parametrize("name", default_and_slow(LINEN_OPTIMIZERS, default=("sgd",)))
def test_linen_train_state_round_trip(digits, name):
  xb, yb, _, _ = digits
  num_steps = 200
  model = LinenMLP()
  params = model.init(jax.random.key(0), xb[0])["params"]
  tx = LINEN_OPTIMIZERS[name](num_steps)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  initial = state

  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(state, t):
    grads = jax.grad(loss)(state.params, xb[t % 10], yb[t % 10])
    return state.apply_gradients(grads=grads)

  for t in range(num_steps):
    state = step(state, t)

  @jax.jit
  def unstep(opt_state, t):
    return tx.inverse(opt_state, lambda p: jax.grad(loss)(p, xb[t % 10], yb[t % 10]))

  opt_state = state.opt_state
  for t in reversed(range(num_steps)):
    opt_state, params = unstep(opt_state, t)
  assert words_equal(opt_state, initial.opt_state)
  assert words_equal(params, initial.params)
