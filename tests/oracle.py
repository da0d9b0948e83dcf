"""The test oracle: the same training as revoptax.train, as a plain float lax.scan.

``jax.grad`` through :func:`scan_train` stores the whole trajectory; it is the
reference the reversed hypergradients must match.  The meta-learning problem
here puts every kind of hyperparameter in one place: per-step x per-leaf
learning rates and momenta, per-layer init scales, per-weight L2, per-example
weights and the training inputs themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import digits_data

import revoptax


def scan_train(loss_fn, params, hparams, batches, num_steps, learning_rate, momentum, bits=16):
  rule = revoptax.MomentumSGDRule(momentum_bits=bits)
  num_batches = jax.tree.leaves(batches)[0].shape[0]

  def per_leaf(value):
    if isinstance(value, dict | list | tuple):
      return value
    return jax.tree.map(lambda _: value, params)

  def step(carry, t):
    w, v = carry
    batch = jax.tree.map(lambda x: x[t % num_batches], batches)
    g = jax.grad(loss_fn)(w, hparams, batch)
    alpha = per_leaf(learning_rate(hparams, t))
    gamma = per_leaf(momentum(hparams, t))

    def leaf_step(w, v, g, a, m):
      m_q = m + jax.lax.stop_gradient(rule.applied_momentum(m, m.dtype) - m)
      return rule.float_step(w, v, g, a, m_q)

    out = jax.tree.map(leaf_step, w, v, g, alpha, gamma)
    is_pair = lambda x: isinstance(x, tuple)
    return (
      jax.tree.map(lambda o: o[0], out, is_leaf=is_pair),
      jax.tree.map(lambda o: o[1], out, is_leaf=is_pair),
    ), None

  v0 = jax.tree.map(jnp.zeros_like, params)
  (w, _), _ = jax.lax.scan(step, (params, v0), jnp.arange(num_steps))
  return w


SIZES = (64, 16, 10)


def meta_problem(dtype=jnp.float32, num_steps=60, batch_size=20, num_batches=6):
  """Returns ``(val_loss(hp, train_fn), hparams)`` for the all-kinds problem."""
  xb, yb, xv, yv = digits_data(num_train=batch_size * num_batches, batch_size=batch_size)
  xb, xv = xb.astype(dtype), xv[:300].astype(dtype)
  yv = yv[:300]
  idx = jnp.arange(batch_size * num_batches, dtype=jnp.int32).reshape(num_batches, batch_size)
  base = jax.random.normal(jax.random.key(0), (sum(a * b for a, b in zip(SIZES, SIZES[1:])),))
  rng = np.random.default_rng(0)
  n_layers = len(SIZES) - 1

  def init(hp):
    params, offset = {}, 0
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
      w = base[offset : offset + a * b].reshape(a, b).astype(dtype) / np.sqrt(a)
      offset += a * b
      params[f"layer{i}"] = {"w": jnp.exp(hp["log_init_scale"][i]) * w, "b": jnp.zeros(b, dtype)}
    return params

  def logits(params, x):
    h = x
    for i in range(n_layers):
      h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
      if i < n_layers - 1:
        h = jnp.tanh(h)
    return h

  def loss_fn(params, hp, batch):
    x, y, i = batch
    logp = jax.nn.log_softmax(logits(params, x))
    nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    weights = jax.nn.softmax(hp["example_logit"][i]) * i.shape[0]
    l2 = sum(jnp.sum(jnp.exp(hp["log_l2"][k]) * params[k]["w"] ** 2) for k in params)
    return jnp.mean(weights * nll) + l2

  def learning_rate(hp, t):
    return {
      f"layer{i}": {"w": jnp.exp(hp["log_lr"][t, i]), "b": jnp.exp(hp["log_lr"][t, i])}
      for i in range(n_layers)
    }

  def momentum(hp, t):
    return {
      f"layer{i}": {"w": jax.nn.sigmoid(hp["logit_mom"][t, i]), "b": jax.nn.sigmoid(0.0)}
      for i in range(n_layers)
    }

  hparams = {
    "log_lr": jnp.asarray(np.log(0.3) + 0.3 * rng.normal(size=(num_steps, n_layers)), dtype),
    "logit_mom": jnp.asarray(2.0 + 0.5 * rng.normal(size=(num_steps, n_layers)), dtype),
    "log_init_scale": jnp.zeros(n_layers, dtype),
    "log_l2": {
      f"layer{i}": jnp.asarray(-7.0 + rng.normal(size=(a, b)), dtype)
      for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
    },
    "example_logit": jnp.zeros(batch_size * num_batches, dtype),
    "train_x": xb,
  }

  def val_loss(hp, train_fn):
    batches = (hp["train_x"], yb, idx)
    trained = train_fn(loss_fn, init(hp), hp, batches, num_steps, learning_rate, momentum)
    logp = jax.nn.log_softmax(logits(trained, xv))
    return -jnp.mean(jnp.take_along_axis(logp, yv[:, None], axis=1))

  return val_loss, hparams


def revoptax_train_fn(**options):
  def train(loss_fn, params, hp, batches, num_steps, learning_rate, momentum):
    return revoptax.train(
      loss_fn,
      params,
      hp,
      batches,
      num_steps=num_steps,
      learning_rate=learning_rate,
      momentum=momentum,
      momentum_floor=0.5,
      **options,
    )

  return train


def scan_train_fn(bits=16):
  def train(loss_fn, params, hp, batches, num_steps, learning_rate, momentum):
    return scan_train(loss_fn, params, hp, batches, num_steps, learning_rate, momentum, bits)

  return train


def max_relative_errors(got, want):
  """Per hyperparameter leaf: max |got - want| / max |want|."""
  return {
    jax.tree_util.keystr(path): float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want))
  }
