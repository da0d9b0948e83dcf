"""Hyper-overfitting: tuning many hyperparameters to a small validation set.

    python examples/hyper_overfitting.py [--steps 200] [--meta-steps 150] [--out DIR] [--quick]

One weight per training example (200 hyperparameters: the training loss is
``sum_i softmax(logit)_i * n * loss_i``) of a logistic-regression classifier on
digits, tuned by Adam on the hypergradient of the loss on a validation set of
only 50 digits, through ``--steps`` steps of momentum SGD (``revoptax.train``).
The training, validation and hypervalidation (397 digits no meta-iteration
sees) losses are recorded at every meta-iteration: the validation loss keeps
falling while the hypervalidation loss stops following it, which is
overfitting at the level of hyperparameters.  Writes ``curves.png``,
``weights.png`` and ``results.json`` to ``--out`` (default
``runs/hyper_overfitting/``).
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

NUM_TRAIN, NUM_VAL = 200, 50


def main(argv=None):
  p = _common.parser(__doc__, "runs/hyper_overfitting", steps=200, meta_steps=150)
  p.add_argument("--meta-lr", type=float, default=0.1)
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps = 100, 40
  out = Path(args.out)
  (xt, yt), (xv, yv), (xh, yh) = _common.split_digits(args.seed)
  xt, yt, xv, yv = xt[:NUM_TRAIN], yt[:NUM_TRAIN], xv[:NUM_VAL], yv[:NUM_VAL]
  zeros = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

  def train_loss(params, hp, batch):
    x, y = batch
    per_example = optax.softmax_cross_entropy_with_integer_labels(
      _common.logits_linear(params, x), y
    )
    weights = jax.nn.softmax(hp["example_logit"]) * NUM_TRAIN
    return jnp.mean(weights * per_example) + 1e-4 * jnp.sum(params["w"] ** 2)

  def losses(hp):
    trained = revoptax.train(
      train_loss,
      zeros,
      hp,
      (xt[None], yt[None]),
      num_steps=args.steps,
      learning_rate=lambda hp, t: 1.0,
      momentum=lambda hp, t: 0.9,
    )
    loss = lambda x, y: _common.cross_entropy(_common.logits_linear(trained, x), y)
    return loss(xv, yv), (loss(xt, yt), loss(xh, yh))

  meta_opt = optax.adam(args.meta_lr)

  @jax.jit
  def meta_step(hp, opt_state):
    (val, (train, hyper)), grads = jax.value_and_grad(losses, has_aux=True)(hp)
    updates, opt_state = meta_opt.update(grads, opt_state, hp)
    return optax.apply_updates(hp, updates), opt_state, (train, val, hyper)

  hp = {"example_logit": jnp.zeros(NUM_TRAIN)}
  opt_state = meta_opt.init(hp)
  history = {"train_loss": [], "val_loss": [], "hypervalidation_loss": []}
  start = time.time()
  for _ in range(args.meta_steps):
    hp, opt_state, values = meta_step(hp, opt_state)
    for key, value in zip(history, values):
      history[key].append(float(value))
  meta_seconds = time.time() - start

  out.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6, 4))
  iterations = np.arange(1, args.meta_steps + 1)
  for key, label in (
    ("train_loss", "training (unweighted)"),
    ("val_loss", f"validation ({NUM_VAL} digits, the meta-objective)"),
    ("hypervalidation_loss", "hypervalidation (397 digits, never used)"),
  ):
    ax.plot(iterations, history[key], label=label)
  ax.set_yscale("log")
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel("loss after training")
  ax.set_title(f"Tuning {NUM_TRAIN} per-example weights")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "curves.png", dpi=120)
  plt.close(fig)
  weights = np.asarray(jax.nn.softmax(hp["example_logit"]) * NUM_TRAIN)
  fig, ax = plt.subplots(figsize=(6, 3))
  ax.hist(weights, bins=40)
  ax.set_xlabel("learned weight of a training example (1 = uniform)")
  ax.set_ylabel("examples")
  fig.tight_layout()
  fig.savefig(out / "weights.png", dpi=120)
  plt.close(fig)
  best = int(np.argmin(history["hypervalidation_loss"]))
  _common.write_results(
    out,
    {
      "config": vars(args),
      "history": {"meta_loss": history["val_loss"], **history},
      "hyperparameters": {"example_weight": weights.tolist()},
      "final": {k: v[-1] for k, v in history.items()},
      "initial": {k: v[0] for k, v in history.items()},
      "best_hypervalidation": {
        "meta_iteration": best + 1,
        **{k: v[best] for k, v in history.items()},
      },
      "seconds": {"meta_learning": meta_seconds},
    },
  )
  print(
    f"validation loss {history['val_loss'][0]:.4f} -> {history['val_loss'][-1]:.4f}; "
    f"hypervalidation {history['hypervalidation_loss'][0]:.4f} -> lowest "
    f"{history['hypervalidation_loss'][best]:.4f} at meta-iteration {best + 1} -> "
    f"{history['hypervalidation_loss'][-1]:.4f}; wrote {out}/"
  )


if __name__ == "__main__":
  main()
