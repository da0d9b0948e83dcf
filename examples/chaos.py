"""Where hypergradients stop being informative: a sweep of the learning rate at several T.

    python examples/chaos.py [--horizons 20,100,500] [--points 60] [--out DIR] [--quick]

The experiment of Maclaurin, Duvenaud & Adams (ICML 2015, Fig. 10): the
validation loss of a 64-50-50-10 tanh MLP trained for T steps of momentum SGD
(momentum 0.9) on digits, and its hypergradient with respect to the log
learning rate, over a fine sweep of that learning rate, for several T.  All
points of one T are one ``jax.vmap`` of ``jax.value_and_grad`` through
``revoptax.train``.  Where training turns chaotic the loss surface becomes
rough and the hypergradient grows by orders of magnitude: its sign stops
predicting which way the loss goes a small step away.  Writes ``chaos.png``
and ``results.json`` to ``--out`` (default ``runs/chaos/``).
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

SIZES = (64, 50, 50, 10)


def init_mlp():
  keys = jax.random.split(jax.random.key(0), len(SIZES) - 1)
  return [
    {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])
  ]


def logits(params, x):
  for i, layer in enumerate(params):
    x = x @ layer["w"] + layer["b"]
    if i < len(params) - 1:
      x = jnp.tanh(x)
  return x


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--horizons", default="20,100,500", help="comma-separated T")
  p.add_argument("--points", type=int, default=60, help="learning rates in the sweep")
  p.add_argument("--low", type=float, default=-3.0, help="smallest log learning rate")
  p.add_argument("--high", type=float, default=2.0, help="largest log learning rate")
  p.add_argument("--out", default="runs/chaos")
  p.add_argument("--quick", action="store_true", help="T = 20, 100 and 24 points")
  args = p.parse_args(argv)
  if args.quick:
    args.horizons, args.points = "20,100", 24
  horizons = [int(t) for t in args.horizons.split(",")]
  out = Path(args.out)
  (xt, yt), (xv, yv), _ = _common.split_digits()
  batches = (xt.reshape(10, 100, 64), yt.reshape(10, 100))
  params0 = init_mlp()

  def train_loss(params, hp, batch):
    return _common.cross_entropy(logits(params, batch[0]), batch[1])

  def val_loss(log_lr, num_steps):
    trained = revoptax.train(
      train_loss,
      params0,
      log_lr,
      batches,
      num_steps=num_steps,
      learning_rate=lambda log_lr, t: jnp.exp(log_lr),
      momentum=lambda log_lr, t: 0.9,
    )
    return _common.cross_entropy(logits(trained, xv), yv)

  log_lrs = jnp.linspace(args.low, args.high, args.points)
  sweeps, start = {}, time.time()
  for num_steps in horizons:
    value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(lambda h, n=num_steps: val_loss(h, n))))
    loss, grad = value_and_grad(log_lrs)
    sweeps[num_steps] = (np.asarray(loss), np.asarray(grad))

  out.mkdir(parents=True, exist_ok=True)
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6.5), sharex=True)
  for num_steps, (loss, grad) in sweeps.items():
    (line,) = top.plot(log_lrs, loss, ".-", label=f"T = {num_steps}")
    bottom.plot(log_lrs, np.abs(grad), "-", color=line.get_color(), lw=0.8)
    down, up = grad < 0, grad >= 0
    bottom.plot(log_lrs[down], np.abs(grad[down]), "v", color=line.get_color(), ms=4)
    bottom.plot(log_lrs[up], np.abs(grad[up]), "^", mfc="none", color=line.get_color(), ms=5)
  top.set_ylabel("validation loss")
  top.set_yscale("log")
  top.legend()
  bottom.set_yscale("log")
  bottom.set_ylabel("|d loss / d log learning rate|\n(▼ negative, △ positive)")
  bottom.set_xlabel("log learning rate α (momentum 0.9)")
  fig.suptitle("Loss and hypergradient along a learning-rate sweep")
  fig.tight_layout()
  fig.savefig(out / "chaos.png", dpi=120)
  plt.close(fig)

  def summary(loss, grad):
    # Does the hypergradient at each point predict the sign of the change to the next point?
    # Past float32's range (|d loss / d log lr| > 3e38) the hypergradient overflows to inf/NaN.
    finite = np.isfinite(grad)
    predicted = (np.sign(grad[:-1]) == np.sign(np.diff(loss)))[finite[:-1]]
    return {
      "best_log_lr": float(log_lrs[np.argmin(loss)]),
      "best_loss": float(np.min(loss)),
      "max_abs_hypergradient": float(np.max(np.abs(grad[finite]))),
      "non_finite_hypergradients": int(np.sum(~finite)),
      "sign_agreement_with_next_point": float(np.mean(predicted)),
    }

  _common.write_results(
    out,
    {
      "config": vars(args),
      "log_learning_rate": np.asarray(log_lrs).tolist(),
      "sweeps": {
        str(t): {"val_loss": loss.tolist(), "hypergradient": grad.tolist(), **summary(loss, grad)}
        for t, (loss, grad) in sweeps.items()
      },
      "seconds": time.time() - start,
    },
  )
  for t, (loss, grad) in sweeps.items():
    s = summary(loss, grad)
    print(
      f"T = {t}: best log learning rate {s['best_log_lr']:.2f} (loss {s['best_loss']:.4f}), "
      f"max finite |hypergradient| {s['max_abs_hypergradient']:.3g} "
      f"({s['non_finite_hypergradients']} overflowed), sign agrees with the next point "
      f"{100 * s['sign_agreement_with_next_point']:.0f}% of the time"
    )
  print(f"wrote {out}/")


if __name__ == "__main__":
  main()
