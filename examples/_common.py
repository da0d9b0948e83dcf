"""What the examples share: the digits splits, the command line, resumable meta-runs, and
writing results."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def split_digits(seed: int = 0):
  """Digits shuffled once: (train 1,000, validation 400, hypervalidation 397) as (x, y) pairs.

  ``x`` is ``float32[n, 64]`` in [0, 1], ``y`` is ``int32[n]``.  Validation is
  the meta-objective; hypervalidation is used by no meta-iteration.
  """
  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x = jnp.asarray(x[order] / 16.0, jnp.float32)
  y = jnp.asarray(y[order], jnp.int32)
  return (x[:1000], y[:1000]), (x[1000:1400], y[1000:1400]), (x[1400:], y[1400:])


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: Path) -> np.ndarray:
  """An array from an IDX file (the MNIST format), gzipped or not."""
  raw = Path(path).read_bytes()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  if raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
    raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
  return data.reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
  dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
  for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
    if (data_dir / name).exists():
      return data_dir / name
  raise FileNotFoundError(
    f"{data_dir}: no {stem}[.gz]; download MNIST's IDX files (train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte) there yourself: the examples never download"
  )


def split_mnist(data_dir, seed: int = 0):
  """MNIST's training file shuffled once: half training, a quarter each validation and
  hypervalidation (at most 10,000 / 5,000 / 5,000), as :func:`split_digits`."""
  data_dir = Path(data_dir)
  x = load_idx(_find(data_dir, "train-images-idx3-ubyte"))
  y = load_idx(_find(data_dir, "train-labels-idx1-ubyte"))
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"{data_dir}: {x.shape[0]} images but {y.shape[0]} labels")
  order = np.random.default_rng(seed).permutation(len(x))
  x = jnp.asarray(x[order].reshape(len(x), -1) / 255.0, jnp.float32)
  y = jnp.asarray(y[order], jnp.int32)
  n_train = min(len(x) // 2 // 100 * 100, 10_000)
  n_val = min(len(x) // 4, 5_000)
  train, val = slice(0, n_train), slice(n_train, n_train + n_val)
  hyper = slice(n_train + n_val, n_train + 2 * n_val)
  return (x[train], y[train]), (x[val], y[val]), (x[hyper], y[hyper])


def load_splits(dataset: str, data_dir=None, seed: int = 0):
  """``(train, validation, hypervalidation)`` of ``"digits"``, or ``"mnist"`` from ``data_dir``."""
  if dataset == "digits":
    return split_digits(seed)
  if dataset == "mnist":
    if data_dir is None:
      raise SystemExit("--dataset mnist needs --data-dir PATH (a folder holding MNIST's IDX files)")
    return split_mnist(data_dir, seed)
  raise SystemExit(f"unknown dataset {dataset!r}: use digits or mnist")


def logits_linear(params, x):
  return x @ params["w"] + params["b"]


def cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def meta_stepper(meta_loss, meta_opt, project=lambda hp: hp):
  """``jit`` of one meta-step: ``(hp, opt_state) -> (hp', opt_state', meta_loss(hp))``.

  ``project`` maps the updated hyperparameters back to their allowed set.
  """

  @jax.jit
  def meta_step(hp, opt_state):
    loss, grads = jax.value_and_grad(meta_loss)(hp)
    updates, opt_state = meta_opt.update(grads, opt_state, hp)
    return project(optax.apply_updates(hp, updates)), opt_state, loss

  return meta_step


def parser(doc: str, out: str, steps: int, meta_steps: int) -> argparse.ArgumentParser:
  """The options every meta-learning example takes."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--steps", type=int, default=steps, help="training steps T")
  p.add_argument("--meta-steps", type=int, default=meta_steps, help="meta-iterations")
  p.add_argument("--out", default=out, help="output folder")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
  p.add_argument(
    "--checkpoint-every",
    type=int,
    default=0,
    help="save the meta-run (Orbax) every N meta-steps in OUT/checkpoints (0: never)",
  )
  p.add_argument(
    "--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints"
  )
  return p


