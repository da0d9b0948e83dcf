"""Optax's own generic optimizer tests, run on revoptax's reversible optimizers.

Loads ``optax/_src/alias_test.py`` and ``optax/contrib/_common_test.py`` from
the installed optax, replaces their lists of optimizers under test with the
reversible ones (each a factory of Optax's usual arguments, ``max_steps``
fixed so the buffer holds every test's updates), runs their generic tests and
prints a pass/fail table.  Not part of the default suite (it takes minutes);
the closing notes of the issues record its table.

Usage::

  python tests/optax_peer_suite.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import unittest
from pathlib import Path

import optax
from optax._src import alias

import revoptax

# The tests run at most 30,000 updates (contrib's test_optimizers).
MAX_STEPS = 30_100


def reversible_sgd(learning_rate, momentum):
  """revoptax.reversible_sgd with max_steps fixed (optax's tests pass only these arguments)."""
  return revoptax.reversible_sgd(learning_rate, momentum, max_steps=MAX_STEPS)


def reversible_adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8):
  return revoptax.reversible_adam(learning_rate, b1, b2, eps, max_steps=MAX_STEPS)


def reversible_adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4):
  return revoptax.reversible_adamw(
    learning_rate, b1, b2, eps, weight_decay=weight_decay, max_steps=MAX_STEPS
  )


def reversible_rmsprop(learning_rate, decay=0.9, eps=1e-8, momentum=0.9):
  return revoptax.reversible_rmsprop(
    learning_rate, decay, eps, momentum=momentum, max_steps=MAX_STEPS
  )


FACTORIES = (reversible_sgd, reversible_adam, reversible_adamw, reversible_rmsprop)


# (name, kwargs): alpha = lr / (1 - gamma) reproduces optax.sgd(lr, momentum=gamma) in the
# tests' targets (alias_test: sgd with 1e-3 and 0.9; contrib: 1e-1).
# The others with the arguments optax's own lists use for adam, adamw and rmsprop.
_KWARGS = {
  "reversible_sgd": {"learning_rate": 1e-2, "momentum": 0.9},
  "reversible_adam": {"learning_rate": 1e-1},
  "reversible_adamw": {"learning_rate": 1e-1},
  "reversible_rmsprop": {"learning_rate": 5e-3, "momentum": 0.9},
}
REVERSIBLE = {
  "alias": [{"opt_name": n, "opt_kwargs": k} for n, k in _KWARGS.items()],
  "contrib": [
    {"opt_name": n, "opt_kwargs": k, "wrapper_name": None, "wrapper_kwargs": None}
    for n, k in _KWARGS.items()
  ],
}

GENERIC = {
  "alias": (
    "test_optimization",
    "test_optimizers_accept_extra_args",
    "test_optimizers_can_be_wrapped_in_inject_hyperparams",
    "test_preserve_dtype",
    "test_state_shape_dtype_shard_stability",
    "test_gradient_accumulation",
  ),
  "contrib": (
    "test_optimizers_accept_extra_args",
    "test_optimizers",
    "test_optimizers_can_be_wrapped_in_inject_hyperparams",
    "test_preserve_dtype",
    "test_gradient_accumulation",
    "test_state_shape_dtype_shard_stability",
    "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such",
  ),
}


def _patched_source(kind: str) -> str:
  root = Path(optax.__file__).parent
  if kind == "alias":
    source = (root / "_src" / "alias_test.py").read_text()
    start = source.index("_OPTIMIZERS_UNDER_TEST = (")
    end = source.index("\n)\n", start) + 3
    return (
      source[:start] + f"_OPTIMIZERS_UNDER_TEST = tuple({REVERSIBLE['alias']!r})\n" + source[end:]
    )
  source = (root / "contrib" / "_common_test.py").read_text()
  marker = "_ALL_OPTIMIZERS_UNDER_TEST = tuple("
  override = (
    f"_MAIN_OPTIMIZERS_UNDER_TEST = {REVERSIBLE['contrib']!r}\n_OTHER_OPTIMIZERS_UNDER_TEST = []\n"
  )
  return source.replace(marker, override + marker, 1)


def _load(kind: str) -> types.ModuleType:
  module = types.ModuleType(f"revoptax_peer_{kind}_test")
  module.__file__ = f"<optax {kind} tests, reversible optimizers>"
  sys.modules[module.__name__] = module
  exec(compile(_patched_source(kind), module.__file__, "exec"), module.__dict__)
  return module


class _Collect(unittest.TextTestResult):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.rows = []

  def _row(self, test, status, detail=""):
    self.rows.append({"test": test.id().split(".", 1)[-1], "status": status, "detail": detail})

  def addSuccess(self, test):
    super().addSuccess(test)
    self._row(test, "pass")

  def addFailure(self, test, err):
    super().addFailure(test, err)
    self._row(test, "fail", _last_line(self._exc_info_to_string(err, test)))

  def addError(self, test, err):
    super().addError(test, err)
    self._row(test, "error", _last_line(self._exc_info_to_string(err, test)))

  def addSkip(self, test, reason):
    super().addSkip(test, reason)
    self._row(test, "skip", reason)

  def addSubTest(self, test, subtest, err):
    super().addSubTest(test, subtest, err)
    if err is not None:
      self._row(subtest, "fail", _last_line(self._exc_info_to_string(err, subtest)))


def _last_line(text: str) -> str:
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return re.sub(r"\s+", " ", lines[-1])[:240] if lines else ""


def run() -> list[dict]:
  for factory in FACTORIES:  # optax's tests look optimizers up by name
    setattr(alias, factory.__name__, factory)
  rows = []
  for kind, prefixes in GENERIC.items():
    module = _load(kind)
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for case in vars(module).values():  # the generic classes (not e.g. LBFGSTest)
      if isinstance(case, type) and case.__name__ in ("AliasTest", "ContribTest"):
        for name in loader.getTestCaseNames(case):
          if name.startswith(prefixes):
            suite.addTest(case(name))
    result = unittest.TextTestRunner(resultclass=_Collect, verbosity=0).run(suite)
    rows += [{"suite": kind, **row} for row in result.rows]
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path)
  args = parser.parse_args(argv)
  rows = run()
  print("\n| suite | test | result | detail |\n|---|---|---|---|")
  for row in rows:
    print(f"| {row['suite']} | `{row['test']}` | {row['status']} | {row['detail']} |")
  if args.out:
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
