"""Distillation: the losses by hand, a frozen teacher, adapters, plans and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import cli, models
from jcompress.measure import pipeline
from jcompress.train.compress import compress
from jcompress.train.loop import TrainConfig, context, load_workdir, train_and_evaluate
from jcompress.train.step import init_variables
from jcompress.transforms import base, distill, registry
from jcompress.transforms.distill import prepare


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_kd_loss_matches_hand_computation():
  s, t, T, alpha = np.array([1.0, 2.0, -1.0]), np.array([3.0, 1.0, 0.5]), 2.0, 0.3
  p_t, p_s = _softmax(t / T), _softmax(s / T)
  hard = -np.log(_softmax(s)[0])
  soft = np.sum(p_t * (np.log(p_t) - np.log(p_s)))
  got = distill.kd_loss(jnp.array([s]), jnp.array([t]), jnp.array([0]), temperature=T,
                        alpha=alpha)
  np.testing.assert_allclose(got, [(1 - alpha) * hard + alpha * T * T * soft], rtol=1e-5)
  only_hard = distill.kd_loss(jnp.array([s]), jnp.array([t]), jnp.array([0]),
                              temperature=T, alpha=0.0)
  np.testing.assert_allclose(only_hard, [hard], rtol=1e-5)


def test_feature_losses():
  s, t = jnp.array([[1.0, 0.0], [1.0, 1.0]]), jnp.array([[0.0, 1.0], [2.0, 2.0]])
  np.testing.assert_allclose(distill.feature_loss(s, t, "mse"), [1.0, 1.0])
  np.testing.assert_allclose(distill.feature_loss(s, t, "cosine"), [1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="feature shapes differ"):
    distill.feature_loss(s, t[:, :1])
  with pytest.raises(ValueError, match="--feature-loss"):
    distill.feature_loss(s, t, "l1")


def test_parse_features_and_option_errors():
  assert distill.parse_features("conv2, fc1=fc2") == [("conv2", "conv2"), ("fc1", "fc2")]
  with pytest.raises(ValueError, match="--features"):
    distill.parse_features("=fc1")
  for bad, match in (({"temperature": 0.0}, "--temperature"), ({"alpha": 1.5}, "--alpha"),
                     ({"feature_weight": -1.0}, "--feature-weight")):
    options = {"temperature": 4.0, "alpha": 0.9, "feature_loss": "mse",
               "feature_weight": 1.0, "features": ""} | bad
    with pytest.raises(ValueError, match=match):
      distill.check_options(**options)


def _lenet5(width=1.0):
  model = models.create("lenet5", num_classes=10, input_shape=(28, 28, 1), width=width)
  return model, init_variables(model, (28, 28, 1), 0)


def test_teacher_gets_no_gradient_and_student_does():
  teacher, t_vars = _lenet5()
  student, s_vars = _lenet5(0.5)
  adapters = {"conv2": [25, 50]}
  trainable = {**s_vars["params"], distill.ADAPTERS: distill.init_adapters(adapters)}
  assert trainable[distill.ADAPTERS]["conv2"]["kernel"].shape == (25, 50)
  m = registry.build("distill", teacher="unused", features="conv2", adapters=adapters)
  assert m.captures == ("conv2",)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
  labels = jnp.array([0, 1, 2, 3])

  def loss(trainable, t_vars):
    params = m.apply(trainable, {})
    logits, state = student.apply({"params": params}, images, capture_intermediates=True,
                                  mutable=["intermediates"])
    inputs = base.LossInputs(trainable, {}, logits, labels, images, state["intermediates"],
                             jnp.zeros(()))
    return m.loss(inputs, distill.Teacher(t_vars, teacher))

  g_student, g_teacher = jax.grad(loss, argnums=(0, 1))(trainable, t_vars)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_teacher))
  assert float(jnp.abs(g_student[distill.ADAPTERS]["conv2"]["kernel"]).max()) > 0
  assert float(jnp.abs(g_student["conv1"]["kernel"]).max()) > 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("distill") / "teacher"
  train_and_evaluate(TrainConfig(model="lenet5", dataset="mnist_sample", epochs=1,
                                 batch_size=64, lr=0.01), workdir, log=lambda *_: None)
  return workdir


def test_prepare_sizes_adapters_and_names_bad_layers(teacher):
  student, variables = _lenet5(0.5)
  options = {"teacher": str(teacher), "temperature": 4.0, "alpha": 0.9,
             "features": "conv2,fc1", "feature_loss": "mse", "feature_weight": 1.0,
             "adapters": None}
  ctx = context()
  got = prepare([], options, student, variables, (28, 28, 1), ctx)
  assert got["adapters"] == {"conv2": [25, 50], "fc1": [250, 500]}
  same = prepare([], options | {"features": "conv2"}, *_lenet5(), (28, 28, 1), ctx)
  assert same["adapters"] == {}
  with pytest.raises(ValueError, match="no layer conv9; its layers: conv1, conv2"):
    prepare([], options | {"features": "conv9"}, student, variables, (28, 28, 1), ctx)
  with pytest.raises(ValueError, match="differ in more than the channel width"):
    prepare([], options | {"features": "conv1=conv2"}, student, variables, (28, 28, 1), ctx)
  with pytest.raises(ValueError, match="--teacher"):
    prepare([], options | {"teacher": str(teacher.parent / "none")}, student, variables,
            (28, 28, 1), ctx)
  with pytest.raises(ValueError, match="inputs"):
    prepare([], options, student, variables, (32, 32, 3), ctx)


def test_pruned_student_plan_round_trips_and_keeps_its_zeros(teacher, tmp_path):
  out = tmp_path / "student"
  compress(teacher, out, ["prune", "distill"],
           {"sparsity": "0.8", "teacher": str(teacher), "features": "fc1"},
           select="fc1/kernel", epochs=1, batch_size=64, lr=0.01, log=lambda *_: None)
  model, state, meta, method = load_workdir(out)
  assert [s["method"] for s in meta["compression"]] == ["prune", "distill"]
  assert meta["compression"][1]["options"]["temperature"] == 4.0
  params = method.apply(state.params, state.cstate)
  assert distill.ADAPTERS not in params
  kernel = np.asarray(params["fc1"]["kernel"])
  assert np.mean(kernel == 0) == pytest.approx(0.8, abs=1e-3)
  rows = pipeline(out)
  assert [r["stage"] for r in rows] == ["baseline", "prune + distill"]
  assert rows[1]["exported_bytes"] < rows[0]["exported_bytes"]


def test_train_student_from_scratch_via_cli(teacher, tmp_path, capsys):
  out = tmp_path / "narrow"
  assert cli.main(["train", "--model", "lenet5", "--width", "0.25", "--dataset",
                   "mnist_sample", "--epochs", "1", "--batch-size", "64", "--lr", "0.01",
                   "--workdir", str(out), "--teacher", str(teacher), "--features", "conv2",
                   "--feature-loss", "cosine"]) == 0
  config = json.loads((out / "config.json").read_text())
  assert config["compression"][0]["options"]["adapters"] == {"conv2": [12, 50]}
  assert cli.main(["eval", "--workdir", str(out)]) == 0
  assert cli.main(["train", "--model", "lenet5", "--dataset", "mnist_sample", "--workdir",
                   str(tmp_path / "x"), "--alpha", "0.5"]) == 2
  assert "--alpha needs --teacher" in capsys.readouterr().err
