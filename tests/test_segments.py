"""``train(segment_steps=K)``: exact states stored every K steps, segments re-run to reverse them.

The segmented backward pass runs the same exact steps and the same float VJPs
in the same order as pure reversal, so its hypergradients are the same bits;
its buffer holds one segment, so memory falls where the buffer dominates; a
re-run that differs from the forward pass is reported.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cross_entropy, digits_data, init_mlp
from test_drift import perturbed_loss

import revoptax

NUM_STEPS = 12


def hypergradient(
  num_steps, segment_steps, rule=None, loss=None, jit=False, offload_buffer=False, **schedules
):
  """Gradients of the validation loss w.r.t. a per-step learning rate, a weight decay,
  an init scale and the training inputs, through ``num_steps`` steps."""
  xb, yb, xv, yv = digits_data(num_train=100, batch_size=25)
  params = init_mlp(jax.random.key(0), sizes=(64, 8, 10))

  def default_loss(p, hp, batch):
    l2 = sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    return cross_entropy(p, *batch) + jnp.exp(hp["log_l2"]) * l2

  def val_loss(hp, xb):
    p0 = jax.tree.map(lambda x: x * jnp.exp(hp["log_scale"]), params)
    trained = revoptax.train(
      default_loss if loss is None else loss,
      p0,
      hp,
      (xb, yb),
      num_steps=num_steps,
      rule=rule,
      segment_steps=segment_steps,
      offload_buffer=offload_buffer,
      learning_rate=lambda hp, t: jnp.exp(hp["log_lr"][t]),
      **schedules,
    )
    return cross_entropy(trained, xv, yv)

  hp = {
    "log_lr": jnp.full((num_steps,), jnp.log(0.05)),
    "log_l2": jnp.asarray(-5.0),
    "log_scale": jnp.asarray(0.0),
    "logit": jnp.asarray(1.0),
  }
  grad = jax.grad(val_loss, argnums=(0, 1))
  return (jax.jit(grad) if jit else grad)(hp, xb)


def assert_same_bits(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


SGD = dict(momentum=lambda hp, t: revoptax.momentum_above(0.5, hp["logit"]))


@pytest.mark.parametrize("segment_steps", [1, 4, 5, 11])
def test_momentum_sgd_hypergradients_are_the_bits_of_pure_reversal(segment_steps):
  # 12 steps in segments of 4 (three full), 5 (two and a last of 2), 11 (one and a last of 1).
  reference = hypergradient(NUM_STEPS, None, **SGD)
  assert_same_bits(hypergradient(NUM_STEPS, segment_steps, **SGD), reference)


def test_adamw_hypergradients_are_the_bits_of_pure_reversal():
  # AdamW also pops buffer bits when undoing the weights (the decay), at segment ends.
  rule = revoptax.AdamRule(decoupled_weight_decay=True, decay_ceiling=0.01)
  options = dict(
    rule=rule,
    b1=lambda hp, t: revoptax.momentum_above(0.5, hp["logit"]),
    weight_decay=lambda hp, t: 0.1,
  )
  reference = hypergradient(NUM_STEPS, None, jit=True, **options)
  assert_same_bits(hypergradient(NUM_STEPS, 5, jit=True, **options), reference)


@pytest.mark.parametrize("segment_steps", [4, 5])
def test_offloaded_buffer_gives_the_bits_of_pure_reversal(segment_steps):
  reference = hypergradient(NUM_STEPS, None, jit=True, **SGD)
  offloaded = hypergradient(NUM_STEPS, segment_steps, jit=True, offload_buffer=True, **SGD)
  assert_same_bits(offloaded, reference)


@pytest.mark.skipif(
  jax.default_backend() == "cpu",
  reason="XLA:CPU has one memory: JAX lowers no host placement inside jit there (measured: no "
  "annotation in the program), so the placement is checked on GPU/TPU (benchmarks/gpu.sh)",
)
def test_offloaded_rows_are_placed_in_host_memory():
  xb, yb, xv, yv = digits_data(num_train=100, batch_size=25)
  params = init_mlp(jax.random.key(0), sizes=(64, 8, 10))

  def val_loss(hp, offload):
    trained = revoptax.train(
      lambda p, hp, b: cross_entropy(p, *b),
      params,
      hp,
      (xb, yb),
      num_steps=NUM_STEPS,
      segment_steps=4,
      offload_buffer=offload,
      learning_rate=lambda hp, t: jnp.exp(hp),
      momentum=lambda hp, t: 0.9,
    )
    return cross_entropy(trained, xv, yv)

  def hlo(offload):
    return jax.jit(jax.grad(val_loss), static_argnums=1).lower(jnp.log(0.1), offload).as_text()

  # The transfers to and from the host memory space.
  assert "pinned_host" in hlo(True) and "pinned_host" not in hlo(False)


def test_offload_without_segments_is_refused():
  with pytest.raises(ValueError, match="pass segment_steps=K too"):
    hypergradient(NUM_STEPS, None, offload_buffer=True, **SGD)


@pytest.mark.slow
def test_buffer_holds_one_segment_so_memory_falls_where_the_buffer_dominates():
  # Momentum 0.5 costs 1 bit per parameter per step: at T = 8,000 the buffer
  # (about 250 rows of 32 bits per parameter) dwarfs what K = 1,000 keeps: 8
  # exact states (6 words per parameter each) and one segment's 32 rows.
  xb, yb, xv, yv = digits_data(num_train=200, batch_size=100)
  params = init_mlp(jax.random.key(0))

  def temp_bytes(segment_steps):
    def val_loss(hp):
      trained = revoptax.train(
        lambda p, hp, b: cross_entropy(p, *b),
        params,
        hp,
        (xb, yb),
        num_steps=8000,
        segment_steps=segment_steps,
        learning_rate=lambda hp, t: jnp.exp(hp["log_lr"]),
        momentum=lambda hp, t: 0.5,
      )
      return cross_entropy(trained, xv, yv)

    compiled = jax.jit(jax.grad(val_loss)).lower({"log_lr": jnp.log(0.01)}).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, segmented = temp_bytes(None), temp_bytes(1000)
  assert segmented < 0.5 * whole, (segmented, whole)  # measured 3.4 MB against 7.7 MB


def test_a_re_run_that_differs_from_the_forward_pass_is_reported():
  # Calls: forward 1..12; the last segment (steps 8..11) reversed: 13..16; the
  # segment of steps 4..7 re-run: 17..20, so call 18 is step 5's re-run.
  loss, _ = perturbed_loss(perturb_call=18)
  with pytest.raises(Exception) as info:
    jax.block_until_ready(hypergradient(NUM_STEPS, 4, loss=loss, **SGD))
  message = str(info.value)
  found = re.search(r"at step (\d+) the gradient|segment that starts at step (\d+)", message)
  assert found, message
  assert "at step 5 the gradient" in message, message


def test_unperturbed_callback_loss_passes():
  loss, calls = perturbed_loss(perturb_call=-1)
  grads = hypergradient(NUM_STEPS, 4, loss=loss, **SGD)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
  # Forward 12 calls, backward 12 recomputations and 8 re-run steps.
  assert calls["n"] == 12 + 12 + 8


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_segment_steps_are_refused(bad):
  with pytest.raises(ValueError, match="segment_steps must be a positive int"):
    revoptax.train(
      lambda p, hp, b: jnp.sum((p - b) ** 2),
      jnp.zeros(2),
      {},
      jnp.ones((1, 2)),
      num_steps=4,
      segment_steps=bad,
      learning_rate=lambda hp, t: 0.1,
      momentum=lambda hp, t: 0.9,
    )
