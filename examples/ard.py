"""Meta-learn one L2 penalty per weight ("ARD") of logistic regression on digits.

    python examples/ard.py [--steps 300] [--meta-steps 100] [--out DIR] [--seed 0] [--quick]

The experiment of Maclaurin, Duvenaud & Adams (ICML 2015, Fig. 6): multiclass
logistic regression on scikit-learn's digits (64 pixels x 10 classes) with a
separate L2 penalty ``exp(log_l2[pixel, class])`` on every weight, 640
hyperparameters, tuned by Adam on the hypergradient of the validation loss
through ``--steps`` steps of momentum SGD (``revoptax.train``).  A small
training set (100 digits) makes the penalties matter.  Writes
``penalties.png`` (the learned penalties of each class as an 8 x 8 image),
``meta_curve.png`` and ``results.json`` to ``--out`` (default
``runs/ard/``).
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

NUM_TRAIN = 100


def main(argv=None):
  p = _common.parser(__doc__, "runs/ard", steps=300, meta_steps=100)
  p.add_argument("--meta-lr", type=float, default=0.1)
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps = 100, 30
  out = Path(args.out)
  (xt, yt), (xv, yv), (xh, yh) = _common.split_digits(args.seed)
  batches = (xt[:NUM_TRAIN][None], yt[:NUM_TRAIN][None])  # full batch every step
  zeros = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

  def train_loss(params, hp, batch):
    x, y = batch
    penalty = jnp.sum(jnp.exp(hp["log_l2"]) * params["w"] ** 2)
    return _common.cross_entropy(_common.logits_linear(params, x), y) + penalty

  def trained(hp):
    return revoptax.train(
      train_loss,
      zeros,
      hp,
      batches,
      num_steps=args.steps,
      learning_rate=lambda hp, t: 1.0,
      momentum=lambda hp, t: 0.9,
    )

  def meta_loss(hp):
    return _common.cross_entropy(_common.logits_linear(trained(hp), xv), yv)

  meta_opt = optax.adam(args.meta_lr)
  meta_step = _common.meta_stepper(meta_loss, meta_opt)

  hp0 = {"log_l2": jnp.full((64, 10), np.log(1e-3))}
  hp, opt_state = hp0, meta_opt.init(hp0)
  history, start = [], time.time()
  for _ in range(args.meta_steps):
    hp, opt_state, loss = meta_step(hp, opt_state)
    history.append(float(loss))

  def report(hp):
    params = jax.jit(trained)(hp)
    logits = {k: _common.logits_linear(params, x) for k, x in (("t", xt), ("v", xv), ("h", xh))}
    return {
      "train_loss": float(_common.cross_entropy(logits["t"][:NUM_TRAIN], yt[:NUM_TRAIN])),
      "val_loss": float(_common.cross_entropy(logits["v"], yv)),
      "val_accuracy": float(_common.accuracy(logits["v"], yv)),
      "hypervalidation_loss": float(_common.cross_entropy(logits["h"], yh)),
      "hypervalidation_accuracy": float(_common.accuracy(logits["h"], yh)),
    }

  initial, final = report(hp0), report(hp)
  out.mkdir(parents=True, exist_ok=True)
  penalties = np.asarray(hp["log_l2"]) / np.log(10)
  fig, axes = plt.subplots(2, 5, figsize=(9, 4.2))
  for c, ax in enumerate(axes.ravel()):
    image = ax.imshow(penalties[:, c].reshape(8, 8), cmap="viridis")
    ax.set_title(f"class {c}")
    ax.axis("off")
  fig.colorbar(image, ax=axes, shrink=0.8, label="log10 L2 penalty")
  fig.suptitle("Learned L2 penalty of each weight, per class (8 x 8 pixels)")
  fig.savefig(out / "penalties.png", dpi=120)
  plt.close(fig)
  _common.plot_meta_curve(history, out / "meta_curve.png")
  pixel_mean = penalties.mean(axis=1)
  _common.write_results(
    out,
    {
      "config": vars(args),
      "history": {"meta_loss": history},
      "hyperparameters": {"log_l2": np.asarray(hp["log_l2"]).tolist()},
      "initial": initial,
      "final": final,
      "penalty_log10": {
        "min": float(penalties.min()),
        "max": float(penalties.max()),
        "border_pixels_mean": float(pixel_mean.reshape(8, 8)[[0, 7], :].mean()),
        "centre_pixels_mean": float(pixel_mean.reshape(8, 8)[2:6, 2:6].mean()),
      },
      "seconds": {"meta_learning": time.time() - start},
    },
  )
  print(
    f"validation loss {initial['val_loss']:.4f} -> {final['val_loss']:.4f}, hypervalidation "
    f"{initial['hypervalidation_loss']:.4f} -> {final['hypervalidation_loss']:.4f}; wrote {out}/"
  )


if __name__ == "__main__":
  main()
