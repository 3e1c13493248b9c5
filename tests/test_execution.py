"""eval --execution, the costs summary counts for Tucker layers, and jcompress bench."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jcompress import bench, cost, execution, models
from jcompress.cli import main
from jcompress.checkpoint import Checkpoints
from jcompress.train.loop import load_workdir
from jcompress.transforms import base, registry, tucker
from jcompress.transforms import select as sel


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """A lenet300 trained briefly and its fc1, fc2 Tucker-factorized to 30% of their weights."""
  root = tmp_path_factory.mktemp("tucker")
  src, dst = root / "src", root / "tucker"
  assert main(["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
               "--batch-size", "64", "--train-size", "256", "--optimizer", "adam",
               "--lr", "1e-3", "--workdir", str(src)]) == 0
  assert main(["compress", "--from", str(src), "--workdir", str(dst), "--method", "tucker",
               "--select", "fc1|fc2", "--budget-params", "0.3"]) == 0
  return src, dst


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_factorized_eval_equals_float_eval(workdirs, capsys):
  _, dst = workdirs
  capsys.readouterr()
  results = {}
  for name in ("float", "factorized"):
    assert main(["eval", "--workdir", str(dst), "--execution", name, "--json"]) == 0
    results[name] = _last_json(capsys)
    assert results[name]["execution"] == name
  assert results["factorized"]["accuracy"] == pytest.approx(results["float"]["accuracy"],
                                                            abs=1 / 500)
  assert results["factorized"]["loss"] == pytest.approx(results["float"]["loss"], rel=1e-4)


def test_budget_ranks_come_from_the_trained_weights(workdirs):
  src, dst = workdirs
  _, source, _, _ = load_workdir(src)
  _, state, meta, _ = load_workdir(dst)
  step = meta["compression"][0]
  assert step["options"]["positions"] == {"fc1": [1, 1], "fc2": [1, 1]}
  expected, _ = registry.build("tucker", step["paths"], **step["options"]).init(source.params)
  shapes = lambda tree: {k: np.shape(v) for k, v in sel.flatten(tree).items()}
  assert shapes(state.params) == shapes(expected)
  kernels = sum(np.size(f) for v in tucker.factorized_layers(state.params).values() for f in v)
  assert kernels <= 0.3 * (784 * 300 + 300 * 100)


def test_summary_counts_the_factor_sequence(workdirs, capsys):
  _, dst = workdirs
  _, state, _, _ = load_workdir(dst)
  layers = tucker.factorized_layers(state.params)
  assert set(layers) == {"fc1", "fc2"}
  capsys.readouterr()
  assert main(["summary", "--workdir", str(dst), "--format", "json"]) == 0
  out = _last_json(capsys)
  rows = {r["path"]: r for r in out["layers"]}
  for name, (core, u_in, u_out) in layers.items():
    (c_in, r_in), (c_out, r_out) = u_in.shape, u_out.shape
    assert rows[name]["kind"] == "tucker_dense"
    assert rows[name]["macs"] == c_in * r_in + r_in * r_out + r_out * c_out
    assert rows[name]["params"] == core.size + u_in.size + u_out.size + c_out
  assert rows["fc3"]["kind"] == "dense" and rows["fc3"]["macs"] == 1000
  assert out["params"] == sum(np.size(v) for v in jax.tree.leaves(state.params))
  assert out["bytes"] == out["exported_bytes"]


def test_factorized_costs_match_layer_macs():
  model = models.create("lenet5", num_classes=10, input_shape=(28, 28, 1))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                        shapes["params"])
  method = registry.build("tucker", ["conv2/kernel"], ranks="conv2=6:10")
  trainable, cstate = method.init(params)
  summary = tucker.factorized_costs(
      cost.summarize(model, {"params": method.apply(trainable, cstate)}, (28, 28, 1)),
      trainable)
  conv2 = next(r for r in summary.layers if r.path == "conv2")
  x = np.zeros((1, 28, 28, 1), np.float32)
  assert conv2.macs == tucker.layer_macs(model, params, trainable, x)["conv2"][1]
  assert conv2.flops == 144 * 6 * (2 * 20 - 1) + 64 * (10 * (2 * 25 * 6 - 1) + 50 * (2 * 10 - 1))
  assert sorted(t.path for t in conv2.tensors) == ["conv2/bias", "conv2/kernel_core",
                                                   "conv2/kernel_u_in", "conv2/kernel_u_out"]
  assert conv2.kind == "tucker_conv" and conv2.params == 25 * 6 * 10 + 20 * 6 + 50 * 10 + 50


def test_bench_prints_seed001s_table_and_json(workdirs, capsys):
  src, dst = workdirs
  capsys.readouterr()
  assert main(["bench", "--workdir", str(dst), "--baseline", str(src), "--batch-size", "4",
               "--repeats", "1", "--json"]) == 0
  text = capsys.readouterr().out
  out = json.loads(text.strip().splitlines()[-1])
  assert "Share orig" in text and "measured speed-up" in text
  assert out["execution"] == "factorized" and out["batch_size"] == 4
  assert [r["layer"] for r in out["layers"]] == ["fc1", "fc2", "fc3"]
  total = out["total"]
  assert total["params_original"] == 266_610 and total["params_compressed"] < 266_610
  assert out["theoretical_speedup"] == pytest.approx(
      total["flops_original"] / total["flops_compressed"])
  assert out["measured_speedup"] == pytest.approx(
      total["seconds_original"] / total["seconds_compressed"])
  for row in out["layers"]:
    assert row["seconds_original"] > 0 and row["seconds_compressed"] > 0
    assert row["share_original"] == pytest.approx(
        row["seconds_original"] / total["seconds_original"])
  assert out["layers"][2]["params_ratio"] == 1.0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_bench_cpus_pins_the_process_before_jax_starts(workdirs, capsys):
  src, dst = workdirs
  args = ["bench", "--workdir", str(dst), "--baseline", str(src), "--batch-size", "2",
          "--repeats", "1", "--json"]
  proc = subprocess.run([sys.executable, "-m", "jcompress.cli", *args, "--cpus", "1"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["cpus"] == 1
  assert "(1 CPU)" in proc.stdout and "% of theoretical" in proc.stdout
  # Here JAX is running already, and 0 CPUs are never enough.
  allowed = os.sched_getaffinity(0)
  assert main([*args, "--cpus", "1"]) == 2
  assert "--cpus must pin the process before JAX starts" in capsys.readouterr().err
  assert main([*args, "--cpus", "0"]) == 2
  assert "--cpus must be between 1 and the" in capsys.readouterr().err
  assert os.sched_getaffinity(0) == allowed


def test_execution_errors_name_the_option(workdirs, capsys):
  src, dst = workdirs
  with pytest.raises(ValueError, match="unknown --execution 'int4'"):
    execution.get("int4")
  with pytest.raises(ValueError, match="--execution factorized runs a tucker-compressed "
                     "model; this plan is quantize"):
    execution.get("factorized", [registry.build("quantize", ["fc1/kernel"])])
  assert main(["bench", "--workdir", str(dst), "--baseline", str(src), "--repeats", "0"]) == 2
  assert "--repeats must be at least 1" in capsys.readouterr().err


def test_load_keeps_ranks_that_fresh_weights_would_not_give(workdirs, tmp_path, capsys):
  src, _ = workdirs
  _, state, meta, _ = load_workdir(src)
  flat = sel.flatten(state.params)
  u, s, vt = np.linalg.svd(np.asarray(flat["fc1/kernel"]), full_matrices=False)
  flat["fc1/kernel"] = jax.numpy.asarray((u[:, :3] * s[:3]) @ vt[:3])  # exactly rank 3
  low_rank = tmp_path / "low_rank"
  ckpts = Checkpoints(low_rank)
  ckpts.save(1, state.replace(params=sel.unflatten(flat)), meta, {"test_accuracy": 0.5})
  ckpts.close()
  dst = tmp_path / "tucker"
  assert main(["compress", "--from", str(low_rank), "--workdir", str(dst), "--method",
               "tucker", "--select", "fc1", "--energy", "0.99", "--rank-multiple", "1"]) == 0
  _, restored, dst_meta, method = load_workdir(dst)
  assert sel.flatten(restored.params)["fc1/kernel_core"].shape == (3, 3)
  # compress saved the ranks it chose in the plan: init follows them on any weights
  plan = dst_meta["compression"]
  assert plan[0]["options"]["layer_ranks"] == {"fc1": [3, 3]}
  full_rank = jax.tree.map(np.asarray, state.params)
  fresh, _ = method.init(full_rank)
  assert np.shape(sel.flatten(fresh).get("fc1/kernel_core")) == (3, 3)
  # a plan saved before the ranks were kept chooses them again from the weights it gets
  old = [{**s, "options": {k: v for k, v in s["options"].items() if k != "layer_ranks"}}
         for s in plan]
  fresh, _ = registry.from_plan(old).init(full_rank)
  assert np.shape(sel.flatten(fresh).get("fc1/kernel_core")) != (3, 3)
  capsys.readouterr()
  assert main(["eval", "--workdir", str(dst), "--execution", "factorized", "--json"]) == 0
  assert _last_json(capsys)["params"] == 266_610 - 784 * 300 + 3 * 3 + 784 * 3 + 300 * 3


@pytest.mark.parametrize("method, extra, name", [
    ("quantize", ["--bits", "8"], "int8"),
    ("prune", ["--sparsity", "0.9"], "sparse")])
def test_int8_and_sparse_eval_match_float(workdirs, tmp_path, capsys, method, extra, name):
  src, _ = workdirs
  dst = tmp_path / method
  assert main(["compress", "--from", str(src), "--workdir", str(dst), "--method", method]
              + extra) == 0
  capsys.readouterr()
  results = {}
  for run in ("float", name):
    assert main(["eval", "--workdir", str(dst), "--execution", run, "--json"]) == 0
    results[run] = _last_json(capsys)
  # int8 also rounds the activations to 8 bits; sparse differs only in summation order.
  assert results[name]["accuracy"] == pytest.approx(results["float"]["accuracy"], abs=0.01)
  assert results[name]["loss"] == pytest.approx(results["float"]["loss"],
                                                rel=0.02 if name == "int8" else 1e-4)
  if name == "sparse":  # a sparse run's FLOPs are those of the nonzero weights
    table = bench.from_workdirs(str(dst), str(src), execution_name="sparse", repeats=1,
                                batch_size=8)
    assert table.execution == "sparse" and 5 < table.theoretical_speedup < 11
    dense = bench.from_workdirs(str(dst), str(src), execution_name="float", repeats=1,
                                batch_size=8)
    assert dense.theoretical_speedup == pytest.approx(1.0)


def test_execution_needs_its_method(workdirs, capsys):
  src, _ = workdirs
  assert main(["eval", "--workdir", str(src), "--execution", "sparse"]) == 2
  assert "--execution sparse runs a prune-compressed model" in capsys.readouterr().err
