"""Hyperparameter specs: per-leaf broadcast, per-step evaluation, checks and buffer capacity.

Two forms, one per entry point:

* :func:`revoptax.train` takes, for each hyperparameter of the rule, a
  function ``(hparams, t) -> value``; the Optax factories take a value, an
  array or an Optax schedule ``step -> value``.
* In both, a value is a scalar, an array broadcastable to every leaf, or a
  pytree that is a prefix of the params (one value per layer, or per leaf).

Values are evaluated at step ``t`` inside the loops (never as ``[T, ...]``
arrays): :class:`Schedules` is the static description of ``train``'s
schedules (which leaves share a value, which values are scalars), and
:meth:`Schedules.at` evaluates them.  Concrete schedules (not depending on
traced values) are also evaluated ahead, in chunks of steps, on the host,
to check them before the run and to size the buffer exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from revoptax import _buffer as buffer_lib
from revoptax._static import FunctionKey

# Steps evaluated at once when a concrete schedule is evaluated ahead.
_CHUNK_STEPS = 1024


def leaf_names(params) -> list[str]:
  """The leaves' paths (``jax.tree_util.keystr``); a bare array is named ``<params>``."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [jax.tree_util.keystr(path) or "<params>" for path in paths]


class _Box:
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value


def _is_single(x) -> bool:
  return callable(x) or isinstance(x, (int, float, np.ndarray, jax.Array, np.generic))


def per_leaf(spec, params) -> list:
  """One value per params leaf: ``spec`` is one value for all, or a prefix tree of params.

  Callables, scalars and arrays are single values.  Raises ``ValueError`` when
  a pytree ``spec`` is not a prefix of ``params``.
  """
  if _is_single(spec):
    return [spec] * len(jax.tree.leaves(params))
  boxed = jax.tree.map(lambda s, p: jax.tree.map(lambda _: _Box(s), p), spec, params)
  return [b.value for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]


def distinct(values: Sequence[Any]) -> tuple[list, tuple[int, ...]]:
  """Distinct objects of ``values`` (Python numbers by value, others by identity) and the
  index of each value among them."""
  index: dict = {}
  firsts = []
  out = []
  for v in values:
    key = ("value", v) if isinstance(v, (int, float)) else ("id", id(v))
    if key not in index:
      index[key] = len(firsts)
      firsts.append(v)
    out.append(index[key])
  return firsts, tuple(out)


