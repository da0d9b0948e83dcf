"""Meta-learn Adam's per-layer learning-rate schedule by exact reversal of Adam.

    python examples/adam_schedules.py [--steps 500] [--meta-steps 60] [--out DIR]
                                      [--seed 0] [--quick]

The 64-50-50-10 tanh MLP of ``learn_schedules.py`` on scikit-learn's bundled
digits, trained for ``--steps`` steps of Adam (``b1 = 0.9``, ``b2 = 0.999``,
``eps = 1e-8``, Optax's defaults) whose learning rate is a schedule per layer
(values at ``--knots`` evenly spaced steps, interpolated in log space).  The
schedule starts flat at ``--initial-lr`` and Adam on the hyperparameters
follows the hypergradient of the validation loss through the whole training
run: ``revoptax.train_module`` with ``rule=revoptax.AdamRule()`` runs Adam
backwards exactly (moments included) instead of storing the trajectory.

Every meta-iteration uses a new seed for the initial weights and the
minibatch order; the before/after numbers average training runs from seeds
no meta-iteration used.  Writes to ``--out`` (default
``runs/adam_schedules/``): ``adam_schedules.png`` (the learned schedules
and the validation loss during training before and after), ``meta_curve.png``
and ``results.json``.
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
from learn_schedules import BATCH, EVAL_SEEDS, LAYERS, MLP, cross_entropy, evaluate, interpolate

import revoptax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

INIT_SCALES = (0.125, 0.14, 0.14)  # about 1/sqrt(fan-in)


def learning_rate_schedule(num_steps):
  """``learning_rate(hp, t)``: one value per layer, ``exp`` of the interpolated knots."""

  def learning_rate(hp, t):
    values = jnp.exp(interpolate(hp["log_learning_rate"], t, num_steps))
    return {name: values[i] for i, name in enumerate(LAYERS)}

  return learning_rate


def batches_for(train_split, seed):
  x, y = train_split
  order = jax.random.permutation(jax.random.fold_in(jax.random.key(1), seed), x.shape[0])
  return x[order].reshape(-1, BATCH, x.shape[1]), y[order].reshape(-1, BATCH)


def make_trainer(train_split, num_steps):
  """``trained_model(hp, seed)``: the MLP after ``num_steps`` of exactly reversible Adam."""
  learning_rate = learning_rate_schedule(num_steps)

  def loss_fn(model, hp, batch):
    return cross_entropy(model, *batch)

  def trained_model(hp, seed):
    init_key = jax.random.fold_in(jax.random.key(0), seed)
    model = MLP(jnp.asarray(INIT_SCALES), nnx.Rngs(params=init_key), train_split[0].shape[1])
    return revoptax.train_module(
      loss_fn,
      model,
      hp,
      batches_for(train_split, seed),
      num_steps=num_steps,
      rule=revoptax.AdamRule(),
      learning_rate=learning_rate,
    )

  return trained_model


def validation_curve(hp, train_split, val_split, num_steps, seeds, every):
  """Mean validation loss every ``every`` steps of float Adam with the schedule (the same
  training as the exact one, to float32 rounding), as one ``lax.scan`` per seed."""
  learning_rate = learning_rate_schedule(num_steps)
  b1, b2, eps = 0.9, 0.999, 1e-8
  curves = []
  for seed in seeds:
    init_key = jax.random.fold_in(jax.random.key(0), seed)
    model = MLP(jnp.asarray(INIT_SCALES), nnx.Rngs(params=init_key), train_split[0].shape[1])
    graphdef, state = nnx.split(model)
    xb, yb = batches_for(train_split, seed)

    def model_at(params, graphdef=graphdef, state=state):
      filled = jax.tree.map(lambda leaf: leaf, state)
      nnx.replace_by_pure_dict(filled, params)
      return nnx.merge(graphdef, filled)

    def step(carry, t, xb=xb, yb=yb, model_at=model_at):
      w, m, v = carry
      b = t % xb.shape[0]
      g = jax.grad(lambda p: cross_entropy(model_at(p), xb[b], yb[b]))(w)
      lrs = learning_rate(hp, t)
      lr = {k: jax.tree.map(lambda _, k=k: lrs[k], w[k]) for k in w}
      m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
      v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
      c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
      w = jax.tree.map(lambda w, m, v, a: w - a * (m / c1) / (jnp.sqrt(v / c2) + eps), w, m, v, lr)
      return (w, m, v), cross_entropy(model_at(w), *val_split)

    params = nnx.to_pure_dict(state)
    zeros = jax.tree.map(jnp.zeros_like, params)
    run = jax.jit(
      lambda p, step=step, z=zeros: jax.lax.scan(step, (p, z, z), jnp.arange(num_steps))
    )
    _, losses = run(params)
    first = float(cross_entropy(model_at(params), *val_split))
    curves.append(np.concatenate([[first], np.asarray(losses)])[::every])
  return np.mean(curves, axis=0)


def plot(hp0, hp, curves, num_steps, every, path):
  learning_rate = learning_rate_schedule(num_steps)
  steps = jnp.arange(num_steps)
  start = jax.vmap(lambda t: learning_rate(hp0, t))(steps)
  learned = jax.vmap(lambda t: learning_rate(hp, t))(steps)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, name in enumerate(LAYERS):
    (line,) = axes[0].plot(steps, learned[name], label=f"layer {i + 1}")
    axes[0].plot(steps, start[name], ls="--", lw=0.8, color=line.get_color())
  axes[0].set_yscale("log")
  axes[0].set_xlabel("training step")
  axes[0].set_ylabel("Adam learning rate")
  axes[0].legend(title="learned (initial dashed)")
  axes[0].set_title("Learned per-layer schedules")
  at = np.arange(len(curves["initial"])) * every
  axes[1].plot(at, curves["initial"], "--", label="initial schedule")
  axes[1].plot(at, curves["learned"], label="learned schedule")
  axes[1].set_xlabel("training step")
  axes[1].set_ylabel("validation loss")
  axes[1].set_yscale("log")
  axes[1].legend()
  axes[1].set_title("Training with each schedule (unseen seeds)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = _common.parser(__doc__, "runs/adam_schedules", steps=500, meta_steps=60)
  parser.add_argument("--knots", type=int, default=10, help="schedule values per layer")
  parser.add_argument("--initial-lr", type=float, default=3e-3)
  parser.add_argument("--meta-lr", type=float, default=0.05, help="meta-Adam's learning rate")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.meta_steps, args.knots = 100, 15, 5
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  splits = _common.split_digits()
  train_split, val_split, _ = splits
  trained_model = make_trainer(train_split, args.steps)

  def meta_loss(hp, seed):
    return cross_entropy(trained_model(hp, seed), *val_split)

  meta_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.meta_lr))

  @jax.jit
  def meta_step(hp, opt_state, seed):
    loss, grads = jax.value_and_grad(meta_loss)(hp, seed)
    updates, opt_state = meta_opt.update(grads, opt_state, hp)
    return optax.apply_updates(hp, updates), opt_state, loss

  hp0 = {"log_learning_rate": jnp.full((args.knots, len(LAYERS)), np.log(args.initial_lr))}
  hp, opt_state = hp0, meta_opt.init(hp0)
  seeds = args.seed * 1_000_003 + np.arange(args.meta_steps)
  start = time.time()
  hp, opt_state, history = _common.meta_learn(
    meta_step, hp, opt_state, seeds, args, out, desc="meta-learning Adam's schedule"
  )
  meta_seconds = time.time() - start

  unseen = [int(s) for s in seeds[-1] + 1 + np.arange(EVAL_SEEDS)]
  evaluate_at = jax.jit(trained_model)
  initial = evaluate([evaluate_at(hp0, s) for s in unseen], splits)
  final = evaluate([evaluate_at(hp, s) for s in unseen], splits)
  every = max(1, args.steps // 50)
  curves = {
    "initial": validation_curve(hp0, train_split, val_split, args.steps, unseen[:2], every),
    "learned": validation_curve(hp, train_split, val_split, args.steps, unseen[:2], every),
  }
  plot(hp0, hp, curves, args.steps, every, out / "adam_schedules.png")
  _common.plot_meta_curve(history, out / "meta_curve.png")
  learning_rate = learning_rate_schedule(args.steps)
  values = jax.vmap(lambda t: learning_rate(hp, t))(jnp.arange(args.steps))
  results = {
    "config": vars(args),
    "history": {"meta_loss": history},
    "learning_rate": {k: np.asarray(v).tolist() for k, v in values.items()},
    "validation_curve": {k: v.tolist() for k, v in curves.items()},
    "initial": initial,
    "final": final,
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
