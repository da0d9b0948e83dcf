"""Populations: K hyperparameter settings trained in parallel, searches that use hypergradients.

    python examples/population.py [--steps 200] [--population 8] [--rounds 8] [--repeats 3]
                                  [--out DIR] [--seed 0] [--quick]

Three hyperparameters of a 64-50-50-10 tanh MLP trained on scikit-learn's
digits by ``--steps`` steps of momentum SGD (``revoptax.train``): the step
size ``alpha`` in [0.05, 2] (log scale), the momentum in (0.5, 1)
(``revoptax.momentum_above(0.5, z)``, ``z`` in [-3, 3]) and the L2 penalty in
[1e-10, 1e-2] (log scale); the objective is the validation loss after
training.  Each round trains ``--population`` settings at once,
``jax.vmap(jax.value_and_grad(val_loss))`` (the hypergradient of each setting
by exact reversal, one batched program), and every method gets the same
number of training runs:

* **random search**: uniform settings (the validation loss only);
* **population descent**: each member follows its own hypergradient (Adam in
  the unit cube of the three hyperparameters, clipped to it);
* **Bayesian optimization with gradients**: a Gaussian process over the unit
  cube conditioned on every (log) value *and hypergradient* seen so far (a squared
  exponential kernel and its derivatives; length scale by marginal likelihood),
  choosing each round's settings by Thompson sampling over candidates, one
  joint posterior draw per member.

All three start from the same random settings in round 1.  Writes to
``--out`` (default ``runs/population/``): ``population.png`` (the best
validation loss found against training runs, and where each method looked)
and ``results.json``.

References: Maclaurin, Duvenaud & Adams, ICML 2015, §6 ("BayesOpt that can
condition on gradient information"); Rasmussen & Williams, *Gaussian
Processes for Machine Learning*, §9.4 (derivative observations).
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
import optax

import revoptax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZES = (64, 50, 50, 10)
BATCH = 100
LOG_ALPHA = (np.log(0.05), np.log(2.0))
MOMENTUM_LOGIT = (-3.0, 3.0)
LOG_L2 = (np.log(1e-10), np.log(1e-2))
BOX = np.array([LOG_ALPHA, MOMENTUM_LOGIT, LOG_L2])  # [3, 2]: each hyperparameter's range
NAMES = ("log step size", "momentum logit", "log L2")
METHODS = ("random search", "population descent", "BayesOpt with gradients")


# ----------------------------------------------------------------------------
# The objective: validation loss after training, as a function of u in [0, 1]^3.


def init_params(key, n_in):
  sizes = (n_in, *SIZES[1:])
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"layer{i}": {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def cross_entropy(params, x, y):
  for i in range(len(SIZES) - 1):
    x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < len(SIZES) - 2:
      x = jnp.tanh(x)
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def hyperparameters(u):
  """The hyperparameters at ``u`` in the unit cube (differentiable)."""
  low, high = jnp.asarray(BOX[:, 0]), jnp.asarray(BOX[:, 1])
  log_alpha, momentum_logit, log_l2 = low + u * (high - low)
  return {"log_alpha": log_alpha, "momentum_logit": momentum_logit, "log_l2": log_l2}


def make_objective(splits, num_steps, seed):
  """``val_loss(u)``: training from one fixed init and data order, then the validation loss."""
  (x, y), (xv, yv), _ = splits
  params = init_params(jax.random.key(seed), x.shape[1])
  order = np.random.default_rng(seed).permutation(x.shape[0])
  batches = (x[order].reshape(-1, BATCH, x.shape[1]), y[order].reshape(-1, BATCH))

  def loss_fn(p, hp, batch):
    l2 = sum(jnp.sum(w**2) for w in jax.tree.leaves(p))
    return cross_entropy(p, *batch) + jnp.exp(hp["log_l2"]) * l2

  def val_loss(u):
    hp = hyperparameters(u)
    trained = revoptax.train(
      loss_fn,
      params,
      hp,
      batches,
      num_steps=num_steps,
      learning_rate=lambda hp, t: jnp.exp(hp["log_alpha"]),
      momentum=lambda hp, t: revoptax.momentum_above(0.5, hp["momentum_logit"]),
      rule=revoptax.MomentumSGDRule(momentum_floor=0.5),
    )
    return cross_entropy(trained, xv, yv)

  return val_loss


# ----------------------------------------------------------------------------
# A Gaussian process with derivative observations.


def _kernel_blocks(a, b, length):
  """Covariances of ``[f, grad f]`` at ``a`` ([n, d]) with ``[f, grad f]`` at ``b`` ([m, d])
  under ``k(x, x') = exp(-|x - x'|^2 / (2 l^2))``: ``[n (1 + d), m (1 + d)]``."""
  n, d = a.shape
  m = b.shape[0]
  diff = a[:, None, :] - b[None, :, :]  # [n, m, d]
  k = np.exp(-np.sum(diff**2, -1) / (2 * length**2))
  out = np.empty((n, 1 + d, m, 1 + d))
  out[:, 0, :, 0] = k
  out[:, 0, :, 1:] = k[..., None] * diff / length**2  # cov(f(a), df(b)/db_j)
  out[:, 1:, :, 0] = np.moveaxis(-k[..., None] * diff / length**2, -1, 1)  # cov(df(a)/da_i, f(b))
  eye = np.eye(d)
  second = eye[None, None] / length**2 - diff[..., :, None] * diff[..., None, :] / length**4
  out[:, 1:, :, 1:] = np.moveaxis(k[..., None, None] * second, (2, 3), (1, 3))
  return out.reshape(n * (1 + d), m * (1 + d))


class GradientGP:
  """A GP posterior over ``f`` given values and gradients at ``x`` (unit cube)."""

  JITTER = 1e-6

  def __init__(self, x, values, grads):
    self.x = np.asarray(x, np.float64)
    self.mean = float(np.mean(values))
    self.scale = float(np.std(values)) or 1.0
    y = np.concatenate(
      [(np.asarray(values)[:, None] - self.mean) / self.scale, np.asarray(grads) / self.scale],
      axis=1,
    ).reshape(-1)
    best = None
    for length in (0.08, 0.12, 0.18, 0.27, 0.4, 0.6):
      for variance in (0.3, 1.0, 3.0):
        cov = variance * _kernel_blocks(self.x, self.x, length)
        cov += self.JITTER * np.eye(len(y))
        try:
          chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
          continue
        alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
        evidence = -0.5 * y @ alpha - np.sum(np.log(np.diag(chol)))
        if best is None or evidence > best[0]:
          best = (evidence, length, variance, chol, alpha)
    _, self.length, self.variance, self.chol, self.alpha = best

  def posterior(self, candidates):
    """Mean ``[m]`` and covariance ``[m, m]`` of ``f`` at ``candidates`` (original units)."""
    d = self.x.shape[1]
    cross = self.variance * _kernel_blocks(candidates, self.x, self.length)[:: 1 + d]
    prior = self.variance * _kernel_blocks(candidates, candidates, self.length)[:: 1 + d, :: 1 + d]
    mean = cross @ self.alpha
    solved = np.linalg.solve(self.chol, cross.T)
    cov = prior - solved.T @ solved
    return self.mean + self.scale * mean, self.scale**2 * cov


def thompson_batch(gp, rng, count, best_points, num_candidates=1024):
  """``count`` settings: the minimizers of ``count`` joint posterior draws over candidates
  (uniform, and around the best settings so far)."""
  local = best_points[rng.integers(len(best_points), size=num_candidates // 4)]
  local = np.clip(local + 0.05 * rng.normal(size=local.shape), 0.0, 1.0)
  uniform = rng.uniform(size=(num_candidates - len(local), gp.x.shape[1]))
  candidates = np.concatenate([uniform, local])
  mean, cov = gp.posterior(candidates)
  chol = np.linalg.cholesky(cov + 1e-8 * np.mean(np.diag(cov)) * np.eye(len(mean)))
  draws = mean[:, None] + chol @ rng.normal(size=(len(mean), count))
  chosen = []
  for j in range(count):
    order = np.argsort(draws[:, j])
    chosen.append(next(i for i in order if i not in chosen))
  return candidates[chosen]


# ----------------------------------------------------------------------------
# The three searches, round by round.


def search(method, start, rounds, evaluate, value_only, rng):
  """``(points [runs, 3], values [runs])`` of one method from the settings ``start``."""
  points, values, grads = [], [], []
  u = start
  meta_opt = optax.adam(0.08)
  state = meta_opt.init(jnp.asarray(u))
  for r in range(rounds):
    if method == "random search":
      u = start if r == 0 else rng.uniform(size=start.shape)
      f = np.asarray(value_only(jnp.asarray(u)))
      g = np.zeros_like(u)
    else:
      if method == "BayesOpt with gradients" and r > 0:
        # The GP models the log of the loss (which spans 0.08 to 40 here): values log f,
        # gradients grad f / f.
        x, y, dy = np.concatenate(points), np.concatenate(values), np.concatenate(grads)
        finite = np.isfinite(y) & (y > 0) & np.all(np.isfinite(dy), axis=1)
        y, dy, x = y[finite], dy[finite], x[finite]
        gp = GradientGP(x, np.log(y), dy / y[:, None])
        best = x[np.argsort(y)[: max(1, len(start) // 2)]]
        u = thompson_batch(gp, rng, len(start), best)
      f, g = (np.asarray(a) for a in evaluate(jnp.asarray(u)))
    points.append(np.asarray(u))
    values.append(f)
    grads.append(g)
    if method == "population descent":
      updates, state = meta_opt.update(jnp.asarray(np.nan_to_num(g)), state)
      u = np.clip(np.asarray(optax.apply_updates(jnp.asarray(u), updates)), 0.0, 1.0)
  return np.concatenate(points), np.concatenate(values)


def best_so_far(values):
  return np.minimum.accumulate(np.where(np.isfinite(values), values, np.inf))


def plot(runs, out_path, population):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ax = axes[0]
  for method, color in zip(METHODS, ("0.4", "C0", "C3")):
    curves = np.stack([best_so_far(values) for _, values in runs[method]])
    x = np.arange(1, curves.shape[1] + 1)
    ax.plot(x, np.median(curves, 0), color=color, lw=2, label=method)
    if len(curves) > 1:
      ax.fill_between(x, curves.min(0), curves.max(0), color=color, alpha=0.15)
  ax.set_xlabel(f"training runs ({population} per round, in parallel)")
  ax.set_ylabel("best validation loss so far")
  ax.set_yscale("log")
  ax.legend()
  ax.set_title("Search by training runs (median, range over repeats)")
  ax = axes[1]
  for method, color, marker in zip(METHODS, ("0.4", "C0", "C3"), ("o", "s", "^")):
    points, values = runs[method][0]
    alpha = np.exp(BOX[0, 0] + points[:, 0] * (BOX[0, 1] - BOX[0, 0]))
    z = BOX[1, 0] + points[:, 1] * (BOX[1, 1] - BOX[1, 0])
    momentum = 0.5 + 0.5 / (1 + np.exp(-z))
    ax.scatter(alpha, momentum, s=14, color=color, marker=marker, alpha=0.7, label=method)
  ax.set_xscale("log")
  ax.set_xlabel("step size alpha")
  ax.set_ylabel("momentum")
  ax.set_title("Settings tried (first repeat)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200, help="training steps T")
  parser.add_argument("--out", default="runs/population", help="output folder")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
  parser.add_argument("--population", type=int, default=8, help="settings trained per round")
  parser.add_argument("--rounds", type=int, default=8, help="rounds of each search")
  parser.add_argument("--repeats", type=int, default=3, help="searches per method (seeds)")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.population, args.rounds, args.repeats = 100, 4, 4, 1
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  splits = _common.split_digits(args.seed)
  val_loss = make_objective(splits, args.steps, args.seed)
  evaluate = jax.jit(jax.vmap(jax.value_and_grad(val_loss)))
  value_only = jax.jit(jax.vmap(val_loss))

  runs = {method: [] for method in METHODS}
  start_time = time.time()
  for repeat in range(args.repeats):
    rng = np.random.default_rng(args.seed * 1000 + repeat)
    start = rng.uniform(size=(args.population, 3))
    for method in METHODS:
      method_rng = np.random.default_rng(rng.integers(2**31))
      runs[method].append(search(method, start, args.rounds, evaluate, value_only, method_rng))
      best = np.min(runs[method][-1][1])
      print(f"repeat {repeat + 1}/{args.repeats}, {method}: best validation loss {best:.4f}")
  seconds = time.time() - start_time

  plot(runs, out / "population.png", args.population)
  summary = {
    method: {
      "best_per_repeat": [float(np.min(v)) for _, v in results],
      "median_best": float(np.median([np.min(v) for _, v in results])),
      "round_means_first_repeat": np.mean(
        results[0][1].reshape(args.rounds, args.population), axis=1
      ).tolist(),
      "best_so_far_median": np.median(np.stack([best_so_far(v) for _, v in results]), 0).tolist(),
    }
    for method, results in runs.items()
  }
  best_method, best_points = min(
    ((m, r) for m in METHODS for r in runs[m]), key=lambda mr: np.min(mr[1][1])
  )
  u_best = best_points[0][np.argmin(best_points[1])]
  hp_best = {k: float(v) for k, v in hyperparameters(jnp.asarray(u_best)).items()}
  results = {
    "config": vars(args),
    "runs_per_method": args.population * args.rounds,
    "summary": summary,
    "best": {"method": best_method, "unit_cube": u_best.tolist(), "hyperparameters": hp_best},
    "seconds": seconds,
  }
  _common.write_results(out, results)
  for method in METHODS:
    print(f"{method}: median best validation loss {summary[method]['median_best']:.4f}")
  print(f"wrote {out}/")
  return results


if __name__ == "__main__":
  main()