def meta_learn(meta_step, hp, opt_state, seeds, args, out: Path, desc: str = "meta-learning"):
  """Run ``hp, opt_state, loss = meta_step(hp, opt_state, seed)`` for each of ``seeds``.

  With ``args.checkpoint_every`` the run is saved in ``out/checkpoints``
  (:class:`MetaCheckpoints`); with ``args.resume`` it continues from there.
  The training seed of meta-step ``i`` is ``seeds[i]``, so the step count is
  the whole RNG state.  Returns ``(hp, opt_state, history)``, ``history`` the
  meta-loss of every meta-step (a list of floats).
  """
  from tqdm import tqdm

  checkpoints = MetaCheckpoints(out / "checkpoints", args.checkpoint_every, len(seeds), args.resume)
  done, (hp, opt_state), history = checkpoints.restore((hp, opt_state))
  bar = tqdm(range(done, len(seeds)), desc=desc, initial=done, total=len(seeds))
  for i in bar:
    hp, opt_state, loss = meta_step(hp, opt_state, int(seeds[i]))
    history[i] = float(loss)
    bar.set_postfix(meta_loss=f"{history[i]:.4f}")
    checkpoints.save(i + 1, (hp, opt_state), history)
  checkpoints.close()
  return hp, opt_state, history.tolist()


class MetaCheckpoints:
  """Orbax checkpoints of a meta-run: hyperparameters, meta-optimizer state, RNG, history.

  Saved every ``every`` meta-steps (the step count is the number of meta-steps
  done), so a run restored with :meth:`restore` continues bit for bit: the
  meta-step is a deterministic function of the saved state and of the step
  index (which picks the training seed), and the history is kept as a
  ``float64[meta_steps]`` array (NaN where not yet run).

  Example::

    checkpoints = MetaCheckpoints(out / "checkpoints", every=10, meta_steps=200)
    start, (hp, opt_state, key), history = checkpoints.restore((hp, opt_state, key))
    for i in range(start, 200):
      hp, opt_state, loss = meta_step(hp, opt_state, i)
      history[i] = loss
      checkpoints.save(i + 1, (hp, opt_state, key), history)
  """

  def __init__(self, directory: Path, every: int, meta_steps: int, resume: bool = False):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.every = every
    self.meta_steps = meta_steps
    self.resume = resume
    self.manager = None
    if every > 0 or resume:
      options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=max(every, 1))
      self.manager = ocp.CheckpointManager(Path(directory).resolve(), options=options)

  def restore(self, state):
    """``(start, state, history)``: from the latest checkpoint with ``--resume``, else fresh."""
    history = np.full((self.meta_steps,), np.nan)
    latest = self.manager.latest_step() if self.manager is not None and self.resume else None
    if latest is None:
      return 0, state, history
    target = {"state": state, "history": history}
    restored = self.manager.restore(latest, args=self._ocp.args.StandardRestore(target))
    return latest, restored["state"], np.asarray(restored["history"])

  def save(self, done: int, state, history) -> None:
    """Save after ``done`` meta-steps, if ``done`` is a multiple of ``every``."""
    if self.manager is None or self.every <= 0 or done % self.every:
      return
    item = {"state": state, "history": np.asarray(history, np.float64)}
    self.manager.save(done, args=self._ocp.args.StandardSave(item))

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()


def plot_meta_curve(history, path):
  """The meta-objective per meta-iteration, with its running mean."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  iterations = np.arange(1, len(history) + 1)
  ax.plot(iterations, history, lw=0.7, alpha=0.6, label="each meta-iteration (its own seed)")
  window = max(1, min(10, len(history) // 4))
  running = np.convolve(history, np.ones(window) / window, mode="valid")
  ax.plot(iterations[window - 1 :], running, lw=2, label=f"mean of the last {window}")
  ax.legend()
  ax.set_xlabel("meta-iteration")
  ax.set_ylabel("validation loss after training")
  ax.set_title("Meta-learning curve")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_results(out: Path, results: dict) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1))
