"""Shared setup for the benchmarks: digits data, MLPs, hyperparameters, methods.

Mirrors ``shared/reference/baselines.md``: scikit-learn digits (``X / 16``,
the first 1,000 examples train, the rest validate), minibatches of 100 chosen
by step, momentum SGD ``v <- g v - (1 - g) grad, w <- w + a v`` with per-step
log learning rates, per-step logit momenta and a log L2 penalty, and the
validation cross-entropy after ``T`` steps as the meta objective.

Every method below computes the same function of the hyperparameters with the
same update rule (``revoptax.MomentumSGDRule.float_step``) and the same
quantized momentum (``MomentumSGDRule.applied_momentum``, with its
straight-through gradient), so their hypergradients agree up to rounding:

* ``revoptax``: ``jax.grad`` of :func:`revoptax.train` (training reversed).
* ``scan``: ``jax.grad`` through a plain ``lax.scan`` (stores every step).
* ``checkpoint``: the same with ``jax.checkpoint`` on the step body.
* ``sqrt_chunks``: ``K ~ sqrt(T)`` checkpointed chunks of checkpointed steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import revoptax

NUM_TRAIN = 1000
BATCH_SIZE = 100
NUM_BATCHES = NUM_TRAIN // BATCH_SIZE
# alpha, the long-run step size (optax.sgd(alpha * (1 - gamma), momentum=gamma)).
# Fixed across gammas: alpha = 0.1 / (1 - gamma) made gamma = 0.99 training chaotic
# (hypergradients ~1e18) so that methods disagreed by rounding alone.
LEARNING_RATE = 1.0
L2_INIT = 1e-4

MODELS = {
  "digits": (64, 50, 50, 10),  # 6,310 params
  "wide": (64, 400, 200, 10),  # 108,210 params
}
METHODS = ("revoptax", "scan", "checkpoint", "sqrt_chunks")
RULE = revoptax.MomentumSGDRule()


# ----------------------------------------------------------------------------
# Data and model.


def load_digits():
  """``(batches, labels, x_val, y_val)``: ``[10, 100, 64]``, ``[10, 100]``, rest."""
  from sklearn.datasets import load_digits as sk_load_digits

  data = sk_load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  batches = x[:NUM_TRAIN].reshape(NUM_BATCHES, BATCH_SIZE, -1)
  labels = y[:NUM_TRAIN].reshape(NUM_BATCHES, BATCH_SIZE)
  return (
    jnp.asarray(batches),
    jnp.asarray(labels),
    jnp.asarray(x[NUM_TRAIN:]),
    jnp.asarray(y[NUM_TRAIN:]),
  )


def init_mlp(sizes, seed: int = 0):
  """A plain dict pytree ``{"layer0": {"w", "b"}, ...}`` with 1/sqrt(fan_in) init."""
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  params = {}
  for i, (key, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    params[f"layer{i}"] = {
      "w": jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in),
      "b": jnp.zeros((fan_out,), jnp.float32),
    }
  return params


def num_params(params) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(params))


def mlp(params, x):
  num_layers = len(params)
  for i in range(num_layers):
    layer = params[f"layer{i}"]
    x = x @ layer["w"] + layer["b"]
    if i < num_layers - 1:
      x = jnp.tanh(x)
  return x


def cross_entropy(params, x, y):
  logits = mlp(params, x)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def train_loss(params, hparams, batch):
  """Minibatch cross-entropy plus ``exp(log_l2) / 2 * |w|^2``."""
  x, y = batch
  l2 = 0.5 * jnp.exp(hparams["log_l2"]) * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
  return cross_entropy(params, x, y) + l2


# ----------------------------------------------------------------------------
# Hyperparameters and the schedule they define.


def init_hparams(num_steps: int, gamma: float):
  """``log_lr[T]``, ``logit_momentum[T]`` and a scalar ``log_l2``."""
  alpha = LEARNING_RATE
  return {
    "log_lr": jnp.full((num_steps,), math.log(alpha), jnp.float32),
    "logit_momentum": jnp.full((num_steps,), math.log(gamma / (1.0 - gamma)), jnp.float32),
    "log_l2": jnp.asarray(math.log(L2_INIT), jnp.float32),
  }


def learning_rate(hparams, t):
  return jnp.exp(hparams["log_lr"][t])


def momentum(hparams, t):
  return jax.nn.sigmoid(hparams["logit_momentum"][t])


def quantized_momentum(hparams, t):
  """The momentum revoptax applies (``n / 2**16``), with a straight-through gradient."""
  return RULE.applied_momentum(momentum(hparams, t))


# ----------------------------------------------------------------------------
# Float training loops (the baselines).


def _float_step(data, hparams, carry, t):
  batches, labels = data
  w, v = carry
  b = t % batches.shape[0]
  g = jax.grad(train_loss)(w, hparams, (batches[b], labels[b]))
  alpha = learning_rate(hparams, t)
  gamma = quantized_momentum(hparams, t)
  hp = {"learning_rate": alpha, "momentum": gamma}
  pairs = jax.tree.map(lambda w, v, g: RULE.float_step(w, (v,), g, hp), w, v, g)
  is_pair = lambda x: isinstance(x, tuple)
  new_w = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
  new_v = jax.tree.map(lambda p: p[1][0], pairs, is_leaf=is_pair)
  return (new_w, new_v), None


def _scan_steps(step, carry, ts):
  carry, _ = lax.scan(step, carry, ts)
  return carry


def sqrt_chunks(num_steps: int) -> int:
  """The divisor of ``num_steps`` closest to ``sqrt(num_steps)`` (number of chunks)."""
  root = math.sqrt(num_steps)
  divisors = [k for k in range(1, num_steps + 1) if num_steps % k == 0 and k <= 4 * root + 1]
  return min(divisors, key=lambda k: (abs(k - root), k))


def float_train(params, hparams, data, num_steps: int, method: str):
  """Final params of the float loop; ``method`` picks the memory strategy."""
  step = partial(_float_step, data, hparams)
  carry = (params, jax.tree.map(jnp.zeros_like, params))
  ts = jnp.arange(num_steps)
  if method in ("forward", "scan"):
    return _scan_steps(step, carry, ts)[0]
  if method == "checkpoint":
    return _scan_steps(jax.checkpoint(step), carry, ts)[0]
  if method == "sqrt_chunks":
    k = sqrt_chunks(num_steps)
    chunk = jax.checkpoint(partial(_scan_steps, jax.checkpoint(step)))

    def outer(carry, ts_chunk):
      return chunk(carry, ts_chunk), None

    carry, _ = lax.scan(outer, carry, ts.reshape(k, num_steps // k))
    return carry[0]
  raise ValueError(f"unknown float method {method!r}")


def revoptax_train(
  params, hparams, data, num_steps: int, gamma_floor: float, segment_steps: int | None = None
):
  return revoptax.train(
    train_loss,
    params,
    hparams,
    data,
    num_steps=num_steps,
    learning_rate=learning_rate,
    momentum=momentum,
    rule=revoptax.MomentumSGDRule(momentum_floor=gamma_floor),
    segment_steps=segment_steps,
  )


def meta_objective(
  method: str, params, data, validation, num_steps: int, gamma_floor: float
) -> Callable:
  """``hparams -> validation cross-entropy after num_steps`` for one method."""
  x_val, y_val = validation

  def objective(hparams):
    if method == "revoptax":
      final = revoptax_train(params, hparams, data, num_steps, gamma_floor)
    else:
      final = float_train(params, hparams, data, num_steps, method)
    return cross_entropy(final, x_val, y_val)

  return objective


def setup(model: str, num_steps: int, gamma: float):
  """``(params, hparams, data, validation)`` for one benchmark row."""
  batches, labels, x_val, y_val = load_digits()
  return init_mlp(MODELS[model]), init_hparams(num_steps, gamma), (batches, labels), (x_val, y_val)


# ----------------------------------------------------------------------------
# Buffer size, measured with revoptax.reversible_sgd.


def measure_buffer_bits(model: str, num_steps: int, gamma: float) -> dict:
  """Information kept by :func:`revoptax.reversible_sgd` over a training run.

  Runs ``num_steps`` updates with constant ``gamma`` on ``model`` in an Optax
  loop (``optax.apply_updates``) and returns ``buffer_bits``: the buffer's
  ``revoptax._buffer.used_bits`` averaged over leaves weighted by leaf size,
  per parameter per step; and ``param_log_entries``: elements the optimizer
  logged because ``params + updates`` could not reproduce the exact weight.
  """
  import optax

  from revoptax import _buffer

  params, hparams, (batches, labels), _ = setup(model, num_steps, gamma)
  alpha = LEARNING_RATE
  # 5x the default log capacity: the default overflows on this setup at T=100.
  largest = max(int(np.size(x)) for x in jax.tree.leaves(params))
  capacity = 256 + math.ceil(largest * num_steps / 200)
  tx = revoptax.reversible_sgd(alpha, gamma, max_steps=num_steps, param_log_capacity=capacity)
  state = tx.init(params)

  @jax.jit
  def run(params, state):
    def body(carry, t):
      params, state = carry
      b = t % batches.shape[0]
      grads = jax.grad(train_loss)(params, hparams, (batches[b], labels[b]))
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = lax.scan(body, (params, state), jnp.arange(num_steps))
    return state

  state = run(params, state)
  buffers, log_sizes = _buffers_and_log_sizes(state)
  sizes = np.array([buf.head_lo.size for buf in buffers], np.float64)
  bits = np.array([float(_buffer.used_bits(buf)) for buf in buffers])
  return {
    "buffer_bits": float(np.sum(bits * sizes) / np.sum(sizes) / num_steps),
    "param_log_entries": int(sum(log_sizes)),
  }


def _buffers_and_log_sizes(state):
  """Per-leaf ``BufferState`` and the param-log size of a ``ReversibleState``."""
  from revoptax._optax import _unpack

  return [leaf.buffer for leaf in _unpack(state)], [int(state.log.size)]


def ideal_buffer_bits(gamma: float) -> float:
  """``log2(1 / gamma_q)`` for the quantized momentum ``gamma_q``."""
  return float(-np.log2(np.float64(RULE.applied_momentum(gamma))))
