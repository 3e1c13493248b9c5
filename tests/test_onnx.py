"""export --format onnx and eval --runtime onnxruntime: every built-in method's output
runs in ONNX Runtime without JAX, gives the workdir's logits (float exactly, int8 in
argmax), stores 8-bit weights as int8 and runs ORT's int8 kernels."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import workdir_logits
from jcompress import onnx_export, onnx_graph, onnx_qdq
from jcompress.cli import main

pytest.importorskip("onnxruntime")

TRAIN = ["train", "--model", "lenet5", "--dataset", "mnist_sample", "--epochs", "1",
         "--batch-size", "64", "--train-size", "256", "--optimizer", "adam", "--lr", "1e-3"]
# (name, compress options): each is one-shot (--epochs 0) on the trained LeNet-5.
METHODS = {
    "quantize": ["--method", "quantize", "--bits", "8"],
    "qat": ["--method", "qat", "--bits", "8", "--granularity", "channel"],
    "ttq": ["--method", "ttq"],
    "prune": ["--method", "prune", "--sparsity", "0.8"],
    "tucker": ["--method", "tucker", "--select", "conv2", "--ranks", "conv2=8:8"],
    "share": ["--method", "share", "--bits", "4"],
    "binary": ["--method", "binary", "--select", "fc"],
    "prune+quantize": ["--method", "prune", "--sparsity", "0.8", "--method", "quantize"],
}
INT8 = ("quantize", "qat", "ttq", "binary", "prune+quantize")

# onnxruntime and numpy only: run the model, save the logits; fail if JAX came in.
RUNNER = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], s.run(None, {"images": np.load(sys.argv[2])})[0])
assert not [m for m in sys.modules if m.split(".")[0] in ("jax", "jcompress", "flax")]
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("onnx")
  assert main(TRAIN + ["--workdir", str(root / "float")]) == 0
  out = {"float": root / "float"}
  for name, options in METHODS.items():
    out[name] = root / name.replace("+", "_")
    assert main(["compress", "--from", str(root / "float"), "--workdir", str(out[name]),
                 "--epochs", "0", "--test-size", "100", *options]) == 0
  return out


def _export(workdir, out, *extra):
  assert main(["export", "--workdir", str(workdir), "--out", str(out), "--format", "onnx",
               *extra]) == 0
  return json.loads(out.with_name(out.name + ".json").read_text())


def _images(n=64):
  from jcompress import data  # pylint: disable=import-outside-toplevel
  ds = data.load("mnist_sample")
  spec = data.spec("mnist_sample")
  x = np.asarray(ds.test_images[:n], np.float32) / 255
  return ((x - np.asarray(spec.mean)) / np.asarray(spec.std)).astype(np.float32)


def test_float_export_runs_without_jax_and_gives_theworkdir_logits(runs, tmp_path):
  out = tmp_path / "m.onnx"
  info = _export(runs["float"], out)
  assert info | {"mean": None, "std": None} == info | {
      "format": "onnx", "dataset": "mnist_sample", "input_shape": [28, 28, 1],
      "num_classes": 10, "int8_weights": [], "mean": None, "std": None}
  x = _images(5)
  np.save(tmp_path / "x.npy", x)
  subprocess.run([sys.executable, "-c", RUNNER, str(out), str(tmp_path / "x.npy"),
                  str(tmp_path / "y.npy")], check=True)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), workdir_logits(runs["float"], x),
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_exports_and_agrees_with_its_workdir(runs, tmp_path, name):
  out = tmp_path / "m.onnx"
  info = _export(runs[name], out)
  x = _images()
  got = onnx_export.session(out).run(None, {"images": x})[0]
  want = workdir_logits(runs[name], x)
  if name in INT8:  # int8 weights and uint8 activations: the same decisions
    assert info["int8_weights"] and onnx_export.int8_ops(out)
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
  else:  # float compute: the same logits (share: a Gather of its codebook)
    assert bool(info["int8_weights"]) == (name == "share")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  if name == "quantize":  # the logits layer's output is float (no QuantizeLinear clipping
    # it to its calibrated range): within 2% of their range (clipped: 3.3%; now 0.7%)
    assert np.max(np.abs(got - want)) <= 0.02 * np.ptp(want)
    # weight-only int8: the logits up to float rounding
    _export(runs[name], tmp_path / "w.onnx", "--activations", "float")
    np.testing.assert_allclose(onnx_export.session(tmp_path / "w.onnx").run(
        None, {"images": x})[0], want, atol=1e-4, rtol=1e-4)


def test_int8_file_is_small_and_dynamic_runs_integer_matmuls(runs, tmp_path):
  _export(runs["float"], tmp_path / "f.onnx")
  _export(runs["quantize"], tmp_path / "q.onnx")
  assert (tmp_path / "q.onnx").stat().st_size <= 0.3 * (tmp_path / "f.onnx").stat().st_size
  import onnx  # pylint: disable=import-outside-toplevel
  g = onnx.load(tmp_path / "q.onnx").graph  # compacted: Identity only to name an output,
  outputs = {o.name for o in g.output}  # each constant once, float biases (ORT quantizes them)
  assert all(n.output[0] in outputs for n in g.node if n.op_type == "Identity")
  blobs = [(i.data_type, tuple(i.dims), i.raw_data) for i in g.initializer]
  assert len(set(blobs)) == len(blobs) and max(len(i.name) for i in g.initializer) <= 3
  assert not [i for i in g.initializer if i.data_type == onnx.TensorProto.INT32]
  info = _export(runs["quantize"], tmp_path / "d.onnx", "--activations", "dynamic")
  assert info["activations"] == "dynamic"
  assert onnx_export.int8_ops(tmp_path / "d.onnx") == {"DynamicQuantizeMatMul": 2}


def test_eval_runtime_onnxruntime_reports_accuracy_and_agreement(runs, tmp_path, capsys):
  out = tmp_path / "m.onnx"
  _export(runs["float"], out)
  capsys.readouterr()
  assert main(["eval", "--workdir", str(runs["float"]), "--json"]) == 0
  ours = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert main(["eval", "--runtime", "onnxruntime", "--exported", str(out), "--workdir",
               str(runs["float"]), "--json"]) == 0
  got = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert got["accuracy"] == ours["accuracy"] and got["runtime"] == "onnxruntime"
  assert got["agreement"] == 1.0 and got["max_logit_diff"] < 1e-4
  assert main(["eval", "--runtime", "onnxruntime", "--workdir", str(runs["float"])]) == 2
  assert "--runtime onnxruntime runs --exported FILE" in capsys.readouterr().err
  assert main(["eval", "--exported", str(out)]) == 2
  assert "add --runtime onnxruntime" in capsys.readouterr().err


def test_unmapped_primitive_is_a_one_line_error_naming_it_and_the_param():
  def fn(p, x):
    return jax.numpy.cumsum(x @ p["fc1/kernel"], axis=-1)
  params = {"fc1/kernel": np.ones((3, 2), np.float32)}
  closed = jax.make_jaxpr(fn)(params, jax.ShapeDtypeStruct((2, 3), np.float32))
  with pytest.raises(ValueError, match=r"no mapping for primitive 'cumsum'.*near param "
                     r"fc1/kernel\)$"):
    onnx_graph.convert(closed, params, {})


def test_missing_extra_names_the_pip_extra(runs, tmp_path, without_onnx, capsys):
  assert main(["export", "--workdir", str(runs["float"]), "--out", str(tmp_path / "m.onnx"),
               "--format", "onnx"]) == 2
  assert "pip install 'jcompress[deploy]'" in capsys.readouterr().err


def test_onnx_options_need_format_onnx(runs, tmp_path, capsys):
  assert main(["export", "--workdir", str(runs["float"]), "--out", str(tmp_path / "m"),
               "--activations", "dynamic"]) == 2
  assert "--activations is for --format onnx" in capsys.readouterr().err


def test_batch_norm_folds_into_int8_convolutions_exactly():
  """A conv's bias and batch norm (random statistics, negative scales too) folded
  into the per-channel scales and signs of its int8 kernel: the model's logits."""
  import types  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import onnx  # pylint: disable=import-outside-toplevel
  from jcompress import models  # pylint: disable=import-outside-toplevel
  from jcompress.transforms import quantize, registry  # pylint: disable=import-outside-toplevel
  from jcompress.transforms.select import flatten, unflatten  # pylint: disable=import-outside-toplevel
  model = models.create("cnn", num_classes=10, input_shape=(16, 16, 3))
  v = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(0),
                                                          jnp.zeros((1, 16, 16, 3)))
  keys = iter(jax.random.split(jax.random.key(1), 100))
  flat = {p: jax.random.uniform(next(keys), a.shape, minval=-1.0) if p.endswith("scale")
          else a for p, a in flatten(v["params"]).items()}  # gammas of both signs
  stats = {p: jax.random.uniform(next(keys), a.shape, minval=0.5 if "var" in p else -1.0)
           for p, a in flatten(v["batch_stats"]).items()}
  method = registry.build("quantize", ["conv1/kernel"], bits=8, granularity="channel")
  trainable, cstate = method.init(unflatten(flat))
  state = types.SimpleNamespace(params=trainable, cstate=cstate, batch_stats=unflatten(stats))
  closed, params = onnx_export.trace(model, state, method, (16, 16, 3))
  graph, int_paths = onnx_graph.convert(closed, params, quantize.onnx_weights(trainable, cstate))
  proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
  assert int_paths == ["conv1/kernel"] and onnx_export.fold_affine(proto) == 1
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 16, 16, 3)), np.float32)
  got = onnx_export.require()[1].InferenceSession(
      proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
  want = jax.jit(lambda t, x: model.apply({"params": method.apply(t, cstate), "batch_stats":
                                           unflatten(stats)}, x, train=False))(trainable, x)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-3)


