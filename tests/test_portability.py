"""Portable exact arithmetic: no float64 and no 64-bit bitcast for float32/bfloat16 params.

TPUs have no float64, and XLA's 64-bit rewriting there does not implement
bitcasts between 64-bit types (64-bit integer adds, multiplies and shifts are
emulated exactly).  The lowered programs of train's forward and backward
passes and of the Optax update and inverse are searched for both.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import revoptax

PARAMS = {"a": jnp.zeros((4, 3)), "b": jnp.ones(3, jnp.bfloat16)}


def loss(p, hp, x):
  b = p["b"].astype(jnp.float32)
  return jnp.sum(jnp.tanh(x @ p["a"] + b) ** 2) * jnp.exp(hp["log_scale"])


def offending_lines(text: str) -> list[str]:
  """Lines that use float64, or bitcast from or to a 64-bit type."""
  bad = []
  for line in text.splitlines():
    if "f64" in line or ("bitcast_convert" in line and re.search(r"\b[iuf]64\b|xi64|xui64", line)):
      bad.append(line.strip()[:200])
  return bad


def test_train_forward_and_backward_use_no_float64():
  def val_loss(hp):
    trained = revoptax.train(
      loss,
      PARAMS,
      hp,
      jnp.ones((2, 5, 4)),
      num_steps=4,
      learning_rate=lambda hp, t: jnp.exp(hp["log_lr"]),
      momentum=lambda hp, t: jax.nn.sigmoid(hp["logit_momentum"]),
    )
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(trained))

  hp = {
    "log_lr": jnp.float32(-2.0),
    "logit_momentum": jnp.float32(2.0),
    "log_scale": jnp.float32(0),
  }
  text = jax.jit(jax.value_and_grad(val_loss)).lower(hp).as_text()
  assert "while" in text  # both loops are in the program searched
  assert offending_lines(text) == []


@pytest.mark.parametrize("schedule", ["constant", "per_step"])
def test_optax_update_and_inverse_use_no_float64(schedule):
  lr = 0.1 if schedule == "constant" else (lambda t: 0.1 / (1.0 + t))
  tx = revoptax.reversible_sgd(lr, 0.9, max_steps=8)
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  update = jax.jit(tx.update).lower(grads, state, PARAMS).as_text()
  assert offending_lines(update) == []
  _, later = tx.update(grads, state, PARAMS)
  inverse = jax.jit(lambda s: tx.inverse(s, lambda p: grads)).lower(later).as_text()
  assert offending_lines(inverse) == []


def test_the_search_finds_float64_and_64_bit_bitcasts():
  with jax.enable_x64(True):
    x = jnp.ones(3, jnp.float64)
    assert offending_lines(jax.jit(lambda y: y * 2).lower(x).as_text())
    bitcast = lambda y: jax.lax.bitcast_convert_type(y, jnp.uint64)
    assert offending_lines(jax.jit(bitcast).lower(jnp.ones(3, jnp.int64)).as_text())
