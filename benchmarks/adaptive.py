"""Adam(W) and RMSProp: hypergradient time and memory against the baselines, and step time.

In one process, calls interleaved round robin (as ``time_ratio.py``): for the
digits MLP (64-50-50-10) trained ``T`` steps by AdamW (``b1 = 0.9, b2 =
0.999``, weight decay 1e-2) and by RMSProp with momentum (``decay = 0.9,
momentum = 0.9``), the compiled hypergradient of the validation loss with
respect to a per-step log learning rate ``[T]`` (and the log weight decay) by

* revoptax: ``revoptax.train`` with ``AdamRule(decoupled_weight_decay=True)`` /
  ``RMSPropRule()`` (exact reversal);
* scan: ``jax.grad`` through the same float training as one ``lax.scan``;
* checkpoint: the same with ``jax.checkpoint`` on the step.

Each round gives revoptax's time over each baseline's; the report gives the
median ratio and the XLA temp memory of each compiled hypergradient.  Then the
Optax step time: ``reversible_adam`` against ``optax.adam`` (and RMSProp) in
``nnx.Optimizer``, interleaved.

Usage::

  python benchmarks/adaptive.py [--steps 1000] [--rounds 5]

Writes ``benchmarks/results/adaptive.json``; ``report.py`` puts it in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import revoptax

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
B1, B2, EPS, WD, DECAY, MOMENTUM, LR = 0.9, 0.999, 1e-8, 1e-2, 0.9, 0.9, 1e-3


def _applied(rate):
  """The rate the exact rules apply to a rate given as a Python float: ``1 - m / 2**32`` with
  ``m = round((1 - float32(rate)) 2**32)``, ``1 - float32(rate)`` in float32 (as
  ``revoptax._moments.rate_scale`` computes it in JAX's default 32-bit mode).  The baselines
  use it: RMSProp here moves its per-step hypergradients by 2% at T = 1,000 when ``decay``
  moves by 1.5e-8 (measured in float64), so baselines at other rates would compare two
  different training runs."""
  lam = np.float32(1) - np.float32(rate)
  return 1 - float(np.round(np.float64(lam) * 2.0**32)) / 2**32


def _loss(params, hparams, batch):
  return common.cross_entropy(params, *batch)


def _lr(hparams, t):
  return jnp.exp(hparams["log_lr"][t])


def _wd(hparams, t):
  return jnp.exp(hparams["log_wd"])


def _float_train(params, hparams, data, num_steps, checkpoint, update):
  """Float training as one ``lax.scan`` (``jax.checkpoint`` on the step if ``checkpoint``):
  ``(w, s1, s2) = update(w, s1, s2, g, t)`` per step, the two states starting at zero."""

  def step(carry, t):
    w = carry[0]
    b = t % data[0].shape[0]
    g = jax.grad(_loss)(w, hparams, (data[0][b], data[1][b]))
    return update(*carry, g, t), None

  step = jax.checkpoint(step) if checkpoint else step
  zeros = jax.tree.map(jnp.zeros_like, params)
  return jax.lax.scan(step, (params, zeros, zeros), jnp.arange(num_steps))[0][0]


def _float_adamw(params, hparams, data, num_steps, checkpoint):
  """AdamW in floats (the dynamics of ``AdamRule`` at its applied rates)."""
  b1, b2 = _applied(B1), _applied(B2)

  def update(w, m, v, g, t):
    lr, wd = _lr(hparams, t), _wd(hparams, t)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)

    def weights(w, m, v):
      root = jnp.sqrt(jnp.maximum(v / c2, 1e-30))
      return (1 - lr * wd) * w - lr * (m / c1) / (root + EPS)

    return jax.tree.map(weights, w, m, v), m, v

  return _float_train(params, hparams, data, num_steps, checkpoint, update)


def _float_rmsprop(params, hparams, data, num_steps, checkpoint):
  """RMSProp with momentum in floats (the dynamics of ``RMSPropRule`` at its applied rates)."""
  decay, momentum = _applied(DECAY), _applied(MOMENTUM)

  def update(w, v, mom, g, t):
    lr = _lr(hparams, t)
    v = jax.tree.map(lambda v, g: decay * v + (1 - decay) * g * g, v, g)
    mom = jax.tree.map(lambda mom, g, v: momentum * mom - lr * g / jnp.sqrt(v + EPS), mom, g, v)
    return jax.tree.map(lambda w, mom: w + mom, w, mom), v, mom

  return _float_train(params, hparams, data, num_steps, checkpoint, update)


def _revoptax(optimizer):
  def train(params, hparams, data, num_steps):
    if optimizer == "adamw":
      return revoptax.train(
        _loss,
        params,
        hparams,
        data,
        num_steps=num_steps,
        rule=revoptax.AdamRule(decoupled_weight_decay=True, decay_ceiling=0.01),
        learning_rate=_lr,
        b1=lambda hp, t: B1,
        b2=lambda hp, t: B2,
        weight_decay=_wd,
      )
    return revoptax.train(
      _loss,
      params,
      hparams,
      data,
      num_steps=num_steps,
      rule=revoptax.RMSPropRule(),
      learning_rate=_lr,
      decay=lambda hp, t: DECAY,
      momentum=lambda hp, t: MOMENTUM,
    )

  return train


def _objective(optimizer, method, params, data, validation, num_steps):
  floats = {"adamw": _float_adamw, "rmsprop": _float_rmsprop}[optimizer]

  def objective(hparams):
    if method == "revoptax":
      final = _revoptax(optimizer)(params, hparams, data, num_steps)
    else:
      final = floats(params, hparams, data, num_steps, method == "checkpoint")
    return common.cross_entropy(final, *validation)

  return objective


def hypergradients(num_steps: int, rounds: int) -> list[dict]:
  batches, labels, x_val, y_val = common.load_digits()
  params = common.init_mlp(common.MODELS["digits"])
  hparams = {
    "log_lr": jnp.full((num_steps,), np.log(LR), jnp.float32),
    "log_wd": jnp.asarray(np.log(WD), jnp.float32),
  }
  compiled, memory, grads = {}, {}, {}
  for optimizer in ("adamw", "rmsprop"):
    for method in ("revoptax", "scan", "checkpoint"):
      objective = _objective(
        optimizer, method, params, (batches, labels), (x_val, y_val), num_steps
      )
      lowered = jax.jit(jax.grad(objective)).lower(hparams).compile()
      key = (optimizer, method)
      compiled[key] = lowered
      memory[key] = lowered.memory_analysis().temp_size_in_bytes
      grads[key] = jax.block_until_ready(lowered(hparams))
  times = {key: [] for key in compiled}
  for _ in range(rounds):
    for key, fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(hparams))
      times[key].append(time.perf_counter() - start)
  rows = []
  for optimizer in ("adamw", "rmsprop"):
    ours = times[(optimizer, "revoptax")]
    reference = grads[(optimizer, "scan")]["log_lr"]
    diff = float(
      jnp.max(jnp.abs(grads[(optimizer, "revoptax")]["log_lr"] - reference))
      / jnp.max(jnp.abs(reference))
    )
    row = {
      "optimizer": optimizer,
      "T": num_steps,
      "revoptax_s": statistics.median(ours),
      "max_rel_diff_vs_scan": diff,
      "temp_bytes": {m: int(memory[(optimizer, m)]) for m in ("revoptax", "scan", "checkpoint")},
    }
    for baseline in ("scan", "checkpoint"):
      ratios = [a / b for a, b in zip(ours, times[(optimizer, baseline)])]
      row[f"ratio_vs_{baseline}"] = statistics.median(ratios)
      row[f"{baseline}_s"] = statistics.median(times[(optimizer, baseline)])
    rows.append(row)
  return rows


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1, self.l2, self.l3 = (
      nnx.Linear(64, 50, rngs=rngs),
      nnx.Linear(50, 50, rngs=rngs),
      nnx.Linear(50, 10, rngs=rngs),
    )

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def step_times(steps: int, rounds: int) -> list[dict]:
  """Median per-step time of each optimizer in ``nnx.Optimizer`` (donated state)."""
  batches, labels, _, _ = common.load_digits()
  pairs = {
    "adam": (
      lambda: revoptax.reversible_adam(LR, max_steps=steps * (rounds + 1)),
      lambda: optax.adam(LR),
    ),
    "rmsprop": (
      lambda: revoptax.reversible_rmsprop(LR, momentum=MOMENTUM, max_steps=steps * (rounds + 1)),
      lambda: optax.rmsprop(LR, momentum=MOMENTUM),
    ),
  }

  def loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  runners = {}
  for name, makers in pairs.items():
    for kind, make in zip(("revoptax", "optax"), makers):
      model = _MLP(nnx.Rngs(0))
      optimizer = nnx.Optimizer(model, make(), wrt=nnx.Param)

      @nnx.jit(donate_argnums=(0, 1))
      def train_step(model, optimizer, x, y):
        optimizer.update(model, nnx.grad(loss)(model, x, y))

      runners[(name, kind)] = (train_step, model, optimizer)
  times = {key: [] for key in runners}
  for r in range(rounds + 1):
    for key, (train_step, model, optimizer) in runners.items():
      start = time.perf_counter()
      for t in range(steps):
        train_step(model, optimizer, batches[t % 10], labels[t % 10])
      jax.block_until_ready(nnx.state(model))
      if r:  # the first round compiles
        times[key].append((time.perf_counter() - start) / steps)
  rows = []
  for name in pairs:
    ours, theirs = times[(name, "revoptax")], times[(name, "optax")]
    rows.append(
      {
        "optimizer": name,
        "revoptax_us": statistics.median(ours) * 1e6,
        "optax_us": statistics.median(theirs) * 1e6,
        "ratio": statistics.median([a / b for a, b in zip(ours, theirs)]),
      }
    )
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--optax-steps", type=int, default=200)
  args = parser.parse_args(argv)
  results = {
    "hypergradients": hypergradients(args.steps, args.rounds),
    "steps": step_times(args.optax_steps, args.rounds),
    "devices": [str(d) for d in jax.devices()],
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "adaptive.json").write_text(json.dumps(results, indent=1))
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
