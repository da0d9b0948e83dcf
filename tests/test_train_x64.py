"""Runs the float64 checks (x64_checks.py) in a subprocess with x64 switched on."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_checks

from revoptax import FixedPointFormat
from revoptax import _buffer as buffer_lib

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_float64_oracles_and_x64_bit_identity(tmp_path):
  # Words computed here, in 32-bit mode, for the bit-identity check over there.
  rng = np.random.default_rng(0)
  x = (rng.normal(size=500) * 10.0 ** rng.uniform(-8, 3, size=500)).astype(np.float32)
  fmt = FixedPointFormat()
  fixed, _ = fmt.from_float(jnp.asarray(x))
  v, buf = fixed, buffer_lib.init(x.shape, 8)
  n = buffer_lib.quantize_momentum(0.9, 16)
  for t in range(100):
    v, buf, _ = buffer_lib.multiply(v, buf, n, jnp.int32(t), 16)
  words = tmp_path / "x32_words.npz"
  np.savez(
    words,
    x=x,
    hi=np.asarray(fixed.hi),
    lo=np.asarray(fixed.lo),
    back=np.asarray(fmt.to_float(fixed)),
    v_hi=np.asarray(v.hi),
    v_lo=np.asarray(v.lo),
    head_lo=np.asarray(buf.head_lo),
  )
  run_checks(
    "x64_checks.py",
    {"JAX_ENABLE_X64": "1", "REVOPTAX_X32_WORDS": str(words)},
    passed=7,
    cwd=HERE.parent,
  )
