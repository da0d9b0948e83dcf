"""Where the time of a revoptax hypergradient goes (digits MLP, gamma = 0.9).

Times, each jitted and the median of 5 runs after a warm-up run:

* the float forward loop, the revoptax forward pass alone (``revoptax.train``
  without gradients), and the full hypergradient with and without
  ``check_drift``, at ``T = --steps``;
* the exact-arithmetic pieces per step, on leaves shaped like the digits MLP's,
  scanned over ``T`` steps: the buffer's ``multiply`` (forward) and ``divide``
  (backward) for several buffer sizes (stack rows), and the float step.

Usage::

  python benchmarks/profile_revoptax.py [--steps 1000]

Writes ``benchmarks/results/profile.json`` (rendered by ``report.py``).
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
from jax import lax

import revoptax
from revoptax import _buffer

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "profile.json"
GAMMA = 0.9


REPEATS = 5


def _median_time(fn, *args, repeats: int = REPEATS) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def end_to_end(num_steps: int) -> dict:
  params, hparams, data, validation = common.setup("digits", num_steps, GAMMA)

  def objective(method):
    return common.meta_objective(method, params, data, validation, num_steps, GAMMA)

  def without_drift_check(hparams):
    final = revoptax.train(
      common.train_loss,
      params,
      hparams,
      data,
      num_steps=num_steps,
      learning_rate=common.learning_rate,
      momentum=common.momentum,
      rule=revoptax.MomentumSGDRule(momentum_floor=GAMMA),
      check_drift=False,
    )
    return common.cross_entropy(final, *validation)

  cases = {
    "float forward": jax.jit(objective("forward")),
    "revoptax forward only (revoptax.train, no gradient)": jax.jit(objective("revoptax")),
    "revoptax hypergradient": jax.jit(jax.grad(objective("revoptax"))),
    "revoptax hypergradient, check_drift=False": jax.jit(jax.grad(without_drift_check)),
    "`jax.grad` through `lax.scan`": jax.jit(jax.grad(objective("scan"))),
  }
  return {name: _median_time(fn, hparams) for name, fn in cases.items()}


def exact_pieces(num_steps: int, rows_list) -> dict:
  """Seconds per step of the buffer operations on digits-shaped leaves."""
  rule = common.RULE
  leaves = jax.tree.leaves(common.init_mlp(common.MODELS["digits"]))
  n = rule.quantize_momentum(GAMMA)
  k = rule.momentum_bits

  def scanned(fn):
    def loop(state):
      def body(state, t):
        return [fn(leaf, t) for leaf in state], None

      return lax.scan(body, state, jnp.arange(num_steps))[0]

    return jax.jit(loop)

  def multiply(leaf, t):
    v, buf, _ = _buffer.multiply(leaf.v, leaf.buffer, n, t, k)
    return leaf._replace(v=v, buffer=buf)

  def divide(leaf, t):
    v, buf = _buffer.divide(leaf.v, leaf.buffer, n, t, k, clear_popped=False)
    return leaf._replace(v=v, buffer=buf)

  def float_step(pair, t):
    hp = {"learning_rate": 1.0, "momentum": GAMMA}
    w, (v,) = rule.float_step(pair[0], (pair[1],), pair[0], hp)
    return w, v

  out = {}
  for rows in rows_list:
    state = [rule.init(p, rows)[0] for p in leaves]
    state = [s._replace(v=rule.fixed.from_float(p)[0]) for s, p in zip(state, leaves)]
    forward = scanned(multiply)
    out[f"buffer multiply (forward), {rows} stack rows"] = _median_time(forward, state) / num_steps
    filled = forward(state)  # a buffer holding T steps, for divide to pop
    out[f"buffer divide (backward), {rows} stack rows"] = (
      _median_time(scanned(divide), filled) / num_steps
    )
  pairs = [(p, jnp.zeros_like(p)) for p in leaves]
  out["float step (reference)"] = _median_time(scanned(float_step), pairs) / num_steps
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--rows", default="8,51,481", help="buffer stack rows to time")
  parser.add_argument("--out", type=Path, default=OUT)
  args = parser.parse_args(argv)
  rows = [int(r) for r in args.rows.split(",")]
  from hypergradient import machine_info

  result = {
    "machine": machine_info(),
    "steps": args.steps,
    "repeats": REPEATS,
    "gamma": GAMMA,
    "end_to_end_s": end_to_end(args.steps),
    "per_step_s": exact_pieces(args.steps, rows),
  }
  for section in ("end_to_end_s", "per_step_s"):
    for name, value in result[section].items():
      print(f"{name:60s} {value * 1e3:10.3f} ms", file=sys.stderr)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
