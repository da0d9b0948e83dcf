"""Hypergradient time ratios measured in one process, the methods' calls interleaved.

``hypergradient.py`` runs every row in its own subprocess (so that peak RSS
belongs to one method) and normalizes each row by a forward pass timed in that
subprocess.  Subprocesses differ in speed on this virtual machine by tens of
percent, so the time targets are also measured here: the compiled
hypergradients of revoptax, ``jax.checkpoint`` per step and ``lax.scan`` (digits
MLP, T = 1,000, gamma = 0.9 by default) are called round robin in one process,
and each round gives one ratio per baseline (revoptax's time over the
baseline's in the same round).  The report gives the median of the per-round
ratios and their spread.

Two forward passes without gradients are timed in the same rounds: revoptax's
(``revoptax.train``: the float gradients and the exact steps) and plain float
training.  Subtracting them splits each hypergradient into a forward and a
backward part per step, which shows where revoptax's time differs from the
baselines' (both do the same float work: one gradient per step forward, one
gradient and one Hessian-vector product per step backward).

Usage::

  python benchmarks/time_ratio.py [--rounds 15] [--cpus 1]

Writes ``benchmarks/results/time_ratio.json`` (``time_ratio_1cpu.json`` with
``--cpus 1``); ``report.py`` puts it in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
METHODS = ("revoptax", "checkpoint", "scan")
# Forward passes without gradients (training, then the loss): name -> method trained.
FORWARDS = {"revoptax_forward": "revoptax", "float_forward": "scan"}


def measure(model: str, num_steps: int, gamma: float, rounds: int) -> dict:
  """Per-method times and per-round ratios of revoptax to each baseline."""
  import common
  import jax

  params, hparams, data, validation = common.setup(model, num_steps, gamma)
  compiled = {}
  for method in METHODS + tuple(FORWARDS):
    trained = FORWARDS.get(method, method)
    objective = common.meta_objective(trained, params, data, validation, num_steps, gamma)
    function = objective if method in FORWARDS else jax.grad(objective)
    compiled[method] = jax.jit(function).lower(hparams).compile()
    jax.block_until_ready(compiled[method](hparams))  # warm-up
  times = {method: [] for method in compiled}
  for _ in range(rounds):
    for method in compiled:
      start = time.perf_counter()
      jax.block_until_ready(compiled[method](hparams))
      times[method].append(time.perf_counter() - start)
  result = {
    "model": model,
    "T": num_steps,
    "gamma": gamma,
    "rounds": rounds,
    "times_s": times,
    "median_s": {m: statistics.median(t) for m, t in times.items()},
  }
  for base in METHODS[1:]:
    ratios = sorted(r / b for r, b in zip(times["revoptax"], times[base]))
    result[f"ratio_{base}"] = statistics.median(ratios)
    result[f"ratio_{base}_quartiles"] = [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]
  result["per_step_us"] = split_per_step(times, num_steps)
  return result


def split_per_step(times: dict, num_steps: int) -> dict:
  """Medians (µs per training step) of each method's forward and backward parts.

  The backward part of a hypergradient is its time minus the forward pass
  timed in the same round: revoptax's own forward for revoptax, plain float
  training for the baselines (which also store their per-step state).
  """

  def per_step(values):
    return statistics.median(values) * 1e6 / num_steps

  forward = {"revoptax": times["revoptax_forward"]}
  forward.update({base: times["float_forward"] for base in METHODS[1:]})
  split = {}
  for method in METHODS:
    backward = [h - f for h, f in zip(times[method], forward[method])]
    split[method] = {
      "forward": per_step(forward[method]),
      "backward": per_step(backward),
      "total": per_step(times[method]),
    }
  return split


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="digits")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--gamma", type=float, default=0.9)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--cpus", type=int, help="pin the process to this many CPUs")
  parser.add_argument("--out", type=Path)
  args = parser.parse_args(argv)
  from hypergradient import machine_info, pin_to_cpus

  pin_to_cpus(args.cpus)  # before JAX's CPU client exists (it sizes its thread pool then)
  result = measure(args.model, args.steps, args.gamma, args.rounds)
  document = {"machine": machine_info(), "cpus": args.cpus, "result": result}
  name = f"time_ratio_{args.cpus}cpu.json" if args.cpus else "time_ratio.json"
  out = args.out or RESULTS / name
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(document, indent=1))
  for base in METHODS[1:]:
    low, high = result[f"ratio_{base}_quartiles"]
    print(
      f"revoptax / {base}: {result[f'ratio_{base}']:.2f} (quartiles {low:.2f}-{high:.2f})",
      file=sys.stderr,
    )
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
