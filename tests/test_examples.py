"""The examples run in their quick modes and do what they say (a subprocess each)."""

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def quick_results(name, out, figures, *args):
  """Run an example's quick mode into ``out``; check its figures; return (results, stdout)."""
  stdout = run_example(name, "--quick", *args, "--out", str(out))
  for figure in (*figures, "results.json"):
    assert (out / figure).stat().st_size > 0, figure
  return json.loads((out / "results.json").read_text()), stdout


@pytest.mark.slow
def test_learn_schedules_quick_learns(tmp_path):
  figures = ("schedules.png", "init_scales.png", "meta_curve.png")
  results, stdout = quick_results("learn_schedules.py", tmp_path, figures)
  assert "by exact reversal" in stdout
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
def test_a_killed_meta_run_resumes_bit_identically(tmp_path):
  # Quick mode, 12 meta-steps, an Orbax checkpoint every 4: killed (SIGKILL) once the
  # checkpoint after 4 meta-steps is on disk, resumed, and compared with a run never stopped.
  options = ("--quick", "--meta-steps", "12", "--checkpoint-every", "4")
  whole, _ = quick_results("learn_schedules.py", tmp_path / "whole", (), *options[1:])
  killed = tmp_path / "killed"
  process = subprocess.Popen(
    [sys.executable, str(ROOT / "examples" / "learn_schedules.py"), *options, "--out", str(killed)],
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 600
  while not (killed / "checkpoints" / "4").is_dir() and process.poll() is None:
    assert time.time() < deadline, "no checkpoint after 4 meta-steps"
    time.sleep(0.2)
  process.kill()
  process.wait()
  assert not (killed / "results.json").exists(), "the run finished before it was killed"
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < 12, saved
  resumed, stdout = quick_results("learn_schedules.py", killed, (), *options[1:], "--resume")
  assert resumed["hyperparameters"] == whole["hyperparameters"]
  assert resumed["history"] == whole["history"]
  assert resumed["final"] == whole["final"]


@pytest.mark.slow
def test_population_quick_searches_with_hypergradients(tmp_path):
  results, _ = quick_results("population.py", tmp_path, ("population.png",))
  summary = results["summary"]
  assert set(summary) == {"random search", "population descent", "BayesOpt with gradients"}
  assert results["runs_per_method"] == 16
  for method in summary.values():
    assert len(method["best_so_far_median"]) == 16
  # Each member follows its hypergradient: the population's mean loss falls.
  # Observed in quick mode: 0.40 in round 1, 0.21 in round 4.
  means = summary["population descent"]["round_means_first_repeat"]
  assert means[-1] < 0.8 * means[0], means


@pytest.mark.slow
def test_adam_schedules_quick_learns(tmp_path):
  figures = ("adam_schedules.png", "meta_curve.png")
  results, _ = quick_results("adam_schedules.py", tmp_path, figures)
  assert len(results["history"]["meta_loss"]) == 15
  assert set(results["learning_rate"]) == {"l1", "l2", "l3"}
  # Observed in quick mode: validation loss 0.191 -> 0.126 on seeds no meta-step used.
  assert results["final"]["val_loss"] < 0.9 * results["initial"]["val_loss"]
  curve = results["validation_curve"]
  assert curve["learned"][-1] < curve["initial"][-1]


@pytest.mark.slow
def test_ard_quick_learns(tmp_path):
  results, _ = quick_results("ard.py", tmp_path, ["penalties.png"])
  assert len(results["hyperparameters"]["log_l2"]) == 64
  assert results["final"]["val_loss"] < results["initial"]["val_loss"]


@pytest.mark.slow
def test_distill_quick_beats_random_real_digits(tmp_path):
  results, _ = quick_results("distill.py", tmp_path, ["images.png"])
  history = results["history"]["meta_loss"]
  assert history[-1] < history[0]
  learned, real = results["final"], results["random_real_digits"]
  assert learned["hypervalidation_accuracy"] > real["hypervalidation_accuracy"]


@pytest.mark.slow
def test_chaos_quick_shows_the_hypergradient_blowing_up(tmp_path):
  results, _ = quick_results("chaos.py", tmp_path, ["chaos.png"])
  sweeps = results["sweeps"]
  assert sweeps["100"]["max_abs_hypergradient"] > 1e3 * sweeps["20"]["max_abs_hypergradient"]


@pytest.mark.slow
def test_vector_field_quick_points_downhill(tmp_path):
  results, _ = quick_results("vector_field.py", tmp_path, ["vector_field.png"])
  assert len(results["val_loss"]) == 7
  assert results["arrows_pointing_downhill"] > 0.7


@pytest.mark.slow
def test_hyper_overfitting_quick_opens_a_gap(tmp_path):
  results, _ = quick_results("hyper_overfitting.py", tmp_path, ["curves.png"])
  initial, final = results["initial"], results["final"]
  assert final["val_loss"] < 0.7 * initial["val_loss"]
  gap = lambda r: r["hypervalidation_loss"] - r["val_loss"]
  assert gap(final) > gap(initial) + 0.05


def write_idx(path, array, gzipped):
  """An IDX file (the MNIST format) of a uint8 array."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw) if gzipped else raw)


def small_mnist(folder, n=400):
  """Synthetic 28 x 28 "digits": class c lights up a band of rows, plus noise."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
  for i, c in enumerate(labels):
    images[i, 2 * c + 4 : 2 * c + 7, 4:24] = 255
  folder.mkdir(parents=True, exist_ok=True)
  write_idx(folder / "train-images-idx3-ubyte.gz", images, gzipped=True)
  write_idx(folder / "train-labels-idx1-ubyte", labels, gzipped=False)
  return images, labels


def test_idx_loader_reads_what_was_written(tmp_path):
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    import _common
  finally:
    sys.path.remove(str(ROOT / "examples"))
  images, labels = small_mnist(tmp_path)
  np.testing.assert_array_equal(_common.load_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
  np.testing.assert_array_equal(_common.load_idx(tmp_path / "train-labels-idx1-ubyte"), labels)
  (train_x, train_y), (val_x, _), (hyper_x, _) = _common.split_mnist(tmp_path)
  assert train_x.shape == (200, 784) and val_x.shape == (100, 784) and hyper_x.shape == (100, 784)
  assert float(train_x.max()) == 1.0 and train_y.dtype == np.int32
  (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    _common.load_idx(tmp_path / "bad")


@pytest.mark.slow
def test_learn_schedules_runs_on_local_mnist_files(tmp_path):
  small_mnist(tmp_path / "mnist")
  data = ("--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"))
  results, _ = quick_results("learn_schedules.py", tmp_path / "run", ["init_scales.png"], *data)
  assert results["init_scale"]["one_over_sqrt_fan_in"][0] == pytest.approx(1 / 28)
  assert results["final"]["val_loss"] < results["initial"]["val_loss"]


@pytest.mark.slow
def test_weight_sharing_quick_learns_to_tie_the_upper_layer_more(tmp_path):
  results, _ = quick_results("weight_sharing.py", tmp_path, ["sharing.png"])
  table = results["table"]
  assert table["learned"]["val_loss"] < table["initial"]["val_loss"]
  assert table["learned"]["val_loss"] < table["tied"]["val_loss"]
  ties = np.asarray(results["tie_strength"])  # [layer, pair]
  assert ties[1].mean() > ties[0].mean()


@pytest.mark.slow
def test_shared_hyperparameters_quick_transfer_to_the_held_out_dataset(tmp_path):
  results, _ = quick_results("shared_hyperparameters.py", tmp_path, ["transfer.png"])
  held_out = results["held_out"]
  table = results["table"]
  shared = table["learned on three datasets"][held_out]["hypervalidation_loss"]
  assert shared < table["initial"][held_out]["hypervalidation_loss"]


@pytest.mark.slow
def test_architecture_quick_moves_the_widths_and_ties(tmp_path):
  results, _ = quick_results("architecture.py", tmp_path, ["widths.png", "tying.png"])
  widths, tying = results["widths"], results["tying"]
  assert widths["cutoff_learned"] != widths["cutoff_start"]
  assert widths["history"][-1] < widths["history"][0]
  assert tying["history"][-1] < tying["history"][0]
