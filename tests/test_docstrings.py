"""The runnable examples in the public docstrings run and print what they say."""

import doctest

import pytest

from revoptax import (
  _alias,
  _determinism,
  _fixed_point,
  _flax,
  _fusion,
  _optax,
  _sgd,
  _static,
  _train,
)

MODULES = [_alias, _determinism, _fixed_point, _flax, _fusion, _optax, _sgd, _static, _train]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
