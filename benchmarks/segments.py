"""Horizons past memory: ``train(segment_steps=K)`` against pure reversal and √T chunks.

In one process, for the digits MLP (64-50-50-10) trained ``T`` steps by
momentum SGD at momentum 0.5 (1 bit of buffer per parameter per step, the
costliest momentum the default rule allows), the compiled hypergradient of
the validation loss with respect to per-step log learning rates and logit
momenta and the log L2 penalty, by

* ``reversal``: :func:`revoptax.train`, one segment (the buffer holds ``T`` steps);
* ``segments K``: ``revoptax.train(segment_steps=K)`` (``ceil(T / K)`` exact
  states plus ``K`` steps of buffer), for ``K`` near the memory optimum
  ``sqrt(T * 192 / bits_per_step)`` (an exact state is 6 words per parameter)
  and at ``sqrt(T)``;
* ``sqrt_chunks``: ``jax.grad`` through float training in ``√T`` checkpointed
  chunks of checkpointed steps (``benchmarks/common.py``).

Calls are interleaved round robin; the report gives the median time per
method, its ratio to pure reversal, the XLA temp memory of each compiled
hypergradient, whether it fits the stated memory budget, and the largest
difference of each hypergradient from pure reversal's (bitwise equality for
the segments).

Usage::

  python benchmarks/segments.py [--steps 20000] [--rounds 2] [--budget-mb 8]

Writes ``benchmarks/results/segments.json``; ``report.py`` puts it in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GAMMA = 0.5
STATE_BITS = 192  # w, v and the buffer head: 3 x 64 bits per parameter


def objective(method: str, segment_steps, num_steps: int):
  params, hparams, data, validation = common.setup("digits", num_steps, GAMMA)
  if method == "sqrt_chunks":
    f = common.meta_objective("sqrt_chunks", params, data, validation, num_steps, GAMMA)
  else:

    def f(hp):
      final = common.revoptax_train(params, hp, data, num_steps, GAMMA, segment_steps)
      return common.cross_entropy(final, *validation)

  return jax.jit(jax.grad(f)), hparams


def max_rel_diff(grads, reference) -> float:
  diffs = [
    float(jnp.max(jnp.abs(g - r)) / jnp.maximum(jnp.max(jnp.abs(r)), 1e-30))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference))
  ]
  return max(diffs)


def same_bits(grads, reference) -> bool:
  return all(
    np.array_equal(np.asarray(g).view(np.uint32), np.asarray(r).view(np.uint32))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference))
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20000)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--budget-mb", type=float, default=8.0)
  parser.add_argument("--out", type=Path, default=RESULTS / "segments.json")
  args = parser.parse_args(argv)
  num_steps = args.steps
  optimum = round(math.sqrt(num_steps * STATE_BITS / math.log2(1 / GAMMA)))
  methods = [
    ("reversal", None),
    (f"segments K = {optimum:,}", optimum),
    (f"segments K = {round(math.sqrt(num_steps)):,}", round(math.sqrt(num_steps))),
    ("sqrt_chunks", None),
  ]
  compiled, temp, compile_s = {}, {}, {}
  for name, k in methods:
    start = time.perf_counter()
    fn, hparams = objective("sqrt_chunks" if name == "sqrt_chunks" else "revoptax", k, num_steps)
    lowered = fn.lower(hparams).compile()
    compile_s[name] = time.perf_counter() - start
    temp[name] = lowered.memory_analysis().temp_size_in_bytes
    compiled[name] = lowered
    print(
      f"{name}: compiled in {compile_s[name]:.1f} s, temp {temp[name] / 1e6:.1f} MB", flush=True
    )
  times = {name: [] for name, _ in methods}
  grads = {}
  for r in range(args.rounds):
    for name, _ in methods:
      start = time.perf_counter()
      grads[name] = jax.block_until_ready(compiled[name](hparams))
      times[name].append(time.perf_counter() - start)
      print(f"round {r}: {name} {times[name][-1]:.1f} s", flush=True)
  reference = grads["reversal"]
  base = statistics.median(times["reversal"])
  rows = []
  for name, k in methods:
    median = statistics.median(times[name])
    rows.append(
      {
        "method": name,
        "segment_steps": k,
        "time_s": median,
        "ratio_vs_reversal": median / base,
        "compile_s": compile_s[name],
        "temp_bytes": temp[name],
        "fits_budget": temp[name] <= args.budget_mb * 1e6,
        "max_rel_diff_vs_reversal": max_rel_diff(grads[name], reference),
        "same_bits_as_reversal": same_bits(grads[name], reference),
      }
    )
  result = {
    "machine": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "jax": jax.__version__},
    "settings": {
      "T": num_steps,
      "gamma": GAMMA,
      "rounds": args.rounds,
      "budget_mb": args.budget_mb,
      "params": common.num_params(common.init_mlp(common.MODELS["digits"])),
    },
    "rows": rows,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=2))
  for row in rows:
    print(row)


if __name__ == "__main__":
  main()
