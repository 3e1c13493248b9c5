"""What the commands print and refuse (issue 19): errors that name the option given
and say what differs, options that do not apply refused, bytes as integers with
units, aligned keys, tables alone for markdown and LaTeX, "1 epoch", Tucker's ranks
printed once at ``compress`` and kept in the plan, ``--ramp-steps`` and
``summary --pipeline``."""

import json
import logging
import re

import pytest

from jcompress import report
from jcompress.cli import main
from jcompress.transforms import registry

from test_adversarial import _fails

LENET5 = ["--model", "lenet5", "--dataset", "mnist_sample", "--epochs", "1", "--batch-size",
          "64", "--train-size", "256"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A one-epoch LeNet-5, its Tucker compression and its 4-bit quantization."""
  root = tmp_path_factory.mktemp("output")
  assert main(["train", *LENET5, "--workdir", str(root / "base")]) == 0
  assert main(["compress", "--from", str(root / "base"), "--workdir", str(root / "q4"),
               "--method", "quantize", "--bits", "4"]) == 0
  return root


def _out(capsys) -> str:
  return capsys.readouterr().out


# --- item 4: --init-from / --from --------------------------------------------------

def test_init_from_mismatch_names_the_option_and_what_differs(runs, tmp_path, capsys):
  line = _fails(["train", *LENET5, "--width", "0.5", "--init-from", str(runs / "base"),
                 "--workdir", str(tmp_path / "w")], capsys)
  assert f"--init-from {runs / 'base'} does not fit this run: its model option width is the " \
         "model's default, this run's 0.5" in line
  line = _fails(["train", "--model", "lenet300", "--dataset", "mnist_sample", "--init-from",
                 str(runs / "base"), "--workdir", str(tmp_path / "w")], capsys)
  assert "it holds model lenet5, this run trains lenet300" in line
  assert " --from " not in line and "{" not in line
  line = _fails(["train", *LENET5, "--init-from", str(runs / "q4"), "--workdir",
                 str(tmp_path / "w")], capsys)
  assert "it was compressed with quantize, this run starts uncompressed" in line
  assert not (tmp_path / "w").exists()
  line = _fails(["train", *LENET5, "--init-from", str(runs / "base"), "--workdir",
                 str(runs / "base")], capsys)
  assert "--workdir must differ from --init-from" in line
  line = _fails(["compress", "--from", str(runs / "base"), "--workdir", str(runs / "base"),
                 "--method", "quantize"], capsys)
  assert "--workdir must differ from --from" in line


# --- options that do not apply ------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["train", *LENET5, "--decay-epochs", "0.5"],
     "--decay-epochs applies to --schedule step only, not cosine"),
    (["summary", "--model", "lenet5", "--dataset", "mnist", "--input-shape", "28,28,1"],
     "--input-shape and --dataset both set the input shape: give one"),
    (["summary", "--model", "lenet5", "--pipeline"], "--pipeline needs --workdir"),
    (["summary", "--model", "lenet5", "--checkpoint", "best"], "--checkpoint needs --workdir"),
    (["summary", "--model", "lenet5", "--data-dir", "d"], "--data-dir is read by --pipeline only"),
    (["eval", "--exported", "m.jcm", "--checkpoint", "best"], "--checkpoint needs --workdir"),
    (["eval", "--exported", "m.jcm", "--execution", "int8"],
     "--execution int8 needs --workdir: an exported file holds decompressed tensors"),
])
def test_options_that_do_not_apply_are_errors(argv, message, tmp_path, capsys):
  argv = argv + (["--workdir", str(tmp_path / "w")] if argv[0] == "train" else [])
  assert message in _fails(argv, capsys)
  assert not (tmp_path / "w").exists()


def test_model_options_with_a_workdir_are_errors(runs, capsys):
  for extra in (["--width", "0.5"], ["--dataset", "mnist"], ["--num-classes", "3"]):
    line = _fails(["summary", "--workdir", str(runs / "base"), *extra], capsys)
    assert f"{extra[0]} describes a --model; with --workdir the run gives the model" in line


def test_failed_train_leaves_no_workdir(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("JCOMPRESS_DATA_DIR", raising=False)
  workdir = tmp_path / "new" / "run"
  assert main(["train", "--model", "lenet300", "--dataset", "fashion_mnist", "--data-dir",
               str(tmp_path / "no-data"), "--workdir", str(workdir)]) == 2
  assert capsys.readouterr().err.startswith(
      "jcompress train: error: no source holds dataset 'fashion_mnist'")
  assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv", [
    ["compress", "--from", "a", "--workdir", "b", "--method", "prune", "--steps", "8"],
    ["summary", "--workdir", "a", "--steps"]])
def test_steps_is_gone(argv, capsys):
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2 and "unrecognized arguments: --steps" in capsys.readouterr().err


def test_plans_saved_with_steps_still_load():
  saved = {"method": "prune", "paths": ["w"], "options": {
      "sparsity": "0.5", "prune_schedule": "gradual", "interval": 2, "steps": 4}}
  assert registry.check_options("prune", saved["options"])["ramp_steps"] == 4
  renamed = {**saved, "options": {"sparsity": "0.5", "prune_schedule": "gradual",
                                  "interval": 2, "ramp_steps": 4}}
  assert registry.with_defaults([saved]) == registry.with_defaults([renamed])
  assert registry.plan_methods([saved])[0].name == "prune"


# --- what is printed ----------------------------------------------------------------

def test_epochs_are_counted_in_words(runs, tmp_path, capsys):
  assert main(["train", *LENET5, "--workdir", str(tmp_path / "w")]) == 0
  assert "after 1 epoch (" in _out(capsys)
  assert main(["compress", "--from", str(runs / "base"), "--workdir", str(tmp_path / "p"),
               "--method", "prune"]) == 0
  assert "after 0 epochs of fine-tuning" in _out(capsys)
  assert report.plural(1, "epoch") == "1 epoch" and report.plural(2, "epoch") == "2 epochs"


def test_summary_prints_bytes_with_units_and_md_tables_alone(runs, capsys):
  assert main(["summary", "--model", "lenet300"]) == 0
  out = _out(capsys)
  assert re.search(r"^ *bytes: 1,066,440 B \(1\.02 MiB\)$", out, re.M), out
  assert ".0000 B" not in out and "1,066,440.0000" not in out
  assert main(["summary", "--workdir", str(runs / "q4"), "--format", "md"]) == 0
  lines = _out(capsys).strip().splitlines()
  assert all(line.startswith("|") or not line for line in lines), lines
  assert lines[0].startswith("| Layer |") and any(l.startswith("| total |") for l in lines)
  assert any(l.startswith("| Energy (uJ) | Exported bytes | Score | Error |") for l in lines)
  assert main(["summary", "--workdir", str(runs / "q4"), "--format", "latex"]) == 0
  text = _out(capsys).strip()
  assert text.startswith(r"\begin{tabular}") and text.endswith(r"\end{tabular}")


def test_eval_keys_are_aligned(runs, capsys):
  assert main(["eval", "--workdir", str(runs / "q4")]) == 0
  lines = _out(capsys).rstrip("\n").splitlines()
  assert len({line.index(": ") for line in lines}) == 1, lines
  values = dict(line.strip().split(": ", 1) for line in lines)
  assert re.fullmatch(r"[\d,]+ B \([\d.]+ KiB\)", values["bytes"]), values
  assert values["params"] == "431,080"


def test_tucker_ranks_are_chosen_and_printed_once(runs, tmp_path, capsys, caplog):
  dst = tmp_path / "tucker"
  with caplog.at_level(logging.WARNING):
    assert main(["compress", "--from", str(runs / "base"), "--workdir", str(dst), "--method",
                 "tucker"]) == 0
  out = _out(capsys)
  printed = re.search(r"^tucker: ranks (.*)$", out, re.M)
  assert printed and "conv1 left alone" in printed.group(1), out
  assert any("conv1/kernel has one input channel" in r.getMessage() for r in caplog.records)
  plan = json.loads((dst / "config.json").read_text())["compression"][0]
  chosen = plan["options"]["layer_ranks"]
  assert chosen["conv1"] is None and all(len(r) == 2 for k, r in chosen.items() if r)
  assert printed.group(1) == registry.spec("tucker").describe(plan["options"])[len("ranks "):]
  caplog.clear()
  for argv in (["eval", "--workdir", str(dst)], ["summary", "--workdir", str(dst)]):
    with caplog.at_level(logging.WARNING):
      assert main(argv) == 0
    assert not [r for r in caplog.records if "left alone" in r.getMessage()], argv
  out = _out(capsys)
  assert f"plan step 1: tucker on 4 tensors: ranks {printed.group(1)}" in out
