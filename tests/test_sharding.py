"""Runs the sharded-params checks (sharding_checks.py) in a subprocess with 8 host devices."""

import pytest
from conftest import run_checks


@pytest.mark.slow
def test_sharded_params_on_8_devices():
  run_checks(
    "sharding_checks.py",
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    passed=4,
    timeout=900,
  )
