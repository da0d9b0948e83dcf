"""Training-step overhead of revoptax.reversible_sgd against optax.sgd.

The same digits MLP (64-50-50-10, tanh) and minibatches of 100, trained with

* ``revoptax.reversible_sgd(alpha, gamma)`` (exact, reversible), or
* ``optax.sgd(alpha * (1 - gamma), momentum=gamma)`` (the same update in floats),

in four loops:

* ``nnx``: a ``flax.nnx`` model, ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
  and an ``@nnx.jit`` train step, called once per step;
* ``nnx_state``: the same model and ``@nnx.jit`` step, with the Optax state
  passed in and out as a plain pytree instead of living in ``nnx.Optimizer``;
* ``jit``: a pure Optax step ``jax.jit(step)(params, opt_state, batch)``, called
  once per step (separates the nnx overhead);
* ``scan``: ``lax.scan`` over all timed steps inside one ``jax.jit`` call (the
  per-step compute alone, no dispatch).

``reversible_sgd`` is timed with its default ``on_error="raise"`` (a host
callback under ``lax.cond``, run only when a check fails; a program holding
one runs synchronously on XLA:CPU) and with ``on_error="nan"`` (failures
recorded in the state, no callback).

An optimizer that raises in a loop is recorded with its error message.
The three optimizers of a loop are timed interleaved, call by call (round
robin), so that the machine's slow phases hit all of them alike: per-call
loops report the median over ``--steps`` steps after ``--warmup`` steps; the
scan loop the median of 5 interleaved calls divided by the number of steps.

Usage::

  python benchmarks/step_overhead.py [--steps 500] [--warmup 50] [--cpus 1]

Writes ``benchmarks/results/step_overhead.json`` (with ``--cpus 1``, the
process pinned to one CPU: ``step_overhead_1cpu.json``) and regenerates
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

import revoptax

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "step_overhead.json"
GAMMA = 0.9
ALPHA = common.LEARNING_RATE


TX_NAMES = ("optax_sgd", "reversible_sgd", "reversible_sgd_nan")


def make_tx(name: str, max_steps: int):
  if name == "reversible_sgd":
    return revoptax.reversible_sgd(ALPHA, GAMMA, max_steps=max_steps)
  if name == "reversible_sgd_nan":  # checks recorded in the state: no host callback
    return revoptax.reversible_sgd(ALPHA, GAMMA, max_steps=max_steps, on_error="nan")
  return optax.sgd(ALPHA * (1.0 - GAMMA), momentum=GAMMA)


class MLP(nnx.Module):
  def __init__(self, sizes, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def _nnx_loss(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _interleaved_times(calls: dict, num_warmup: int, num_steps: int, batches, labels) -> dict:
  """Per-call seconds of each ``call(x, y)``, round-robin so machine noise hits all alike."""
  times = {name: [] for name in calls}
  for t in range(num_warmup + num_steps):
    b = t % batches.shape[0]
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call(batches[b], labels[b]))
      if t >= num_warmup:
        times[name].append(time.perf_counter() - start)
  return times


def make_nnx(tx_name: str, args):
  """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and an ``@nnx.jit`` step."""
  model = MLP(common.MODELS["digits"], rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(tx_name, args.warmup + args.steps + 1), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  return lambda x, y: train_step(model, optimizer, x, y)


def make_nnx_state(tx_name: str, args):
  """An nnx model and ``@nnx.jit`` step, the Optax state kept outside nnx."""
  model = MLP(common.MODELS["digits"], rngs=nnx.Rngs(0))
  tx = make_tx(tx_name, args.warmup + args.steps + 1)
  opt_state = [tx.init(nnx.as_pure(nnx.state(model, nnx.Param)))]

  @nnx.jit
  def train_step(model, opt_state, x, y):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return loss, opt_state

  def call(x, y):
    loss, opt_state[0] = train_step(model, opt_state[0], x, y)
    return loss

  return call


def _loss(params, batch):
  x, y = batch
  return common.cross_entropy(params, x, y)


def _optax_step(tx, params, opt_state, batch):
  grads = jax.grad(_loss)(params, batch)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def make_jit(tx_name: str, args):
  """A pure Optax step ``jax.jit(step, donate_argnums=(0, 1))``, called once per step."""
  tx = make_tx(tx_name, args.warmup + args.steps + 1)
  params = common.init_mlp(common.MODELS["digits"])
  state = [params, tx.init(params)]
  step = jax.jit(lambda p, s, batch: _optax_step(tx, p, s, batch), donate_argnums=(0, 1))

  def call(x, y):
    state[0], state[1] = step(state[0], state[1], (x, y))
    return state[0]

  return call


def make_scan(tx_name: str, args, batches, labels):
  """``args.steps`` steps scanned inside one jit call (call it with no arguments)."""
  tx = make_tx(tx_name, args.steps)
  params = common.init_mlp(common.MODELS["digits"])

  @jax.jit
  def train(params):
    def body(carry, t):
      params, opt_state = carry
      b = t % batches.shape[0]
      return _optax_step(tx, params, opt_state, (batches[b], labels[b])), None

    (params, _), _ = lax.scan(body, (params, tx.init(params)), jnp.arange(args.steps))
    return params

  jax.block_until_ready(train(params))
  return lambda: train(params)


PER_CALL_LOOPS = {"nnx": make_nnx, "nnx_state": make_nnx_state, "jit": make_jit}
SCAN_REPEATS = 5


def _measure(loop: str, args, batches, labels) -> dict:
  """``{tx_name: seconds per step (list) or an exception}`` for one loop, interleaved."""
  calls, failed = {}, {}
  for tx_name in TX_NAMES:
    try:
      if loop == "scan":
        calls[tx_name] = make_scan(tx_name, args, batches, labels)
      else:
        calls[tx_name] = PER_CALL_LOOPS[loop](tx_name, args)
        jax.block_until_ready(calls[tx_name](batches[0], labels[0]))  # compile; raise here
    except Exception as e:  # a failing optimizer is a result, not a crash
      failed[tx_name] = e
  if loop == "scan":
    times = {name: [] for name in calls}
    for _ in range(SCAN_REPEATS):
      for name, call in calls.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        times[name].append((time.perf_counter() - start) / args.steps)
  else:
    times = _interleaved_times(calls, args.warmup, args.steps, batches, labels)
  return {**times, **failed}


LOOPS = ("nnx", "nnx_state", "jit", "scan")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=500, help="timed steps per loop")
  parser.add_argument("--warmup", type=int, default=50, help="untimed steps first")
  parser.add_argument("--out", type=Path, help="output JSON (default: results/step_overhead.json)")
  parser.add_argument(
    "--cpus",
    type=int,
    help="pin the process to this many CPUs (default output: results/step_overhead_1cpu.json)",
  )
  parser.add_argument("--no-report", action="store_true", help="do not regenerate the docs")
  args = parser.parse_args(argv)
  if args.cpus:  # before JAX's CPU client exists (it sizes its thread pool then)
    from hypergradient import pin_to_cpus

    pin_to_cpus(args.cpus)
  default_out = OUT.with_name(f"step_overhead_{args.cpus}cpu.json") if args.cpus else OUT
  args.out = args.out or default_out

  batches, labels, _, _ = common.load_digits()
  results = {}
  for loop in LOOPS:
    results[loop] = {}
    measured = _measure(loop, args, batches, labels)
    for tx_name in TX_NAMES:
      times = measured[tx_name]
      if isinstance(times, Exception):
        message = f"{type(times).__name__}: {times}".splitlines()[0][:500]
        results[loop][tx_name] = {"error": message}
        print(f"{loop:9s} {tx_name:15s} FAILED {message}", file=sys.stderr)
        continue
      median = statistics.median(times)
      results[loop][tx_name] = {"median_s": median, "num_samples": len(times)}
      print(f"{loop:9s} {tx_name:15s} {median * 1e6:9.1f} us/step", file=sys.stderr)
    for name, key in (("reversible_sgd", "ratio"), ("reversible_sgd_nan", "ratio_nan")):
      if all("median_s" in results[loop][n] for n in ("optax_sgd", name)):
        ratio = results[loop][name]["median_s"] / results[loop]["optax_sgd"]["median_s"]
        results[loop][key] = ratio
        print(f"{loop:9s} {key} {ratio:.2f}", file=sys.stderr)

  from hypergradient import machine_info

  document = {
    "machine": machine_info(),
    "settings": {
      "steps": args.steps,
      "warmup": args.warmup,
      "alpha": ALPHA,
      "gamma": GAMMA,
      "cpus": args.cpus,
    },
    "loops": results,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(document, indent=1))
  print(f"wrote {args.out}", file=sys.stderr)
  if args.out == default_out and not args.no_report:
    import report

    report.main([])


if __name__ == "__main__":
  main()
