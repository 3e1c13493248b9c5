"""The jcompress command: options, errors, eval --json, demo, kill-and-resume."""

import json
import signal
import subprocess
import sys
import time

import pytest

from jcompress.cli import main

TRAIN = ["train", "--model", "lenet300", "--dataset", "mnist_sample", "--epochs", "1",
         "--batch-size", "64", "--train-size", "256", "--optimizer", "adam", "--lr", "1e-3"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet", "--dataset", "mnist", "--workdir", "w"], "invalid choice: 'resnet'"),
    # Not a tfds name either (a lower-case one is looked up in tfds: test_tfds_data.py)
    (["train", "--model", "lenet5", "--dataset", "SVHN!", "--workdir", "w"], "invalid choice: 'SVHN!'"),
    (["train", "--model", "lenet5", "--dataset", "mnist", "--optimizer", "lion", "--workdir", "w"],
     "choose from 'sgd', 'adam', 'adamw'"),
    (["train", "--model", "lenet5", "--dataset", "mnist", "--schedule", "poly", "--workdir", "w"],
     "choose from 'constant', 'step', 'cosine'"),
])
def test_unknown_values_list_valid_ones(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert message in err and ("lenet300" in err or "sgd" in err or "constant" in err or "mnist" in err)


@pytest.mark.parametrize("extra, message", [
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--model-arg", "depth=3"], "no option depth"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
])
def test_bad_values_name_the_option(extra, message, tmp_path, capsys):
  assert main(TRAIN + ["--workdir", str(tmp_path)] + extra) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_eval_without_checkpoint_is_an_error(tmp_path, capsys):
  assert main(["eval", "--workdir", str(tmp_path)]) == 2
  assert "has no checkpoints" in capsys.readouterr().err


def test_train_then_eval_json_reproduces_accuracy(tmp_path, capsys):
  assert main(TRAIN + ["--workdir", str(tmp_path)]) == 0
  trained = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  capsys.readouterr()
  assert main(["eval", "--workdir", str(tmp_path), "--json"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["accuracy"] == pytest.approx(trained["test_accuracy"], abs=1e-6)
  assert result["loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
  assert result["params"] == 266_610


def test_demo_trains_compresses_exports_and_evaluates(tmp_path, capsys):
  assert main(["demo", "--epochs", "1", "--workdir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  table = [line for line in out.splitlines() if line.startswith("| ")]
  assert table[0].startswith("| Model | Accuracy | Params | Nonzero MACs | Exported bytes")
  names = [line.split(" | ")[0][2:] for line in table[1:]]
  assert names == ["float32 baseline", "TTQ (ternary)", "prune 90%", "QAT 4-bit",
                   "prune 90% + QAT 4-bit"]
  ratios = {n: float(line.split(" | ")[5][:-1]) for n, line in zip(names, table[1:])}
  assert ratios["float32 baseline"] == 1.0 and ratios["prune 90% + QAT 4-bit"] > 10
  assert sorted(p.name for p in tmp_path.glob("*.jcm")) == [
      "base.jcm", "prune-q4.jcm", "prune.jcm", "q4.jcm", "ttq.jcm"]
  assert "jcompress train    --model lenet300 --dataset mnist" in out


def _run(args, **kw):
  return subprocess.Popen([sys.executable, "-m", "jcompress.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_mid_epoch_resumes_without_loss(tmp_path):
  workdir = tmp_path / "run"
  # Batch 8: 250 steps per epoch, so the kill lands inside epoch 2 on a fast machine too.
  args = ["train", "--model", "lenet5", "--dataset", "mnist_sample", "--epochs", "3",
          "--batch-size", "8", "--optimizer", "adam", "--lr", "1e-3",
          "--schedule", "constant", "--workdir", str(workdir)]
  metrics = workdir / "metrics.jsonl"
  proc = _run(args)
  deadline = time.time() + 240
  while not (metrics.exists() and metrics.read_text().count("\n") >= 1
             and (workdir / "checkpoints" / "1").exists()):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "first epoch did not finish"
    time.sleep(0.05)
  time.sleep(0.3)  # into epoch 2
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  first = metrics.read_text().splitlines()
  assert len(first) == 1, "killed too late: epoch 2 had finished"
  resumed = _run(args)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert "resuming from" in out and "(epoch 1 of 3)" in out
  lines = metrics.read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
  assert lines[0] == first[0]
  straight = _run([*args[:-1], str(tmp_path / "straight")])
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out
  final = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
  assert json.loads(lines[-1])["test_accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-6)


def _last_json(capsys):
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv, params, macs", [
    (["--model", "lenet5"], 431_080, 2_293_000),
    (["--model", "lenet300", "--dataset", "mnist"], 266_610, 266_200),
    (["--model", "fcn-large", "--input-shape", "1000", "--num-classes", "255"], 1_435_391, 1_428_992),
    (["--model", "microbotnet", "--dataset", "cifar10"], 236_658, 782_368),
    (["--model", "microbotnet", "--width", "1.0", "--dataset", "cifar10"], 2_044_298, None),
])
def test_summary_json(argv, params, macs, capsys):
  assert main(["summary", *argv, "--format", "json"]) == 0
  out = _last_json(capsys)
  assert out["params"] == params and (macs is None or out["macs"] == macs)
  assert out["bytes"] == 4 * params and out["layers"]


def test_summary_formats_and_errors(capsys):
  assert main(["summary", "--model", "lenet300", "--format", "latex"]) == 0
  assert "\\\\" in capsys.readouterr().out
  assert main(["summary"]) == 2
  assert "give --model NAME or --workdir DIR" in capsys.readouterr().err
  assert main(["summary", "--model", "lenet300", "--pj-per-mac", "0"]) == 2
  assert "--pj-per-mac" in capsys.readouterr().err


def test_summary_and_eval_of_a_quantized_workdir(tmp_path, capsys):
  src, dst = tmp_path / "src", tmp_path / "q8"
  assert main(TRAIN + ["--workdir", str(src)]) == 0
  assert main(["compress", "--from", str(src), "--workdir", str(dst), "--method", "quantize",
               "--bits", "8", "--keep-ends"]) == 0
  capsys.readouterr()
  assert main(["summary", "--workdir", str(dst), "--format", "json"]) == 0
  out = _last_json(capsys)
  fc2 = next(layer for layer in out["layers"] if layer["path"] == "fc2")
  assert fc2["weight_bits"] == 8
  assert out["bytes"] == 4 * 266_610 - 3 * 300 * 100
  assert out["bytes"] <= out["exported_bytes"] <= out["bytes"] + 16  # + one float32 scale
  assert 0 < out["error"] < 1 and out["score"] > 0
  assert main(["eval", "--workdir", str(dst), "--json"]) == 0
  result = _last_json(capsys)
  assert {"accuracy", "loss", "params", "macs", "bytes", "score"} <= result.keys()
  assert result["macs"] == 266_200 and result["bytes"] == out["bytes"]
