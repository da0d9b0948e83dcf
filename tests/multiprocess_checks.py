"""Two processes under ``jax.distributed``: run by test_multiprocess.py, one copy per process.

Usage (what the test does, on 127.0.0.1; on a cluster, the coordinator's
address and each host's process id)::

  python multiprocess_checks.py PROCESS_ID NUM_PROCESSES COORDINATOR_ADDRESS OUT_DIR

Each process has 2 CPU devices and gloo collectives; the mesh spans the 4.
Data parallel: the minibatch axis of the training data is sharded over all
devices (``jnp.mean`` in the loss becomes an all-reduce).  Three runs of the
hypergradient of the validation loss (per-step learning rate, L2 penalty,
init scale):

* ``replicated``: params replicated;
* ``sharded``: also the weight matrices sharded over the mesh (``sharding=``);
* ``fault``: replicated, with a host callback that runs in process 1 only and
  changes the gradient by one ulp in the backward pass at step ``FAULT_STEP``.

Each process writes ``OUT_DIR/process{i}.json`` with the hypergradients and
the fault run's error message.  The problem (:func:`val_loss`) is importable,
so the test computes the one-process reference from the same definitions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np

SIZES = (64, 64, 64, 16)
NUM_STEPS = 40
NUM_BATCHES, BATCH = 4, 32
FAULT_STEP = NUM_STEPS - 5


def problem_data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_BATCHES, BATCH, SIZES[0])).astype(np.float32)
  y = rng.integers(0, SIZES[-1], size=(NUM_BATCHES, BATCH)).astype(np.int32)
  keys = jax.random.split(jax.random.key(0), len(SIZES) - 1)
  params = {
    f"layer{i}": {
      "w": np.asarray(jax.random.normal(k, (a, b), jnp.float32)) / np.sqrt(a),
      "b": np.zeros((b,), np.float32),
    }
    for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
  }
  return params, x, y


def cross_entropy(params, x, y):
  for i in range(len(SIZES) - 1):
    x = x @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < len(SIZES) - 2:
      x = jnp.tanh(x)
  logp = jax.nn.log_softmax(x)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


HP = {
  "log_lr": np.full((NUM_STEPS,), np.log(0.2), np.float32),
  "log_l2": np.float32(-6.0),
  "log_scale": np.float32(0.0),
}


def val_loss(hp, params, batches, fault=None, **options):
  """Validation loss after ``NUM_STEPS`` steps; ``fault(p) -> scale`` perturbs the loss."""
  import revoptax

  def loss(p, hp, batch):
    value = cross_entropy(p, *batch) + jnp.exp(hp["log_l2"]) * sum(
      jnp.sum(w**2) for w in jax.tree.leaves(p)
    )
    if fault is not None:
      value = value + fault(p) * jnp.sum(p["layer0"]["b"]) * 1e-3
    return value

  p0 = jax.tree.map(lambda w: w * jnp.exp(hp["log_scale"]), params)
  trained = revoptax.train(
    loss,
    p0,
    hp,
    batches,
    num_steps=NUM_STEPS,
    learning_rate=lambda hp, t: jnp.exp(hp["log_lr"][t]),
    momentum=lambda hp, t: 0.9,
    **options,
  )
  return cross_entropy(trained, batches[0][0], batches[1][0])


def reference():
  """The hypergradients in this process on one device."""
  params, x, y = problem_data()
  grads = jax.jit(jax.grad(val_loss))(HP, params, (x, y))
  return jax.tree.map(np.asarray, grads)


def _fault_in(process: int, device):
  """``fault(p)``: a host callback on ``device`` (so in ``process``) that returns 1.0,
  except the next float above it at the backward recomputation of ``FAULT_STEP``."""
  calls = {"n": 0}
  # Forward calls are 1..T; the backward recomputation of step t is call 2T - t.
  perturbed_call = 2 * NUM_STEPS - FAULT_STEP

  def scale(_):
    calls["n"] += 1
    one = np.float32(1.0)
    if jax.process_index() == process and calls["n"] == perturbed_call:
      return np.nextafter(one, np.float32(2.0))
    return one

  def fault(p):
    return jax.pure_callback(
      scale,
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.lax.stop_gradient(p["layer0"]["b"]),
      sharding=jax.sharding.SingleDeviceSharding(device),
    )

  return fault


def main(process_id: int, num_processes: int, coordinator: str, out_dir: Path):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
  )
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Auto,))
  params, x, y = problem_data()

  def global_array(value, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  # Batches sharded over the minibatch axis; everything else replicated.
  batches = (global_array(x, P(None, "x")), global_array(y, P(None, "x")))
  hp = jax.tree.map(lambda v: global_array(np.asarray(v), P()), HP)
  replicated = jax.tree.map(lambda v: global_array(v, P()), params)
  specs = {
    "layer0": {"w": P(None, "x"), "b": P("x")},
    "layer1": {"w": P("x", None), "b": P(None)},
    "layer2": {"w": P(None, "x"), "b": P("x")},
  }
  is_spec = lambda s: isinstance(s, P)  # noqa: E731
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
  sharded = jax.tree.map(lambda v, s: global_array(v, s.spec), params, shardings)

  def hypergradient(params, **options):
    fn = jax.jit(
      lambda hp, p, b: jax.grad(val_loss)(hp, p, b, **options),
      out_shardings=NamedSharding(mesh, P()),
    )
    grads = jax.block_until_ready(fn(hp, params, batches))
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)).tolist(), grads)

  results = {}
  results["replicated"] = hypergradient(replicated)
  results["sharded"] = hypergradient(sharded, sharding=shardings)
  fault = _fault_in(1, jax.devices()[-1])
  try:
    hypergradient(replicated, fault=fault)
    results["fault_error"] = None
  except Exception as e:  # the ReversibilityError arrives inside a runtime error
    results["fault_error"] = str(e)[-2000:]
    try:  # the failed callback's error is also held by JAX's effect tokens
      jax.effects_barrier()
    except Exception:
      pass
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"process{process_id}.json").write_text(json.dumps(results))
  jax.experimental.multihost_utils.sync_global_devices("results written")
  print(f"process {process_id}: done", flush=True)
  # Skip JAX's exit hooks, which would report the fault run's callback error again.
  os._exit(0)


if __name__ == "__main__":
  # The launcher sets XLA_FLAGS=--xla_force_host_platform_device_count=2 (before JAX starts).
  pid, count, address, out = sys.argv[1:5]
  main(int(pid), int(count), address, Path(out))
