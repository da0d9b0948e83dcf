"""revoptax: exactly reversible learning for JAX and Optax.

Hypergradients through whole training runs by running training backwards
exactly (Maclaurin, Duvenaud & Adams, ICML 2015).
"""

from revoptax._determinism import fingerprint, isolated
from revoptax._errors import ReversibilityError
from revoptax._fixed_point import Fixed, FixedPointFormat
from revoptax._sgd import (
  ExactLeaf,
  MomentumSGDRule,
  ReversibleSGDState,
  ReversibleTransformation,
  StateLayout,
  check,
  reversible_sgd,
)
from revoptax._train import train

__version__ = "0.1.0"


def __getattr__(name):
  # train_module needs flax, which revoptax itself does not: imported on first use.
  if name == "train_module":
    from revoptax._flax import train_module

    return train_module
  raise AttributeError(f"module 'revoptax' has no attribute {name!r}")


__all__ = [
  "ExactLeaf",
  "Fixed",
  "FixedPointFormat",
  "MomentumSGDRule",
  "ReversibilityError",
  "ReversibleSGDState",
  "ReversibleTransformation",
  "StateLayout",
  "reversible_sgd",
  "check",
  "train",
  "train_module",
  "fingerprint",
  "isolated",
]
