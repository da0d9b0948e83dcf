"""Learn the training data: 10 synthetic digits that train a good classifier.

    python examples/distill.py [--steps 100] [--meta-steps 200] [--out DIR] [--seed 0] [--quick]

The experiment of Maclaurin, Duvenaud & Adams (ICML 2015, Fig. 7): ten 8 x 8
images, one per class, are the whole training set of a logistic-regression
classifier trained for ``--steps`` steps of momentum SGD; Adam on the images'
pixels follows the hypergradient of the loss on real validation digits through
the training run (``revoptax.train`` differentiates with respect to its
batches).  Compared at the end with training on ten random real digits (one
per class), on the hypervalidation split.  Writes ``images.png``,
``meta_curve.png`` and ``results.json`` to ``--out`` (default
``runs/distill/``).
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

LABELS = jnp.arange(10, dtype=jnp.int32)


def main(argv=None):
  p = _common.parser(__doc__, "runs/distill", steps=100, meta_steps=200)
  p.add_argument("--meta-lr", type=float, default=0.05)
  args = p.parse_args(argv)
  if args.quick:
    args.meta_steps = 40
  out = Path(args.out)
  (xt, yt), (xv, yv), (xh, yh) = _common.split_digits(args.seed)
  zeros = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

  def train_loss(params, hp, batch):
    return _common.cross_entropy(_common.logits_linear(params, batch[0]), batch[1])

  def trained(images):
    return revoptax.train(
      train_loss,
      zeros,
      {},
      (images[None], LABELS[None]),  # one batch: the ten images, every step
      num_steps=args.steps,
      learning_rate=lambda hp, t: 1.0,
      momentum=lambda hp, t: 0.9,
    )

  def meta_loss(images):
    return _common.cross_entropy(_common.logits_linear(trained(images), xv), yv)

  meta_opt = optax.adam(args.meta_lr)
  # Pixels stay in the data's range.
  meta_step = _common.meta_stepper(meta_loss, meta_opt, lambda x: jnp.clip(x, 0.0, 1.0))

  images = jnp.full((10, 64), 0.5)
  opt_state = meta_opt.init(images)
  history, start = [], time.time()
  for _ in range(args.meta_steps):
    images, opt_state, loss = meta_step(images, opt_state)
    history.append(float(loss))

  rng = np.random.default_rng(args.seed)
  real = jnp.stack([xt[rng.choice(np.flatnonzero(np.asarray(yt) == c))] for c in range(10)])

  def scores(images):
    params = jax.jit(trained)(images)
    return {
      "val_loss": float(_common.cross_entropy(_common.logits_linear(params, xv), yv)),
      "val_accuracy": float(_common.accuracy(_common.logits_linear(params, xv), yv)),
      "hypervalidation_loss": float(_common.cross_entropy(_common.logits_linear(params, xh), yh)),
      "hypervalidation_accuracy": float(_common.accuracy(_common.logits_linear(params, xh), yh)),
    }

  learned, random_real = scores(images), scores(real)
  out.mkdir(parents=True, exist_ok=True)
  fig, axes = plt.subplots(2, 10, figsize=(10, 2.6))
  for c in range(10):
    for row, (batch, name) in enumerate(((images, "learned"), (real, "real"))):
      axes[row, c].imshow(np.asarray(batch[c]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
      axes[row, c].set_xticks([])
      axes[row, c].set_yticks([])
      if c == 0:
        axes[row, c].set_ylabel(name)
    axes[0, c].set_title(str(c))
  fig.suptitle(
    f"Learned training set (hypervalidation accuracy {learned['hypervalidation_accuracy']:.2f})"
    f" vs ten random real digits ({random_real['hypervalidation_accuracy']:.2f})"
  )
  fig.tight_layout()
  fig.savefig(out / "images.png", dpi=120)
  plt.close(fig)
  _common.plot_meta_curve(history, out / "meta_curve.png")
  _common.write_results(
    out,
    {
      "config": vars(args),
      "history": {"meta_loss": history},
      "hyperparameters": {"images": np.asarray(images).tolist()},
      "final": learned,
      "random_real_digits": random_real,
      "seconds": {"meta_learning": time.time() - start},
    },
  )
  print(
    f"validation accuracy trained on the 10 learned images {learned['val_accuracy']:.3f}, on "
    f"10 random real digits {random_real['val_accuracy']:.3f} (hypervalidation "
    f"{learned['hypervalidation_accuracy']:.3f} vs {random_real['hypervalidation_accuracy']:.3f})"
    f"; wrote {out}/"
  )


if __name__ == "__main__":
  main()
