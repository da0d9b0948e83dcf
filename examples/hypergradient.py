"""Hypergradients of the digits validation loss through a whole training run.

    python examples/hypergradient.py [--steps 1000]

Differentiates the validation loss of a 64-50-50-10 MLP trained for T steps on
scikit-learn's digits with respect to per-layer learning-rate and momentum
schedules (one value per step and layer) and per-layer init scales, two ways:

* ``revoptax.train`` (training is run backwards exactly; memory flat in T);
* ``jax.grad`` through a plain ``lax.scan`` of the same update (stores all of it),

and prints their agreement, time and XLA temp memory.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import revoptax

SIZES = (64, 50, 50, 10)
LAYERS = [f"layer{i}" for i in range(len(SIZES) - 1)]


def data():
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  return (x[:1000].reshape(10, 100, 64), y[:1000].reshape(10, 100)), (x[1000:], y[1000:])


def init_params(hp):
  keys = jax.random.split(jax.random.key(0), len(LAYERS))
  return {
    name: {
      "w": jnp.exp(hp["log_init_scale"][i]) * jax.random.normal(k, (a, b)) / np.sqrt(a),
      "b": jnp.zeros(b),
    }
    for i, (name, k, a, b) in enumerate(zip(LAYERS, keys, SIZES[:-1], SIZES[1:]))
  }


def cross_entropy(params, x, y):
  h = x
  for i, name in enumerate(LAYERS):
    h = h @ params[name]["w"] + params[name]["b"]
    if i < len(LAYERS) - 1:
      h = jnp.tanh(h)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))


def loss_fn(params, hp, batch):
  return cross_entropy(params, *batch)


def learning_rate(hp, t):  # per step and per layer
  return {name: jnp.exp(hp["log_lr"][t, i]) for i, name in enumerate(LAYERS)}


def momentum(hp, t):
  return {name: jax.nn.sigmoid(hp["logit_mom"][t, i]) for i, name in enumerate(LAYERS)}


def scan_train(params, hp, batches, num_steps):
  """The same training as a float lax.scan (gamma quantized exactly as revoptax does)."""
  rule = revoptax.MomentumSGDRule()

  def step(carry, t):
    w, v = carry
    batch = jax.tree.map(lambda x: x[t % 10], batches)
    g = jax.grad(loss_fn)(w, hp, batch)
    new_w, new_v = {}, {}
    for name in LAYERS:
      applied = {
        "learning_rate": learning_rate(hp, t)[name],
        "momentum": rule.applied_momentum(momentum(hp, t)[name]),
      }
      pairs = jax.tree.map(
        lambda w, v, g, hp=applied: rule.float_step(w, (v,), g, hp), w[name], v[name], g[name]
      )
      new_w[name] = jax.tree.map(lambda p: p[0], pairs, is_leaf=lambda x: isinstance(x, tuple))
      new_v[name] = jax.tree.map(lambda p: p[1][0], pairs, is_leaf=lambda x: isinstance(x, tuple))
    return (new_w, new_v), None

  v0 = jax.tree.map(jnp.zeros_like, params)
  return jax.lax.scan(step, (params, v0), jnp.arange(num_steps))[0][0]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  args = parser.parse_args()
  num_steps = args.steps
  batches, (x_val, y_val) = data()
  hp = {
    "log_lr": jnp.full((num_steps, len(LAYERS)), jnp.log(0.3)),
    "logit_mom": jnp.full((num_steps, len(LAYERS)), jnp.log(0.9 / 0.1)),
    "log_init_scale": jnp.zeros(len(LAYERS)),
  }

  def val_loss_revoptax(hp):
    trained = revoptax.train(
      loss_fn,
      init_params(hp),
      hp,
      batches,
      num_steps=num_steps,
      learning_rate=learning_rate,
      momentum=momentum,
      rule=revoptax.MomentumSGDRule(momentum_floor=0.5),
    )
    return cross_entropy(trained, x_val, y_val)

  def val_loss_scan(hp):
    return cross_entropy(scan_train(init_params(hp), hp, batches, num_steps), x_val, y_val)

  results = {}
  for name, f in [("revoptax.train", val_loss_revoptax), ("jax.grad through scan", val_loss_scan)]:
    compiled = jax.jit(jax.value_and_grad(f)).lower(hp).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(hp))
    start = time.perf_counter()
    loss, grads = jax.block_until_ready(compiled(hp))
    results[name] = (loss, grads, time.perf_counter() - start, temp)
    print(
      f"{name:>22}: val loss {float(loss):.4f}, {results[name][2]:.2f} s, "
      f"XLA temp {temp / 2**20:.1f} MiB"
    )

  (_, g_rev, t_rev, m_rev), (_, g_scan, t_scan, m_scan) = results.values()
  print(
    f"\nT = {num_steps}: revoptax uses {m_scan / max(m_rev, 1):.0f}x less temp memory and "
    f"{t_rev / t_scan:.2f}x the time of jax.grad through scan.\n"
  )
  for key in hp:
    a, b = np.asarray(g_rev[key]), np.asarray(g_scan[key])
    rel = np.max(np.abs(a - b)) / np.max(np.abs(b))
    print(f"d val / d {key:<15} shape {str(a.shape):<10} max relative difference {rel:.1e}")
  print("\nper-layer init-scale hypergradient:", np.round(np.asarray(g_rev["log_init_scale"]), 5))
  print(
    "learning-rate hypergradient, first 5 steps of layer0:",
    np.round(np.asarray(g_rev["log_lr"][:5, 0]), 6),
  )


if __name__ == "__main__":
  main()
