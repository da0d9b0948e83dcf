"""Mutation check: plant semantic bugs in a scratch copy, one at a time, and run the suite.

Every mutation must be caught by the default suite (``python -m pytest -q``).
For each one this script copies the repository's tracked files to a scratch
folder, applies the mutation (each replaced snippet must occur exactly once,
so a refactor that moves the code makes the script fail loudly rather than
test nothing), runs ``pytest -x`` there with the scratch ``revoptax`` first on
the path, and records the first failing test.  It prints a Markdown table
and exits non-zero if a mutation survived.

Usage::

    python tests/mutation_check.py                 # all mutations
    python tests/mutation_check.py capacity_floor  # some, by name
    python tests/mutation_check.py --list

Not collected by pytest (the file name does not start with ``test_``); it runs
the whole suite once per mutation (minutes each), so it is not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  what: str
  path: str
  edits: tuple[tuple[str, str], ...]  # (old, new), each old occurring exactly once


MUTATIONS = [
  Mutation(
    "data_hypergradient_nan",
    "the training-data hypergradient is returned as all NaN",
    "revoptax/_train.py",
    (
      (
        "[poison(x) for x in d_b] if need_b",
        "[jnp.full_like(x, jnp.nan) for x in d_b] if need_b",
      ),
    ),
  ),
  Mutation(
    "buffer_extra_bit",
    "the real step spends one extra buffer bit every 16 steps (still invertible)",
    "revoptax/_sgd.py",
    (
      (
        "      v, head = materialize((v, head))\n      buf, buffer_ok",
        "      v, head = materialize((v, head))\n"
        "      head = jnp.where(t % 16 == 0, head << 1, head)\n      buf, buffer_ok",
      ),
      (
        "      head, popped = buffer_lib.unspill(state.buffer, t)\n",
        "      head, popped = buffer_lib.unspill(state.buffer, t)\n"
        "      head = jnp.where(t % 16 == 0, head >> 1, head)\n",
      ),
    ),
  ),
  Mutation(
    "capacity_ignores_floor",
    "the capacity rule ignores momentum_floor (sizes traced momenta for 0.5)",
    "revoptax/_sgd.py",
    (
      (
        "return DEFAULT_MOMENTUM_FLOOR if self.momentum_floor is None else self.momentum_floor",
        "return DEFAULT_MOMENTUM_FLOOR",
      ),
    ),
  ),
  Mutation(
    "momentum_cotangent",
    "the (1 - gamma) g term drops out of the momentum cotangent of the float step",
    "revoptax/_sgd.py",
    (
      (
        "    v = gamma * v - (1 - gamma) * grad\n",
        "    v = gamma * v - (1 - jax.lax.stop_gradient(gamma)) * grad\n",
      ),
    ),
  ),
  Mutation(
    "spill_drops_row",
    "a spill drops a row (the second row spilled is never counted, so it is overwritten)",
    "revoptax/_buffer.py",
    (
      (
        "buf.size + spilled.astype(I32))",
        "buf.size + (spilled & (buf.size != 1)).astype(I32))",
      ),
    ),
  ),
  Mutation(
    "quantize_floor",
    "float to fixed point rounds down instead of to nearest",
    "revoptax/_fixed_point.py",
    (
      (
        "  up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))\n",
        "  up = dropped < 0\n",
      ),
    ),
  ),
  Mutation(
    "dequantize_drops_bit",
    "fixed point to float32 drops the lowest bit before converting (double rounding)",
    "revoptax/_fixed_point.py",
    (
      (
        "return k.astype(dtype) * np.asarray(scale, dtype)",
        "return (k >> 1).astype(dtype) * np.asarray(2 * scale, dtype)",
      ),
    ),
  ),
  Mutation(
    "range_off_by_one",
    "the fixed-point range check admits |x| = 2**int_bits",
    "revoptax/_fixed_point.py",
    (("return (k > -limit) & (k < limit)", "return (k > -limit) & (k <= limit)"),),
  ),
  Mutation(
    "schedule_index",
    "schedules are evaluated one step late (the same in both passes)",
    "revoptax/_hyper.py",
    (
      (
        "    return tuple(self.at_name(name, hparams, t) for name in self.names)",
        "    return tuple(self.at_name(n, hparams, jnp.maximum(t - 1, 0)) for n in self.names)",
      ),
    ),
  ),
  Mutation(
    "drift_check_blind",
    "the backward pass compares the recomputed gradient's fingerprint with itself",
    "revoptax/_train.py",
    (("fingerprint_all(g) != prints[t, 0]", "fingerprint_all(g) != fingerprint_all(g)"),),
  ),
  Mutation(
    "truncating_shift",
    "the buffer's split of v rounds toward zero for negative v (lax.div-style)",
    "revoptax/_buffer.py",
    (
      (
        "return (value >> k) * n.astype(I64) + s.astype(I64), head",
        "return jnp.where(value < 0, -((-value) >> k), value >> k) * n.astype(I64)"
        " + s.astype(I64), head",
      ),
    ),
  ),
  Mutation(
    "momentum_quantized_down",
    "momentum is quantized by floor instead of round",
    "revoptax/_buffer.py",
    (
      (
        "n = jnp.clip(jnp.round(g * 2.0**k), 2.0 ** (k - 8), 2.0**k - 1)",
        "n = jnp.clip(jnp.floor(g * 2.0**k), 2.0 ** (k - 8), 2.0**k - 1)",
      ),
    ),
  ),
  Mutation(
    "param_log_wrong_step",
    "the inverse restores the param-log entries of the wrong step",
    "revoptax/_param_log.py",
    (
      (
        "  hit = (log.entries[0] == leaf) & (log.entries[2] == step)\n",
        "  hit = (log.entries[0] == leaf) & (log.entries[2] == step + 1)\n",
      ),
    ),
  ),
  Mutation(
    "traced_momentum_unchecked",
    "train checks traced momenta only for finiteness",
    "revoptax/_sgd.py",
    (
      (
        '"momentum": ~jnp.all(jnp.isfinite(gamma) & (gamma > 0) & (gamma < 1)),',
        '"momentum": ~jnp.all(jnp.isfinite(gamma)),',
      ),
    ),
  ),
  Mutation(
    "optax_learning_rate_unchecked",
    "the rule does not check traced learning rates (train and the Optax update)",
    "revoptax/_sgd.py",
    (
      (
        '"learning_rate": ~jnp.all(jnp.isfinite(alpha) & (alpha > 0)),',
        '"learning_rate": jnp.zeros((), bool),',
      ),
    ),
  ),
  Mutation(
    "schedule_cotangent_dropped",
    "train's backward pass drops the VJP of the schedules (hparams reached only through the loss)",
    "revoptax/_train.py",
    (("      d_h = [x + y for x, y in zip(d_h, dh_schedule)]\n", "      d_h = list(d_h)\n"),),
  ),
  Mutation(
    "division_half_corrected",
    "the integer division corrects a low estimate but not a high one",
    "revoptax/_buffer.py",
    (
      (
        "  q = q - low.astype(q.dtype) + high.astype(q.dtype)\n",
        "  q = q + high.astype(q.dtype)\n",
      ),
    ),
  ),
  Mutation(
    "heads_not_checked",
    "train's backward pass does not compare the undone buffer heads",
    "revoptax/_train.py",
    (("_reverse.heads_print(states) != heads_before", "heads_before != heads_before"),),
  ),
]


# The default suite, with the files that catch most mutations soonest first
# (pytest -x stops at the first failure); files not named here follow.
FIRST = [
  "tests/test_fixed_point.py",
  "tests/test_buffer.py",
  "tests/test_checks.py",
  "tests/test_train.py",
  "tests/test_buffer_cost.py",
  "tests/test_sgd.py",
]


def suite_files(scratch: Path) -> list[str]:
  rest = sorted(str(p.relative_to(scratch)) for p in (scratch / "tests").glob("test_*.py"))
  return FIRST + [f for f in rest if f not in FIRST]


def tracked_files() -> list[str]:
  out = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  return [line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def scratch_copy(mutation: Mutation | None) -> Path:
  scratch = Path(tempfile.mkdtemp(prefix="revoptax-mutation-"))
  for rel in tracked_files():
    target = scratch / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / rel, target)
  if mutation is not None:
    path = scratch / mutation.path
    text = path.read_text()
    for old, new in mutation.edits:
      count = text.count(old)
      if count != 1:
        raise SystemExit(f"{mutation.name}: {old!r} occurs {count} times in {mutation.path}")
      text = text.replace(old, new)
    path.write_text(text)
  return scratch


def run_suite(scratch: Path, pytest_args: list[str]) -> tuple[int, str, float]:
  env = dict(os.environ, PYTHONPATH=str(scratch) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  where = subprocess.run(
    [sys.executable, "-c", "import revoptax; print(revoptax.__file__)"],
    cwd=scratch,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  if not where.startswith(str(scratch)):
    raise SystemExit(f"the scratch copy is not the revoptax imported ({where})")
  start = time.time()
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-x",
      "-q",
      "-p",
      "no:cacheprovider",
      *(pytest_args or suite_files(scratch)),
    ],
    cwd=scratch,
    env=env,
    capture_output=True,
    text=True,
  )
  return result.returncode, result.stdout + result.stderr, time.time() - start


def first_failure(output: str) -> str:
  match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
  return match.group(1) if match else "(none)"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
  parser.add_argument("--list", action="store_true", help="list the mutations and exit")
  parser.add_argument("--baseline", action="store_true", help="also run the unmutated suite")
  args, pytest_args = parser.parse_known_args()
  if args.list:
    for m in MUTATIONS:
      print(f"{m.name}: {m.what} ({m.path})")
    return 0
  chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
  unknown = set(args.names) - {m.name for m in MUTATIONS}
  if unknown:
    raise SystemExit(f"unknown mutations: {sorted(unknown)}")
  for m in chosen:  # fail before any run if a snippet has moved
    shutil.rmtree(scratch_copy(m))
  rows, survived = [], []
  if args.baseline:
    scratch = scratch_copy(None)
    code, output, seconds = run_suite(scratch, pytest_args)
    shutil.rmtree(scratch)
    if code != 0:
      print(output[-3000:])
      raise SystemExit("the unmutated suite fails: fix it before checking mutations")
    print(f"baseline: suite passes ({seconds:.0f} s)", flush=True)
  for m in chosen:
    scratch = scratch_copy(m)
    code, output, seconds = run_suite(scratch, pytest_args)
    shutil.rmtree(scratch)
    caught = code != 0
    test = first_failure(output) if caught else "**not caught**"
    if not caught:
      survived.append(m.name)
    rows.append(f"| `{m.name}` | {m.what} | {test} | {seconds:.0f} s |")
    print(rows[-1], flush=True)
  print("\n| mutation | bug | first test that failed | suite time to it |")
  print("|---|---|---|---|")
  print("\n".join(rows))
  if survived:
    print(f"\nSURVIVED: {', '.join(survived)}")
    return 1
  print(f"\nall {len(rows)} mutations caught")
  return 0


if __name__ == "__main__":
  sys.exit(main())
