"""Runs the sharded-params checks (sharding_checks.py) in a subprocess with 8 host devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_sharded_params_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:cacheprovider",
      str(HERE / "sharding_checks.py"),
    ],
    cwd=HERE,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "4 passed" in result.stdout, result.stdout[-2000:]
