"""Learned weight sharing across tasks: how strongly should tasks' weights be tied?

    python examples/weight_sharing.py [--steps 200] [--meta-steps 100] [--out DIR] [--quick]

The experiment of Maclaurin, Duvenaud & Adams (ICML 2015, Figs. 8-9) on digits:
three tasks, the digits as they are, rotated by 90 degrees and mirrored left
to right, each with only 50 training examples.  Each task has its own 64-20-10
tanh MLP; the training loss adds, per layer, a penalty
``tie[l, k, m] * |W_k - W_m|^2`` for every pair of tasks and
``exp(l2[l]) * |W_k|^2`` for each: a learned cross-task sharing matrix per
layer.  Tie strengths are ``3 sigmoid(.)``, at most 3, so that training stays
stable at the learning rate used.  Adam tunes the penalties on the hypergradient of the tasks' mean
validation loss through training (``revoptax.train``).  Compared on the
hypervalidation split with training the tasks separately (no ties) and tied
(very strong ties).  Writes ``sharing.png`` and ``results.json`` to
``--out`` (default ``runs/weight_sharing/``).
"""

from __future__ import annotations

import time
from itertools import combinations
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import revoptax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = ("as is", "rotated 90°", "mirrored")
PAIRS = tuple(combinations(range(len(TASKS)), 2))
HIDDEN, NUM_TRAIN, NUM_VAL = 20, 50, 100
TIE_MAX = 3.0  # tie strengths above this make training unstable at learning rate 1, momentum 0.9


def tie_strength(logit):
  return TIE_MAX * jax.nn.sigmoid(logit)


def transform(x, task):
  images = x.reshape(-1, 8, 8)
  images = (images, jnp.rot90(images, axes=(1, 2)), images[:, :, ::-1])[task]
  return images.reshape(-1, 64)


def task_data(split, task, n=None):
  x, y = split
  return transform(x[:n], task), y[:n]


def init_params():
  keys = jax.random.split(jax.random.key(0), 2)
  k = len(TASKS)
  return {
    "layer0": {"w": jax.random.normal(keys[0], (k, 64, HIDDEN)) / 8, "b": jnp.zeros((k, HIDDEN))},
    "layer1": {
      "w": jax.random.normal(keys[1], (k, HIDDEN, 10)) / np.sqrt(HIDDEN),
      "b": jnp.zeros((k, 10)),
    },
  }


def logits(params, x, task):
  h = jnp.tanh(x @ params["layer0"]["w"][task] + params["layer0"]["b"][task])
  return h @ params["layer1"]["w"][task] + params["layer1"]["b"][task]


def penalty(params, hp):
  total = 0.0
  for layer, name in enumerate(("layer0", "layer1")):
    w = params[name]["w"]
    total += jnp.exp(hp["log_l2"][layer]) * jnp.sum(w**2)
    for pair, (k, m) in enumerate(PAIRS):
      total += tie_strength(hp["tie_logit"][layer, pair]) * jnp.sum((w[k] - w[m]) ** 2)
  return total


