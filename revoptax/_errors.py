"""Clear errors from inside ``jit``, ``vmap`` and ``custom_vjp`` code.

Checks produce boolean flags (or first-failing-step indices) as arrays.  When
the flags are concrete they are checked in Python; when traced they are sent
to the host, under ``lax.cond`` so only when a check failed, by a callback that
raises there.  Under ``jit`` JAX re-raises the callback's exception as a
runtime error whose message contains the revoptax message below.

Two kinds of callback: :func:`jax.debug.callback` (a side effect, kept
wherever it is traced), or with ``token=True`` a :func:`jax.pure_callback`
whose zero result the caller folds into an output.  The second keeps the
computation free of effects, which matters for per-step calls such as an
Optax ``update``: a ``jit`` function with an effect loses JAX's C++ dispatch
path, even when the callback is never taken.  Either kind still makes XLA:CPU run the
program synchronously: the call returns when the program is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class ReversibilityError(ValueError):
  """Exact reversal cannot be guaranteed; the message names the step, leaf and fix."""


_NONDETERMINISM_CAUSES = (
  "Causes: nondeterministic GPU kernels (set XLA_FLAGS=--xla_gpu_deterministic_ops=true), vmap "
  "or sharding applied to only one pass, stateful randomness or host callbacks in loss_fn (use "
  "the key option, which replays fold_in(key, step))"
)

MESSAGES = {
  "momentum": (
    "momentum of leaf {leaf} at step {step} is outside (0, 1) or not finite; it must lie "
    "strictly between 0 and 1. {momentum_fix}"
  ),
  "learning_rate": (
    "learning_rate of leaf {leaf} at step {step} is not positive or not finite. {learning_rate_fix}"
  ),
  "momentum_floor": (
    "momentum of leaf {leaf} at step {step} is below the momentum floor the information "
    "buffer was sized for, so the buffer would run out. {floor_fix}"
  ),
  "b1": (
    "b1 of leaf {leaf} at step {step} is outside [0.5, 1) or not finite. If it is learned, "
    "parametrize it to stay inside, e.g. b1=lambda hp, t: revoptax.momentum_above(0.5, hp['b1'])."
  ),
  "b2": (
    "b2 of leaf {leaf} at step {step} is outside [0.5, 1) or not finite. If it is learned, "
    "parametrize it to stay inside, e.g. b2=lambda hp, t: revoptax.momentum_above(0.9, hp['b2'])."
  ),
  "decay": (
    "decay of leaf {leaf} at step {step} is outside [0.5, 1) or not finite. If it is learned, "
    "parametrize it to stay inside, e.g. revoptax.momentum_above(0.5, hp['decay'])."
  ),
  "momentum_rate": (
    "momentum of leaf {leaf} at step {step} is outside [0.5, 1) or not finite. If it is "
    "learned, parametrize it to stay inside, e.g. revoptax.momentum_above(0.5, hp['momentum'])."
  ),
  "b1_floor": (
    "b1 of leaf {leaf} at step {step} is below the b1_floor the information buffer was sized "
    "for, so the buffer would run out. Keep it above by construction (revoptax.momentum_above) "
    "or lower the rule's b1_floor."
  ),
  "b2_floor": (
    "b2 of leaf {leaf} at step {step} is below the b2_floor the information buffer was sized "
    "for, so the buffer would run out. Keep it above by construction (revoptax.momentum_above) "
    "or lower the rule's b2_floor."
  ),
  "decay_floor": (
    "decay of leaf {leaf} at step {step} is below the decay_floor the information buffer was "
    "sized for, so the buffer would run out. Keep it above by construction "
    "(revoptax.momentum_above) or lower the rule's decay_floor."
  ),
  "eps": "eps of leaf {leaf} at step {step} is negative or not finite; it must be >= 0.",
  "eps_root": "eps_root of leaf {leaf} at step {step} is negative or not finite; it must be >= 0.",
  "weight_decay": (
    "weight_decay of leaf {leaf} at step {step} is negative or not finite, or learning_rate * "
    "weight_decay exceeds 0.5 (the decay multiplies the weights by 1 - learning_rate * "
    "weight_decay, which must stay in [0.5, 1])."
  ),
  "decay_ceiling": (
    "learning_rate * weight_decay of leaf {leaf} at step {step} is above the decay_ceiling the "
    "information buffer was sized for, so the buffer would run out. Raise the rule's "
    "decay_ceiling, or bound the learned values by construction."
  ),
  "nonfinite": (
    "the training gradient of leaf {leaf} is not finite at step {step}. Check loss_fn for "
    "NaN/inf, lower the learning rate, or clip gradients inside loss_fn."
  ),
  "range": (
    "fixed-point overflow in leaf {leaf} at step {step}: a weight, velocity or update left "
    "the range |x| < 2**int_bits. Training is diverging (lower the learning rate), or the "
    "values need a wider range: raise int_bits (radix_bits + int_bits <= 62)."
  ),
  "buffer": (
    "information buffer capacity exceeded for leaf {leaf} at step {step}. The capacity is "
    "static: {buffer_fix}"
  ),
  "param_log": (
    "the param log of leaf {leaf} is full at step {step}. The log keeps the elements where the "
    "params passed to update differ from the optimizer's exact weights rounded to float: where "
    "optax.apply_updates cannot reach them by float addition (a weight shrinking past its "
    "update, as when it crosses zero), and every element changed outside the optimizer. Raise "
    "param_log_capacity (entries per leaf; the default holds 1 in 32 element updates), or "
    "change the params only through the optimizer's updates."
  ),
  "max_steps": (
    "update of leaf {leaf} at step {step} is past max_steps: the buffer and the fingerprints "
    "hold max_steps updates. Raise max_steps."
  ),
  "inverse_hyperparameters": (
    "the hyperparameters of leaf {leaf} that inverse evaluates for step {step} differ from "
    "those update used at that step: undo each update with the same transformation and "
    "hyperparameters (the same schedules, the same injected values) that made it."
  ),
  "drift": (
    "nondeterministic gradient detected: at step {step} the gradient of leaf {leaf} "
    "recomputed in the backward pass differs from the forward pass, so the reversal would "
    "give a wrong hypergradient. "
    + _NONDETERMINISM_CAUSES
    + ", or the gradient compiled differently in the two passes (wrap it in revoptax.isolated "
    "in both)."
  ),
  "drift_step": (
    "nondeterministic gradient detected: at step {step} the gradient recomputed in the "
    "backward pass differs from the forward pass, so the reversal would give a wrong "
    "hypergradient. " + _NONDETERMINISM_CAUSES + ", or a loss whose compiled gradient depends "
    "on its surroundings."
  ),
  "hyper_drift": (
    "the hyperparameter values recomputed at step {step} in the backward pass differ from the "
    "ones the forward pass used, so the reversal would give a wrong hypergradient. Each "
    "schedule must be a deterministic function of (hparams, t): no host state, no random "
    "numbers drawn without a key, no values that change between the passes."
  ),
  "buffer_corrupt": (
    "the information buffer after undoing step {step} differs from the one the "
    "forward pass left before that step, while the gradient recomputed there was unchanged: "
    "buffer contents were lost or altered between the passes (a state or residual modified "
    "outside revoptax, or a revoptax bug: please report it). The reversal cannot be trusted."
  ),
  "segment_start": (
    "reversing the segment that starts at step {step} did not end at the exact state stored "
    "there (leaf {leaf}), although every per-step check passed: the forward pass re-run from "
    "that checkpoint differed from the first one, or the checkpoint was altered between the "
    "passes. " + _NONDETERMINISM_CAUSES + "."
  ),
  "initial": (
    "the reversal did not end at the initial exact state (leaf {leaf}); the hypergradient "
    "is not trustworthy. Every per-step check passed, so the state was altered between the "
    "passes outside the gradient (a residual modified, or a revoptax bug: please report it)."
  ),
}

# What to change, in the options of the API that raised (filled into MESSAGES).
_FIXES = {
  "revoptax.train": {
    "momentum_fix": (
      "If it is learned, parametrize it to stay inside, e.g. "
      "momentum=lambda hp, t: jax.nn.sigmoid(hp['logit_momentum'][t])."
    ),
    "learning_rate_fix": (
      "If it is learned, parametrize it to stay positive, e.g. "
      "learning_rate=lambda hp, t: jnp.exp(hp['log_lr'][t])."
    ),
    "buffer_fix": (
      "with traced (learned) momenta it is sized for the rule's momentum_floor (0.5 unless "
      "given): pass rule=revoptax.MomentumSGDRule(momentum_floor=...) with the smallest "
      "momentum the schedule will use, or buffer_rows."
    ),
    "floor_fix": (
      "Keep a learned momentum above the floor by construction, e.g. momentum=lambda hp, t: "
      "revoptax.momentum_above(0.5, hp['momentum_logit']) with "
      "rule=revoptax.MomentumSGDRule(momentum_floor=0.5), or lower momentum_floor."
    ),
  },
  "revoptax.reversible_sgd": {
    "momentum_fix": "Check the momentum value or schedule passed to reversible_sgd.",
    "learning_rate_fix": "Check the learning_rate value or schedule passed to reversible_sgd.",
    "buffer_fix": (
      "it holds max_steps steps at the momenta given (momentum_floor for schedules that cannot "
      "be evaluated ahead): raise max_steps if more updates are run, or lower momentum_floor."
    ),
    "floor_fix": (
      "Lower momentum_floor to the smallest momentum the schedule or injected value will use."
    ),
  },
}


def _first_failure(codes: dict[str, np.ndarray], leaf_names: Sequence[str], step_offset: int):
  """The first (category, leaf, step) with a failure; ``codes`` hold steps or -1."""
  for category, values in codes.items():
    values = np.asarray(values)
    bad = np.argwhere(values >= 0) if values.dtype != np.bool_ else np.argwhere(values)
    if bad.size:
      index = tuple(bad[0])
      leaf = leaf_names[index[-1]] if leaf_names else "?"
      step = int(values[index]) if values.dtype != np.bool_ else step_offset
      return category, leaf, step
  return None


def raise_on_failure(
  codes: dict[str, jax.Array],
  leaf_names: Sequence[str],
  api: str,
  step=None,
  on_failure: Callable[[str], None] | None = None,
  token: bool = False,
):
  """Raise :class:`ReversibilityError` if any code reports a failure.

  Args:
    codes: category -> array whose last axis runs over leaves; either booleans
      (True = failed at ``step``) or int32 steps (>= 0 = first failing step).
    leaf_names: pytree paths of the leaves, for the message.
    api: the public function to name in the message.
    step: the step for boolean codes (may be traced).
    on_failure: called with the message instead of raising (used for warnings).
    token: check with an effect-free callback and return its result (see
      :func:`_check_on_host`).

  Returns:
    With ``token=True``, ``int32`` zeros to fold into an output; else None.
  """
  if not codes:
    return jnp.zeros((), jnp.int32) if token else None
  names = tuple(leaf_names)

  def host(step_value, *values):
    found = _first_failure(dict(zip(codes, values)), names, int(np.asarray(step_value).max()))
    if found is None:
      return
    category, leaf, bad_step = found
    message = _message(api, category, leaf, bad_step)
    if on_failure is not None:
      on_failure(message)
    else:
      raise ReversibilityError(message)

  step = jnp.asarray(-1 if step is None else step)
  values = list(codes.values())

  def failed():
    any_failed = jnp.zeros((), bool)
    for x in values:
      any_failed = any_failed | (jnp.any(x) if x.dtype == jnp.bool_ else jnp.any(x >= 0))
    return any_failed

  return _check_on_host(host, failed, step, *values, token=token)


def _message(api: str, category: str, leaf: str, step: int) -> str:
  base = "revoptax.train" if api.startswith("revoptax.train") else "revoptax.reversible_sgd"
  fixes = _FIXES[base]
  return f"{api}: " + MESSAGES[category].format(leaf=leaf, step=step, **fixes)


def _check_on_host(host, failed, *values, token: bool = False):
  """Run ``host(*values)`` now if the values are concrete; under a trace, run it
  on the host, under ``lax.cond``, only when ``failed()``.

  ``host`` must return nothing and must accept values with leading batch axes
  (under ``vmap`` the condition becomes a select, so it runs every time).
  Without ``token`` the callback is :func:`jax.debug.callback`.  With it, the
  callback is :func:`jax.pure_callback` returning ``int32`` zeros shaped like
  ``values[0]`` (the step), which this function returns: fold it into an
  output (``error + token``), or JAX removes the unused callback.
  """
  if not any(isinstance(x, jax.core.Tracer) for x in values):
    host(*(np.asarray(x) for x in values))
    return jnp.zeros((), jnp.int32) if token else None
  if not token:
    # partitioned: every device (so every process) runs the check on its copy of the codes.
    jax.lax.cond(
      failed(), lambda: jax.debug.callback(host, *values, partitioned=True), lambda: None
    )
    return None
  first = jnp.asarray(values[0], jnp.int32)

  def pure(*args):
    host(*args)
    return np.zeros(np.shape(args[0]), np.int32)

  def call():
    result = jax.ShapeDtypeStruct(first.shape, jnp.int32)
    return jax.pure_callback(pure, result, first, *values[1:], vmap_method="broadcast_all")

  return jax.lax.cond(failed(), call, lambda: jnp.zeros_like(first))


CATEGORIES = tuple(MESSAGES)


def failure_code(codes: dict[str, jax.Array], step) -> jax.Array:
  """``int32[3]``: (category index, step, leaf) of the first failure in ``codes``, else -1s.

  ``codes`` maps categories to ``bool[leaves]`` (True = failed at ``step``);
  works on traced values, with no host callback.
  """
  flags = jnp.stack([jnp.asarray(codes[k], bool) for k in codes])
  categories = jnp.asarray([CATEGORIES.index(k) for k in codes], jnp.int32)
  per_category = jnp.any(flags, axis=1)
  first = jnp.argmax(per_category)
  code = jnp.stack(
    [categories[first], jnp.asarray(step, jnp.int32), jnp.argmax(flags[first]).astype(jnp.int32)]
  )
  return jnp.where(jnp.any(per_category), code, -1).astype(jnp.int32)


def raise_recorded(code, leaf_names: Sequence[str], api: str, token: bool = False):
  """Raise :class:`ReversibilityError` for a :func:`failure_code` that records a failure.

  ``token`` as in :func:`raise_on_failure`.
  """
  names = tuple(leaf_names)

  def host(code):
    for category, step, leaf in np.asarray(code).reshape(-1, 3).tolist():
      if category >= 0:
        raise ReversibilityError(_message(api, CATEGORIES[category], names[leaf], step))

  step = jnp.asarray(code)[..., 1]
  return _check_on_host(lambda _, code: host(code), lambda: code[0] >= 0, step, code, token=token)