def as_float(x):
  """``x`` as an array of a float dtype (integers become JAX's default float)."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


@dataclasses.dataclass(frozen=True)
class Schedules:
  """``train``'s hyperparameter schedules, with the static facts the loops need.

  Attributes:
    names: the rule's hyperparameter names.
    fns: per name, ``(hparams, t) -> value`` (keyed by value, see :mod:`revoptax._static`).
    index: per name, per params leaf, the index of the leaf's value among the
      name's distinct values at a step (leaves given one value share it).
    shapes: per name, per distinct value, its shape.
    params_treedef: the structure of the params the values are a prefix of.
  """

  names: tuple[str, ...]
  fns: tuple[FunctionKey, ...]
  index: tuple[tuple[int, ...], ...]
  shapes: tuple[tuple[tuple[int, ...], ...], ...]
  params_treedef: Any

  def at(self, hparams, t) -> tuple[list[jax.Array], ...]:
    """Per name, the distinct values at step ``t`` (float arrays)."""
    return tuple(self.at_name(name, hparams, t) for name in self.names)

  def at_name(self, name: str, hparams, t) -> list[jax.Array]:
    """The distinct values of one hyperparameter at step ``t``."""
    k = self.names.index(name)
    template = self.params_treedef.unflatten([0] * self.params_treedef.num_leaves)
    firsts, _ = distinct(per_leaf(self.fns[k](hparams, t), template))
    return [as_float(v) for v in firsts]

  def group_values(self, values, hyper: tuple[int, ...]) -> dict[str, jax.Array]:
    """``{name: value}`` of a group whose value indices are ``hyper``, from :meth:`at`."""
    return {n: v[i] for n, v, i in zip(self.names, values, hyper)}

  def is_scalar(self, leaf: int) -> bool:
    """Whether every hyperparameter of the leaf is one value per step."""
    return all(s[i[leaf]] == () for s, i in zip(self.shapes, self.index))


def train_schedules(fns: Mapping[str, Callable], names, hparams, params, api) -> Schedules:
  """:class:`Schedules` for ``train``, checked against the params' leaf shapes.

  Each schedule is evaluated once at ``t = 0`` (abstractly, with
  ``jax.eval_shape`` where possible) to learn which leaves share a value.
  """
  leaves, treedef = jax.tree.flatten(params)
  leaf_label = leaf_names(params)
  template = treedef.unflatten([0] * len(leaves))
  indices, shapes = [], []
  for name in names:
    fn = fns[name]
    try:
      values = per_leaf(fn(hparams, jnp.zeros((), jnp.int32)), template)
    except ValueError as e:
      raise ValueError(
        f"{api}: {name}(hparams, t) must return a scalar or a pytree matching params; {e}"
      ) from None
    firsts, index = distinct(values)
    value_shapes = tuple(tuple(np.shape(v)) for v in firsts)
    for leaf, label, i in zip(leaves, leaf_label, index):
      shape = value_shapes[i]
      try:
        np.broadcast_shapes(shape, np.shape(leaf))
        too_many = len(shape) > np.ndim(leaf)
      except ValueError:
        too_many = True
      if too_many:
        raise ValueError(
          f"{api}: {name}(hparams, t) for leaf {label} has shape {shape}, which does not "
          f"broadcast to the leaf's shape {np.shape(leaf)}."
        )
    indices.append(index)
    shapes.append(value_shapes)
  return Schedules(
    names=tuple(names),
    fns=tuple(FunctionKey(fns[n]) for n in names),
    index=tuple(indices),
    shapes=tuple(shapes),
    params_treedef=treedef,
  )


def concrete_chunks(fn: Callable, num_steps: int) -> Iterator[Any] | None:
  """``fn(ts)`` for chunks ``ts`` of ``0 .. num_steps - 1`` as NumPy, or None if traced.

  ``fn`` maps a vector of steps to a pytree of ``[len(ts), ...]`` values.
  Evaluated with ``jax.ensure_compile_time_eval``, so a schedule that does not
  depend on traced values is concrete even under ``jit``.
  """

  def chunk(start):
    ts = np.arange(start, min(start + _CHUNK_STEPS, num_steps), dtype=np.int32)
    with jax.ensure_compile_time_eval():
      try:
        values = fn(ts)
      except jax.errors.ConcretizationTypeError:
        return None
      leaves = jax.tree.leaves(values)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return None
    return jax.tree.map(np.asarray, values)

  first = chunk(0)
  if first is None:
    return None

  def chunks():
    yield first
    for start in range(_CHUNK_STEPS, num_steps, _CHUNK_STEPS):
      yield chunk(start)

  return chunks()


def plan(
  rule,
  per_steps: Mapping[str, Callable],
  combos,
  num_steps: int,
  api: str,
  segment_steps: int | None = None,
):
  """Check concrete hyperparameters and size the buffer of each combination of values.

  Args:
    rule: the :class:`revoptax.ReversibleRule`.
    per_steps: per hyperparameter, ``ts -> list`` of its distinct values at
      steps ``ts``, each ``[len(ts), ...]``.
    combos: the combinations to size, each ``{name: index of the value}``.
    num_steps: steps the buffer must hold.
    api: the public function, for messages.
    segment_steps: if given, the buffer holds one segment of this many
      consecutive steps (emptied at each segment's start, see
      :func:`segment_capacity`), so it is sized for the costliest window of
      that length.

  Returns:
    ``(rows, learned)``: buffer rows per combination, and per hyperparameter
    whether its values are traced (so the rule's floor sizes the buffer and
    the step checks it on device).

  Raises:
    ValueError: a concrete value the rule cannot use, naming the step.
  """
  chunks = dict.fromkeys(rule.hyperparameters)  # a name not given counts as learned
  chunks.update({k: concrete_chunks(fn, num_steps) for k, fn in per_steps.items()})
  learned = {k: it is None for k, it in chunks.items()}
  means = [[] for _ in combos]
  variances = [[] for _ in combos]
  done = 0
  while done < num_steps:
    steps = min(_CHUNK_STEPS, num_steps - done)
    values = {k: None if it is None else next(it) for k, it in chunks.items()}
    for c, combo in enumerate(combos):
      mine = {k: None if v is None else v[combo[k]] for k, v in values.items()}
      if not all(learned.values()):
        _check_concrete(rule, mine, learned, done, api)
      mean, variance = (np.asarray(x, np.float64) for x in rule.bits_per_step(mine))
      means[c].append(np.broadcast_to(mean, (steps,)))
      variances[c].append(np.broadcast_to(variance, (steps,)))
    done += steps
  rows = []
  for mean, variance in zip(means, variances):
    mean, variance = np.concatenate(mean), np.concatenate(variance)
    if segment_steps is None:
      rows.append(buffer_lib.capacity_for(mean.sum(), num_steps, variance.sum()))
    else:
      rows.append(
        buffer_lib.segment_capacity(
          _largest_window(mean, segment_steps), num_steps, _largest_window(variance, segment_steps)
        )
      )
  return rows, learned


def _largest_window(per_step: np.ndarray, length: int) -> float:
  """The largest sum of ``length`` consecutive entries of ``per_step`` (all if shorter)."""
  sums = np.concatenate([[0.0], np.cumsum(per_step)])
  length = min(length, per_step.size)
  return float(np.max(sums[length:] - sums[:-length]))


def _check_concrete(rule, values, learned, first_step, api):
  known = {k: v for k, v in values.items() if v is not None}
  unknown = {k: np.float32(1.0) for k, v in values.items() if v is None}

  def checks(known_t):
    return rule.checks({**known_t, **unknown}, learned)

  with jax.ensure_compile_time_eval():
    failed = jax.vmap(checks)(known)
  for category, bad in failed.items():
    names_text = _CONCRETE.get(category)
    bad = np.asarray(bad)
    if names_text is None or any(n not in known for n in names_text[0]) or not bad.any():
      continue
    (name, *_), text = names_text
    t = int(np.argmax(bad))
    value = np.asarray(known[name][t])
    shown = value.item() if value.size == 1 else f"values in [{value.min()}, {value.max()}]"
    raise ValueError(f"{api}: {text}, got {shown} at step {first_step + t}.")


# Hyperparameter checks that concrete values fail before the run: (names the check reads,
# the first one shown; message).
_CONCRETE = {
  "learning_rate": (("learning_rate",), "learning_rate must be positive and finite"),
  "momentum": (("momentum",), "momentum must lie strictly between 0 and 1"),
  "momentum_floor": (("momentum",), "momentum is below momentum_floor"),
  "b1": (("b1",), "b1 must lie in [0.5, 1)"),
  "b2": (("b2",), "b2 must lie in [0.5, 1)"),
  "b1_floor": (("b1",), "b1 is below b1_floor"),
  "b2_floor": (("b2",), "b2 is below b2_floor"),
  "eps": (("eps",), "eps must be non-negative and finite"),
  "eps_root": (("eps_root",), "eps_root must be non-negative and finite"),
  "weight_decay": (
    ("weight_decay", "learning_rate"),
    "weight_decay must be non-negative and finite, with learning_rate * weight_decay <= 0.5",
  ),
  "decay_ceiling": (
    ("weight_decay", "learning_rate"),
    "learning_rate * weight_decay is above decay_ceiling",
  ),
  "decay": (("decay",), "decay must lie in [0.5, 1)"),
  "momentum_rate": (("momentum",), "momentum must lie in [0.5, 1)"),
  "decay_floor": (("decay",), "decay is below decay_floor"),
}