def test_bench_runtime_times_every_variant_side_by_side(runs, capsys):
  assert main(["bench", "--runtime", "onnxruntime,stablehlo", "--workdir",
               str(runs["quantize"]), "--baseline", str(runs["float"]), "--threads", "1",
               "--batch-sizes", "1,4", "--repeats", "1", "--min-time", "0.001", "--json"]) == 0
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  assert {(r["batch"], r["variant"]) for r in result["rows"]} == {
      (b, v) for b in (1, 4) for v in ("xla fp32", "ort fp32", "ort int8", "stablehlo")}
  assert all(r["seconds"] > 0 and r["threads"] == 1 for r in result["rows"])
  assert result["int8_ops"] and result["file_bytes"]["ort int8"] < result["file_bytes"][
      "ort fp32"]
  assert "| 1 | 4 |" in out and "ort fp32 / int8" in out


@pytest.mark.parametrize("args, message", [
    (["--threads", "1"], "--threads is for bench --runtime"),
    (["--runtime", "tflite"], "argument --runtime: expected a comma-separated list of "
                              "onnxruntime, stablehlo, got 'tflite'"),
    (["--runtime", "onnxruntime", "--batch-sizes", "0"], "argument --batch-sizes: expected"),
    (["--runtime", "onnxruntime", "--execution", "int8"], "--execution is for the per-layer"),
])
def test_bench_runtime_bad_options_are_one_line_errors(runs, capsys, args, message):
  try:  # argparse's own errors (a bad --runtime value) exit 2 from the parser
    code = main(["bench", "--workdir", str(runs["quantize"]), "--baseline",
                 str(runs["float"]), *args])
  except SystemExit as e:
    code = e.code
  assert code == 2 and message in capsys.readouterr().err


