"""Shared fixtures: the digits data and a small MLP, in JAX's default 32-bit mode."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

SIZES = (64, 50, 50, 10)


def digits_data(num_train=1000, batch_size=100):
  """Digits as (train batches [B, batch, 64], labels [B, batch], val x, val y)."""
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  xb = x[:num_train].reshape(-1, batch_size, 64)
  yb = y[:num_train].reshape(-1, batch_size)
  return jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(x[num_train:]), jnp.asarray(y[num_train:])


def init_mlp(key, sizes=SIZES, scales=None, dtype=jnp.float32):
  """MLP params as a dict of layers; ``scales`` multiplies each layer's init."""
  params = {}
  keys = jax.random.split(key, len(sizes) - 1)
  for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
    scale = 1.0 if scales is None else scales[i]
    params[f"layer{i}"] = {
      "w": (scale * jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in)).astype(dtype),
      "b": jnp.zeros((n_out,), dtype),
    }
  return params


def mlp_logits(params, x):
  h = x
  n = len(params)
  for i in range(n):
    layer = params[f"layer{i}"]
    h = h @ layer["w"] + layer["b"]
    if i < n - 1:
      h = jnp.tanh(h)
  return h


def cross_entropy(params, x, y):
  logp = jax.nn.log_softmax(mlp_logits(params, x))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@pytest.fixture(scope="session")
def digits():
  return digits_data()


def nondeterministic_loss():
  """A loss whose scale, from a host callback, changes on every call (so every gradient)."""
  calls = {"n": 0}

  def noise(_):
    calls["n"] += 1
    return np.float32(1.0 + 1e-3 * calls["n"])

  def loss(p, hp, batch):
    s = jax.pure_callback(
      noise, jax.ShapeDtypeStruct((), jnp.float32), jax.lax.stop_gradient(p["layer1"]["b"])
    )
    return s * cross_entropy(p, *batch)

  return loss


def bits_view(x) -> np.ndarray:
  """The array's bits as unsigned integers of the same width (so -0.0 != 0.0, NaN == NaN)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    return x.view(np.uint8)
  return x.view(np.dtype(f"uint{x.dtype.itemsize * 8}"))


def words_equal(a, b) -> bool:
  """True when two pytrees have identical structure, shapes, dtypes and bits."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  return all(
    np.asarray(x).dtype == np.asarray(y).dtype
    and np.shape(x) == np.shape(y)
    and np.array_equal(bits_view(x), bits_view(y))
    for x, y in zip(la, lb)
  )


@pytest.fixture(autouse=True)
def fresh_compiles_around_monkeypatch(request):
  """revoptax.train reuses compiled loops across calls; a test that patches revoptax must
  neither reuse loops compiled before the patch nor leave patched ones behind."""
  patches = "monkeypatch" in request.fixturenames
  if patches:
    jax.clear_caches()
  yield
  if patches:
    jax.clear_caches()


def default_and_slow(names, default=()):
  """pytest params of ``names``: those in ``default`` run in the default suite, the others are
  marked ``slow`` (CI runs both tiers; the default suite stays short for the edit-test loop)."""
  return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in names]


def run_checks(script: str, env_vars: dict, passed: int, cwd=None, timeout: int = 1200) -> str:
  """Run ``tests/<script>`` with pytest in a subprocess whose environment adds ``env_vars``
  (e.g. ``JAX_ENABLE_X64``, ``XLA_FLAGS``, read when JAX starts); assert it exits 0 and
  reports ``passed`` tests passed.  Returns its stdout."""
  here = Path(__file__).resolve().parent
  result = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / script)],
    cwd=here if cwd is None else cwd,
    env=dict(os.environ, **env_vars),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert f"{passed} passed" in result.stdout, result.stdout[-3000:]
  return result.stdout
