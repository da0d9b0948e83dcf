"""Quickstart: train an NNX MLP on digits with reversible_sgd, then run training backwards.

    python examples/quickstart.py [--steps 1000]

Trains a 64-50-50-10 MLP on scikit-learn's bundled digits with
``revoptax.reversible_sgd`` inside an ordinary ``nnx.Optimizer`` loop, then
undoes every step with the optimizer's exact inverse and checks that the
initial weights, velocity and information buffer come back bit for bit.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import revoptax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(64, 50, rngs=rngs)
    self.l2 = nnx.Linear(50, 50, rngs=rngs)
    self.l3 = nnx.Linear(50, 10, rngs=rngs)

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--learning-rate", type=float, default=0.3)
  parser.add_argument("--momentum", type=float, default=0.9)
  args = parser.parse_args()

  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  xb, yb = x[:1000].reshape(10, 100, 64), y[:1000].reshape(10, 100)
  x_val, y_val = x[1000:], y[1000:]

  model = MLP(nnx.Rngs(0))
  tx = revoptax.reversible_sgd(args.learning_rate, args.momentum, max_steps=args.steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  initial_state = nnx.as_pure(optimizer.opt_state)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  for t in (bar := tqdm(range(args.steps), desc="training forwards")):
    loss = train_step(model, optimizer, xb[t % 10], yb[t % 10])
    if t % 50 == 0:
      bar.set_postfix(loss=f"{float(loss):.3f}")
  accuracy = float(jnp.mean(jnp.argmax(model(x_val), -1) == y_val))
  print(f"validation accuracy after {args.steps} steps: {accuracy:.3f}")

  # Undo every step exactly: the inverse recomputes each step's gradient.
  graphdef, _ = nnx.split(model, nnx.Param)

  @jax.jit
  def undo_step(state, t):
    def grad_fn(params):
      return nnx.as_pure(nnx.grad(loss_fn)(nnx.merge(graphdef, params), xb[t % 10], yb[t % 10]))

    return tx.inverse(state, grad_fn)

  state = nnx.as_pure(optimizer.opt_state)
  for t in tqdm(reversed(range(args.steps)), total=args.steps, desc="training backwards"):
    state, params = undo_step(state, t)

  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), state, initial_state)
  exact = all(jax.tree.leaves(same))
  nbits = sum(int(np.size(words[0])) for words in jax.tree.leaves(state.exact)) * 64
  print(f"initial weights, velocity and buffer recovered bit for bit: {exact} ({nbits} bits)")
  if not exact:
    raise SystemExit("reversal was not exact")


if __name__ == "__main__":
  main()
