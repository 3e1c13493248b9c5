"""Every registered model trains through `jcompress train` and is rebuilt from its
checkpoint (a few steps each on small real data)."""

import jax
import numpy as np
import pytest

from jcompress import data, models
from jcompress.cli import main
from jcompress.train.loop import evaluate, load_workdir, read_metrics

# Families whose gradients take long to compile on CPU run with the slow tests.
_HEAVY = {"microbotnet", "mobilenetv2", "squeezenet", "dsc", "dsc-large", "c3d"}


# Presets that build exactly their family's default model are covered by it;
# microbotnet trains and is restored from its checkpoint (on CIFAR-10) by the
# seed002 study's smoke run in tests/test_experiments.py.
_ALIASES = {"dsc-small", "fcn-small", "maxout-large", "microbotnet"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n
    for n in models.names() if n not in _ALIASES])
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
  if ds is not None:
    again = evaluate(model, state, ds.test_images[:32], ds.test_labels[:32], data.spec(dataset),
                     method=method)
    assert again["accuracy"] == pytest.approx(record["test_accuracy"])
