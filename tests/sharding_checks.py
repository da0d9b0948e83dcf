"""Sharded params: run by test_sharding.py in a subprocess with 8 host devices (and by
benchmarks/gpu.sh on a GPU machine's devices).

Kept out of the main process, whose JAX has one CPU device.  Not collected on
its own (the file name does not start with test_).

A 64-256-256-16 MLP (86,544 params) whose weight matrices are sharded over 8
devices (tensor-parallel columns, FSDP rows; every size divides by 8, 4 and
2): the hypergradient equals the one computed on one device within float
tolerance (the sharded gradient sums in another order), and the exact state
and the buffer follow each leaf's sharding, so the per-device XLA memory of
the hypergradient falls.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import revoptax

# 8 devices (the forced host platform of test_sharding.py), or all of a GPU machine's (up to 8).
NUM_DEVICES = max([n for n in (8, 4, 2) if n <= jax.device_count()], default=1)
pytestmark = pytest.mark.skipif(NUM_DEVICES < 2, reason="needs 2 or more devices")

SIZES = (64, 256, 256, 16)
NUM_STEPS = 200
# Observed 1e-6 (the sharded matmuls and batch means sum in another order).
RTOL = 1e-4


def init_params():
  keys = jax.random.split(jax.random.key(0), len(SIZES) - 1)
  return {
    f"layer{i}": {
      "w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
      "b": jnp.zeros((b,), jnp.float32),
    }
    for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
  }


def data():
  x = jax.random.normal(jax.random.key(1), (4, 32, SIZES[0]), jnp.float32)
  y = jax.random.randint(jax.random.key(2), (4, 32), 0, SIZES[-1])
  return x, y


def mlp(params, x, gather=lambda w: w):
  for i in range(len(SIZES) - 1):
    layer = params[f"layer{i}"]
    x = x @ gather(layer["w"]) + gather(layer["b"])
    if i < len(SIZES) - 2:
      x = jnp.tanh(x)
  return x


def cross_entropy(params, x, y, gather=lambda w: w):
  logp = jax.nn.log_softmax(mlp(params, x, gather))
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def val_loss(hp, params, gather=lambda w: w, **options):
  x, y = data()

  def loss(p, hp, batch):
    return cross_entropy(p, *batch, gather) + jnp.exp(hp["log_l2"]) * sum(
      jnp.sum(gather(w) ** 2) for w in jax.tree.leaves(p)
    )

  p0 = jax.tree.map(lambda w: w * jnp.exp(hp["log_scale"]), params)
  trained = revoptax.train(
    loss,
    p0,
    hp,
    (x, y),
    num_steps=NUM_STEPS,
    learning_rate=lambda hp, t: jnp.exp(hp["log_lr"]),
    momentum=lambda hp, t: 0.9,
    **options,
  )
  return cross_entropy(trained, x[0], y[0], gather)


HP = {"log_lr": jnp.log(0.1), "log_l2": jnp.asarray(-6.0), "log_scale": jnp.asarray(0.0)}
# Tensor-parallel columns for the first and last layers, FSDP rows for the middle one.
SPECS = {
  "layer0": {"w": P(None, "x"), "b": P("x")},
  "layer1": {"w": P("x", None), "b": P(None)},
  "layer2": {"w": P(None, "x"), "b": P("x")},
}


def shardings(mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS, is_leaf=lambda s: isinstance(s, P))


def memory_bound(at_8: float) -> float:
  """The bound on per-device memory relative to one device's, ``at_8`` for 8 devices."""
  return min(1.0, at_8 * 8 / NUM_DEVICES)


def assert_close(a, b, rtol=RTOL):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.max(np.abs(x - y)) <= rtol * np.max(np.abs(y)), (x, y)


@pytest.fixture(scope="module")
def one_device():
  grad = jax.jit(jax.grad(val_loss))
  params = init_params()
  temp = grad.lower(HP, params).compile().memory_analysis().temp_size_in_bytes
  return grad(HP, params), temp


def test_automatic_axes_shard_the_exact_state_given_the_sharding(one_device):
  reference, temp_one = one_device
  mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(AxisType.Auto,))
  params = jax.device_put(init_params(), shardings(mesh))
  grad = jax.jit(jax.grad(partial(val_loss, sharding=shardings(mesh))))
  temp = grad.lower(HP, params).compile().memory_analysis().temp_size_in_bytes
  # The reversal ended at the initial exact state (checked inside, bit for bit).
  assert_close(grad(HP, params), reference)
  # Measured on 8 devices: 1.39 MB against 7.31 MB on one device.
  assert temp < memory_bound(0.3) * temp_one, (temp, temp_one)
  print(f"automatic axes: temp per device {temp} bytes, one device {temp_one}")


def test_explicit_axes_are_read_from_the_leaves_under_jit(one_device):
  # FSDP: every weight sharded over its first axis, gathered where it is used.
  reference, temp_one = one_device
  mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(AxisType.Explicit,))
  fsdp = jax.tree.map(lambda w: NamedSharding(mesh, P("x")), init_params())
  params = jax.device_put(init_params(), fsdp)

  def gather(w):
    return jax.sharding.reshard(w, P())

  with jax.set_mesh(mesh):
    grad = jax.jit(jax.grad(partial(val_loss, gather=gather)))
    temp = grad.lower(HP, params).compile().memory_analysis().temp_size_in_bytes
    grads = grad(HP, params)
  assert_close(grads, reference)
  assert temp < memory_bound(0.5) * temp_one, (temp, temp_one)  # 8 devices: 2.35 MB
  print(f"explicit axes (FSDP): temp per device {temp} bytes, one device {temp_one}")


def test_segments_of_a_sharded_run_give_the_same_hypergradient(one_device):
  reference, _ = one_device
  mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(AxisType.Auto,))
  params = jax.device_put(init_params(), shardings(mesh))
  options = dict(sharding=shardings(mesh), segment_steps=64)
  grads = jax.jit(jax.grad(partial(val_loss, **options)))(HP, params)
  assert_close(grads, reference)


def test_a_sharding_of_the_wrong_structure_is_refused():
  mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(AxisType.Auto,))
  with pytest.raises(ValueError, match="sharding must have the structure of params"):
    val_loss(HP, init_params(), sharding={"layer0": NamedSharding(mesh, P())})
