"""Learning architecture by relaxation: layer widths and convolution-like weight tying.

    python examples/architecture.py [--steps 200] [--meta-steps 80] [--out DIR] [--quick]

Two relaxations of discrete architecture choices into hyperparameters that
have hypergradients (through ``revoptax.train``), on digits:

* **Widths.** A 64-40-40-10 tanh MLP whose hidden unit ``j`` of layer ``l``
  pays an L2 penalty ``sigmoid((j - c_l) / 2)`` on its incoming and outgoing
  weights: units past the learned cutoff ``c_l`` are pushed to zero.  The
  meta-objective is the validation loss plus ``--width-cost`` per unit kept,
  so the hypergradient shrinks a layer unless its units pay for themselves.
* **Tying.** A dense layer from the 8 x 8 pixels to an 8 x 8 grid of hidden
  units, with a penalty ``tie_d * (W[p, q] - W[p + d, q + d])^2`` for the
  shifts ``d`` one pixel right and one pixel down (a convolution satisfies it
  exactly), ``tie_d = 2 sigmoid(.)`` learned.  Trained on 200 digits, so that
  sharing helps.

Writes ``widths.png``, ``tying.png`` and ``results.json`` to ``--out`` (default
``runs/architecture/``).
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

WIDTH = 40
TIE_MAX = 2.0  # larger ties make training unstable at learning rate 1, momentum 0.9


def meta_learn(meta_loss, hp, meta_lr, meta_steps):
  meta_opt = optax.adam(meta_lr)
  meta_step = _common.meta_stepper(meta_loss, meta_opt)
  opt_state, trajectory, history = meta_opt.init(hp), [hp], []
  for _ in range(meta_steps):
    hp, opt_state, loss = meta_step(hp, opt_state)
    trajectory.append(hp)
    history.append(float(loss))
  return hp, trajectory, history


def train(loss, params, hp, batches, num_steps):
  return revoptax.train(
    loss,
    params,
    hp,
    batches,
    num_steps=num_steps,
    learning_rate=lambda hp, t: 1.0,
    momentum=lambda hp, t: 0.9,
  )


def widths_experiment(args, splits):
  (xt, yt), (xv, yv), (xh, yh) = splits
  batches = (xt.reshape(10, 100, 64), yt.reshape(10, 100))
  sizes = (64, WIDTH, WIDTH, 10)
  keys = jax.random.split(jax.random.key(args.seed), 3)
  params0 = [
    {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:])
  ]
  units = jnp.arange(WIDTH)

  def logits(params, x):
    for i, layer in enumerate(params):
      x = x @ layer["w"] + layer["b"]
      x = jnp.tanh(x) if i < len(params) - 1 else x
    return x

  def train_loss(params, hp, batch):
    fit = _common.cross_entropy(logits(params, batch[0]), batch[1])
    penalty = 0.0
    for layer in range(2):  # hidden layer l: columns of params[l], rows of params[l + 1]
      gate = jax.nn.sigmoid((units - hp["cutoff"][layer]) / 2.0)
      size = jnp.sum(params[layer]["w"] ** 2, 0) + jnp.sum(params[layer + 1]["w"] ** 2, 1)
      penalty += jnp.sum(gate * size)
    return fit + penalty

  def losses(hp, x, y):
    return _common.cross_entropy(logits(train(train_loss, params0, hp, batches, args.steps), x), y)

  def meta_loss(hp):
    return losses(hp, xv, yv) + args.width_cost * jnp.sum(hp["cutoff"])

  hp0 = {"cutoff": jnp.full((2,), WIDTH / 2)}
  hp, trajectory, history = meta_learn(meta_loss, hp0, args.meta_lr, args.meta_steps)
  cutoffs = np.asarray([np.asarray(h["cutoff"]) for h in trajectory])
  score = jax.jit(losses)
  result = {
    "history": history,
    "cutoff_start": np.asarray(hp0["cutoff"]).tolist(),
    "cutoff_learned": np.asarray(hp["cutoff"]).tolist(),
    "hypervalidation_loss": {
      "start": float(score(hp0, xh, yh)),
      "learned": float(score(hp, xh, yh)),
    },
  }
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
  for layer in range(2):
    left.plot(cutoffs[:, layer], label=f"hidden layer {layer + 1}")
    right.plot(
      units, jax.nn.sigmoid((units - hp["cutoff"][layer]) / 2.0), label=f"layer {layer + 1}"
    )
  left.set_xlabel("meta-iteration")
  left.set_ylabel("learned width cutoff c_l (units)")
  left.legend()
  right.set_xlabel("hidden unit index")
  right.set_ylabel("L2 penalty on the unit")
  right.set_title(f"learned cutoffs (width cost {args.width_cost} per unit)")
  right.legend()
  fig.tight_layout()
  fig.savefig(args.out / "widths.png", dpi=120)
  plt.close(fig)
  return result


def tying_experiment(args, splits):
  (xt, yt), (xv, yv), (xh, yh) = splits
  batches = (xt[:200][None], yt[:200][None])
  keys = jax.random.split(jax.random.key(args.seed + 1), 2)
  params0 = {
    "w1": jax.random.normal(keys[0], (64, 64)) / 8,
    "b1": jnp.zeros(64),
    "w2": jax.random.normal(keys[1], (64, 10)) / 8,
    "b2": jnp.zeros(10),
  }

  def logits(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

  def tie_penalty(w1, ties):
    w = w1.reshape(8, 8, 8, 8)  # input row, input column, hidden row, hidden column
    right = jnp.sum((w[:, :-1, :, :-1] - w[:, 1:, :, 1:]) ** 2)
    down = jnp.sum((w[:-1, :, :-1, :] - w[1:, :, 1:, :]) ** 2)
    return ties[0] * right + ties[1] * down

  def ties_of(hp):
    return TIE_MAX * jax.nn.sigmoid(hp["tie_logit"])

  def train_loss(params, hp, batch):
    fit = _common.cross_entropy(logits(params, batch[0]), batch[1])
    l2 = 1e-3 * (jnp.sum(params["w1"] ** 2) + jnp.sum(params["w2"] ** 2))
    return fit + l2 + tie_penalty(params["w1"], ties_of(hp))

  def trained(hp):
    return train(train_loss, params0, hp, batches, args.steps)

  def meta_loss(hp):
    return _common.cross_entropy(logits(trained(hp), xv), yv)

  hp0 = {"tie_logit": jnp.full((2,), -6.0)}
  hp, trajectory, history = meta_learn(meta_loss, hp0, 4 * args.meta_lr, args.meta_steps)
  ties = np.asarray([np.asarray(ties_of(h)) for h in trajectory])
  train_at = jax.jit(trained)
  final, untied = train_at(hp), train_at({"tie_logit": jnp.full((2,), -30.0)})
  score = lambda p: float(_common.cross_entropy(logits(p, xh), yh))
  result = {
    "history": history,
    "tie_start": np.asarray(ties_of(hp0)).tolist(),
    "tie_learned": np.asarray(ties_of(hp)).tolist(),
    "hypervalidation_loss": {
      "untied": score(untied),
      "start": score(train_at(hp0)),
      "learned": score(final),
    },
  }
  fig = plt.figure(figsize=(10, 3.6))
  ax = fig.add_subplot(1, 3, 1)
  ax.semilogy(ties[:, 0], label="right shift")
  ax.semilogy(ties[:, 1], label="down shift")
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel("tie strength")
  ax.legend()
  for col, (params, title) in enumerate(((untied, "no tying"), (final, "learned tying"))):
    grid = np.asarray(params["w1"]).reshape(8, 8, 8, 8)[:, :, 2:6, 2:6]  # 16 hidden units
    mosaic = grid.transpose(2, 0, 3, 1).reshape(32, 32)
    ax = fig.add_subplot(1, 3, col + 2)
    ax.imshow(mosaic, cmap="RdBu", vmin=-np.abs(mosaic).max(), vmax=np.abs(mosaic).max())
    ax.set_title(f"{title}: 16 units' weights")
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(args.out / "tying.png", dpi=120)
  plt.close(fig)
  return result


def main(argv=None):
  p = _common.parser(__doc__, "runs/architecture", steps=200, meta_steps=80)
  p.add_argument("--meta-lr", type=float, default=0.5)
  p.add_argument("--width-cost", type=float, default=1e-3, help="meta-objective cost per unit")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps = 100, 25
  args.out = Path(args.out)
  args.out.mkdir(parents=True, exist_ok=True)
  splits = _common.split_digits(args.seed)
  start = time.time()
  widths = widths_experiment(args, splits)
  tying = tying_experiment(args, splits)
  config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
  _common.write_results(
    args.out,
    {
      "config": config,
      "widths": widths,
      "tying": tying,
      "history": {"meta_loss": widths["history"], "meta_loss_tying": tying["history"]},
      "seconds": time.time() - start,
    },
  )
  print(
    f"width cutoffs {widths['cutoff_start']} -> {np.round(widths['cutoff_learned'], 1).tolist()}"
    f" (hypervalidation {widths['hypervalidation_loss']['start']:.4f} -> "
    f"{widths['hypervalidation_loss']['learned']:.4f}); tie strengths "
    f"{np.round(tying['tie_start'], 4).tolist()} -> {np.round(tying['tie_learned'], 3).tolist()}"
    f" (hypervalidation untied {tying['hypervalidation_loss']['untied']:.4f}, start "
    f"{tying['hypervalidation_loss']['start']:.4f}, learned "
    f"{tying['hypervalidation_loss']['learned']:.4f}); wrote {args.out}/"
  )


if __name__ == "__main__":
  main()
