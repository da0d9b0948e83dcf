"""``revoptax.train_module``: :func:`revoptax.train` for Flax NNX modules.

The module is split into the variables trained (``wrt``, default
``nnx.Param``), its random-number streams (``nnx.RngState``) and the rest.
Only the trained variables go through the reversible loop; the rest travels
with the hyperparameters (so whatever the module was built from stays
differentiable), and the streams are replayed from per-step keys, so dropout
draws the same masks in the backward pass as in the forward pass.  A loss that
changes any other variable (BatchNorm statistics, counters) cannot be
reversed and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx

from revoptax._sgd import MomentumSGDRule
from revoptax._train import train

API = "revoptax.train_module"


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key)


def _replayed_streams(rng_state, key_t):
  """Every stream's key set to ``fold_in(key_t, i)`` (``i``: its position), counts to zero."""
  leaves, treedef = jax.tree.flatten(rng_state)
  keys = iter(range(len(leaves)))
  fresh = [
    jax.random.fold_in(key_t, next(keys)) if _is_key(x) else jnp.zeros_like(x) for x in leaves
  ]
  return treedef.unflatten(fresh)


def _refusal(what: str) -> ValueError:
  return ValueError(
    f"{API}: loss_fn changes {what}, which is not trained (not selected by wrt) and is "
    "not an nnx.Rngs stream. Training cannot be reversed through "
    "such updates (for example BatchNorm batch statistics): run those layers in inference "
    "mode inside loss_fn (model.eval(), or nnx.BatchNorm(..., use_running_average=True)), "
    "or keep the mutable state out of the module passed to train_module."
  )


def _check_unchanged(before, after):
  """Refuse a loss that changed a variable that is neither trained nor an RNG stream."""
  for (path, old), new in zip(
    jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after)
  ):
    if new is not old:
      raise _refusal(f"the module variable {jax.tree_util.keystr(path)}")


def _on_hparams(fn):
  """A schedule of the user's hparams as one of ``(hparams, streams, others)``."""
  if not callable(fn):
    return fn  # train reports it
  return lambda hp, t: fn(hp[0], t)


def train_module(
  loss_fn: Callable,
  model: nnx.Module,
  hparams,
  batches,
  *,
  num_steps: int,
  wrt: Any = nnx.Param,
  key=None,
  rule=None,
  **options,
) -> nnx.Module:
  r"""Train the ``wrt`` variables of an NNX module with :func:`revoptax.train`.

  The same update and contract as :func:`revoptax.train`, with
  ``loss_fn(model, hparams, batch) -> scalar`` taking the module.  Returns a
  new module (the input is not modified) holding the trained variables;
  ``jax.grad`` through it gives gradients with respect to ``hparams``, the
  training data and everything the module was built from.

  Randomness: at step ``t`` each ``nnx.Rngs`` stream of the module restarts
  from the key ``fold_in(fold_in(key, t), i)`` (``i``: the stream's position
  in the module's state) with its count at zero, in both passes, so dropout
  and other random layers replay exactly.

  Args:
    loss_fn: ``loss_fn(model, hparams, batch) -> scalar``.  It may draw
      random numbers from the module's streams; it must not change other
      variables that are not trained (BatchNorm statistics: use inference
      mode), which raises ``ValueError``.
    model: the ``nnx.Module`` to train (not modified).
    hparams, batches, num_steps, rule: as for :func:`revoptax.train`.
    wrt: the variables trained, an ``nnx`` filter (default ``nnx.Param``, as
      ``nnx.Optimizer``).
    key: PRNG key for the streams; default: the module's first stream key
      (so ``nnx.Rngs(dropout=seed)`` seeds them).
    **options: the rule's hyperparameter schedules (``learning_rate``,
      ``momentum`` for momentum SGD), each ``(hparams, t) -> value`` as for
      :func:`revoptax.train`, where a pytree value is a prefix of the trained
      variables as a pure dict (``nnx.to_pure_dict``), e.g. ``{"l1": 0.1,
      "l2": 0.05}`` for one value per layer; and the other options of
      :func:`revoptax.train`.

  Returns:
    The trained module (``return_state=True``: ``(module, state)``, the
    optimizer state as pure dicts).

  Example:
    >>> import jax, jax.numpy as jnp, revoptax
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((1, 4, 2))
    >>> loss = lambda m, hp, b: jnp.mean((m(b) - 1.0) ** 2)
    >>> def val_loss(log_lr):
    ...   trained = revoptax.train_module(loss, model, log_lr, x, num_steps=20,
    ...                                   learning_rate=lambda h, t: jnp.exp(h),
    ...                                   momentum=lambda h, t: 0.9)
    ...   return loss(trained, None, x[0])
    >>> bool(jax.grad(val_loss)(jnp.log(0.01)) < 0)  # a larger learning rate helps
    True

  References:
    Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
    through Reversible Learning", ICML 2015, https://arxiv.org/abs/1502.03492
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{API}: model must be an nnx.Module, got {type(model).__name__}.")
  graphdef, trained, rng_state, rest = nnx.split(model, wrt, nnx.RngState, ...)
  if not jax.tree.leaves(trained):
    raise ValueError(f"{API}: the filter wrt={wrt!r} selects no variables of the model.")
  has_streams = bool(jax.tree.leaves(rng_state))
  if key is None and has_streams:
    key = next(x for x in jax.tree.leaves(rng_state) if _is_key(x))

  def as_state(params):
    state = jax.tree.map(lambda x: x, trained)  # a fresh State, filled from the pure dict
    nnx.replace_by_pure_dict(state, params)
    return state

  def inner_loss(params, hp_and_state, batch, *key_t):
    hp, streams, others = hp_and_state
    if key_t:
      streams = _replayed_streams(streams, key_t[0])
    module = nnx.merge(graphdef, as_state(params), streams, others)
    try:
      value = loss_fn(module, hp, batch)
    except flax_errors.TraceContextError as e:  # flax refuses the update itself
      raise _refusal(f"a module variable (flax: {e})") from None
    _, _, _, after = nnx.split(module, wrt, nnx.RngState, ...)
    _check_unchanged(others, after)
    return value

  rule = MomentumSGDRule() if rule is None else rule
  schedules = {
    name: _on_hparams(fn) for name, fn in options.items() if name in rule.hyperparameters
  }
  others = {name: v for name, v in options.items() if name not in rule.hyperparameters}
  out = train(
    inner_loss,
    nnx.to_pure_dict(trained),
    (hparams, rng_state, rest),
    batches,
    num_steps=num_steps,
    rule=rule,
    key=key if has_streams else None,
    **schedules,
    **others,
  )
  if options.get("return_state"):
    params, state = out
    return nnx.merge(graphdef, as_state(params), rng_state, rest), state
  return nnx.merge(graphdef, as_state(out), rng_state, rest)
