"""Data parallelism: 4 host devices against 1, checkpoints across device counts.

XLA's device count is fixed when jax starts, so the 4-device runs happen in one
subprocess started with ``--xla_force_host_platform_device_count=4``; it trains
each case on a one-device mesh and on the four-device mesh and reports to JSON.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from jcompress import data, parallel
from jcompress.data import pipeline
from jcompress.cli import main
from jcompress.train.loop import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, pathlib, sys

import jax
import numpy as np

out = pathlib.Path(sys.argv[1])
# The resumed runs recompile the first runs' steps: the disk cache saves that time.
jax.config.update("jax_compilation_cache_dir", str(out / "xla-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from jcompress import parallel
from jcompress.train.loop import TrainConfig, load_workdir, train_and_evaluate

assert jax.device_count() == 4, jax.devices()
one, four = parallel.data_mesh(jax.devices()[:1]), parallel.data_mesh()
base = dict(model="lenet5", dataset="mnist_sample", epochs=1, batch_size=32, lr=1e-3,
            optimizer="adam", schedule="constant", train_size=128, test_size=64)
ttq = {"method": "ttq", "paths": ["conv2/kernel", "fc1/kernel"], "options": {}}
prune = {"method": "prune", "paths": ["conv2/kernel", "fc2/kernel"],
         "options": {"sparsity": "0.8", "prune_schedule": "gradual", "interval": 1, "ramp_steps": 4}}
cases = {"lenet5": {}, "ttq": {"init_from": str(out / "lenet5-1"), "compression": [ttq]},
         "prune": {"init_from": str(out / "lenet5-1"), "compression": [prune]}}
report = {}


def params(workdir, mesh):
  state = load_workdir(workdir, mesh=mesh)[1]
  flat = jax.tree_util.tree_flatten_with_path({"params": state.params, "cstate": state.cstate})[0]
  return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in flat}


for name, extra in cases.items():
  for n, mesh in (("1", one), ("4", four)):
    record = train_and_evaluate(TrainConfig(**base, **extra), out / f"{name}-{n}", mesh=mesh)
    report[f"{name}-{n}"] = record
    np.savez(out / f"{name}-{n}.npz", **params(out / f"{name}-{n}", one))
# Resume each lenet5 run for a second epoch on the other device count.
for n, mesh in (("1", four), ("4", one)):
  report[f"resumed-{n}"] = train_and_evaluate(TrainConfig(**{**base, "epochs": 2}),
                                              out / f"lenet5-{n}", mesh=mesh)
  np.savez(out / f"resumed-{n}.npz", **params(out / f"lenet5-{n}", four))
try:
  train_and_evaluate(TrainConfig(**{**base, "batch_size": 30}), out / "bad", mesh=four)
except ValueError as e:
  report["error"] = str(e)
(out / "report.json").write_text(json.dumps(report))
"""


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory) -> pathlib.Path:
  """The folder of the 4-device subprocess's workdirs, parameter dumps and report."""
  out = tmp_path_factory.mktemp("sharding")
  # LLVM's optimisations would take most of the time of these short runs.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
         "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"}
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (out / "stdout.txt").write_text(proc.stdout)
  return out


def _report(out: pathlib.Path) -> dict:
  return json.loads((out / "report.json").read_text())


