"""Eager calls compile once: train's static configuration is hashed by value.

``jax.grad(val_loss)(hp)`` outside ``jit``, with the schedules written as
fresh lambdas inside ``val_loss``, must reuse the compiled loops on the second
and later calls.  Counted as XLA backend compilations, not timed.
"""

import jax
import jax.numpy as jnp
from jax._src import monitoring

import revoptax

_COMPILE = "/jax/core/compile/backend_compile_duration"


def backend_compiles(fn) -> int:
  """Number of XLA compilations while ``fn()`` runs."""
  seen = []

  def listener(event, duration, **kwargs):
    if event == _COMPILE:
      seen.append(duration)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn())
  finally:
    monitoring.unregister_event_duration_listener(listener)
  return len(seen)


def loss(w, hp, x):
  return jnp.sum((w["a"] - x) ** 2) * jnp.exp(hp["log_scale"]) + jnp.sum(w["b"] ** 2)


def val_loss(hp, scale=1.0):
  trained = revoptax.train(
    loss,
    {"a": jnp.zeros(3), "b": jnp.ones(2)},
    hp,
    jnp.ones((4, 3)),
    num_steps=50,
    learning_rate=lambda hp, t: scale * jnp.exp(hp["log_lr"][t]),  # a new lambda every call
    momentum=lambda hp, t: jax.nn.sigmoid(hp["logit_momentum"]),
    rule=revoptax.MomentumSGDRule(momentum_floor=0.5),
  )
  return jnp.sum(trained["a"]) + jnp.sum(trained["b"] ** 2)


HP = {"log_lr": jnp.full(50, -2.0), "logit_momentum": jnp.asarray(2.0), "log_scale": jnp.zeros(())}


def test_repeated_eager_hypergradients_compile_once():
  first = backend_compiles(lambda: jax.grad(val_loss)(HP))
  assert first > 0
  again = [backend_compiles(lambda: jax.grad(val_loss)(HP)) for _ in range(3)]
  assert again == [0, 0, 0]
  # New values of the same shapes: still no compilation.
  other = {**HP, "log_lr": HP["log_lr"] + 0.5}
  assert backend_compiles(lambda: jax.grad(val_loss)(other)) == 0


def test_a_different_static_configuration_compiles_again():
  jax.grad(val_loss)(HP)
  # A closed-over Python number is part of the configuration: another value is another loop.
  assert backend_compiles(lambda: jax.grad(lambda h: val_loss(h, scale=2.0))(HP)) > 0
  assert backend_compiles(lambda: jax.grad(lambda h: val_loss(h, scale=2.0))(HP)) == 0
  # And the two results differ, as they must.
  g1, g2 = jax.grad(val_loss)(HP), jax.grad(lambda h: val_loss(h, scale=2.0))(HP)
  assert not bool(jnp.allclose(g1["log_lr"], g2["log_lr"]))
