"""revoptax: exactly reversible learning for JAX and Optax.

Hypergradients through whole training runs by running training backwards
exactly (Maclaurin, Duvenaud & Adams, ICML 2015).
"""

from revoptax._adam import AdamRule, AdamState
from revoptax._alias import (
  reversible_adam,
  reversible_adamw,
  reversible_rmsprop,
  reversible_sgd,
)
from revoptax._determinism import fingerprint, isolated
from revoptax._errors import ReversibilityError
from revoptax._fixed_point import Fixed, FixedPointFormat
from revoptax._optax import (
  ReversibleState,
  ReversibleTransformation,
  check,
  reversible_optimizer,
)
from revoptax._rmsprop import RMSPropRule, RMSPropState
from revoptax._rule import ReversibleRule, StepFlags
from revoptax._sgd import MomentumSGDRule, MomentumSGDState, momentum_above
from revoptax._train import train

__version__ = "0.1.0"


def __getattr__(name):
  # train_module needs flax, which revoptax itself does not: imported on first use.
  if name == "train_module":
    from revoptax._flax import train_module

    return train_module
  raise AttributeError(f"module 'revoptax' has no attribute {name!r}")


__all__ = [
  "AdamRule",
  "AdamState",
  "Fixed",
  "FixedPointFormat",
  "MomentumSGDRule",
  "MomentumSGDState",
  "RMSPropRule",
  "RMSPropState",
  "ReversibilityError",
  "ReversibleRule",
  "ReversibleState",
  "ReversibleTransformation",
  "StepFlags",
  "check",
  "fingerprint",
  "isolated",
  "momentum_above",
  "reversible_adam",
  "reversible_adamw",
  "reversible_optimizer",
  "reversible_rmsprop",
  "reversible_sgd",
  "train",
  "train_module",
]
