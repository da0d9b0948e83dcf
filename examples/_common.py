"""What the examples share: the digits splits, the command line, and writing results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits


def split_digits(seed: int = 0):
  """Digits shuffled once: (train 1,000, validation 400, hypervalidation 397) as (x, y) pairs.

  ``x`` is ``float32[n, 64]`` in [0, 1], ``y`` is ``int32[n]``.  Validation is
  the meta-objective; hypervalidation is used by no meta-iteration.
  """
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x = jnp.asarray(x[order] / 16.0, jnp.float32)
  y = jnp.asarray(y[order], jnp.int32)
  return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])


def logits_linear(params, x):
  return x @ params["w"] + params["b"]


def cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def parser(doc: str, out: str, steps: int, meta_steps: int) -> argparse.ArgumentParser:
  """The options every meta-learning example takes."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--steps", type=int, default=steps, help="training steps T")
  p.add_argument("--meta-steps", type=int, default=meta_steps, help="meta-iterations")
  p.add_argument("--out", default=out, help="output folder")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
  return p


def write_results(out: Path, results: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1))
