"""``--config FILE``: JSON/YAML options, flags overriding them, unknown keys refused,
and a train run's own config.json replaying the run exactly."""

import json

import pytest

from jcompress import cli

_FAST = {"model": "fcn-small", "dataset": "mnist_sample", "epochs": 1, "batch_size": 64,
         "train_size": 256, "test_size": 100, "width": 32}


def _run(*argv) -> int:
  return cli.main([*argv, "--no-compile-cache"])


def _metrics(workdir) -> list[dict]:
  drop = ("images_per_sec", "epoch_seconds")
  return [{k: v for k, v in json.loads(line).items() if k not in drop}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_run_config_json_replays_the_run(tmp_path):
  first, again = tmp_path / "first", tmp_path / "again"
  argv = [f"--{k.replace('_', '-')}={v}" for k, v in _FAST.items()]
  assert _run("train", *argv, "--workdir", str(first)) == 0
  assert _run("train", "--config", str(first / "config.json"), "--workdir", str(again)) == 0
  saved = [json.loads((w / "config.json").read_text()) for w in (first, again)]
  assert saved[0] == saved[1]
  assert _metrics(first) == _metrics(again)


def test_yaml_and_json_with_flags_overriding(tmp_path):
  (tmp_path / "c.yaml").write_text("\n".join(f"{k}: {v}" for k, v in _FAST.items())
                                    + "\nlr: 0.5\ndecay_epochs: []\naugment: false\n")
  assert _run("train", "--config", str(tmp_path / "c.yaml"), "--workdir",
              str(tmp_path / "y"), "--lr", "0.02") == 0
  train = json.loads((tmp_path / "y" / "config.json").read_text())["train_config"]
  assert (train["lr"], train["batch_size"], train["augment"]) == (0.02, 64, False)
  (tmp_path / "c.json").write_text(json.dumps({"method": ["quantize"], "bits": 4,
                                               "epochs": 0, "batch-size": 64}))
  assert _run("compress", "--config", str(tmp_path / "c.json"), "--from",
              str(tmp_path / "y"), "--workdir", str(tmp_path / "q")) == 0
  plan = json.loads((tmp_path / "q" / "config.json").read_text())["compression"]
  assert plan[0]["method"] == "quantize" and plan[0]["options"]["bits"] == 4


@pytest.mark.parametrize("content, message", [
    ({"lrr": 0.1}, "unknown option 'lrr'; valid: "),
    ({"lr": "fast"}, "lr: expected a number"),
    ({"optimizer": "rmsprop"}, "optimizer: 'rmsprop' is not one of"),
    ({"augment": "yes"}, "augment: expected true or false"),
    ([1, 2], "expected an object of options"),
])
def test_bad_config_is_one_line_error(tmp_path, capsys, content, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(content))
  assert _run("train", "--config", str(path), "--workdir", str(tmp_path / "w")) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jcompress train: error: --config") and message in err
  assert "\n" not in err


def test_missing_or_unparsable_file(tmp_path, capsys):
  assert _run("train", "--config", str(tmp_path / "none.yaml"), "--workdir", "w") == 2
  assert "none.yaml" in capsys.readouterr().err
  (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
  assert _run("train", "--config", str(tmp_path / "bad.yaml"), "--workdir", "w") == 2
  assert "not valid YAML" in capsys.readouterr().err


def test_compress_config_json_replays_the_run(tmp_path, capsys):
  src, first, again = tmp_path / "src", tmp_path / "first", tmp_path / "again"
  argv = [f"--{k.replace('_', '-')}={v}" for k, v in _FAST.items()]
  assert _run("train", *argv, "--workdir", str(src)) == 0
  assert _run("compress", "--from", str(src), "--workdir", str(first), "--method", "prune",
              "--sparsity", "0.5", "--select", "fc[23]", "--epochs", "1", "--batch-size",
              "64", "--train-size", "256", "--test-size", "100", "--no-tensorboard") == 0
  assert _run("compress", "--config", str(first / "config.json"), "--workdir", str(again)) == 0
  saved = [json.loads((w / "config.json").read_text()) for w in (first, again)]
  assert saved[0] == saved[1]
  assert saved[0]["compress_config"]["options"] == {"sparsity": "0.5"}
  assert _metrics(first) == _metrics(again)
  assert not (again / "tensorboard").exists()  # --no-tensorboard replayed too
  capsys.readouterr()
  assert _run("train", "--config", str(first / "config.json"), "--workdir", "w") == 2
  assert "replay it with jcompress compress --config" in capsys.readouterr().err


def _parsed(*argv):
  """``argv`` parsed as ``cli.main`` parses it, nothing run."""
  top = cli.parser()
  return top.parse_args(cli._apply_config(top, list(argv), argv[0]))


def test_python_config_and_dotted_overrides(tmp_path):
  pytest.importorskip("ml_collections")
  (tmp_path / "c.py").write_text(
      '"""jcompress train --config c.py --workdir runs/c"""\n'
      "import ml_collections\n\n\n"
      "def get_config():\n"
      "  config = ml_collections.ConfigDict()\n"
      "  config.model = 'fcn-small'\n  config.dataset = 'mnist_sample'\n"
      "  config.lr = 0.5\n  config.batch_size = 32\n  config.augment = False\n"
      "  config.model_arg = {'batch_norm': False}\n"
      "  return config\n")
  args = _parsed("train", "--config", str(tmp_path / "c.py"), "--config.lr=0.1",
                 "--config.augment", "true", "--workdir", "w", "--batch-size", "16")
  assert (args.model, args.lr, args.augment, args.batch_size) == ("fcn-small", 0.1, True, 16)
  assert args.model_arg == [("batch_norm", False)]
  # flags override --config.KEY, which overrides the file
  assert _parsed("train", "--config", str(tmp_path / "c.py"), "--config.lr=0.1", "--lr",
                 "0.3", "--workdir", "w").lr == 0.3
  # a plain-dict get_config(), nested keys as METHOD.NAME, "from" as --from
  (tmp_path / "q.py").write_text(
      "def get_config():\n"
      "  return {'from': 'runs/base', 'method': ['ttq'], 'ttq': {'threshold': 0.1}}\n")
  args = _parsed("compress", "--config", str(tmp_path / "q.py"), "--workdir", "w",
                 "--config.ttq.scale_init=one")  # the option's dest is ttq.scale-init
  assert (args.source, args.method, vars(args)["ttq.threshold"]) == ("runs/base", ["ttq"], "0.1")
  assert vars(args)["ttq.scale-init"] == "one"


@pytest.mark.parametrize("argv, message", [
    (["--config.lrr=0.1"], "--config.lrr: unknown option 'lrr'; valid: "),
    (["--config.lr=fast"], "--config.lr: expected a number"),
    (["--config.lr"], "--config.lr needs a value"),
])
def test_bad_override_is_one_line_error(capsys, argv, message):
  assert _run("train", "--model", "lenet5", "--dataset", "mnist", *argv,
              "--workdir", "w") == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("jcompress train: error: ") and message in err and "\n" not in err


def test_python_config_errors(tmp_path, capsys):
  (tmp_path / "none.py").write_text("x = 1\n")
  (tmp_path / "boom.py").write_text("def get_config():\n  return 1 / 0\n")
  for name, message in (("none.py", "defines no get_config()"),
                        ("boom.py", "ZeroDivisionError: division by zero")):
    assert _run("train", "--config", str(tmp_path / name), "--workdir", "w") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jcompress train: error: --config {tmp_path / name}: ")
    assert message in err and "\n" not in err
