"""export --format stablehlo and eval --runtime stablehlo: the module runs with JAX alone,
gives the workdir's logits and accuracy."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import workdir_logits
from jcompress.cli import main

TRAIN = ["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
         "--batch-size", "64", "--train-size", "256", "--optimizer", "adam", "--lr", "1e-3"]

# Only JAX and numpy: deserialize, call, save the logits; fail if anything else came in.
RUNNER = """
import sys, jax, numpy as np
exp = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
np.save(sys.argv[3], np.asarray(exp.call(np.load(sys.argv[2]))))
assert not [m for m in sys.modules if m.split(".")[0] in ("jcompress", "flax", "optax")]
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("stablehlo") / "run"
  assert main(TRAIN + ["--workdir", str(workdir)]) == 0
  return workdir


def _export(workdir, out, *extra):
  assert main(["export", "--workdir", str(workdir), "--out", str(out), "--format",
               "stablehlo", *extra]) == 0
  return json.loads(out.with_name(out.name + ".json").read_text())


@pytest.mark.parametrize("extra, batch", [([], 5), (["--batch-size", "4"], 4)])
def test_module_runs_with_jax_alone_and_gives_theworkdir_logits(trained, tmp_path, extra,
                                                                 batch):
  out = tmp_path / "m.stablehlo"
  info = _export(trained, out, *extra)
  assert info | {"mean": None, "std": None} == info | {
      "dataset": "mnist_sample", "input_shape": [28, 28, 1], "num_classes": 10,
      "batch": batch if extra else None, "mean": None, "std": None}
  x = np.asarray(jax.random.normal(jax.random.key(0), (batch, 28, 28, 1)), np.float32)
  np.save(tmp_path / "x.npy", x)
  subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy")], check=True)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), workdir_logits(trained, x),
                             atol=1e-5, rtol=1e-5)


def test_eval_runtime_stablehlo_gives_the_workdir_accuracy(trained, tmp_path, capsys):
  out = tmp_path / "m.stablehlo"
  _export(trained, out)
  capsys.readouterr()
  assert main(["eval", "--workdir", str(trained), "--json"]) == 0
  ours = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert main(["eval", "--runtime", "stablehlo", "--exported", str(out), "--workdir",
               str(trained), "--json"]) == 0
  got = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert got["accuracy"] == ours["accuracy"] and got["runtime"] == "stablehlo"
  assert got["agreement"] == 1.0 and got["max_logit_diff"] < 1e-5
  assert abs(got["loss"] - ours["loss"]) < 1e-5 and got["file_bytes"] == out.stat().st_size
  assert main(["eval", "--exported", str(out)]) == 2
  assert "add --runtime stablehlo" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["eval", "--runtime", "stablehlo"], "--runtime stablehlo runs --exported FILE"),
    (["eval", "--runtime", "stablehlo", "--exported", "nofile"], "no nofile.json beside it"),
    (["eval"], "give --workdir DIR or --exported FILE"),
    (["export", "--workdir", "w", "--out", "f", "--batch-size", "2"], "--format stablehlo"),
    (["export", "--workdir", "w", "--out", "f", "--format", "stablehlo", "--entropy", "ans"],
     "--entropy codes the packed file's streams"),
])
def test_bad_use_is_one_clear_line(argv, message, capsys):
  assert main(argv) == 2
  assert message in capsys.readouterr().err


@pytest.mark.parametrize("method, extra", [("quantize", ["--bits", "4"]),
                                           ("qat", ["--bits", "4", "--epochs", "1"]),
                                           ("ttq", ["--epochs", "1"])])
def test_quantized_kernels_are_embedded_as_packed_codes(trained, tmp_path, method, extra):
  run = tmp_path / method
  assert main(["compress", "--from", str(trained), "--workdir", str(run), "--method", method,
               "--batch-size", "64", "--train-size", "256", *extra]) == 0
  out, dense = tmp_path / "q.stablehlo", tmp_path / "f.stablehlo"
  info = _export(run, out)
  _export(trained, dense)
  assert info["compressed_width"] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
  # 266,200 kernel weights: half a byte (4-bit codes) or a quarter (trits), not four.
  assert out.stat().st_size < 0.15 * dense.stat().st_size
  x = np.asarray(jax.random.normal(jax.random.key(1), (3, 28, 28, 1)), np.float32)
  np.save(tmp_path / "x.npy", x)
  subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy")], check=True)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), workdir_logits(run, x),
                             atol=1e-5, rtol=1e-5)
