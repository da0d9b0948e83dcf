"""The hypergradient as a vector field over two hyperparameters.

    python examples/vector_field.py [--steps 100] [--grid 15] [--out DIR] [--quick]

A 64-50-10 tanh MLP is trained on digits for ``--steps`` steps of momentum SGD
at every point of a grid of (log learning rate, logit momentum); the
validation loss after training and its hypergradient with respect to both are
computed at all points at once (``jax.vmap`` of ``jax.value_and_grad`` through
``revoptax.train``).  ``vector_field.png`` shows the negative hypergradient
(the direction gradient descent on the hyperparameters would move) as arrows
over contours of the validation loss; ``results.json`` holds the grid.
Writes to ``--out`` (default ``runs/vector_field/``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import revoptax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZES = (64, 50, 10)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=100, help="training steps T")
  p.add_argument("--grid", type=int, default=15, help="points per axis")
  p.add_argument("--out", default="runs/vector_field")
  p.add_argument("--quick", action="store_true", help="a 7 x 7 grid, T = 50")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.grid = 50, 7
  out = Path(args.out)
  (xt, yt), (xv, yv), _ = _common.split_digits()
  batches = (xt.reshape(10, 100, 64), yt.reshape(10, 100))
  keys = jax.random.split(jax.random.key(0), len(SIZES) - 1)
  params0 = [
    {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])
  ]

  def logits(params, x):
    return _common.logits_linear(params[1], jnp.tanh(_common.logits_linear(params[0], x)))

  def train_loss(params, hp, batch):
    return _common.cross_entropy(logits(params, batch[0]), batch[1])

  def val_loss(hp):
    trained = revoptax.train(
      train_loss,
      params0,
      hp,
      batches,
      num_steps=args.steps,
      learning_rate=lambda hp, t: jnp.exp(hp[0]),
      momentum=lambda hp, t: jax.nn.sigmoid(hp[1]),
      rule=revoptax.MomentumSGDRule(momentum_floor=0.25),
    )
    return _common.cross_entropy(logits(trained, xv), yv)

  log_lr = np.linspace(-2.0, 1.0, args.grid)
  logit_mom = np.linspace(-1.0, 3.0, args.grid)  # momentum 0.27 .. 0.95
  a, b = np.meshgrid(log_lr, logit_mom)
  points = jnp.asarray(np.stack([a.ravel(), b.ravel()], axis=1), jnp.float32)
  start = time.time()
  loss, grad = jax.jit(jax.vmap(jax.value_and_grad(val_loss)))(points)
  seconds = time.time() - start
  loss = np.asarray(loss).reshape(a.shape)
  grad = np.asarray(grad).reshape(*a.shape, 2)

  out.mkdir(parents=True, exist_ok=True)
  fig, ax = plt.subplots(figsize=(6.5, 5))
  contours = ax.contourf(a, b, np.log10(loss), levels=20, cmap="viridis")
  fig.colorbar(contours, ax=ax, label="log10 validation loss")
  norm = np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)
  direction = -grad / norm  # unit arrows: the descent direction
  ax.quiver(a, b, direction[..., 0], direction[..., 1], color="white", scale=25, width=0.004)
  best = np.unravel_index(np.argmin(loss), loss.shape)
  ax.plot(a[best], b[best], "r*", ms=14, label="lowest loss on the grid")
  ax.set_xlabel("log learning rate α")
  ax.set_ylabel("logit momentum (γ = sigmoid)")
  ax.set_title(f"−hypergradient directions after T = {args.steps} steps")
  ax.legend(loc="lower left")
  fig.tight_layout()
  fig.savefig(out / "vector_field.png", dpi=120)
  plt.close(fig)

  # Do the arrows point downhill? Compare each with the loss change to the neighbour it points at.
  agree, total = 0, 0
  for i in range(1, args.grid - 1):
    for j in range(1, args.grid - 1):
      di, dj = int(np.sign(direction[i, j, 1])), int(np.sign(direction[i, j, 0]))
      axis = 1 if abs(direction[i, j, 0]) > abs(direction[i, j, 1]) else 0
      ni, nj = (i, j + dj) if axis == 1 else (i + di, j)
      total += 1
      agree += loss[ni, nj] < loss[i, j]
  _common.write_results(
    out,
    {
      "config": vars(args),
      "log_learning_rate": log_lr.tolist(),
      "logit_momentum": logit_mom.tolist(),
      "val_loss": loss.tolist(),
      "hypergradient": grad.tolist(),
      "best": {"log_learning_rate": float(a[best]), "logit_momentum": float(b[best])},
      "arrows_pointing_downhill": agree / max(total, 1),
      "seconds": seconds,
    },
  )
  print(
    f"{args.grid**2} hypergradients in {seconds:.1f} s; lowest loss {loss.min():.4f} at log α "
    f"{a[best]:.2f}, logit γ {b[best]:.2f}; {100 * agree / max(total, 1):.0f}% of the inner "
    f"arrows point to a lower neighbour; wrote {out}/"
  )


if __name__ == "__main__":
  main()
