"""The examples run in their quick modes and do what they say (a subprocess each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(name, *args, timeout=600):
  result = subprocess.run(
    [sys.executable, str(ROOT / "examples" / name), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_learn_schedules_quick_learns(tmp_path):
  out = tmp_path / "run"
  stdout = run_example("learn_schedules.py", "--quick", "--out", str(out))
  assert "by exact reversal" in stdout
  for name in ("schedules.png", "init_scales.png", "meta_curve.png", "results.json"):
    assert (out / name).stat().st_size > 0, name
  results = json.loads((out / "results.json").read_text())
  assert len(results["history"]["meta_loss"]) == 40
  names = {"log_learning_rate", "momentum_logit", "log_init_scale"}
  assert set(results["hyperparameters"]) == names
  final, initial = results["final"], results["initial"]
  assert {"train_loss", "val_loss", "val_accuracy", "hypervalidation_loss"} <= set(final)
  # The meta-objective (validation loss after training, at a seed no meta-iteration used)
  # improved from the first hyperparameters to the last.
  assert final["val_loss"] < initial["val_loss"]
  memory = results["memory_bytes"]
  assert memory["exact_reversal"] < memory["lax_scan"] / 10


@pytest.mark.slow
def test_ard_quick_learns(tmp_path):
  run_example("ard.py", "--quick", "--out", str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "penalties.png").stat().st_size > 0
  assert len(results["hyperparameters"]["log_l2"]) == 64
  assert results["final"]["val_loss"] < results["initial"]["val_loss"]


@pytest.mark.slow
def test_distill_quick_beats_random_real_digits(tmp_path):
  run_example("distill.py", "--quick", "--out", str(tmp_path))
  results = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "images.png").stat().st_size > 0
  history = results["history"]["meta_loss"]
  assert history[-1] < history[0]
  learned, real = results["final"], results["random_real_digits"]
  assert learned["hypervalidation_accuracy"] > real["hypervalidation_accuracy"]


@pytest.mark.slow
def test_chaos_quick_shows_the_hypergradient_blowing_up(tmp_path):
  run_example("chaos.py", "--quick", "--out", str(tmp_path))
  sweeps = json.loads((tmp_path / "results.json").read_text())["sweeps"]
  assert (tmp_path / "chaos.png").stat().st_size > 0
  assert sweeps["100"]["max_abs_hypergradient"] > 1e3 * sweeps["20"]["max_abs_hypergradient"]
