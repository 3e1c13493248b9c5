"""Optimizers, the train step, the epoch loop, checkpoints and resumption."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress import data, models
from jcompress.checkpoint import Checkpoints
from jcompress.train import optim
from jcompress.train.runs import NonFiniteLossError, differences
from jcompress.train.loop import GENERIC_RECIPE, TrainConfig, load_workdir, \
    read_metrics, train_and_evaluate
from jcompress.train.step import init_state, train_step


def test_step_schedule_and_warmup():
  s = optim.make_schedule("step", 1.0, 100, decay_steps=(50, 75), decay_factor=0.1)
  assert [float(s(t)) for t in (0, 49, 50, 74, 75, 99)] == pytest.approx(
      [1, 1, 0.1, 0.1, 0.01, 0.01])
  w = optim.make_schedule("constant", 0.5, 100, warmup_steps=10)
  assert float(w(0)) == 0.0 and float(w(5)) == pytest.approx(0.25) and float(w(50)) == 0.5
  c = optim.make_schedule("cosine", 1.0, 100)
  assert float(c(0)) == 1.0 and float(c(100)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad, match", [
    (lambda: optim.make_schedule("linear", 1.0, 10), "--schedule 'linear'.*constant, step, cosine"),
    (lambda: optim.make_schedule("constant", -1.0, 10), "--lr"),
    (lambda: optim.make_optimizer("rmsprop", optax.constant_schedule(1.0)), "--optimizer.*sgd"),
    (lambda: TrainConfig(model="lenet300", dataset="mnist", epochs=0).validate(), "--epochs"),
    (lambda: TrainConfig(model="nope", dataset="mnist").validate(), "unknown model 'nope'.*lenet300"),
    (lambda: TrainConfig(model="lenet300", dataset="svhn").validate(), "--dataset 'svhn'.*mnist"),
    (lambda: TrainConfig(model="lenet300", dataset="mnist", model_config={"depth": 3}).validate(),
     "no option depth"),
])
def test_bad_options_name_the_option(bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


def test_recipe_fills_the_options_not_given(monkeypatch):
  """A model's recipe, then the generic defaults, fill the options left None; the
  resume check compares those resolved values, not the Nones."""
  c = TrainConfig(model="lenet5", dataset="mnist", lr=0.02).resolved()
  assert (c.epochs, c.lr, c.weight_decay, c.optimizer, c.schedule) == (
      15, 0.02, 5e-4, "sgd", "cosine")
  for name in ("_REGISTRY", "_DEFAULTS", "_RECIPES"):  # a user's model, for this test only
    monkeypatch.setattr(models, name, dict(getattr(models, name)))
  models.register("recipe-less-net")(lambda num_classes, input_shape: None)
  assert TrainConfig(model="recipe-less-net", dataset="mnist").resolved().lr == \
      GENERIC_RECIPE["lr"]
  with pytest.raises(ValueError, match="a recipe sets only epochs.*not batch_size"):
    models.register("bad-recipe-net", recipe={"batch_size": 64})
  saved = dataclasses.asdict(TrainConfig(model="lenet300", dataset="mnist").resolved())
  meta = {"compression": [], "train_config": saved}
  assert differences(meta, TrainConfig(model="lenet300", dataset="mnist")) == []
  meta["train_config"] = saved | {"lr": 0.05}
  assert differences(meta, TrainConfig(model="lenet300", dataset="mnist")) == [
      "--lr: saved 0.05, now 0.1"]


def test_weight_decay_skips_biases():
  params = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx = optim.make_optimizer("sgd", optax.constant_schedule(1.0), momentum=0, weight_decay=0.5)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["fc"]["kernel"], -0.5)
  np.testing.assert_allclose(updates["fc"]["bias"], 0.0)


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_train_step_learns_and_traces_once(name):
  ds = data.load("mnist_sample")
  spec = data.spec("mnist_sample")
  model = models.create(name, num_classes=10, input_shape=spec.image_shape)
  tx = optax.adam(1e-3)
  state = init_state(model, tx, spec.image_shape, seed=0)
  traces = []

  def step(state, batch):
    traces.append(1)
    return train_step(state, batch, model=model, tx=tx)

  step = jax.jit(step)
  batch = next(data.batches(ds.train_images[:64], ds.train_labels[:64], 64,
                            mean=spec.mean, std=spec.std))
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert len(traces) == 1
  assert int(state.step) == 5 and losses[-1] < losses[0]


def _config(**kw):
  base = dict(model="lenet300", dataset="mnist_sample", epochs=2, batch_size=64, lr=1e-3,
              optimizer="adam", schedule="constant", train_size=512)
  return TrainConfig(**{**base, **kw})


def test_resume_equals_uninterrupted_run(tmp_path):
  straight = train_and_evaluate(_config(epochs=3), tmp_path / "a")
  train_and_evaluate(_config(epochs=2), tmp_path / "b")
  resumed = train_and_evaluate(_config(epochs=3), tmp_path / "b")
  assert resumed == pytest.approx({**straight, "images_per_sec": resumed["images_per_sec"],
                                   "epoch_seconds": resumed["epoch_seconds"]})
  a = load_workdir(tmp_path / "a")[1]
  _, b, meta, _ = load_workdir(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert meta["epoch"] == 3 and meta["model"] == "lenet300"
  assert [r["epoch"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]


def test_checkpoints_keep_best_and_last(tmp_path):
  train_and_evaluate(_config(epochs=4, keep=1), tmp_path)
  ckpts = Checkpoints(tmp_path)
  best = max(read_metrics(tmp_path / "metrics.jsonl"), key=lambda r: r["test_accuracy"])
  assert set(ckpts.steps()) == {best["epoch"], 4}
  assert ckpts.resolve("best") == best["epoch"]
  kept = ", ".join(map(str, sorted({best["epoch"], 4})))
  with pytest.raises(ValueError, match=f"--checkpoint 9 not found; valid: latest, best, {kept}$"):
    ckpts.resolve(9)
  ckpts.close()


def test_different_model_names_mismatched_paths(tmp_path):
  train_and_evaluate(_config(epochs=1), tmp_path)
  with pytest.raises(ValueError, match=r"(?s)does not fit --model lenet5.*conv1/kernel.*fc3/kernel"):
    train_and_evaluate(_config(model="lenet5", epochs=2), tmp_path)
  assert len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  train_and_evaluate(_config(epochs=1, optimizer="sgd", lr=0.01), tmp_path)
  before = load_workdir(tmp_path)[1].params
  # The resumed run must keep its settings (--lr too), so its optimizer diverges instead.
  make = optim.make_optimizer
  monkeypatch.setattr(optim, "make_optimizer", lambda name, schedule, **kw: make(
      name, optax.constant_schedule(1e30), **kw))
  with pytest.raises(NonFiniteLossError, match="epoch 2.*last good checkpoint \\(epoch 1\\)"):
    train_and_evaluate(_config(epochs=2, optimizer="sgd", lr=0.01), tmp_path)
  assert Checkpoints(tmp_path).steps() == [1]
  jax.tree.map(np.testing.assert_array_equal, before, load_workdir(tmp_path)[1].params)
  assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_metrics_and_config_files(tmp_path):
  record = train_and_evaluate(_config(epochs=1), tmp_path)
  line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert line == record
  assert {"epoch", "train_loss", "test_accuracy", "images_per_sec", "lr"} <= line.keys()
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"] == "lenet300" and config["input_shape"] == [28, 28, 1]
