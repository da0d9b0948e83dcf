"""Meta-learn learning-rate and momentum schedules and init scales by exact reversal.

    python examples/learn_schedules.py [--steps 1000] [--meta-steps 200] [--out DIR]
                                       [--seed 0] [--quick] [--checkpoint-every N] [--resume]

The experiment of Maclaurin, Duvenaud & Adams (ICML 2015, Figs. 2-3) on
scikit-learn's bundled digits: a 64-50-50-10 tanh MLP (an ``nnx.Module``) is
trained for ``--steps`` steps of momentum SGD, and Adam on the
hyperparameters follows the hypergradient of the validation loss through the
whole training run (``revoptax.train_module``: training is run backwards
exactly instead of being stored).  Learned, per layer:

* a learning-rate schedule and a momentum schedule over the T steps (values
  at ``--knots`` evenly spaced steps, linearly interpolated to every step);
  momenta are ``0.5 + 0.5 sigmoid(.)``, so they stay above the buffer's
  ``momentum_floor`` by construction;
* the initial weight scale (the standard deviation of the layer's weights).

``--dataset mnist --data-dir PATH`` runs the same on MNIST's IDX files in a
local folder (never downloaded; see ``examples/_common.py``).

Every meta-iteration uses a new seed for the initial weights and the
minibatch order.  The digits are split once into training (1,000),
validation (400: the meta-objective) and hypervalidation (397: used by no
meta-iteration, only to report).  Writes to ``--out`` (default
``runs/learn_schedules/``): ``schedules.png``, ``init_scales.png``,
``meta_curve.png`` and ``results.json``.  ``--checkpoint-every N`` saves the
meta-run (hyperparameters, Adam's state, the step count that picks the seeds,
the history) with Orbax in ``OUT/checkpoints`` every N meta-steps;
``--resume`` continues from the latest one, bit for bit.
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
from flax import nnx

import revoptax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SIZES = (64, 50, 50, 10)  # the input size follows the data (784 for --dataset mnist)
LAYERS = ("l1", "l2", "l3")
BATCH = 100
MOMENTUM_FLOOR = 0.5
EVAL_SEEDS = 5  # training runs averaged for the before/after figures


class MLP(nnx.Module):
  """n_in-50-50-10 tanh MLP whose layer ``i`` starts with weights ``N(0, scales[i]**2)``."""

  def __init__(self, scales, rngs: nnx.Rngs, n_in: int = SIZES[0]):
    normal = nnx.initializers.normal(1.0)
    sizes = (n_in, *SIZES[1:])
    for name, n_in, n_out, scale in zip(LAYERS, sizes[:-1], sizes[1:], scales):
      layer = nnx.Linear(n_in, n_out, kernel_init=normal, rngs=rngs)
      layer.kernel.set_value(scale * layer.kernel.get_value())
      setattr(self, name, layer)

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def cross_entropy(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def accuracy(model, x, y):
  return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


def interpolate(knots, t, num_steps):
  """Value at step ``t`` of a schedule given at ``len(knots)`` evenly spaced steps."""
  position = t * (knots.shape[0] - 1) / max(num_steps - 1, 1)
  lower = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, knots.shape[0] - 2)
  frac = position - lower
  return (1 - frac) * knots[lower] + frac * knots[lower + 1]


def schedules(num_steps):
  """``learning_rate(hp, t)`` and ``momentum(hp, t)``: one value per layer."""

  def learning_rate(hp, t):
    values = jnp.exp(interpolate(hp["log_learning_rate"], t, num_steps))
    return {name: values[i] for i, name in enumerate(LAYERS)}

  def momentum(hp, t):
    z = interpolate(hp["momentum_logit"], t, num_steps)
    values = revoptax.momentum_above(MOMENTUM_FLOOR, z)
    return {name: values[i] for i, name in enumerate(LAYERS)}

  return learning_rate, momentum


def initial_hyperparameters(knots):
  layers = len(LAYERS)
  return {
    "log_learning_rate": jnp.zeros((knots, layers)),  # alpha = 1: optax lr 0.1 at gamma 0.9
    "momentum_logit": jnp.full((knots, layers), np.log(4.0)),  # gamma = 0.9
    "log_init_scale": jnp.full((layers,), np.log(0.2)),
  }


def make_trainer(train_split, num_steps):
  """``trained_model(hp, seed)``: a model trained for ``num_steps`` with these hyperparameters."""
  x, y = train_split
  learning_rate, momentum = schedules(num_steps)

  def loss_fn(model, hp, batch):
    return cross_entropy(model, *batch)

  def trained_model(hp, seed):
    init_key, order_key = jax.random.split(jax.random.fold_in(jax.random.key(0), seed))
    model = MLP(jnp.exp(hp["log_init_scale"]), nnx.Rngs(params=init_key), x.shape[1])
    order = jax.random.permutation(order_key, x.shape[0])
    batches = (x[order].reshape(-1, BATCH, x.shape[1]), y[order].reshape(-1, BATCH))
    return revoptax.train_module(
      loss_fn,
      model,
      hp,
      batches,
      num_steps=num_steps,
      learning_rate=learning_rate,
      momentum=momentum,
      rule=revoptax.MomentumSGDRule(momentum_floor=MOMENTUM_FLOOR),
    )

  return trained_model


def plain_trajectory_bytes(meta_loss, hp):
  """XLA temp memory that ``jax.grad`` through the same training as a ``lax.scan`` would need."""
  return jax.jit(jax.grad(meta_loss)).lower(hp, 0).compile().memory_analysis().temp_size_in_bytes


def plain_meta_loss(train_split, val_split, num_steps):
  """The same meta-objective with training as a plain float ``lax.scan`` (for its memory)."""
  x, y = train_split
  learning_rate, momentum = schedules(num_steps)

  def meta_loss(hp, seed):
    init_key, order_key = jax.random.split(jax.random.fold_in(jax.random.key(0), seed))
    model = MLP(jnp.exp(hp["log_init_scale"]), nnx.Rngs(params=init_key), x.shape[1])
    graphdef, state = nnx.split(model)
    order = jax.random.permutation(order_key, x.shape[0])
    xb, yb = x[order].reshape(-1, BATCH, x.shape[1]), y[order].reshape(-1, BATCH)
    num_batches = xb.shape[0]

    def model_at(params):
      filled = jax.tree.map(lambda leaf: leaf, state)
      nnx.replace_by_pure_dict(filled, params)
      return nnx.merge(graphdef, filled)

    def step(carry, t):
      w, v = carry
      b = t % num_batches
      g = jax.grad(lambda p: cross_entropy(model_at(p), xb[b], yb[b]))(w)
      alpha = per_leaf(learning_rate(hp, t), w)
      gamma = per_leaf(momentum(hp, t), w)
      v = jax.tree.map(lambda v, g, m: m * v - (1 - m) * g, v, g, gamma)
      w = jax.tree.map(lambda w, v, a: w + a * v, w, v, alpha)
      return (w, v), None

    params = nnx.to_pure_dict(state)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (w, _), _ = jax.lax.scan(step, (params, zeros), jnp.arange(num_steps))
    return cross_entropy(model_at(w), *val_split)

  return meta_loss


def per_leaf(per_layer, params):
  """``{layer: value}`` broadcast to every leaf of the layer's params."""
  return {k: jax.tree.map(lambda _, x=per_layer[k]: x, params[k]) for k in params}


