"""Test oracles written from the maths, sharing no code with revoptax.

:func:`scan_train` is momentum SGD as the papers write it, in plain floats, as
one ``lax.scan``; ``jax.grad`` through it stores the whole trajectory and is
the reference the reversed hypergradients must match.  Its only link to the
library is the documented contract (docs/maths.md):

    gamma_q = n / 2**16,  n = clip(round(float32(gamma) * 2**16), 2**8, 2**16 - 1)
    v_{t+1} = gamma_q v_t - (1 - gamma_q) g_t,   g_t = grad_w L(w_t, hp, b_{t mod B}[, k_t])
    w_{t+1} = w_t + alpha_t v_{t+1}

with the straight-through gradient for the momentum quantization and
``k_t = fold_in(key, t)``.  The comparison helpers fail on any non-finite value
and compare element by element.

The meta-learning problem here puts every kind of hyperparameter in one place:
per-step x per-leaf learning rates and momenta, per-layer init scales,
per-weight L2, per-example weights and the training inputs themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import digits_data

import revoptax

MOMENTUM_BITS = 16


def quantized_momentum(gamma, bits=MOMENTUM_BITS):
  """``n / 2**bits`` with the straight-through gradient (the documented quantization)."""
  gamma = jnp.asarray(gamma)
  g32 = gamma.astype(jnp.float32)
  n = jnp.clip(jnp.round(g32 * np.float32(2.0**bits)), 2.0 ** (bits - 8), 2.0**bits - 1)
  applied = (n / np.float32(2.0**bits)).astype(gamma.dtype)
  return gamma + jax.lax.stop_gradient(applied - gamma)


def broadcast_to_params(value, params):
  """One value per params leaf: a scalar for all, or a pytree that is a prefix of params."""
  if not isinstance(value, dict | list | tuple):
    return jax.tree.map(lambda _: value, params)
  return jax.tree.map(lambda v, p: jax.tree.map(lambda _: v, p), value, params)


def scan_train(
  loss_fn, params, hparams, batches, num_steps, learning_rate, momentum, key=None, bits=16
):
  """Final params of ``num_steps`` float momentum-SGD steps, as one ``lax.scan``."""
  num_batches = jax.tree.leaves(batches)[0].shape[0]

  def step(carry, t):
    w, v = carry
    batch = jax.tree.map(lambda x: x[t % num_batches], batches)
    args = (w, hparams, batch) + (() if key is None else (jax.random.fold_in(key, t),))
    g = jax.grad(loss_fn)(*args)
    alpha = broadcast_to_params(learning_rate(hparams, t), w)
    gamma = broadcast_to_params(momentum(hparams, t), w)
    gamma = jax.tree.map(lambda m, p: quantized_momentum(m, bits).astype(p.dtype), gamma, w)
    v = jax.tree.map(lambda v, g, m: m * v - (1 - m) * g, v, g, gamma)
    w = jax.tree.map(lambda w, v, a: w + a * v, w, v, alpha)
    return (w, v), None

  v0 = jax.tree.map(jnp.zeros_like, params)
  (w, _), _ = jax.lax.scan(step, (params, v0), jnp.arange(num_steps))
  return w


def assert_tree_close(got, want, rtol, err_msg="", per="leaf"):
  """Per element: ``|got - want| <= rtol * max|want|`` and everything finite.

  ``max|want|`` is taken per leaf (``per="leaf"``) or over the whole tree
  (``per="tree"``, for random problems where one leaf's gradient can cancel to
  near zero), so small entries are held to that scale (relative errors of
  near-zero entries are meaningless in float arithmetic).
  """
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves, want_def = jax.tree.flatten(want)
  assert jax.tree.structure(got) == want_def, (jax.tree.structure(got), want_def)
  tree_scale = max(float(np.max(np.abs(np.asarray(w, np.float64)))) for w in want_leaves)
  for (path, g), w in zip(got_leaves, want_leaves):
    name = f"{err_msg}{jax.tree_util.keystr(path)}"
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.isfinite(g).all(), f"{name}: non-finite values in the result"
    assert np.isfinite(w).all(), f"{name}: non-finite values in the reference"
    scale = np.max(np.abs(w)) if per == "leaf" else tree_scale
    assert scale > 0, f"{name}: the reference is identically zero"
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=name)


def relative_errors(got, want):
  """Per leaf: ``max|got - want| / max|want|`` (for reporting; fails on non-finite values)."""
  out = {}
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.isfinite(g).all() and np.isfinite(w).all(), jax.tree_util.keystr(path)
    out[jax.tree_util.keystr(path)] = float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
  return out


SIZES = (64, 16, 10)


def _init(base, hp, dtype):
  """The MLP's params: ``base`` cut into the layers' weights, scaled by ``exp(log_init_scale)``."""
  params, offset = {}, 0
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    w = base[offset : offset + a * b].reshape(a, b).astype(dtype) / np.sqrt(a)
    offset += a * b
    params[f"layer{i}"] = {"w": jnp.exp(hp["log_init_scale"][i]) * w, "b": jnp.zeros(b, dtype)}
  return params


def _logits(params, x):
  n_layers = len(params)
  h = x
  for i in range(n_layers):
    h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < n_layers - 1:
      h = jnp.tanh(h)
  return h


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
    return _init(base, hp, dtype)

  def loss_fn(params, hp, batch):
    x, y, i = batch
    logp = jax.nn.log_softmax(_logits(params, x))
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
    logp = jax.nn.log_softmax(_logits(trained, xv))
    return -jnp.mean(jnp.take_along_axis(logp, yv[:, None], axis=1))

  return val_loss, hparams


def revoptax_train_fn(fixed=None, momentum_floor=0.5, **options):
  """``train_fn`` running the library under test (``revoptax.train``).

  ``fixed``: a ``revoptax.FixedPointFormat`` (default: the library's);
  ``momentum_floor``: the rule's, the smallest momentum the schedules use.
  """
  fmt = {} if fixed is None else {"fixed": fixed}
  rule = revoptax.MomentumSGDRule(momentum_floor=momentum_floor, **fmt)

  def train(loss_fn, params, hp, batches, num_steps, learning_rate, momentum):
    return revoptax.train(
      loss_fn,
      params,
      hp,
      batches,
      num_steps=num_steps,
      learning_rate=learning_rate,
      momentum=momentum,
      rule=rule,
      **options,
    )

  return train


def scan_train_fn(bits=16, key=None):
  """``train_fn`` running the float oracle :func:`scan_train`."""

  def train(loss_fn, params, hp, batches, num_steps, learning_rate, momentum):
    return scan_train(loss_fn, params, hp, batches, num_steps, learning_rate, momentum, key, bits)

  return train


# ----------------------------------------------------------------------------
# Adam and AdamW, from the maths of docs/adam.md.


def quantized_complement(lam):
  """``1 - gamma`` applied for a multiplication by ``1 - lam`` (the documented contract):
  ``round(float32(lam) * 2**32) / 2**32``, with the straight-through gradient."""
  lam = jnp.asarray(lam)
  k = jnp.round(jnp.clip(lam.astype(jnp.float32), 0.0, 0.5) * 2.0**32)
  return lam + jax.lax.stop_gradient(k.astype(lam.dtype) * 2.0**-32 - lam)


def adam_scan_train(loss_fn, params, hparams, batches, num_steps, schedules, decoupled):
  """Final params of ``num_steps`` float Adam (AdamW if ``decoupled``) steps, one ``lax.scan``.

  ``schedules``: ``{name: (hparams, t) -> value}`` for learning_rate, b1, b2, eps,
  eps_root (and weight_decay).  The derivative of ``sqrt`` at 0 is taken as 0.
  """
  num_batches = jax.tree.leaves(batches)[0].shape[0]

  def safe_sqrt(x):
    return jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0)

  def step(carry, t):
    w, m, v = carry
    batch = jax.tree.map(lambda x: x[t % num_batches], batches)
    g = jax.grad(loss_fn)(w, hparams, batch)
    hp = {k: broadcast_to_params(fn(hparams, t), w) for k, fn in schedules.items()}
    count = t + 1

    def leaf(w, m, v, g, lr, b1, b2, eps, eps_root, wd=None):
      b1 = 1 - quantized_complement(1 - b1)
      b2 = 1 - quantized_complement(1 - b2)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      m_hat = m / (1 - b1**count)
      v_hat = v / (1 - b2**count)
      if wd is not None:
        wd = wd + jax.lax.stop_gradient(quantized_complement(lr * wd) / lr - wd)
        w = (1 - lr * wd) * w
      return w - lr * m_hat / (safe_sqrt(v_hat + eps_root) + eps), m, v

    names = ["learning_rate", "b1", "b2", "eps", "eps_root"] + (["weight_decay"] * decoupled)
    out = jax.tree.map(leaf, w, m, v, g, *[hp[k] for k in names])
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
    w, m, v = (jax.tree.map(lambda x, i=i: x[i], out, is_leaf=is_triple) for i in range(3))
    return (w, m, v), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (w, _, _), _ = jax.lax.scan(step, (params, zeros, zeros), jnp.arange(num_steps))
  return w


def rmsprop_scan_train(loss_fn, params, hparams, batches, num_steps, schedules, centered):
  """Final params of ``num_steps`` float RMSProp-with-momentum steps (Optax's form:
  ``mom = momentum mom - lr g / sqrt(s + eps)``, ``s = nu`` or ``nu - mu**2``)."""
  num_batches = jax.tree.leaves(batches)[0].shape[0]

  def step(carry, t):
    w, nu, mu, mom = carry
    batch = jax.tree.map(lambda x: x[t % num_batches], batches)
    g = jax.grad(loss_fn)(w, hparams, batch)
    hp = {k: broadcast_to_params(fn(hparams, t), w) for k, fn in schedules.items()}

    def leaf(w, nu, mu, mom, g, lr, decay, eps, momentum):
      decay = 1 - quantized_complement(1 - decay)
      momentum = 1 - quantized_complement(1 - momentum)
      nu = decay * nu + (1 - decay) * g * g
      mu = decay * mu + (1 - decay) * g
      second = nu - mu * mu if centered else nu
      mom = momentum * mom - lr * g / jnp.sqrt(second + eps)
      return w + mom, nu, mu, mom

    names = ["learning_rate", "decay", "eps", "momentum"]
    out = jax.tree.map(leaf, w, nu, mu, mom, g, *[hp[k] for k in names])
    is_quad = lambda x: isinstance(x, tuple) and len(x) == 4  # noqa: E731
    return tuple(jax.tree.map(lambda x, i=i: x[i], out, is_leaf=is_quad) for i in range(4)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (w, *_), _ = jax.lax.scan(step, (params, zeros, zeros, zeros), jnp.arange(num_steps))
  return w


def _per_layer(fn, n_layers):
  return lambda hp, t: {f"layer{i}": fn(hp, t, i) for i in range(n_layers)}


def adam_meta_problem(
  dtype=jnp.float32, num_steps=40, batch_size=20, num_batches=6, optimizer="adamw"
):
  """``(val_loss(hp, train_fn), hparams)`` on digits with init scales and the training
  inputs as hyperparameters, and the optimizer's: AdamW with a per-step x per-layer
  learning rate, learned b1, b2, eps and per-layer weight decay, or (``optimizer=
  "rmsprop"``) RMSProp with a per-step x per-layer learning rate, learned decay, eps and
  per-layer momentum.  ``train_fn(loss_fn, params, hp, batches, num_steps, schedules)``."""
  xb, yb, xv, yv = digits_data(num_train=batch_size * num_batches, batch_size=batch_size)
  xb, xv, yv = xb.astype(dtype), xv[:300].astype(dtype), yv[:300]
  base = jax.random.normal(jax.random.key(1), (sum(a * b for a, b in zip(SIZES, SIZES[1:])),))
  rng = np.random.default_rng(1)
  n_layers = len(SIZES) - 1

  def init(hp):
    return _init(base, hp, dtype)

  def loss_fn(params, hp, batch):
    x, y = batch
    logp = jax.nn.log_softmax(_logits(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  lr = _per_layer(lambda hp, t, i: jnp.exp(hp["log_lr"][t, i]), n_layers)
  hparams = {
    "log_lr": jnp.asarray(np.log(0.01) + 0.3 * rng.normal(size=(num_steps, n_layers)), dtype),
    "log_eps": jnp.asarray(np.log(1e-4), dtype),
    "log_init_scale": jnp.zeros(n_layers, dtype),
    "train_x": xb,
  }
  if optimizer == "adamw":
    schedules = {
      "learning_rate": lr,
      "b1": lambda hp, t: 0.5 + 0.5 * jax.nn.sigmoid(hp["b1_logit"]),
      "b2": lambda hp, t: 0.9 + 0.1 * jax.nn.sigmoid(hp["b2_logit"]),
      "eps": lambda hp, t: jnp.exp(hp["log_eps"]),
      "eps_root": lambda hp, t: 0.0,
      "weight_decay": _per_layer(lambda hp, t, i: jnp.exp(hp["log_wd"][i]), n_layers),
    }
    hparams["b1_logit"] = jnp.asarray(1.4, dtype)  # b1 = 0.9
    hparams["b2_logit"] = jnp.asarray(4.6, dtype)  # b2 = 0.999
    hparams["log_wd"] = jnp.asarray(np.log(0.05) + 0.3 * rng.normal(size=n_layers), dtype)
  else:
    schedules = {
      "learning_rate": _per_layer(lambda hp, t, i: 0.1 * jnp.exp(hp["log_lr"][t, i]), n_layers),
      "decay": lambda hp, t: 0.5 + 0.5 * jax.nn.sigmoid(hp["decay_logit"]),
      "eps": lambda hp, t: jnp.exp(hp["log_eps"]),
      "momentum": _per_layer(
        lambda hp, t, i: 0.5 + 0.5 * jax.nn.sigmoid(hp["momentum_logit"][i]), n_layers
      ),
    }
    hparams["decay_logit"] = jnp.asarray(2.2, dtype)  # decay = 0.95
    hparams["momentum_logit"] = jnp.asarray(1.4 + 0.3 * rng.normal(size=n_layers), dtype)

  def val_loss(hp, train_fn):
    trained = train_fn(loss_fn, init(hp), hp, (hp["train_x"], yb), num_steps, schedules)
    logp = jax.nn.log_softmax(_logits(trained, xv))
    return -jnp.mean(jnp.take_along_axis(logp, yv[:, None], axis=1))

  return val_loss, hparams


def adam_revoptax_train_fn(rule=None, **options):
  """``train_fn`` of :func:`adam_meta_problem` running ``revoptax.train``."""
  rule = revoptax.AdamRule(decoupled_weight_decay=True) if rule is None else rule

  def train(loss_fn, params, hp, batches, num_steps, schedules):
    return revoptax.train(
      loss_fn, params, hp, batches, num_steps=num_steps, rule=rule, **schedules, **options
    )

  return train


def adam_scan_train_fn(optimizer="adamw", centered=False):
  """``train_fn`` of :func:`adam_meta_problem` running the float oracle."""

  def train(loss_fn, params, hp, batches, num_steps, schedules):
    if optimizer == "adamw":
      return adam_scan_train(loss_fn, params, hp, batches, num_steps, schedules, True)
    return rmsprop_scan_train(loss_fn, params, hp, batches, num_steps, schedules, centered)

  return train
