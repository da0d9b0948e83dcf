"""Hyperparameters shared across datasets: learn on several, test on a held-out one.

    python examples/shared_hyperparameters.py [--steps 200] [--meta-steps 120] [--out DIR] [--quick]

One initialization scale per layer and one learning-rate schedule per layer
(10 knots) of a 64-30-10 tanh MLP are meta-learned on several related
datasets at once (the digits as they are, rotated by 90 and 180 degrees: each
meta-iteration trains on all three and follows the hypergradient of their
mean validation loss, ``jax.vmap`` over the datasets through
``revoptax.train``), and separately on the first dataset alone.  Both are
evaluated on a held-out dataset no meta-iteration saw (the digits mirrored
left to right) against the initial hyperparameters.  Writes
``transfer.png`` and ``results.json`` to ``--out`` (default
``runs/shared_hyperparameters/``).
"""

from __future__ import annotations

import time
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

SIZES = (64, 30, 10)
KNOTS = 10
TRANSFORMS = {
  "as is": lambda im: im,
  "rotated 90°": lambda im: jnp.rot90(im, 1, axes=(1, 2)),
  "rotated 180°": lambda im: jnp.rot90(im, 2, axes=(1, 2)),
  "mirrored": lambda im: im[:, :, ::-1],
}
LEARN_ON, HELD_OUT = ("as is", "rotated 90°", "rotated 180°"), "mirrored"


def transformed(split, name):
  x, y = split
  return TRANSFORMS[name](x.reshape(-1, 8, 8)).reshape(-1, 64), y


def logits(params, x):
  h = jnp.tanh(x @ params[0]["w"] + params[0]["b"])
  return h @ params[1]["w"] + params[1]["b"]


def main(argv=None):
  p = _common.parser(__doc__, "runs/shared_hyperparameters", steps=200, meta_steps=120)
  p.add_argument("--meta-lr", type=float, default=0.05)
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps = 100, 30
  out = Path(args.out)
  splits = _common.split_digits(args.seed)
  data = {name: [transformed(s, name) for s in splits] for name in TRANSFORMS}
  keys = jax.random.split(jax.random.key(args.seed), len(SIZES) - 1)
  base = [jax.random.normal(k, (a, b)) for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])]

  def init(hp):
    return [
      {"w": jnp.exp(hp["log_init_scale"][i]) * w, "b": jnp.zeros(w.shape[1])}
      for i, w in enumerate(base)
    ]

  def learning_rate(hp, t):
    position = t * (KNOTS - 1) / (args.steps - 1)
    lower = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, KNOTS - 2)
    frac = position - lower
    values = jnp.exp((1 - frac) * hp["log_lr"][lower] + frac * hp["log_lr"][lower + 1])
    return [values[i] for i in range(len(base))]

  def train_loss(params, hp, batch):
    return _common.cross_entropy(logits(params, batch[0]), batch[1])

  def val_loss(hp, train, val):
    x, y = train
    trained = revoptax.train(
      train_loss,
      init(hp),
      hp,
      (x.reshape(10, 100, 64), y.reshape(10, 100)),
      num_steps=args.steps,
      learning_rate=learning_rate,
      momentum=lambda hp, t: 0.9,
    )
    return _common.cross_entropy(logits(trained, val[0]), val[1]), trained

  def stacked(names, index):
    parts = [data[n][index] for n in names]
    return jnp.stack([x for x, _ in parts]), jnp.stack([y for _, y in parts])

  def meta_loss_over(names):
    train, val = stacked(names, 0), stacked(names, 1)

    def meta_loss(hp):
      losses, _ = jax.vmap(lambda t, v: val_loss(hp, t, v))(train, val)
      return jnp.mean(losses)

    return meta_loss

  hp0 = {"log_init_scale": jnp.full((2,), np.log(0.3)), "log_lr": jnp.zeros((KNOTS, 2))}
  learned, histories, start = {}, {}, time.time()
  for label, names in (("shared", LEARN_ON), ("single", LEARN_ON[:1])):
    meta_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.meta_lr))
    meta_step = _common.meta_stepper(meta_loss_over(names), meta_opt)
    hp, opt_state, history = hp0, meta_opt.init(hp0), []
    for _ in range(args.meta_steps):
      hp, opt_state, loss = meta_step(hp, opt_state)
      history.append(float(loss))
    learned[label], histories[label] = hp, history
  meta_seconds = time.time() - start

  settings = {
    "initial": hp0,
    "learned on one dataset": learned["single"],
    "learned on three datasets": learned["shared"],
  }
  # Every setting trained on each dataset, scored on that dataset's hypervalidation split.
  evaluate = {n: jax.jit(lambda hp, n=n: val_loss(hp, data[n][0], data[n][2])) for n in TRANSFORMS}
  table = {label: {} for label in settings}
  for label, hp in settings.items():
    for name in TRANSFORMS:
      loss, trained = evaluate[name](hp)
      accuracy = _common.accuracy(logits(trained, data[name][2][0]), data[name][2][1])
      table[label][name] = {"hypervalidation_loss": float(loss), "accuracy": float(accuracy)}

  out.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(7, 3.8))
  width = 0.27
  names = list(TRANSFORMS)
  for i, label in enumerate(settings):
    values = [table[label][n]["hypervalidation_loss"] for n in names]
    ax.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=label)
  ax.set_xticks(range(len(names)), [n + (" (held out)" if n == HELD_OUT else "") for n in names])
  ax.set_ylabel("hypervalidation loss")
  ax.set_title("Transfer of meta-learned init scales and schedules")
  ax.set_ylim(0, 1.4 * max(r[n]["hypervalidation_loss"] for r in table.values() for n in names))
  ax.legend(ncol=3, fontsize=8, loc="upper center")
  fig.tight_layout()
  fig.savefig(out / "transfer.png", dpi=120)
  plt.close(fig)
  _common.write_results(
    out,
    {
      "config": vars(args),
      "learned_on": list(LEARN_ON),
      "held_out": HELD_OUT,
      "history": {"meta_loss": histories["shared"], "meta_loss_single": histories["single"]},
      "hyperparameters": {
        label: {k: np.asarray(v).tolist() for k, v in hp.items()} for label, hp in learned.items()
      },
      "table": table,
      "initial": table["initial"][HELD_OUT],
      "final": table["learned on three datasets"][HELD_OUT],
      "seconds": {"meta_learning": meta_seconds},
    },
  )
  for label in settings:
    row = table[label][HELD_OUT]
    print(
      f"{label:>26}: held-out ({HELD_OUT}) hypervalidation loss "
      f"{row['hypervalidation_loss']:.4f}, accuracy {row['accuracy']:.3f}"
    )
  print(f"wrote {out}/")


if __name__ == "__main__":
  main()