def schedule_values(fn, hp, num_steps):
  """``{layer: float[num_steps]}``: a schedule at every step."""
  return {k: np.asarray(v) for k, v in jax.vmap(lambda t: fn(hp, t))(jnp.arange(num_steps)).items()}


def evaluate(models, splits):
  """Means over ``models`` (trained from different seeds) of the losses and accuracies."""
  (xt, yt), (xv, yv), (xh, yh) = splits
  scores = {
    "train_loss": lambda m: cross_entropy(m, xt, yt),
    "val_loss": lambda m: cross_entropy(m, xv, yv),
    "val_accuracy": lambda m: accuracy(m, xv, yv),
    "hypervalidation_loss": lambda m: cross_entropy(m, xh, yh),
    "hypervalidation_accuracy": lambda m: accuracy(m, xh, yh),
  }
  return {name: float(np.mean([fn(m) for m in models])) for name, fn in scores.items()}


def plot_schedules(hp0, hp, num_steps, path):
  learning_rate, momentum = schedules(num_steps)
  steps = jnp.arange(num_steps)
  fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  panels = ((axes[0], learning_rate, "learning rate α"), (axes[1], momentum, "momentum γ"))
  for ax, fn, label in panels:
    start, learned = schedule_values(fn, hp0, num_steps), schedule_values(fn, hp, num_steps)
    for i, name in enumerate(LAYERS):
      (line,) = ax.plot(steps, learned[name], label=f"layer {i + 1}")
      ax.plot(steps, start[name], ls="--", lw=0.8, color=line.get_color())
    ax.set_ylabel(label)
  axes[0].set_yscale("log")
  axes[0].legend(title="learned (initial dashed)")
  axes[1].set_xlabel("training step")
  fig.suptitle("Learned schedules")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_init_scales(hp0, hp, path, fan_in):
  fig, ax = plt.subplots(figsize=(5, 3.5))
  layers = np.arange(1, len(LAYERS) + 1)
  ax.plot(layers, np.exp(np.asarray(hp["log_init_scale"])), "o-", label="learned")
  ax.plot(layers, np.exp(np.asarray(hp0["log_init_scale"])), "s--", label="initial")
  ax.plot(layers, 1 / np.sqrt(fan_in), "k^:", label="1/√fan-in")
  ax.set_xticks(layers)
  ax.set_xlabel("layer")
  ax.set_ylabel("initial weight scale (std)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = _common.parser(__doc__, "runs/learn_schedules", steps=1000, meta_steps=200)
  parser.add_argument("--knots", type=int, default=25, help="schedule values per layer")
  parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
  parser.add_argument("--data-dir", help="folder with MNIST's IDX files (--dataset mnist)")
  parser.add_argument("--meta-lr", type=float, default=0.02, help="Adam's learning rate")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps, args.knots, args.meta_lr = 100, 40, 10, 0.04
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  splits = _common.load_splits(args.dataset, args.data_dir)
  train_split, val_split, _ = splits
  trained_model = make_trainer(train_split, args.steps)

  def meta_loss(hp, seed):
    return cross_entropy(trained_model(hp, seed), *val_split)

  # Hypergradients grow erratic once training turns chaotic (large learning
  # rates; the paper's Fig. 10): clip them, and skip a meta-step whose
  # hypergradient is not finite.
  meta_opt = optax.apply_if_finite(
    optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.meta_lr)), max_consecutive_errors=5
  )

  @jax.jit
  def meta_step(hp, opt_state, seed):
    loss, grads = jax.value_and_grad(meta_loss)(hp, seed)
    updates, opt_state = meta_opt.update(grads, opt_state, hp)
    return optax.apply_updates(hp, updates), opt_state, loss

  hp0 = initial_hyperparameters(args.knots)
  hp, opt_state = hp0, meta_opt.init(hp0)
  seeds = args.seed * 1_000_003 + np.arange(args.meta_steps)

  start = time.time()
  reversal_bytes = meta_step.lower(hp, opt_state, 0).compile().memory_analysis().temp_size_in_bytes
  scan_bytes = plain_trajectory_bytes(plain_meta_loss(train_split, val_split, args.steps), hp0)
  print(
    f"T = {args.steps}: XLA temp memory of one meta-step {reversal_bytes / 1e6:.1f} MB by exact "
    f"reversal; jax.grad through lax.scan of the same training would need "
    f"{scan_bytes / 1e6:.0f} MB"
  )

  hp, opt_state, history = _common.meta_learn(meta_step, hp, opt_state, seeds, args, out)
  meta_seconds = time.time() - start

  # Before and after, each trained from EVAL_SEEDS seeds no meta-iteration used.
  evaluate_at = jax.jit(trained_model)
  unseen = [int(s) for s in seeds[-1] + 1 + np.arange(EVAL_SEEDS)]
  initial = evaluate([evaluate_at(hp0, s) for s in unseen], splits)
  final = evaluate([evaluate_at(hp, s) for s in unseen], splits)

  plot_schedules(hp0, hp, args.steps, out / "schedules.png")
  fan_in = np.asarray((splits[0][0].shape[1], *SIZES[1:-1]))
  plot_init_scales(hp0, hp, out / "init_scales.png", fan_in)
  _common.plot_meta_curve(history, out / "meta_curve.png")
  learning_rate, momentum = schedules(args.steps)
  results = {
    "config": vars(args),
    "history": {"meta_loss": history},
    "hyperparameters": {k: np.asarray(v).tolist() for k, v in hp.items()},
    "schedules": {
      "learning_rate": {
        k: v.tolist() for k, v in schedule_values(learning_rate, hp, args.steps).items()
      },
      "momentum": {k: v.tolist() for k, v in schedule_values(momentum, hp, args.steps).items()},
    },
    "init_scale": {
      "learned": np.exp(np.asarray(hp["log_init_scale"])).tolist(),
      "one_over_sqrt_fan_in": (1 / np.sqrt(fan_in)).tolist(),
    },
    "initial": initial,
    "final": final,
    "memory_bytes": {"exact_reversal": int(reversal_bytes), "lax_scan": int(scan_bytes)},
    "seconds": {"meta_learning": meta_seconds},
  }
  _common.write_results(out, results)
  print(
    f"validation loss {initial['val_loss']:.4f} -> {final['val_loss']:.4f}, "
    f"hypervalidation {initial['hypervalidation_loss']:.4f} -> "
    f"{final['hypervalidation_loss']:.4f} (accuracy {initial['hypervalidation_accuracy']:.3f} "
    f"-> {final['hypervalidation_accuracy']:.3f}); wrote {out}/"
  )
  return results


if __name__ == "__main__":
  main()
