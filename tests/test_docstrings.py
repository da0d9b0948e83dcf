"""The runnable examples in the public docstrings run and print what they say."""

import doctest

import pytest

from revoptax import _determinism, _fixed_point, _flax, _fusion, _sgd, _train


@pytest.mark.parametrize("module", [_determinism, _fixed_point, _flax, _fusion, _sgd, _train])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
