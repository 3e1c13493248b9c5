"""Every registered model trains through `jcompress train` and is rebuilt from its
checkpoint (a few steps each on small real data)."""

import json

import jax
import numpy as np
import pytest

from jcompress import data, models
from jcompress.data import order
from jcompress.cli import main
from jcompress.train.loop import evaluate, load_workdir, read_metrics

# Families whose gradients take long to compile on CPU run with the slow tests; the
# slowest (mobilenetv2: about 40 s a test alone, in no study) with `pytest -m heavy`,
# to keep CI under its time.
_HEAVY = {"microbotnet", "mobilenetv2", "squeezenet", "dsc", "dsc-large", "c3d"}
_HEAVIEST = {"mobilenetv2"}


# Presets that build exactly their family's default model are covered by it;
# microbotnet trains and is restored from its checkpoint (on CIFAR-10) by the
# seed002 study's smoke run in tests/test_experiments.py.
_ALIASES = {"dsc-small", "fcn-small", "maxout-large", "microbotnet"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.heavy if n in _HEAVIEST else pytest.mark.slow)
    if n in _HEAVY else n for n in models.names() if n not in _ALIASES])
def test_model_trains_and_restores(name, tmp_path, request):
  dataset = "moving_mnist" if name == "c3d" else "mnist_sample"
  argv = ["train", "--model", name, "--dataset", dataset, "--epochs", "1", "--batch-size", "16",
          "--train-size", "32", "--test-size", "32", "--optimizer", "adam", "--lr", "1e-3",
          "--workdir", str(tmp_path)]
  if name == "c3d":
    argv += ["--data-dir", str(request.getfixturevalue("data_dir"))]
  assert main(argv) == 0
  record = read_metrics(tmp_path / "metrics.jsonl")[-1]
  assert np.isfinite(record["train_loss"]) and record["step"] == 2
  model, state, meta, method = load_workdir(tmp_path)
  assert meta["model"] == name
  means = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
      state.batch_stats) if "mean" in jax.tree_util.keystr(path)]
  assert all(np.any(m != 0) for m in means)  # batch norm statistics were updated
  ds = data.load(dataset, verbose=False) if name != "c3d" else None
  if ds is not None:  # --test-size 32 evaluated this stratified subset each epoch
    keep = order.stratified(ds.test_labels, 32)
    again = evaluate(model, state, ds.test_images[keep], ds.test_labels[keep],
                     data.spec(dataset), method=method)
    assert again["accuracy"] == pytest.approx(record["test_accuracy"])


# Presets that share their family's constructor and recipe are covered by it; README's
# two models run with the fast tests (about 5 s each), the others with the slow ones.
_SAME_RECIPE = {"dsc-small", "fcn-small", "maxout-large"}
_FAST_RECIPES = {"lenet300", "lenet5"}


@pytest.mark.parametrize("name", [
    n if n in _FAST_RECIPES else pytest.param(
        n, marks=pytest.mark.heavy if n in _HEAVIEST else pytest.mark.slow)
    for n in models.names() if n not in _SAME_RECIPE])
def test_model_recipe_trains_without_options(name, tmp_path, request):
  """`jcompress train` with only the data size given trains every model on its own
  recipe (lr, optimizer, weight decay, warm-up: LeNet-5 diverged at the old generic
  lr 0.05) to a finite, decreasing loss, and config.json records the resolved values."""
  dataset = "moving_mnist" if name == "c3d" else "mnist_sample"
  argv = ["train", "--model", name, "--dataset", dataset, "--epochs", "3", "--batch-size", "32",
          "--train-size", "256", "--test-size", "64", "--workdir", str(tmp_path)]
  if name == "c3d":
    argv += ["--data-dir", str(request.getfixturevalue("data_dir"))]
  assert main(argv) == 0
  losses = [r["train_loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  saved = json.loads((tmp_path / "config.json").read_text())["train_config"]
  assert {k: saved[k] for k in models.recipe(name)} == models.recipe(name) | {"epochs": 3}
