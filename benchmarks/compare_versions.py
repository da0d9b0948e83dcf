"""Before/after comparison of two revoptax versions in one process, interleaved.

Imports the current ``revoptax`` and an earlier copy of the package renamed
``revoptax_before`` (``--before DIR``: the folder holding it; make one with
``benchmarks/snapshot_version.sh REV DIR``), and measures on the digits MLP
(64-50-50-10, the benchmarks' setup):

* hypergradient time at ``T`` steps (default 1,000) of both versions and of
  ``jax.grad`` through ``lax.scan`` and through a ``jax.checkpoint``-ed scan,
  called round robin, with scalar per-step schedules (``log_lr[T]``,
  ``logit_momentum[T]``) and with per-element ones (one learning rate and
  one momentum per weight, constant in time: params-shaped hparams);
* XLA temp memory of each at T = 100, 1,000 and 10,000 (compile only);
* the ``reversible_sgd`` step against ``optax.sgd`` in ``nnx.Optimizer``.

Usage::

  python benchmarks/compare_versions.py --before /tmp/before [--steps 1000] [--repeats 5]

Prints a JSON report (and writes it with ``--out``).  The before version's
own API is used for it (``momentum_floor=`` in ``train``, no ``rule=``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import revoptax

GAMMA = 0.9


def per_element_hparams(params):
  """One learning rate and one momentum per weight (Meta-SGD style), plus the L2 scale."""
  return {
    "log_lr": jax.tree.map(lambda p: jnp.zeros_like(p), params),
    "logit_momentum": jax.tree.map(
      lambda p: jnp.full_like(p, jnp.log(GAMMA / (1 - GAMMA))), params
    ),
    "log_l2": jnp.asarray(jnp.log(common.L2_INIT), jnp.float32),
  }


SCHEDULES = {
  "scalar": (common.learning_rate, common.momentum),
  "per_element": (
    lambda hp, t: jax.tree.map(jnp.exp, hp["log_lr"]),
    lambda hp, t: jax.tree.map(jax.nn.sigmoid, hp["logit_momentum"]),
  ),
}


def float_step(schedule, data, hp, carry, t):
  lr, mom = SCHEDULES[schedule]
  batches, labels = data
  w, v = carry
  b = t % batches.shape[0]
  g = jax.grad(common.train_loss)(w, hp, (batches[b], labels[b]))

  def per_leaf(value):  # a scalar schedule value, or one per leaf already
    return value if isinstance(value, dict) else jax.tree.map(lambda _: value, w)

  alpha, gamma = per_leaf(lr(hp, t)), per_leaf(mom(hp, t))
  rule = common.RULE

  def one(w, v, g, a, m):
    new_w, (new_v,) = rule.float_step(
      w, (v,), g, {"learning_rate": a, "momentum": rule.applied_momentum(m)}
    )
    return new_w, new_v

  pairs = jax.tree.map(one, w, v, g, alpha, gamma)
  is_pair = lambda x: isinstance(x, tuple)
  return (
    jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
    jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair),
  ), None


def objective(method, schedule, params, data, validation, num_steps, before):
  lr, mom = SCHEDULES[schedule]

  # The two versions differ in how the momentum floor is given.
  versions = {
    "after": (revoptax, {"rule": revoptax.MomentumSGDRule(momentum_floor=0.5)}),
    "before": (before, {"momentum_floor": 0.5}),
  }

  def f(hp):
    if method in versions:
      lib, floor = versions[method]
      final = lib.train(
        common.train_loss,
        params,
        hp,
        data,
        num_steps=num_steps,
        learning_rate=lr,
        momentum=mom,
        **floor,
      )
    else:
      step = partial(float_step, schedule, data, hp)
      if method == "checkpoint":
        step = jax.checkpoint(step)
      carry = (params, jax.tree.map(jnp.zeros_like, params))
      final = jax.lax.scan(step, carry, jnp.arange(num_steps))[0][0]
    return common.cross_entropy(final, *validation)

  return f


METHODS = ("after", "before", "scan", "checkpoint")


def time_hypergradients(schedule, num_steps, repeats, before):
  params, hp, data, validation = common.setup("digits", num_steps, GAMMA)
  if schedule == "per_element":
    hp = per_element_hparams(params)
  fns = {
    m: jax.jit(jax.grad(objective(m, schedule, params, data, validation, num_steps, before)))
    for m in METHODS
  }
  grads = {m: jax.block_until_ready(f(hp)) for m, f in fns.items()}
  times = {m: [] for m in METHODS}
  for _ in range(repeats):
    for m, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(hp))
      times[m].append(time.perf_counter() - start)
  med = {m: statistics.median(v) for m, v in times.items()}

  def rel(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in zip(la, lb))

  return {
    "seconds": med,
    "after_vs_scan": med["after"] / med["scan"],
    "after_vs_checkpoint": med["after"] / med["checkpoint"],
    "before_vs_scan": med["before"] / med["scan"],
    "before_vs_checkpoint": med["before"] / med["checkpoint"],
    "after_vs_before": med["after"] / med["before"],
    "max_rel_diff_vs_scan": {m: rel(grads[m], grads["scan"]) for m in ("after", "before")},
  }


def temp_memory(schedule, num_steps, before):
  params, hp, data, validation = common.setup("digits", num_steps, GAMMA)
  if schedule == "per_element":
    hp = per_element_hparams(params)
  out = {}
  for m in METHODS:
    f = objective(m, schedule, params, data, validation, num_steps, before)
    compiled = jax.jit(jax.grad(f)).lower(hp).compile()
    out[m] = compiled.memory_analysis().temp_size_in_bytes
  return out


class MLP(nnx.Module):
  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def time_nnx_steps(num_steps, before):
  batches, labels, _, _ = common.load_digits()
  txs = {
    "optax_sgd": optax.sgd(common.LEARNING_RATE * (1 - GAMMA), momentum=GAMMA),
    "after": revoptax.reversible_sgd(common.LEARNING_RATE, GAMMA, max_steps=num_steps + 100),
    "before": before.reversible_sgd(common.LEARNING_RATE, GAMMA, max_steps=num_steps + 100),
  }

  def loss(model, x, y):
    logits = model(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  @nnx.jit
  def step(model, opt, x, y):
    grads = nnx.grad(loss)(model, x, y)
    opt.update(model, grads)

  runs = {}
  for name, tx in txs.items():
    model = MLP(common.MODELS["digits"], nnx.Rngs(0))
    runs[name] = (model, nnx.Optimizer(model, tx, wrt=nnx.Param))
  times = {name: [] for name in txs}
  for t in range(num_steps + 20):
    b = t % batches.shape[0]
    for name, (model, opt) in runs.items():
      start = time.perf_counter()
      step(model, opt, batches[b], labels[b])
      jax.block_until_ready(nnx.state(model))
      if t >= 20:
        times[name].append(time.perf_counter() - start)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {
    "seconds_per_step": med,
    "after_vs_optax": med["after"] / med["optax_sgd"],
    "before_vs_optax": med["before"] / med["optax_sgd"],
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--before", type=Path, required=True)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--memory-steps", default="100,1000,10000")
  parser.add_argument("--nnx-steps", type=int, default=500)
  parser.add_argument("--out", type=Path)
  args = parser.parse_args(argv)
  sys.path.insert(0, str(args.before))
  before = importlib.import_module("revoptax_before")
  report = {"steps": args.steps, "hypergradient": {}, "temp_bytes": {}}
  for schedule in SCHEDULES:
    report["hypergradient"][schedule] = time_hypergradients(
      schedule, args.steps, args.repeats, before
    )
    print(schedule, json.dumps(report["hypergradient"][schedule]), file=sys.stderr)
  for schedule in SCHEDULES:
    report["temp_bytes"][schedule] = {
      t: temp_memory(schedule, int(t), before) for t in args.memory_steps.split(",")
    }
    print(schedule, json.dumps(report["temp_bytes"][schedule]), file=sys.stderr)
  report["nnx_step"] = time_nnx_steps(args.nnx_steps, before)
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
