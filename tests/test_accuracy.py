"""Slow: real training on full MNIST reaches the published accuracy band."""

import pytest

from jcompress.cli import main
from jcompress.train.loop import read_metrics


@pytest.mark.slow
def test_lenet300_mnist_accuracy_band(data_dir, tmp_path, capsys):
  args = ["train", "--model", "lenet300", "--dataset", "mnist", "--epochs", "10",
          "--lr", "0.1", "--weight-decay", "1e-4", "--workdir", str(tmp_path),
          "--data-dir", str(data_dir)]
  assert main(args) == 0
  final = read_metrics(tmp_path / "metrics.jsonl")[-1]
  assert final["test_accuracy"] >= 0.980  # Han et al. 2015: 98.36%
  capsys.readouterr()
  assert main(["eval", "--workdir", str(tmp_path), "--data-dir", str(data_dir), "--json"]) == 0
  assert f'"accuracy": {final["test_accuracy"]}' in capsys.readouterr().out