def _graph(nodes, inits, shape=(2, 4, 4, 3)):
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
  graph = helper.make_graph(
      nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
      [numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f"
                                          else np.asarray(v).dtype), k)
       for k, v in inits.items()])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_hard_swish_hard_sigmoid_and_means_become_single_ops():
  from onnx import helper  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  chain = lambda x, p: [helper.make_node("Add", [x, "three"], [p + "a"]),
                        helper.make_node("Relu", [p + "a"], [p + "r"]),
                        helper.make_node("Clip", [p + "r", "", "six"], [p + "c"]),
                        helper.make_node("Div", [p + "c", "six"], [p + "d"])]
  nodes = (chain("images", "s") + [helper.make_node("Mul", ["images", "sd"], ["sw"])]
           + chain("sw", "g") + [helper.make_node("Mul", ["images", "gd"], ["m"]),
                                 helper.make_node("ReduceSum", ["m", "axes"], ["rs"],
                                                  keepdims=0),
                                 helper.make_node("Div", ["rs", "hw"], ["out"])])
  proto = _graph(nodes, {"three": 3.0, "six": 6.0, "hw": 16.0, "axes": np.array([1, 2])})
  x = np.random.default_rng(0).normal(0, 4, (2, 4, 4, 3)).astype(np.float32)
  run = lambda: ort.InferenceSession(proto.SerializeToString(), providers=[
      "CPUExecutionProvider"]).run(None, {"images": x})[0]
  want = run()
  assert onnx_qdq.fuse_activations(proto) == 3
  assert [n.op_type for n in proto.graph.node] == ["HardSwish", "HardSigmoid", "Mul",
                                                   "ReduceMean"]
  np.testing.assert_allclose(run(), want, rtol=1e-6, atol=1e-6)