def _assert_params_close(a: pathlib.Path, b: pathlib.Path) -> None:
  """Equal params and compression state up to the order of the gradient sums.

  Adam divides by the gradient's magnitude, so a weight whose gradient is nearly 0
  may move by a fraction of the learning rate (1e-3) differently: ``atol`` 1e-4.
  """
  with np.load(a) as x, np.load(b) as y:
    assert sorted(x.files) == sorted(y.files)
    for key in x.files:
      np.testing.assert_allclose(x[key], y[key], rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("name", ["lenet5", "ttq", "prune"])
def test_four_devices_train_like_one(four_devices, name):
  report = _report(four_devices)
  one, four = report[f"{name}-1"], report[f"{name}-4"]
  assert one["step"] == four["step"] == 4
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert four[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
  _assert_params_close(four_devices / f"{name}-1.npz", four_devices / f"{name}-4.npz")


def test_prune_masks_hold_under_sharding(four_devices):
  """The gradual schedule reached its sparsity inside the 4-device step, and the
  pruned weights stayed 0 (the masks equal the 1-device ones: see above)."""
  with np.load(four_devices / "prune-4.npz") as p:
    kernel, mask = p["params/conv2/kernel"], p["cstate/0/masks/conv2/kernel"]
  assert mask.mean() == pytest.approx(0.2, abs=0.01)
  assert np.all(kernel[mask == 0] == 0)


def test_checkpoints_restore_across_device_counts(four_devices):
  """A 1-device checkpoint resumed on 4 devices and a 4-device one resumed on 1
  reach the same second epoch (params, optimizer state and all)."""
  report = _report(four_devices)
  assert report["resumed-1"]["epoch"] == report["resumed-4"]["epoch"] == 2
  assert report["resumed-4"]["test_loss"] == pytest.approx(report["resumed-1"]["test_loss"],
                                                           rel=1e-4)
  _assert_params_close(four_devices / "resumed-1.npz", four_devices / "resumed-4.npz")


def test_a_multi_device_run_says_what_it_uses(four_devices):
  log = (four_devices / "stdout.txt").read_text()
  assert "data parallel over 4 devices (cpu) in 1 process: each batch of 32 is split 4 ways" in log
  assert "data parallel over 1 device" not in log  # one device: nothing to say


def test_batch_not_divisible_by_devices_names_the_option(four_devices):
  assert _report(four_devices)["error"] == (
      "--batch-size 30 must be divisible by the 4 devices it is split over; use a multiple of 4")
  assert not (four_devices / "bad").exists()


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """Two local processes joined through a coordinator on 127.0.0.1 (one device each)."""
  argv = ["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
          "--batch-size", "64", "--train-size", "256", "--test-size", "100"]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  multi = argv + ["--workdir", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", "2", "--process-id"]
  env = {**{k: v for k, v in os.environ.items() if k != "JAX_COORDINATOR_ADDRESS"},
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  procs = [subprocess.Popen([sys.executable, "-m", "jcompress.cli", *multi, str(i)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  assert "done: test accuracy" in logs[0] and "done:" not in logs[1]
  assert "data parallel over 2 devices (cpu) in 2 processes" in logs[0]
  assert main(argv + ["--workdir", str(tmp_path / "one")]) == 0
  two, one = (read_metrics(tmp_path / w / "metrics.jsonl") for w in ("two", "one"))
  assert len(two) == len(one) == 1
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert two[0][key] == pytest.approx(one[0][key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("extra, message", [
    (["--num-processes", "2"], "--num-processes and --process-id need --coordinator"),
    (["--coordinator", "localhost"], "--coordinator must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, --num-processes)"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "0"], "--num-processes must be at least 1"),
])
def test_bad_process_options_name_the_option(extra, message, tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  argv = ["train", "--model", "lenet300", "--dataset", "mnist_sample", "--workdir", str(tmp_path)]
  assert main(argv + extra) == 2
  assert message in capsys.readouterr().err


def test_processes_read_and_augment_their_rows_as_one_process_would():
  """Two halves of each global batch, augmented, put together give the whole."""
  x = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), np.uint8)
  y = np.arange(16)
  one = np.ones((8, 8, 3), np.float32)
  read = lambda part: list(pipeline._host_batches(
      x, y, 8, one, 0 * one, seed=3, epoch=1, augment=True, drop_remainder=True, pad=False,
      part=part))
  whole, first, second = read(slice(None)), read(np.arange(4)), read(np.arange(4, 8))
  for w, a, b in zip(whole, first, second, strict=True):
    for key in ("image", "label"):
      np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))


def test_batches_split_rows_over_the_mesh():
  """On one device the sharded pipeline yields what the plain one does, plus a mask."""
  x = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2, 1)
  y = np.arange(10)
  sharding = parallel.batch_sharding(parallel.data_mesh())
  got = list(data.batches(x, y, 4, mean=(0.,), std=(1.,), pad=True, sharding=sharding))
  assert [b["label"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
  assert got[-1]["mask"].tolist() == [True, True, False, False]
  assert got[0]["image"].sharding == sharding
  with pytest.raises(ValueError, match="drop_remainder or pad"):
    data.batches(x, y, 4, mean=(0.,), std=(1.,), sharding=sharding)
