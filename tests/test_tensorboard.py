"""TensorBoard event files of train and compress: the tags and steps, read back without
TensorFlow; a resumed run appends without duplicate steps; the option's errors (and
compress --dtype bfloat16 recorded)."""

import json

import pytest

from jcompress import cli
from jcompress.train import tensorboard

pytest.importorskip("tensorboardX")

# 256 images in batches of 64: 4 steps an epoch.
_FAST = ["--model", "fcn-small", "--width", "32", "--dataset", "mnist_sample",
         "--batch-size", "64", "--train-size", "256", "--test-size", "100"]
_EPOCH_TAGS = {f"epoch/{k}" for k in ("train_loss", "train_accuracy", "test_loss",
                                      "test_accuracy", "lr", "images_per_sec")}


def _steps(scalars, tag):
  return [step for step, _ in scalars[tag]]


def test_train_resume_and_compress_write_event_files(tmp_path):
  run = tmp_path / "run"
  assert cli.main(["train", *_FAST, "--epochs", "1", "--log-every", "2", "--workdir",
                   str(run)]) == 0
  assert cli.main(["train", *_FAST, "--epochs", "2", "--log-every", "2", "--workdir",
                   str(run)]) == 0  # resumed: a second events file
  assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
  scalars = tensorboard.read_scalars(run / "tensorboard")
  assert _EPOCH_TAGS <= set(scalars)
  for tag in _EPOCH_TAGS:
    assert _steps(scalars, tag) == [4, 8], tag
  for tag in ("train/loss", "train/accuracy", "train/lr"):
    assert _steps(scalars, tag) == [2, 4, 6, 8], tag
  # images/s: not over an epoch's first (compiling) step alone
  assert _steps(scalars, "train/images_per_sec") == [2, 4, 6, 8]
  metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [v for _, v in scalars["epoch/test_accuracy"]] == pytest.approx(
      [m["test_accuracy"] for m in metrics], abs=1e-6)

  out = tmp_path / "q"
  assert cli.main(["compress", "--from", str(run), "--workdir", str(out), "--method",
                   "quantize", "--bits", "4", "--epochs", "1", "--batch-size", "64",
                   "--train-size", "256", "--log-every", "1", "--dtype", "bfloat16"]) == 0
  scalars = tensorboard.read_scalars(out / "tensorboard")
  assert _steps(scalars, "train/loss") == [1, 2, 3, 4]
  assert _steps(scalars, "epoch/test_accuracy") == [4]
  # 4-bit params: an eighth of the float run's bytes for the quantized kernels
  quantized = scalars["compression/param_bytes"][-1][1]
  dense = tensorboard.read_scalars(run / "tensorboard")["compression/param_bytes"][-1][1]
  assert quantized < dense / 4 and 0 <= scalars["compression/sparsity"][-1][1] < 1
  saved = json.loads((out / "config.json").read_text())
  assert saved["train_config"]["dtype"] == "bfloat16"
  # another dtype is another run: refused, not resumed
  assert cli.main(["compress", "--from", str(run), "--workdir", str(out), "--method",
                   "quantize", "--bits", "4", "--epochs", "1", "--batch-size", "64",
                   "--train-size", "256"]) == 2


def test_resume_drops_the_events_after_the_checkpoint(tmp_path):
  board = tensorboard.Board(tmp_path, schedule=lambda step: 0.1, log_every=1)
  for step in range(1, 9):
    board.step(step, {"loss": 1.0, "correct": 1, "count": 2})
  board.epoch({"step": 4, "test_loss": 1.0})
  board.epoch({"step": 8, "test_loss": 0.5})
  board.close()
  board = tensorboard.Board(tmp_path, schedule=lambda step: 0.1, log_every=1, resume_step=4)
  for step in range(5, 7):
    board.step(step, {"loss": 1.0, "correct": 1, "count": 2})
  board.close()
  scalars = tensorboard.read_scalars(tmp_path)
  assert _steps(scalars, "train/loss") == [1, 2, 3, 4, 5, 6]
  assert _steps(scalars, "epoch/test_loss") == [4]


def test_no_tensorboard_and_missing_extra(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(tensorboard, "available", lambda: False)
  assert cli.main(["train", *_FAST, "--epochs", "1", "--tensorboard", "--workdir",
                   str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip()
  assert "--tensorboard needs tensorboardX" in err and "jcompress[tensorboard]" in err
  assert "\n" not in err
  assert tensorboard.enabled(None) is False and tensorboard.enabled(False) is False
