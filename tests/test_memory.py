"""Hyperparameters are evaluated per step: memory does not grow with T beyond the buffer.

The digits MLP with one learning rate and one momentum per weight (Meta-SGD
style, constant in time, so the hparams do not grow with T): the XLA temp
memory of the hypergradient at T = 1,000 is within 1.3x of T = 100 (the rest
of the growth is the information buffer, log2(1/0.9) = 0.15 bits per weight
per step), and the per-element hypergradients equal the float scan oracle's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
from conftest import cross_entropy, digits_data, init_mlp
from oracle import assert_tree_close

import revoptax

FLOOR = 0.9  # learned momenta stay above it by construction (momentum_above)
LOGIT_09 = float(np.log(0.05 / 0.95))  # momentum_above(0.9, x) = 0.905 at init


def per_element(params):
  return {
    "log_lr": jax.tree.map(lambda p: jnp.full_like(p, -1.0), params),
    "momentum_logit": jax.tree.map(lambda p: jnp.full_like(p, LOGIT_09), params),
    "log_l2": jnp.asarray(-6.0),
  }


def learning_rate(hp, t):
  return jax.tree.map(jnp.exp, hp["log_lr"])


def momentum(hp, t):
  return jax.tree.map(lambda x: revoptax.momentum_above(FLOOR, x), hp["momentum_logit"])


def loss_fn(p, hp, batch):
  l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
  return cross_entropy(p, *batch) + jnp.exp(hp["log_l2"]) * l2


def val_loss_fn(num_steps, train_fn):
  xb, yb, xv, yv = digits_data()
  params = init_mlp(jax.random.key(0))

  def val_loss(hp):
    trained = train_fn(loss_fn, params, hp, (xb, yb), num_steps, learning_rate, momentum)
    return cross_entropy(trained, xv, yv)

  return val_loss, per_element(params)


REVOPTAX = oracle.revoptax_train_fn(momentum_floor=FLOOR)


def temp_bytes(num_steps):
  val_loss, hp = val_loss_fn(num_steps, REVOPTAX)
  compiled = jax.jit(jax.grad(val_loss)).lower(hp).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_of_per_element_schedules_does_not_grow_with_the_horizon():
  short, long = temp_bytes(100), temp_bytes(1000)
  assert long <= 1.3 * short, (short, long)


def test_per_element_hypergradients_equal_the_scan_oracle():
  num_steps = 40
  got_fn, hp = val_loss_fn(num_steps, REVOPTAX)
  want_fn, _ = val_loss_fn(num_steps, oracle.scan_train_fn())
  got = jax.jit(jax.grad(got_fn))(hp)
  want = jax.jit(jax.grad(want_fn))(hp)
  # float32 through 40 steps; per element, relative to each leaf's largest entry.
  assert_tree_close(got, want, 2e-4)
  assert float(jnp.max(jnp.abs(got["momentum_logit"]["layer0"]["w"]))) > 0