def main(argv=None):
  p = _common.parser(__doc__, "runs/weight_sharing", steps=200, meta_steps=100)
  p.add_argument("--meta-lr", type=float, default=0.1)
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps = 100, 30
  out = Path(args.out)
  train_split, val_split, hyper_split = _common.split_digits(args.seed)
  train = [task_data(train_split, k, NUM_TRAIN) for k in range(len(TASKS))]
  val = [task_data(val_split, k, NUM_VAL) for k in range(len(TASKS))]
  hyper = [task_data(hyper_split, k) for k in range(len(TASKS))]
  batches = (jnp.stack([x for x, _ in train])[None], jnp.stack([y for _, y in train])[None])

  def train_loss(params, hp, batch):
    xs, ys = batch
    fits = [_common.cross_entropy(logits(params, xs[k], k), ys[k]) for k in range(len(TASKS))]
    return sum(fits) + penalty(params, hp)

  def trained(hp):
    return revoptax.train(
      train_loss,
      init_params(),
      hp,
      batches,
      num_steps=args.steps,
      learning_rate=lambda hp, t: 1.0,
      momentum=lambda hp, t: 0.9,
    )

  def mean_loss(params, data):
    return jnp.mean(
      jnp.stack([_common.cross_entropy(logits(params, x, k), y) for k, (x, y) in enumerate(data)])
    )

  def mean_accuracy(params, data):
    return jnp.mean(
      jnp.stack([_common.accuracy(logits(params, x, k), y) for k, (x, y) in enumerate(data)])
    )

  meta_step = _common.meta_stepper(lambda hp: mean_loss(trained(hp), val), optax.adam(args.meta_lr))
  hp0 = {"tie_logit": jnp.full((2, len(PAIRS)), -4.0), "log_l2": jnp.full((2,), -6.0)}
  hp, opt_state = hp0, optax.adam(args.meta_lr).init(hp0)
  history, start = [], time.time()
  for _ in range(args.meta_steps):
    hp, opt_state, loss = meta_step(hp, opt_state)
    history.append(float(loss))
  meta_seconds = time.time() - start

  settings = {
    "separate": {"tie_logit": jnp.full((2, len(PAIRS)), -30.0), "log_l2": hp0["log_l2"]},
    "tied": {"tie_logit": jnp.full((2, len(PAIRS)), 30.0), "log_l2": hp0["log_l2"]},
    "initial": hp0,
    "learned": hp,
  }
  train_once = jax.jit(trained)
  table = {}
  for name, setting in settings.items():
    params = train_once(setting)
    table[name] = {
      "val_loss": float(mean_loss(params, val)),
      "hypervalidation_loss": float(mean_loss(params, hyper)),
      "hypervalidation_accuracy": float(mean_accuracy(params, hyper)),
    }

  out.mkdir(parents=True, exist_ok=True)
  strengths = np.log10(np.asarray(tie_strength(hp["tie_logit"])))
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
  for layer, ax in enumerate(axes):
    matrix = np.full((len(TASKS), len(TASKS)), np.nan)
    for pair, (k, m) in enumerate(PAIRS):
      matrix[k, m] = matrix[m, k] = strengths[layer, pair]
    image = ax.imshow(matrix, cmap="magma", vmin=strengths.min(), vmax=strengths.max())
    for pair, (k, m) in enumerate(PAIRS):
      for a, b in ((k, m), (m, k)):
        ax.text(b, a, f"{strengths[layer, pair]:.1f}", ha="center", va="center", color="cyan")
    ax.set_xticks(range(len(TASKS)), TASKS, rotation=20)
    ax.set_yticks(range(len(TASKS)), TASKS if layer == 0 else [""] * len(TASKS))
    ax.set_title(("input → hidden", "hidden → output")[layer])
  fig.colorbar(image, ax=axes, label="log10 tie strength")
  fig.suptitle("Learned cross-task sharing, per layer")
  fig.savefig(out / "sharing.png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  _common.plot_meta_curve(history, out / "meta_curve.png")
  _common.write_results(
    out,
    {
      "config": vars(args),
      "tasks": list(TASKS),
      "pairs": [list(pair) for pair in PAIRS],
      "history": {"meta_loss": history},
      "hyperparameters": {k: np.asarray(v).tolist() for k, v in hp.items()},
      "tie_strength": np.asarray(tie_strength(hp["tie_logit"])).tolist(),
      "table": table,
      "final": table["learned"],
      "initial": table["initial"],
      "seconds": {"meta_learning": meta_seconds},
    },
  )
  for name, row in table.items():
    print(
      f"{name:>9}: validation {row['val_loss']:.4f}, hypervalidation "
      f"{row['hypervalidation_loss']:.4f} (accuracy {row['hypervalidation_accuracy']:.3f})"
    )
  print(f"learned log10 tie strengths per layer (pairs {PAIRS}): {np.round(strengths, 2).tolist()}")
  print(f"wrote {out}/")


if __name__ == "__main__":
  main()
