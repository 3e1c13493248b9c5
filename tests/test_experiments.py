"""Every study in experiments/ runs end to end in --smoke mode and writes its JSON,
markdown and LaTeX tables, README and plots."""

import argparse
import importlib
import json
import math
import re
import sys
import types

import pytest

from conftest import REPO

# study -> (extra arguments, tables it writes, plots it writes)
STUDIES = {
    "seed000": ([], ["baselines", "presets", "bits", "ttq", "sparsity_sweep", "sparsity_best"],
                ["bits_ptq", "bits_qat", "sparsity_error", "pareto_bytes"]),
    "deep_compression": ([], ["deep_compression", "deep_compression_layers"], ["pareto"]),
    # distill (a MicroBotNet teacher and student: 1 min of compiling) is left to seed003's
    # MNIST distillation, to keep CI short.
    "seed002": (["--parts", "widths,ttq"], ["widths", "ttq", "ttq_layers"],
                ["widths"]),
    "seed001": ([], ["tucker", "tucker_layers", "input"], []),
    "seed003": ([], ["int8", "pruning", "distill"], []),
}


def _study(name):
  sys.path.insert(0, str(REPO / "experiments"))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(str(REPO / "experiments"))


# seed002's smoke compiles four MicroBotNet training steps (~3 min on 2 cores): run it
# with `pytest -m heavy`; its code ran for real for results/seed002.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n == "seed002"
                                  else n for n in STUDIES])
def test_study_smoke(name, tmp_path, data_dir):
  extra, tables, plots = STUDIES[name]
  out = tmp_path / "out"
  _study(name).main(["--smoke", "--runs", str(tmp_path / "runs"), "--out", str(out),
                     "--data-dir", str(data_dir)] + extra)
  for table in tables:
    record = json.loads((out / f"{table}.json").read_text())
    assert record["smoke"] and record["rows"], table
    assert "--smoke" in record["command"] and record["wall_seconds"] > 0
    assert (out / f"{table}.md").read_text().count("\n|") >= 2
    assert (out / f"{table}.tex").read_text().startswith(r"\begin{tabular}")
  for plot in plots:
    assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  readme = (out / "README.md").read_text()
  assert all(json.loads((out / f"{t}.json").read_text())["title"] in readme for t in tables)
  _labels_say_what_ran(out, tables, tmp_path / "runs")
  CHECKS[name](out)


def _labels_say_what_ran(out, tables, runs):
  """A smoke run trains at most 1 epoch: its notes, row names and run names say so,
  not the full budgets ("QAT: 2 epochs", "-e60-"), and never "1 epochs"."""
  for table in tables:
    record = json.loads((out / f"{table}.json").read_text())
    text = " ".join([record["note"], *(str(r.get("name", "")) for r in record["rows"])])
    assert not re.search(r"\b(1|[2-9]|\d{2,}) epochs\b", text), (table, text)
  for run in runs.rglob("*"):
    assert all(int(e) <= 1 for e in re.findall(r"-e(\d+)(?![.\d])", run.name)), run


def test_smoke_help_names_the_data_it_uses(capsys):
  with pytest.raises(SystemExit):
    _study("seed002").main(["--help"])
  smoke = " ".join(capsys.readouterr().out.split()).rsplit("--smoke", 1)[1]
  assert smoke.startswith(" seconds-long run: 1 epoch on at most 512 training images of "
                          "CIFAR-10")


@pytest.mark.parametrize("name, args, option", [
    ("seed002", ["--restart-epochs", "0"], "--restart-epochs"),
    ("seed002", ["--ttq-epochs", "15,x"], "--ttq-epochs"),
    ("seed002", ["--width-epochs", "0.3=90"], "--width-epochs"),
    ("seed002", ["--teacher-width", "2"], "--teacher-width"),
    ("seed002", ["--kd-restart-epochs", "0"], "--kd-restart-epochs"),
    ("seed002", ["--student-weight-decay", "x"], "--student-weight-decay"),
    ("deep_compression", ["--distill-epochs", "lenet6=3"], "--distill-epochs"),
    ("deep_compression", ["--share-bits", "lenet5=conv:9"], "--share-bits"),
    ("seed001", ["--c3d-train-size", "x"], "--c3d-train-size"),
    ("seed001", ["--cifar-budget", "1.5"], "--cifar-budget"),
    ("seed001", ["--c3d-width", "0"], "--c3d-width"),
    ("seed003", ["--student-width", "0"], "--student-width"),
])
def test_study_options_reject_bad_values(name, args, option, capsys):
  with pytest.raises(SystemExit):
    _study(name).main(args)
  assert f"argument {option}:" in capsys.readouterr().err


@pytest.mark.parametrize("args, smoke, table", [
    ([], False, "distill"), (["--epochs", "150"], False, "distill-e150"),
    (["--epochs", "150"], True, "distill-e1"),
    (["--student-weight-decay", "1e-4"], False, "distill-wd0.0001"),
    (["--epochs", "120", "--student-weight-decay", "1e-4"], False, "distill-e120-wd0.0001")])
def test_seed002_distill_table_names_its_students_budget(args, smoke, table):
  """Students at other --epochs or weight decay never overwrite the recipe's table."""
  seed002, parser = _study("seed002"), argparse.ArgumentParser()
  seed002._options(parser)
  study = types.SimpleNamespace(args=parser.parse_args(args),
                                epochs=lambda n: min(n, 1) if smoke else n)
  name, title = seed002._distill_table(study)
  assert name == table
  assert ("students trained" in title) == ("-e" in table)


