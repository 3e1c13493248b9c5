"""Exported files as sources: ``train --init-from FILE``, ``compress --from FILE`` and
``--teacher FILE`` start from a file ``jcompress export`` wrote (published weights)."""

import json

import numpy as np
import pytest

from jcompress.cli import main
from jcompress.train.loop import load_source, load_workdir

DATA = ["--dataset", "mnist_sample", "--batch-size", "64", "--train-size", "256"]
TRAIN = ["train", "--model", "lenet300", *DATA, "--epochs", "1", "--optimizer", "adam",
         "--lr", "1e-3"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """A 4-bit quantized run and the file it exported."""
  root = tmp_path_factory.mktemp("published")
  assert main(TRAIN + ["--workdir", str(root / "base")]) == 0
  assert main(["compress", "--from", str(root / "base"), "--workdir", str(root / "q4"),
               "--method", "quantize", "--bits", "4", "--epochs", "0"]) == 0
  assert main(["export", "--workdir", str(root / "q4"), "--out", str(root / "q4.jcz")]) == 0
  return root


def _logits(loaded, x):
  model, state, _, method = loaded
  variables = {"params": method.apply(state.params, state.cstate)}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return np.asarray(model.apply(variables, x, train=False))


def test_an_exported_file_loads_as_its_workdir_model_with_no_plan(published):
  model, state, meta, method = loaded = load_source(published / "q4.jcz")
  assert meta["compression"] == [] and meta["exported_from"][0]["method"] == "quantize"
  x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(_logits(loaded, x), _logits(load_workdir(published / "q4"), x),
                             rtol=1e-5, atol=1e-5)


def test_train_compress_and_teacher_accept_an_exported_file(published, capsys):
  out, file = published, str(published / "q4.jcz")
  assert main(["train", "--model", "lenet300", *DATA, "--epochs", "0", "--init-from", file,
               "--workdir", str(out / "start")]) == 0
  assert main(["compress", "--from", file, "--workdir", str(out / "pruned"), "--method",
               "prune", "--sparsity", "0.5", "--epochs", "0"]) == 0
  plan = json.loads((out / "pruned" / "config.json").read_text())["train_config"]["compression"]
  assert [step["method"] for step in plan] == ["prune"]
  assert main(TRAIN + ["--teacher", file, "--workdir", str(out / "student")]) == 0
  capsys.readouterr()
  # The published file and a run started from it (0 epochs) give the same accuracy.
  assert main(["eval", "--exported", file, "--json"]) == 0
  exported = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert main(["eval", "--workdir", str(out / "start"), "--json"]) == 0
  start = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert start["accuracy"] == exported["accuracy"]


def test_a_mismatched_exported_file_names_the_option(published, capsys):
  assert main(["train", "--model", "lenet5", *DATA, "--epochs", "1", "--init-from",
               str(published / "q4.jcz"), "--workdir", str(published / "bad")]) == 2
  err = capsys.readouterr().err
  assert "--init-from" in err and "lenet300" in err and len(err.strip().splitlines()) == 1
