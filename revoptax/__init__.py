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
  "fingerprint",
  "isolated",
]