def _check_seed000(out):
  """Lower bit widths give fewer bytes; the scores are seed 000's formula."""
  rows = {r["name"]: r for r in json.loads((out / "bits.json").read_text())["rows"]}
  full, ptq4 = rows["LeNet-300-100 (32-bit)"], rows["LeNet-300-100 (4-bit PTQ)"]
  assert ptq4["bytes"] < full["bytes"] / 7  # kernels at 4 bits, biases at 32
  # + scales; entropy coding of the codes (export's default) may only shrink it
  assert 0.3 * ptq4["bytes"] < ptq4["exported_bytes"] <= 1.02 * ptq4["bytes"]
  assert ptq4["score"] == pytest.approx(
      math.log10(ptq4["error"] * ptq4["bytes"] * ptq4["nonzero_macs"]))
  assert ptq4["baseline"] == pytest.approx(full["score"])


def _check_deep_compression(out):
  rows = json.loads((out / "deep_compression.json").read_text())["rows"]
  pruned, distilled, quantized, shared, huffman, best = rows[1:7]
  assert pruned["sparsity"] > 0.9 and distilled["sparsity"] > 0.9
  assert quantized["sparsity"] >= distilled["sparsity"] and shared["sparsity"] >= 0.9
  assert quantized["file_bytes"] < distilled["file_bytes"] < rows[0]["file_bytes"]
  # Sharing at 4 bits beats 5-bit codes; entropy coding never grows the file; the
  # three rows are one model, coded three ways (same accuracy).
  assert max(best["file_bytes"], huffman["file_bytes"]) < shared["file_bytes"]
  assert shared["file_bytes"] < quantized["file_bytes"]
  assert shared["accuracy"] == huffman["accuracy"] == best["accuracy"]
  layers = json.loads((out / "deep_compression_layers.json").read_text())["rows"]
  assert [r["layer"] for r in layers] == ["fc1", "fc2", "fc3"]
  bits = lambda r, coded: r[f"value_bits{coded}"] + r[f"index_bits{coded}"]
  assert all(bits(r, "_coded") <= bits(r, "") for r in layers)  # weights and positions
  assert all(r["index_bits_coded"] == 0 for r in layers if r["form_coded"] == "dense")


def _check_seed002(out):
  layers = json.loads((out / "ttq_layers.json").read_text())["rows"]
  total, fixed = layers[-2:]
  assert (total["path"], fixed["path"]) == ("total (TTQ, 1 epoch)",
                                            "total (fixed ternary {-1, 0, 1}, 1 epoch)")
  for t in (total, fixed):
    assert t["positive"] + t["zero"] + t["negative"] == t["size"]
  rows = json.loads((out / "ttq.json").read_text())["rows"]
  assert [r["name"].split("(")[1] for r in rows] == [
      "float32)", "TTQ, 1 epoch)", "fixed ternary {-1, 0, 1}, 1 epoch)"]
  assert all(r["path"] not in ("stem_conv/kernel", "classifier/kernel") for r in layers)


def _check_seed001(out):
  """Tucker shrinks params and FLOPs; the input loadings have r1 * r2 features."""
  original, one_shot, tuned = json.loads((out / "tucker.json").read_text())["rows"]
  assert one_shot["params"] < original["params"] and one_shot["macs"] < original["macs"]
  assert one_shot["theoretical_speedup"] > 1 and one_shot["measured_speedup"] > 0
  assert one_shot["measured_1cpu"] is None or one_shot["measured_1cpu"] > 0
  assert tuned["epoch"] == 1 and one_shot["epoch"] == 0
  layers = json.loads((out / "tucker_layers.json").read_text())["rows"]
  assert layers[-1]["layer"] == "total" and layers[-1]["params_compressed"] == one_shot["params"]
  raw, decomposed = json.loads((out / "input.json").read_text())["rows"]
  assert raw["features"] == 784
  assert decomposed["features"] == decomposed["ranks"][0] * decomposed["ranks"][1] < 784
  assert 0 < decomposed["fit"] < 1 and decomposed["params"] < raw["params"]


def _check_seed003(out):
  """8-bit weights shrink the file; sparse runs give the dense run's error; the
  students are narrower than their teacher."""
  orig, weights, ops = json.loads((out / "int8.json").read_text())["rows"][:3]
  assert weights["exported_bytes"] < orig["exported_bytes"] / 3
  assert weights["exported_bytes"] == ops["exported_bytes"]
  assert all(r["time_b1"] > 0 and r["time_b128"] > 0 for r in (orig, weights, ops))
  for row in json.loads((out / "pruning.json").read_text())["rows"]:
    assert row["sparse_error"] == pytest.approx(row["error"], abs=2e-3)
    assert row["sparsity"] > 0.8
  rows = json.loads((out / "distill.json").read_text())["rows"]
  teacher, students = rows[0], rows[1:4]
  assert all(s["params"] < teacher["params"] / 10 for s in students)
  assert [r["how"] for r in rows[5:7]] == ["labels", "logits from the dense model"]


CHECKS = {"seed000": _check_seed000, "deep_compression": _check_deep_compression,
          "seed002": _check_seed002, "seed001": _check_seed001, "seed003": _check_seed003}
