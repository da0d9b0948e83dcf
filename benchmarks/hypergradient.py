"""Hypergradient benchmark: revoptax.train vs three float baselines.

Each row ``(model, T, gamma, method)`` runs in its own subprocess, so that the
peak resident memory (``ru_maxrss``) belongs to that row alone, and a row that
runs out of memory or time is reported instead of stopping the benchmark.  A
row measures:

* compile time of ``jax.jit(jax.grad(meta_objective))``;
* the median of >= 3 timed runs after compiling (more for short runs: at
  least 3 s in all, up to 25 runs), and its ratio to plain forward training
  (the float loop without gradients, timed in the same subprocess, calls
  interleaved with the method's; the median of the per-pair ratios);
* XLA temp memory, ``compiled.memory_analysis().temp_size_in_bytes``;
* peak RSS of the subprocess (recorded before any reference computation);
* for revoptax, the information buffer in bits per parameter per step,
  measured with :func:`revoptax.reversible_sgd` over the same ``T`` steps;
* the largest relative difference of the hypergradient from ``jax.grad``
  through ``lax.scan`` (method ``scan``), where that reference fits.

Usage::

  python benchmarks/hypergradient.py            # full defaults (~25 min, 2 cores)
  python benchmarks/hypergradient.py --quick    # T=100 only, to test the script
  python benchmarks/hypergradient.py --cpus 1 --steps 1000 --append  # pinned rows too
  python benchmarks/hypergradient.py --with-wide-10k --models wide --steps 10000 \
      --only revoptax,sqrt_chunks,scan --append  # 108,210 params at T = 10,000

Results go to ``benchmarks/results/hypergradient.json`` and
``docs/benchmarks.md`` is regenerated (``--quick`` writes
``hypergradient_quick.json`` and leaves the docs alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_OUT = RESULTS / "hypergradient.json"
QUICK_OUT = RESULTS / "hypergradient_quick.json"

METHODS = ("revoptax", "scan", "checkpoint", "sqrt_chunks")
ROW_KEYS = ("model", "T", "gamma", "method", "mode", "cpus")
# The scan reference is computed in-process only up to this params * T (digits
# T <= 1,000; wide T <= 100): beyond it the stored trajectory takes gigabytes.
REFERENCE_MAX_PARAM_STEPS = 11_000_000


def default_rows(quick: bool, with_100k: bool = False, with_wide_10k: bool = False) -> list[dict]:
  """The (model, T, gamma, method) rows of the default run."""
  rows = []

  def add(model, num_steps, gamma, methods=METHODS, mode="full", timeout=None):
    for method in methods:
      row = {"model": model, "T": num_steps, "gamma": gamma, "method": method, "mode": mode}
      rows.append(row | {"cpus": None, "timeout": timeout})

  if quick:
    add("digits", 100, 0.9)
    add("wide", 100, 0.9, methods=("revoptax", "checkpoint"))
    return rows
  for num_steps in (100, 1000, 10000):
    add("digits", num_steps, 0.9)
  for gamma in (0.5, 0.99):
    add("digits", 1000, gamma)
  for num_steps in (100, 1000):
    add("wide", num_steps, 0.9)
  if with_wide_10k:  # 108,210 params at T = 10,000 (about 10 minutes)
    add("wide", 10000, 0.9, timeout=1800)
  if with_100k:
    add("digits", 100000, 0.9, methods=("revoptax",), timeout=3600)
  else:  # compile only: XLA memory at T = 100,000 (timing it takes ~30 min)
    add("digits", 100000, 0.9, mode="memory")
  return rows


# ----------------------------------------------------------------------------
# Worker: one row, in its own process.


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _time_pairs(forward, method, arg, repeats: int, min_total_s: float = 3.0, max_runs: int = 25):
  """Interleaved wall times ``(forward_times, method_times)`` of the two functions.

  Calls alternate (forward, method, forward, method, ...), so that a change in
  the machine's load affects both alike; each method call is compared with
  the forward call just before it.  A first call under 2 s is a discarded
  warm-up.  At least ``repeats`` pairs, more while the method's calls total
  under ``min_total_s`` (at most ``max_runs``).
  """
  import jax

  def once(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn(arg))
    return time.perf_counter() - start

  first = (once(forward), once(method))
  pairs = [first] if first[1] >= 2.0 else []
  while len(pairs) < repeats or (sum(p[1] for p in pairs) < min_total_s and len(pairs) < max_runs):
    pairs.append((once(forward), once(method)))
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _source_hash() -> str:
  """A short hash of the revoptax sources, to tell which code a row measured."""
  import hashlib

  import revoptax

  digest = hashlib.sha256()
  for path in sorted(Path(revoptax.__file__).parent.glob("*.py")):
    digest.update(path.read_bytes())
  return digest.hexdigest()[:12]


def _max_rel_diff(grads, reference) -> float:
  """``max over leaves of |a - b|_inf / |b|_inf``."""
  import jax
  import numpy as np

  diffs = jax.tree.map(
    lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b))),
    grads,
    reference,
  )
  return max(jax.tree.leaves(diffs))


def pin_to_cpus(cpus: int | None) -> None:
  """Restrict this process to its first ``cpus`` CPUs (before JAX starts its threads)."""
  if cpus:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])


def run_row(
  model: str, num_steps: int, gamma: float, method: str, mode: str, cpus: int | None, args
) -> dict:
  import common
  import jax

  params, hparams, data, validation = common.setup(model, num_steps, gamma)
  result = {
    "model": model,
    "params": common.num_params(params),
    "T": num_steps,
    "gamma": gamma,
    "method": method,
    "mode": mode,
    "cpus": cpus,
    "revoptax_source": _source_hash(),
  }
  if method == "sqrt_chunks":
    result["chunks"] = common.sqrt_chunks(num_steps)

  def objective(name):
    return common.meta_objective(name, params, data, validation, num_steps, gamma)

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(objective(method))).lower(hparams).compile()
  result["compile_s"] = time.perf_counter() - start
  result["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
  if mode == "memory":
    result["status"] = "compiled"
    result["peak_rss_bytes"] = _peak_rss_bytes()
    return result
  if result["temp_bytes"] > args.mem_budget_gb * 2**30:
    result["status"] = "skipped"
    result["error"] = (
      f"XLA temp {result['temp_bytes'] / 2**30:.1f} GiB exceeds the "
      f"--mem-budget-gb {args.mem_budget_gb} GiB"
    )
    result["peak_rss_bytes"] = _peak_rss_bytes()
    return result

  forward = jax.jit(objective("forward")).lower(hparams).compile()
  grads = compiled(hparams)
  forward_times, times = _time_pairs(forward, compiled, hparams, args.repeats)
  result["runs_s"] = times
  result["forward_runs_s"] = forward_times
  result["run_s"] = statistics.median(times)
  result["forward_s"] = statistics.median(forward_times)
  result["ratio_to_forward"] = statistics.median(m / f for f, m in zip(forward_times, times))
  result["peak_rss_bytes"] = _peak_rss_bytes()
  result["status"] = "ok"
  del compiled

  if method == "revoptax" and num_steps <= args.max_bits_steps:
    result.update(common.measure_buffer_bits(model, num_steps, gamma))
    result["ideal_bits"] = common.ideal_buffer_bits(gamma)
  if method != "scan" and result["params"] * num_steps <= REFERENCE_MAX_PARAM_STEPS:
    reference = jax.jit(jax.grad(objective("scan")))(hparams)
    result["max_rel_diff_vs_scan"] = _max_rel_diff(grads, reference)
  return result


# ----------------------------------------------------------------------------
# Driver: every row in a subprocess with a time limit.


def _classify_failure(returncode: int, stderr: str) -> str:
  text = stderr.lower()
  if returncode in (-9, 137) or "resource_exhausted" in text or "memoryerror" in text:
    return "oom"
  if "out of memory" in text or "failed to allocate" in text:
    return "oom"
  return "error"


def _last_error_line(stderr: str) -> str:
  lines = [line for line in stderr.strip().splitlines() if line.strip()]
  for line in reversed(lines):
    if "Error" in line or "error" in line:
      return line.strip()[:500]
  return lines[-1].strip()[:500] if lines else ""


def run_in_subprocess(row: dict, args) -> dict:
  timeout = row.get("timeout") or args.timeout
  cmd = [
    sys.executable,
    str(Path(__file__).resolve()),
    "--worker",
    json.dumps({k: row[k] for k in ROW_KEYS}),
    "--repeats",
    str(args.repeats),
    "--mem-budget-gb",
    str(args.mem_budget_gb),
    "--max-bits-steps",
    str(args.max_bits_steps),
  ]
  base = {k: row[k] for k in ROW_KEYS}
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
  except subprocess.TimeoutExpired:
    return {**base, "status": "timeout", "error": f"no result within {timeout} s"}
  elapsed = time.perf_counter() - start
  if proc.returncode == 0:
    for line in reversed(proc.stdout.splitlines()):
      if line.startswith("RESULT "):
        return {**json.loads(line[len("RESULT ") :]), "wall_s": elapsed}
  status = _classify_failure(proc.returncode, proc.stderr)
  return {
    **base,
    "status": status,
    "returncode": proc.returncode,
    "error": _last_error_line(proc.stderr),
    "wall_s": elapsed,
  }


def machine_info() -> dict:
  import flax
  import jax
  import optax

  cpu = "unknown"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem_gib = None
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal"):
        mem_gib = round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "memory_gib": mem_gib,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": flax.__version__,
    "revoptax_source": _source_hash(),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="T=100 rows only (tests the script)")
  parser.add_argument("--out", type=Path, help="output JSON (default: results/hypergradient.json)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (>= 3)")
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds per row")
  parser.add_argument(
    "--mem-budget-gb",
    type=float,
    default=10.0,
    help="skip running rows whose XLA temp memory exceeds this (after compiling)",
  )
  parser.add_argument(
    "--max-bits-steps",
    type=int,
    default=100000,
    help="measure the buffer with reversible_sgd only up to this many steps",
  )
  parser.add_argument(
    "--with-100k",
    action="store_true",
    help="time revoptax at T=100,000 (~30 min) instead of compiling all methods there",
  )
  parser.add_argument(
    "--with-wide-10k",
    action="store_true",
    help="also the 108,210-param MLP at T=10,000 (about 10 minutes with --only revoptax,...)",
  )
  parser.add_argument("--only", help="comma-separated methods to run (default: all)")
  parser.add_argument("--steps", help="comma-separated T values to run (default: all)")
  parser.add_argument("--models", help="comma-separated models to run (default: all)")
  parser.add_argument("--gammas", help="comma-separated momenta to run (default: all)")
  parser.add_argument(
    "--cpus",
    type=int,
    help="pin each row's process to this many CPUs (rows are kept apart from the default ones)",
  )
  parser.add_argument(
    "--append",
    action="store_true",
    help="keep the rows already in the output file that this run does not redo",
  )
  parser.add_argument("--no-report", action="store_true", help="do not regenerate the docs")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.repeats < 3:
    parser.error("--repeats must be at least 3")

  if args.worker:
    row = json.loads(args.worker)
    pin_to_cpus(row.get("cpus"))
    result = run_row(*(row[k] for k in ROW_KEYS), args)
    print("RESULT " + json.dumps(result), flush=True)
    return

  rows = [
    r | {"cpus": args.cpus} for r in default_rows(args.quick, args.with_100k, args.with_wide_10k)
  ]
  for flag, key, parse in (
    ("only", "method", str),
    ("steps", "T", int),
    ("models", "model", str),
    ("gammas", "gamma", float),
  ):
    if getattr(args, flag):
      keep = {parse(v) for v in getattr(args, flag).split(",")}
      rows = [r for r in rows if r[key] in keep]
  out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
  out.parent.mkdir(parents=True, exist_ok=True)
  document = {"machine": machine_info(), "settings": vars(args) | {"out": str(out)}, "rows": []}
  if args.append and out.exists():
    redo = {tuple(r[k] for k in ROW_KEYS) for r in rows}
    previous = json.loads(out.read_text())["rows"]
    document["rows"] = [r for r in previous if tuple(r.get(k) for k in ROW_KEYS) not in redo]
  start = time.perf_counter()
  for i, row in enumerate(rows):
    label = f"{row['model']} T={row['T']} gamma={row['gamma']} {row['method']}"
    label += f" (pinned to {row['cpus']} CPU)" if row["cpus"] else ""
    print(f"[{i + 1}/{len(rows)}] {label} ...", file=sys.stderr, flush=True)
    result = run_in_subprocess(row, args)
    document["rows"].append(result)
    out.write_text(
      json.dumps(document, indent=1, default=str)
    )  # after each row: partial results survive
    summary = result["status"]
    if result["status"] == "compiled":
      summary += f": temp {result['temp_bytes'] / 1e6:.3g} MB"
    elif result["status"] == "ok":
      summary += f": {result['run_s']:.3g} s = {result['ratio_to_forward']:.2f}x forward"
      summary += f", temp {result['temp_bytes'] / 1e6:.3g} MB"
    else:
      summary += f": {result.get('error', '')}"
    print(f"    {summary}", file=sys.stderr, flush=True)
  document["total_s"] = time.perf_counter() - start
  out.write_text(json.dumps(document, indent=1, default=str))
  print(f"wrote {out} ({document['total_s']:.0f} s)", file=sys.stderr)
  if out == DEFAULT_OUT and not args.no_report:
    import report

    report.main([])


if __name__ == "__main__":
  main()
