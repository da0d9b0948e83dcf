"""Static configuration hashed by value, so that ``jit`` reuses compiled loops.

:func:`revoptax.train` passes its static configuration (the loss, the
hyperparameter schedules, the rule, shapes) to one ``jax.jit``-ed function.
``jit`` looks compiled programs up by the static argument's hash and
equality, and the functions in it are usually fresh objects on every call
(``learning_rate=lambda hp, t: ...`` written inside the meta-objective), so a
function is keyed by what it computes with: its code, defaults, the contents
of its closure (recursively for closed-over functions and ``functools.partial``
objects; by identity for unhashable values such as arrays) and the identity of
its globals.  Like ``jax.jit`` itself, a change to a global variable read by
the function after the first call is not seen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class _Identity:
  """Compared by identity; holds the object, so its id cannot be reused while cached."""

  __slots__ = ("obj",)

  def __init__(self, obj):
    self.obj = obj

  def __eq__(self, other):
    return isinstance(other, _Identity) and self.obj is other.obj

  def __hash__(self):
    return id(self.obj)


def _cell_key(value, seen=frozenset()) -> Any:
  if callable(value) and not isinstance(value, type):
    if id(value) in seen:  # a function that refers to itself
      return _Identity(value)
    return ("fn", _key(value, seen))
  try:
    hash(value)
  except TypeError:
    return _Identity(value)
  return ("value", type(value), value)


def _key(fn, seen=frozenset()) -> tuple:
  if isinstance(fn, FunctionKey):
    return fn.key
  seen = seen | {id(fn)}
  if isinstance(fn, functools.partial):
    keywords = tuple(sorted((k, _cell_key(v, seen)) for k, v in fn.keywords.items()))
    args = tuple(_cell_key(a, seen) for a in fn.args)
    return ("partial", _key(fn.func, seen), args, keywords)
  code = getattr(fn, "__code__", None)
  if code is None:  # a builtin, a method wrapper or a callable object
    return ("object", _Identity(fn))
  cells = []
  for cell in fn.__closure__ or ():
    try:
      cells.append(_cell_key(cell.cell_contents, seen))
    except ValueError:  # an empty cell (a name not yet bound)
      cells.append(("empty",))
  closure = tuple(cells)
  defaults = tuple(_cell_key(d, seen) for d in (fn.__defaults__ or ()))
  kwdefaults = tuple(sorted((k, _cell_key(v, seen)) for k, v in (fn.__kwdefaults__ or {}).items()))
  owner = getattr(fn, "__self__", None)
  return ("code", code, closure, defaults, kwdefaults, _Identity(fn.__globals__), _Identity(owner))


class FunctionKey:
  """A function, compared and hashed by what it computes with (see the module docstring).

  Example:
    >>> from revoptax._static import FunctionKey
    >>> make = lambda: (lambda hp, t: 0.9)
    >>> FunctionKey(make()) == FunctionKey(make())
    True
  """

  __slots__ = ("fn", "key", "_hash")

  def __init__(self, fn: Callable):
    self.fn = fn
    self.key = _key(fn)
    self._hash = hash(self.key)

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, FunctionKey) and self.key == other.key

  def __repr__(self):
    return f"FunctionKey({self.fn!r})"