def test_a_relu_after_an_int8_layer_is_its_uint8_range_not_a_requantization():
  """Conv -> Relu -> Conv: the first conv's output is quantized on [0, hi] (the Relu
  is then the identity on it) and the second conv's input takes that scale, so ORT
  runs conv to conv in uint8 with no DequantizeLinear/QuantizeLinear between."""
  from onnx import helper  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  nodes = [helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"k{i}"], axis=0)
           for i in (1, 2, 3)] + [
      helper.make_node("Conv", ["images", "k1"], ["c1"]),
      helper.make_node("Relu", ["c1"], ["r"]),
      helper.make_node("Conv", ["r", "k2"], ["c2"]),  # the last int8 layer's output and
      helper.make_node("Relu", ["c2"], ["r2"]),  # input stay float (the logits layer)
      helper.make_node("Conv", ["r2", "k3"], ["out"])]
  w = lambda c: rng.integers(-127, 127, (4, c, 1, 1)).astype(np.int8)
  proto = _graph(nodes, {"w1": w(3), "w2": w(4), "w3": w(4), "s1": np.full(4, 0.01),
                         "s2": np.full(4, 0.01), "s3": np.full(4, 0.01)}, (2, 3, 5, 5))
  batches = [rng.normal(size=(2, 3, 5, 5)).astype(np.float32) for _ in range(3)]
  onnx_qdq.static(proto, iter(batches))
  inits = {i.name: i for i in proto.graph.initializer}
  from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
  assert numpy_helper.to_array(inits["c1_qzero"]) == 0
  assert numpy_helper.to_array(inits["r_qscale"]) == numpy_helper.to_array(inits["c1_qscale"])


def test_calibration_percentile_clips_outliers_and_100_is_min_max(runs, tmp_path, capsys):
  """A tensor that is N(0, 1) but for one value of 1000: min-max spends its 256
  levels on the outlier (scale ~4), the 99.9th percentile on the bulk (scale ~0.03)."""
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  nodes = [helper.make_node("DequantizeLinear", [f"w{i}", f"s{i}"], [f"k{i}"], axis=0)
           for i in (1, 2)] + [helper.make_node("Conv", ["images", "k1"], ["c1"]),
                               helper.make_node("Conv", ["c1", "k2"], ["out"])]
  w = lambda c: np.ones((c, c, 1, 1), np.int8) * np.eye(c, dtype=np.int8)[:, :, None, None]
  batches = [rng.normal(size=(4, 2, 8, 8)).astype(np.float32) for _ in range(4)]
  batches[0][0, 0, 0, 0] = 1000.0
  scales = {}
  for p in (100.0, 99.9):
    proto = _graph(nodes, {"w1": w(2), "w2": w(2), "s1": np.ones(2), "s2": np.ones(2)},
                   (4, 2, 8, 8))
    onnx_qdq.static(proto, iter(batches), p)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scales[p] = float(inits["images_qscale"])
  assert scales[100.0] > 3.9 and scales[99.9] < 0.05
  assert main(["export", "--workdir", str(runs["quantize"]), "--out", str(tmp_path / "q.onnx"),
               "--format", "onnx", "--calibration-percentile", "30"]) == 2
  assert "--calibration-percentile must be in (50, 100], got 30" in capsys.readouterr().err
