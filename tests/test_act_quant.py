"""act_quant: the run trains and evaluates the uint8 activation rounding the ONNX file
runs (the exporter's grids, stored in the plan and used by export instead of
calibrating); a Method's ``forward`` hook runs in train, eval and every export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import workdir_logits
from jcompress.cli import main
from jcompress.train.loop import load_workdir
from jcompress.transforms import act_quant, base

TRAIN = ["train", "--model", "lenet5", "--dataset", "mnist_sample", "--epochs", "1",
         "--batch-size", "64", "--train-size", "256", "--optimizer", "adam", "--lr", "1e-3"]
QA = ["--method", "qat", "--method", "act_quant", "--bits", "8", "--batch-size", "64",
      "--train-size", "256", "--test-size", "200", "--calibration-images", "128"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  pytest.importorskip("onnxruntime")
  root = tmp_path_factory.mktemp("act_quant")
  assert main(TRAIN + ["--workdir", str(root / "float")]) == 0
  assert main(["compress", "--from", str(root / "float"), "--workdir", str(root / "qa"),
               "--epochs", "1", *QA]) == 0
  return root


def _images(n=200):
  from jcompress import data  # pylint: disable=import-outside-toplevel
  ds, spec = data.load("mnist_sample"), data.spec("mnist_sample")
  x = np.asarray(ds.test_images[:n], np.float32) / 255
  return ((x - np.asarray(spec.mean)) / np.asarray(spec.std)).astype(np.float32)


def test_fake_quant_is_onnx_quantize_dequantize_with_a_clipped_straight_through_gradient():
  scale, zero = np.float32(0.05), 20
  x = jnp.array([-2.0, -0.99, -0.026, 0.025, 0.075, 3.0, 20.0])
  want = (np.clip(np.round(np.asarray(x) / scale) + zero, 0, 255) - zero) * scale
  np.testing.assert_allclose(act_quant.fake_quant(x, scale, zero), want, rtol=0, atol=1e-7)
  grad = jax.grad(lambda v: act_quant.fake_quant(v, scale, zero).sum())(x)
  assert grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # range [-1.0, 11.75]


def test_bias_rounding_is_the_int32_bias_of_step_input_times_weight_scale():
  # a symmetric 8-bit kernel, one scale: max|w| / 127 = 1 / 127
  kernel = jnp.round(jnp.array([[0.5, -0.25], [-1.0, 0.125]]) * 127) / 127
  a, b = jnp.array([2.0, -0.5]), jnp.array([0.3, 0.01])
  delta = act_quant.bias_rounding(kernel, None, a, b, 0.1, 8)
  step = 0.1 * (1 / 127) * np.abs(np.asarray(a))
  want = np.round(np.asarray(b) / step) * step - np.asarray(b)
  np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-9)
  assert np.all(np.abs(delta) <= step / 2 + 1e-9) and np.any(delta != 0)
  off_grid = act_quant.bias_rounding(kernel + 1e-3, None, a, b, 0.1, 8)
  assert np.all(off_grid == 0)  # not a symmetric 8-bit kernel: no rounding assumed
  scales = np.array([0.01, 0.003])  # per output channel, each column's max code 127
  per_channel = jnp.array([[127.0, -64.0], [-50.0, 127.0]]) * scales
  delta = act_quant.bias_rounding(per_channel, None, a, b, 0.1, 8)
  step = 0.1 * scales * np.abs(np.asarray(a))
  np.testing.assert_allclose(delta, np.round(np.asarray(b) / step) * step - np.asarray(b),
                             rtol=1e-3, atol=1e-7)  # float32 against float64


def test_stack_runs_every_forward_hook_with_its_own_state():
  seen = []

  def hooked(tag):
    import contextlib  # pylint: disable=import-outside-toplevel

    @contextlib.contextmanager
    def forward(trainable, cstate):
      seen.append((tag, cstate))
      yield
    return base.IDENTITY._replace(name=tag, init=lambda p: (p, tag), forward=forward)
  m = base.stack([hooked("a"), base.IDENTITY, hooked("b")])
  t, c = m.init({"w": jnp.ones(2)})
  with m.forward(t, c):
    pass
  assert seen == [("a", "a"), ("b", "b")]
  assert base.stack([base.IDENTITY]).forward is None


def test_plan_stores_the_exporters_grids_and_leaves_the_logits_layer_float(runs):
  plan = json.loads((runs / "qa" / "config.json").read_text())["train_config"]["compression"]
  step = plan[-1]
  assert step["method"] == "act_quant" and step["paths"] == [
      "conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]
  sites = step["options"]["sites"]
  assert sorted(sites) == ["conv1", "conv2", "fc1"]  # fc2 gives the logits: float
  for site in sites.values():
    (s_in, z_in), (s_out, z_out) = site["in"], site["out"]
    assert s_in > 0 and s_out > 0 and 0 <= z_in <= 255 and 0 <= z_out <= 255
  # a layer's input reached from another's output through pooling (and flattening)
  # has that output's grid, as the exporter gives it
  assert sites["conv2"]["in"] == sites["conv1"]["out"]
  assert sites["fc1"]["in"] == sites["conv2"]["out"]


def test_the_workdir_runs_the_rounding_the_onnx_file_runs(runs, tmp_path):
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  out = tmp_path / "qa.onnx"
  assert main(["export", "--workdir", str(runs / "qa"), "--out", str(out),
               "--format", "onnx"]) == 0
  assert json.loads(out.with_name("qa.onnx.json").read_text())["activation_ranges"] == "trained"
  proto = onnx.load(out)
  inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
  scales = {float(inits[n.input[1]]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
  sites = json.loads((runs / "qa" / "config.json").read_text())["train_config"][
      "compression"][-1]["options"]["sites"]
  assert {float(np.float32(s[k][0])) for s in sites.values() for k in ("in", "out")} <= scales
  x = _images()
  got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
      None, {"images": x})[0]
  ours = workdir_logits(runs / "qa", x)
  # ORT's int8 kernels (QLinearConv with int32 biases): the run's rounded activations
  # and biases give its logits to 0.003 (measured; biases not rounded: 0.03, float
  # activations in the run: 0.47)
  assert np.max(np.abs(got - ours)) < 0.015
  assert np.mean(np.argmax(got, -1) == np.argmax(ours, -1)) == 1.0
  model, state, _, method = load_workdir(runs / "qa")  # without the forward hook:
  plain = np.asarray(model.apply({"params": method.apply(state.params, state.cstate)}, x,
                                 train=False))
  assert np.max(np.abs(plain - ours)) > 0.01


def test_exported_files_keep_the_activation_rounding(runs, tmp_path, capsys):
  jcm = tmp_path / "qa.jcm"
  assert main(["export", "--workdir", str(runs / "qa"), "--out", str(jcm)]) == 0
  capsys.readouterr()
  assert main(["eval", "--workdir", str(runs / "qa"), "--json"]) == 0
  ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert main(["eval", "--exported", str(jcm), "--json"]) == 0
  exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (exported["accuracy"], exported["loss"]) == pytest.approx((ran["accuracy"], ran["loss"]),
                                                                   abs=1e-6)
  shlo = tmp_path / "qa.shlo"
  assert main(["export", "--workdir", str(runs / "qa"), "--out", str(shlo),
               "--format", "stablehlo"]) == 0
  capsys.readouterr()
  assert main(["eval", "--runtime", "stablehlo", "--exported", str(shlo), "--workdir",
               str(runs / "qa"), "--json"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["max_logit_diff"] < 1e-5


def test_act_quant_without_the_deploy_extra_names_it(runs, tmp_path, without_onnx, capsys):
  assert main(["compress", "--from", str(runs / "float"), "--workdir", str(tmp_path / "w"),
               "--epochs", "0", *QA]) == 2
  assert "pip install 'jcompress[deploy]'" in capsys.readouterr().err
  assert not (tmp_path / "w" / "checkpoints").exists()
