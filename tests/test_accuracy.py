"""Slow: real training on full MNIST reaches the published accuracy band."""

import json

import pytest

from jcompress.cli import main
from jcompress.train.loop import read_metrics


@pytest.mark.slow
def test_lenet300_mnist_accuracy_band(data_dir, tmp_path, capsys):
  base = tmp_path / "base"
  args = ["train", "--model", "lenet300", "--dataset", "mnist", "--epochs", "10",
          "--lr", "0.1", "--weight-decay", "1e-4", "--workdir", str(base),
          "--data-dir", str(data_dir)]
  assert main(args) == 0
  final = read_metrics(base / "metrics.jsonl")[-1]
  assert final["test_accuracy"] >= 0.980  # Han et al. 2015: 98.36%
  capsys.readouterr()
  assert main(["eval", "--workdir", str(base), "--data-dir", str(data_dir), "--json"]) == 0
  assert f'"accuracy": {final["test_accuracy"]}' in capsys.readouterr().out
  # Binary fc1 and fc2 (BinaryConnect / XNOR scale, 1 bit), fc3 float: within 1.5
  # points of the float model, and the binarized layers export at <= 1/25 of float32.
  binary = tmp_path / "binary"
  assert main(["compress", "--from", str(base), "--workdir", str(binary), "--method",
               "binary", "--select", "fc[12]/", "--epochs", "5", "--lr", "1e-3",
               "--optimizer", "adam", "--schedule", "cosine", "--data-dir", str(data_dir)]) == 0
  acc = read_metrics(binary / "metrics.jsonl")[-1]["test_accuracy"]
  assert acc >= final["test_accuracy"] - 0.015
  capsys.readouterr()
  assert main(["export", "--workdir", str(binary), "--out", str(tmp_path / "b.jcm")]) == 0
  header = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  float_binarized, rest = 4 * (784 * 300 + 300 * 100), 4 * (100 * 10 + 300 + 100 + 10)
  assert header["param_bytes"] - rest <= float_binarized / 25
